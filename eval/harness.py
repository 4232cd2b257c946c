"""``moe eval``: score the gate and its baselines on a named suite or on the user's own labelled JSONL.

Two kinds of suite, each writing ``results.json`` (a top-level ``metrics`` object, then everything else),
``report.md`` and PNG figures to ``out``:

- **label suites** (``mmlu-pro-domain``, ``clinc150-domain``, ``snips-intent``, ``banking77-intent``, or
  ``--train A.jsonl --test B.jsonl``): the gate (``router.gate.train_gate``) is the headline; random,
  majority, centroid similarity, kNN and logistic regression run on the same embeddings and split. In the
  user's JSONL, test queries with a label absent from training (or ``--oos-label``'s) are out of scope.
- **outcome suites** (``mmlu-pro-outcome``, ``routerbench``, ``routellm-mmlu``): route by each expert's
  predicted chance of success (``eval.outcome``), scored against every single expert, random and the oracle,
  with the quality–cost curve or RouteLLM's APGR/CPT.
- **the cold-start suite** (``clinc150-cold-start``, ``eval.coldstart_suite``): each CLINC150 domain in turn
  added by config examples to a gate trained on the others, without retraining.

Splits: a data set's own train/test split where it has one (CLINC150, SNIPS, Banking77, RouterBench),
otherwise ``split_by_id`` with fractions (0.7, 0.1, 0.2) and the run's seed. Hyperparameters of the outcome
routers are chosen on the validation part and the test part is touched once. Embeddings go through an
on-disk cache (``eval.embeddings``), so a second run of a suite embeds nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from eval import coldstart_suite, combine_suite, routerbench_combine
from eval import labels as label_suites
from eval import routing as outcome_suites
from eval.embeddings import CachedEncoder, default_cache_dir
from eval.peer import SPLIT_PARTS
from eval.provenance import data_digests, files_read, stamp
from eval.report import HARNESS_FIGURES, write_results
from eval.suite import PREDICTIONS, SuiteContext, check_limit, warnings_once
from router.encoders import Encoder
from router.files import abandoned, owner_tag
from router.settings import Settings

log = logging.getLogger("eval.harness")

__all__ = ["SUITES", "SuiteContext", "main", "run_suite"]


SUITES: dict[str, Callable[[SuiteContext], dict[str, Any]]] = {
    "mmlu-pro-domain": label_suites.run_mmlu_pro_domain,
    "clinc150-domain": label_suites.run_clinc150_domain,
    "snips-intent": label_suites.run_snips_intent,
    "banking77-intent": label_suites.run_banking77_intent,
    "jsonl": label_suites.run_jsonl,
    "clinc150-cold-start": coldstart_suite.run_clinc150_cold_start,
    "mmlu-pro-outcome": outcome_suites.run_mmlu_pro_outcome,
    "routerbench": outcome_suites.run_routerbench,
    "routellm-mmlu": outcome_suites.run_routellm_mmlu,
    "mmlu-pro-combine": combine_suite.run_mmlu_pro_combine,
    "routerbench-combine": routerbench_combine.run_routerbench_combine,
}


def default_data_dir(settings: Settings | None = None) -> Path:
    """``settings``' ``data_dir`` (``$MOE_DATA_DIR``), else ``../shared/data`` from the working folder."""
    return (settings or Settings.load()).data_dir or Path.cwd().parent / "shared" / "data"


def data_dir_of(args: argparse.Namespace) -> Path:
    """A command's data folder: its ``--data``, else ``default_data_dir`` from the settings ``moe`` built as it
    started (``args.settings``)."""
    return Path(args.data) if args.data else default_data_dir(getattr(args, "settings", None))


POOL_SUITES = ("mmlu-pro-combine",)  # suites that read ``--pool``


