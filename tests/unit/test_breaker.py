"""The circuit breaker's state machine, on a fake clock."""

import pytest

from experts.errors import (
    ExpertAuthError,
    ExpertOverloaded,
    ExpertRateLimited,
    ExpertRejected,
    ExpertServerError,
    ExpertTimeout,
    ExpertUnavailable,
    NoRecording,
)
from router.breaker import Breakers, BreakerState, CircuitOpen, MemoryBreakerStore, classify
from router.config import BreakerConfig
from tests.doubles.fakes import FakeClock

DOWN = ExpertServerError("math", 503, "down")


def make(**fields: object) -> tuple[Breakers, FakeClock]:
    clock = FakeClock()
    cfg = BreakerConfig(**{"failure_threshold": 3, "cooldown_s": 10.0, "cooldown_max_s": 35.0,
                           "failure_rate": None, **fields})  # type: ignore[arg-type]
    return Breakers(cfg, clock=clock), clock


def fail(b: Breakers, times: int = 1, error: Exception = DOWN) -> None:
    for _ in range(times):
        b.finish(b.admit("math"), error)  # type: ignore[arg-type]


def test_opens_after_consecutive_failures_and_refuses_calls() -> None:
    b, _ = make()
    fail(b, 2)
    b.finish(b.admit("math"), None)  # a success resets the count
    fail(b, 2)
    assert b.snapshot("math")["state"] == "closed"
    fail(b)
    assert b.snapshot("math")["state"] == "open"
    with pytest.raises(CircuitOpen, match=r"last: server_error.*next probe in 10\.0s") as info:
        b.admit("math")
    assert info.value.kind == "circuit_open"
    assert b.refusing(["math", "code"]) == {"math"}


def test_half_open_admits_a_limited_probe_then_closes_on_success() -> None:
    b, clock = make(half_open_probes=1)
    fail(b, 3)
    clock.now += 9.9
    assert b.refuses("math")
    clock.now += 0.1
    assert b.snapshot("math")["state"] == "half_open"
    probe = b.admit("math")
    assert probe.probe
    with pytest.raises(CircuitOpen, match="probe call is already in flight"):
        b.admit("math")
    b.finish(probe, None)
    assert b.snapshot("math") | {"last_error": None} == {
        "state": "closed", "consecutive_failures": 0, "trips": 0, "cooldown_s": 0.0, "retry_in_s": 0.0,
        "held_by_retry_after": False, "window_calls": 0, "window_failures": 0, "last_error": None}


def test_a_failed_probe_reopens_with_a_longer_cooldown_from_now_capped() -> None:
    b, clock = make()
    fail(b, 3)
    cooldowns = []
    for _ in range(4):
        clock.now += b.snapshot("math")["retry_in_s"]
        fail(b)  # the probe fails
        snap = b.snapshot("math")
        cooldowns.append(snap["cooldown_s"])
        # the new cooldown runs from the failed probe, so the breaker does not flap straight back
        assert snap["state"] == "open" and snap["retry_in_s"] == pytest.approx(snap["cooldown_s"])
    assert cooldowns == [20.0, 35.0, 35.0, 35.0]  # 10 * 2**trips, capped at cooldown_max_s
    clock.now += 35.0
    b.finish(b.admit("math"), None)
    fail(b, 3)
    assert b.snapshot("math")["cooldown_s"] == 10.0  # a close resets the growth


def test_late_failures_of_calls_admitted_before_the_trip_do_not_extend_the_cooldown() -> None:
    b, clock = make()
    in_flight = [b.admit("math") for _ in range(5)]
    for permit in in_flight[:3]:
        b.finish(permit, DOWN)
    clock.now += 6.0
    for permit in in_flight[3:]:
        b.finish(permit, DOWN)  # stale: they started while closed
    snap = b.snapshot("math")
    assert (snap["trips"], snap["cooldown_s"], snap["retry_in_s"]) == (1, 10.0, pytest.approx(4.0))


def test_a_cancelled_or_neutral_probe_frees_its_slot_without_deciding() -> None:
    b, clock = make()
    fail(b, 3)
    clock.now += 10.0
    b.finish(b.admit("math"), None, "neutral")
    assert b.snapshot("math")["state"] == "half_open"
    b.finish(b.admit("math"), None)
    assert b.snapshot("math")["state"] == "closed"


