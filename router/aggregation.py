"""A combiner's model call: ``fuse``'s aggregator, or ``escalate``'s expert, asked through the dispatcher."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from experts.errors import ExpertConfigError, ExpertError
from experts.types import ChatMessage, ChatRequest, ExpertReply
from router.combine import EmptyAnswer
from router.decide import needed_capabilities
from router.dispatch import Dispatcher
from router.fallback import Deadline
from router.trace import AttemptRole, Trace

__all__ = ["Aggregation", "aggregation_request"]


class Aggregation:
    """A combiner's one model call (``fuse``'s aggregator, ``escalate``'s expert): that expert asked through the
    dispatcher, so its breaker, in-flight limit, time limit and retries apply, within the request's deadline and
    cost budget. ``reply`` is its reply once it answered."""

    def __init__(self, dispatch: Dispatcher, expert: str | None, request: ChatRequest, deadline: Deadline,
                 trace: Trace, role: AttemptRole = "aggregate", *,
                 unable: Callable[[ChatRequest], Collection[str]] = lambda _: (),
                 failed: Mapping[str, ExpertError] | None = None) -> None:
        """``unable``: the experts that cannot serve a request (``Decider.unable``); ``failed``: the experts whose
        call with the client's request already failed, and the error each gave."""
        self.dispatch, self.expert, self.request = dispatch, expert, request
        self.deadline, self.trace, self.role = deadline, trace, role
        self.unable, self.failed = unable, dict(failed or {})
        self.reply: ExpertReply | None = None

    async def __call__(self, messages: list[ChatMessage] | None) -> str:
        """Ask with ``messages``, or with the client's own messages when None. Raises the ``ExpertError`` that
        stands in for the answer when there is none to use: the call failed, would not fit the cost budget, the
        expert lacks a capability the request needs (an image, and it does not declare ``vision``), it already
        failed the client's own request (asking again would be a retry ``fallback.retries`` did not allow), or it
        answered with no text."""
        if self.expert is None:
            raise ExpertConfigError("combiner", "no aggregator expert is configured")
        # Asked with the client's own request (escalate), it is that request whole, tools included: the expert
        # answers as the panel was asked to, a tool call being one answer; so the capabilities it needs are the
        # request's. Fuse's aggregator gets its prompt, without the tools (it writes an answer from the panel's).
        request = (self.request.model_copy(update={"stream": False}) if messages is None
                   else aggregation_request(self.request, messages))
        if messages is None and self.expert in self.failed:
            raise self.failed[self.expert]
        if self.expert in self.unable(request):
            needs = " and ".join(repr(n) for n in needed_capabilities(request))
            raise ExpertConfigError(self.expert, f"not asked: the request needs the {needs} capability, which this "
                                                 "expert does not declare")
        spent = self.dispatch.over_budget(self.expert, self.trace, request, self.deadline)
        if spent is not None:
            raise spent
        result = await self.dispatch.call(self.expert, 0.0, request, self.deadline, self.trace, role=self.role)
        if isinstance(result, ExpertError):
            raise result
        if not result.content.strip() and result.refusal is None and not result.tool_calls:
            raise EmptyAnswer(self.expert, "answered with no text")
        self.reply = result
        return result.content


def aggregation_request(request: ChatRequest, messages: list[ChatMessage]) -> ChatRequest:
    """The aggregator's request: the fuse prompt, with the client's sampling settings and without its tools (the
    aggregator writes an answer; None drops a field from the upstream body)."""
    return request.model_copy(update={"messages": messages, "stream": False, "tools": None, "tool_choice": None,
                                      "parallel_tool_calls": None})