def run_suite(name: str, data_dir: str | Path | None, out: str | Path, *, encoder: str | Encoder = "onnx",
              seed: int = 0,
              train: str | Path | None = None, test: str | Path | None = None, limit: int | None = None,
              plots: bool = True, progress: bool = True, cache_dir: str | Path | None = None,
              command: str | None = None, pool: str | None = None, device: str = "cpu",
              oos_label: str | None = None) -> dict[str, Any]:
    """Run one suite and write its outputs to ``out``; returns the results (as written to results.json).

    ``name`` is a key of ``SUITES``; ``"jsonl"`` needs ``train`` and ``test``, and only it takes ``oos_label``
    (``label_suites.run_jsonl``); any other suite refuses ``train``/``test``. ``limit`` is None or >= 1.
    ``encoder`` is a backend name of ``router.encoders`` (built on ``device``) or an ``Encoder`` instance.
    Problems with the arguments, the files they name, ``out`` or the embedding cache raise ``ValueError``
    naming the flag (or setting) and the path, before any work.
    """
    from pydantic import ValidationError

    from router.config import EncoderConfig
    from router.encoders import build_encoder

    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(sorted(SUITES))}")
    if name == "jsonl" and (train is None or test is None):
        raise ValueError("the jsonl suite needs both --train and --test")
    if pool is not None and name not in POOL_SUITES:
        raise ValueError(f"--pool picks the experts of {', '.join(POOL_SUITES)}; suite {name!r} takes no pool")
    if oos_label is not None and name != "jsonl":
        raise ValueError(f"--oos-label names an out-of-scope label in --train/--test JSONL; suite {name!r} "
                         "takes none")
    if name != "jsonl":
        _check_own_data(name, train, test)
    check_limit(limit)
    for flag, path in (("--train", train), ("--test", test)):
        _check_readable(flag, path)
        _check_not_replaced(flag, path, Path(out))
    _check_out(Path(out))
    if isinstance(encoder, str):
        try:
            cfg = EncoderConfig(backend=encoder, device=device)  # pydantic validates both
        except ValidationError as exc:
            reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise ValueError(f"--encoder {encoder} --device {device}: {reasons}") from None
        _check_cache(cache_dir)
        inner, max_length = build_encoder(cfg), cfg.max_length
    else:
        _check_cache(cache_dir)
        # The cache folder is named by the truncation: an instance built with another max_length must not read
        # (or write) the vectors of the default one. An encoder that does not say truncates as the default.
        inner, max_length = encoder, encoder.max_length or EncoderConfig().max_length
    cached = CachedEncoder(inner, cache_dir, max_length=max_length, progress=progress)
    ctx = SuiteContext(name=name, data_dir=Path(data_dir) if data_dir else default_data_dir(), out=Path(out),
                       encoder=cached, seed=seed, limit=limit, pool=pool, plots=plots, progress=progress,
                       train_path=Path(train) if train else None, test_path=Path(test) if test else None)
    final = ctx.out
    made = [p for p in (final, *final.parents) if not p.exists()]  # the folders this run creates, deepest first
    try:
        final.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(final)
        ctx.out = Path(tempfile.mkdtemp(prefix=_staging_prefix(), dir=final))
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    started = time.perf_counter()
    try:
        # the suites train several gates on the same data; each warning is shown once, and noted in the report
        with warnings_once(into=ctx.notes), files_read() as read:
            body = label_suites.run_jsonl(ctx, oos_label=oos_label) if name == "jsonl" else SUITES[name](ctx)
        roots = [ctx.data_dir] if name != "jsonl" else [p for p in (ctx.train_path, ctx.test_path) if p]
        setup = {"suite": name, "encoder": f"{cached.identity} (sha256 {cached.checksum[:12]}…)", "seed": seed,
                 "data": str(ctx.data_dir) if name != "jsonl" else f"{train} / {test}", "limit": limit,
                 "out": str(final),
                 **body.pop("setup", {}), "data_sha256": data_digests(read, roots),
                 "seconds": round(time.perf_counter() - started, 1), **stamp()}
        results = {"metrics": body.pop("metrics"), "suite": name, "command": command, "setup": setup, **body,
                   "notes": [*body.pop("notes", []), *ctx.notes]}
        write_results(ctx.out, results)
        with _signals_held():  # Ctrl-C or SIGTERM waits for the few renames, then stops the run as it would
            _publish(ctx.out, final)
    except BaseException as exc:
        # A run that fails (bad data, a broken cache, Ctrl-C) leaves --out as it found it: what it wrote so far
        # is in its staging folder, removed here, with any folder it created for --out.
        shutil.rmtree(ctx.out, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(exc, OSError) and _writing_to(exc, ctx.out):
            # A bare "[Errno 28] No space left on device" would not say which disk filled up.
            raise ValueError(f"--out {out}: cannot write there ({exc.strerror or exc}); any earlier run's files "
                             "there are left as they were") from None
        raise
    return results


# What a write reports when the disk it writes to is full (or the user's quota, or the largest file it allows, is
# reached), with no file name (a write to an open file names none).
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _writing_to(exc: OSError, stage: Path) -> bool:
    """Whether ``exc`` is a failure to write this run's files into its staging folder ``stage`` (in --out): it
    names a path there, or it names none and says the disk is full. Every other write of a run goes to the
    embedding cache, whose failures say so themselves (``CachedEncoder``)."""
    if exc.filename is None:
        return exc.errno in _DISK_FULL
    with contextlib.suppress(TypeError, ValueError):
        return Path(os.path.abspath(os.fsdecode(exc.filename))).is_relative_to(os.path.abspath(stage))
    return False


# Everything a suite run writes into --out, as paths under it: a run replaces them all, so a reused --out never
# pairs one run's results with another's split, predictions or figures. Any other file there, split/ included, is
# left alone.
HARNESS_OUTPUTS = ("results.json", "report.md", PREDICTIONS, *(f"split/{part}.jsonl" for part in SPLIT_PARTS),
                   *HARNESS_FIGURES)


# A run's staging folder in --out: this prefix, the process id, a random part.
_STAGING = ".partial-"


def _staging_prefix() -> str:
    """This run's staging folder's name up to its random part: ``.partial-<pid>@<host>-`` (``owner_tag``)."""
    return f"{_STAGING}{owner_tag()}"


def _publish(stage: Path, out: Path) -> None:
    """Move a finished run's files from ``stage`` into ``out``, in place of an earlier run's (``HARNESS_OUTPUTS``,
    and any other path this run writes), and remove ``stage``. The earlier files are moved aside first and put
    back if a move fails, so ``out`` holds one run's files or the other's; a ``ValueError`` names ``out`` then.
    Files by file: a folder holding them (``split/``) keeps whatever else it holds."""
    new = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if not p.is_dir())
    names = list(dict.fromkeys((*HARNESS_OUTPUTS, *new)))
    # A folder the outputs go in that is not a real folder of --out (a link, to the user's data say, or a file) is
    # replaced whole, as any output is, never written through.
    folders = dict.fromkeys(parent for name in names for parent in PurePosixPath(name).parents if parent.parts)
    odd = [str(f) for f in folders if (out / f).is_symlink() or ((out / f).exists() and not (out / f).is_dir())]
    aside = stage / ".previous"
    aside.mkdir()
    # Each name is listed before its move: an interrupt between the two leaves it listed, and putting back a file
    # that never moved fails quietly.
    moved: list[str] = []  # the earlier run's names, moved into ``aside``
    placed: list[str] = []  # this run's names, moved into ``out``
    made: list[Path] = []  # the folders made in ``out`` for them, outermost first
    try:
        for name in [*odd, *names]:
            if (out / name).exists() or (out / name).is_symlink():
                moved.append(name)
                (aside / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(out / name, aside / name)
        for name in new:
            placed.append(name)
            missing = [f for f in reversed((out / name).parents) if f.is_relative_to(out) and not f.exists()]
            for folder in missing:
                made.append(folder)
                folder.mkdir()
            os.replace(stage / name, out / name)
    except BaseException as exc:  # an OSError, or Ctrl-C or SIGTERM part way: the earlier run's files go back
        for name in placed:
            with contextlib.suppress(OSError):
                os.replace(out / name, stage / name)
        for folder in reversed(made):  # before the earlier entries go back: a link moved aside goes back there
            with contextlib.suppress(OSError):
                folder.rmdir()
        for name in moved:
            with contextlib.suppress(OSError):
                os.replace(aside / name, out / name)
        if not isinstance(exc, OSError):
            raise
        raise ValueError(f"--out {out}: cannot put this run's files in place of the earlier run's "
                         f"({exc.strerror or exc}: {exc.filename or ''}); the earlier run's are left as they were"
                         ) from None
    for folder in dict.fromkeys((out / name).parent for name in HARNESS_OUTPUTS):
        if folder != out:  # emptied of an earlier run's files, with nothing else in it (rmdir refuses otherwise)
            with contextlib.suppress(OSError):
                folder.rmdir()
    shutil.rmtree(stage, ignore_errors=True)  # the earlier run's files, and the emptied staging folder
    if stage.exists():
        log.warning("--out %s: could not remove all of %s (the earlier run's files); remove it by hand", out, stage)


def _check_not_replaced(flag: str, path: str | Path | None, out: Path) -> None:
    """A ``--train``/``--test`` file that is one of the files this run writes into ``out`` (a run's
    ``split/train.jsonl`` given back with the same ``--out``): the run would replace the user's data with its own
    copy, so it is refused before any work. A link among the outputs is replaced itself (``_publish``), never
    what it points to, so the file it points to may be given."""
    if path is None:
        return
    for name in HARNESS_OUTPUTS:
        target = _in_place(out, name)
        with contextlib.suppress(OSError):
            if target is not None and os.path.samefile(path, target):
                raise ValueError(f"{flag} {path} is {name} in --out {out}, which this run writes in its place; copy "
                                 "it elsewhere first, or give another --out")


def _in_place(out: Path, name: str) -> Path | None:
    """``out/name`` where a run would replace that very file: it is one, reached through no link below ``out``."""
    path = out
    for part in PurePosixPath(name).parts:
        path = path / part
        if path.is_symlink():
            return None
    return path if path.is_file() else None


# A staging folder untouched this long is an abandoned run's, whatever host it names: no suite runs for a day.
ABANDONED_AFTER_S = 86_400.0


def _remove_abandoned(out: Path) -> None:
    """Remove the staging folders in ``out`` of killed runs (SIGKILL, an out-of-memory kill, a power cut): one of
    this host whose process is gone, and any untouched for ``ABANDONED_AFTER_S`` (another host's or container's,
    whose processes cannot be seen from here; a container's host name is new each time)."""
    here = socket.gethostname()
    for folder in out.glob(f"{_STAGING}*"):
        if abandoned(folder, _STAGING, ABANDONED_AFTER_S, here):
            shutil.rmtree(folder, ignore_errors=True)


def _check_own_data(suite: str, train: str | Path | None, test: str | Path | None) -> None:
    """A suite scores its own data set: ``--train``/``--test`` given with it would be ignored, so they are
    refused."""
    given = " and ".join(flag for flag, path in (("--train", train), ("--test", test)) if path)
    if given:
        raise ValueError(f"--suite {suite} scores its own data set and would ignore {given} ({given} name your own "
                         f"JSONL, which suite {suite!r} does not read); give --suite or --train/--test, not both")


def _check_readable(flag: str, path: str | Path | None) -> None:
    """A ``--train``/``--test`` file that cannot be read, named with its flag before any work."""
    if path is None:
        return
    try:
        with Path(path).open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None


def _check_out(out: Path) -> None:
    """``--out`` must be a folder this process can write, or a path where one can be made."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder is not writable")


def _check_cache(cache_dir: str | Path | None) -> None:
    """The embedding cache's folder (``cache_dir``, else under ``$MOE_CACHE_DIR``) must be one this process can
    write; the message names the setting and the path."""
    settings = Settings.load()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(settings)
    env = settings.cache_dir if "cache_dir" in settings.model_fields_set else None
    setting = ("cache_dir" if cache_dir is not None else f"MOE_CACHE_DIR={env}" if env
               else "the default cache folder; MOE_CACHE_DIR sets another")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"embedding cache {folder} ({setting}): cannot create the folder "
                         f"({exc.strerror or exc}); point MOE_CACHE_DIR at a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"embedding cache {folder} ({setting}): the folder is not writable; point MOE_CACHE_DIR "
                         "at a writable folder")


def main(args: argparse.Namespace) -> int:
    """Entry point for ``moe eval`` (arguments are defined in ``router.cli``)."""
    suite = args.suite
    train, test = getattr(args, "train", None), getattr(args, "test", None)
    published = [s for s in SUITES if s != "jsonl"]  # "jsonl" is what --train/--test run, not a suite to name
    if suite is not None and suite not in published:  # a usage error, as argparse's are: exit 2
        print(f"error: unknown suite {suite!r}; known: {', '.join(sorted(published))} (or --train and --test "
              "without --suite, for your own data)", file=sys.stderr)
        return 2
    if suite is not None:
        try:
            _check_own_data(suite, train, test)
        except ValueError as exc:  # a usage error, as argparse's are: exit 2, before any work
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if suite is None and (train or test):
        suite = "jsonl"
    if suite is None:
        print(f"error: give --suite ({', '.join(published)}) or --train and --test", file=sys.stderr)
        return 2
    if suite == "jsonl" and (train is None or test is None):  # a usage error too (run_suite refuses it as well)
        print(f"error: {'--train' if train else '--test'} was given alone: your own data needs both --train (to "
              "train the gate on) and --test (to score it on)", file=sys.stderr)
        return 2
    with _terminated_as_exit():
        results = run_suite(suite, data_dir_of(args), args.out, encoder=args.encoder, seed=args.seed, train=train,
                            test=test, limit=getattr(args, "limit", None),
                            plots=not getattr(args, "no_plots", False), command=reproducing_command(args, suite),
                            pool=getattr(args, "pool", None), device=getattr(args, "device", "cpu"),
                            oos_label=getattr(args, "oos_label", None))
    print(_summary(results))
    return 0


def reproducing_command(args: argparse.Namespace, suite: str) -> str:
    """The ``moe eval`` command line that reproduces this run, each argument quoted for a POSIX shell
    (``shlex.quote``: a plain one is written as it is, one holding a space or a quote is quoted)."""
    parts = ["moe", "eval"] + (["--suite", suite] if suite != "jsonl" else
                               ["--train", args.train, "--test", args.test])
    parts += ["--out", args.out, "--encoder", args.encoder, "--seed", args.seed]
    parts += ["--data", args.data] if args.data else []
    parts += ["--limit", args.limit] if getattr(args, "limit", None) else []
    parts += ["--pool", args.pool] if getattr(args, "pool", None) else []
    parts += ["--device", args.device] if getattr(args, "device", "cpu") != "cpu" else []
    parts += ["--oos-label", args.oos_label] if getattr(args, "oos_label", None) else []
    return " ".join(shlex.quote(str(p)) for p in parts)


def _summary(results: dict[str, Any]) -> str:
    shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in results["metrics"].items())
    figures = results.get("figures") or []
    files = ["results.json", "report.md", *([results["predictions"]] if results.get("predictions") else []),
             *([f"{len(figures)} figure(s)"] if figures else [])]
    wrote = ", ".join(files[:-1]) + " and " + files[-1]
    return f"{results['suite']}: {shown}\nwrote {wrote} to {results['setup'].get('out')}"


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM noted while the block runs (on the main thread, where Python handles them), and handled
    as they would have been once it ends. Their Python handlers are swapped, not the threads' signal masks: a
    signal sent to the process reaches whichever thread does not block it, and onnxruntime's threads do not."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def note(signum: int, frame: object) -> None:
        caught.append(signum)

    previous: dict[int, Any] = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


@contextlib.contextmanager
def _terminated_as_exit() -> Iterator[None]:
    """SIGTERM (``timeout``, ``docker stop``, a cancelled CI job) as ``SystemExit(143)`` while the block runs, so
    a run stopped that way cleans up as Ctrl-C does (its staging folder removed) and exits as the shell would."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

