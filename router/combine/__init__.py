"""Combiners: from the weighted answers of a panel to one answer. The decisions are pure: no I/O, no model calls.

A combiner has one method, ``combine``. Every result says which experts contributed, with what weight, and
whether each agreed with the result. The orchestrator awaits ``acombine``, which is ``combine`` unless a
strategy needs more than the answers: ``consensus`` embeds them off the event loop, ``fuse`` calls a model
through the hook it is handed. Strategies (``COMBINERS``, the one place a strategy is declared: each class builds
itself from ``build_combiner``'s settings with ``from_settings``, so a new strategy is one class and one line):

- ``top1``: the highest-weight answer. Every answer that gives the same final answer (the same extracted
  answer, else the same text up to case and whitespace) is marked as agreeing with it.
- ``vote``: weighted vote on an extracted final answer; the extractor is set per combiner and may be
  overridden per expert. An answer that cannot be extracted loses its vote, not the request. The weights are
  the gate's panel weights, or learned per-expert weights (``router.vote_weights``).
- ``consensus``: the answer closest (cosine) to the weight-averaged embedding of all answers, with an
  injected embedding function and no extra model call. With ``choice_embedding`` (one-hot of the extracted
  letter) the centroid's coordinate for a letter is that letter's total weight, so consensus over letter
  answers is exactly a weighted vote (weighted agreement).
- ``fuse``: an aggregator expert writes the final answer from the answers and their weights
  (Mixture-of-Agents). The prompt building and the reading of the reply are pure (``Fuse.messages``,
  ``Fuse.result``); the one model call goes through an injected async hook (``Fuse.fuse``). Its plain
  ``combine`` cannot call a model, so it returns the top-weight answer (what ``fuse`` falls back to when the
  aggregator fails, with the failure in ``Combined.fallback``). With a single answer there is nothing to
  fuse: it is returned as it is, without an aggregator call.
- ``escalate``: answer consistency as a cascade. When every answer of the panel extracts to the same final
  answer, that answer stands (no further call); otherwise the ``escalate_to`` expert answers the client's own
  request, and its answer is the result (read from the panel without a new call when it is a member). A panel
  with a single answer has no second opinion, so it escalates too. A failed escalation falls back to the
  panel's weighted vote (``vote``'s, learned weights included), with the failure in ``Combined.fallback``.
  With a cheap panel and a strong ``escalate_to``, the strong model is paid for only where the cheap ones
  disagree.

Modules: ``base`` (the interface and its types), ``extract`` (the final-answer extractors), ``choose`` (``top1``,
``vote``, ``consensus``), ``write`` (``fuse``, ``escalate``); every public name is imported from here.
"""

from __future__ import annotations

from collections.abc import Mapping

from experts.plugins import COMBINER_GROUP, PluginError, installed, load
from router.combine.base import Aggregate, Combined, Combiner, CombinerSettings, Embed, EmptyAnswer, WeightedAnswer
from router.combine.choose import PLACES, TIE_BREAK, Consensus, TopOne, Vote, answer_embeddings, choice_embedding
from router.combine.extract import EXTRACTORS, Extraction, extract_choice, extract_number, extract_short, pooled
from router.combine.write import FUSE_SYSTEM, Escalate, Fuse, FusePromptTooLong
from router.trace import Contribution  # what a Combined lists; a combiner of one's own builds them
from router.vote_weights import VoteWeights

__all__ = ["COMBINERS", "EXTRACTORS", "FUSE_SYSTEM", "PLACES", "TIE_BREAK", "Aggregate", "Combined", "Combiner",
           "CombinerSettings", "Consensus", "Contribution", "Embed", "EmptyAnswer", "Escalate", "Extraction", "Fuse",
           "FusePromptTooLong", "TopOne", "Vote", "WeightedAnswer", "answer_embeddings", "build_combiner",
           "choice_embedding", "combiner_class", "extract_choice", "extract_number", "extract_short",
           "known_combiners", "pooled"]


# Strategy name (``combiner.strategy`` in the config, the ``x-moe-combiner`` header) -> its class. Adding a strategy
# is a ``Combiner`` subclass and one line here; ``router.config.schema.STRATEGIES`` lists the same names (a test
# holds the two equal). An installed package adds one through an entry point (``experts.plugins.COMBINER_GROUP``).
COMBINERS: dict[str, type[Combiner]] = {"top1": TopOne, "vote": Vote, "consensus": Consensus, "fuse": Fuse,
                                        "escalate": Escalate}


def known_combiners() -> list[str]:
    """Every strategy a config or a request may name: ``COMBINERS``' and the installed packages' entry points'."""
    return sorted({*COMBINERS, *installed(COMBINER_GROUP)})


def combiner_class(strategy: str) -> type[Combiner]:
    """The class of ``strategy``: ``COMBINERS``', else the one an installed package's entry point names. Raises
    ``ValueError`` naming the known strategies for an unknown one, and saying why for an entry point that cannot be
    loaded (a request naming it is refused as a bad strategy, a config naming it as a bad value)."""
    if strategy in COMBINERS:
        return COMBINERS[strategy]
    if strategy not in installed(COMBINER_GROUP):
        raise ValueError(f"unknown combiner strategy {strategy!r}; known: {', '.join(known_combiners())}")
    try:
        found: type[Combiner] = load(COMBINER_GROUP, strategy, Combiner)
    except PluginError as exc:
        raise ValueError(f"combiner strategy {strategy!r}: {exc}") from exc
    return found


def build_combiner(strategy: str, extractor: str = "choice", *, per_expert: Mapping[str, str] | None = None,
                   embed: Embed | None = None, aggregator: str | None = None,
                   vote_weights: Mapping[str, float] | VoteWeights | None = None,
                   escalate_to: str | None = None, max_prompt_chars: int | None = None) -> Combiner:
    """``extractor`` reads final answers, ``per_expert`` maps an expert to its own extractor (every strategy but
    ``consensus``, which embeds). ``consensus`` needs ``embed`` (``choice_embedding`` when omitted and
    ``extractor`` is ``"choice"``);
    ``fuse`` needs the ``aggregator`` expert's name, and ``max_prompt_chars`` bounds its prompt; ``escalate``
    needs the ``escalate_to`` expert's; ``vote_weights`` gives ``vote`` learned weights."""
    cls = combiner_class(strategy)
    settings = CombinerSettings(extractor=extractor, per_expert=per_expert, embed=embed, aggregator=aggregator,
                                vote_weights=vote_weights, escalate_to=escalate_to,
                                max_prompt_chars=max_prompt_chars)
    return cls.from_settings(settings)
