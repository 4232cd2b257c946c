import asyncio

import pytest

from experts.base import Expert
from experts.errors import ExpertServerError, ExpertUnavailable
from experts.types import ChatMessage, ChatRequest, ExpertReply
from router.combine import WeightedAnswer
from router.config import ExpertConfig, parse_config
from router.fallback import AllExpertsFailed
from router.orchestrator import Orchestrator, StreamEnd, StreamPiece, UnknownExpert
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

NAMES = ["math", "code", "law"]


def ask(text: str, model: str = "auto") -> ChatRequest:
    return ChatRequest(model=model, messages=[ChatMessage(role="user", content=text)])


def build(experts: dict[str, FakeExpert] | None = None, **overrides: object) -> Orchestrator:
    config = fake_config(NAMES, **overrides)
    built = {n: FakeExpert(config.expert(n)) for n in NAMES}
    built.update(experts or {})
    gate = FakeGate(NAMES, {"integral": [0.7, 0.2, 0.1], "python": [0.15, 0.8, 0.05]}, default=[0.2, 0.2, 0.6])
    return Orchestrator(config, gate, built)


async def test_routes_to_the_gate_top_choice_with_a_trace() -> None:
    answer = await build().complete(ask("solve this integral"))
    assert answer.expert == "math"
    assert answer.content == "answer from math"
    trace = answer.trace
    assert trace.decision is not None
    assert trace.decision.ranking == ["math", "code", "law"]
    assert trace.decision.scores["math"] == pytest.approx(0.7)
    assert [(a.expert, a.ok) for a in trace.attempts] == [("math", True)]
    assert trace.cost_usd == pytest.approx(0.001)
    assert trace.usage.total_tokens == 8


async def test_an_expert_named_directly_skips_the_gate() -> None:
    orch = build()
    answer = await orch.complete(ask("solve this integral", model="law"))
    assert answer.expert == "law"
    assert answer.trace.decision is None
    with pytest.raises(UnknownExpert, match="unknown model 'nope'"):
        await orch.complete(ask("x", model="nope"))


async def test_failure_falls_back_to_the_next_ranked_expert() -> None:
    config = fake_config(NAMES)
    dead = FakeExpert(config.expert("math"), fail=lambda n: ExpertUnavailable(n, "connection refused"))
    answer = await build({"math": dead}).complete(ask("solve this integral"))
    assert answer.expert == "code"  # second in the gate's ranking for this query, not a static list
    attempts = [(a.expert, a.ok, a.fallback_for) for a in answer.trace.attempts]
    assert attempts == [("math", False, None), ("code", True, "math")]
    assert answer.trace.attempts[0].error == {"expert": "math", "kind": "unavailable",
                                              "message": "connection refused"}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_the_expert_taking_over_from_a_saturated_one_names_it_plain_or_streamed(stream: bool) -> None:
    """A plain request's hand-off from a full expert named it in ``fallback_for``; a streamed one's left it empty,
    so the traces and logs hid every streamed saturation hand-off."""
    orch = build()
    for _ in range(orch.capacity.limits["math"]):
        orch.capacity.acquire("math")
    if stream:
        events = [e async for e in orch.stream(ask("solve this integral"))]
        end = events[-1]
        assert isinstance(end, StreamEnd)
        trace = end.trace
    else:
        trace = (await orch.complete(ask("solve this integral"))).trace
    assert [(a.expert, a.ok, (a.error or {}).get("kind"), a.fallback_for) for a in trace.attempts] == \
        [("math", False, "overloaded", None), ("code", True, None, "math")]


async def test_every_expert_down_lists_each_cause() -> None:
    config = fake_config(NAMES)
    down = {n: FakeExpert(config.expert(n), fail=lambda n: ExpertServerError(n, 503, "overloaded")) for n in NAMES}
    with pytest.raises(AllExpertsFailed) as info:
        await build(down).complete(ask("python please"))
    assert [c.expert for c in info.value.causes] == ["code", "math", "law"]
    assert {c["kind"] for c in info.value.to_list()} == {"server_error"}


