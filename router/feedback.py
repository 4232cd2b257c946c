"""Feedback on answers: which expert's answer to a query was good or bad, stored durably.

``FeedbackStore`` is the interface; where the verdicts live follows ``state.backend``. With ``memory`` (one
router process) it is ``SqliteFeedbackStore``; with ``redis`` it is ``router.state_redis.RedisFeedbackStore``, so
every replica records into, and ``moe train`` reads from, the one store the replicas share.

The SQLite file (``feedback.path``; by default ``feedback.sqlite3`` next to ``gate.artifact``) holds two tables:

- ``requests``: the query and answering expert of each recent answer, keyed by its response id (the chat
  completion's ``id``), so feedback can name an answer by id alone. Rows older than ``feedback.remember_s``
  cannot be rated by id (the lookup ignores them) and are deleted when the store opens and closes, and while
  answers come in at least every tenth of ``remember_s`` (at most hourly): the table is a lookup aid, not a log.
- ``feedback``: one row per verdict: ``query``, ``expert``, ``score`` in [0, 1] (``good`` is 1.0, bad 0.0),
  an optional ``note``, the ``request_id`` when given, and ``created`` (Unix seconds).

The file runs in WAL mode, so the service's writes never block an export or ``moe train`` reading it. The
store is synchronous and thread-safe; the ``a``-prefixed methods run it off the event loop, on a thread of the
store's own. How ``moe train`` folds feedback into the next gate: ``router.train.fold_feedback``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import hashlib
import logging
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from experts.types import is_blank
from router.config import RouterConfig

_T = TypeVar("_T")

__all__ = [
    "REDIS_REQUEST_RETENTION_S",
    "REQUEST_RETENTION_S",
    "Answered",
    "FeedbackBody",
    "FeedbackError",
    "FeedbackRecord",
    "FeedbackStore",
    "FeedbackUnavailable",
    "SqliteFeedbackStore",
    "UnknownFeedbackExpert",
    "UnknownRequest",
    "feedback_path",
    "feedback_problems",
    "in_pool",
    "latest_verdicts",
    "load_feedback",
    "open_feedback_store",
]

log = logging.getLogger(__name__)

# A response id is worth remembering while a user might still rate the answer; a month is generous on disk.
# In Redis each remembered answer holds memory, so a day (``feedback.remember_s`` sets either).
REQUEST_RETENTION_S = 30 * 24 * 3600.0
REDIS_REQUEST_RETENTION_S = 24 * 3600.0
# Pruning is a DELETE over an indexed column: once per this many remembered answers keeps its cost negligible,
# and at least once per this share of the retention (capped), so a quiet service keeps no query much longer.
_PRUNE_EVERY = 1000
# Recording an answer, which the answer waits for, waits this long for another writer's lock (a verdict, which its
# client waits for, the connection's 5 s); after a failed write, answers are not recorded for ``_RETRY_S``
# but one, which tries again: a file locked or unwritable for a while costs each answer nothing.
_REMEMBER_BUSY_MS = 250
_RETRY_S = 5.0
_PRUNE_SHARE, _PRUNE_MAX_S = 0.1, 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, query TEXT NOT NULL, expert TEXT NOT NULL, created REAL NOT NULL, key TEXT);
CREATE INDEX IF NOT EXISTS requests_created ON requests (created);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT, query TEXT NOT NULL, expert TEXT NOT NULL,
    score REAL NOT NULL, note TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_created ON feedback (created);
"""


class FeedbackError(ValueError):
    """Feedback that cannot be stored; the service maps each kind to a status code."""


class UnknownRequest(FeedbackError):
    def __init__(self, request_id: str) -> None:
        super().__init__(f"no answer with id {request_id!r} is known (unknown, or older than the retention)")
        self.request_id = request_id


class FeedbackUnavailable(OSError):
    """The store cannot be reached (a Redis outage). The message is for clients: it names no host; the details
    go to the log. A verdict may or may not have been stored; sending it again is safe for verdicts on an answer
    id (``RedisFeedbackStore`` keeps one copy of an identical verdict)."""


class UnknownFeedbackExpert(FeedbackError):
    def __init__(self, expert: str, experts: Sequence[str]) -> None:
        super().__init__(f"expert {expert!r} is not an expert of the config; experts: {', '.join(experts)}")
        self.expert = expert


