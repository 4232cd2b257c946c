import pytest

from router.config import ConfigError, TopKConfig
from router.topk import choose, rank

SCORES = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}


def weights(panel: list[tuple[str, float]]) -> dict[str, float]:
    return {n: round(w, 6) for n, w in panel}


def test_rank_orders_by_score_then_name() -> None:
    assert [n for n, _ in rank({"x": 0.2, "b": 0.4, "a": 0.4})] == ["a", "b", "x"]


def test_fixed_k_renormalises() -> None:
    panel = choose(SCORES, TopKConfig(policy="fixed", k=2))
    assert weights(panel) == {"a": 0.625, "b": 0.375}
    assert sum(w for _, w in panel) == pytest.approx(1.0)


def test_mass_stops_at_the_prefix_reaching_mass() -> None:
    panel = choose(SCORES, TopKConfig(policy="mass", k=4, mass=0.8))
    assert [n for n, _ in panel] == ["a", "b"]
    panel = choose(SCORES, TopKConfig(policy="mass", k=4, mass=0.9))
    assert [n for n, _ in panel] == ["a", "b", "c"]
    # k caps the panel even when the mass is not reached
    assert len(choose(SCORES, TopKConfig(policy="mass", k=2, mass=0.99))) == 2


def test_min_weight_drops_light_members_but_keeps_the_top() -> None:
    panel = choose(SCORES, TopKConfig(policy="min_weight", k=4, min_weight=0.2))
    assert [n for n, _ in panel] == ["a", "b"]
    assert weights(panel) == {"a": 0.625, "b": 0.375}
    lone = choose({"a": 0.97, "b": 0.03}, TopKConfig(policy="min_weight", k=2, min_weight=0.5))
    assert lone == [("a", 1.0)]


def test_adaptive_uses_one_expert_when_confident_and_more_when_not() -> None:
    cfg = TopKConfig(policy="adaptive", k=3, confident=0.8, mass=0.9)
    assert choose({"a": 0.85, "b": 0.1, "c": 0.05}, cfg) == [("a", 1.0)]
    assert [n for n, _ in choose(SCORES, cfg)] == ["a", "b", "c"]


def test_exclude_removes_experts_and_empty_is_an_error() -> None:
    panel = choose(SCORES, TopKConfig(policy="fixed", k=1), exclude=frozenset({"a"}))
    assert panel == [("b", 1.0)]
    with pytest.raises(ValueError, match="no expert left"):
        choose({"a": 1.0}, TopKConfig(), exclude=frozenset({"a"}))


@pytest.mark.parametrize(("policy", "members"), [("adaptive", ["b"]), ("mass", ["b", "c", "d"]),
                                                  ("min_weight", ["b"])])
def test_sizing_policies_judge_the_experts_left_when_the_top_one_is_excluded(policy: str,
                                                                            members: list[str]) -> None:
    # "top" (an open breaker, say) held 0.6; of what is left b holds 0.875. Judged on the raw scores b could
    # never look confident nor reach the mass, and the panel took all seven experts left.
    scores = {"top": 0.6, "b": 0.35, **{f"{c}": 0.05 / 6 for c in "cdefgh"}}
    cfg = TopKConfig(policy=policy, confident=0.8, mass=0.9, min_weight=0.1)
    panel = choose(scores, cfg, exclude=frozenset({"top"}))
    assert [n for n, _ in panel] == members
    assert sum(w for _, w in panel) == pytest.approx(1.0)


def test_a_score_that_is_no_positive_number_counts_as_zero() -> None:
    panel = choose({"a": float("nan"), "b": 0.6, "c": 0.4, "d": float("inf")}, TopKConfig(policy="fixed", k=2))
    assert weights(panel) == {"b": 0.6, "c": 0.4}


def test_zero_scores_get_equal_weights() -> None:
    assert weights(choose({"a": 0.0, "b": 0.0}, TopKConfig(k=2))) == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize("policy", ["mass", "min_weight", "adaptive"])
def test_sizing_policies_without_k_are_not_capped_at_one(policy: str) -> None:
    # k unset: no cap, so the policy itself sizes the panel (it used to be top-1 under the default k=1)
    scores = {"a": 0.4, "b": 0.35, "c": 0.25}
    cfg = TopKConfig(policy=policy, mass=0.7, min_weight=0.2, confident=0.8)
    assert cfg.cap is None
    assert len(choose(scores, cfg)) >= 2


def test_fixed_without_k_is_top_1_and_explicit_k_stays_a_cap() -> None:
    assert TopKConfig().cap == 1 and choose(SCORES, TopKConfig()) == [("a", 1.0)]
    assert len(choose(SCORES, TopKConfig(policy="min_weight", min_weight=0.0))) == 4
    assert len(choose(SCORES, TopKConfig(policy="min_weight", k=3, min_weight=0.0))) == 3


@pytest.mark.parametrize("policy", ["mass", "min_weight", "adaptive"])
def test_k_1_with_a_sizing_policy_is_refused(policy: str) -> None:
    with pytest.raises(ValueError, match=f"caps the panel at one expert, so policy '{policy}' could only ever pick"):
        TopKConfig(policy=policy, k=1)


