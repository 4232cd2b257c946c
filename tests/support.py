"""Small shared helpers for tests (not doubles: see ``tests/doubles`` for those)."""

from __future__ import annotations

from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """A non-trivial file that starts with the PNG signature."""
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 1000