async def test_slow_expert_times_out_and_the_next_answers() -> None:
    config = fake_config(NAMES)
    slow = FakeExpert(config.expert("code"), delay=5.0)
    answer = await build({"code": slow}).complete(ask("python please"))
    assert answer.expert == "math"
    assert answer.trace.attempts[0].error is not None
    assert answer.trace.attempts[0].error["kind"] == "timeout"
    assert 900 <= answer.trace.attempts[0].latency_ms < 2500  # timeout_s is 1.0 in the fake config


class FakeCountingExpert(FakeExpert):
    """A fake expert that records, in ``gauge``, how many of its peers' calls are in flight with its own."""

    def __init__(self, config: ExpertConfig, text: str, gauge: dict[str, int], delay: float) -> None:
        super().__init__(config, text, delay=delay)
        self.gauge = gauge

    async def generate(self, request: ChatRequest) -> ExpertReply:
        self.gauge["now"] += 1
        self.gauge["peak"] = max(self.gauge["peak"], self.gauge["now"])
        try:
            return await super().generate(request)
        finally:
            self.gauge["now"] -= 1


async def test_topk_panel_calls_concurrently_and_votes() -> None:
    config = fake_config(NAMES, gate={"top_k": {"policy": "fixed", "k": 3}}, combiner={"strategy": "vote"})
    gauge = {"now": 0, "peak": 0}
    experts: dict[str, Expert] = {
        "math": FakeCountingExpert(config.expert("math"), "The answer is (A).", gauge, delay=0.3),
        "code": FakeCountingExpert(config.expert("code"), "The answer is (B).", gauge, delay=0.3),
        "law": FakeCountingExpert(config.expert("law"), "Answer: B", gauge, delay=0.3),
    }
    gate = FakeGate(NAMES, {}, default=[0.45, 0.3, 0.25])
    orch = Orchestrator(config, gate, experts)
    answer = await orch.complete(ask("which letter?"))
    assert gauge["peak"] == 3  # the panel's three calls in flight at once, not one after another
    assert answer.content == "The answer is (B)."
    assert answer.trace.combiner == "vote"
    assert {c.expert: c.agreed for c in answer.trace.contributions} == {"math": False, "code": True, "law": True}
    top1 = await orch.complete(ask("which letter?"), strategy="top1")
    assert top1.expert == "math"


async def test_learned_vote_weights_outvote_the_gates_weights() -> None:
    config = fake_config(NAMES, gate={"top_k": {"policy": "fixed", "k": 3}},
                         combiner={"strategy": "vote", "vote_weights": "learned"})
    experts = {"math": FakeExpert(config.expert("math"), "The answer is (A)."),
               "code": FakeExpert(config.expert("code"), "The answer is (B)."),
               "law": FakeExpert(config.expert("law"), "Answer: B")}
    gate = FakeGate(NAMES, {}, default=[0.45, 0.3, 0.25])
    with pytest.raises(ValueError, match="no learned vote weights were given; train them with: moe train"):
        Orchestrator(config, gate, experts)
    # code and law err together (one learned weight between them); math alone outweighs both.
    orch = Orchestrator(config, gate, experts, vote_weights={"math": 1.2, "code": 0.5, "law": 0.1})
    answer = await orch.complete(ask("which letter?"))
    assert answer.content == "The answer is (A)." and answer.expert == "math"
    assert {c.expert: (round(c.weight, 6), c.agreed) for c in answer.trace.contributions} == {
        "math": (1.2, True), "code": (0.5, False), "law": (0.1, False)}


VERBOSE = "I worked through it carefully and after a long derivation the result is 42"


def _extractor_config(law_extractor: str | None) -> dict[str, object]:
    """Short answers (combiner.extractor: short), but ``law`` writes a sentence: a number extractor reads it."""
    experts: list[dict[str, object]] = [{"name": n, "type": "replay", "model": n, "timeout_s": 1.0,
                                         "replay": {"source": "routerbench", "path": "unused"}} for n in NAMES]
    if law_extractor is not None:
        experts[2]["extractor"] = law_extractor
    return {"version": 1, "experts": experts, "gate": {"top_k": {"policy": "fixed", "k": 3}},
            "combiner": {"strategy": "vote", "extractor": "short", "aggregator": "math", "escalate_to": "code"}}


