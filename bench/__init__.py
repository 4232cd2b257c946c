"""Benchmarks: gate decision time, router overhead and throughput, scaling, and peers. Run ``python -m bench``."""

import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository root (POSIX slashes), or as given when it lies outside it: how result
    files name the files they cite."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def machine() -> dict[str, Any]:
    """The CPU model, core count, Python, platform and load average: where a result file's figures came from."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {"cpu_model": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_at_start": load}


# The packages whose versions move the figures: the encoders' runtimes, the server, the HTTP clients.
PACKAGES = ("onnxruntime", "openvino", "torch", "sentence-transformers", "faiss-cpu", "numpy", "fastapi", "uvicorn",
            "uvloop", "httptools", "aiohttp", "httpx")


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
