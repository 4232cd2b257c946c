"""``make demo``: the whole mixture-of-experts path on real recorded outputs of eleven real LLMs.

1. Build the gate's training file from RouterBench's train split: outcome records, i.e. for every question
   each expert's recorded correctness and USD cost.
2. Train the gate with ``moe train``'s own code: MiniLM embeddings and a model of each expert's chance of
   success; the config's ``cost_weight`` trades that chance against the expert's cost.
3. Serve the replay experts behind the router over real HTTP (uvicorn on a free local port).
4. Send every held-out test question (never seen in training) through the SDK: once routed (``auto``), and
   once straight to each expert.
5. Print and write (JSON + Markdown) accuracy, total USD cost and latency for the router, every expert and
   the oracle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval.convert import convert, replay_names
from eval.suite import check_limit
from experts.recordings import RouterBenchRow, RouterBenchStore, load_routerbench, normalize_prompt
from router.build import build_orchestrator
from router.config import RouterConfig, load_config
from router.files import atomic_write_text
from router.logs import JsonFormatter
from router.sdk import AsyncClient, RouterAPIError
from router.service import create_app
from router.train import train_from_config

__all__ = ["DemoRow", "main", "run_demo"]

CONCURRENCY = 4
LOG = "router.log"  # the service's request log, in --out


@dataclass
class DemoRow:
    system: str
    questions: int
    accuracy: float
    cost_usd: float
    latency_ms_p50: float
    latency_ms_mean: float
    errors: int = 0


def _replay_path(config: RouterConfig) -> Path:
    """The RouterBench recordings the config's replay experts play."""
    first = next(e for e in config.experts if e.replay is not None and e.replay.source == "routerbench")
    assert first.replay is not None
    return config.resolve(first.replay.path)


def write_training_file(config: RouterConfig, limit: int | None = None) -> tuple[Path, int]:
    """The outcome records the config's gate trains on (``moe convert routerbench --split train``): for every
    question of RouterBench's train split (``limit`` of them, sampled, when given), each replay expert's recorded
    correctness and USD cost; an expert with no record for a question is left out of it."""
    path = config.resolve(config.gate.train_data[0])
    return path, convert("routerbench", _replay_path(config), "train", path, names=replay_names(config),
                         answers=False, limit=limit)


def held_out(store: RouterBenchStore) -> list[RouterBenchRow]:
    """Test questions whose prompt never occurs in the train split."""
    seen = {normalize_prompt(r.prompt) for r in store.select(split="train")}
    return [r for r in store.select(split="test") if normalize_prompt(r.prompt) not in seen]


