"""Benchmarks: gate decision time, router overhead and throughput, scaling, and peers. Run ``python -m bench``."""

import os
import platform
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
