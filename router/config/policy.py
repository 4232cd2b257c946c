"""How answers are combined (``combiner``) and failures handled (``fallback``, with its circuit ``breaker``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
)

from experts.plugins import COMBINER_GROUP
from router.config.fields import (
    NAME_PATTERN,
    Extractor,
    Strict,
)
from router.fallback import MAX_BUDGET_USD, MAX_DEADLINE_S

# The built-in combiner strategies (``router.combine.COMBINERS``; a test holds the two equal). Another name is looked
# up where strategies are registered: ``COMBINERS`` itself, and installed packages' entry points.
STRATEGIES = ("top1", "vote", "consensus", "fuse", "escalate")


class CombinerConfig(Strict):
    """How a panel's answers become one (``router.combine``): ``top1`` | ``vote`` | ``consensus`` | ``fuse`` |
    ``escalate``.

    ``consensus`` embeds the answers with the gate's encoder. ``fuse`` asks ``aggregator``, a configured expert,
    to write the final answer from the panel's; naming an aggregator also lets a request pick ``fuse`` with the
    ``x-moe-combiner`` header while another strategy is the default. ``escalate`` keeps the panel's answer when
    all of it agrees and otherwise asks ``escalate_to``, a configured expert; naming one likewise lets a request
    pick ``escalate``."""

    strategy: str = Field(default="top1", min_length=1)
    # How ``vote`` and ``escalate`` read a final answer out of free text; ``top1`` and ``fuse`` use it to mark
    # which answers agree. An expert's own ``extractor`` overrides it for that expert's answers.
    extractor: Extractor = "choice"
    # The expert that writes ``fuse``'s answer; must be one of ``experts`` (cross-checked at load).
    aggregator: str | None = Field(default=None, pattern=NAME_PATTERN)
    # The expert that answers when ``escalate``'s panel disagrees (typically the strongest and dearest); must be
    # one of ``experts`` (cross-checked at load).
    escalate_to: str | None = Field(default=None, pattern=NAME_PATTERN)
    # What an answer counts for in ``vote``: ``gate``, the panel weight the gate gave its expert; ``learned``,
    # per-expert weights fitted jointly on outcome records that carry ``answers`` (``router.vote_weights``),
    # written by ``moe train`` beside the gate artifact. Learned weights discount experts that err together.
    vote_weights: Literal["gate", "learned"] = "gate"
    # With learned vote weights: also learn how an answer's length against its expert's median answer moves
    # what it counts for (one fitted coefficient, ``router.vote_weights``); false: the weights alone.
    vote_length: bool = True
    # With learned vote weights: also learn, for each answer an expert gives often (a favourite letter), how much
    # more or less it counts when the expert gives that answer (``router.vote_weights``'s answer bias). Off by
    # default: on few records, or records whose right answers lean to some letters by accident, the bias can
    # outvote a clear majority. With ``vote_answer_bias_l2: cv`` cross-validation on your records decides whether
    # it is kept.
    vote_answer_bias: bool = False
    # With learned vote weights: the weights' L2 penalty, or ``cv``: chosen by ``moe train`` by 5-fold
    # cross-validation over the training records (``router.vote_weights.cross_validate``: the held-out records'
    # vote accuracy, among 1, 10, 30, 100 and 300; with fewer than 50 records that can teach, 10).
    vote_l2: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal["cv"] = "cv"
    # With the answer bias: its L2 penalty, or ``cv``: chosen the same way among 30, 100 and 300, where no bias at
    # all can win too (then the weights are fitted without one); with too few records, 100.
    vote_answer_bias_l2: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal["cv"] = "cv"

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str) -> str:
        if strategy in STRATEGIES:
            return strategy
        from router.combine import combiner_class  # numpy: imported only for a name that is not built in

        try:
            combiner_class(strategy)  # an entry point's class is imported, so that one serve cannot load is refused
        except ValueError as exc:
            plugins = f" (an installed package adds one through an entry point of group {COMBINER_GROUP!r})"
            raise ValueError(f"{exc}{plugins if str(exc).startswith('unknown') else ''}") from None
        return strategy


def _at_least(value: float, info: ValidationInfo, lower: str) -> float:
    """A ``..._max_s`` field's check that it is at least ``lower``, a field declared before it. Skipped when ``lower``
    was itself refused: its own error says why."""
    if lower in info.data and value < info.data[lower]:
        raise ValueError(f"must be at least {lower} ({info.data[lower]:g})")
    return value


class BreakerConfig(Strict):
    """A circuit breaker per expert (see ``router.breaker``): closed -> open -> half-open -> closed."""

    enabled: bool = True
    # Consecutive counted failures that open the breaker.
    failure_threshold: int = Field(default=5, ge=1, le=1000)
    # Also open when this share of the calls in the last ``window_s`` failed, once ``min_calls`` were made;
    # None leaves only the consecutive count.
    failure_rate: float | None = Field(default=0.5, gt=0.0, le=1.0)
    window_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    min_calls: int = Field(default=20, ge=1, le=100_000)
    # First cooldown; each re-trip from half-open multiplies it by ``cooldown_growth``, up to ``cooldown_max_s``.
    cooldown_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    cooldown_growth: float = Field(default=2.0, ge=1.0, le=10.0)
    # validate_default: a cooldown_s raised past the default cap is refused, not capped below itself at run time.
    cooldown_max_s: float = Field(default=60.0, gt=0.0, le=86_400.0, validate_default=True)
    # Calls let through at once while half-open; the first success closes the breaker.
    half_open_probes: int = Field(default=1, ge=1, le=100)
    # A 429's or 503's Retry-After opens the breaker for that long (capped at cooldown_max_s), so no request
    # calls the expert before the time it gave; false: such answers count as failures like any other.
    honour_retry_after: bool = True

    # A field validator, not a model one: it runs beside the other fields' checks (a model validator would wait
    # for every field to be valid, hiding this error behind any other), and it names the field it refuses.
    @field_validator("cooldown_max_s")
    @classmethod
    def _cooldown_ordered(cls, value: float, info: ValidationInfo) -> float:
        return _at_least(value, info, "cooldown_s")


class FallbackConfig(Strict):
    enabled: bool = True
    # Experts tried in all, the first choice (or the whole top-k panel, which is always called in full)
    # included; retries of one expert, skipped open breakers and saturated experts do not count.
    max_attempts: int = Field(default=3, ge=1, le=64)
    # Overall deadline for one request, across every attempt, retry wait and fallback.
    deadline_s: float = Field(default=120.0, gt=0.0, le=MAX_DEADLINE_S)
    # Retries of the same expert after a transient failure (connect error, timeout, 429, 5xx, bad JSON)
    # before falling back. 0 by default: the next-ranked expert is usually a quicker answer than a sick one.
    retries: int = Field(default=0, ge=0, le=10)
    # Jittered exponential backoff between retries: base * 2**n, capped at backoff_max_s, then jittered.
    backoff_base_s: float = Field(default=0.1, gt=0.0, le=60.0)
    backoff_max_s: float = Field(default=5.0, gt=0.0, le=600.0, validate_default=True)  # as cooldown_max_s
    # A 429's or 503's Retry-After is honoured up to this (and never past the deadline); a longer one falls back.
    retry_after_max_s: float = Field(default=5.0, ge=0.0, le=600.0)
    # USD a request may spend across all its attempts; once spent no further expert is tried. None: no limit.
    cost_budget_usd: float | None = Field(default=None, gt=0.0, le=MAX_BUDGET_USD)
    breaker: BreakerConfig = BreakerConfig()

    @field_validator("backoff_max_s")
    @classmethod
    def _backoff_ordered(cls, value: float, info: ValidationInfo) -> float:
        return _at_least(value, info, "backoff_base_s")  # as BreakerConfig's cooldown_max_s