def test_a_stale_probe_from_an_earlier_half_open_round_does_not_decide_a_later_one() -> None:
    b, clock = make(half_open_probes=2)
    fail(b, 3)
    clock.now += 10.0
    first, late = b.admit("math"), b.admit("math")  # round 1: two probes in flight
    b.finish(first, DOWN)  # round 1 re-opens the breaker; ``late`` is still out
    clock.now += 20.0  # the grown cooldown
    current = b.admit("math")  # round 2
    b.finish(late, None)  # round 1's late success: stale
    assert b.snapshot("math")["state"] == "half_open"
    b.finish(late, DOWN)  # nor does a stale failure re-open it
    assert b.snapshot("math")["state"] == "half_open"
    b.finish(current, DOWN)  # round 2's own probe decides
    assert (b.snapshot("math")["state"], b.snapshot("math")["trips"]) == ("open", 3)
    clock.now += 35.0
    closing, straggler = b.admit("math"), b.admit("math")  # round 3
    b.finish(closing, None)
    assert b.snapshot("math")["state"] == "closed"
    fail(b, 3)
    clock.now += 10.0
    b.admit("math")  # round 4, after a close and a new trip: round 3's straggler is stale here too
    b.finish(straggler, None)
    assert b.snapshot("math")["state"] == "half_open"


def test_opens_on_failure_rate_over_the_window() -> None:
    b, _ = make(failure_threshold=100, failure_rate=0.5, min_calls=10, window_s=10.0)
    for i in range(9):
        b.finish(b.admit("math"), DOWN if i % 2 else None)
    assert b.snapshot("math")["state"] == "closed"  # under min_calls
    b.finish(b.admit("math"), None)
    fail(b)
    assert b.snapshot("math")["state"] == "closed"  # 5 of 11 failed: under the rate
    fail(b)
    assert b.snapshot("math")["state"] == "open"  # 6 of 12: at the rate


def test_the_window_forgets_old_calls() -> None:
    b, clock = make(failure_threshold=100, failure_rate=0.5, min_calls=4, window_s=10.0)
    fail(b, 3)
    clock.now += 11.0
    for _ in range(3):
        b.finish(b.admit("math"), None)
    fail(b)
    snap = b.snapshot("math")
    assert snap["state"] == "closed" and (snap["window_calls"], snap["window_failures"]) == (4, 1)


def test_the_window_stays_bounded_under_load() -> None:
    b, clock = make(failure_threshold=10**3, failure_rate=None, window_s=10.0)
    for _ in range(5000):
        clock.now += 0.01
        b.finish(b.admit("math"), None)
    assert len(b.store.load("math").buckets) <= 10


@pytest.mark.parametrize(("error", "outcome"), [
    (None, "success"), (DOWN, "failure"), (ExpertTimeout("m", "slow"), "failure"),
    (ExpertAuthError("m", 401, "key"), "failure"), (ExpertRejected("m", 400, "bad"), "success"),
    (NoRecording("m", "none"), "success"), (ExpertOverloaded("m", "full"), "neutral"),
    # The request's own fault (a bad parameter, too long a prompt): the expert is up and answered.
    (ExpertRejected("m", 413, "too large"), "success"), (ExpertRejected("m", 422, "unprocessable"), "success"),
    # The deployment's: the model is not served there (404), or the endpoint is not what it should be.
    (ExpertRejected("m", 404, "the model `m` does not exist"), "failure"),
    (ExpertRejected("m", 405, "method not allowed"), "failure"), (ExpertRejected("m", 410, "gone"), "failure"),
])
def test_classify(error: Exception | None, outcome: str) -> None:
    assert classify(error) == outcome  # type: ignore[arg-type]


def test_disabled_breaker_never_refuses() -> None:
    b, _ = make(enabled=False)
    fail(b, 50)
    b.admit("math")
    assert b.snapshot("math")["state"] == "disabled"


def test_state_lives_behind_the_store() -> None:
    store = MemoryBreakerStore()
    first = Breakers(BreakerConfig(failure_threshold=1), store=store)
    first.finish(first.admit("math"), DOWN)
    second = Breakers(BreakerConfig(failure_threshold=1), store=store)  # e.g. another replica
    assert second.refuses("math")
    assert store.load("code") == BreakerState()


def test_replicas_reloading_one_change_in_turn_reset_the_shared_breaker_once() -> None:
    """Each replica that reloaded the same config change later reset the shared breaker again, wiping what was
    learned under the new config (an expert found down again took failure_threshold more failed calls per
    replica). The reset remembers the config it started afresh for."""
    store, clock = MemoryBreakerStore(), FakeClock()
    cfg = BreakerConfig(failure_threshold=1, cooldown_s=30.0)
    first, second = Breakers(cfg, store=store, clock=clock), Breakers(cfg, store=store, clock=clock)
    first.reset("math", "new-config")  # replica 1 reloads
    first.finish(first.admit("math"), DOWN)  # the expert fails under the new config: open
    second.reset("math", "new-config")  # replica 2 reloads the same file later
    assert first.refuses("math") and second.refuses("math")
    second.reset("math", "newer-config")  # another change starts afresh again
    assert not second.refuses("math") and store.load("math").config == "newer-config"
    second.finish(second.admit("math"), DOWN)
    assert store.load("math").config == "newer-config"  # carried through what the breaker records


