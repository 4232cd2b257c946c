"""The fuse, consensus and escalate combiners wired into the config, the orchestrator and the ``x-moe-combiner``
header, with fake experts and a fake gate."""

from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest

from experts.errors import ExpertError, ExpertServerError, ExpertUnavailable
from experts.types import ChatMessage, ChatRequest, ExpertReply
from router.combine import FUSE_SYSTEM
from router.config import ConfigError, RouterConfig, parse_config
from router.orchestrator import Orchestrator
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate

NAMES = ["math", "code", "judge"]
PANEL = {"top_k": {"policy": "fixed", "k": 2}}  # the gate's default scores put math (0.5) and code (0.3) on it
# Orchestrators a test built, closed after it so no gate worker thread outlives the test.
BUILT: list[Orchestrator] = []


@pytest.fixture(autouse=True)
async def close_orchestrators() -> AsyncIterator[None]:
    yield
    while BUILT:
        await BUILT.pop().aclose()


class FlakyFakeExpert(FakeExpert):
    """A fake that raises the queued errors first, one per call, then answers."""

    def __init__(self, *args: Any, errors: list[ExpertError], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors = errors

    async def generate(self, request: ChatRequest) -> ExpertReply:
        if self.errors:
            self.requests.append(request)
            raise self.errors.pop(0)
        return await super().generate(request)


class FakeToolCallingExpert(FakeExpert):
    """Answers with a tool call and no text."""

    async def generate(self, request: ChatRequest) -> ExpertReply:
        reply = await super().generate(request)
        reply.content, reply.finish_reason = "", "tool_calls"
        reply.tool_calls = [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]
        return reply


class FakeKeywordEncoder:
    """Embeds a text as its counts of a few keywords, so consensus has real vectors to compare."""

    WORDS = ("paris", "london", "rome")

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([[t.lower().count(w) for w in self.WORDS] for t in texts], dtype=np.float32)


def ask(text: str = "which letter?", **fields: Any) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content=text)], **fields)


def fake_config(**overrides: Any) -> RouterConfig:
    """Replay experts (stood in for by fakes) that may all take tools, answering within 1 s."""
    return parse_config({"version": 1, **overrides, "experts": [
        {"name": n, "type": "replay", "model": n, "timeout_s": 1.0, "capabilities": ["chat", "stream", "tools"],
         "replay": {"source": "routerbench", "path": "unused"}} for n in NAMES]}, check_env=False)


def build(texts: dict[str, str] | None = None, experts: dict[str, FakeExpert] | None = None,
          **overrides: Any) -> tuple[Orchestrator, dict[str, FakeExpert]]:
    overrides.setdefault("gate", PANEL)
    overrides.setdefault("combiner", {"strategy": "fuse", "extractor": "choice", "aggregator": "judge"})
    config = fake_config(**overrides)
    answers = {"math": "The answer is (A).", "code": "The answer is (B).", "judge": "The answer is (B)."}
    answers.update(texts or {})
    built: dict[str, FakeExpert] = {n: FakeExpert(config.expert(n), answers[n]) for n in NAMES}
    for name, expert in (experts or {}).items():
        expert.config = config.expert(name)
        built[name] = expert
    gate = FakeGate(NAMES, {}, default=[0.5, 0.3, 0.2])
    BUILT.append(Orchestrator(config, gate, built))
    return BUILT[-1], built


# -- config ---------------------------------------------------------------------------------------------------
def raw_config(combiner: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "combiner": combiner, "experts": [
        {"name": n, "type": "replay", "model": n, "replay": {"source": "routerbench", "path": "x"}} for n in NAMES]}


@pytest.mark.parametrize("strategy", ["top1", "vote", "consensus", "fuse", "escalate"])
def test_every_strategy_is_accepted_by_the_config(strategy: str) -> None:
    config = parse_config(raw_config({"strategy": strategy, "aggregator": "judge", "escalate_to": "judge"}),
                          check_env=False)
    assert (config.combiner.strategy, config.combiner.aggregator) == (strategy, "judge")


