"""JSONL data files: every problem named by file, line and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.jsonl import read_jsonl


def rows(path: Path) -> list[dict[str, object]]:
    return [row for _, _, row in read_jsonl(path)]


def test_objects_blank_lines_crlf_and_a_bom_are_read(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"query": "a"}\r\n\n{"query": "\xc3\xa9"}\n')
    assert rows(path) == [{"query": "a"}, {"query": "é"}]


def test_a_truncated_line_names_the_column_where_it_breaks(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "ok", "label": "x"}\n{"query": "broken", "label": \n')
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON \(Expecting value at column 30\)"):
        rows(path)


def test_bytes_that_are_not_utf8_are_named_by_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"query": "a"}\n{"query": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 \(byte 0xe9 at column 15\)"):
        rows(path)


def test_a_line_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{path}:1: expected an object, got list"):
        rows(path)


def test_a_lone_surrogate_escape_is_named_by_line(tmp_path: Path) -> None:
    """Half of a UTF-16 pair is no character: nothing downstream (hashing, the artifact, UTF-8 output) can hold it.
    A whole pair is the character it encodes."""
    path = tmp_path / "half.jsonl"
    path.write_text('{"query": "pair \\ud83d\\ude00", "label": "x"}\n{"query": "cut \\ud83d", "label": "x"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: the escape \\ud83d is half of a UTF-16 surrogate pair"):
        rows(path)
    path.write_text('{"query": "pair \\ud83d\\ude00", "label": "x", "meta": {"k": ["\\u00e9"]}}\n')
    assert rows(path) == [{"query": "pair \U0001F600", "label": "x", "meta": {"k": ["\u00e9"]}}]
    path.write_text('{"query": "ok", "outcomes": {"\\udcff": 1}}\n')  # a key too
    with pytest.raises(ValueError, match=rf"{path}:1: the escape \\udcff is half"):
        rows(path)


def test_an_integer_too_long_for_python_to_read_is_named_by_line(tmp_path: Path) -> None:
    """json.loads raises a plain ValueError (not JSONDecodeError) for an integer over 4300 digits: it reached
    moe eval and moe train as Python's message, naming no file or line."""
    path = tmp_path / "huge.jsonl"
    path.write_text('{"query": "a", "label": "x"}\n{"query": "b", "label": ' + "9" * 5000 + "}\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: holds an integer of more than 4300 digits"):
        rows(path)


@pytest.mark.parametrize(("line", "key", "values"), [
    ('{"query": "play jazz", "label": "music", "label": "weather"}', "label", 'first "music", then "weather"'),
    ('{"query": "q", "outcomes": {"big": 1, "mid": 0, "big": 0}}', "big", "first 1, then 0"),
])
def test_a_key_given_twice_in_one_object_is_refused_by_line(tmp_path: Path, line: str, key: str,
                                                            values: str) -> None:
    """Python's json keeps the last of two values, other readers the first: the line trained as the last, silently
    (a nested object, an outcome record's scores, too)."""
    path = tmp_path / "twice.jsonl"
    path.write_text('{"query": "ok", "label": "x"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: the key '{key}' is given twice in one object \({values}\)"):
        rows(path)
