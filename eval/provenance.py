"""Where a result file's figures came from: the machine, the code (commit, uncommitted changes, package
versions) and the data (the SHA-256 of each data file a run read). ``moe eval`` stamps each ``results.json`` with
them, and the benchmarks (``python -m bench``) each of their files, so a figure read later says what produced it."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from experts.recordings import DATA_FILE_EVENT

__all__ = ["PACKAGES", "REPO", "data_digests", "files_read", "machine", "machine_line", "provenance", "stamp"]

REPO = Path(__file__).resolve().parents[1]


def _cpu_model() -> str | None:
    """The CPU's model name as /proc/cpuinfo gives it; None where there is none to read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)


def machine() -> dict[str, Any]:
    """The CPU model, core count, Python, platform and load average: where a result file's figures came from."""
    model = _cpu_model() or platform.processor() or "unknown"
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {"cpu_model": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_at_start": load}


# The packages whose versions move the figures: the encoders' runtimes, the classifiers' and the numbers' libraries,
# the server, the HTTP clients.
PACKAGES = ("onnxruntime", "openvino", "torch", "sentence-transformers", "faiss-cpu", "numpy", "scipy", "scikit-learn",
            "fastapi", "uvicorn", "uvloop", "httptools", "aiohttp", "httpx")


def _git(args: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
    try:  # --no-optional-locks: a status that never refreshes or writes the index (others may be using it)
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(git: Callable[[Sequence[str]], subprocess.CompletedProcess[str] | None] = _git,
               packages: Sequence[str] = PACKAGES) -> dict[str, Any]:
    """The code a result file's figures came from: the commit, whether tracked files differed from it (None when
    git could not say), and the installed versions of ``packages`` (None: not installed)."""
    head = git(["rev-parse", "HEAD"])
    status = git(["status", "--porcelain", "--untracked-files=no"])
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"commit": head.stdout.strip() if head is not None and head.returncode == 0 else None,
            "dirty": bool(status.stdout.strip()) if status is not None and status.returncode == 0 else None,
            "versions": versions}


def machine_line() -> str:
    """A short description: OS, architecture, CPU model and the cores this process may use."""
    model = _cpu_model() or platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.system()} {platform.machine()}, {model}, {cores} cores"


def stamp() -> dict[str, Any]:
    """What ``moe eval`` records of a run beside its setup: the day (UTC), the machine, and the code."""
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"), "machine": machine_line(), "code": provenance()}


# The sets ``files_read`` is filling, while any is open. Python's audit hooks cannot be removed, so the one hook is
# added by the first ``files_read`` and does nothing (one truth test) while none is open.
_RECORDING: list[set[str]] = []
_HOOK_LOCK = threading.Lock()
_hooked = False


def _on_audit(event: str, args: tuple[Any, ...]) -> None:
    if not _RECORDING or event not in ("open", DATA_FILE_EVENT):
        return
    try:
        if event == DATA_FILE_EVENT:  # a cached store handed out again: the files it was read from
            args = (args[0], "r", None)
        path, mode, flags = args
        if path is None or isinstance(path, int):  # an open of a file descriptor names no file
            return
        if isinstance(mode, str):
            reading = "r" in mode and "+" not in mode
        else:
            reading = isinstance(flags, int) and flags & os.O_ACCMODE == os.O_RDONLY
        if reading:
            name = os.path.abspath(os.fsdecode(path))
            for sink in list(_RECORDING):
                sink.add(name)
    except Exception:  # a hook that raised would fail the open it watches
        return


@contextlib.contextmanager
def files_read() -> Iterator[set[str]]:
    """The absolute paths of the files this process opens for reading (on any thread) while the block runs:
    whatever loader reads them (json, csv, pandas, numpy), so a result records the data it was computed from
    without each suite listing its files. A store a loader caches (``experts.recordings``) names its files again
    whenever it is handed out (``DATA_FILE_EVENT``), so a run that reads it from the cache records them too."""
    global _hooked
    with _HOOK_LOCK:
        if not _hooked:
            sys.addaudithook(_on_audit)
            _hooked = True
    seen: set[str] = set()
    _RECORDING.append(seen)
    try:
        yield seen
    finally:
        # By identity: two blocks that read the same files hold equal sets, and list.remove would take the other.
        _RECORDING[:] = [sink for sink in _RECORDING if sink is not seen]


def data_digests(paths: Iterable[str | Path], roots: Iterable[str | Path]) -> dict[str, str]:
    """The SHA-256 of each of ``paths`` that is a file under one of ``roots``, sorted by name: its path relative
    to that root, or the root as given where the root is the file itself. The data a result was computed from.

    A path is matched as it was opened first, and by its real path only where that fails: a data folder reached
    through a link (``../shared``) has a cached store name its files by their real paths, while a data file that
    is itself a link out of the folder (a DVC or git-annex checkout) is named where it was opened."""
    from router.files import sha256_file

    given = [str(r) for r in roots]
    as_opened = [(Path(os.path.abspath(r)), r) for r in given]
    as_real = [(Path(os.path.realpath(r)), r) for r in given]
    out: dict[str, str] = {}
    for path in {os.path.abspath(p) for p in paths}:
        name = _name_under(Path(path), as_opened) or _name_under(Path(os.path.realpath(path)), as_real)
        if name is not None and os.path.isfile(path):
            out[name] = sha256_file(path)
    return dict(sorted(out.items()))


def _name_under(path: Path, roots: Sequence[tuple[Path, str]]) -> str | None:
    """``path`` relative to the first of ``roots`` (each ``(path, as given)``) it lies under, or that root as
    given where the root is ``path`` itself; None where it lies under none."""
    for root, given in roots:
        if path == root:
            return given
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return None
