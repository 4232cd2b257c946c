"""``LocalRouter``: the router in-process, built from a config file, with ``AsyncClient``'s methods and results.

It checks a request with the service's own checks (``router.requests``), so a bad one fails the same way in
process, with the ``RouterAPIError`` the service's answer would give; and it never imports FastAPI.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.errors import retry_after_header
from router.fallback import CallScope
from router.feedback import (
    FeedbackRecord,
    FeedbackStore,
)
from router.requests import (
    FEEDBACK_FAILURES,
    RequestProblem,
    check_combiner,
    feedback_off,
    feedback_problem,
    json_body,
    parse_chat,
    parse_feedback,
    parse_route,
    parse_route_batch,
)
from router.trace import RoutedAnswer, RouteDecision

if TYPE_CHECKING:
    pass
from router.sdk_protocol import BaseClient
from router.sdk_types import ChatResult, Messages, RouterAPIError, StreamChunk

__all__ = ["LocalRouter"]


@contextlib.contextmanager
def _as_api_errors(*, retry_after: bool = True) -> Iterator[None]:
    """The orchestrator's failures as the ``RouterAPIError`` the service's answer would raise in ``Client``, so
    one ``except`` covers both: every expert failed (503, or 400 when each refused the request), an unknown
    model (404), a capability no expert declares (400)."""
    from router.fallback import AllExpertsFailed
    from router.orchestrator import NoCapableExpert, UnknownExpert

    try:
        yield
    except AllExpertsFailed as exc:
        # The Retry-After the service would send with it (``retry_after``: an answer, not a stream's error event),
        # so ``retry_after_s`` reads the same in process.
        raise RouterAPIError(exc.status, exc.error_body(),
                             retry_after_header(exc.retry_after_s if retry_after else None)) from exc
    except FEEDBACK_FAILURES as exc:  # a feedback store's refusal, as the service answers it
        problem = feedback_problem(exc)
        raise RouterAPIError(problem.status, problem.error_body()) from exc
    except (UnknownExpert, NoCapableExpert, RequestProblem) as exc:
        raise RouterAPIError(exc.status, exc.error_body()) from exc


class LocalRouter:
    """The router in-process, built from a config file: no service, same results.

    Every method fails as ``Client``'s would, with the ``RouterAPIError`` the service's answer would give (400
    for a bad request or an unknown combiner, 503 or 400 when every expert failed, 404 for an unknown model). With
    a feedback store, answers are remembered and ``feedback`` writes to the store directly, its errors the
    service's too (400 for a bad verdict or an unknown expert, 404 for an unknown answer id).

    ``aclose`` (or leaving ``async with``) closes it for good: any later call, or a second ``async with``, is a
    ``RuntimeError``; build a new one.
    """

    def __init__(self, orchestrator: Any, feedback: FeedbackStore | None = None) -> None:
        self.orchestrator = orchestrator
        self.store = feedback
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LocalRouter is closed (aclose, or the end of its async with); create a new one, "
                               "e.g. LocalRouter.from_config(...)")

    def _chat_body(self, messages: Messages, model: str, stream: bool, params: dict[str, Any]) -> dict[str, Any]:
        """``BaseClient.chat_body``, refusing ``timeout=``: in process there is no HTTP request for it to time (each
        expert's calls are timed by its config's ``timeout_s``), and sent on it would reach the experts as a
        request field."""
        self._check_open()
        if "timeout" in params:
            method = "stream" if stream else "chat"
            raise TypeError(f"LocalRouter.{method}() takes no timeout= argument (got timeout={params['timeout']!r}):"
                            " there is no HTTP request to time out in process, and each expert's calls are timed by "
                            "its config's timeout_s; for a deadline on the whole call, pass deadline_s=")
        return BaseClient.chat_body(messages, model, stream, params, "LocalRouter")

    @classmethod
    def from_config(cls, path: str | Path) -> LocalRouter:
        from router.build import build_orchestrator
        from router.config import load_config
        from router.feedback import open_feedback_store

        config = load_config(path)
        return cls(build_orchestrator(config), open_feedback_store(config))

    async def chat(self, messages: Messages, *, model: str = "auto", combiner: str | None = None,
                   deadline_s: float | None = None, budget_usd: float | None = None, **params: Any) -> ChatResult:
        body = self._chat_body(messages, model, False, params)
        limits = CallScope.limiting(deadline_s, budget_usd)  # a ValueError naming it, as the clients raise
        # A bad request, and an unknown strategy (before the gate runs), fail as the service's answer would.
        with _as_api_errors():
            request = parse_chat(json_body(body), self.orchestrator.config.service.max_prompt_chars)
            strategy = check_combiner(combiner, self.orchestrator)
            answer: RoutedAnswer = await self.orchestrator.complete(request, strategy=strategy, caller=limits)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        if self.store is not None:  # the expert a verdict on it rates, as the service remembers it
            await self.store.aremember(response_id, request.query_text(), answer.trace.credited(answer.expert))
        return ChatResult(id=response_id, content=answer.content, expert=answer.expert,
                          finish_reason=answer.finish_reason, usage=answer.trace.usage,
                          cost_usd=answer.trace.cost_usd, tool_calls=answer.tool_calls, refusal=answer.refusal,
                          logprobs=answer.logprobs, reasoning_content=answer.reasoning_content, trace=answer.trace)

    def stream(self, messages: Messages, *, model: str = "auto", combiner: str | None = None,
               deadline_s: float | None = None, budget_usd: float | None = None,
               **params: Any) -> AsyncIterator[StreamChunk]:
        """``AsyncClient.stream``, in process: the same chunks (the last with ``finish_reason`` and the trace),
        the same fallback and mid-stream continuation, and the same ``RouterAPIError``s, whether the stream fails
        before its first chunk or after. A stream= among ``params`` is refused here, before anything runs."""
        body = self._chat_body(messages, model, True, params)
        CallScope.limiting(deadline_s, budget_usd)  # a limit out of range is refused now, not once iterated
        return self._stream(body, combiner, (deadline_s, budget_usd))

    async def _stream(self, body: dict[str, Any], combiner: str | None,
                      given: tuple[float | None, float | None]) -> AsyncIterator[StreamChunk]:
        from router.orchestrator import StreamEnd

        self._check_open()
        with _as_api_errors():
            request = parse_chat(json_body(body), self.orchestrator.config.service.max_prompt_chars)
            check_combiner(combiner, self.orchestrator, stream=True)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        limits = CallScope.limiting(*given)  # counted from when the stream starts, as the service counts them
        async with contextlib.aclosing(self.orchestrator.stream(request, caller=limits)) as events:
            # A failure before the first chunk is the service's error answer, its Retry-After included; one after
            # it is the service's error event, which carries no headers.
            with _as_api_errors():
                event = await anext(events, None)
            began = None if event is None else (
                event.expert if not isinstance(event, StreamEnd) else event.trace.answered_by)
            if self.store is not None and began:  # ratable from its first chunk on, as the service's streams
                await self.store.aremember(response_id, request.query_text(), began)
            with _as_api_errors(retry_after=False):
                while event is not None:
                    if isinstance(event, StreamEnd):
                        expert = event.trace.answered_by or ""
                        credited = event.trace.credited(expert)
                        if self.store is not None and credited and credited != began:
                            await self.store.aremember(response_id, request.query_text(), credited)
                        yield StreamChunk(id=response_id, expert=expert, finish_reason=event.finish_reason,
                                          trace=event.trace)
                    else:
                        delta = event.delta
                        yield StreamChunk(id=response_id, content=delta.content, expert=event.expert,
                                          tool_calls=delta.tool_calls, refusal=delta.refusal,
                                          reasoning_content=delta.reasoning_content, logprobs=delta.logprobs)
                    event = await anext(events, None)

    async def route(self, query: str) -> RouteDecision:
        """``Client.route``, in process: the same checks (a blank or oversized query is a 400)."""
        self._check_open()
        with _as_api_errors():
            request = parse_route(json_body({"query": query}), self.orchestrator.config.service.max_prompt_chars)
        decision: RouteDecision = await self.orchestrator.decide(request)
        return decision

    async def route_batch(self, queries: Sequence[str], capacity: Mapping[str, int] | None = None) -> list[str]:
        """``Client.route_batch``, in process: the same checks (unknown experts in ``capacity``, negative room,
        blank or oversized queries are 400s)."""
        self._check_open()
        config = self.orchestrator.config
        with _as_api_errors():
            batch = parse_route_batch(json_body(BaseClient.route_batch_body(queries, capacity)),
                                      config.service.max_prompt_chars,
                                      config.expert_names, config.service.max_batch_queries)
        return await self.orchestrator.assign(batch.queries, batch.capacity)

    async def feedback(self, *, request_id: str | None = None, query: str | None = None, expert: str | None = None,
                       good: bool | None = None, score: float | None = None,
                       note: str | None = None) -> FeedbackRecord:
        self._check_open()
        with _as_api_errors():
            # In the service's order: the verdict checked first, then whether a store takes it.
            body = parse_feedback(json_body(BaseClient.feedback_body(request_id, query, expert, good, score, note)),
                                  self.orchestrator.config.service.max_prompt_chars)
            if self.store is None:
                raise feedback_off()
            return await self.store.asubmit(body, self.orchestrator.config.expert_names)

    async def aclose(self) -> None:
        """Close the experts' connections and the feedback store; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        await self.orchestrator.aclose()
        if self.store is not None:
            await self.store.aclose()

    async def __aenter__(self) -> LocalRouter:
        self._check_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

