"""Reading a config: the YAML file (bounded, duplicate keys refused), its ``${VAR}`` references expanded from the
environment, and every problem, the schema's and the cross-checks', reported at once with its path in the file.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import (
    ValidationError,
)

from router.config.checks import LOADING, cross_problems, labelled, pydantic_problems
from router.config.schema import CROSS_CHECK, ConfigError, RouterConfig

# ``${VAR}`` or ``${VAR:-default}``; ``$${VAR}`` is the escape for a literal ``${VAR}``.
ENV_REF = re.compile(r"(\$?)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Free text, read by the gate and shown by the API: never expanded, so a ``${...}`` there stays as written (an
# example about shell variables keeps them, and no variable's value, a secret perhaps, is trained on or shown).
_VERBATIM_KEYS = frozenset({"description", "examples"})


def _expand_env(value: Any, unset: list[tuple[str, str]], where: str = "",
                malformed: list[str] | None = None, found: dict[str, str] | None = None,
                given: set[str] | None = None) -> Any:
    """``value`` with each ``${VAR}`` and ``${VAR:-default}`` replaced from the environment; a variable that is
    unset and has no default becomes "" and is noted in ``unset`` as ``(path, name)``. An empty variable counts as
    unset, as with the shell's and compose's ``:-`` (and ``router.settings``): ``${VAR:-default}`` gives the
    default, and ``${VAR}`` is noted in ``unset``. ``$${VAR}`` stands for a literal ``${VAR}``. A ``${`` that
    starts no reference (``${HOME`` unterminated, ``${1X}``) is left as written and its path noted in
    ``malformed``. Each variable that gave a value goes into ``found`` (name: value), and the path of its value
    into ``given``.

    A ``*_env`` key's value is left alone: it names a variable. Expanded, a mistaken ``api_key_env: ${KEY}``
    would put the key itself where a variable's name goes, and into every message that names that variable.
    ``description`` and ``examples`` are left alone too (``_VERBATIM_KEYS``)."""
    def expand(text: str, path: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            escape, name, default = match.group(1), match.group(2), match.group(3)
            if escape:
                return match.group(0)[1:]
            value = os.environ.get(name)
            if value:  # "" counts as unset
                if found is not None:
                    found[name] = value
                if given is not None:
                    given.add(path or "<root>")
                return value
            if default is None:
                unset.append((path or "<root>", name))
            return default or ""

        # A '${' left once the references are taken out starts none; one inside a default (``${A:-${B}}``) would
        # be kept as text, since defaults are not expanded.
        if malformed is not None and ("${" in ENV_REF.sub("", text) or any(
                "${" in (m.group(3) or "") for m in ENV_REF.finditer(text) if not m.group(1))):
            malformed.append(path or "<root>")
        return ENV_REF.sub(substitute, text)

    return _map_expandable(value, expand, where)


def _map_expandable(value: Any, fn: Callable[[str, str], str], where: str = "") -> Any:
    """``value`` with ``fn(text, path)`` applied to every string the loader expands: all but a ``*_env`` key's
    value and what ``_VERBATIM_KEYS`` hold."""
    if isinstance(value, str):
        return value if where.endswith("_env") else fn(value, where)
    if isinstance(value, list):
        return [_map_expandable(v, fn, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: v if k in _VERBATIM_KEYS else _map_expandable(v, fn, f"{where}.{k}" if where else str(k))
                for k, v in value.items()}
    return value


def env_references(value: Any) -> list[tuple[str, str | None]]:
    """``(variable, default or None)`` for each ``${VAR}`` and ``${VAR:-default}`` the loader would expand in
    ``value`` (a config as read from YAML, unexpanded), in order: what a deployment must provide."""
    found: list[tuple[str, str | None]] = []

    def note(text: str, _: str) -> str:
        found.extend((m.group(2), m.group(3)) for m in ENV_REF.finditer(text) if not m.group(1))
        return text

    _map_expandable(value, note)
    return found


def _string_keys(value: Any, problems: list[tuple[str, str]], where: str = "") -> Any:
    """``value`` without the mapping keys that are not strings, each noted in ``problems`` with the mapping's path.
    Every key of the schema is a name; YAML reads an unquoted ``8000:`` as a number and ``on:``, ``yes:`` as
    booleans."""
    if isinstance(value, list):
        return [_string_keys(v, problems, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        kept = {}
        for k, v in value.items():
            if isinstance(k, str):
                kept[k] = _string_keys(v, problems, f"{where}.{k}" if where else k)
            else:
                problems.append((where or "<root>", f"mapping keys must be strings: {k!r} is {type(k).__name__} "
                                                    "(quote it, or check the indentation)"))
        return kept
    return value


# A config's size and depth, bounded before anything walks it: YAML's aliases let a few lines stand for billions
# of values (a "billion laughs" file), or for a value that contains itself.
MAX_CONFIG_VALUES, MAX_CONFIG_DEPTH = 1_000_000, 100


def _shape_problem(raw: Any) -> str | None:
    """Why ``raw`` (a parsed file) is no config to walk: it holds itself (an alias inside its own anchor), nests
    deeper than ``MAX_CONFIG_DEPTH``, or expands to more than ``MAX_CONFIG_VALUES`` values; None when it is fine.
    Iterative, and stops at the first limit passed, so the check itself is bounded."""
    count = 0
    stack: list[tuple[Any, int, frozenset[int]]] = [(raw, 0, frozenset())]
    while stack:
        value, depth, inside = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            return (f"the file expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases repeating aliases?); "
                    "a config is far smaller")
        if depth > MAX_CONFIG_DEPTH:
            return f"values nested more than {MAX_CONFIG_DEPTH} levels deep; a config nests a few"
        if isinstance(value, dict | list):
            if id(value) in inside:
                return "a value contains itself (a YAML alias inside its own anchor, such as x: &a [*a])"
            children = value.values() if isinstance(value, dict) else value
            below = inside | {id(value)}
            stack.extend((child, depth + 1, below) for child in children)
    return None


def parse_config(raw: Any, *, source: str = "<config>", base_dir: str | Path = ".",
                 check_env: bool = True, require_vars: bool = True) -> RouterConfig:
    """Validate a config mapping. Raises ``ConfigError`` listing every problem with its path.

    ``check_env``: the variables the ``*_env`` keys name (API keys, the Redis URL) must be set. ``require_vars``:
    every ``${VAR}`` without a default must be set; off only where the config is not used here but passed on
    to where its variables will be set (``moe compose``, whose containers get them)."""
    shape = _shape_problem(raw)
    if shape is not None:
        raise ConfigError(source, [("<root>", shape)])
    unset: list[tuple[str, str]] = []
    malformed: list[str] = []
    problems: list[tuple[str, str]] = []
    found: dict[str, str] = {}
    given: set[str] = set()
    raw = _expand_env(_string_keys(raw, problems), unset, malformed=malformed, found=found, given=given)
    if not isinstance(raw, dict):
        raise ConfigError(source, [("<root>", "the config must be a mapping")])
    problems += [
        (path, "a '${' that starts no variable reference (unclosed, or not a variable's name): write ${NAME} or "
               "${NAME:-default}, NAME of letters, digits and _ and not starting with a digit") for path in malformed]
    if "base_dir" in raw:  # set from the file's folder; a key of that name would be silently overwritten
        problems.append(("base_dir", "unknown key (not in the schema; paths resolve against the config's folder)"))
    if require_vars:
        problems += [(labelled(path, raw), f"environment variable {name} is "
                                            f"{'empty (which counts as unset)' if name in os.environ else 'not set'}"
                                            f" and ${{{name}}} has no default (write ${{{name}:-default}} to give "
                                            "one)")
                     for path, name in unset]
    blanked = frozenset(path for path, _ in unset)
    # Where an unset variable left the whole value "" and is reported, what that "" then fails (too short, no
    # number, no endpoint) says nothing more. A value it left partly written is still checked as written.
    emptied: set[str] = set()

    def note_empty(text: str, path: str) -> str:
        if not text:
            emptied.add(path or "<root>")
        return text

    _map_expandable(raw, note_empty)
    reported = frozenset(labelled(path, raw) for path in blanked & emptied) if require_vars else frozenset()
    config: RouterConfig | None = None
    # What the schema's own cross-check found in the values as it read them, where the file's were of other types
    # (YAML's !!binary bytes for a name): reported where the checks of the file as written found nothing.
    checked: list[tuple[str, str]] = []
    try:
        config = RouterConfig.model_validate({**raw, "base_dir": str(base_dir)},
                                             context={"blanked": blanked, "quiet": frozenset(given)})
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc, raw))
        checked = [(path, m) for err in exc.errors() if err["type"] == CROSS_CHECK
                   for path, m in (err.get("ctx") or {})["problems"]]
    cross = list(cross_problems(raw, check_env=check_env, base_dir=base_dir, blanked=blanked,
                                 quiet=frozenset(given)))
    # pydantic's "should match pattern" says less than a cross-check of the same field (a ${...} reference where
    # a variable's name belongs): keep the one that says why.
    explained = {path for path, _ in cross}
    problems = [(path, m) for path, m in problems
                if not (path in explained and m.startswith("String should match pattern"))]
    problems.extend(p for p in cross if p not in problems)
    problems = [(path, m) for path, m in problems if path not in reported or m.startswith("environment variable ")]
    if problems or config is None:
        raise ConfigError(source, [(_unechoed(path, found), _unechoed(m, found)) for path, m in problems or checked]
                          or [("<root>", "invalid config")])
    return config


# A variable's value this long is never repeated in a problem's message: it may be a secret put in the wrong key
# (``type: ${OPENAI_API_KEY}``). Shorter ones (a port, a model's name) are shown, as they help more than they risk.
_ECHO_MAX = 8


def _unechoed(message: str, found: Mapping[str, str]) -> str:
    """``message`` with each long value a ``${VAR}`` gave (``found``) replaced by the reference it came from, as
    given and as Python or JSON quote it (``'a\\\\b'`` for a backslash). No message rebuilds a part of such a
    value (``cross_problems``' ``quiet``)."""
    for name, value in sorted(found.items(), key=lambda item: -len(item[1])):
        if len(value) > _ECHO_MAX:
            for form in dict.fromkeys((value, repr(value)[1:-1], json.dumps(value)[1:-1])):
                message = message.replace(form, f"${{{name}}}")
    return message


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last, silently).

    Merge keys (``<<: *anchor``, ``<<: [*a, *b]``) work as in YAML's safe loader: a key a merge supplies may be
    given again explicitly, which overrides it; only a key written twice in the mapping itself is refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[type, Any], yaml.Node] = {}  # by type too: 1 and true are distinct keys
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # flatten_mapping below folds the merged keys in, ahead of the explicit ones
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get((type(key), key))
                except TypeError:  # a list or mapping as a key ([x, y]: 1): no dict can hold it
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"found a {type(key).__name__} as a key: mapping keys must be strings",
                        key_node.start_mark) from None
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"found the key {key!r} twice (first on line {first.start_mark.line + 1})",
                        key_node.start_mark)
                seen[(type(key), key)] = key_node
            self.flatten_mapping(node)  # as SafeConstructor.construct_mapping does; merged keys come first
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An integer, or, for one longer than Python converts (4,300 digits by default), an error that says where
        it is, where Python's names no key."""
        try:
            return int(super().construct_yaml_int(node))
        except ValueError:
            digits = sum(c.isdigit() for c in str(node.value))
            raise yaml.constructor.ConstructorError(
                None, None, f"found a number of {digits} digits; a config's numbers have at most "
                f"{sys.get_int_max_str_digits()}", node.start_mark) from None

    yaml_constructors: ClassVar[dict[Any, Any]] = {**yaml.SafeLoader.yaml_constructors,
                                                   "tag:yaml.org,2002:int": construct_yaml_int}


