"""The `moe` command line: every subcommand has --help, and a bad config stops `serve` before it starts."""

import json
import logging
import logging.config
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from router.cli import _parser, main
from tests.support import trained_config

LOGGERS = ("router", "experts", "uvicorn", "uvicorn.error")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """``moe serve`` sets up the process's logging (JSON handlers, its --log-level); put it back for the tests
    after, which read log records through pytest's own handler."""
    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate,
                    logging.getLogger(name).level) for name in LOGGERS}
    yield
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate, logger.level = propagate, level


BAD = """\
version: 1
experts:
  - name: coder
    type: vllm
    endpoint: http://127.0.0.1:9/v1
    model: m
    timout_s: 3
    api_key_env: MOE_TEST_UNSET_KEY
  - name: chat
    type: openai
    endpoint: http://127.0.0.1:9/v1
    model: x
gate:
  default_expert: writer
"""


@pytest.mark.parametrize("command", ["serve", "route", "ask", "train", "eval", "demo", "compose", "config"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: moe {command}" in capsys.readouterr().out


def test_every_argument_of_every_command_says_what_it_is() -> None:
    """``--help`` listed some options bare (serve's --config, --host and --port; demo's --out): a user had to
    guess what they take and what they default to."""
    import argparse

    bare = []
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        parsers = [(f"{name} {n}", p) for n, p in nested[0].choices.items()] if nested else [(name, sub)]
        for label, parser in parsers:
            bare += [f"{label} {action.dest}" for action in parser._actions
                     if not isinstance(action, argparse._HelpAction) and not action.help]
            if not parser.description:  # its own --help opens with what it does, as `moe --help` lists it
                bare.append(f"{label} (what the command does)")
    assert bare == []


def test_config_check_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_TEST_UNSET_KEY", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "experts[0] (coder).timout_s: unknown key" in err
    assert "experts[0] (coder).api_key_env: environment variable MOE_TEST_UNSET_KEY is not set" in err
    assert "gate.default_expert: references expert 'writer', which is not defined" in err


def test_config_check_names_a_redis_url_option_no_connection_takes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``?bogus_option=1`` on the Redis URL passed moe config check, and moe serve then refused it: the check reads
    the URL's options as redis-py does, without connecting (nothing listens on port 1)."""
    config = tmp_path / "redis.yaml"
    config.write_text("version: 1\nexperts:\n  - {name: a, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m,"
                      " examples: [hello]}\nstate: {backend: redis, url_env: MOE_TEST_REDIS}\n")
    monkeypatch.setenv("MOE_TEST_REDIS", "redis://:s3cret-pw@127.0.0.1:1/0?bogus_option=1")
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "state.url_env: environment variable MOE_TEST_REDIS holds a URL whose option 'bogus_option'" in err
    assert "s3cret" not in err
    assert main(["config", "check", str(config), "--no-env"]) == 0  # the environment is not read
    # One only the blocking client takes: the rate limits' asyncio client refuses it when serve builds it.
    monkeypatch.setenv("MOE_TEST_REDIS", "rediss://:s3cret-pw@127.0.0.1:1/0?ssl_validate_ocsp=1")
    assert main(["config", "check", str(config)]) == 2
    assert "option 'ssl_validate_ocsp' this kind of connection does not take (the asyncio connection the rate " \
           "limits use" in capsys.readouterr().err
    monkeypatch.setenv("MOE_TEST_REDIS", "redis://:s3cret-pw@127.0.0.1:1/0?socket_timeout=2")
    capsys.readouterr()
    assert main(["config", "check", str(config)]) == 0, capsys.readouterr().err


def test_config_check_warns_of_training_files_moe_train_would_refuse(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no gate yet, config check said OK and pointed at moe train, which then refused a train_data file that
    does not exist (or is a folder)."""
    config = tmp_path / "c.yaml"
    config.write_text("version: 1\nexperts:\n  - {name: a, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m,"
                      " examples: [hello]}\n  - {name: b, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m,"
                      " examples: [bye]}\ngate: {train_data: [data/nope.jsonl]}\n")
    assert main(["config", "check", str(config), "--no-env"]) == 0  # OK: moe train writes the gate serve needs
    out, err = capsys.readouterr()
    assert "OK" in out and "no gate artifact" in out
    assert f"warning: moe train would stop: {config}: gate.train_data[0] names 'data/nope.jsonl', and " in err
    (tmp_path / "data" / "nope.jsonl").mkdir(parents=True)
    assert main(["config", "check", str(config), "--no-env"]) == 0
    assert "which is a directory" in capsys.readouterr().err


def test_config_check_warns_of_expert_names_that_differ_only_in_case(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("version: 1\nexperts:\n" + "".join(
        f"  - {{name: {n}, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m, examples: [hi {n}]}}\n"
        for n in ("Balance", "balance", "card")))
    assert main(["config", "check", str(config), "--no-env"]) == 0
    assert "warning: expert names that differ only in case: Balance, balance. They are distinct experts" in \
        capsys.readouterr().err


def test_config_check_names_a_feedback_file_serve_would_refuse(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A feedback.path that is a folder, or a file that is no SQLite database, passed config check, and serve then
    stopped on it. The check creates nothing."""
    config = tmp_path / "c.yaml"
    base = ("version: 1\nexperts:\n  - {name: a, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m, "
            "examples: [hello]}\n  - {name: b, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m, "
            "examples: [bye]}\n")
    config.write_text(base + "feedback: {path: fb/verdicts.sqlite3}\n")
    assert main(["config", "check", str(config), "--no-env"]) == 0
    assert not (tmp_path / "fb").exists()  # created by serve, not by the check
    capsys.readouterr()
    (tmp_path / "fb" / "verdicts.sqlite3").mkdir(parents=True)
    assert main(["config", "check", str(config), "--no-env"]) == 2
    assert "feedback.path: " in (err := capsys.readouterr().err) and "is not a file (a folder?)" in err, err
    (tmp_path / "fb" / "verdicts.sqlite3").rmdir()
    (tmp_path / "fb" / "verdicts.sqlite3").write_text("not a database, but notes")
    assert main(["config", "check", str(config), "--no-env"]) == 2
    assert "cannot open it as SQLite (file is not a database)" in capsys.readouterr().err
    config.write_text(base + "feedback: {path: fb/verdicts.sqlite3, enabled: false}\n")
    assert main(["config", "check", str(config), "--no-env"]) == 0


def test_config_check_names_a_key_that_is_not_a_string(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mis-indented ``8000:`` at the top level once crashed ``moe config check`` with an IndexError."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nexperts:\n  - {name: a, type: openai, endpoint: 'http://127.0.0.1:8001/v1', "
                   "model: m}\n8000: oops\n")
    assert main(["config", "check", str(bad), "--no-env"]) == 2
    err = capsys.readouterr().err
    assert "<root>: mapping keys must be strings: 8000 is int" in err and "Traceback" not in err


def test_config_check_accepts_the_shipped_configs(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("demo.yaml", "compose.yaml"):
        assert main(["config", "check", str(root / "configs" / name), "--no-env"]) == 0
    assert "OK" in capsys.readouterr().out


def test_serve_refuses_a_bad_config_before_starting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    env = {k: v for k, v in __import__("os").environ.items() if k != "MOE_TEST_UNSET_KEY"}
    run = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--config", str(bad), "--port", "9"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 2
    assert "timout_s: unknown key" in run.stderr
    assert "MOE_TEST_UNSET_KEY is not set" in run.stderr
    assert "'writer', which is not defined" in run.stderr


def test_serve_refuses_a_missing_gate_with_the_command_to_fix_it(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "ok.yaml"
    good.write_text(BAD.replace("    timout_s: 3\n", "").replace("    api_key_env: MOE_TEST_UNSET_KEY\n", "")
                    .replace("default_expert: writer", "default_expert: chat"))
    assert main(["serve", "--config", str(good)]) == 1
    assert f"moe train --config {good}" in capsys.readouterr().err  # the command as it can be copied


def served_config(tmp_path: Path) -> Path:
    """A config of two experts known by their examples, with its gate trained: what ``moe serve`` needs."""
    return trained_config(tmp_path, "version: 1\ngate:\n  artifact: gate\nexperts:\n"
                          "  - {name: coder, type: vllm, endpoint: 'http://127.0.0.1:9/v1', model: m, "
                          "description: code, examples: ['write a python function']}\n"
                          "  - {name: lawyer, type: vllm, endpoint: 'http://127.0.0.1:9/v1', model: m, "
                          "description: legal questions, examples: ['can I break my lease']}\n")


def _serving_captured(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The uvicorn configs ``moe serve`` would run, in place of running them (as if each started)."""
    from router.serving import RouterServer

    served: list[Any] = []

    def run(server: RouterServer, sockets: object = None) -> None:
        served.append(server.config)
        server.started = True

    monkeypatch.setattr(RouterServer, "run", run)
    return served


def test_serve_closes_its_shared_state_when_the_app_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state ``moe serve`` builds once for every config (Redis clients, their outage probes) was never closed:
    the app's lifespan closed the orchestrator and the feedback store, and left the state to the process's end."""
    import asyncio

    from router import build
    from router.state_redis import SharedState

    built: list[SharedState] = []
    closed: list[SharedState] = []

    def build_shared_state(*args: Any) -> SharedState:
        state = SharedState()

        async def aclose() -> None:
            closed.append(state)

        state.aclose = aclose  # type: ignore[method-assign]
        built.append(state)
        return state

    monkeypatch.setattr(build, "build_shared_state", build_shared_state)
    served = _serving_captured(monkeypatch)
    assert main(["serve", "--config", str(served_config(tmp_path)), "--port", "8123"]) == 0
    app = served[0].app.app  # inside AbortStalled

    async def run_lifespan() -> None:
        async with app.router.lifespan_context(app):
            assert closed == []
        assert closed == built and len(built) == 1

    asyncio.run(run_lifespan())


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")
def test_serve_gets_uvloop_and_httptools_from_uvicorn_s_auto_choice(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``moe serve`` leaves uvicorn's loop and HTTP parser on "auto", which takes uvloop and httptools when they
    import; both are dependencies (22 to 51% more requests/s, README Performance), so a plain install has them."""
    import uvicorn
    import uvloop

    from router.serving import AbortStalled

    config = served_config(tmp_path)
    served = _serving_captured(monkeypatch)
    assert main(["serve", "--config", str(config), "--port", "8123"]) == 0
    options = served[0]
    assert options.port == 8123 and options.host == "127.0.0.1"
    assert options.loop == "auto" and options.http == "auto"  # uvicorn's own default
    assert options.access_log is False  # the router writes its own line per request
    assert isinstance(options.app, AbortStalled)

    auto = uvicorn.Config(app=options.app, loop="auto", http="auto")
    auto.load()
    assert auto.http_protocol_class.__name__ == "HttpToolsProtocol"
    loop = uvloop.new_event_loop()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()


def test_a_corrupt_encoder_file_is_an_error_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import router.encoders as encoders

    def corrupt(model_path: object = None) -> None:
        raise encoders.EncoderChecksumError("model.onnx: sha256 0000 does not match the 8199 pinned by its package")

    monkeypatch.setattr(encoders, "verified_onnx_model", corrupt)
    assert main(["eval", "--suite", "snips-intent", "--encoder", "onnx", "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == ("error: model.onnx: sha256 0000 does not match the 8199 pinned by its "
                                       "package\n")


def test_a_missing_optional_package_is_an_error_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    assert main(["eval", "--suite", "snips-intent", "--encoder", "sentence-transformers",
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: this encoder backend needs the 'sentence-transformers' package")
    assert "pip install sentence-transformers" in err and "Traceback" not in err


def test_train_names_the_config_key_of_a_missing_train_data_file(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2]
    demo = tmp_path / "configs" / "demo.yaml"  # the demo's train_data, ../artifacts/..., lands in tmp_path
    demo.parent.mkdir()
    demo.write_text((root / "configs" / "demo.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    assert main(["train", "--config", str(demo)]) == 1
    err = capsys.readouterr().err
    missing = tmp_path / "artifacts" / "demo-outcomes.jsonl"
    assert err.startswith(f"error: {demo}: gate.train_data[0] names '../artifacts/demo-outcomes.jsonl', and "
                          f"{missing} does not exist")
    assert f"`moe convert routerbench --split train --no-answers --config {demo} --out {missing}`" in err
    assert "`make demo`" in err

    labelled = tmp_path / "labelled.yaml"
    labelled.write_text("version: 1\ngate: {train_data: [data/mine.jsonl]}\nexperts:\n"
                        "  - {name: a, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m}\n"
                        "  - {name: b, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m}\n")
    assert main(["train", "--config", str(labelled)]) == 1
    err = capsys.readouterr().err
    assert "gate.train_data[0] names 'data/mine.jsonl'" in err and "`moe convert DATASET --split train" in err


def test_train_says_what_the_outcome_gate_chose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Outcome records that name their task: ``moe train`` prints the gate's settings (success model, prior),
    as gate.json records them."""
    rng = np.random.default_rng(0)
    topics = {"math": "solve the equation for x", "law": "is the contract enforceable under the statute"}
    lines = []
    for i in range(120):
        task = "math" if i % 2 else "law"
        good = {"a": 0.9, "b": 0.3} if task == "math" else {"a": 0.3, "b": 0.9}
        lines.append(json.dumps({"query": f"{topics[task]} case {i}", "task": task,
                                 "outcomes": {e: float(rng.random() < p) for e, p in good.items()}}))
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = tmp_path / "router.yaml"
    config.write_text("version: 1\ngate: {train_data: [records.jsonl], artifact: gate}\nexperts:\n"
                      "  - {name: a, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m}\n"
                      "  - {name: b, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m}\n")
    assert main(["train", "--config", str(config), "--no-feedback"]) == 0
    said = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "gate" / "gate.json").read_text(encoding="utf-8"))
    assert said["outcome_gate"]["success_model"] == saved["success_model"]
    assert saved["success_model"]["kind"] == "knn" and saved["success_model"]["prior"] in ("overall", "task")
    # No costs recorded: routed_cost is null, and the summary says why, as gate.json does beside its metrics
    assert said["metrics"]["routed_cost"] is None and said["metrics"]["uncosted_pick_share"] == 1.0
    assert saved["uncosted_pick_share"] == 1.0 and "uncosted_pick_share" not in saved["metrics"]


def test_training_data_naming_a_removed_expert_is_refused_unless_told_to_leave_it_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """After an expert is removed from the config, its labels in train_data stopped the next moe train with no
    way on but rewriting the file; the error now names --drop-unknown-experts, which trains without them."""
    rows = [{"query": f"{topic} question {i}", "label": label} for i in range(12)
            for topic, label in (("algebra", "a"), ("poetry", "b"), ("cooking", "c"))]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = tmp_path / "router.yaml"
    config.write_text("version: 1\ngate: {train_data: [mine.jsonl], artifact: gate, encoder: {backend: static}}\n"
                      "experts:\n" + "".join(f"  - {{name: {n}, type: openai, endpoint: 'http://127.0.0.1:9/v1', "
                                             "model: m}\n" for n in "ab"))
    assert main(["train", "--config", str(config), "--no-feedback"]) == 1
    err = capsys.readouterr().err
    assert "mine.jsonl:3: label 'c' is not an expert of the config" in err
    assert "moe train --drop-unknown-experts leaves its lines out" in err
    with caplog.at_level("WARNING", logger="router.train"):
        assert main(["train", "--config", str(config), "--no-feedback", "--drop-unknown-experts"]) == 0
    assert "left out what names expert(s) the config does not have: 'c' (12 line(s), first 3)" in caplog.text
    saved = json.loads((tmp_path / "gate" / "gate.json").read_text(encoding="utf-8"))
    assert saved["experts"] == ["a", "b"] and saved["metrics"]["n_train"] + saved["metrics"]["n_val"] == 24


def test_a_port_out_of_range_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--config", "configs/demo.yaml", "--port", "70000"])
    assert info.value.code == 2
    assert "port 70000 is out of range (1 to 65535)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "serve-replay"])
def test_an_empty_host_is_refused_as_the_config_s_is(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--host ""`` made ``serve-replay`` listen on every interface, and ``serve`` on the config's host unsaid."""
    with pytest.raises(SystemExit) as info:
        main([command, "--config", "configs/demo.yaml", "--host", " "])
    assert info.value.code == 2
    assert "argument --host: must not be empty: an empty host binds every interface" in capsys.readouterr().err


def test_a_service_that_cannot_be_reached_or_answers_an_error_is_an_error_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["ask", "hi", "--url", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach the service POST http://127.0.0.1:{port}/v1/chat/completions")
    assert "Traceback" not in err


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("command", ["ask", "route"])
def test_credentials_in_the_url_are_never_printed(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    port = _closed_port()
    assert main([command, "hi", "--url", f"http://user:pw-LEAK@127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert "pw-LEAK" not in err and "user" not in err and f"http://127.0.0.1:{port}/v1/" in err
    assert main([command, "hi", "--url", f"http://127.0.0.1:{port}/?token=tk-LEAK"]) == 1
    err = capsys.readouterr().err
    assert "tk-LEAK" not in err and "carries a query or fragment" in err


def test_the_api_key_comes_from_moe_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from router.cli import _parser

    monkeypatch.setenv("MOE_API_KEY", "sk-from-env")
    assert _parser().parse_args(["ask", "hi"]).api_key == "sk-from-env"
    assert _parser().parse_args(["route", "hi", "--api-key", "given"]).api_key == "given"
    monkeypatch.delenv("MOE_API_KEY")
    assert _parser().parse_args(["ask", "hi"]).api_key is None


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import router.cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(router.cli, "cmd_config_check", interrupted)
    assert main(["config", "check", "configs/demo.yaml"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_an_unknown_log_level_is_refused_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--config", "configs/demo.yaml", "--log-level", "bogus"])
    assert info.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_runtime_failures_are_error_lines_and_bugs_keep_their_traceback() -> None:
    from experts.errors import ExpertConfigError
    from router.cli import _runtime_error
    from router.orchestrator import UnknownExpert
    from router.sdk import RouterAPIError

    api = RouterAPIError(503, {"error": {"message": "every candidate expert failed", "code": "all_experts_failed"}})
    assert "every candidate expert failed" in (_runtime_error(api) or "")
    assert _runtime_error(UnknownExpert("nosuch", ["auto", "math"])) == "unknown model 'nosuch'; known: auto, math"
    assert "no RouterBench data" in (_runtime_error(ExpertConfigError("gpt-4", "no RouterBench data at x")) or "")
    assert _runtime_error(RuntimeError("a bug")) is None


def test_serve_writes_one_log_stream_of_json_lines_at_its_log_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = served_config(tmp_path)
    served = _serving_captured(monkeypatch)
    for name in LOGGERS:  # as in a fresh process (restore_logging puts back what earlier tests left)
        logging.getLogger(name).handlers.clear()
    assert main(["serve", "--config", str(config), "--log-level", "warning"]) == 0
    capsys.readouterr()
    logging.config.dictConfig(served[0].log_config)  # what uvicorn does with it
    logging.getLogger("uvicorn.error").warning("Started server process [%d]", 42)
    logging.getLogger("uvicorn.error").info("below the level")
    logging.getLogger("router.requests").info('{"event": "request", "status": 200}')  # below warning: not written
    logging.getLogger("experts.openai_compat").warning("expert coder (http://host/v1): HTTP 500 failed: boom")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(x["logger"], x["level"], x["message"]) for x in lines] == [
        ("uvicorn.error", "WARNING", "Started server process [42]"),
        ("experts.openai_compat", "WARNING", "expert coder (http://host/v1): HTTP 500 failed: boom")]


ROUTED = ("version: 1\ngate:\n  artifact: gate\nexperts:\n"
          "  - {name: coder, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m, api_key_env: MOE_TEST_NO_KEY,"
          " examples: ['write a python function', 'fix this bug']}\n"
          "  - {name: lawyer, type: vllm, endpoint: 'http://127.0.0.1:9/v1', model: m, "
          "examples: ['can I break my lease', 'is this contract valid']}\n")


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config with a gate trained from its examples, and an API key variable that is never set."""
    return trained_config(tmp_path_factory.mktemp("routed"), ROUTED)


def test_route_in_process_needs_no_expert_keys_and_opens_no_feedback_store(
        routed: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MOE_TEST_NO_KEY", raising=False)
    capsys.readouterr()
    before = sorted(p.name for p in routed.parent.rglob("*"))
    assert main(["route", "fix this bug in my python code", "--config", str(routed)]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["ranking"][0] == "coder"
    # Only the gate's decision: nothing written beside the config or the artifact (a read-only folder would do).
    assert sorted(p.name for p in routed.parent.rglob("*")) == before and "feedback.sqlite3" not in before



def test_a_query_argument_holding_bytes_that_are_not_utf8_is_sent_with_replacement_characters(
        routed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Python hands an argument's undecodable bytes over as lone surrogates, which no JSON request can carry:
    each is sent as U+FFFD, as the encoder reads it, with a warning, in process and to a service alike."""
    from router.cli import _argv_text

    assert _argv_text("caf\udcc3\udca9 ok \udcff") == "café ok \ufffd"  # a whole UTF-8 sequence is kept
    assert _argv_text("plain") == "plain"
    capsys.readouterr()
    assert main(["route", "fix this bug in my python code \udcff", "--config", str(routed)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ranking"][0] == "coder"
    assert "warning: the query holds bytes that are not utf-8 text; each is sent as U+FFFD" in captured.err

def test_route_names_a_bad_query_without_an_http_status_it_never_had(routed: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "   ", "--config", str(routed)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "HTTP" not in err and "holds no text" in err and "(invalid_request)" in err


@pytest.mark.parametrize("command", ["route", "ask"])
def test_url_and_config_together_are_refused(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "hi", "--config", "configs/demo.yaml", "--url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "--url http://127.0.0.1:9 and --config configs/demo.yaml: give one" in err


def test_train_names_gate_artifact_when_it_cannot_write_there(routed: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import router.files

    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(30, "Read-only file system")

    def disk_full(*args: object, **kwargs: object) -> str:
        raise OSError(28, "No space left on device")

    before = (routed.parent / "gate" / "gate.json").read_bytes()
    monkeypatch.setattr(router.files.tempfile, "mkdtemp", read_only)
    assert main(["train", "--config", str(routed), "--no-feedback"]) == 1
    err = capsys.readouterr().err
    assert f"error: gate.artifact {routed.parent / 'gate'}: cannot write the gate there (Read-only file system); " \
           "make the folder writable" in err
    assert ".staging" not in err
    monkeypatch.setattr(router.files.tempfile, "mkdtemp", disk_full)
    assert main(["train", "--config", str(routed), "--no-feedback"]) == 1
    assert capsys.readouterr().err.endswith("cannot write the gate there (No space left on device)\n")
    assert (routed.parent / "gate" / "gate.json").read_bytes() == before


def test_config_check_loads_the_gate_on_the_cpu_whatever_device_serves_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import router.build

    seen: list[str] = []
    monkeypatch.setattr(router.build, "load_gate", lambda config: seen.append(config.gate.encoder.device))
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "gate.json").write_text("{}")
    config = tmp_path / "router.yaml"
    config.write_text(ROUTED.replace("  artifact: gate\n",
                                     "  artifact: gate\n  encoder: {backend: sentence-transformers, device: cuda}\n"))
    assert main(["config", "check", str(config), "--no-env"]) == 0
    assert seen == ["cpu"] and "OK" in capsys.readouterr().out


def test_demo_refuses_an_expert_it_cannot_score_before_training(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """moe demo scores experts on RouterBench's recorded answers; a config with another kind of expert trained,
    served and queried for minutes, then failed with a KeyError traceback."""
    root = Path(__file__).resolve().parents[2]
    demo = tmp_path / "configs" / "demo.yaml"
    demo.parent.mkdir()
    demo.write_text((root / "configs" / "demo.yaml").read_text(encoding="utf-8")
                    + "  - {name: weather, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: m, "
                      "examples: ['will it rain tomorrow']}\n", encoding="utf-8")
    assert main(["demo", "--config", str(demo), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "moe demo scores RouterBench replay experts only, and 'weather' is not one" in err
    assert not (tmp_path / "artifacts").exists()  # refused before the training file or the gate was written


def test_a_stopped_demo_leaves_the_earlier_results_with_their_own_log(tmp_path: Path) -> None:
    """The demo opened router.log afresh at step 3 and wrote its results in place at step 4: stopped between the
    two, it left one run's results beside another run's log (the earlier log gone). Its log is router.log.partial
    until the results are written whole; then the three go in together."""
    from eval.demo import publish

    out = tmp_path / "demo"
    (out / "router.log.partial").parent.mkdir()
    (out / "router.log.partial").write_text("run 1 log\n")
    publish(out, '{"run": 1}\n', "# run 1\n", out / "router.log.partial")
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "router.log"]
    (out / "router.log.partial").write_text("run 2 log, stopped before its results\n")  # run 2 stops here
    assert (out / "results.json").read_text() == '{"run": 1}\n' and (out / "router.log").read_text() == "run 1 log\n"
    publish(out, '{"run": 2}\n', "# run 2\n", out / "router.log.partial")  # run 3 finishes
    assert (out / "router.log").read_text().startswith("run 2") and (out / "results.md").read_text() == "# run 2\n"
    assert not (out / "router.log.partial").exists()


def test_moe_help_loads_neither_numpy_nor_the_http_client_nor_the_config_schema() -> None:
    """Every ``moe`` command builds the whole parser first: ``moe --help`` and a command's ``--help`` stay light
    (the encoders' numpy, httpx and the config schema load only where a command uses them)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom router.cli import main\ntry:\n    main(['eval', '--help'])\nexcept SystemExit:\n"
             "    pass\nprint(sorted(m for m in ('numpy', 'httpx', 'router.config', 'router.encoders') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert "encoder backend: onnx, openvino, sentence-transformers, static, or an installed" in "".join(
        done.stdout.split("\n" + " " * 24))  # argparse wraps at hyphens too
    assert done.stdout.splitlines()[-1] == "[]"


def test_an_unknown_encoder_is_refused_by_name_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["eval", "--suite", "snips-intent", "--encoder", "onx"])
    assert info.value.code == 2
    assert ("argument --encoder: unknown encoder backend 'onx'; known: onnx, openvino, sentence-transformers, "
            "static") in capsys.readouterr().err


def test_the_help_names_every_suite_and_every_convertible_data_set(capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The lists in ``moe eval --help`` and ``moe convert --help`` are written out (building them would load the
    harness for every command): each name the registries know must be there."""
    monkeypatch.setenv("COLUMNS", "1000")  # no line folded, so no name split at its hyphen
    import re

    from eval.convert import CONVERTERS
    from eval.harness import SUITES

    for command, names in (("eval", set(SUITES) - {"jsonl"}), ("convert", set(CONVERTERS))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = set(re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", capsys.readouterr().out))  # whole names only
        assert not names - shown, command