@pytest.mark.parametrize(("combiner", "path", "says"), [
    ({"strategy": "fuse"}, "combiner.aggregator",
     "strategy 'fuse' needs aggregator: the name of the expert that writes the final answer"),
    ({"strategy": "fuse", "aggregator": "oracle"}, "combiner.aggregator",
     "references expert 'oracle', which is not defined; experts: math, code, judge"),
    ({"strategy": "vote", "aggregator": "oracle"}, "combiner.aggregator", "references expert 'oracle'"),
    ({"strategy": "best"}, "combiner.strategy",
     "unknown combiner strategy 'best'; known: consensus, escalate, fuse, top1, vote"),
    ({"strategy": "escalate"}, "combiner.escalate_to",
     "strategy 'escalate' needs escalate_to: the name of the expert that answers when the panel disagrees"),
    ({"strategy": "escalate", "escalate_to": "oracle"}, "combiner.escalate_to",
     "references expert 'oracle', which is not defined; experts: math, code, judge"),
])
def test_a_bad_combiner_config_is_refused_naming_the_problem(combiner: dict[str, Any], path: str,
                                                              says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw_config(combiner), check_env=False)
    assert [p for p, _ in info.value.problems] == [path]
    assert says in info.value.problems[0][1]


# -- fuse through the orchestrator ------------------------------------------------------------------------------
async def test_fuse_asks_the_aggregator_through_the_dispatcher_and_returns_its_answer() -> None:
    orch, experts = build()
    answer = await orch.complete(ask())
    assert (answer.expert, answer.content) == ("judge", "The answer is (B).")
    trace = answer.trace
    assert trace.combiner == "fuse" and trace.combiner_fallback is None
    assert [(a.expert, a.ok, a.role) for a in trace.attempts] == [
        ("math", True, "answer"), ("code", True, "answer"), ("judge", True, "aggregate")]
    assert trace.attempts[2].weight == 0.0
    assert {c.expert: (c.weight, c.agreed) for c in trace.contributions} == {
        "math": (pytest.approx(0.5 / 0.8), False), "code": (pytest.approx(0.3 / 0.8), True)}
    assert trace.cost_usd == pytest.approx(0.003)  # the aggregator's call is paid for too
    [sent] = experts["judge"].requests
    assert [m.role for m in sent.messages] == ["system", "user"] and sent.messages[0].content == FUSE_SYSTEM
    prompt = str(sent.messages[1].content)
    assert "which letter?" in prompt and prompt.index("(weight 0.62)") < prompt.index("(weight 0.37)")


async def test_the_aggregator_reads_the_clients_conversation() -> None:
    orch, experts = build()
    await orch.complete(ChatRequest(messages=[
        ChatMessage(role="system", content="Reply with the letter alone."),
        ChatMessage(role="user", content="first question"), ChatMessage(role="assistant", content="(A)"),
        ChatMessage(role="user", content="which letter?")]))
    [sent] = experts["judge"].requests
    assert "Reply with the letter alone." in str(sent.messages[0].content)
    assert "user: first question\nassistant: (A)" in str(sent.messages[1].content)


async def test_the_aggregator_request_keeps_sampling_settings_and_drops_tools() -> None:
    orch, experts = build()
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    await orch.complete(ask(max_tokens=64, temperature=0.2, tools=tools, tool_choice="auto", seed=7))
    [sent] = experts["judge"].requests
    body = sent.upstream_payload("judge-model", stream=False)
    assert {k: body.get(k) for k in ("max_tokens", "temperature", "seed", "tools", "tool_choice")} == {
        "max_tokens": 64, "temperature": 0.2, "seed": 7, "tools": None, "tool_choice": None}


async def test_a_failed_aggregator_falls_back_to_the_top_weight_answer_with_the_cause_in_the_trace() -> None:
    config = fake_config()
    dead = FakeExpert(config.expert("judge"), fail=lambda n: ExpertUnavailable(n, "connection refused"))
    orch, _ = build(experts={"judge": dead})
    answer = await orch.complete(ask())
    assert (answer.expert, answer.content) == ("math", "The answer is (A).")
    trace = answer.trace
    assert trace.combiner == "fuse"
    assert trace.combiner_fallback == {"to": "top1", "expert": "judge", "kind": "unavailable",
                                       "message": "connection refused"}
    assert [(a.expert, a.ok, a.role) for a in trace.attempts][-1] == ("judge", False, "aggregate")
    assert {c.expert: c.agreed for c in trace.contributions} == {"math": True, "code": False}


