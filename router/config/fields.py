"""The pieces every section of the config is built of: ``Strict`` (the base model: unknown keys, NaN and a boolean
for a number refused), the name and path patterns and field types, and ``ConfigError``."""

from __future__ import annotations

import os
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from experts.types import is_blank

# The model name that asks the gate to route (beside ``service.name``): no expert may take it.
ROUTED_MODEL = "auto"


# How a combiner reads a final answer out of free text (``router.combine.EXTRACTORS``).
Extractor = Literal["choice", "number", "short"]


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@/:+-]{0,127}$"


ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


# An expert's endpoint: the scheme here, the rest (host, port, no query) in ``_endpoint_problems``.
HTTP_URL_PATTERN = r"^https?://\S+$"


class ConfigError(ValueError):
    """A config failed validation. ``problems`` holds every ``(path, message)`` found, not just the first."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {path}: {msg}" for path, msg in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{lines}")


def _numeric(annotation: Any) -> bool:
    """Whether a field of this type takes a number (``int``, ``float``, a ``Literal`` of numbers, or a union or
    ``Annotated`` holding one): the fields a boolean must not fill."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _numeric(get_args(annotation)[0])
    if origin is Literal:
        return any(type(arg) in (int, float) for arg in get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(_numeric(arg) for arg in get_args(annotation))
    return annotation in (int, float)


# Linux's limits on a path (PATH_MAX) and on each of its names (NAME_MAX), in bytes.
_PATH_MAX, _NAME_MAX = 4096, 255


def path_problem(value: str) -> str | None:
    """What keeps ``value`` from being a file's path, said so that the key can be named: the OS refuses a NUL
    character ("embedded null byte") and an over-long path or name ("File name too long") in words that name no
    key. None for a path a file can have."""
    if "\0" in value:
        return "holds a NUL character, which no file's path can"
    size = len(os.fsencode(value))
    if size > _PATH_MAX:
        return f"is {size} bytes long; a path has at most {_PATH_MAX}"
    longest = max(len(os.fsencode(name)) for name in value.split("/"))
    if longest > _NAME_MAX:
        return f"holds a name {longest} bytes long; a file or folder name has at most {_NAME_MAX}"
    return None


def _file_path(value: str) -> str:
    problem = path_problem(value)
    if problem is not None:
        raise PydanticCustomError("file_path", "the path {problem}", {"problem": problem})
    return value


# A config key naming a file or folder, relative to the config file's folder or absolute.
FilePath = Annotated[str, Field(min_length=1), AfterValidator(_file_path)]


def _example_text(value: str) -> str:
    if is_blank(value):  # spaces, or only characters the encoder drops (zero-width, control): both embed as nothing
        raise PydanticCustomError("blank_example", "an example is blank: give a query this expert should answer, "
                                                   "or leave the entry out (the service refuses blank queries too)")
    return value


# An expert's example query: text to embed, so neither empty nor blank (its embedding is of nothing, and would
# claim a share of every query).
ExampleText = Annotated[str, AfterValidator(_example_text)]


class Strict(BaseModel):
    # No NaN or infinity (YAML's .nan, .inf): a NaN timeout was reported as "less than or equal to 3600".
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads ``True`` as 1, and YAML reads ``yes``, ``on`` and ``true`` as ``True``, so
        ``port: yes`` or ``max_attempts: on`` would load as 1: a number field refuses a boolean. (Strict mode
        would also refuse the strings a ``${VAR}`` expands to, "8000" for a port.)"""
        if isinstance(value, bool) and info.field_name is not None and _numeric(
                cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError(
                "bool_for_number", "{value} is a boolean, not a number (YAML reads yes/no, on/off and true/false "
                "as booleans); write a number", {"value": str(value).lower()})
        return value
