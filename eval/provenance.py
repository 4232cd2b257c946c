"""Where a result file's figures came from: the machine, and the code (commit, uncommitted changes, package
versions). ``moe eval`` stamps each ``results.json`` with them, and the benchmarks (``python -m bench``) each of
their files, so a figure read later says what produced it."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "REPO", "machine", "machine_line", "provenance", "stamp"]

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