def test_k_1_with_a_sizing_policy_is_refused_in_a_config_with_its_path() -> None:
    from tests.doubles.fakes import fake_config

    with pytest.raises(ConfigError, match=r"gate\.top_k.*could only ever pick one expert"):
        fake_config(["a", "b"], gate={"top_k": {"policy": "mass", "k": 1}})


def test_mass_of_one_takes_no_zero_probability_expert_a_rounding_short_of_it() -> None:
    """The renormalised sum fell a hair under mass 1.0, so an expert with no probability joined (weight 0.0)."""
    panel = choose({"a": 0.0, "b": 0.6875, "c": 0.6875, "d": 0.855510965195192}, TopKConfig(policy="mass", mass=1.0))
    assert [n for n, _ in panel] == ["d", "b", "c"] and all(w > 0 for _, w in panel)
    assert sum(w for _, w in panel) == pytest.approx(1.0)


def test_the_panel_and_the_ranking_agree_where_renormalising_rounds_scores_together() -> None:
    """1 - 1e-16 and 1.0, divided by their sum, round to one value: the tie went to the name ('a' before 'b'), so
    the panel took the lower score while the trace's ranking, on the raw scores, put it last. A score that is no
    positive finite number ranked first in the trace and counted as 0 in the panel."""
    scores = {"a": 0.9999999999999999, "b": 1.0, "c": 1.0}
    assert choose(scores, TopKConfig(policy="fixed", k=1)) == [("b", 1.0)]
    assert [n for n, _ in rank(scores)] == ["b", "c", "a"]
    odd = {"a": float("nan"), "b": 0.5, "c": float("inf")}
    assert rank(odd)[0][0] == "b" == choose(odd, TopKConfig(policy="fixed", k=1))[0][0]


async def test_an_uncapped_panel_is_cut_to_max_attempts() -> None:
    """A mass panel with no k called every expert it named (5 attempts with max_attempts 3), where a panel with a
    k above max_attempts is refused: max_attempts counts every expert tried, the panel included."""
    from experts.types import ChatMessage, ChatRequest
    from router.orchestrator import Orchestrator
    from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

    names = ["a", "b", "c", "d", "e"]
    config = fake_config(names, gate={"top_k": {"policy": "mass", "mass": 0.99}}, fallback={"max_attempts": 3})
    gate = FakeGate(names, {}, default=[0.24, 0.22, 0.2, 0.18, 0.16])
    orchestrator = Orchestrator(config, gate, {n: FakeExpert(config.expert(n)) for n in names})
    request = ChatRequest(messages=[ChatMessage(role="user", content="q")])
    decision = await orchestrator.decide(request)
    assert [c.expert for c in decision.chosen] == ["a", "b", "c"]
    assert sum(c.weight for c in decision.chosen) == pytest.approx(1.0)
    answer = await orchestrator.complete(request)
    assert len(answer.trace.attempts) == 3
    # The panel called when every breaker is open and fallback is off is cut the same way.
    despite = orchestrator._panel_despite_breakers(decision, names)
    assert [p.expert for p in despite] == ["a", "b", "c"] and sum(p.weight for p in despite) == pytest.approx(1.0)
    await orchestrator.aclose()


# Boundaries of each policy, as README states them; a mutation audit found each one unpinned.
def test_mass_is_reached_by_a_share_that_rounds_a_hair_under_it() -> None:
    """b's share is 0.6 / 0.8 = 0.75, which floating point gives as 0.7499999999999999: ``mass: 0.75`` is reached
    by b alone, and a is not called (and paid) besides."""
    assert choose({"a": 0.2, "b": 0.6}, TopKConfig(policy="mass", mass=0.75)) == [("b", 1.0)]


def test_min_weight_with_a_cap_judges_shares_of_the_top_k() -> None:
    """With a cap, the threshold applies to the weights renormalised over the top k: b holds 0.3 of all but
    0.375 of the top two, so at ``min_weight: 0.35`` it stays."""
    panel = choose({"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}, TopKConfig(policy="min_weight", k=2, min_weight=0.35))
    assert [n for n, _ in panel] == ["a", "b"]


def test_min_weight_keeps_a_member_exactly_at_it_and_adaptive_is_single_exactly_at_confident() -> None:
    assert [n for n, _ in choose({"a": 0.75, "b": 0.25}, TopKConfig(policy="min_weight", min_weight=0.25))] == \
        ["a", "b"]  # "at least min_weight"
    assert choose({"a": 0.75, "b": 0.25}, TopKConfig(policy="adaptive", confident=0.75, mass=0.9)) == [("a", 1.0)]


def test_a_panel_one_over_max_attempts_is_cut_to_it() -> None:
    from router.topk import capped

    panel = capped([("a", 0.4), ("b", 0.3), ("c", 0.2), ("d", 0.1)], 3)
    assert [n for n, _ in panel] == ["a", "b", "c"] and sum(w for _, w in panel) == pytest.approx(1.0)
