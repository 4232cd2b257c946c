"""aurelio semantic-router side by side with the gate, on the identical split.

``evaluate_labels`` exports each label suite's split to ``<out>/split/{train,val,test}.jsonl`` (``write_split``).
``score_semantic_router`` installs the peer's own virtual environment if it is missing
(``bench/peers/install_semantic_router.sh``, idempotent: it pins openai < 3, so it cannot share ours), runs
``bench/peers/semantic_router_accuracy.py`` there on that split, and ``attach_peer`` adds its figures to the
suite's ``results.json`` (``metrics.peer_semantic_router_accuracy``, and ``..._oos_auroc`` where out-of-scope
queries exist). A result is reused while the split and the bench script are unchanged (their sha256 is kept
with it), so a second ``make results`` does not embed the peer's data again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.datasets import LabelledQuery
from eval.report import write_results
from router.files import atomic_write_text

log = logging.getLogger("eval.peer")

__all__ = ["PEER_KEY", "SPLIT_PARTS", "attach_peer", "score_semantic_router", "write_split"]

PEER_KEY = "peer_semantic_router"
SPLIT_PARTS = ("train", "val", "test")
_REPO = Path(__file__).resolve().parent.parent
_INSTALL = _REPO / "bench" / "peers" / "install_semantic_router.sh"
_SCRIPT = _REPO / "bench" / "peers" / "semantic_router_accuracy.py"


def write_split(folder: Path, train: Sequence[LabelledQuery], val: Sequence[LabelledQuery],
                test: Sequence[LabelledQuery]) -> None:
    """The split exactly as the gate saw it, one ``{"id", "query", "label"}`` per line (the labelled JSONL ``moe
    eval --train/--test`` and ``gate.train_data`` read), for peers and users to reuse."""
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in zip(SPLIT_PARTS, (train, val, test), strict=True):
        lines = (json.dumps({"id": q.id, "query": q.text, "label": q.label}, ensure_ascii=False) for q in rows)
        (folder / f"{part}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def peer_venv() -> Path:
    return Path(os.environ.get("SEMANTIC_ROUTER_VENV") or _REPO / "bench" / ".venv-semantic-router")


def _fingerprint(split: Path) -> str:
    h = hashlib.sha256(_SCRIPT.read_bytes())
    for part in SPLIT_PARTS:
        path = split / f"{part}.jsonl"
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()


def score_semantic_router(suite_out: Path, *, torch_threads: int = 0) -> dict[str, Any]:
    """The peer's figures on ``suite_out/split``; cached in ``suite_out/peer_semantic_router.json``."""
    split, cached = suite_out / "split", suite_out / f"{PEER_KEY}.json"
    if not (split / "train.jsonl").exists():
        raise FileNotFoundError(f"{split} holds no exported split; run the label suite first")
    key = _fingerprint(split)
    previous = _read_cache(cached)
    if previous is not None and previous.get("split_sha256") == key:
        return previous
    subprocess.run(["bash", str(_INSTALL)], check=True, env={**os.environ, "SEMANTIC_ROUTER_VENV": str(peer_venv())})
    # The peer imports nothing of ours; its stdout/stderr (progress) pass straight through.
    subprocess.run([str(peer_venv() / "bin" / "python"), str(_SCRIPT), "--split", str(split), "--out", str(cached),
                    "--torch-threads", str(torch_threads)], check=True)
    result = json.loads(cached.read_text(encoding="utf-8"))
    result["split_sha256"] = key
    # Under a temporary name, then renamed: a kill or a full disk part way leaves the file whole (the peer's own,
    # or the earlier one), never cut short.
    atomic_write_text(cached, json.dumps(result, indent=2) + "\n")
    return dict(result)


def _read_cache(cached: Path) -> dict[str, Any] | None:
    """The peer's cached result in ``cached``; None where there is none, or none that can be read (cut short by a
    kill or a full disk, say, before it was written atomically): then the peer is run again and writes it anew."""
    if not cached.exists():
        return None
    try:
        previous = json.loads(cached.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        log.warning("semantic-router peer cache %s is unreadable (%s); scoring the peer again", cached,
                    str(exc).partition("\n")[0][:200])
        return None
    if not isinstance(previous, dict):
        log.warning("semantic-router peer cache %s holds no JSON object; scoring the peer again", cached)
        return None
    return previous


def attach_peer(results: dict[str, Any], peer: dict[str, Any], out: Path) -> dict[str, Any]:
    """``results`` with the peer's headline figures in ``metrics`` and the rest under ``peer_semantic_router``;
    rewrites ``results.json`` and ``report.md`` in ``out``."""
    metrics = dict(results["metrics"])
    metrics[f"{PEER_KEY}_accuracy"] = peer["accuracy"]
    if "oos_auroc" in peer:
        metrics[f"{PEER_KEY}_oos_auroc"] = peer["oos_auroc"]
    gate_n = results.get("setup", {}).get("test")
    notes = list(results.get("notes", []))
    if gate_n is not None and gate_n != peer.get("test"):
        notes.append(f"peer scored {peer.get('test')} test queries, the gate {gate_n}: the splits differ")
    updated = {**results, "metrics": metrics, PEER_KEY: peer, "notes": notes}
    write_results(out, updated)
    return updated