async def test_an_experts_own_extractor_counts_its_vote_in_every_strategy_that_extracts() -> None:
    config = parse_config(_extractor_config("number"), check_env=False)
    texts = {"math": "42", "code": "41", "law": VERBOSE}
    experts = {n: FakeExpert(config.expert(n), texts[n]) for n in NAMES}
    orch = Orchestrator(config, FakeGate(NAMES, {}, default=[0.3, 0.45, 0.25]), experts)
    answer = await orch.complete(ask("how many?"))
    # law's "42" is read by its own extractor and outvotes code's heavier "41" with math's.
    assert (answer.content, answer.expert) == ("42", "math")
    assert {c.expert: c.agreed for c in answer.trace.contributions} == {"math": True, "code": False, "law": True}
    fused = await orch.complete(ask("how many?"), strategy="fuse")  # math aggregates, and answers "42"
    assert {c.expert: c.agreed for c in fused.trace.contributions} == {"math": True, "code": False, "law": True}
    panel = [WeightedAnswer("math", 0.6, "42"), WeightedAnswer("law", 0.4, VERBOSE)]
    assert orch.combiner_for("escalate").agreed(panel) == "42"  # agreement: no call to code
    assert [c.agreed for c in orch.combiner_for("top1").combine(panel).contributions] == [True, True]


async def test_without_its_own_extractor_an_unreadable_answer_loses_its_vote() -> None:
    config = parse_config(_extractor_config(None), check_env=False)
    texts = {"math": "42", "code": "41", "law": VERBOSE}
    experts = {n: FakeExpert(config.expert(n), texts[n]) for n in NAMES}
    orch = Orchestrator(config, FakeGate(NAMES, {}, default=[0.3, 0.45, 0.25]), experts)
    answer = await orch.complete(ask("how many?"))
    assert answer.content == "41"
    assert {c.expert: c.agreed for c in answer.trace.contributions} == {"math": False, "code": True, "law": False}


def test_an_experts_extractor_is_checked_when_the_config_loads() -> None:
    with pytest.raises(ValueError, match=r"experts\[2\] \(law\)\.extractor: Input should be 'choice', 'number' "
                                         r"or 'short'"):
        parse_config(_extractor_config("digits"), check_env=False)


async def test_panel_member_failure_renormalises_the_rest() -> None:
    config = fake_config(NAMES, gate={"top_k": {"policy": "fixed", "k": 2}})
    experts = {"math": FakeExpert(config.expert("math"), fail=lambda n: ExpertUnavailable(n, "down"))}
    answer = await build(experts, gate={"top_k": {"policy": "fixed", "k": 2}}).complete(ask("solve integral"))
    assert answer.expert == "code"
    assert [(c.expert, c.weight) for c in answer.trace.contributions] == [("code", 1.0)]


async def test_saturated_expert_hands_queries_to_the_next() -> None:
    config = fake_config(NAMES)
    orch = build({"math": FakeExpert(config.expert("math"), delay=0.2)})
    orch.capacity.limits["math"] = 1
    answers = await asyncio.gather(*(orch.complete(ask("an integral")) for _ in range(3)))
    assert sorted(a.expert for a in answers) == ["code", "code", "math"]
    assert orch.capacity.in_flight == {"math": 0, "code": 0, "law": 0}


async def collect(orch: Orchestrator, request: ChatRequest) -> tuple[str, StreamEnd]:
    text, end = [], None
    async for event in orch.stream(request):
        if isinstance(event, StreamPiece):
            text.append(event.delta.content)
        else:
            end = event
    assert end is not None
    return "".join(text), end


async def test_stream_failure_before_first_token_is_invisible() -> None:
    config = fake_config(NAMES)
    dead = FakeExpert(config.expert("math"), fail=lambda n: ExpertUnavailable(n, "refused"))
    code = FakeExpert(config.expert("code"), pieces=["def ", "f(): ", "pass"])
    text, end = await collect(build({"math": dead, "code": code}), ask("integral"))
    assert text == "def f(): pass"
    assert end.trace.switches == []
    assert [(a.expert, a.ok) for a in end.trace.attempts] == [("math", False), ("code", True)]