class FeedbackBody(BaseModel):
    """A verdict as clients send it: an answer (``request_id``) or a ``query``; ``good`` or a ``score``.

    With ``request_id``, ``expert`` defaults to the expert that answered.
    """

    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(default=None, min_length=1, max_length=200)
    query: str | None = Field(default=None, min_length=1, max_length=1_000_000)
    expert: str | None = Field(default=None, min_length=1, max_length=128)
    good: StrictBool | None = None
    score: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False, strict=True)
    note: str | None = Field(default=None, max_length=4000)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, query: str | None) -> str | None:
        # A blank query would become a training example that teaches the gate nothing but noise.
        if query is not None and is_blank(query):
            raise ValueError("must not be blank (empty, or only whitespace, control or zero-width characters)")
        return query

    @model_validator(mode="after")
    def _one_of_each(self) -> FeedbackBody:
        if (self.request_id is None) == (self.query is None):
            raise ValueError("give exactly one of request_id or query")
        if self.query is not None and self.expert is None:
            raise ValueError("feedback on a query needs the expert")
        if (self.good is None) == (self.score is None):
            raise ValueError("give exactly one of good or score")
        return self

    def value(self) -> float:
        return float(self.score) if self.score is not None else (1.0 if self.good else 0.0)


class FeedbackRecord(BaseModel):
    id: int
    request_id: str | None
    query: str
    expert: str
    score: float
    note: str | None
    created: float


class Answered(BaseModel):
    """A remembered answer: what was asked, which expert answered, and whose it is (``key``: ``answer_owner`` of
    the client key that asked; None where the service takes no keys)."""

    id: str
    query: str
    expert: str
    created: float
    key: str | None = None


def answer_owner(request_id: str, key_sha256: str | None) -> str | None:
    """What an answer remembers of the client key it was given to, and what a verdict on it by id must match: the
    key's own digest, salted with the answer's id, so no store holds one value per key to test guesses with
    (logs name keys, never this); None for a service open to all. Bound to the key itself, not its name: with keys
    named by place (api_keys_env), revoking one would hand its name, and its answers, to the next."""
    if key_sha256 is None:
        return None
    return hashlib.sha256(f"{request_id}:{key_sha256}".encode()).hexdigest()


