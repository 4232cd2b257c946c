"""Hot reload: a changed config file becomes a new orchestrator without a restart.

Three triggers lead to the same ``Reloader.reload``: a watched file changing (polled every
``service.reload_poll_s``), SIGHUP, and ``POST /admin/reload``. The watched files are the config file and what its
build reads that may change under a running service (``router.build.config_inputs``): every file of the gate
artifact (with its fast stage and ``cascade.json``, and the learned vote weights, where the config uses them), so a
``moe train`` into the served artifact is taken up once it has published the new one (``router.files.staged``),
and nested routers' config files. A reload:

1. reads and validates the whole file, then builds the orchestrator from it, which also checks the gate
   artifact against the experts (``build_orchestrator``); all of it off the event loop;
2. on any problem keeps the running config, logs one line naming every problem, and raises ``ReloadFailed``
   (the admin endpoint turns it into a 400 listing them). A change the running process cannot take up is such a
   problem too (``restart_only_changes``: the address it listens on, the reload poll, the shared state, where
   feedback is stored), rather than a setting that ``/admin/config`` shows but nothing applies. A file the
   schema refuses is reported alone (nothing can be built from it); otherwise the restart-only changes and what
   the build refuses are reported together. Any other error while reading or building (a bug, a file nested too
   deep for the parser) is refused the same way and logged with its traceback, so no trigger dies of it;
3. otherwise swaps the orchestrator on ``app.state``. Requests already running hold the old object and finish
   on it; it is closed once they have drained (``Orchestrator.drained``), or after its request deadline. What the
   build keeps in the shared state (the encoders, nested routers' states) is kept from the swap on
   (``router.build.deferred_commits``): a refused reload leaves the running config's.

Reloads are serialised: two triggers at once build twice, one after the other, and the last file wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from router.build import (
    BuildCommits,
    build_orchestrator,
    config_inputs,
    deferred_commits,
    load_problem,
    nested_loading_problems,
    reset_changed_breakers,
)
from router.config import ConfigError, RouterConfig, load_config
from router.errors import naming_config
from router.feedback import feedback_path
from router.hierarchy import nested_failure
from router.orchestrator import Orchestrator
from router.security import redact

__all__ = ["ReloadFailed", "Reloader", "restart_only_changes"]

log = logging.getLogger("router.reload")

# Each watched file's (mtime_ns, size, inode), None while it does not exist.
_Stamps = dict[Path, tuple[int, int, int] | None]
# Time an old orchestrator is given past its own request deadline before it is closed regardless: a stream
# whose client vanished may never tell us it ended.
_DRAIN_MARGIN_S = 5.0


class ReloadFailed(Exception):
    """A reload was refused; the running config stays. ``problems`` holds every ``(path, message)``;
    ``unexpected``, an error that was no config problem (its traceback is logged with the refusal)."""

    def __init__(self, source: str, problems: list[tuple[str, str]], *,
                 unexpected: BaseException | None = None) -> None:
        self.source = source
        self.problems = problems
        self.unexpected = unexpected
        listed = "; ".join(f"{p}: {m}" for p, m in problems)
        super().__init__(f"config reload from {source} refused, the running config stays: "
                         f"{len(problems)} problem(s): {listed}")


def restart_only_changes(running: RouterConfig, new: RouterConfig) -> list[tuple[str, str]]:
    """What ``new`` changes that only a restart applies, as ``(path, message)`` problems: the address the service
    listens on and its reload poll (uvicorn and the reloader were started with them), the shared state (its
    connections are made at start), and the feedback store (opened at start; answers remembered for rating and
    the verdicts stay in it, so moving it under a running service would split them from what ``moe train``
    reads)."""
    problems = []
    for name in ("host", "port", "reload_poll_s"):
        was, now = getattr(running.service, name), getattr(new.service, name)
        if was != now:
            problems.append((f"service.{name}", f"changes only at a restart (running: {was!r}; the file: {now!r})"))
    if new.state != running.state:
        problems.append(("state", "changes only at a restart: the shared state's connections are made at start"))
    if (new.feedback.enabled, new.feedback.remember_s) != (running.feedback.enabled, running.feedback.remember_s):
        problems.append(("feedback", "feedback.enabled and feedback.remember_s change only at a restart"))
    elif new.feedback.enabled and new.state.backend == "memory":
        was_at, now_at = feedback_path(running), feedback_path(new)
        if was_at.resolve() != now_at.resolve():  # the same file however spelt (a symlinked folder, ..)
            cause = "feedback.path" if new.feedback.path != running.feedback.path else "gate.artifact"
            problems.append((cause, f"moves the feedback store from {was_at} to {now_at} (it sits beside "
                                    f"gate.artifact unless feedback.path is set), which only a restart does; to keep "
                                    f"the running store, set feedback.path to it"))
    return problems


def _shortened(exc: BaseException | None, keep: int = 20) -> Any:
    """``exc`` for a log line's ``exc_info``; its traceback cut to its first and last ``keep`` frames when longer (a
    RecursionError's runs to a thousand: one log line of hundreds of kB)."""
    if exc is None:
        return None
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    if len(frames) <= 2 * keep:
        return exc
    chain: TracebackType | None = None
    for frame in reversed(frames[:keep] + frames[-keep:]):
        chain = TracebackType(chain, frame.tb_frame, frame.tb_lasti, frame.tb_lineno)
    return type(exc), exc, chain


