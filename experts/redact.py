"""Secrets out of what is shown: config dumps, log lines and error messages.

Lives in ``experts`` because an expert's own error messages and log lines name its endpoint, which may carry
credentials (``https://user:secret@host``, ``?api-key=...``); ``router`` re-exports it (``router.security``) for
the admin config dump and the state stores' logs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["REDACTED", "redact", "scrubbed", "userinfo", "userinfo_past_host"]

REDACTED = "<redacted>"
# Config keys whose values are secrets or stand-ins for them (a key's hash still lets one test guesses offline).
_SECRET_FIELDS = frozenset({"sha256", "api_key", "apikey", "key"})
_SECRET_WORDS = frozenset({"secret", "password", "token", "credentials"})
# A URL in a string: its userinfo (``userinfo``) and secret-looking query parameters (?password=..., &token=...)
# are redacted. A "'" ends a URL here, as the quotes it is written between do ('http://a','http://u:pw@b': two
# URLs, each redacted); but it may stand in a password or a query value (RFC 3986 allows it unencoded), so a
# second pass (``_URL_WITH_QUOTES``) reads URLs through it, the quotes and punctuation closing one kept apart.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+")
_URL_WITH_QUOTES = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://(?:<redacted>|[^\s\"<>])+")
_URL_AUTHORITY = re.compile(r"^([^:/?#]+://)([^/?#]*)")
_SECRET_QUERY = re.compile(r"([?&;](?:[^=&;#]*(?:pass|pwd|secret|token|key|auth|credential)[^=&;#]*)=)[^&;#]*",
                           re.IGNORECASE)


def redact(value: Any) -> Any:
    """A config dump with secret-looking fields replaced; environment variable *names* stay visible."""
    if isinstance(value, dict):
        return {k: REDACTED if _secret_field(k) and v is not None else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return _redact_args(value)
    if isinstance(value, str):
        # Credentials inside a URL (https://user:secret@host, redis://h/0?password=secret) go too: each URL as
        # quotes end it, then through its quotes (a "'" in a password); what the first pass hid stays hidden.
        value = _URL.sub(lambda m: _redact_url(m.group(0)), value)
        return _URL_WITH_QUOTES.sub(lambda m: _redact_quoted(m.group(0)), value)
    return value


def userinfo(url: str) -> str:
    """The credentials in ``url`` (``user:password`` of ``scheme://user:password@host/...``), or "" if none.

    They run to the authority's last "@", so a password holding "@" goes whole. A password holding an unencoded
    "/", "?" or "#" ends the authority early, and a URL parser reads its start as the host and port (or, after
    a "@", as the host): where the authority holds a ":" or a "@" and what follows it holds a "@" too, they run
    to the URL's last "@". So ``https://host/path@x`` keeps its path, and ``http://host:8000/a@b`` is hidden
    whole: too much, never too little."""
    match = _URL_AUTHORITY.match(url)
    if match is None:
        return ""
    authority, rest = match.group(2), url[match.end():]
    if "@" in rest and (":" in authority or "@" in authority):
        return (authority + rest).rpartition("@")[0]
    return authority.rpartition("@")[0]


def scrubbed(value: Any, secrets: Sequence[str]) -> Any:
    """``value`` (parsed JSON, or text) with each of ``secrets`` replaced by ``***`` in every string in it, keys
    included: an upstream or a gateway may quote a credential back in what it answers. ``secrets`` longest first,
    so a value is scrubbed before a part of it."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {scrubbed(k, secrets): scrubbed(v, secrets) for k, v in value.items()}
    return [scrubbed(v, secrets) for v in value] if isinstance(value, list) else value


def userinfo_past_host(url: str) -> bool:
    """Whether ``url``'s user:password@ runs past where a URL parser ends its host (``userinfo``): a '/', '?' or
    '#' in a password, unencoded, makes the parser read its start as the host and port, which its errors quote."""
    credentials, rest = userinfo(url), url.partition("://")[2]
    return bool(credentials) and len(credentials) >= len(re.split(r"[/?#]", rest, maxsplit=1)[0])


def _redact_quoted(found: str) -> str:
    """``_redact_url`` of a URL found in text, the quotes and punctuation closing it kept as they were: a "'" or
    "')", "'," after it closes the quotes it was written between, and is no part of it."""
    url = found.rstrip("'),;]}.")
    close = found[len(url):]
    if "'" not in close:  # nothing quoted: "(see http://h/x)" keeps its ")" as before
        return _redact_url(found)
    return _redact_url(url) + close


def _redact_url(url: str) -> str:
    found = userinfo(url)
    if found:
        scheme = url.partition("://")[0] + "://"
        url = f"{scheme}{REDACTED}{url[len(scheme) + len(found):]}"
    return _SECRET_QUERY.sub(rf"\1{REDACTED}", url)


def _redact_args(values: list[Any]) -> list[Any]:
    """A list, redacted item by item; in a command line (``vllm.args``), the value after a secret-looking flag
    (``--api-key VALUE``, ``--hf-token=VALUE``) too, whatever it starts with (a URL-safe key may start with "-")."""
    shown: list[Any] = []
    after_flag = False
    for value in values:
        if after_flag and isinstance(value, str):
            shown.append(REDACTED)
            after_flag = False
            continue
        after_flag = False
        if isinstance(value, str) and value.startswith("-"):
            flag, equals, _ = value.partition("=")
            if _secret_field(flag.lstrip("-").replace("-", "_")):
                shown.append(f"{flag}={REDACTED}" if equals else flag)
                after_flag = not equals
                continue
        shown.append(redact(value))
    return shown


def _secret_field(name: str) -> bool:
    """``sha256``, ``api_key``, ``admin_token``, ``db_password``: yes. ``api_key_env``, ``max_tokens``: no."""
    lowered = name.lower()
    if lowered.endswith("_env"):
        return False
    return lowered in _SECRET_FIELDS or lowered.endswith("_api_key") or bool(_SECRET_WORDS & set(lowered.split("_")))