def test_config_bounds() -> None:
    with pytest.raises(ValueError, match=r"cooldown_max_s\n.*must be at least cooldown_s \(10\)"):
        BreakerConfig(cooldown_s=10.0, cooldown_max_s=5.0)
    with pytest.raises(ValueError):
        BreakerConfig(half_open_probes=0)


def limited(wait: float) -> ExpertRateLimited:
    return ExpertRateLimited("math", 429, "slow down", retry_after_s=wait)


def test_a_retry_after_opens_at_once_for_that_wait_without_counting_a_trip() -> None:
    b, clock = make()
    fail(b, error=limited(4.0))
    snap = b.snapshot("math")
    assert (snap["state"], snap["retry_in_s"], snap["trips"], snap["held_by_retry_after"]) == ("open", 4.0, 0, True)
    with pytest.raises(CircuitOpen, match=r"asked to wait \(Retry-After; last: rate_limited\); next probe in 4\.0s") \
            as info:
        b.admit("math")
    assert info.value.retry_after_s == 4.0
    clock.now += 4.0
    assert (b.snapshot("math")["state"], b.snapshot("math")["held_by_retry_after"]) == ("half_open", False)
    probe = b.admit("math")
    assert probe.probe
    b.finish(probe, None)
    assert b.snapshot("math")["state"] == "closed"


def test_a_retry_after_is_capped_and_only_ever_lengthens_the_wait() -> None:
    b, _ = make()  # cooldown_max_s 35
    fail(b, error=limited(3600.0))
    assert b.snapshot("math")["retry_in_s"] == 35.0
    b2, clock2 = make()
    late = [b2.admit("math") for _ in range(3)]  # admitted while closed, answered after the first opened it
    b2.finish(late[0], limited(10.0))
    clock2.now += 2.0
    b2.finish(late[1], limited(3.0))  # asks for less than is left (8 s): nothing changes
    assert b2.snapshot("math")["retry_in_s"] == 8.0
    b2.finish(late[2], limited(20.0))  # asks for more: held that much longer, from now
    assert b2.snapshot("math")["retry_in_s"] == 20.0
    assert b2.snapshot("math")["trips"] == 0


def test_a_probe_answered_with_a_retry_after_reopens_for_that_wait_not_a_grown_cooldown() -> None:
    b, clock = make()
    fail(b, 3)  # tripped: cooldown 10
    clock.now += 10.0
    fail(b, error=limited(2.0))  # the probe is told to wait 2 s
    snap = b.snapshot("math")
    assert (snap["state"], snap["retry_in_s"], snap["trips"]) == ("open", 2.0, 1)
    clock.now += 2.0
    fail(b)  # the next probe fails plainly: the trip count (1) grows the cooldown as before
    assert b.snapshot("math")["cooldown_s"] == 20.0


def test_retry_after_left_to_the_failure_count_when_not_honoured() -> None:
    b, _ = make(honour_retry_after=False)
    fail(b, 2, error=limited(4.0))
    assert b.snapshot("math")["state"] == "closed"
    fail(b, error=limited(4.0))
    snap = b.snapshot("math")
    assert (snap["state"], snap["cooldown_s"], snap["held_by_retry_after"]) == ("open", 10.0, False)
    # a 503 without Retry-After is an ordinary failure either way
    b2, _ = make()
    fail(b2, 2)
    assert b2.snapshot("math")["state"] == "closed"


def test_a_late_retry_after_landing_while_half_open_holds_the_expert_for_its_wait() -> None:
    """A call admitted while closed comes back with Retry-After: 30 after the breaker tripped and its cooldown
    ended (half-open, a probe in flight). The expert's wait holds: the probe's success does not close the breaker,
    and no call goes before the 30 s are over; then one probe goes, and closes it."""
    b, clock = make()  # cooldown 10 s, cooldown_max_s 35
    late = b.admit("math")
    fail(b, 3)  # tripped
    clock.now += 10.0
    probe = b.admit("math")
    assert probe.probe
    b.finish(late, limited(30.0))
    snap = b.snapshot("math")
    assert (snap["state"], snap["retry_in_s"], snap["held_by_retry_after"], snap["trips"]) == ("open", 30.0, True, 1)
    b.finish(probe, None)  # its round ended with the hold: stale, it closes nothing
    assert b.snapshot("math")["state"] == "open"
    clock.now += 29.9
    assert b.refuses("math")
    clock.now += 0.1
    again = b.admit("math")
    assert again.probe and b.refuses("math")  # one probe at a time, as before
    b.finish(again, None)
    assert b.snapshot("math")["state"] == "closed"


