"""``moe``: serve, route, ask, train, convert, eval, demo, config check, compose. ``moe <command> --help`` for each."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from router.encoder_types import ENCODER_BACKENDS, known_backends

if TYPE_CHECKING:
    from router.config import RouterConfig
    from router.orchestrator import Orchestrator
    from router.sdk import ChatResult
    from router.settings import Settings

__all__ = ["main"]

DEFAULT_CONFIG = "configs/demo.yaml"


def _load(path: str, *, check_env: bool = True, require_vars: bool = True) -> RouterConfig:
    from router.config import load_config

    return load_config(path, check_env=check_env, require_vars=require_vars)


def cmd_serve(args: argparse.Namespace) -> int:
    import contextlib
    import signal

    # SIGHUP asks for a reload, but its default action ends the process: held from the first thing serve does,
    # before its imports and the build, and handed to the reloader, which reloads for one once the service runs.
    sighups: list[int] = []
    previous = None
    with contextlib.suppress(AttributeError, ValueError):  # no SIGHUP here (Windows), or not the main thread
        previous = signal.signal(signal.SIGHUP, lambda signum, frame: sighups.append(signum))
    try:
        return _serve(args, sighups)
    finally:
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)


def _serve(args: argparse.Namespace, sighups: list[int]) -> int:
    from router.build import build_orchestrator, build_shared_state
    from router.feedback import open_feedback_store
    from router.logs import configure_json_logging, log_level, uvicorn_log_config
    from router.reload import Reloader
    from router.service import create_app
    from router.serving import serve
    from router.state_redis import RedisFeedbackStore, check_redis

    # Hot reload: on SIGHUP, POST /admin/reload, and (unless service.reload_poll_s is null) a file change. The
    # shared state (Redis connections) is kept across reloads. Made before the file is read, and told what the
    # config reads before the build reads it, so that an edit or a `moe train` while the service starts is
    # reloaded once it runs.
    def build(c: RouterConfig) -> Orchestrator:
        return build_orchestrator(c, state=state)

    reloader = Reloader(args.config, build=build, sighup=True)
    reloader.catch_sighup(sighups)
    config = _load(args.config)  # validated before anything starts: a bad file stops here, every problem listed
    reloader.poll_s = config.service.reload_poll_s
    reloader.watch(config)
    # One log stream, all JSON lines, at --log-level: the router's and the experts' (a request line per request,
    # a warning per failed expert call), and uvicorn's own, without its access lines (the router's say more). Set
    # before the start's own warnings (a Redis that does not answer, the gate's load), which are lines of it too.
    for logger in ("router", "experts"):
        configure_json_logging(log_level(args.log_level), logger)
    # Redis (state.backend: redis) holds what replicas share: rate-limit buckets and breakers. Credentials it
    # refuses stop the start here; a Redis that does not answer yet is logged and served without.
    unanswered = check_redis(config.state, os.environ)
    state = build_shared_state(config, os.environ)
    if unanswered is not None:
        state.assume_redis_down(unanswered)
    orchestrator = build(config)
    feedback = open_feedback_store(config)
    if unanswered is not None and isinstance(feedback, RedisFeedbackStore):
        feedback.assume_down(unanswered)
    app = create_app(orchestrator, rate_store=state.rate_store, reloader=reloader, feedback=feedback, closes=[state])
    serve(app, host=args.host or config.service.host, port=args.port or config.service.port,
          log_level=args.log_level, log_config=uvicorn_log_config(args.log_level))
    return 0


def cmd_serve_replay(args: argparse.Namespace) -> int:
    """Serve a config's replay experts as one OpenAI-compatible endpoint (``experts.replay_server``)."""
    from pathlib import Path

    import uvicorn

    from experts.base import ExpertContext
    from experts.registry import build_expert
    from experts.replay_server import create_app

    # Replay experts need no keys; other experts' api_key_env need not be set to serve these.
    config = _load(args.config, check_env=False)
    context = ExpertContext(base_dir=Path(config.base_dir))
    experts = [build_expert(e, context) for e in config.experts if e.type == "replay"]
    if not experts:
        print(f"error: {args.config}: no experts of type 'replay' to serve", file=sys.stderr)
        return 2
    uvicorn.run(create_app(experts), host=args.host, port=args.port)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from router.build import expert_problems, loading_problems, nested_loading_problems
    from router.config import ConfigError
    from router.feedback import feedback_problems
    from router.gate_artifact import is_trained
    from router.state_redis import redis_url_problems

    config = _load(args.file, check_env=not args.no_env)
    artifact = config.resolve(config.gate.artifact)
    # What moe serve would refuse in the experts (built as serve builds them: a replay expert's recordings) and in
    # the trained gate (its encoder, its files, the experts it covers, a two-stage part, learned vote weights),
    # said now: loaded as serve loads it; and so for each router nested in process.
    problems = (expert_problems(config) + loading_problems(config) + nested_loading_problems(config)
                + feedback_problems(config))
    if not args.no_env:  # the Redis URL's options, as redis-py reads them (no connection is made)
        problems += redis_url_problems(config.state, os.environ)
    if problems:
        raise ConfigError(args.file, problems)
    from router.gate import spelled_alike

    twins = [", ".join(group) for group in spelled_alike(config.expert_names)]
    if twins:
        print(f"warning: expert names that differ only in case: {'; '.join(twins)}. They are distinct "
              "experts; if one is a typo or a rename, training data and clients naming the other will not reach it",
              file=sys.stderr)
    trained = is_trained(artifact)
    where = f"gate artifact {artifact}" if trained else f"no gate artifact at {artifact} yet (moe train)"
    if not trained:  # serve needs `moe train` first: what moe train would refuse, said now
        try:
            _check_train_data(config, args.file)
        except FileNotFoundError as exc:
            print(f"warning: moe train would stop: {exc}", file=sys.stderr)
    print(f"{args.file}: OK (version {config.version}, {len(config.experts)} experts: "
          f"{', '.join(config.expert_names)}; {where})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from router.train import train_from_config

    config = _load(args.config, check_env=False)
    _check_train_data(config, args.config)
    gate = train_from_config(config, progress=True, feedback=args.feedback, drop_unknown=args.drop_unknown_experts)
    metrics = gate.metadata.as_dict()["metrics"]
    if gate.metadata.uncosted_pick_share is not None:  # beside metrics in gate.json (format 1's metrics are fixed)
        metrics["uncosted_pick_share"] = gate.metadata.uncosted_pick_share
    summary = {"artifact": str(config.resolve(config.gate.artifact)), "experts": gate.experts, "metrics": metrics}
    fit = getattr(gate, "fit", None)  # a two-stage gate (gate.cascade): its threshold and validation figures
    if fit is not None:
        summary["cascade"] = fit.as_dict()
    settings = getattr(gate, "settings", None)  # an outcome gate: anchor, margin, success model (and its prior)
    if settings is not None:
        summary["outcome_gate"] = settings()
    print(json.dumps(summary, indent=2))
    return 0


def _check_train_data(config: RouterConfig, source: str) -> None:
    """Refuse a missing ``gate.train_data`` file by its key in the config, saying how to write one."""
    from router.outcome import train_file_kind

    for i, entry in enumerate(config.gate.train_data):
        path = config.resolve(entry)
        if path.is_dir():
            raise FileNotFoundError(f"{source}: gate.train_data[{i}] names {entry!r}, which is a directory ({path});"
                                    " name a JSONL file")
        if path.is_file():
            if train_file_kind(path) is None:
                print(f"warning: gate.train_data[{i}] ({path}) is empty (no records; training leaves it out)",
                      file=sys.stderr)
            continue
        if any(e.replay is not None and e.replay.source == "routerbench" for e in config.experts):
            # The demo's file: RouterBench's train split as outcome records, named after the replay experts.
            how = (f"with `moe convert routerbench --split train --no-answers --config {source} --out {path}` "
                   "(RouterBench's train split as outcome records for the replay experts; `make demo` writes it "
                   "too, then trains and serves)")
        else:
            how = ('with labelled {"query", "label"} lines or outcome records, or from a shared data set with '
                   f"`moe convert DATASET --split train --out {path}` (`moe convert --help` lists them)")
        raise FileNotFoundError(f"{source}: gate.train_data[{i}] names {entry!r}, and {path} does not exist. "
                                f"Create it {how}.")


def _one_target(args: argparse.Namespace) -> None:
    """``route`` and ``ask`` go to a running service (``--url``) or route in-process (``--config``), not both."""
    if args.url and args.config:
        raise ValueError(f"--url {args.url} and --config {args.config}: give one; --url asks a running service "
                         "(which has its own config), --config routes in this process")
    if not args.url:
        args.config = args.config or DEFAULT_CONFIG


def _argv_text(arg: str) -> str:
    """A command-line argument as text a request can carry: a byte the locale's encoding cannot decode (Python
    keeps it as a lone surrogate, which JSON cannot hold) becomes U+FFFD, as the encoder would read it, with a
    warning."""
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        encoding = sys.getfilesystemencoding()
        arg = os.fsencode(arg).decode(encoding, "replace")
        print(f"warning: the query holds bytes that are not {encoding} text; each is sent as U+FFFD",
              file=sys.stderr)
    return arg


def cmd_route(args: argparse.Namespace) -> int:
    from router.sdk import Client, LocalRouter

    _one_target(args)

    if args.url:
        with Client(args.url, api_key=args.api_key) as client:
            decision = client.route(args.query)
    else:
        from router.build import build_orchestrator

        # The gate's decision alone: no expert is called and nothing is recorded, so the experts' keys need not
        # be set and no feedback store is opened (the config's folder may be read-only, a mounted artifact).
        local = LocalRouter(build_orchestrator(_load(args.config, check_env=False)))
        decision = asyncio.run(local.route(args.query))
    print(json.dumps(decision.model_dump(), indent=2))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from router.sdk import Client, LocalRouter

    _one_target(args)

    if args.stream:
        return _ask_streaming(args)
    if args.url:
        with Client(args.url, api_key=args.api_key) as client:
            result = client.chat(args.query, model=args.model)
    else:
        async def run() -> ChatResult:
            async with LocalRouter.from_config(args.config) as local:
                return await local.chat(args.query, model=args.model)

        result = asyncio.run(run())
    print(result.content)
    print(f"[expert: {result.expert}, cost: ${result.cost_usd:.6f}, tokens: {result.usage.total_tokens}]",
          file=sys.stderr)
    return 0


def _ask_streaming(args: argparse.Namespace) -> int:
    """``moe ask --stream``: each piece printed as it comes, from a running service or in process."""
    from router.sdk import Client, LocalRouter, StreamChunk

    def show(chunk: StreamChunk) -> None:
        print(chunk.content or "", end="", flush=True)
        if chunk.trace is not None:
            print(f"\n[expert: {chunk.expert}, switches: {chunk.trace.switches}]")

    if args.url:
        with Client(args.url, api_key=args.api_key) as client:
            for chunk in client.stream(args.query, model=args.model):
                show(chunk)
        return 0

    async def run() -> None:
        async with LocalRouter.from_config(args.config) as local:
            async for chunk in local.stream(args.query, model=args.model):
                show(chunk)

    asyncio.run(run())
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from router.compose import container_config_path, dump_compose, read_config

    # Validated expanded, rendered as written: the file keeps each ${VAR} for compose to substitute at `up` (the
    # containers get the variables, so they need not be set here, and no value of this shell's lands in the file).
    in_container = container_config_path(args.config)  # a config outside the repository is refused first
    config, written = read_config(args.config)
    print(dump_compose(config, written=written, source=args.config, config_path_in_container=in_container), end="")
    return 0


def _delegate(target: str) -> Callable[[argparse.Namespace], int]:
    """Commands implemented outside ``router`` (evaluation, demo), imported only when run."""

    def run(args: argparse.Namespace) -> int:
        module, _, func = target.partition(":")
        result: int = getattr(importlib.import_module(module), func)(args)
        return result

    return run


def _command(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand whose one line in ``moe --help`` is also what its own ``--help`` opens with."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}.")
    return parser


def _parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    from router.settings import Settings

    settings = settings or Settings.load()
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    parser = argparse.ArgumentParser(prog="moe", description="Mixture-of-experts router over whole LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "serve", "run the OpenAI-compatible service")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"the router config (default: {DEFAULT_CONFIG})")
    p.add_argument("--host", type=host_address, help="the address to bind (default: the config's service.host)")
    p.add_argument("--port", type=port_number, help="the port to listen on (default: the config's service.port)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (default: info)")
    p.set_defaults(func=cmd_serve)

    p = _command(sub, "serve-replay", "serve a config's replay experts as one OpenAI-compatible endpoint")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"the config whose replay experts to serve (default: "
                                                            f"{DEFAULT_CONFIG})")
    p.add_argument("--host", type=host_address, default="127.0.0.1", help="the address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8001, help="the port to listen on (default: 8001)")
    p.set_defaults(func=cmd_serve_replay)

    p = _command(sub, "config", "work with config files")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    c = _command(config_sub, "check", "validate a config and list every problem")
    c.add_argument("file", help="the config file (YAML)")
    c.add_argument("--no-env", action="store_true",
                   help="do not require the variables the *_env keys name (API keys, the Redis URL) to be set; "
                        "a ${VAR} without a default must still be set")
    c.set_defaults(func=cmd_config_check)

    p = _command(sub, "train", "train the gate from the experts' examples and the config's train_data")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"the router config (default: {DEFAULT_CONFIG})")
    p.add_argument("--feedback", action=argparse.BooleanOptionalAction, default=True,
                   help="fold the stored feedback into the gate (default; feedback.enabled: false also skips it)")
    p.add_argument("--drop-unknown-experts", action="store_true",
                   help="leave out train_data lines (labels, or records' outcomes) naming experts the config no "
                        "longer has, with a warning; without it they are an error (a typo would go unseen)")
    p.set_defaults(func=cmd_train)

    for name, func, text in (("route", cmd_route, "show the gate's decision for a query"),
                             ("ask", cmd_ask, "send a query through the router")):
        p = _command(sub, name, text)
        p.add_argument("query", type=_argv_text, help="the query text (quote it)")
        p.add_argument("--config", default=None, help=f"route in-process with this config (default: {DEFAULT_CONFIG})")
        p.add_argument("--url", help="a running service instead, e.g. http://127.0.0.1:8000 (not with --config)")
        p.add_argument("--api-key", default=api_key,
                       help="the service's key (with --url); default: $MOE_API_KEY, which keeps it out of the "
                            "process list and the shell's history")
        if name == "ask":
            p.add_argument("--model", default="auto", help="'auto' routes; an expert's name calls it directly")
            p.add_argument("--stream", action="store_true", help="stream the answer, each piece printed as it comes")
        p.set_defaults(func=func)

    p = _command(sub, "convert", "write a shared data set as training JSONL (labelled or outcome records)")
    p.add_argument("dataset", help="mmlu-pro-domain, clinc150-domain, snips-intent, banking77-intent, "
                   "mmlu-pro-outcome or routerbench")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--split", default="train", help="train (default), val, test or all: the evaluation "
                   "suites' own splits, so a converted train file never holds a test question")
    p.add_argument("--data", default=None, help="the shared data folder (default: $MOE_DATA_DIR or ../shared/data)")
    p.add_argument("--seed", type=seed_number, default=0, help="the seed of MMLU-Pro's split by question id")
    p.add_argument("--config", help="outcome data: name the recorded LLMs after this config's replay experts")
    p.add_argument("--no-answers", action="store_true", help="outcome data: leave the experts' answers out")
    p.add_argument("--limit", type=limit_count, default=None, help="at most this many lines")
    p.add_argument("--id-prefix", default="", help="put this before every id (e.g. 'clinc-'), so files converted "
                   "from several data sets, whose ids repeat, can be joined into one")
    p.set_defaults(func=_delegate("eval.convert:main"))

    p = _command(sub, "eval", "evaluate routing on a named suite or your own JSONL")
    p.add_argument("--suite", help="mmlu-pro-domain, clinc150-domain, snips-intent, banking77-intent, "
                   "mmlu-pro-outcome, mmlu-pro-combine, routerbench, routerbench-combine, routellm-mmlu or "
                   "clinc150-cold-start")
    p.add_argument("--train", help="labelled JSONL to train on ({'query','label'} per line)")
    p.add_argument("--test", help="labelled JSONL to evaluate on; queries whose label is not in --train are "
                   "scored as out of scope (oos_auroc)")
    p.add_argument("--oos-label", help="with --train/--test: this label marks out-of-scope queries (like "
                   "CLINC150's 'oos'); training queries with it are left out")
    p.add_argument("--out", default="out/eval", help="folder for results.json, report.md and figures (default: "
                   "out/eval, in the working folder)")
    p.add_argument("--data", default=None, help="the shared data folder (default: $MOE_DATA_DIR or ../shared/data)")
    p.add_argument("--encoder", default="onnx", type=encoder_backend,
                   help=f"encoder backend: {', '.join(sorted(ENCODER_BACKENDS))}, or an installed package's (default: "
                   "onnx; static is the fast distilled table)")
    p.add_argument("--device", default="cpu", help="sentence-transformers only: the torch device to embed on "
                   "(cpu, cuda, cuda:N, mps; default cpu)")
    p.add_argument("--seed", type=seed_number, default=0, help="the seed of the suite's split, the gate's "
                   "validation split and the bootstrap intervals (default: 0)")
    p.add_argument("--limit", type=limit_count, default=None, help="at most this many queries per split (a fast run)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--pool", default=None, help="experts for mmlu-pro-combine: all, small (open models up to "
                   "8x7B) or name,name,... (default: all); other suites refuse it")
    p.set_defaults(func=_delegate("eval.harness:main"))

    p = _command(sub, "demo", "train, serve replay experts, and score the router on held-out questions")
    p.add_argument("--out", default="out/demo", help="where results.json, results.md and router.log go "
                                                     "(default: out/demo)")
    p.add_argument("--data", default=None, help="the shared data folder (default: $MOE_DATA_DIR or ../shared/data)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"a config of RouterBench replay experts (default: "
                                                            f"{DEFAULT_CONFIG})")
    p.add_argument("--limit", type=limit_count, default=None, help="at most this many test questions")
    p.set_defaults(func=_delegate("eval.demo:main"))

    p = _command(sub, "compose", "print the docker-compose file a config describes")
    p.add_argument("config", nargs="?", default="configs/compose.yaml",
                   help="the router config (default: configs/compose.yaml); the file is written to standard "
                        "output: moe compose CONFIG > docker-compose.yml")
    p.set_defaults(func=cmd_compose)
    return parser


def limit_count(raw: str) -> int:
    """``--limit`` for argparse: an integer of at least 1 (0 would keep nothing, and a negative one would slice
    items off the end)."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def encoder_backend(raw: str) -> str:
    """``--encoder`` for argparse: a built-in backend, or one an installed package's entry point adds (looked for
    only when the name is not built in)."""
    from experts.plugins import ENCODER_GROUP, installed

    if raw not in ENCODER_BACKENDS and raw not in installed(ENCODER_GROUP):
        known = ", ".join(known_backends())
        raise argparse.ArgumentTypeError(f"unknown encoder backend {raw!r}; known: {known}")
    return raw


def seed_number(raw: str) -> int:
    """``--seed`` for argparse: 0 to 2**32 - 1, what NumPy and scikit-learn take (refused late otherwise, by a
    library that names its own parameter, once the split was written)."""
    try:
        seed = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
    if not 0 <= seed <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{seed} is out of range (0 to {2**32 - 1})")
    return seed


def host_address(raw: str) -> str:
    """An address to listen on, for argparse: never empty, as ``service.host`` is never empty. uvicorn would bind
    every interface for "" (``moe serve-replay``), and ``moe serve`` would fall back to the config's host unsaid
    (``--host "$HOST"`` with HOST unset, say)."""
    if not raw.strip():
        raise argparse.ArgumentTypeError("must not be empty: an empty host binds every interface; give an address "
                                         "(127.0.0.1 for this machine only, 0.0.0.0 for every interface)")
    return raw


def port_number(raw: str) -> int:
    """A TCP port for argparse: 1 to 65535 (the OS would take 70000 as 70000 mod 65536 and listen elsewhere)."""
    try:
        port = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (1 to 65535)")
    return port


def main(argv: Sequence[str] | None = None) -> int:
    from router.errors import naming_config
    from router.settings import Settings, SettingsError

    try:
        settings = Settings.load()  # once, as the command starts: a bad MOE_* variable stops it here, named
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args = _parser(settings).parse_args(argv)
    args.settings = settings

    def error(message: object, code: int) -> int:
        config = getattr(args, "config", None) or getattr(args, "file", None)  # moe config check names it "file"
        print(f"error: {naming_config(message, config)}", file=sys.stderr)
        return code

    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        # Ctrl-C: one line, not a traceback through whatever was running; 130 is the shell's code for SIGINT.
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:  # a missing file, a folder where a file goes, no permission, bad data
        from router.config import ConfigError  # after the fact: a command that reads no config never loads it

        return error(exc, 2 if isinstance(exc, ConfigError) else 1)
    except ImportError as exc:  # an optional package this command needs: the message names it
        return error(exc, 1)
    except Exception as exc:
        message = _runtime_error(exc, in_process=not getattr(args, "url", None))
        if message is None:
            raise
        return error(message, 1)
    return code


def _runtime_error(exc: Exception, *, in_process: bool = False) -> str | None:
    """The message for a failure a command can meet at run time (an expert that cannot answer or be built, an
    unknown model, a service that answers an error or cannot be reached); None for a bug, whose traceback is
    wanted. A service that cannot be reached is the SDK's ``RouterConnectionError``, a ``RouterAPIError``.
    ``in_process``: the command routed in this process (``LocalRouter``), whose errors carry the HTTP status the
    service would have answered with, not one that was answered, so the message leaves it out.
    Imported here, after the fact, so that a command that never meets them never imports them."""
    from experts.errors import ExpertError
    from router.encoders import EncoderChecksumError
    from router.fallback import AllExpertsFailed
    from router.orchestrator import NoCapableExpert, UnknownExpert
    from router.sdk import RouterAPIError

    if isinstance(exc, EncoderChecksumError):  # a corrupt weights file: the message names it and its pin
        return str(exc)
    if in_process and isinstance(exc, RouterAPIError) and exc.status:
        return f"{exc.message}{f' ({exc.code})' if exc.code else ''}"
    if isinstance(exc, ExpertError | AllExpertsFailed | UnknownExpert | NoCapableExpert | RouterAPIError):
        return str(exc)
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