async def test_the_aggregator_is_retried_like_any_expert() -> None:
    config = fake_config()
    flaky = FlakyFakeExpert(config.expert("judge"), "The answer is (B).",
                            errors=[ExpertServerError("judge", 503, "busy")])
    orch, _ = build(experts={"judge": flaky}, fallback={"retries": 1, "backoff_base_s": 0.01})
    answer = await orch.complete(ask())
    assert answer.expert == "judge" and answer.trace.combiner_fallback is None
    assert [(a.expert, a.ok, a.retry, a.role) for a in answer.trace.attempts[2:]] == [
        ("judge", False, 0, "aggregate"), ("judge", True, 1, "aggregate")]
    assert [(r.expert, r.number, r.cause) for r in answer.trace.retries] == [("judge", 1, "server_error")]


async def test_a_slow_aggregator_times_out_and_the_top_weight_answer_stands() -> None:
    config = fake_config()
    orch, _ = build(experts={"judge": FakeExpert(config.expert("judge"), delay=5.0)})
    answer = await orch.complete(ask())
    assert answer.expert == "math"
    assert answer.trace.combiner_fallback is not None and answer.trace.combiner_fallback["kind"] == "timeout"
    assert 900 <= answer.trace.attempts[-1].latency_ms < 2500  # the fake config's timeout_s is 1.0


async def test_an_aggregator_behind_an_open_breaker_is_not_called() -> None:
    config = fake_config()
    dead = FakeExpert(config.expert("judge"), fail=lambda n: ExpertUnavailable(n, "refused"))
    orch, _ = build(experts={"judge": dead}, fallback={"breaker": {"failure_threshold": 1}})
    await orch.complete(ask())  # opens judge's breaker
    answer = await orch.complete(ask())
    assert answer.expert == "math" and len(dead.requests) == 1
    assert answer.trace.combiner_fallback is not None
    assert answer.trace.combiner_fallback["kind"] == "circuit_open"


async def test_an_aggregator_over_the_cost_budget_is_not_called() -> None:
    orch, experts = build(fallback={"cost_budget_usd": 0.0015})  # the panel spends 0.002
    answer = await orch.complete(ask())
    assert answer.expert == "math" and experts["judge"].requests == []
    assert answer.trace.combiner_fallback is not None
    assert answer.trace.combiner_fallback["kind"] == "budget_exhausted"


async def test_a_single_answer_is_not_fused() -> None:
    orch, experts = build(gate={"top_k": {"policy": "fixed", "k": 1}})
    answer = await orch.complete(ask())
    assert (answer.expert, answer.trace.combiner) == ("math", "fuse")
    assert experts["judge"].requests == []


async def test_tool_calls_are_never_fused() -> None:
    config = fake_config()
    orch, experts = build(experts={"math": FakeToolCallingExpert(config.expert("math"))})
    answer = await orch.complete(ask())
    assert (answer.expert, answer.finish_reason) == ("math", "tool_calls")
    assert answer.tool_calls is not None and answer.tool_calls[0]["function"]["name"] == "add"
    assert experts["judge"].requests == []


async def test_fuse_can_be_picked_per_request_when_an_aggregator_is_configured() -> None:
    orch, _ = build(combiner={"strategy": "top1", "aggregator": "judge"})
    assert (await orch.complete(ask())).expert == "math"
    fused = await orch.complete(ask(), strategy="fuse")
    assert (fused.expert, fused.trace.combiner) == ("judge", "fuse")


def test_an_injected_fuse_combiner_needs_a_built_aggregator() -> None:
    from router.combine import Fuse

    config = fake_config()
    with pytest.raises(ValueError, match="aggregator 'oracle' is not a built expert"):
        Orchestrator(config, FakeGate(NAMES, {}, default=[0.5, 0.3, 0.2]),
                     {n: FakeExpert(config.expert(n)) for n in NAMES}, Fuse("oracle"))