class Reloader:
    """Reloads ``path`` into the holder bound with ``bind`` (the app's ``state``, with an ``orchestrator``).

    ``build`` turns a validated config into an orchestrator (tests inject fakes); ``poll_s`` None turns the
    mtime watch off; ``sighup`` listens for the signal while started.
    """

    def __init__(self, path: str | Path, *, build: Callable[[RouterConfig], Orchestrator] = build_orchestrator,
                 poll_s: float | None = None, sighup: bool = False) -> None:
        self.path = Path(path)
        self.build = build
        self.poll_s = poll_s
        self.sighup = sighup
        self.holder: Any = None
        self.on_swap: Callable[[Orchestrator, Orchestrator], None] | None = None
        self._inputs: tuple[Path, ...] = ()  # what the running config's build reads, besides ``path``; set by ``watch``
        self._seen = self._stamp()  # ``path`` stamped now: construct the reloader before reading the file
        # What the latest ``_load`` found the file's config reads, stamped before its build read them: kept by
        # ``reload`` whether the build succeeds (the new inputs) or not (watched besides the old ones, so that
        # training the gate a refused config names reloads it).
        self._candidate: _Stamps | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._retiring: set[Orchestrator] = set()
        self._signal = False
        # A SIGHUP caught before ``start`` (``catch_sighup``): performed once started.
        self._early = False
        self._sighup_pending = False
        # For /metrics: reloads done and refused since start, and whether the latest attempt was refused (the file
        # on disk is not what is serving: the alert to watch for).
        self.reloaded = 0
        self.refused = 0
        self.last_refused = False

    def watch(self, config: RouterConfig) -> None:
        """Stamp what building ``config`` (the file's, as first read) reads; call it before that build, so a
        ``moe train`` publishing while the service starts is reloaded once it runs."""
        stamps = self._stamps(config_inputs(config))
        self._inputs = tuple(stamps)
        self._seen = {self.path: self._seen.get(self.path), **stamps}

    def bind(self, holder: Any, on_swap: Callable[[Orchestrator, Orchestrator], None] | None = None) -> None:
        """Where the live orchestrator is held; ``on_swap(old, new)`` runs right after each swap. Without an
        earlier ``watch``, the held orchestrator's config is watched from now on."""
        self.holder, self.on_swap = holder, on_swap
        config = getattr(getattr(holder, "orchestrator", None), "config", None)
        if not self._inputs and isinstance(config, RouterConfig):  # a config's build reads its gate at least
            self.watch(config)

    # -- the reload itself ------------------------------------------------------------------------------------
    async def reload(self) -> Orchestrator:
        """Validate, build and swap in the file's config; ``ReloadFailed`` leaves the old one running."""
        if self.holder is None:
            raise RuntimeError("Reloader.bind was not called")
        async with self._lock:
            # Stamped before reading: a write racing the read changes the stamp again and is picked up next.
            before = self._seen = self._stamp()
            self._candidate = None
            try:
                new, commits = await self._load_or_refuse()
            except ReloadFailed as exc:
                self.refused += 1
                self.last_refused = True
                if self._candidate is not None:  # the refused config's inputs are watched too, from their stamps
                    self._inputs = tuple(dict.fromkeys((*self._inputs, *self._candidate)))
                    self._seen = {**self._candidate, **before}
                log.error("%s", exc, exc_info=_shortened(exc.unexpected))
                raise
            old: Orchestrator = self.holder.orchestrator
            commits.apply()  # what the build keeps in the shared state, from now on: it serves
            reset_changed_breakers(old.config, new.config, new.breakers)
            self.holder.orchestrator = new
            # What the new config reads, as stamped before its build read it.
            candidate: _Stamps = self._candidate or {}
            self._inputs = tuple(candidate)
            self._seen = {self.path: before.get(self.path), **candidate}
            if self.on_swap is not None:
                self.on_swap(old, new)
            self._retire(old)
            self.reloaded += 1
            self.last_refused = False
            log.info("config reloaded from %s: experts %s", self.path, ", ".join(new.config.expert_names))
            return new

    async def _load_or_refuse(self) -> tuple[Orchestrator, BuildCommits]:
        """The new orchestrator, built off the loop, and what its build keeps in the shared state (applied at the
        swap); ``ReloadFailed`` naming every problem otherwise. An orchestrator built for a file refused for
        something else (a restart-only change) is closed unserved, its commits dropped."""
        try:
            built, commits, problems, unexpected = await asyncio.to_thread(self._load)
        except Exception as exc:  # pragma: no cover - ``_load`` turns errors into problems; a bug of ours
            raise ReloadFailed(str(self.path), [self._problem("<reload>", exc)], unexpected=exc) from exc
        if built is not None and not problems:
            return built, commits
        if built is not None:
            await built.aclose()
        del built, commits  # not kept alive by the refusal's traceback (this frame): its encoders go now
        raise ReloadFailed(str(self.path), problems, unexpected=unexpected)

    def _load(self) -> tuple[Orchestrator | None, BuildCommits, list[tuple[str, str]], BaseException | None]:
        """The file read, checked and built (in a worker thread): the orchestrator (None when the build failed or
        never ran), what its build keeps in the shared state, every problem found, and the unexpected error among
        them, if any (for its traceback). The schema's problems come alone: nothing is built from such a file.
        The others, a change only a restart applies and what the build refuses, come together."""
        commits = BuildCommits()
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            return None, commits, self._failed(exc), None
        except Exception as exc:  # anything else loading raises (a bug of ours): refused too
            return None, commits, [self._problem("<load>", exc)], exc
        try:
            self._candidate = self._stamps(config_inputs(config))
            problems = restart_only_changes(self.holder.orchestrator.config, config)
        except Exception as exc:  # pragma: no cover - both only compare and stat; a bug of ours
            return None, commits, [self._problem("<load>", exc)], exc
        try:
            with deferred_commits() as commits:
                return self.build(config), commits, problems, None
        except ConfigError as exc:  # the file of a router nested in this one
            return None, commits, problems + self._failed(exc), None
        except Exception as exc:
            # The gate artifact, its two-stage part, the vote weights: named by their key (``load_problem``).
            # Anything else that stops the build (an expert's class, say) must not reach the running service
            # either: it is reported as one more problem, with its type, and its traceback logged.
            found = load_problem(exc)
            if found is not None:
                # A nested router's: named under the nesting expert's key, with its file, as moe config check
                # names it (not as this config's gate.artifact, with this config to train).
                with contextlib.suppress(Exception):
                    nested = nested_loading_problems(config) if nested_failure(exc) else []
                    if nested:
                        return None, commits, [*problems, *nested], None
                return None, commits, [*problems, (found[0], self._told(exc))], None
            return None, commits, [*problems, self._problem("<build>", exc)], exc

    def _failed(self, exc: ConfigError) -> list[tuple[str, str]]:
        where = "" if exc.source == str(self.path) else f"{exc.source}: "
        return [(f"{where}{p}", m) for p, m in exc.problems]

    def _problem(self, where: str, exc: BaseException) -> tuple[str, str]:
        """An error no config check names, as a problem: its type and message, credentials in URLs redacted."""
        return where, f"{type(exc).__name__}: {redact(self._told(exc))}"

    def _told(self, exc: BaseException) -> str:
        return naming_config(exc, str(self.path))

    def _retire(self, old: Orchestrator) -> None:
        self._retiring.add(old)
        self._spawn(self._close_when_drained(old))

    async def _close_when_drained(self, old: Orchestrator) -> None:
        # A request counts as open from before its body is read (service.body_timeout_s) to its deadline.
        limit = old.config.service.body_timeout_s + old.config.fallback.deadline_s + _DRAIN_MARGIN_S
        try:
            await asyncio.wait_for(old.drained(), limit)
        except TimeoutError:
            log.warning("closing the previous config's orchestrator with %d request(s) still open after %.0fs",
                        old.active, limit)
        finally:
            self._retiring.discard(old)
            await old.aclose()

    # -- triggers ---------------------------------------------------------------------------------------------
    def _stamp(self) -> _Stamps:
        return self._stamps((self.path, *self._inputs))

    @staticmethod
    def _stamps(paths: Iterable[Path]) -> _Stamps:
        stamps: _Stamps = {}
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                stamps[path] = None
            else:
                stamps[path] = stat.st_mtime_ns, stat.st_size, stat.st_ino  # a rename over it changes the inode
        return stamps

    def changed(self) -> list[Path]:
        """The watched files that differ from the ones last read (a missing file is no change: editors replace
        files, and an artifact not trained yet has none); empty when none does."""
        return [path for path, stamp in self._stamp().items() if stamp is not None and stamp != self._seen.get(path)]

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ReloadFailed:  # already logged; the old config keeps serving
            pass
        except Exception:  # pragma: no cover - past the build (the swap's own work): logged; the trigger lives on
            log.exception("config reload from %s failed", self.path)

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            changed = self.changed()
            if changed:
                log.info("reloading: %s changed", ", ".join(map(str, changed)))
                await self._reload_logged()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def catch_sighup(self, received: Sequence[object] = ()) -> None:
        """From now until ``start``, and again after ``stop``, a SIGHUP is remembered instead of ending the process
        (its default action): ``moe serve`` calls it before it builds, and ``start`` reloads for one that came
        meanwhile. ``received``: what a stand-in handler installed earlier caught (not empty: one came). From the
        main thread only; elsewhere, or where there is no SIGHUP (Windows), it does nothing."""
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None:  # pragma: no cover - Windows
            return
        try:
            signal.signal(sighup, self._sighup_early)
        except ValueError:  # not the main thread
            return
        self._early = True
        if received:  # read once the handler is ours: one arriving in between is caught by it
            self._sighup_pending = True

    def _sighup_early(self, signum: int, frame: FrameType | None) -> None:
        self._sighup_pending = True

    def start(self) -> None:
        """Start the mtime watch and the SIGHUP handler (in the running loop); reload at once for a SIGHUP that
        came while the service started (``catch_sighup``)."""
        if self.poll_s:
            self._spawn(self._poll(self.poll_s))
        if self.sighup:
            loop = asyncio.get_running_loop()
            try:
                loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._reload_logged()))
                self._signal = True
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                log.warning("SIGHUP reload unavailable here; use POST /admin/reload or a file change")
        if self._sighup_pending:
            self._sighup_pending = False
            log.info("reloading: SIGHUP came while the service started")
            self._spawn(self._reload_logged())

    async def stop(self) -> None:
        """Stop watching, and close every orchestrator still draining."""
        if self._signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)  # back to the default action: ending
            self._signal = False
            if self._early:  # while the service shuts down, a SIGHUP is still no reason to die
                self.catch_sighup()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        retiring, self._retiring = list(self._retiring), set()
        await asyncio.gather(*(o.aclose() for o in retiring), return_exceptions=True)