class _Server:
    """uvicorn serving the router on a free loopback port, in a background thread."""

    def __init__(self, config: RouterConfig, log_file: Path) -> None:
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        app = create_app(build_orchestrator(config))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        # The service's JSON request logs go to a file: on the terminal they would bury the progress bars. Added
        # after uvicorn's Config, whose logging setup closes every handler that exists by then.
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
        self.log_handler.setFormatter(JsonFormatter())
        self.logger = logging.getLogger("router")
        self.logger.addHandler(self.log_handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the router service did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.logger.removeHandler(self.log_handler)
        self.log_handler.close()


async def _ask_all(url: str, rows: list[RouterBenchRow], model: str, label: str) -> list[dict[str, Any]]:
    semaphore = asyncio.Semaphore(CONCURRENCY)
    results: list[dict[str, Any]] = []
    async with AsyncClient(url, timeout=120) as client:
        async def one(row: RouterBenchRow) -> None:
            async with semaphore:
                start = time.perf_counter()
                try:
                    answer = await client.chat(row.prompt, model=model)
                except RouterAPIError as exc:
                    results.append({"row": row, "expert": None, "cost": 0.0, "error": exc.code,
                                    "latency_ms": (time.perf_counter() - start) * 1000.0})
                    return
                results.append({"row": row, "expert": answer.expert, "cost": answer.cost_usd, "error": None,
                                "latency_ms": (time.perf_counter() - start) * 1000.0})

        tasks = [asyncio.create_task(one(r)) for r in rows]
        for task in tqdm(asyncio.as_completed(tasks), total=len(tasks), desc=f"asking {label}", unit="q"):
            await task
    return results


def _score(system: str, results: list[dict[str, Any]], column_of: dict[str, str]) -> DemoRow:
    """Accuracy as RouterBench recorded it for the expert that actually answered; a failed request is wrong."""
    correct = 0.0
    for r in results:
        if r["expert"] is not None:
            correct += r["row"].answers[column_of[r["expert"]]].correct or 0.0
    latencies = [r["latency_ms"] for r in results]
    return DemoRow(system=system, questions=len(results), accuracy=correct / max(len(results), 1),
                   cost_usd=sum(r["cost"] for r in results), latency_ms_p50=statistics.median(latencies),
                   latency_ms_mean=statistics.fmean(latencies), errors=sum(r["error"] is not None for r in results))


def _oracle(rows: list[RouterBenchRow], columns: list[str]) -> DemoRow:
    """Any expert right counts as right, at the cost of the cheapest right one (or the cheapest, if none)."""
    correct, cost = 0, 0.0
    for row in rows:
        right = [row.answers[c].cost_usd or 0.0 for c in columns if row.answers[c].correct == 1.0]
        correct += bool(right)
        cost += min(right) if right else min(row.answers[c].cost_usd or 0.0 for c in columns)
    return DemoRow(system="oracle (cheapest correct)", questions=len(rows), accuracy=correct / len(rows),
                   cost_usd=cost, latency_ms_p50=0.0, latency_ms_mean=0.0)


def _markdown(rows: list[DemoRow], meta: dict[str, Any]) -> str:
    lines = [
        "# Demo: routed vs. every single expert on held-out RouterBench questions",
        "",
        f"{meta['test_questions']} test questions (ARC-Challenge, MBPP, Winogrande) never seen in training; "
        f"gate trained on the recorded outcomes of {meta['train_examples']} train questions, "
        f"cost weight {meta['cost_weight']}. "
        f"Accuracy and cost are RouterBench's recorded outcomes of the expert that answered; latency is the "
        f"client's wall time per request through the HTTP service (replay experts answer in-process).",
        "",
        "| system | accuracy | total cost (USD) | latency p50 (ms) | latency mean (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r.system} | {r.accuracy:.3f} | {r.cost_usd:.4f} | {r.latency_ms_p50:.1f} | "
              f"{r.latency_ms_mean:.1f} | {r.errors} |" for r in rows]
    lines += ["", "Router's choices: " + ", ".join(f"{k} {v}" for k, v in meta["routing"].items())]
    return "\n".join(lines) + "\n"


def run_demo(config_path: str | Path, out: Path, limit: int | None = None) -> list[DemoRow]:
    check_limit(limit)
    config = load_config(config_path, check_env=False)
    # The demo scores every expert on RouterBench's recorded answers: one without recordings has nothing to be
    # scored by (and would fail after the training and the serving).
    others = [e.name for e in config.experts if e.replay is None or e.replay.source != "routerbench"]
    if others:
        raise ValueError(f"{config_path}: moe demo scores RouterBench replay experts only, and "
                         f"{', '.join(map(repr, others))} {'is' if len(others) == 1 else 'are'} not one; serve "
                         "this config with moe serve, and score it with moe eval")
    print(f"[1/4] loading RouterBench recordings for {len(config.experts)} replay experts", flush=True)
    store = load_routerbench(_replay_path(config))
    train_file, n_train = write_training_file(config)
    print(f"      wrote the outcomes of {n_train} train questions to {train_file}", flush=True)
    print("[2/4] training the gate", flush=True)
    gate = train_from_config(config, progress=True)
    rows = held_out(store)[:limit] if limit else held_out(store)
    column_of = {e.name: e.recorded_model for e in config.experts}
    # The run's log is written beside the earlier run's files and takes its name with them at the end: a run that
    # is stopped leaves the earlier results with their own log (and its own log, as router.log.partial).
    log = out / f"{LOG}.partial"
    print(f"[3/4] serving the router over HTTP; {len(rows)} held-out test questions (request logs: {log}, then "
          f"{out / LOG})", flush=True)
    with _Server(config, log) as url:
        routed = asyncio.run(_ask_all(url, rows, "auto", "router"))
        table = [_score("router (auto)", routed, column_of)]
        for name in config.expert_names:
            table.append(_score(name, asyncio.run(_ask_all(url, rows, name, name)), column_of))
    table.append(_oracle(rows, list(column_of.values())))
    routing = Counter(r["expert"] for r in routed)
    meta = {"train_examples": n_train, "cost_weight": config.gate.cost_weight, "test_questions": len(rows),
            "routing": dict(routing.most_common()),
            "gate_validation": gate.metadata.as_dict()["metrics"]}
    print("[4/4] results", flush=True)
    markdown = _markdown(table, meta)
    publish(out, json.dumps({"rows": [asdict(r) for r in table], **meta}, indent=2) + "\n", markdown, log)
    print(markdown)
    print(f"written: {out / 'results.json'}, {out / 'results.md'}")
    return table


def publish(out: Path, results: str, markdown: str, log: Path) -> None:
    """Put one run's files in ``out``: ``results.json`` and ``results.md``, each written whole under a temporary
    name and renamed in, then its request log ``log`` renamed to ``router.log``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown)
    os.replace(log, out / LOG)


def main(args: argparse.Namespace) -> int:
    if args.data:
        os.environ["MOE_DATA_DIR"] = str(Path(args.data).resolve())
    run_demo(args.config, Path(args.out), args.limit)
    return 0
