"""The gate as an operator drives it through the config, on a real MiniLM gate trained on SNIPS.

Adding an expert from a handful of config ``examples`` (cold start) must not make the trained experts' own
queries less familiar: the abstain threshold keeps ``OOD_KEEP`` of in-distribution queries, and it was fitted
on the trained classifier's probabilities, which the cold-start claims scale down.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from router.config import EncoderConfig
from router.encoders import Encoder, build_encoder
from router.gate import Gate, train_gate
from tests.support import snips_first

TRAINED = ["AddToPlaylist", "BookRestaurant", "GetWeather", "RateBook", "SearchCreativeWork"]
COLD = ["PlayMusic", "SearchScreeningEvent"]
PER_INTENT_TRAIN, PER_INTENT_TEST, COLD_EXAMPLES = 100, 40, 5


@pytest.fixture(scope="module")
def snips(data_dir: Path) -> dict[str, list[tuple[str, str]]]:
    return snips_first(data_dir, PER_INTENT_TRAIN, PER_INTENT_TEST)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return build_encoder(EncoderConfig(backend="onnx"))


@pytest.fixture(scope="module")
def gate(snips: dict[str, list[tuple[str, str]]], encoder: Encoder) -> Gate:
    pairs = [(t, label) for t, label in snips["train"] if label in TRAINED]
    texts, labels = zip(*pairs, strict=True)
    return train_gate(texts, labels, encoder, experts=TRAINED, progress=False)


def test_adding_experts_by_config_keeps_the_trained_experts_queries_as_familiar(
        gate: Gate, snips: dict[str, list[tuple[str, str]]]) -> None:
    cold = {n: [t for t, label in snips["train"] if label == n][:COLD_EXAMPLES] for n in COLD}
    view = gate.for_experts({**{e: [] for e in TRAINED}, **cold})
    assert view.experts == [*TRAINED, *COLD]
    texts = [t for t, label in snips["test"] if label in TRAINED]
    before, after = gate.assess(texts), view.assess(texts)
    threshold = gate.ood_threshold
    assert threshold is not None and view.ood_threshold == threshold
    # The new experts take a share of every row, so the trained experts' top probability falls ...
    assert np.median(after.probs.max(axis=1)) < np.median(before.probs.max(axis=1)) - 0.02
    # ... but their queries are as familiar as before: the nearest example can only get nearer, and the top
    # probability judged is the one the threshold was fitted on.
    assert (after.ood >= before.ood - 1e-12).all()
    assert (after.ood < threshold).sum() <= (before.ood < threshold).sum()
    # Without experts added, the familiarity is the row's own top probability, as before.
    plain = gate.for_experts({e: [] for e in reversed(TRAINED)})
    np.testing.assert_allclose(plain.assess(texts).ood, before.ood)