def test_a_retry_after_from_a_probe_of_an_earlier_round_still_lengthens_the_wait() -> None:
    b, clock = make(half_open_probes=2)
    fail(b, 3)  # tripped: cooldown 10
    clock.now += 10.0
    first, second = b.admit("math"), b.admit("math")
    b.finish(second, DOWN)  # re-trips: cooldown 20, the round is over
    clock.now += 1.0
    b.finish(first, limited(30.0))  # stale as evidence, but the expert asked for 30 s: more than the 19 left
    snap = b.snapshot("math")
    assert (snap["state"], snap["retry_in_s"], snap["held_by_retry_after"]) == ("open", 30.0, True)
    b.finish(first, limited(5.0))  # less than is left: nothing changes
    assert b.snapshot("math")["retry_in_s"] == 30.0


def test_calls_admitted_before_a_reset_are_not_counted_after_it() -> None:
    """A reload that points an expert at another endpoint resets its breaker; the calls still hanging on the old
    endpoint then time out, and their failures must not trip the fresh breaker (nor their Retry-After hold it)."""
    b, clock = make()
    old_calls = [b.admit("math") for _ in range(5)]
    b.reset("math")
    for permit in old_calls[:4]:
        b.finish(permit, ExpertTimeout("math", "timed out"))
    b.finish(old_calls[4], ExpertRateLimited("math", 429, "slow down", retry_after_s=30.0))
    snap = b.snapshot("math")
    assert (snap["state"], snap["consecutive_failures"], snap["window_calls"]) == ("closed", 0, 0)
    b.admit("math")  # the new endpoint is let through
    fail(b, 3)  # and its own failures count as before
    assert b.snapshot("math")["state"] == "open"
    # A probe admitted before a second reset does not close or re-open the breaker after it either.
    clock.now += 10.0
    probe = b.admit("math")
    assert probe.probe
    b.reset("math")
    fail(b, 2)
    b.finish(probe, None)
    assert b.snapshot("math")["consecutive_failures"] == 2


def test_the_served_breakers_presume_a_probe_lost_after_the_request_deadline() -> None:
    """No call outlives its request's deadline, so a probe out for longer has lost its end (a replica killed mid-
    probe, with a shared store): the lease the built breakers use is the config's fallback.deadline_s."""
    from router.build import build_breakers
    from router.config import parse_config

    config = parse_config({"version": 1, "fallback": {"deadline_s": 7.5}, "experts": [
        {"name": "a", "type": "vllm", "endpoint": "http://127.0.0.1:9/v1", "model": "m"}]}, check_env=False)
    breakers = build_breakers(config)
    assert breakers.probe_lease_s == 7.5
    cfg = BreakerConfig(failure_threshold=1, failure_rate=None, cooldown_s=1, cooldown_max_s=1)
    now = [0.0]
    breakers = Breakers(cfg, clock=lambda: now[0], probe_lease_s=7.5)
    breakers.finish(breakers.admit("a"), ExpertUnavailable("a", "connection refused"))
    now[0] = 2.0
    breakers.admit("a")  # a probe whose end never comes
    now[0] = 9.0
    assert breakers.refuses("a")
    now[0] = 9.6
    assert not breakers.refuses("a")


def test_a_service_identity_follows_where_calls_go_not_how_the_expert_is_described() -> None:
    from router.config import parse_config

    def identity(**changed: object) -> str:
        expert = {"name": "a", "type": "vllm", "endpoint": "http://h:8000/v1", "model": "m", **changed}
        return parse_config({"version": 1, "experts": [expert]}, check_env=False).experts[0].service_identity()

    same = identity()
    assert identity(description="other words", timeout_s=9.0, examples=["x"]) == same
    assert len({same, identity(endpoint="http://h2:8000/v1"), identity(model="m2")}) == 3


def test_breakers_sharing_a_store_keep_each_service_apart() -> None:
    store = MemoryBreakerStore()
    cfg = BreakerConfig(failure_threshold=1, failure_rate=None)
    old = Breakers(cfg, store, services={"a": "one"})
    new = Breakers(cfg, store, services={"a": "two"})
    old.finish(old.admit("a"), ExpertUnavailable("a", "connection refused"))
    assert old.refuses("a") and not new.refuses("a")
    assert Breakers(cfg, store, services={"a": "one"}).refuses("a")