# -- consensus through the orchestrator -------------------------------------------------------------------------
async def test_consensus_embeds_the_answers_with_the_gates_encoder() -> None:
    texts = {"math": "London.", "code": "It is Paris.", "judge": "Paris, of course"}
    orch, _ = build(texts, gate={"top_k": {"policy": "fixed", "k": 3}}, combiner={"strategy": "consensus"})
    encoder = FakeKeywordEncoder()
    orch.gate.encoder = encoder  # type: ignore[misc]
    orch.gate.default = [0.45, 0.35, 0.2]  # type: ignore[attr-defined]
    answer = await orch.complete(ask("capital of France?"))
    # 0.45 for London, the top weight, against 0.55 for Paris split over two experts: the centroid leans to Paris,
    # and of the two Paris answers the heavier is chosen.
    assert (answer.expert, answer.trace.combiner) == ("code", "consensus")
    assert {c.expert: c.agreed for c in answer.trace.contributions} == {"math": False, "code": True,
                                                                         "judge": True}
    assert ["London.", "It is Paris.", "Paris, of course"] in encoder.calls
    assert answer.trace.attempts[-1].role == "answer"  # no model call to combine


class FakeTruncatingEncoder(FakeKeywordEncoder):
    """Reads the first 30 characters of a text, as a sentence encoder reads its first max_length tokens."""

    max_length = 10

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return super().encode([t[:30] for t in texts]) + 0.01  # never a zero row


async def test_consensus_reads_the_end_of_an_answer_the_encoder_would_cut() -> None:
    """Two chains of thought that begin alike and conclude apart embedded alike (the encoder reads an answer's
    start) and were marked as agreeing."""
    start = "rome rome rome, and so on. " * 4
    texts = {"math": start + "In the end: paris", "code": start + "In the end: london", "judge": "rome"}
    orch, _ = build(texts, gate={"top_k": {"policy": "fixed", "k": 2}}, combiner={"strategy": "consensus"})
    orch.gate.encoder = FakeTruncatingEncoder()  # type: ignore[misc]
    answer = await orch.complete(ask("capital?"))
    assert {c.expert: c.agreed for c in answer.trace.contributions} == {"math": True, "code": False}


# -- the x-moe-combiner header ---------------------------------------------------------------------------------
def client(orch: Orchestrator) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(orch)), base_url="http://router")


BODY = {"model": "auto", "messages": [{"role": "user", "content": "which letter?"}]}


@pytest.mark.parametrize(("header", "combiner", "expert"), [
    ("top1", "top1", "math"), ("vote", "vote", "code"), ("Consensus ", "consensus", "math"),
    ("FUSE", "fuse", "judge")])
async def test_the_header_picks_any_of_the_four_strategies(header: str, combiner: str, expert: str) -> None:
    orch, _ = build({"math": "Paris", "code": "The answer is (B).", "judge": "The answer is (B)."},
                    combiner={"strategy": "top1", "aggregator": "judge"})
    orch.gate.encoder = FakeKeywordEncoder()  # type: ignore[misc]
    async with client(orch) as http:
        r = await http.post("/v1/chat/completions", json=BODY, headers={"x-moe-combiner": header})
    assert r.status_code == 200
    assert (r.json()["moe"]["combiner"], r.json()["model"]) == (combiner, expert)


@pytest.mark.parametrize(("header", "says"), [
    ("best", "unknown combiner strategy 'best'; known: consensus, escalate, fuse, top1, vote"),
    ("", "unknown combiner strategy ''; known: consensus, escalate, fuse, top1, vote"),
    ("fuse", "the fuse combiner needs an aggregator expert (combiner.aggregator in the config)"),
    ("escalate", "the escalate combiner needs the expert to escalate to (combiner.escalate_to in the config)")])
async def test_a_bad_header_is_a_400_naming_the_valid_strategies(header: str, says: str) -> None:
    orch, experts = build(combiner={"strategy": "top1"})
    async with client(orch) as http:
        plain = await http.post("/v1/chat/completions", json=BODY, headers={"x-moe-combiner": header})
        streamed = await http.post("/v1/chat/completions", json={**BODY, "stream": True},
                                   headers={"x-moe-combiner": header})
    for r in (plain, streamed):
        assert r.status_code == 400
        error = r.json()["error"]
        assert (error["code"], error["param"], error["type"]) == ("invalid_combiner", "x-moe-combiner",
                                                                  "invalid_request_error")
        assert error["message"] == f"x-moe-combiner: {says}"
    assert all(e.requests == [] for e in experts.values())  # refused before any expert was asked