def _named(text: str, path: Path) -> io.StringIO:
    """``text`` as a stream named ``path``, so YAML's error marks name the file."""
    stream = io.StringIO(text)
    stream.name = str(path)
    return stream


# The most a config file may hold; reading stops there (a device such as /dev/zero never ends).
MAX_CONFIG_BYTES = 16 * 2**20


def load_config(path: str | Path, *, check_env: bool = True, require_vars: bool = True) -> RouterConfig:
    """Read and validate a YAML config file (``parse_config`` says what the two checks are)."""
    path = Path(path)
    try:
        with path.open("rb") as file:  # at most one byte more than a config may hold: /dev/zero ends too
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(str(path), [("<file>", f"larger than {MAX_CONFIG_BYTES // 2**20} MiB: a config is a few "
                                                     "KB (training data goes in the files gate.train_data names)")])
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [("<file>", f"cannot read: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(str(path), [("<file>", f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} on line {line} "
                                                 "cannot be decoded; save the file as UTF-8")]) from exc
    try:
        raw = yaml.load(_named(text, path), Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("<yaml>", str(exc).replace("\n", " "))]) from exc
    except RecursionError:  # the parser recurses per level: a file nested hundreds deep
        raise ConfigError(str(path), [("<yaml>", "nested too deeply for the parser; a config nests a few levels")]) \
            from None
    token = LOADING.set((*LOADING.get(), path.resolve()))
    try:
        # The folder the path names, symlinks not followed: Kubernetes mounts a ConfigMap's file as a link into
        # a timestamped folder, where "../artifacts" would miss the volume mounted beside the config's folder.
        return parse_config(raw, source=str(path), base_dir=Path(os.path.abspath(path)).parent, check_env=check_env,
                            require_vars=require_vars)
    finally:
        LOADING.reset(token)
