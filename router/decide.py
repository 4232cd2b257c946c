"""The gate's decisions for the orchestrator: which experts a query goes to, and with what weights.

Apart from the orchestrator, which answers (dispatch, fallback, combining), because deciding is its own job with
its own state: the gate, the batcher that embeds concurrent queries together in one worker thread, and the reads
of the breakers and in-flight counts that keep an expert off a panel. ``Orchestrator.decide``, ``decide_sync``,
``assign`` and ``assign_batch`` are this class's.

``decide`` hands the query to a ``GateBatcher`` (``router.batching``), which in one batch embeds the queries,
scores them and finds each one's nearest training examples (one faiss search): the explanation in the decision,
and the out-of-distribution score that abstain compares with the gate's threshold. The top-k choice runs back on
the event loop (pure, microseconds), where the breakers live.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from experts.types import ChatRequest
from router.assign import expert_choice
from router.batching import GateBatcher
from router.breaker import Breakers
from router.config import ExpertConfig, RouterConfig
from router.dispatch import Capacity
from router.errors import error_body
from router.gate import Assessment, EncoderLike
from router.topk import capped, choose, rank
from router.trace import RouteDecision, WeightedExpert

__all__ = ["BATCH_CHUNK", "Decider", "EncoderLike", "GateLike", "NoCapableExpert", "needed_capabilities"]


class GateLike(Protocol):
    """What the orchestrator needs of a gate: its assessment of queries (a probability per expert, the examples
    behind it, a familiarity score) and the threshold below which it abstains. ``router.gate.BaseGate`` builds
    ``assess`` on two methods; a two-stage gate (``router.cascade``) assesses for itself."""

    experts: list[str]

    @property
    def encoder(self) -> EncoderLike: ...

    @property
    def ood_threshold(self) -> float | None: ...

    @property
    def private_texts(self) -> frozenset[str]: ...

    def assess(self, texts: Sequence[str], k: int = 3) -> Assessment: ...


# Queries a batch's assessment takes at a time (``Decider.assign``): a caller that leaves stops its batch within one.
BATCH_CHUNK = 64

_NEED_REASONS = {"tools": "carries tools", "vision": "holds an image", "stream": "is streamed (stream: true)"}
_NEED_PARAMS = {"tools": "tools", "vision": "messages", "stream": "stream"}


def needed_capabilities(request: ChatRequest) -> list[str]:
    """The capabilities an expert must declare to serve ``request``, beyond chat: ``tools``, ``vision``, and
    ``stream`` for a streamed request (an expert declared without it serves only whole answers)."""
    # Tools with tool_choice "none" are offered, never called: the request is sent without them to an expert
    # that takes no tools (``router.dispatch``).
    needs = ["tools"] if request.tools and (request.model_extra or {}).get("tool_choice") != "none" else []
    if any(m.has_image() for m in request.messages):
        needs.append("vision")
    if request.stream:
        needs.append("stream")
    return needs


def blocking_capabilities(request: ChatRequest, experts: Sequence[ExpertConfig]) -> list[str]:
    """The capabilities to name when none of ``experts`` can serve ``request``: all it needs, ``stream`` only when
    it is part of what stops them (a streamed request with tools that no expert takes is refused for its tools)."""
    needs = needed_capabilities(request)
    rest = [n for n in needs if n != "stream"]
    if "stream" in needs and rest and not any(set(rest) <= set(e.capabilities) for e in experts):
        return rest
    return needs


class NoCapableExpert(ValueError):
    """The request needs capabilities (``tools`` when it carries tools, ``vision`` when a message holds an image,
    ``stream`` when it is streamed) that no expert it may go to declares. ``capability`` names them
    (``tools+vision`` for both); ``param`` is the request field that needs the first, and ``code`` the error code
    the service (and LocalRouter) report."""

    status = 400

    def __init__(self, needs: Sequence[str], model: str, capable: Sequence[str]) -> None:
        self.capability, self.model, self.capable = "+".join(needs), model, list(capable)
        self.param = _NEED_PARAMS[needs[0]] if needs else "messages"
        self.code = f"{self.capability}_not_supported"
        named = " and ".join(repr(n) for n in needs)
        where = f"expert {model!r} does not" if capable else "no configured expert does"
        also = f"; experts that do: {', '.join(capable)}" if capable else ""
        why = " and ".join(_NEED_REASONS[n] for n in needs)
        super().__init__(f"the request {why}, so it needs the {named} capabilit{'ies' if len(needs) > 1 else 'y'}, "
                         f"but {where} declare {'them' if len(needs) > 1 else 'it'}{also}")

    def error_body(self) -> dict[str, Any]:
        return error_body(str(self), "invalid_request_error", self.code, self.param)


class Decider:
    """Decisions over the experts in ``served``, with the orchestrator's breakers and in-flight counts."""

    def __init__(self, config: RouterConfig, gate: GateLike, served: Collection[str], breakers: Breakers,
                 capacity: Capacity) -> None:
        self.config = config
        self.gate = gate
        self.served = frozenset(served)
        self.breakers = breakers
        self.capacity = capacity
        # The batcher calls back into this decider through a weak reference: a bound method would make a cycle
        # (decider -> batcher -> method -> decider) that only the cyclic GC frees, and a retired orchestrator's
        # gate and encoder (onnxruntime memory the GC does not see) would outlive it until a collection ran.
        self.batcher: GateBatcher[_Gated] = GateBatcher(_weak_work(self), window_ms=config.gate.batch_window_ms,
                                                        max_batch=config.gate.max_batch)
        self._batch_pool: concurrent.futures.ThreadPoolExecutor | None = None  # ``assign``'s worker
        self._batches = 0  # ``assign`` calls under way
        self._batch_closing = False  # ``aclose`` came while some were: the last one stops the thread
        self._batch_lock = threading.Lock()

    def _assess(self, texts: Sequence[str], k: int = 3) -> tuple[Assessment, list[int], list[str]]:
        """The gate's assessment of ``texts`` (``k`` nearest examples each; 0: probabilities alone), and the
        columns and names of the served experts in it."""
        assessment = self.gate.assess(texts, k)
        columns = [i for i, n in enumerate(self.gate.experts) if n in self.served]
        return assessment, columns, [self.gate.experts[i] for i in columns]

    def _gate_batch(self, texts: list[str]) -> list[_Gated]:
        """The gate's work for a batch of queries, in the batcher's worker: one embedding per query serves the
        scores, the explanation and the OOD score."""
        a, columns, names = self._assess(texts)
        stages: list[str | None] = list(a.stage) if a.stage else [None] * len(texts)
        tasks: list[dict[str, float] | None] = list(a.tasks) if a.tasks else [None] * len(texts)
        private = self.gate.private_texts
        return [_Gated({n: float(p) for n, p in zip(names, row, strict=True)}, [_shown(n, private) for n in near],
                       score, threshold, stage, task)
                for row, near, (score, threshold), stage, task in zip(a.probs[:, columns], a.nearest,
                                                                      self._familiarity(a), stages, tasks,
                                                                      strict=True)]

    def _familiarity(self, a: Assessment) -> list[tuple[float | None, float | None]]:
        """Each query's familiarity (None where unknown) and the threshold abstain holds it to."""
        thresholds = a.ood_threshold or [self.gate.ood_threshold] * len(a.ood)
        return [(None if np.isnan(score) else float(score), threshold)
                for score, threshold in zip(a.ood, thresholds, strict=True)]

    def _decision(self, gated: _Gated, exclude: Collection[str], start: float) -> RouteDecision:
        """Top-k (or abstain) from one query's gate output; experts in ``exclude`` stay off the panel."""
        scores = gated.scores
        excluded = frozenset({*self.breakers.refusing(scores), *exclude})
        default = self._abstain_to(gated.ood, gated.ood_threshold, excluded)
        if default is not None:
            panel = [(default, 1.0)]
        else:
            try:
                panel = choose(scores, self.config.gate.top_k, exclude=excluded)
            except ValueError:
                panel = []  # every breaker is open: the orchestrator reports each as a cause
            panel = capped(panel, self.config.fallback.max_attempts)
        return RouteDecision(
            scores=scores,
            ranking=[n for n, _ in rank(scores)],
            chosen=[WeightedExpert(expert=n, weight=w) for n, w in panel],
            policy=self.config.gate.top_k.policy,
            abstained=default is not None,
            ood_score=gated.ood,
            nearest=gated.nearest,
            stage=gated.stage,
            tasks=gated.tasks,
            gate_ms=(time.perf_counter() - start) * 1000.0,
        )

    def _abstain_to(self, ood: float | None, threshold: float | None, excluded: frozenset[str]) -> str | None:
        """The default expert when the query is out of distribution and the default can take it (served, not in
        ``excluded``, its breaker closed: one the gate does not score, ``routed: false``, is in no panel's
        exclusions), else None."""
        default = self.config.gate.default_expert
        if default is None or threshold is None or ood is None or ood >= threshold:
            return None
        if default not in self.served or default in excluded or self.breakers.refuses(default):
            return None
        return default

    def decide_sync(self, text: str, exclude: Collection[str] = ()) -> RouteDecision:
        """The gate's decision, computed on the calling thread (no batching)."""
        start = time.perf_counter()
        return self._decision(self._gate_batch([text])[0], exclude, start)

    async def decide(self, request: ChatRequest) -> RouteDecision:
        # The encoder is CPU work: the batcher runs it off the event loop, one batch for concurrent requests.
        start = time.perf_counter()
        unable = self.unable(request)
        if unable and len(unable) == len(self.config.experts):  # /v1/route answers as a chat request would
            raise NoCapableExpert(blocking_capabilities(request, self.config.experts), request.model, [])
        gated = await self.batcher.submit(request.query_text())
        return self._decision(gated, unable, start)

    def unable(self, request: ChatRequest) -> set[str]:
        """Experts that cannot serve ``request``: without a capability it needs (``needed_capabilities``)."""
        needs = set(needed_capabilities(request))
        if not needs:
            return set()
        return {e.name for e in self.config.experts if not needs <= set(e.capabilities)}

    def assign_batch(self, queries: Sequence[str], capacity: Mapping[str, int] | None = None) -> list[str]:
        """Expert-choice routing for a batch: each expert takes the queries it scores highest, up to its room:
        ``capacity``'s figure for the experts it names, its free in-flight slots for the rest; an open breaker has
        none. A query no expert had room for goes to its best-scoring expert whose breaker is not open (its own
        best when every breaker is open), not to one known to refuse it. A query the gate abstains on goes to
        ``gate.default_expert``, as one request would (taking of its room), when that expert can take it."""
        if not queries:
            return []
        assessment, columns, names = self._assess(queries, k=self._batch_neighbours())
        return self._share(assessment, columns, names, capacity)

    def _batch_neighbours(self) -> int:
        # No explanation, only who takes which: the nearest example alone, for the familiarity abstain reads.
        return 0 if self.config.gate.default_expert is None else 1

    def _share(self, assessment: Assessment, columns: list[int], names: list[str],
               capacity: Mapping[str, int] | None) -> list[str]:
        """``assign_batch``'s choice, from the gate's assessment of the batch: the breakers' and in-flight counts'
        state is read now, after the gate's work."""
        default = self.config.gate.default_expert
        probs = assessment.probs[:, columns]
        refusing = self.breakers.refusing(names)
        given = dict(capacity or {})
        room = {n: 0 if n in refusing else given.get(n, self.capacity.free(n)) for n in names}
        excluded = frozenset(refusing)
        assigned = [self._abstain_to(ood, threshold, excluded) for ood, threshold in self._familiarity(assessment)]
        rest = [i for i, a in enumerate(assigned) if a is None]
        if default in room:
            room[default] = max(0, room[default] - (len(assigned) - len(rest)))
        chosen = expert_choice(probs[rest], names, room) if rest else []
        closed = np.array([n not in refusing for n in names])
        best = np.where(closed, probs, -np.inf) if closed.any() else probs
        for i, c in zip(rest, chosen, strict=True):
            assigned[i] = c if c is not None else names[int(np.argmax(best[i]))]
        return [a for a in assigned if a is not None]

    async def assign(self, queries: Sequence[str], capacity: Mapping[str, int] | None = None) -> list[str]:
        """``assign_batch`` off the event loop. The gate assesses the batch ``BATCH_CHUNK`` queries at a time, on
        a worker thread of the batches' own: concurrent batches take turns there, rather than filling the default
        threads every answer needs (remembering it for feedback) and leaving the gate's own worker free for single
        queries; and a caller that goes away stops its batch at the next chunk. The experts then choose over the
        whole batch, on the event loop, where the breakers are."""
        texts = list(queries)
        if not texts:
            return []
        loop, k = asyncio.get_running_loop(), self._batch_neighbours()
        pool = self._batch_begun()
        try:
            parts = [await loop.run_in_executor(pool, self._assess, texts[i:i + BATCH_CHUNK], k)
                     for i in range(0, len(texts), BATCH_CHUNK)]
        finally:
            self._batch_ended(pool)
        _, columns, names = parts[0]
        return self._share(Assessment.joined([a for a, _, _ in parts]), columns, names, capacity)

    def _batch_begun(self) -> concurrent.futures.ThreadPoolExecutor:
        """The batches' thread for one more batch: started on the first (and again after ``aclose``, as the
        batcher's is); a batch keeps the thread it began on to its end."""
        with self._batch_lock:
            if self._batch_pool is None:
                self._batch_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                         thread_name_prefix="moe-batch")
            self._batches += 1
            return self._batch_pool

    def _batch_ended(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        with self._batch_lock:
            self._batches -= 1
            last = self._batches == 0 and self._batch_closing
            if last:
                self._batch_pool, self._batch_closing = None, False
        if last:
            pool.shutdown(wait=False)

    async def aclose(self) -> None:
        # Batches under way finish (a reload retires this decider once its requests drained, or their time ran
        # out), and the last of them stops the thread; with none, it stops now.
        with self._batch_lock:
            pool = None if self._batches else self._batch_pool
            if pool is not None:
                self._batch_pool = None
            self._batch_closing = self._batches > 0
        if pool is not None:
            pool.shutdown(wait=False)
        await self.batcher.aclose()


def _weak_work(decider: Decider) -> Callable[[list[str]], list[_Gated]]:
    """``decider._gate_batch`` without a strong reference to ``decider``."""
    method = weakref.WeakMethod(decider._gate_batch)

    def work(texts: list[str]) -> list[_Gated]:
        gate_batch = method()
        if gate_batch is None:  # only a batch that outlived its orchestrator, whose caller is gone too
            raise RuntimeError("the orchestrator this gate batch belonged to was freed")
        return gate_batch(texts)

    return work


@dataclass(frozen=True)
class _Gated:
    """One query's gate output from the batch worker: scores over the served experts, nearest examples (as
    dicts, most similar first) and the OOD score (the top similarity; None when the gate has no examples)."""

    scores: dict[str, float]
    nearest: list[dict[str, Any]]
    ood: float | None
    ood_threshold: float | None = None  # what ``ood`` is compared with; None: never abstain
    stage: str | None = None  # the stage of a two-stage gate that decided
    tasks: dict[str, float] | None = None  # an outcome gate's task prior: the query's likeliest tasks


def _as_dict(neighbour: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(neighbour) and not isinstance(neighbour, type):
        return dataclasses.asdict(neighbour)
    return dict(neighbour)


def _shown(neighbour: Any, private: frozenset[str]) -> dict[str, Any]:
    """A nearest example as a decision shows it: an example only a client's feedback gave keeps its label and
    similarity, and its text (another client's query) is withheld, with ``source: feedback`` saying why."""
    shown = _as_dict(neighbour)
    if private and shown.get("text") in private:
        shown.update(text=None, source="feedback")
    return shown
