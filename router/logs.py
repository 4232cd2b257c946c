"""One structured JSON log line per request.

``RequestRecord`` is filled in as a request goes: the HTTP edge opens it (request id, route, the client key's
*name*), the handler adds what the router did (model asked, answering expert, trace), the edge closes it
(status, latency) and writes it. Prompts and answers go in only when ``service.log_content`` is on. Headers
are never copied into a record, so an API key or ``Authorization`` header cannot reach a log line.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from router.trace import Trace

__all__ = ["REQUEST_LOGGER", "JsonFormatter", "RequestRecord", "configure_json_logging", "log_request",
           "warnings_once"]

REQUEST_LOGGER = "router.requests"


@dataclass
class RequestRecord:
    request_id: str
    method: str
    route: str
    # The answer's own id (``chatcmpl-…``: what the client, the SDK and feedback name it by), on a chat completion;
    # on a verdict, the id of the answer it rates.
    completion_id: str | None = None
    rated_id: str | None = None
    key_name: str | None = None
    key_sha256: str | None = None  # the key's digest (router.security.Admitted): never in the log line
    model: str | None = None
    stream: bool | None = None
    expert: str | None = None
    trace: Trace | None = None
    # Each failed expert's {"expert", "kind", "message"} when no trace came back (every expert failed).
    failures: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None
    status: int = 0
    latency_ms: float = 0.0
    # Filled only when content logging is on.
    messages: list[dict[str, Any]] | None = None
    answer: list[str] | None = None

    def line(self, *, content: bool) -> dict[str, Any]:
        """The log line's fields."""
        out: dict[str, Any] = {"event": "request", "request_id": self.request_id, "method": self.method,
                               "route": self.route, "status": self.status, "latency_ms": round(self.latency_ms, 2)}
        optional = {"completion_id": self.completion_id, "rated_id": self.rated_id, "key": self.key_name,
                    "model": self.model, "stream": self.stream, "expert": self.expert, "error": self.error}
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.trace is not None:
            usage = self.trace.usage
            out.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                       cost_usd=round(self.trace.cost_usd, 8),
                       chosen=[c.expert for c in self.trace.decision.chosen] if self.trace.decision else None,
                       attempts=[{"expert": a.expert, "ok": a.ok, "latency_ms": round(a.latency_ms, 2),
                                  **({"kind": a.error.get("kind")} if a.error else {}),
                                  **({"fallback_for": a.fallback_for} if a.fallback_for else {})}
                                 for a in self.trace.attempts])
            if self.trace.switches:
                out["switches"] = len(self.trace.switches)
        elif self.failures:
            out["attempts"] = [{"expert": f.get("expert"), "ok": False, "kind": f.get("kind")} for f in self.failures]
        if content:
            if self.messages is not None:
                out["messages"] = self.messages
            if self.answer is not None:
                out["answer"] = "".join(self.answer)
        return out


# Errors that mean the service failed the request, whatever status went out: a stream answers 200 before its
# first token, so one whose experts all broke off mid-way, or that an internal error cut short, keeps its 200.
_SERVICE_FAILURES = frozenset({"all_experts_failed", "internal_error"})


def log_request(record: RequestRecord, *, content: bool) -> None:
    """One JSON line per request: at WARNING when the service failed it (5xx: every expert down, an internal
    error; or a stream that began and then ended in such an error), so an alert can watch for those alone; INFO
    otherwise."""
    level = logging.WARNING if record.status >= 500 or record.error in _SERVICE_FAILURES else logging.INFO
    fields = record.line(content=content)
    text = json.dumps(fields, default=str, separators=(",", ":"))
    # The fields ride along, so ``JsonFormatter`` writes them as they are rather than read the text back (the line
    # went through JSON three times: 8% of the router's time under load). The message stays that text, for any
    # other handler or filter, and one that rewrites it (a host's redaction) is written as it left it.
    logging.getLogger(REQUEST_LOGGER).log(level, text, extra={"moe_line": (text, fields)})


class JsonFormatter(logging.Formatter):
    """Every record as one JSON object; a message that already is a JSON object is merged in, not quoted."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                               + f".{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name}
        line = getattr(record, "moe_line", None)
        if line is not None and record.msg is line[0] and not record.args:
            out.update(line[1])
        else:
            message = record.getMessage()
            parsed = _json_object(message)
            out.update(parsed if parsed is not None else {"message": message})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure_json_logging(level: int | str = logging.INFO, logger: str = "router") -> None:
    """Write the ``logger`` loggers (``router``, ``experts``) as JSON lines to stderr. Called at service startup,
    once for each package; a logger that already has handlers (configured by the host application) is left as
    it is."""
    target = logging.getLogger(logger)
    if target.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    target.addHandler(handler)
    target.setLevel(level)
    # The host's root handlers would print each line a second time, not as JSON.
    target.propagate = False


# uvicorn's own level below DEBUG, which its --log-level trace names.
TRACE = 5


def log_level(name: str) -> int:
    """A ``--log-level`` name (uvicorn's: critical, error, warning, info, debug, trace) as a logging level."""
    return TRACE if name.lower() == "trace" else logging.getLevelNamesMapping()[name.upper()]


def uvicorn_log_config(level: str) -> dict[str, Any]:
    """uvicorn's ``log_config`` for ``moe serve``: its own lines (startup, shutdown, errors) as JSON lines like the
    router's, so one stream holds one format. Its access log is left off (``access_log=False``): the router writes
    one richer line per request itself."""
    at = log_level(level)
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": JsonFormatter}},
            "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
            "loggers": {"uvicorn": {"handlers": ["json"], "level": at, "propagate": False},
                        "uvicorn.error": {"level": at}}}


def _json_object(message: str) -> dict[str, Any] | None:
    if not message.startswith("{"):
        return None
    try:
        value = json.loads(message)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class _Once(logging.Filter):
    """Drops a warning seen before, of the thread that made it (another thread's run is its own)."""

    def __init__(self, into: list[str] | None = None) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()
        self.into = into
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        # A logger's filters run in the thread that logs (``record.thread`` is None with ``logging.logThreads`` off).
        if record.levelno < logging.WARNING or threading.get_ident() != self.thread:
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        # A warning may say what a report should note in other words (``note``: without the texts it quotes).
        note = getattr(record, "note", None) or key[2]
        if self.into is not None and note not in self.into:
            self.into.append(note)
        return True


@contextmanager
def warnings_once(names: Sequence[str], into: list[str] | None = None) -> Iterator[None]:
    """While inside, a warning (or worse) logged again by one of the loggers ``names`` (same logger, level and
    text) in this thread is dropped: work that trains several gates on the same data (a two-stage gate's stages,
    an eval's systems) says what is wrong with the data once. ``into``: a list each distinct warning is added to
    (its ``note``, where the record gives one)."""
    once = _Once(into)
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.addFilter(once)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(once)
