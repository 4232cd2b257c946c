"""Retry decisions: which failures are retried, how long the wait is, and what caps it."""

import pytest

from experts.errors import (
    ExpertAuthError,
    ExpertError,
    ExpertOverloaded,
    ExpertProtocolError,
    ExpertRateLimited,
    ExpertRejected,
    ExpertServerError,
    ExpertTimeout,
    ExpertUnavailable,
    NoRecording,
)
from router.config import FallbackConfig
from router.retry import RETRY_AFTER_SLACK_S, RetryPolicy, backoff_delay, is_retryable, retry_delay

POLICY = RetryPolicy(retries=3, backoff_base_s=0.1, backoff_max_s=0.5, retry_after_max_s=2.0)


def half() -> float:
    return 0.5


@pytest.mark.parametrize("error", [ExpertUnavailable("e", "refused"), ExpertTimeout("e", "slow"),
                                   ExpertServerError("e", 503, "busy"), ExpertRateLimited("e", 429, "slow down"),
                                   ExpertProtocolError("e", "bad json")])
def test_transient_failures_are_retried(error: ExpertError) -> None:
    assert is_retryable(error)
    assert retry_delay(POLICY, error, 0, 10.0, half) is not None


@pytest.mark.parametrize("error", [ExpertRejected("e", 400, "bad request"), ExpertAuthError("e", 401, "key"),
                                   NoRecording("e", "none"), ExpertOverloaded("e", "full")])
def test_permanent_failures_and_overload_are_not_retried(error: ExpertError) -> None:
    assert retry_delay(POLICY, error, 0, 10.0, half) is None


def test_backoff_is_exponential_capped_and_jittered() -> None:
    assert [backoff_delay(POLICY, n, lambda: 0.0) for n in range(4)] == pytest.approx([0.05, 0.1, 0.2, 0.25])
    assert [backoff_delay(POLICY, n, lambda: 1.0) for n in range(4)] == pytest.approx([0.1, 0.2, 0.4, 0.5])
    assert backoff_delay(POLICY, 10_000, lambda: 1.0) == pytest.approx(0.5)  # no overflow on absurd counts


def test_retries_stop_at_the_configured_count() -> None:
    error = ExpertUnavailable("e", "refused")
    assert retry_delay(POLICY, error, 2, 10.0, half) is not None
    assert retry_delay(POLICY, error, 3, 10.0, half) is None
    assert retry_delay(RetryPolicy(retries=0), error, 0, 10.0, half) is None


def test_retry_after_is_honoured_within_its_cap_and_the_deadline() -> None:
    # waited out, and RETRY_AFTER_SLACK_S more (a timer may end a wait a little early by the breaker's clock)
    assert retry_delay(POLICY, ExpertRateLimited("e", 429, "x", retry_after_s=1.5), 0, 10.0, half) == \
        1.5 + RETRY_AFTER_SLACK_S
    # shorter than the backoff: the backoff wins
    assert retry_delay(POLICY, ExpertRateLimited("e", 429, "x", retry_after_s=0.0), 0, 10.0, half) == \
        pytest.approx(0.075)
    # a backoff a hair longer than the Retry-After still ends the slack past it
    assert retry_delay(POLICY, ExpertRateLimited("e", 429, "x", retry_after_s=0.074), 0, 10.0, half) == \
        pytest.approx(0.074 + RETRY_AFTER_SLACK_S)
    # longer than retry_after_max_s: fall back instead of waiting
    assert retry_delay(POLICY, ExpertRateLimited("e", 429, "x", retry_after_s=3.0), 0, 10.0, half) is None
    # longer than what is left of the deadline: no wait either
    assert retry_delay(POLICY, ExpertRateLimited("e", 429, "x", retry_after_s=1.5), 0, 1.0, half) is None


def test_no_wait_past_the_deadline() -> None:
    assert retry_delay(POLICY, ExpertUnavailable("e", "x"), 2, 0.1, half) is None


def test_a_timeout_is_retried_only_when_the_deadline_leaves_the_retry_its_whole_timeout() -> None:
    """A retry after a timeout needs the expert's timeout again; with less left, it would only spend the rest of
    the deadline on the expert that just failed, and fallback would find no time for a healthy one."""
    timeout = ExpertTimeout("e", "no answer within 2s")
    assert retry_delay(POLICY, timeout, 0, 3.0, half, timeout_s=2.0) == pytest.approx(0.075)  # 0.075 + 2 <= 3
    assert retry_delay(POLICY, timeout, 0, 1.0, half, timeout_s=2.0) is None
    assert retry_delay(POLICY, timeout, 0, 1.0, half) == pytest.approx(0.075)  # no timeout_s: the wait alone
    # Other failures come back fast, so the wait alone is weighed against the deadline.
    assert retry_delay(POLICY, ExpertUnavailable("e", "refused"), 0, 1.0, half, timeout_s=2.0) == \
        pytest.approx(0.075)


def test_a_wait_must_leave_the_retry_half_of_its_time() -> None:
    """After its wait, a retry must still have half the time it would get now (its expert's timeout_s, cut
    short by what is left of the deadline); otherwise the wait is not made, and fallback gets the time."""
    def limited(wait: float) -> ExpertRateLimited:
        return ExpertRateLimited("e", 429, "x", retry_after_s=wait)

    # 2 s left, a 5 s timeout: the retry could have 2 s, so the wait may leave no less than 1 s.
    assert retry_delay(POLICY, limited(1.0), 0, 2.0, half, timeout_s=5.0) == 1.0 + RETRY_AFTER_SLACK_S
    assert retry_delay(POLICY, limited(1.5), 0, 2.0, half, timeout_s=5.0) is None
    assert retry_delay(POLICY, limited(1.85), 0, 2.0, half, timeout_s=5.0) is None
    # 10 s left, a 2 s timeout: the wait may leave no less than 1 s, which 1.5 s does with room to spare.
    assert retry_delay(POLICY, limited(1.5), 0, 10.0, half, timeout_s=2.0) == 1.5 + RETRY_AFTER_SLACK_S
    assert retry_delay(POLICY, limited(1.5), 0, 2.4, half, timeout_s=2.0) is None
    # A backoff is held to the same rule: 0.3 s (the third retry's) leaves 0.4 of 0.7 s, not 0.2 of 0.5 s.
    assert retry_delay(POLICY, ExpertServerError("e", 502, "x"), 2, 0.7, half, timeout_s=2.0) == pytest.approx(0.3)
    assert retry_delay(POLICY, ExpertServerError("e", 502, "x"), 2, 0.5, half, timeout_s=2.0) is None
    # Without a timeout_s the deadline alone is the retry's time: the wait may take half of it.
    assert retry_delay(POLICY, limited(1.0), 0, 2.0, half) == 1.0 + RETRY_AFTER_SLACK_S
    assert retry_delay(POLICY, limited(1.5), 0, 2.0, half) is None


def test_policy_from_config_and_bounds() -> None:
    cfg = FallbackConfig(retries=2, backoff_base_s=0.2, backoff_max_s=1.0)
    assert RetryPolicy.from_config(cfg) == RetryPolicy(2, 0.2, 1.0, 5.0)
    with pytest.raises(ValueError, match=r"backoff_max_s\n.*must be at least backoff_base_s \(2\)"):
        FallbackConfig(backoff_base_s=2.0, backoff_max_s=1.0)
    with pytest.raises(ValueError):
        FallbackConfig(retries=11)