# -- escalate through the orchestrator ---------------------------------------------------------------------------
ESCALATE = {"strategy": "escalate", "extractor": "choice", "escalate_to": "judge"}


async def test_an_agreeing_panel_answers_without_the_escalation_expert() -> None:
    orch, experts = build({"math": "(B)", "code": "The answer is (B)."}, combiner=ESCALATE)
    answer = await orch.complete(ask())
    assert (answer.expert, answer.content) == ("math", "(B)")  # the heavier of the agreeing answers
    assert answer.trace.combiner == "escalate" and answer.trace.combiner_fallback is None
    assert [(a.expert, a.role) for a in answer.trace.attempts] == [("math", "answer"), ("code", "answer")]
    assert {c.expert: c.agreed for c in answer.trace.contributions} == {"math": True, "code": True}
    assert experts["judge"].requests == []


async def test_a_split_panel_escalates_the_clients_own_request() -> None:
    orch, experts = build(combiner=ESCALATE)  # math says A, code says B
    answer = await orch.complete(ask(max_tokens=32, temperature=0.0))
    assert (answer.expert, answer.content) == ("judge", "The answer is (B).")
    assert [(a.expert, a.ok, a.role) for a in answer.trace.attempts] == [
        ("math", True, "answer"), ("code", True, "answer"), ("judge", True, "escalate")]
    assert {c.expert: c.agreed for c in answer.trace.contributions} == {"math": False, "code": True}
    [sent] = experts["judge"].requests
    assert [(m.role, m.content) for m in sent.messages] == [("user", "which letter?")]  # no fuse prompt
    assert (sent.max_tokens, sent.temperature) == (32, 0.0)
    assert answer.trace.cost_usd == pytest.approx(0.003)  # the escalation is paid for


async def test_an_unreadable_answer_is_not_agreement() -> None:
    orch, experts = build({"math": "(B)", "code": "I am not sure."}, combiner=ESCALATE)
    answer = await orch.complete(ask())
    assert answer.expert == "judge" and len(experts["judge"].requests) == 1


async def test_a_failed_escalation_falls_back_to_the_panels_vote() -> None:
    config = fake_config()
    dead = FakeExpert(config.expert("judge"), fail=lambda n: ExpertUnavailable(n, "connection refused"))
    orch, _ = build(experts={"judge": dead}, combiner=ESCALATE)
    answer = await orch.complete(ask())
    assert (answer.expert, answer.content) == ("math", "The answer is (A).")  # A carries 0.5 of 0.8
    assert answer.trace.combiner_fallback == {"to": "vote", "expert": "judge", "kind": "unavailable",
                                              "message": "connection refused"}
    assert [(a.expert, a.ok, a.role) for a in answer.trace.attempts][-1] == ("judge", False, "escalate")


async def test_the_escalation_expert_on_the_panel_is_not_asked_twice() -> None:
    orch, experts = build(combiner=ESCALATE, gate={"top_k": {"policy": "fixed", "k": 3}},
                          texts={"judge": "The answer is (C)."})
    answer = await orch.complete(ask())
    assert (answer.expert, answer.content) == ("judge", "The answer is (C).")
    assert len(experts["judge"].requests) == 1
    assert [a.role for a in answer.trace.attempts] == ["answer", "answer", "answer"]


@pytest.mark.parametrize("blank", ["", "  \n"])
async def test_the_escalation_expert_on_the_panel_answering_no_text_leaves_the_panels_vote(blank: str) -> None:
    """Its blank panel answer counts as an escalation call's would (EmptyAnswer): the panel's vote stands, marked
    as the combiner's fallback; the empty answer was returned as the result."""
    orch, experts = build(combiner=ESCALATE, gate={"top_k": {"policy": "fixed", "k": 3}})
    experts["judge"].text = blank  # (a fake built with "" answers with its default text)
    answer = await orch.complete(ask())
    assert (answer.expert, answer.content) == ("math", "The answer is (A).")  # A: 0.5 of the panel's 1.0
    assert answer.trace.combiner_fallback == {"to": "vote", "expert": "judge", "kind": "empty_answer",
                                              "message": "answered with no text"}
    assert len(experts["judge"].requests) == 1