async def test_stream_failure_mid_stream_continues_from_the_next_expert() -> None:
    config = fake_config(NAMES)
    dying = FakeExpert(config.expert("math"), pieces=["one ", "two ", "three"], fail_after=2,
                       fail=lambda n: ExpertUnavailable(n, "peer closed"))
    code = FakeExpert(config.expert("code"), pieces=["three"])
    text, end = await collect(build({"math": dying, "code": code}), ask("integral"))
    assert text == "one two three"
    assert end.trace.switches == [{"from": "math", "to": "code", "after_chars": 8, "cause": "unavailable"}]
    # the next expert saw the partial answer and was asked to continue it
    continued = code.requests[0].messages
    assert continued[-2].role == "assistant" and continued[-2].content == "one two "
    assert end.trace.cost_usd == pytest.approx(0.001)  # the fakes' prices are 0: code's own reported cost
    # math broke off before its usage chunk: its two deltas and its prompt count, as an estimate.
    broke, finished = end.trace.attempts
    assert (broke.usage.prompt_tokens, broke.usage.completion_tokens, broke.usage_estimated) == (2, 2, True)
    assert (finished.usage.completion_tokens, finished.usage_estimated) == (1, False)
    assert end.trace.usage.completion_tokens == 3


async def test_a_continuation_writes_only_what_is_left_of_the_token_limit() -> None:
    config = fake_config(NAMES)
    dying = FakeExpert(config.expert("math"), pieces=["one ", "two ", "three"], fail_after=2,
                       fail=lambda n: ExpertUnavailable(n, "peer closed"))
    code = FakeExpert(config.expert("code"), pieces=["three"])
    request = ask("integral").model_copy(update={"max_tokens": 10, "max_completion_tokens": 5})
    text, end = await collect(build({"math": dying, "code": code}), request)
    assert text == "one two three"
    # two deltas (two tokens) were already sent: the continuation may write the rest of each limit
    assert (code.requests[0].max_tokens, code.requests[0].max_completion_tokens) == (8, 3)
    assert dying.requests[0].max_tokens == 10
    assert end.finish_reason == "stop" and end.trace.switches[0]["to"] == "code"


@pytest.mark.parametrize(("floor", "continued"), [(9, 3), (4, 2), (1, 0)])
async def test_a_continuation_lowers_vllms_min_tokens_with_the_limit(floor: int, continued: int) -> None:
    """vLLM's ``min_tokens`` is a floor on the whole answer: left as the client sent it, it exceeded the
    continuation's smaller ``max_tokens``, which vLLM refuses with a 400, and the stream failed instead of going
    on (min_tokens 470 with max_tokens 480 on real vLLM). It is what the answer still needs, within the limit."""
    config = fake_config(NAMES)
    dying = FakeExpert(config.expert("math"), pieces=["one ", "two ", "three"], fail_after=2,
                       fail=lambda n: ExpertUnavailable(n, "peer closed"))
    code = FakeExpert(config.expert("code"), pieces=["three"])
    request = ask("integral").model_copy(update={"max_tokens": 10, "max_completion_tokens": 5, "min_tokens": floor})
    text, _ = await collect(build({"math": dying, "code": code}), request)
    assert text == "one two three"
    assert (code.requests[0].model_extra or {})["min_tokens"] == continued
    assert (dying.requests[0].model_extra or {})["min_tokens"] == floor


async def test_a_stream_that_broke_after_the_whole_token_limit_ends_there_as_cut_off_by_length() -> None:
    config = fake_config(NAMES)
    dying = FakeExpert(config.expert("math"), pieces=["one ", "two ", "three"], fail_after=2,
                       fail=lambda n: ExpertUnavailable(n, "peer closed"))
    code = FakeExpert(config.expert("code"), pieces=["three"])
    text, end = await collect(build({"math": dying, "code": code}), ask("integral").model_copy(
        update={"max_tokens": 2}))
    assert text == "one two "
    assert end.finish_reason == "length" and end.trace.switches == []
    assert code.requests == []  # nothing was left for another expert to write
    assert [(a.expert, a.ok) for a in end.trace.attempts] == [("math", False)]
    assert [(c.expert, c.weight) for c in end.trace.contributions] == [("math", 1.0)]


async def test_stream_with_every_expert_down_raises() -> None:
    config = fake_config(NAMES)
    down = {n: FakeExpert(config.expert(n), fail=lambda n: ExpertUnavailable(n, "down")) for n in NAMES}
    with pytest.raises(AllExpertsFailed):
        await collect(build(down), ask("integral"))
