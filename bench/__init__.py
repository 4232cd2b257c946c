"""Benchmarks: gate decision time, router overhead and throughput, scaling, and peers. Run ``python -m bench``."""

from pathlib import Path

from eval.provenance import PACKAGES, REPO, machine, provenance

__all__ = ["PACKAGES", "REPO", "machine", "provenance", "repo_relative"]


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository root (POSIX slashes), or as given when it lies outside it: how result
    files name the files they cite."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)
