"""Streaming an answer: the top-weighted expert streams, and the fallback walk (``router.walk``) goes on from it.

A failure before the first token falls back invisibly. A failure mid-stream continues from the next expert,
which is shown the partial answer and asked to go on, within what is left of the client's token limit (the cost
budget prices that continuation, as sent); the switch is recorded in ``trace.switches`` and so in the stream's
final chunk (``moe.switches``), its ``to`` naming the expert that did continue (the next one in line may be
skipped or fail first). A stream that fails once part of a tool call, a refusal or an answer held to a format has
reached the client is not continued: see ``stream_answer``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from experts.errors import ExpertError
from experts.types import ChatMessage, ChatRequest
from router.dispatch import StreamOutcome, StreamPiece, skipped
from router.fallback import AllExpertsFailed
from router.trace import Contribution, Trace
from router.walk import Walk

__all__ = ["CONTINUE_PROMPT", "StreamEnd", "constrained", "continuation", "stream_answer"]

CONTINUE_PROMPT = "Continue your previous answer exactly where it stopped, without repeating any of it."


@dataclass
class StreamEnd:
    trace: Trace
    finish_reason: str


async def stream_answer(walk: Walk, order: Sequence[str], request: ChatRequest, start: float,
                        failed: Callable[[list[ExpertError], Trace, str | None], AllExpertsFailed],
                        ) -> AsyncGenerator[StreamPiece | StreamEnd, None]:
    """Stream ``request``'s answer from the experts in ``order``, one at a time, as ``walk`` allows. Ends with a
    ``StreamEnd``, or raises what ``failed`` makes of the causes (the trace and the reason fallback stopped)."""
    dispatch, deadline, trace, errors = walk.dispatch, walk.deadline, walk.trace, walk.errors
    sent: list[str] = []
    used = 0  # tokens of the client's limit the tries that broke off used (``tokens_used``)
    chars: dict[str, int] = {}  # characters each expert streamed to the client, in the order they streamed
    attempt_request = request  # after a mid-stream failure: the continuation of what was sent
    for i, name in enumerate(order):
        stop = walk.stop(first=not i)
        if stop is not None:
            errors.extend(stop.untried(order[i:]))
            raise failed(errors, trace, stop.reason)
        # Later tries are priced as sent: after a mid-stream failure, the continuation, whose prompt holds the
        # partial answer and whose token limit is only what is left of the client's.
        if not walk.affordable(name, attempt_request):
            continue
        outcome = StreamOutcome()
        async with aclosing(dispatch.stream(name, attempt_request, deadline, trace, walk.replaces)) as events:
            async for event in events:
                if isinstance(event, StreamOutcome):
                    outcome = event
                else:
                    if event.delta.reasoning_content and any(sent):
                        # Continuing an answer whose text the client already has: reasoning comes before the
                        # text, so the continuing expert's own is left out rather than sent after it.
                        event = StreamPiece(event.expert, replace(event.delta, reasoning_content=""))
                        if not event.delta.has_output():
                            continue
                    _continued_by(trace, name)
                    sent.append(event.delta.content)
                    chars[name] = chars.get(name, 0) + len(event.delta.content)
                    deadline.output_sent()  # a caller's limit for the first output is met
                    yield event
        if outcome.error is None:
            _continued_by(trace, name)
            yield _stream_end(trace, chars, name, start, outcome.finish_reason)
            return
        walk.failed(name, outcome.error)
        if skipped(outcome.error):
            continue
        structured = constrained(request) and any(sent)
        if outcome.tool_deltas or outcome.refusal_deltas or structured:
            # Part of a tool call (its id, name, argument fragments) reached the client. Another expert cannot
            # finish it: it would start a call of its own, whose deltas the client would merge into the
            # half-sent one, corrupting it. Nor a refusal: another expert would answer after it, or refuse in
            # its own words. Nor an answer held to a format (response_format's JSON, vLLM's guided decoding):
            # the next expert, held to it too, writes a whole object of its own after the half-sent one. The
            # stream ends here instead, with an error event that names the expert and the cause; the client
            # still has what was sent, and knows it is incomplete. (An earlier expert's would have ended it.)
            what = ("a tool call" if outcome.tool_deltas else "a refusal" if outcome.refusal_deltas
                    else "an answer held to a format (response_format)")
            raise failed(errors, trace, f"the stream from expert {name!r} broke off after part of {what} reached "
                                        f"the client; another expert cannot continue {what}, so the stream ends "
                                        "here")
        if outcome.sent:
            # Its text reached the client: the next expert continues it rather than starting over.
            used += _tokens_used(outcome)
            continued = continuation(request, sent, used)
            if continued is None:
                # It broke off after sending the whole token limit the client asked for: the answer is as long as
                # it may be, so it ends here, as a stream cut off by max_tokens would.
                yield _stream_end(trace, chars, name, start, "length")
                return
            attempt_request = continued
            trace.switches.append({"from": name, "after_chars": len("".join(sent)), "cause": outcome.error.kind})
    raise failed(errors, trace, None)


# vLLM's request fields that hold an answer to a grammar, besides OpenAI's response_format.
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


def constrained(request: ChatRequest) -> bool:
    """Whether ``request`` holds its answer to a format: ``response_format`` a JSON object or schema, or one of
    vLLM's guided-decoding fields. Such an answer cannot be spliced from two experts' halves."""
    extra = request.model_extra or {}
    fmt = extra.get("response_format")
    json_format = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
    return json_format or any(extra.get(key) is not None for key in _GUIDED)


def _streamed(chars: Mapping[str, int], last: str) -> list[Contribution]:
    """A streamed answer's contributions: each expert whose text reached the client, weighted by its share of
    the characters, in the order they streamed (the expert that finished it alone when nothing else was sent).
    Each agreed with the answer, since its text is part of it."""
    total = sum(chars.values())
    if total == 0:
        return [Contribution(expert=last, weight=1.0, agreed=True)]
    return [Contribution(expert=e, weight=n / total, agreed=True) for e, n in chars.items() if n]


def _continued_by(trace: Trace, name: str) -> None:
    """Name ``name`` as the expert that took over after the last mid-stream switch, once it has sent something
    or finished: the next expert in line may have been skipped or failed before it."""
    if trace.switches and "to" not in trace.switches[-1]:
        trace.switches[-1]["to"] = name


def _stream_end(trace: Trace, chars: dict[str, int], last: str, start: float, finish_reason: str) -> StreamEnd:
    """The end of a stream whose last piece came from ``last``: each expert's share of the text, and the time."""
    trace.contributions = _streamed(chars, last)
    trace.latency_ms = (time.perf_counter() - start) * 1000.0
    return StreamEnd(trace=trace, finish_reason=finish_reason)


