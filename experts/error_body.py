"""Reading an upstream's error answer: its human part, the labels the operator's log may show without quoting it, the
request field it blames, its Retry-After; and the forms an endpoint's credentials may come back in, which are
scrubbed from all of it."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote

from experts.redact import userinfo

__all__ = ["error_body", "error_labels", "error_param", "json_object", "parse_retry_after", "url_credentials"]


# An error's type or code as the log may show it: a short identifier, not free text that could quote the request.
_ERROR_LABEL = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MAX_PARAM_CHARS = 200  # the longest ``error.param`` taken as a field's name


def url_credentials(endpoint: str | None) -> list[str]:
    """The forms in which an endpoint's ``user:password@`` may come back in an upstream's error text, longest
    first: as written, percent-decoded (as the client sends them), the ``Authorization: Basic`` token made of
    them (in the client's encoding, with or without its padding), and the password alone; with no password, the
    user name is the secret (``https://TOKEN@host``)."""
    written = userinfo(endpoint or "")
    if not written:
        return []
    user, _, password = written.partition(":")
    pair = f"{unquote(user)}:{unquote(password)}"
    forms = {written, pair, password or user, unquote(password or user)}
    for encoding in ("utf-8", "latin-1"):  # httpx's and aiohttp's
        with contextlib.suppress(UnicodeEncodeError):
            token = base64.b64encode(pair.encode(encoding)).decode("ascii")
            forms |= {token, token.rstrip("=")}
    return sorted((form for form in forms if form), key=len, reverse=True)


def error_body(text: str, data: dict[str, Any] | None) -> tuple[str, list[str], str | None]:
    """An error body's human part (OpenAI's ``error.message``, FastAPI's ``detail``, or the raw ``text``), the
    labels the log may show (``error_labels``), and the request field it blames (``error_param``); ``data``: the
    body as a JSON object (``json_object``), None when it is none."""
    if data is not None:
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"]), error_labels(data), error_param(data)
        for key in ("error", "message", "detail"):
            if key in data:
                return str(data[key]), error_labels(data), error_param(data)
    return text, [], None


def json_object(text: str) -> dict[str, Any] | None:
    """``text`` parsed as a JSON object; None for anything else."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def error_param(data: dict[str, Any]) -> str | None:
    """OpenAI's ``error.param`` (vLLM's at the top level in some versions): the request field at fault."""
    error = data.get("error")
    param = (error if isinstance(error, dict) else data).get("param")
    return param if isinstance(param, str) and 0 < len(param) <= _MAX_PARAM_CHARS and param.isprintable() else None


def error_labels(data: dict[str, Any]) -> list[str]:
    """What names an error without quoting it: OpenAI's ``error.type`` and ``error.code`` (vLLM's at the top
    level), and FastAPI's ``detail[].type``; only values that look like identifiers."""
    error = data.get("error")
    fields = error if isinstance(error, dict) else data
    labels = [f"{name} {fields[name]}" for name in ("type", "code") if _is_label(fields.get(name))]
    detail = data.get("detail")
    if isinstance(detail, list):
        types = dict.fromkeys(str(d["type"]) for d in detail if isinstance(d, dict) and _is_label(d.get("type")))
        labels += [f"type {', '.join(types)}"] if types else []
    return labels


def _is_label(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, str) and bool(_ERROR_LABEL.match(value))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date; ``None`` if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
