"""Where the router's time goes for top-1 non-streaming: py-spy samples the router process under load.

py-spy (``pip install py-spy``) samples every thread of the running service from outside, so the encoder's
worker threads are seen as well as the event loop, and the service runs unmodified. Samples are grouped into
buckets by the most specific part of the system on their stack; threads parked waiting for work are idle and
left out. Without py-spy the profile is skipped and says so.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import repo_relative
from bench.router_bench import RouterProcess
from bench.upstream import chat_payload, run_load

__all__ = ["BUCKETS", "find_py_spy", "profile_router", "summarise"]

# (bucket, markers): a sample goes to the first bucket with a marker anywhere on its stack.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("gate: MiniLM encoder (onnxruntime run)", ("onnxruntime/",)),
    ("gate: tokenise, pool, classifier, top-k",
     ("router/encoders.py", "router/static_encoder.py", "router/gate.py", "router/topk.py")),
    ("gate: thread hand-off (to_thread)", ("concurrent/futures/thread.py",)),
    ("expert call: HTTP client to upstream",
     ("experts/openai_compat.py", "experts/http_client.py", "aiohttp/", "httpx/", "httpcore/")),
    ("orchestrator: trace, fallback, combine",
     ("router/orchestrator.py", "router/walk.py", "router/streaming.py", "router/aggregation.py", "router/trace.py",
      "router/combine/")),
    ("service handler: parse, validate, JSON",
     ("router/service.py", "router/edge.py", "router/handling.py", "router/completions.py")),
    ("HTTP server: uvicorn, h11, starlette, fastapi",
     ("uvicorn/protocols", "uvicorn/middleware", "h11/", "starlette/", "fastapi/")),
    ("event loop, sockets", ("asyncio/", "selectors.py")),
]
_IDLE_LEAVES = ("_worker (concurrent/futures/thread.py:81)", "select (selectors.py", "wait (threading.py")


def find_py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def summarise(raw: str, top: int = 15) -> dict[str, Any]:
    """Buckets (share of busy samples) and the busiest leaf functions, from py-spy's ``--format raw``."""
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    busy = idle = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        if any(mark in frames[-1] for mark in _IDLE_LEAVES):
            idle += n
            continue
        busy += n
        leaves[frames[-1]] += n
        joined = ";".join(frames[1:])
        buckets[next((name for name, marks in BUCKETS if any(m in joined for m in marks)), "other")] += n
    share = {name: round(100.0 * n / max(busy, 1), 1) for name, n in buckets.most_common()}
    return {"busy_samples": busy, "idle_samples": idle, "buckets_pct": share,
            "top_leaves_pct": {f: round(100.0 * n / max(busy, 1), 1) for f, n in leaves.most_common(top)}}


async def _drive(router: RouterProcess, texts: Sequence[str], seconds: float, concurrency: int) -> dict[str, Any]:
    payloads = [chat_payload(t) for t in texts]
    result = await run_load(router.url, payloads, concurrency=concurrency, requests=10**9, max_seconds=seconds)
    return result.summary()


def profile_router(router: RouterProcess, texts: Sequence[str], out_dir: Path, *, seconds: float = 5.0,
                   concurrency: int = 8, raw_name: str = "profile_raw.txt") -> dict[str, Any]:
    spy = find_py_spy()
    if spy is None:
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    asyncio.run(_drive(router, texts, 1.0, concurrency))  # warm: connections, thread pool
    raw_path = out_dir / raw_name
    proc = subprocess.Popen([spy, "record", "--pid", str(router.pid), "--duration", str(int(seconds)),
                             "--rate", "200", "--threads", "--format", "raw", "-o", str(raw_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # py-spy attaches
    load = asyncio.run(_drive(router, texts, seconds, concurrency))
    try:
        _, err = proc.communicate(timeout=seconds + 15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"skipped": "py-spy did not finish"}
    if proc.returncode != 0 or not raw_path.exists():
        return {"skipped": f"py-spy failed: {err.strip()[-300:]}"}
    return {"load": load, **summarise(raw_path.read_text()), "raw": repo_relative(raw_path)}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.profile``: one router under py-spy at a chosen concurrency, outside ``make bench``
    (which profiles at 8): the same SNIPS gate and fast upstream, the summary printed and written as
    ``bench/results/profile_<backend>_c<N>.json`` beside the raw samples."""
    import argparse
    import json

    from bench import gate_bench
    from bench.data import snips
    from bench.upstream import UpstreamProcess
    from router.encoders import OnnxMiniLMEncoder
    from router.static_encoder import StaticMiniLMEncoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--backend", choices=("onnx", "static"), default="onnx")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    data = snips(per_label=60, n_test=400)  # as make bench trains its gate
    encoder = OnnxMiniLMEncoder() if args.backend == "onnx" else StaticMiniLMEncoder()
    gate = gate_bench.train(encoder, data)
    name = f"profile_{args.backend}_c{args.concurrency}"
    with UpstreamProcess(latency_ms=5.0) as up, RouterProcess(gate, up.url, backend=args.backend) as router:
        print(f"profiling the {args.backend} router for {args.seconds:.0f} s at concurrency {args.concurrency}",
              flush=True)
        result = profile_router(router, data.test_texts, results, seconds=args.seconds,
                                concurrency=args.concurrency, raw_name=f"{name}_raw.txt")
    for bucket, pct in result.get("buckets_pct", {}).items():
        print(f"  {pct:5.1f}%  {bucket}")
    print(result.get("skipped") or f"load: {json.dumps(result['load'])}")
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {results / f'{name}.json'}")


if __name__ == "__main__":
    main()