class FeedbackStore(ABC):
    """Remembers which expert gave each recent answer, and keeps the verdicts on answers.

    Synchronous and thread-safe; the ``a``-prefixed methods run it off the event loop."""

    @abstractmethod
    def remember(self, request_id: str, query: str, expert: str, key: str | None = None) -> None:
        """Note that ``expert`` answered ``query`` as ``request_id`` for the client ``key`` (``answer_owner``), so
        a verdict can name the answer by id."""

    @abstractmethod
    def answered(self, request_id: str) -> Answered | None:
        """The remembered answer ``request_id``; None when unknown or past its retention."""

    @abstractmethod
    def add(self, query: str, expert: str, score: float, *, request_id: str | None = None,
            note: str | None = None) -> FeedbackRecord:
        """Store one verdict and return it with its id."""

    @abstractmethod
    def records(self, since: float | None = None) -> list[FeedbackRecord]:
        """Every verdict created at or after ``since`` (Unix seconds), oldest first."""

    @abstractmethod
    def close(self) -> None: ...

    def submit(self, body: FeedbackBody, experts: Sequence[str], key: str | None = None) -> FeedbackRecord:
        """Store one verdict from the client ``key`` (``answer_owner`` of the answer it names). Raises
        ``UnknownRequest`` or ``UnknownFeedbackExpert``.

        An expert the verdict names must be one of ``experts`` (the config's), except the expert that gave the
        rated answer: a verdict on an answer stays true after a reload removed its expert, so it is kept (``moe
        train`` leaves verdicts on experts no longer configured out of training, and uses them if it returns).
        An answer given to another key is unknown to this one, as if it did not exist: rating it would overwrite
        that client's verdict, and the verdict echoes the answer's query."""
        query, expert = body.query, body.expert
        answered_by = None
        if body.request_id is not None:
            answer = self.answered(body.request_id)
            if answer is None or answer.key != key:
                raise UnknownRequest(body.request_id)
            query, expert, answered_by = answer.query, expert or answer.expert, answer.expert
        assert query is not None and expert is not None  # FeedbackBody's validator guarantees both
        if expert not in experts and expert != answered_by:
            raise UnknownFeedbackExpert(expert, experts)
        return self.add(query, expert, body.value(), request_id=body.request_id, note=body.note)

    async def aremember(self, request_id: str, query: str, expert: str, key: str | None = None) -> None:
        await self._off_loop(self.remember, request_id, query, expert, key)

    async def asubmit(self, body: FeedbackBody, experts: Sequence[str], key: str | None = None) -> FeedbackRecord:
        return await self._off_loop(self.submit, body, experts, key)

    async def arecords(self, since: float | None = None) -> list[FeedbackRecord]:
        return await self._off_loop(self.records, since)

    async def aclose(self) -> None:
        await self._off_loop(self.close)

    async def _off_loop(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` off the event loop: on the default threads here; a store with threads of its own uses
        those (``in_pool``)."""
        return await asyncio.to_thread(fn, *args)


async def in_pool(pool: concurrent.futures.Executor, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` on ``pool``'s threads, as ``asyncio.to_thread`` runs it on the default ones (in a copy of the
    caller's context)."""
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(pool, call)


class SqliteFeedbackStore(FeedbackStore):
    """The SQLite file. One connection, serialised by a lock: writes are tiny, and this keeps it simple.

    ``name`` is how errors name the file: ``feedback.path (<file>)`` where the config set it."""

    def __init__(self, path: str | Path, *, retention_s: float = REQUEST_RETENTION_S,
                 name: str | None = None, write: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        """``write``: the store will record answers and verdicts (the service), so a file it cannot write is
        refused at once; False for a reader (``moe train``), which prunes only where it may."""
        self.path = Path(path)
        self.retention_s = retention_s
        where = name or f"feedback store {self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # OSError's own message names the folder, but not the setting that chose it
            raise OSError(f"{where}: cannot create the directory {self.path.parent} for the feedback database "
                          f"({exc.strerror or exc}); set feedback.path to a file in a writable directory, or "
                          "feedback.enabled: false") from exc
        self._lock = threading.Lock()
        # The store's own threads, started on first use (on the default threads, a queue of other work, a route
        # batch's say, held every answer's ``aremember``). Two: one records answers (``aremember``, which each
        # answer waits for), the other serves verdicts and exports, which may wait out a busy file; neither queues
        # behind the other.
        self._threads: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._thread_lock = threading.Lock()  # not ``_lock``, which a call holds while the file is busy
        self._since_prune, self._pruned_at = 0, 0.0
        self._failing = False  # a write failed, and has not succeeded since: warned once
        self._retry_at = 0.0  # while failing, answers are not recorded until then (``clock``'s time)
        self._clock = clock
        self.where = where
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL: a commit survives a crash of the process; only power loss can lose the last ones.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            if write:  # a damaged file would take verdicts that no export or training could read back
                _check_intact(self._db)
            # A file from before answers kept their key gains the column; its answers have none, which only an
            # open service (no keys) may rate, and they pass out of the retention soon.
            if "key" not in {row[1] for row in self._db.execute("PRAGMA table_info(requests)")}:
                self._db.execute("ALTER TABLE requests ADD COLUMN key TEXT")
            # Answers past their retention go now; it is also a write, so a file the router may read but not
            # write (another owner, a read-only mount) is refused here rather than at the first answer.
            try:
                self._prune(time.time())
            except sqlite3.Error:
                if write:
                    raise
        except sqlite3.Error as exc:
            # sqlite's own message ("unable to open database file") names neither the file nor the way out.
            raise OSError(f"{where}: cannot open it as SQLite ({exc}); its folder and the file must "
                          "be writable by the router and the file a SQLite database: set feedback.path to another "
                          "file, or feedback.enabled: false") from exc

    def _prune(self, now: float) -> None:
        self._db.execute("DELETE FROM requests WHERE created < ?", (now - self.retention_s,))
        self._since_prune, self._pruned_at = 0, now

    def remember(self, request_id: str, query: str, expert: str, key: str | None = None) -> None:
        """As the interface says; a write that fails (the file turned read-only, a lock held past the busy
        timeout, a full disk) is logged, and the answer stands: only rating it by its id is lost, and so is
        recording the answers of the next ``_RETRY_S`` but one, which tries again."""
        now = time.time()
        if self._failing and self._clock() < self._retry_at:
            return
        self._retry_at = self._clock() + _RETRY_S
        # The lock too is waited for a quarter of a second at most: a verdict or an export holds it while the file
        # is busy, for up to the connection's 5 s.
        if not self._lock.acquire(timeout=_REMEMBER_BUSY_MS / 1000):
            self._cannot_remember("the store is busy with a verdict or an export")
            return
        try:
            self._db.execute(f"PRAGMA busy_timeout={_REMEMBER_BUSY_MS}")
            try:
                self._db.execute("INSERT OR REPLACE INTO requests (id, query, expert, created, key) "
                                 "VALUES (?, ?, ?, ?, ?)", (request_id, query, expert, now, key))
                self._since_prune += 1
                if (self._since_prune >= _PRUNE_EVERY
                        or now - self._pruned_at >= min(_PRUNE_SHARE * self.retention_s, _PRUNE_MAX_S)):
                    self._prune(now)
            finally:
                self._db.execute("PRAGMA busy_timeout=5000")
        except (sqlite3.Error, ValueError) as exc:  # ValueError: text SQLite cannot store (a lone surrogate)
            self._cannot_remember(f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._lock.release()
        if self._failing:
            log.warning("%s: recording answers again", self.where)
        self._failing = False

    def _cannot_remember(self, why: str) -> None:
        if not self._failing:
            log.warning("%s: cannot record answers (%s); they are served, but cannot be rated by id until it can be "
                        "written again (tried again every %g s)", self.where, why, _RETRY_S)
        self._failing = True

    def answered(self, request_id: str) -> Answered | None:
        # An answer older than the retention is gone, pruned yet or not (pruning comes only now and then).
        with self._lock, self._reading("looking up the answer"):
            row = self._db.execute("SELECT id, query, expert, created, key FROM requests WHERE id = ? AND "
                                   "created >= ?", (request_id, time.time() - self.retention_s)).fetchone()
        return None if row is None else Answered(id=row[0], query=row[1], expert=row[2], created=row[3], key=row[4])

    def add(self, query: str, expert: str, score: float, *, request_id: str | None = None,
            note: str | None = None) -> FeedbackRecord:
        now = time.time()
        try:
            with self._lock:
                cursor = self._db.execute(
                    "INSERT INTO feedback (request_id, query, expert, score, note, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (request_id, query, expert, score, note, now))
        except sqlite3.Error as exc:  # a 503 naming the store, not a 500: the verdict was not stored
            log.warning("%s: cannot store a verdict (%s: %s)", self.where, type(exc).__name__, exc)
            raise FeedbackUnavailable(f"the feedback store cannot be written ({type(exc).__name__}); the verdict "
                                      "was not stored; the service log has the details; send it again later") \
                from exc
        return FeedbackRecord(id=cursor.lastrowid or 0, request_id=request_id, query=query, expert=expert,
                              score=score, note=note, created=now)

    @contextlib.contextmanager
    def _reading(self, doing: str) -> Iterator[None]:
        """A read's ``sqlite3.Error`` (a damaged page, a lock held past the busy timeout) as ``FeedbackUnavailable``
        (the service: 503, not a 500; ``load_feedback`` adds the file and the way out for ``moe train``). Its
        message is for clients, as ``add``'s is: the file and sqlite's words go to the log."""
        try:
            yield
        except sqlite3.Error as exc:
            log.warning("%s: cannot read it while %s (%s: %s)", self.where, doing, type(exc).__name__, exc)
            raise FeedbackUnavailable(f"the feedback store cannot be read while {doing} ({type(exc).__name__}); "
                                      "the service log has the details") from exc

    def records(self, since: float | None = None) -> list[FeedbackRecord]:
        with self._lock, self._reading("reading the verdicts"):
            rows = self._db.execute(
                "SELECT id, request_id, query, expert, score, note, created FROM feedback WHERE created >= ? "
                "ORDER BY id", (since if since is not None else float("-inf"),)).fetchall()
        return [FeedbackRecord(**dict(zip(FeedbackRecord.model_fields, row, strict=True))) for row in rows]

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._prune(time.time())  # what is past its retention goes before the service stops
        with self._lock:
            self._db.close()

    async def aremember(self, request_id: str, query: str, expert: str, key: str | None = None) -> None:
        await self._off_loop(self.remember, request_id, query, expert, key, thread="answers")

    async def _off_loop(self, fn: Callable[..., _T], *args: Any, thread: str = "verdicts") -> _T:
        with self._thread_lock:
            if thread not in self._threads:
                self._threads[thread] = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"moe-sqlite-{thread}")
            pool = self._threads[thread]
        return await in_pool(pool, fn, *args)

    async def aclose(self) -> None:
        await super().aclose()
        with self._thread_lock:
            pools, self._threads = list(self._threads.values()), {}
        for pool in pools:
            pool.shutdown(wait=False)


def _check_intact(db: sqlite3.Connection) -> None:
    """Raise ``sqlite3.DatabaseError`` naming the first problem ``PRAGMA quick_check`` finds in the file (a damaged
    page, which the first reads may well not touch)."""
    problems = [row[0] for row in db.execute("PRAGMA quick_check(3)").fetchall()]
    if problems != ["ok"]:
        raise sqlite3.DatabaseError(f"damaged: {'; '.join(problems)}")


def feedback_path(config: RouterConfig) -> Path:
    if config.feedback.path is not None:
        return config.resolve(config.feedback.path)
    return config.resolve(config.gate.artifact).parent / "feedback.sqlite3"


def open_feedback_store(config: RouterConfig, environ: Mapping[str, str] | None = None, *,
                        write: bool = True) -> FeedbackStore | None:
    """The config's store (created if absent): Redis with ``state.backend: redis``, else the SQLite file; None
    when feedback is off. ``environ`` holds the Redis URL variable (default: this process's environment);
    ``write``: False for a reader, which a SQLite file it cannot write does not stop."""
    if not config.feedback.enabled:
        return None
    remember_s = config.feedback.remember_s
    if config.state.backend == "redis":
        from router.feedback_redis import RedisFeedbackStore

        return RedisFeedbackStore.from_config(config.state, os.environ if environ is None else environ,
                                              retention_s=remember_s or REDIS_REQUEST_RETENTION_S)
    path = feedback_path(config)
    name = None if config.feedback.path is None else f"feedback.path ({path})"
    return SqliteFeedbackStore(path, retention_s=remember_s or REQUEST_RETENTION_S, name=name, write=write)


def feedback_problems(config: RouterConfig) -> list[tuple[str, str]]:
    """What ``moe serve`` would refuse in the SQLite feedback file (``open_feedback_store``), as ``(key, message)``
    problems, found without creating or changing anything: a path that is not a file, a file that is no SQLite
    database or cannot be written, a folder that cannot be created or written. None with Redis or feedback off."""
    if not config.feedback.enabled or config.state.backend != "memory":
        return []
    path = feedback_path(config)
    key = "feedback.path" if config.feedback.path is not None else "feedback.path (default: beside gate.artifact)"
    fix = "set feedback.path to a file in a writable directory, or feedback.enabled: false"
    if path.exists():
        if not path.is_file():
            return [(key, f"{path} is not a file (a folder?); {fix}")]
        try:
            with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
                db.execute("PRAGMA schema_version").fetchone()
                _check_intact(db)
        except sqlite3.Error as exc:
            return [(key, f"{path}: cannot open it as SQLite ({exc}); {fix}")]
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
            return [(key, f"{path}: the router could not write it (or its folder, for SQLite's journal); {fix}")]
        return []
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return [(key, f"{path}: its folder cannot be created ({folder} is not a writable folder); {fix}")]
    return []


def load_feedback(config: RouterConfig, since: float | None = None,
                  environ: Mapping[str, str] | None = None) -> list[FeedbackRecord]:
    """The stored verdicts, for training; none when feedback is off or nothing was ever stored. Raises
    ``FeedbackUnavailable`` when the shared store (Redis) cannot be read.

    Verdicts on a blank query (stored before ``FeedbackBody`` refused them) are left out, with a warning: as
    training examples they are noise. The store keeps them; ``records`` still returns them."""
    if not config.feedback.enabled:
        return []
    if config.state.backend == "memory" and not feedback_path(config).is_file():
        return []
    store = open_feedback_store(config, environ, write=False)
    assert store is not None
    try:
        records = store.records(since)
    except FeedbackUnavailable as exc:
        if not isinstance(store, SqliteFeedbackStore):
            raise
        # The trainer is no client: the file, what sqlite said, and the way out.
        cause = exc.__cause__
        raise FeedbackUnavailable(f"{store.where}: cannot read the verdicts ({type(cause).__name__}: {cause}); if "
                                  "the file is damaged, recover it (sqlite3's .recover) or move it aside, and train "
                                  "with --no-feedback meanwhile") from exc
    finally:
        store.close()
    kept = [r for r in records if not is_blank(r.query)]
    if len(kept) < len(records):
        log.warning("left %d feedback verdict(s) with a blank query out of training", len(records) - len(kept))
    return latest_verdicts(kept)


def latest_verdicts(records: Sequence[FeedbackRecord]) -> list[FeedbackRecord]:
    """One verdict per rated answer and expert: the latest. A client that resends a verdict (a retry after a
    timeout) or changes its mind (good, then bad) rates the answer once, as it meant; the Redis store already
    keeps a resend of the latest verdict once, and the SQLite one every copy, so both train the same gate. Verdicts on a
    query without an answer id are each their own. Oldest first, as given."""
    last: dict[tuple[str, str], int] = {}
    for i, r in enumerate(records):
        if r.request_id is not None:
            last[(r.request_id, r.expert)] = i
    return [r for i, r in enumerate(records) if r.request_id is None or last[(r.request_id, r.expert)] == i]
