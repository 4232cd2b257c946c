"""What a config's fields cannot check one by one: references between sections (an aggregator that is no expert),
expert types, endpoints, and the environment variables the ``*_env`` keys name; and pydantic's errors in words
that name the key and the remedy. Every message names a variable, never its value: it may be a secret.
"""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    BaseModel,
    TypeAdapter,
    ValidationError,
)

from router.config.schema import (
    CROSS_CHECK,
    ENV_NAME_PATTERN,
    HTTP_URL_PATTERN,
    NAME_PATTERN,
    ROUTED_MODEL,
    ConfigError,
    FallbackConfig,
    ServiceConfig,
    TopKConfig,
    path_problem,
)

# What an OpenAI-compatible client appends to its endpoint (``experts.openai_compat``), the longest first.
_CLIENT_PATHS = ("/chat/completions", "/completions")
# What redis-py's ``Redis.from_url`` takes.
_REDIS_SCHEMES = ("redis", "rediss", "unix")


# The config files being loaded, outermost first: a nested router's ``router_config`` that is one of them closes a
# routing cycle, refused by name instead of loaded again without end.
LOADING: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("moe_config_loading", default=())


def name_list(names: Sequence[str], limit: int = 20) -> str:
    """``names`` comma-separated, the first ``limit`` of them and how many more: a config may hold hundreds of
    experts, and a message that lists them all buries its point."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _expert_label(raw: Any, index: int) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"experts[{index}]" + (f" ({name})" if isinstance(name, str) and name else "")


def _whole(value: Any, model: type[BaseModel], name: str) -> int | None:
    """A count as the schema reads ``model``'s field ``name`` (``"3"``, as a ``${VAR}`` gives it, and ``3.0`` are
    3); None for a value it refuses (a boolean, 2.5, text, one out of its bounds), which pydantic names."""
    if isinstance(value, bool):
        return None
    try:
        count = getattr(model.model_validate({name: value}), name)
    except ValidationError:
        return None
    return count if isinstance(count, int) else None


def _routed(value: Any) -> bool:
    """An expert's ``routed`` as the schema reads it (``"false"``, ``"no"`` and ``0`` are false, as a ``${VAR}``
    gives them); a value it refuses counts as routed here, and pydantic names it."""
    try:
        return bool(TypeAdapter(bool).validate_python(value))
    except ValidationError:
        return True


def labelled(path: str, raw: Mapping[str, Any]) -> str:
    """``path`` (``experts[0].model``) as problems name it, its expert labelled (``experts[0] (alpha).model``)."""
    match = re.match(r"experts\[(\d+)\]", path)
    experts = raw.get("experts")
    if match is None or not isinstance(experts, list) or int(match.group(1)) >= len(experts):
        return path
    index = int(match.group(1))
    return _expert_label(experts[index], index) + path[match.end():]


def cross_problems(raw: Any, *, check_env: bool, base_dir: str | Path | None = None,
                    blanked: frozenset[str] = frozenset(),
                    quiet: frozenset[str] = frozenset()) -> Iterable[tuple[str, str]]:
    """Problems pydantic's per-field checks cannot see: references between parts, types, environment.

    ``blanked``: the paths where an unset ``${VAR}`` was left "" (reported as unset, or passed on by ``moe
    compose``), whose emptiness is not a problem of its own. ``quiet``: the paths where a ``${VAR}`` gave part
    of the value, which no message rebuilds from it (an endpoint's base URL, say, may hold a token)."""
    if not isinstance(raw, dict):
        return
    experts: list[Any] = raw["experts"] if isinstance(raw.get("experts"), list) else []
    names: list[str] = []
    named: dict[str, str] = {}  # an expert's name -> its place, for the first expert of each name
    for i, e in enumerate(experts):
        if not isinstance(e, dict):
            continue
        where = _expert_label(e, i)
        name = e.get("name")
        if isinstance(name, str):
            if name in names:
                yield f"{where}.name", f"duplicate expert name {name!r}"
            if name == ROUTED_MODEL:
                yield f"{where}.name", (f"{name!r} is reserved: a request for model {name!r} is routed by the gate, "
                                        "so no request could call this expert by name; rename it")
            names.append(name)
            named.setdefault(name, where)
        yield from _expert_problems(e, i, check_env=check_env, base_dir=base_dir, blanked=blanked, quiet=quiet)
    gate: dict[str, Any] = raw["gate"] if isinstance(raw.get("gate"), dict) else {}
    default = gate.get("default_expert")
    if isinstance(default, str) and names and default not in names:
        yield "gate.default_expert", f"references expert {default!r}, which is not defined"
    yield from _combiner_problems(raw.get("combiner"), names)
    top_k: dict[str, Any] = gate["top_k"] if isinstance(gate.get("top_k"), dict) else {}
    fallback: dict[str, Any] = raw["fallback"] if isinstance(raw.get("fallback"), dict) else {}
    # Counts the schema refuses (k over 64, say) are its problem alone; one a ${VAR} gave is not repeated.
    k = _whole(top_k.get("k"), TopKConfig, "k")
    attempts = _whole(fallback.get("max_attempts", FallbackConfig.model_fields["max_attempts"].default),
                      FallbackConfig, "max_attempts")
    k_shown = "k" if "gate.top_k.k" in quiet else f"{k}"
    attempts_shown = "max_attempts" if "fallback.max_attempts" in quiet else f"{attempts}"
    # A fixed panel of k is filled from the config's experts alone (a nested router is one expert, and cold
    # start scores only configured experts), so more than there are would silently serve a smaller panel. The
    # other policies size the panel themselves, and k only caps it.
    routed = [e for e in experts if not isinstance(e, dict) or _routed(e.get("routed", True))]
    if experts and not routed:
        yield "experts", ("every expert has routed: false, so the gate has none to route to; leave routed at its "
                          "default (true) for the experts it should choose among")
    if k is not None and top_k.get("policy", "fixed") == "fixed" and routed and k > len(routed):
        which = ("expert(s) defined" if len(routed) == len(experts)
                 else "routed expert(s) defined (routed: false ones are never on a panel)")
        yield "gate.top_k.k", (f"{k_shown} is more than the {len(routed)} {which}: a fixed panel of {k_shown} can "
                               f"never be filled; lower k to at most {len(routed)}")
    if k is not None and attempts is not None and k > attempts:
        k_given = "" if k_shown == "k" else f" ({k})"
        yield "fallback.max_attempts", (f"{attempts_shown} is below gate.top_k.k{k_given}: the panel alone calls "
                                        f"{k_shown} experts, and max_attempts counts every expert tried, the panel "
                                        f"included; raise max_attempts to at least {k_shown} or lower k")
    service: dict[str, Any] = raw["service"] if isinstance(raw.get("service"), dict) else {}
    service_name = service.get("name", ServiceConfig.model_fields["name"].default)
    if service_name in names and "name" in service:
        yield "service.name", f"{service_name!r} is also an expert's name"
    elif service_name in names:  # the default name: the expert is what the file says, so it is the one named
        yield f"{named[service_name]}.name", (f"{service_name!r} is the service's own model name (service.name, "
                                              "which routes like 'auto', is that by default), so no request could "
                                              "call this expert by name; rename the expert or set service.name")
    state: dict[str, Any] = raw["state"] if isinstance(raw.get("state"), dict) else {}
    security: dict[str, Any] = raw["security"] if isinstance(raw.get("security"), dict) else {}
    for section, block, key, example in (("state", state, "url_env", "MOE_REDIS_URL"),
                                         ("security", security, "api_keys_env", "MOE_API_KEYS"),
                                         ("security", security, "admin_key_env", "MOE_ADMIN_KEY")):
        if _is_reference(block.get(key)):
            yield f"{section}.{key}", _reference_problem(key, example)
        elif isinstance(block.get(key), str) and not re.match(ENV_NAME_PATTERN, block[key]):
            yield f"{section}.{key}", _not_a_name_problem(key, example)
    url_env = state.get("url_env", "MOE_REDIS_URL")
    if (check_env and state.get("backend") == "redis" and isinstance(url_env, str)
            and re.match(ENV_NAME_PATTERN, url_env)):
        problem = redis_url_problem(url_env, os.environ.get(url_env, "").strip(), is_set=url_env in os.environ)
        if problem:
            yield "state.url_env", problem
    if check_env:
        yield from _security_env_problems(security)

def _expert_problems(e: dict[str, Any], i: int, *, check_env: bool, base_dir: str | Path | None,
                     blanked: frozenset[str], quiet: frozenset[str]) -> Iterable[tuple[str, str]]:
    """One expert's problems beyond its fields' own (``cross_problems`` says what ``blanked`` and ``quiet`` are)."""
    where = _expert_label(e, i)
    kind = e.get("type")
    if not isinstance(kind, str):  # pydantic names a type that is no string; nothing below can read it
        kind = None
    yield from _type_problems(e, kind, where)
    yield from _api_key_problems(e.get("api_key_env"), where, check_env=check_env)
    yield from _endpoint_field_problems(e, i, where, blanked=blanked, quiet=quiet)
    if kind == "router":
        yield from _nested_router_problems(e, where, check_env=check_env, base_dir=base_dir)


def _type_problems(e: dict[str, Any], kind: str | None, where: str) -> Iterable[tuple[str, str]]:
    """What an expert's ``type`` asks of the rest of its entry (an endpoint, a replay block, a router config)."""
    from experts.plugins import EXPERT_GROUP, installed
    from experts.registry import known_types
    from router.expert_types import EXPERT_TYPES, REQUIRES_ENDPOINT

    if isinstance(kind, str) and kind not in EXPERT_TYPES and kind not in installed(EXPERT_GROUP):
        yield f"{where}.type", f"unknown expert type {kind!r}; known: {', '.join(known_types(EXPERT_TYPES))}"
    if kind in REQUIRES_ENDPOINT and not e.get("endpoint"):
        yield f"{where}.endpoint", f"type {kind!r} needs an endpoint"
    if kind == "replay" and not e.get("replay"):
        yield f"{where}.replay", "type 'replay' needs a replay block (source, path)"
    elif isinstance(kind, str) and kind != "replay" and e.get("replay"):
        yield f"{where}.replay", f"only a type: replay expert plays recordings; this one is type {kind!r}"
    if kind == "replay" and e.get("endpoint"):
        yield f"{where}.endpoint", ("a type: replay expert answers from its recordings and calls no endpoint; "
                                    "remove it (to call recordings served by moe serve-replay, use type: openai)")
    if kind == "router" and bool(e.get("endpoint")) == bool(e.get("router_config")):
        yield f"{where}.router_config", "type 'router' needs exactly one of endpoint (over HTTP) or router_config"
    elif kind != "router" and e.get("router_config"):
        yield f"{where}.router_config", "only type 'router' takes a router_config"


def _api_key_problems(key_env: Any, where: str, *, check_env: bool) -> Iterable[tuple[str, str]]:
    """``api_key_env`` names a variable (never a reference to one, or the key itself), which holds a key an HTTP
    header can carry."""
    if _is_reference(key_env):
        yield f"{where}.api_key_env", _reference_problem("api_key_env", "OPENAI_API_KEY")
    elif isinstance(key_env, str) and not re.match(ENV_NAME_PATTERN, key_env):
        yield f"{where}.api_key_env", _not_a_name_problem("api_key_env", "OPENAI_API_KEY")
    elif check_env and isinstance(key_env, str) and not os.environ.get(key_env, "").strip():
        yield f"{where}.api_key_env", variable_state(key_env, is_set=key_env in os.environ)
    elif check_env and isinstance(key_env, str) and _not_header_text(os.environ[key_env].strip()):
        yield f"{where}.api_key_env", (f"environment variable {key_env} holds a control character (a line "
                                       "break?) or a character that is not ASCII inside the key, which no HTTP "
                                       "header carries as written")


def _endpoint_field_problems(e: dict[str, Any], i: int, where: str, *, blanked: frozenset[str],
                             quiet: frozenset[str]) -> Iterable[tuple[str, str]]:
    """An endpoint the client can build on, holding one kind of credentials at most; its value never shown."""
    from experts.redact import userinfo

    endpoint = e.get("endpoint")
    if isinstance(endpoint, str) and e.get("api_key_env") and userinfo(endpoint):
        yield f"{where}.endpoint", ("holds credentials (user:password@) and api_key_env sets a bearer key too; "
                                    "an HTTP request carries only one Authorization: keep one of them")
    if isinstance(endpoint, str) and re.match(HTTP_URL_PATTERN, endpoint):
        wrong = _endpoint_problems(endpoint, need_host=f"experts[{i}].endpoint" not in blanked,
                                   echo=f"experts[{i}].endpoint" not in quiet)
        if wrong:
            yield f"{where}.endpoint", "; ".join(wrong)
    elif isinstance(endpoint, str) and endpoint and f"experts[{i}].endpoint" not in blanked:
        # In words, rather than pydantic's pattern (which this replaces): the usual slip is a missing scheme.
        # The value is not shown: it may hold credentials (user:password@host).
        yield f"{where}.endpoint", ("is not an http:// or https:// URL (with no spaces): write the base URL the "
                                    "client appends /chat/completions to, e.g. http://host:8000/v1")


def _nested_router_problems(e: dict[str, Any], where: str, *, check_env: bool,
                            base_dir: str | Path | None) -> Iterable[tuple[str, str]]:
    """What the inner router's config would be refused for at serve time, a routing cycle included."""
    if (isinstance(e.get("router_config"), str) and not e.get("endpoint")
            and base_dir is not None and path_problem(e["router_config"]) is None):
        # Checked with or without the environment: a file is no variable. (A path no file can have is the
        # field's own problem.)
        inner = Path(e["router_config"])
        inner = inner if inner.is_absolute() else Path(base_dir) / inner
        if not inner.is_file():
            yield f"{where}.router_config", f"no config file at {inner}"
        else:
            # The inner router is built from it at serve time: what would refuse it there is said here,
            # a routing cycle (a file reached again from within itself) included.
            chain = LOADING.get()
            if inner.resolve() in chain:
                loop = [*chain[chain.index(inner.resolve()):], inner.resolve()]
                yield f"{where}.router_config", ("a routing cycle: " + " -> ".join(str(f) for f in loop)
                                                 + "; a router cannot contain itself")
            else:
                from router.config.load import load_config  # here: that module imports this one

                try:
                    load_config(inner, check_env=check_env)
                except ConfigError as exc:
                    yield f"{where}.router_config", f"{inner}: " + "; ".join(f"{k}: {m}" for k, m in exc.problems)


def redis_url_problem(name: str, url: str, *, is_set: bool) -> str | None:
    """What keeps redis-py from reading ``url``, the value of variable ``name``. The value may hold a password, so
    only its scheme is ever shown: redis-py's own error quoted the password's start as the port when a '/' in it
    ended the host early."""
    if not url:
        return f"{variable_state(name, is_set=is_set)}; it must hold the Redis URL (redis://host:6379/0)"
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in _REDIS_SCHEMES:
        return (f"environment variable {name} does not hold a Redis URL (its scheme is {scheme or 'none'!r}; "
                "expected redis://, rediss:// or unix://)")
    from experts.redact import userinfo_past_host  # here, not at the top: as in _endpoint_problems

    if userinfo_past_host(url):
        return (f"environment variable {name} holds a Redis URL with a '@' past its host: a '/', '?' or '#' in its "
                "password ends the host early; percent-encode them (%2F, %3F, %23, and a '@' as %40)")
    try:
        _ = urlsplit(url).port  # read for its ValueError, as redis-py reads it
    except ValueError:
        return (f"environment variable {name} holds a Redis URL whose host or port cannot be read (a port is a "
                "number from 0 to 65535, an IPv6 host is written in [...]); percent-encode a password's '/', '?', "
                "'#' and '@'")
    tls = sorted(k for k in parse_qs(urlsplit(url).query) if k.startswith("ssl")) if scheme != "rediss" else []
    if tls:  # redis-py hands them to a connection that takes none: every command would raise TypeError
        return (f"environment variable {name} holds a {scheme}:// URL with the TLS option(s) "
                f"{', '.join(map(repr, tls))}, which only a rediss:// URL takes: use rediss:// for TLS, or leave "
                "them out")
    return None


def _is_reference(value: Any) -> bool:
    """A ``*_env`` key written as ``${VAR}``: never expanded (its value would be the secret), so never valid."""
    return isinstance(value, str) and "${" in value


def _reference_problem(key: str, example: str) -> str:
    return f"names an environment variable: write the variable's name itself ({key}: {example}), not a ${{...}} " \
           "reference to it"


def looks_like_secret(name: str) -> bool:
    """Whether a valid variable name reads like a secret pasted in its place (Hugging Face's ``hf_...``, Groq's
    ``gsk_...``, a hex or base62 token): a run of 20 or more letters and digits that mixes cases, or of 32 or more
    that mixes letters and digits. Variable names are words joined by ``_``, so their runs are short."""
    for run in re.findall(r"[A-Za-z0-9]{20,}", name):
        mixed_case = any(c.islower() for c in run) and any(c.isupper() for c in run)
        if mixed_case or (len(run) >= 32 and any(c.isdigit() for c in run) and any(c.isalpha() for c in run)):
            return True
    return False


def variable_state(name: str, *, is_set: bool) -> str:
    """"environment variable NAME is not set" (or empty), unless NAME is unset and looks like a secret pasted in
    place of a variable's name: then it is not repeated (a log or a CI page would keep it)."""
    if not is_set and looks_like_secret(name):
        return (f"the environment variable it names is not set, and the name looks like a secret pasted in place of "
                f"a variable's name ({len(name)} characters of mixed letters and digits, not repeated here): write "
                "the name of the variable that holds the secret, never the secret itself")
    return f"environment variable {name} is {'empty' if is_set else 'not set'}"


def _not_a_name_problem(key: str, example: str) -> str:
    """A ``*_env`` value that is no variable's name, often the secret itself pasted in: never repeated."""
    return (f"is not an environment variable's name (letters, digits and _, not starting with a digit): write the "
            f"name of the variable that holds the secret ({key}: {example}), never the secret itself")


def _endpoint_problems(url: str, *, need_host: bool = True, echo: bool = True) -> list[str]:
    """What keeps ``url`` from being an OpenAI-compatible base URL. The client appends ``/chat/completions`` to
    it, so a query string or fragment would swallow that path and an endpoint already ending in it would double
    it. Nothing is said of ``/v1``: some servers mount the API elsewhere. The userinfo (a password, perhaps) is
    never repeated, nor any part of it: the checks read the URL without it (``experts.redact.userinfo``).
    ``echo`` false: the base URL is not suggested (a variable gave the URL, whose path may hold a token)."""
    from experts.redact import userinfo, userinfo_past_host  # here, not at the top: `import router.config` stays
    # light (no httpx)

    scheme, _, rest = url.partition("://")
    credentials = userinfo(url)
    bare = f"{scheme}://{rest[len(credentials) + 1:]}" if credentials else url
    found = []
    if userinfo_past_host(url):
        found.append("has a '@' past its host: a '/', '?' or '#' in its user:password@ ends the host early; "
                     "percent-encode them (%2F, %3F, %23, and a '@' as %40)")
    try:
        parts = urlsplit(bare)
    except ValueError as exc:  # an unclosed IPv6 "[", say
        return [*found, f"is not a valid URL: {exc}"]
    host_port = parts.netloc.rpartition("@")[2]
    port = host_port.rpartition("]")[2].partition(":")[2]  # after an IPv6 literal's "]"
    if need_host and not parts.hostname:
        found.append("has no host (write http://host:port/...)")
    elif parts.hostname and (bad := _host_name_problem(parts.hostname)):
        found.append(f"host {parts.hostname + ' ' if echo else ''}is not a host name a resolver can look up: {bad}")
    if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        found.append(f"port {port} is not a port number from 1 to 65535")
    before_fragment, fragment_mark, _ = bare.partition("#")
    extras = ["a query string (?...)"] * ("?" in before_fragment) + ["a fragment (#...)"] * bool(fragment_mark)
    if extras:
        found.append(f"has {' and '.join(extras)}: the client appends /chat/completions to the endpoint, so give "
                     "the base URL alone (e.g. http://host:8000/v1)")
    path = parts.path.rstrip("/")
    suffix = next((s for s in _CLIENT_PATHS if path.endswith(s)), None)
    if suffix:
        base = f"{scheme}://{host_port}{path[:-len(suffix)]}"
        # A "@" left in the path may be a user name's token cut short by a "/": the URL is not repeated then.
        found.append(f"ends in {suffix}, which the client appends itself: give the base URL"
                     + (f" ({base})" if "@" not in path and echo else f" without {suffix}"))
    return found


def _host_name_problem(host: str) -> str | None:
    """Why ``host`` (a URL's host, lowercased, without brackets) cannot be looked up, as the HTTP client would
    find at the first call: an empty label ("a..b", ".a"), one over 63 characters, or the whole over 253 (IDNA's
    codec, which encodes it for the resolver). None for an IP address or a good name."""
    import ipaddress

    try:
        ipaddress.ip_address(host.partition("%")[0])  # an IPv6 literal may carry a zone ("fe80::1%eth0")
        return None
    except ValueError:
        pass
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        labels = host.rstrip(".").split(".")
        if any(not label for label in labels):
            return "it has an empty label (two dots together, or a leading dot)"
        return "a label (the part between dots) is over 63 characters"
    if len(encoded.rstrip(b".")) > 253:
        return f"it is {len(encoded)} characters long, over 253"
    return None


# The security keys that name a variable, and what that variable holds.
_SECURITY_ENV = (("api_keys_env", "the client keys, comma-separated (until it does, every /v1 call is refused)"),
                 ("admin_key_env", "the admin key (until it does, every /admin call is refused)"))


def _security_env_problems(security: dict[str, Any]) -> Iterable[tuple[str, str]]:
    """An unset key variable fails closed at serve time, every call refused; say so before then. Only the
    variable's name is ever shown, never its value."""
    for key, holds in _SECURITY_ENV:
        name = security.get(key)
        if not isinstance(name, str) or not re.match(ENV_NAME_PATTERN, name):
            continue  # pydantic names the key
        value = os.environ.get(name)
        if value is None:
            yield f"security.{key}", f"{variable_state(name, is_set=False)}; it must hold {holds}"
        elif not (value.replace(",", " ") if key == "api_keys_env" else value).strip():  # as KeyRing reads it
            yield f"security.{key}", f"environment variable {name} is empty; it must hold {holds}"
        elif any(_not_header_text(k.strip()) for k in (value.split(",") if key == "api_keys_env" else [value])):
            yield f"security.{key}", (f"environment variable {name} holds a control character (a line break?) or a "
                                      "character that is not ASCII inside a key, which no client could send in an "
                                      "HTTP header as written")


def _not_header_text(value: str) -> bool:
    """Whether ``value`` holds what an HTTP header does not carry as written: an ASCII control character other than
    a tab (header values allow tabs), or a character that is not ASCII (the service reads header bytes as Latin-1,
    so a UTF-8 key never matches, and the SDK refuses one)."""
    return any((ord(c) < 32 and c != "\t") or ord(c) >= 127 for c in value)


def _combiner_problems(combiner: Any, names: list[str]) -> Iterable[tuple[str, str]]:
    """``fuse`` needs an aggregator and ``escalate`` an expert to escalate to, and each must be a configured
    expert: it is called like one, through the dispatcher."""
    if not isinstance(combiner, dict):
        return
    for key, strategy, role in _COMBINER_EXPERTS:
        name = combiner.get(key)
        if combiner.get("strategy") == strategy and name is None:
            yield f"combiner.{key}", f"strategy {strategy!r} needs {key}: the name of the expert that {role}"
        if isinstance(name, str) and names and name not in names:
            yield f"combiner.{key}", f"references expert {name!r}, which is not defined; experts: {', '.join(names)}"


# The combiner keys that name an expert: (key, the strategy that needs it, what that expert does).
_COMBINER_EXPERTS = (("aggregator", "fuse", "writes the final answer"),
                     ("escalate_to", "escalate", "answers when the panel disagrees"))


def pydantic_problems(exc: ValidationError, raw: Any) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = list(err["loc"])
        parts: list[str] = []
        for i, part in enumerate(loc):
            if isinstance(part, int) and i > 0 and loc[i - 1] == "experts":
                experts = raw.get("experts") if isinstance(raw, dict) else None
                item = experts[part] if isinstance(experts, list) and part < len(experts) else None
                parts[-1] = _expert_label(item, part)
            elif isinstance(part, int) and parts:
                parts[-1] = f"{parts[-1]}[{part}]"
            else:
                parts.append(str(part))
        msg = "unknown key (not in the schema)" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "value_error":  # a validator's own words, without pydantic's "Value error, " before them
            msg = msg.removeprefix("Value error, ")
        if loc == ["version"] and err["type"] == "literal_error":
            msg = f"must be 1, the schema version this release reads, not {err['input']!r}"
        if err["type"] == "string_type":
            msg = _not_text(err["input"]) or msg
        if err["type"] == "string_pattern_mismatch" and (err.get("ctx") or {}).get("pattern") == NAME_PATTERN:
            msg = _name_problem(str(err["input"]))
        if err["type"] == CROSS_CHECK:
            continue  # the schema's cross-check: the loader reports its problems one by one
        problems.append((".".join(parts) or "<root>", msg))
    return problems


def _name_problem(name: str) -> str:
    """Why ``name`` is no name (``NAME_PATTERN``), in words: the pattern alone says nothing to most readers."""
    rule = ("a name is 1 to 128 of the characters A-Z a-z 0-9 . _ @ / : + -, starting with a letter or digit "
            "(names appear in URLs, metric labels and logs)")
    if not name:
        return f"is empty: {rule}"
    if len(name) > 128:
        return f"is {len(name)} characters long: {rule}"
    bad = next((c for c in name if not re.fullmatch(r"[A-Za-z0-9._@/:+-]", c)), None)
    if bad is not None:
        return f"holds {bad!r}: {rule}"
    return f"starts with {name[0]!r}: {rule}"


def _not_text(value: Any) -> str | None:
    """Why a value YAML read as other than text is no string, with the remedy (quotes); None for values that were
    never text (a list, a mapping, null), which pydantic's own words fit."""
    import datetime

    if isinstance(value, bool):
        read = f"{str(value).lower()}, a boolean (unquoted, yes/no, on/off and true/false are booleans)"
    elif isinstance(value, int | float):
        read = f"{value}, a number (unquoted, digits are a number, and 1:30 is read as 90)"
    elif isinstance(value, datetime.date):
        read = f"{value.isoformat()}, a date (unquoted, 2024-05-01 is a date)"
    else:
        return None
    return f"should be text, but YAML read it as {read}: put the value in quotes"

