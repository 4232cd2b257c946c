"""README's config reference is a config: it parses against the schema (but for the nested router's file, which it
only names), and it names every key the schema has, with its value or in a comment. Keys added to the schema without
a word in the reference (replay.column, gate.max_batch) went unseen by users."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from router.config import ConfigError, RouterConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]


def _reference() -> tuple[str, Any]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Config reference"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    return block.group(1), yaml.safe_load(block.group(1))


def _schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        if name == "base_dir":  # set by the loader, not the file
            continue
        keys.add(prefix + name)
        for kind in (field.annotation, *typing.get_args(field.annotation)):
            for inner in (kind, *typing.get_args(kind)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    keys |= _schema_keys(inner, f"{prefix}{name}.")
    return keys


def _written_keys(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        return {k for key, inner in value.items() for k in (prefix + key, *_written_keys(inner, f"{prefix}{key}."))}
    if isinstance(value, list):
        return {k for inner in value for k in _written_keys(inner, prefix)}
    return set()


def test_the_config_reference_parses_but_for_the_file_it_names() -> None:
    _, raw = _reference()
    try:
        parse_config(raw, check_env=False)
    except ConfigError as exc:
        assert [path for path, _ in exc.problems] == ["experts[2] (science).router_config"], exc.problems


def test_the_config_reference_names_every_key_of_the_schema() -> None:
    text, raw = _reference()
    comments = " ".join(line.partition("#")[2] for line in text.splitlines())
    unnamed = [key for key in sorted(_schema_keys(RouterConfig) - _written_keys(raw))
               if not re.search(rf"\b{re.escape(key.rpartition('.')[2])}\b", comments)]
    assert unnamed == []
    assert _written_keys(raw) - _schema_keys(RouterConfig) == set()
