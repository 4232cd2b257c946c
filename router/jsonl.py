"""Reading JSONL data files: one JSON object a line, blank lines skipped, every problem named by file and line.

The training files (labelled queries, outcome records) and the evaluation harness's user files all read this
way; each caller checks its own fields on the objects this yields.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl"]


def read_jsonl(path: str | Path, *, expected: str = "an object",
               error: type[ValueError] = ValueError) -> Generator[tuple[str, int, dict[str, Any]], None, None]:
    """``(where, line number, object)`` for each non-blank line, ``where`` being ``"<path>:<line>"``.

    A line that is not JSON, or not a JSON object, raises ``error`` naming the place and what is wrong;
    ``expected`` says what the object should have held (``"an object with 'query' and 'label'"``)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")  # a BOM is no error
            except UnicodeDecodeError as exc:
                raise error(f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                            "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_once_each)
            except _KeyTwice as exc:
                raise error(f"{where}: the key {exc.key!r} is given twice in one object ({exc.value_note}); readers "
                            "disagree on which counts, so give it once") from None
            except json.JSONDecodeError as exc:
                raise error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except ValueError:  # Python refuses to read an integer of more than 4300 digits (int_max_str_digits)
                raise error(f"{where}: holds an integer of more than {sys.get_int_max_str_digits()} digits, "
                            "which no field takes; fix or drop the line") from None
            if not isinstance(row, dict):
                raise error(f"{where}: expected {expected}, got {type(row).__name__}")
            if "\\u" in line:  # only an escape gives a lone surrogate; a valid pair decodes to its character
                half = _lone_surrogate(row)
                if half is not None:
                    raise error(f"{where}: the escape \\u{ord(half):04x} is half of a UTF-16 surrogate pair, with no "
                                "other half: no character (a text cut inside an emoji, say); fix or drop it")
            yield where, number, row


class _KeyTwice(ValueError):
    def __init__(self, key: str, where: str) -> None:
        super().__init__(key)
        self.key, self.value_note = key, where


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a key given twice: Python's json keeps the last value, other
    readers the first, so {"label": "music", "label": "weather"} trained as weather, silently."""
    row: dict[str, Any] = {}
    for key, value in pairs:
        if key in row:
            raise _KeyTwice(key, f"first {_short(row[key])}, then {_short(value)}")
        row[key] = value
    return row


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _lone_surrogate(value: Any) -> str | None:
    """The first lone UTF-16 surrogate in ``value``'s strings (keys included), which UTF-8 cannot encode; None if
    there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return value[exc.start]
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(key) or _lone_surrogate(item)
        if found is not None:
            return found
    return None
