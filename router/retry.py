"""Retry decisions, kept apart from I/O: whether a failed call to one expert is tried again, and after how long.

Only transient failures are retried: connect errors and resets, timeouts, 429, 5xx and malformed replies
(``ExpertError.transient``). A 4xx, an auth error or a missing recording fails the same way every time, so it
goes straight to fallback. ``ExpertOverloaded`` is transient but not retried here: the expert's own in-flight
limit is full, and load-aware routing hands the query to the next expert by weight instead of waiting.

The wait is exponential in the retry number with "equal jitter" (half fixed, half random), so retries of many
requests spread out yet each still backs off. A Retry-After (a 429's, or a 503's: standard HTTP for how long
the server expects to be unavailable) replaces the backoff when it is longer; one longer than
``retry_after_max_s`` is not waited for at all.

Nor is a wait, Retry-After or backoff, that would eat the time the retry needs: after it, the retry must still
have at least ``RETRY_TIME_SHARE`` (half) of the time it would get without waiting (the expert's ``timeout_s``,
cut short by what is left of the request's deadline). Otherwise the expert is not retried, and fallback moves
on at once to the next expert with the time that is left, rather than spending it on the wait. After a timeout
the retry needs the expert's whole ``timeout_s`` after the wait.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from experts.errors import ExpertError, ExpertOverloaded, ExpertTimeout
from router.config import FallbackConfig

__all__ = ["RETRY_AFTER_SLACK_S", "RETRY_TIME_SHARE", "RetryPolicy", "backoff_delay", "is_retryable", "retry_delay"]

# The share of its time limit a retry must still have once its wait is over (``retry_delay``).
RETRY_TIME_SHARE = 0.5

# A retry that waits out a Retry-After waits this much longer. An event loop's timer may end a wait early by the
# clock the breaker reads (time.monotonic): uvloop's count whole milliseconds from the time its loop iteration
# began, so a wait of 1 s could end 1-2 ms short, and the breaker, holding the expert for exactly the Retry-After,
# refused the retry it should have let through as its probe.
RETRY_AFTER_SLACK_S = 0.005


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 0
    backoff_base_s: float = 0.1
    backoff_max_s: float = 5.0
    retry_after_max_s: float = 5.0

    @classmethod
    def from_config(cls, cfg: FallbackConfig) -> RetryPolicy:
        return cls(cfg.retries, cfg.backoff_base_s, cfg.backoff_max_s, cfg.retry_after_max_s)


def is_retryable(error: ExpertError) -> bool:
    return error.transient and not isinstance(error, ExpertOverloaded)


def backoff_delay(policy: RetryPolicy, retry: int, rand: Callable[[], float]) -> float:
    """The wait before retry number ``retry`` (0-based): base * 2**retry capped at the max, then jittered."""
    cap = min(policy.backoff_max_s, policy.backoff_base_s * 2.0 ** min(retry, 60))
    return cap / 2.0 + rand() * cap / 2.0


def retry_delay(policy: RetryPolicy, error: ExpertError, retry: int, remaining_s: float,
                rand: Callable[[], float], *, timeout_s: float | None = None) -> float | None:
    """Seconds to wait before retrying the expert that raised ``error``, or None to stop retrying it.

    ``retry`` counts the retries already made of this expert for this request; ``remaining_s`` is what is left
    of the request's deadline; ``timeout_s`` is the expert's own time limit (None: the deadline alone limits it).

    A wait that would leave the retry too little time is not worth making: the retry would most likely be cut
    off by the deadline, and the time spent waiting is gone for fallback to a healthy expert too. So after the
    wait the retry must still have ``RETRY_TIME_SHARE`` of its time limit as it stands now (``timeout_s``, or
    ``remaining_s`` when that is shorter). After a timeout, the retry would need the expert's whole
    ``timeout_s`` again: when the deadline cannot give it that after the wait, the retry could only spend what
    is left on an expert that just failed to answer in time, and leave nothing for fallback, so it is not made.
    """
    if retry >= policy.retries or not is_retryable(error):
        return None
    delay = wait = backoff_delay(policy, retry, rand)
    asked = error.retry_after_s  # a 429's or 503's Retry-After: the only retryable errors that carry one
    if asked is not None:
        if asked > policy.retry_after_max_s:
            return None
        # The deadline is weighed against the wait asked for; the wait made is a little longer, so that it ends
        # after the breaker's hold whatever the event loop's timer does.
        delay, wait = max(delay, asked), max(wait, asked + RETRY_AFTER_SLACK_S)
    limit = remaining_s if timeout_s is None else min(timeout_s, remaining_s)
    needed = timeout_s if isinstance(error, ExpertTimeout) and timeout_s is not None else RETRY_TIME_SHARE * limit
    return wait if remaining_s - delay >= needed and delay < remaining_s else None