async def test_a_blank_escalation_expert_on_top_of_an_unreadable_panel_is_not_the_answer() -> None:
    """The panel's vote reads no answer and falls back to the heaviest: the blank escalation expert it was, and
    its empty answer was returned again. The vote is of the rest of the panel."""
    orch, experts = build(combiner=ESCALATE, gate={"top_k": {"policy": "fixed", "k": 3}},
                          texts={"math": "Paris is the capital of France.", "code": "It is Paris."})
    experts["judge"].text = ""
    orch.gate = FakeGate(NAMES, {}, default=[0.3, 0.2, 0.5])  # judge the heaviest
    orch.decider.gate = orch.gate
    answer = await orch.complete(ask())
    assert (answer.expert, answer.content) == ("math", "Paris is the capital of France.")
    assert answer.trace.combiner_fallback is not None and answer.trace.combiner_fallback["kind"] == "empty_answer"
    assert {c.expert: c.agreed for c in answer.trace.contributions}["judge"] is False


async def test_a_blank_escalation_expert_that_answered_alone_is_returned_not_a_crash() -> None:
    """Its panel partner failed, fallback off: the vote of the rest of the panel had nothing to count, and
    TopOne's max() of nothing raised (a 500)."""
    config = fake_config()
    dead = FakeExpert(config.expert("math"), fail=lambda n: ExpertUnavailable(n, "connection refused"))
    orch, experts = build(experts={"math": dead}, combiner=ESCALATE, fallback={"enabled": False},
                          gate={"top_k": {"policy": "fixed", "k": 2}})
    experts["judge"].text = ""
    orch.gate = orch.decider.gate = FakeGate(NAMES, {}, default=[0.6, 0.0, 0.4])  # math and judge
    answer = await orch.complete(ask())
    assert (answer.expert, answer.content) == ("judge", "")
    assert answer.trace.combiner_fallback is not None and answer.trace.combiner_fallback["kind"] == "empty_answer"


async def test_a_lone_answer_has_no_second_opinion_and_escalates() -> None:
    config = fake_config()
    dead = FakeExpert(config.expert("code"), fail=lambda n: ExpertUnavailable(n, "connection refused"))
    orch, experts = build(experts={"code": dead}, combiner=ESCALATE, fallback={"enabled": False})
    answer = await orch.complete(ask())
    assert answer.expert == "judge" and len(experts["judge"].requests) == 1


async def test_escalate_can_be_picked_per_request_when_an_expert_is_named() -> None:
    orch, _ = build(combiner={"strategy": "top1", "escalate_to": "judge"})
    async with client(orch) as http:
        r = await http.post("/v1/chat/completions", json=BODY, headers={"x-moe-combiner": "escalate"})
    assert r.status_code == 200
    assert (r.json()["moe"]["combiner"], r.json()["model"]) == ("escalate", "judge")


# -- feedback on a fused answer ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("judge", "credited"), [
    ("The answer is (B).", "code"),  # agrees with code: the panel's top-weight member that agreed
    ("The answer is (C).", "math"),  # agrees with nobody: the panel's top-weight member
    (None, "math"),  # the aggregator failed: math's own answer is returned, and rated
])
async def test_a_verdict_on_a_fused_answer_rates_the_panel_not_the_aggregator(tmp_path: Any, judge: str | None,
                                                                               credited: str) -> None:
    """The aggregator was never asked the question alone: a good verdict credited to it would teach the gate to
    send the query to the aggregator instead of the panel."""
    from router.feedback import FeedbackBody, SqliteFeedbackStore

    failing = {"judge": FakeExpert(fake_config().expert("judge"), fail=lambda n: ExpertServerError(n, 500, "x"))}
    orch, _ = build({"judge": judge} if judge else None, experts=None if judge else failing)
    store = SqliteFeedbackStore(tmp_path / "fb.sqlite3")
    app = create_app(orch, feedback=store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as http:
        r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "which?"}]})
        verdict = await http.post("/v1/feedback", json={"request_id": r.json()["id"], "good": True})
    assert r.json()["model"] == ("judge" if judge else "math")  # the text is still the aggregator's
    assert verdict.status_code == 200 and verdict.json()["expert"] == credited
    assert store.submit(FeedbackBody(request_id=r.json()["id"], good=False), NAMES).expert == credited
    store.close()