def _tokens_used(outcome: StreamOutcome) -> int:
    """The tokens a try that broke off generated: its usage so far where the expert counted it (vLLM's running
    usage), else a token per delta it sent, an undercount where a server sends no delta for a token that
    completes no character."""
    if outcome.usage is not None and not outcome.usage_estimated:
        return max(outcome.usage.completion_tokens, outcome.deltas)
    return outcome.deltas


def continuation(request: ChatRequest, sent: Sequence[str], used: int) -> ChatRequest | None:
    """The request the next expert gets after a mid-stream failure: the partial answer (the content deltas
    ``sent``), then a request to go on. The client's token limit (``max_tokens``, ``max_completion_tokens``)
    covers the whole answer, so the continuation may write only what is left of it after the ``used`` tokens
    the broken tries generated (``_tokens_used``). None when nothing is left.

    A reasoning delta counts as a token (it is one, within the limit) but is no part of the answer: an expert
    that broke off while still reasoning sent no text, so the next one answers the request afresh, reasoning of
    its own included, rather than continuing an empty answer."""
    text = "".join(sent)
    messages = [*request.messages, ChatMessage(role="assistant", content=text),
                ChatMessage(role="user", content=CONTINUE_PROMPT)] if text else request.messages
    update: dict[str, Any] = {"messages": messages}
    for field in ("max_tokens", "max_completion_tokens"):
        limit = getattr(request, field)
        if limit is not None:
            if limit - used < 1:
                return None
            update[field] = limit - used
    # vLLM's min_tokens is a floor on the whole answer too: left as it was, it would exceed the smaller limit
    # (vLLM refuses that with a 400) and ask for more than the answer still needs.
    floor = (request.model_extra or {}).get("min_tokens")
    if isinstance(floor, int) and not isinstance(floor, bool):
        limits = [update[f] for f in ("max_tokens", "max_completion_tokens") if f in update]
        update["min_tokens"] = max(0, min([floor - used, *limits]))
    return request.model_copy(update=update)
