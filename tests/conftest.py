"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data sets: ``$MOE_DATA_DIR``, else ``<repo root>/../shared/data``."""
    path = Path(os.environ.get("MOE_DATA_DIR") or _REPO_ROOT.parent / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.fail(f"data dir {path} not found; set MOE_DATA_DIR to the shared data folder")
    return path