TOOL = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]


async def test_an_escalation_keeps_the_clients_tools_and_needs_the_tools_capability() -> None:
    """Escalate asks the client's own request: with its tools, so the expert may answer with a tool call; and only
    of an expert declaring tools (one without is not asked: the panel's vote stands)."""
    orch, experts = build(combiner=ESCALATE)  # math says A, code says B: split
    answer = await orch.complete(ask(tools=TOOL, tool_choice="auto"))
    [sent] = experts["judge"].requests
    assert sent.tools == TOOL and (sent.model_extra or {}).get("tool_choice") == "auto"
    assert answer.expert == "judge"
    toolless = parse_config({"version": 1, "combiner": ESCALATE, "gate": PANEL, "experts": [
        {"name": n, "type": "replay", "model": n, "timeout_s": 1.0, "replay": {"source": "routerbench", "path": "x"},
         "capabilities": ["chat", "stream"] if n == "judge" else ["chat", "stream", "tools"]} for n in NAMES]},
        check_env=False)
    texts = {"math": "The answer is (A).", "code": "The answer is (B).", "judge": "The answer is (B)."}
    experts = {n: FakeExpert(toolless.expert(n), texts[n]) for n in NAMES}
    orch = Orchestrator(toolless, FakeGate(NAMES, {}, default=[0.5, 0.3, 0.2]), experts)
    BUILT.append(orch)
    answer = await orch.complete(ask(tools=TOOL))
    assert experts["judge"].requests == []
    assert answer.trace.combiner_fallback is not None and answer.trace.combiner_fallback["expert"] == "judge"
    assert "'tools' capability" in answer.trace.combiner_fallback["message"]


# -- a blank panel answer ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["top1", "vote", "consensus", "fuse"])
async def test_a_blank_panel_answer_has_no_say_and_the_rest_answer(strategy: str) -> None:
    """The heaviest member answered "" (no text, no refusal, no tool call): top1 and vote's fallback returned the
    empty text though two members answered, consensus embedded "" and chose it, and fuse gave it the heaviest
    slot of the aggregator's prompt. It now counts as a failed member would: the others' weights are
    renormalised over them, and it is listed with weight 0, not agreeing."""
    texts = {"code": "Paris, of course.", "judge": "The capital is Paris."}
    combiner: dict[str, Any] = {"strategy": strategy, "extractor": "short"}
    if strategy == "fuse":
        combiner["aggregator"] = "judge"
    orch, experts = build(texts, gate={"top_k": {"policy": "fixed", "k": 3}}, combiner=combiner)
    experts["math"].text = ""  # (a fake built with "" answers with its default text)
    orch.gate.encoder = FakeKeywordEncoder()  # type: ignore[misc]
    answer = await orch.complete(ask("capital of France?"))
    assert answer.content.strip() and answer.expert in ("code", "judge"), answer
    contributions = {c.expert: (c.weight, c.agreed) for c in answer.trace.contributions}
    assert contributions["math"] == (0.0, False)
    assert sum(weight for weight, _ in contributions.values()) == pytest.approx(1.0)
    if strategy == "fuse":
        prompt = str(experts["judge"].requests[-1].messages[1].content)
        assert "(weight 0.60)" in prompt and "(weight 0.40)" in prompt and prompt.count("(weight") == 2, prompt


async def test_every_member_blank_still_answers_with_the_heaviest() -> None:
    orch, experts = build(gate={"top_k": {"policy": "fixed", "k": 3}}, combiner={"strategy": "vote"})
    for name, blank in (("math", ""), ("code", " "), ("judge", "\n")):
        experts[name].text = blank
    answer = await orch.complete(ask())
    assert (answer.expert, answer.content) == ("math", "")
    assert {c.expert: c.weight for c in answer.trace.contributions} == {
        "math": pytest.approx(0.5), "code": pytest.approx(0.3), "judge": pytest.approx(0.2)}
