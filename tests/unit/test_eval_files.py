"""What the evaluation harness reads and writes: an encoder instance gets the embedding cache of its own
truncation, and `moe convert` never leaves a half-written or emptied file behind."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import eval.harness as harness
from eval.embeddings import CachedEncoder
from eval.harness import run_suite
from tests.doubles.fakes import FakeHashingEncoder


class _Truncating(FakeHashingEncoder):
    """The fake encoder reading only the first ``max_length`` words, as a real one reads its first tokens."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return super().encode([" ".join(t.split()[:self.max_length]) for t in texts])


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_an_encoder_instance_with_another_max_length_gets_its_own_embedding_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache folder names the truncation (``len<max_length>``). An Encoder instance passed to ``run_suite``
    was filed under the default's 256 whatever its own max_length, so a run with a 4-word encoder read back the
    vectors a 256-word one had cached for the same texts (and the other way round)."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    rows = [{"query": " ".join(["shared", "opening", "words", "here", words[i % 10], f"w{i}"]),
             "label": "ab"[i % 2]} for i in range(40)]
    train, test = _jsonl(tmp_path / "train.jsonl", rows[:30]), _jsonl(tmp_path / "test.jsonl", rows[30:])
    made: list[CachedEncoder] = []

    def recording(*args: Any, **kwargs: Any) -> CachedEncoder:
        made.append(CachedEncoder(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(harness, "CachedEncoder", recording)
    for n, width in enumerate((256, 4)):
        run_suite("jsonl", None, tmp_path / f"out{n}", encoder=_Truncating(width), train=train, test=test,
                  plots=False, progress=False, cache_dir=tmp_path / "cache")
    assert [c.folder.name.rsplit("-", 1)[1] for c in made] == ["len256", "len4"]
    texts = [r["query"] for r in rows[30:]]
    assert np.allclose(made[1].encode(texts), _Truncating(4).encode(texts))  # its own vectors, not the cached 256's


@pytest.mark.parametrize("dataset", ["routerbench", "mmlu-pro-outcome", "snips-intent"])
def test_a_convert_that_fails_leaves_the_file_it_would_write_as_it_was(dataset: str, tmp_path: Path) -> None:
    """``moe convert`` opened --out before reading the data set, so a run that then failed (no data set at
    --data) emptied the training file a config names, and a new path was left behind as an empty file."""
    from eval.convert import convert

    kept = tmp_path / "train.jsonl"
    kept.write_text('{"query": "q", "label": "a"}\n', encoding="utf-8")
    fresh = tmp_path / "new.jsonl"
    for out in (kept, fresh):
        with pytest.raises((ValueError, OSError), match="nonexistent"):
            convert(dataset, tmp_path / "nonexistent", "train", out)
    assert kept.read_text(encoding="utf-8") == '{"query": "q", "label": "a"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


def test_convert_names_out_when_its_folder_cannot_be_made(data_dir: Path, tmp_path: Path) -> None:
    """A path through a file: one line naming --out, not a bare ``[Errno 17] File exists``."""
    from eval.convert import convert

    (tmp_path / "afile").write_text("", encoding="utf-8")
    out = tmp_path / "afile" / "x.jsonl"
    with pytest.raises(ValueError, match=f"--out {out}: cannot create its folder"):
        convert("snips-intent", data_dir, "train", out, limit=5)
