"""``python -m bench``: every benchmark, a table of our figures next to the peers', and ``bench/results/bench.json``.

Order: gate decision (the encoder backends and the two-stage gate, interleaved; openvino where its optional
package is installed) -> scaling (4/16/64 experts, k 1/3/5) -> router overhead against direct calls (top-1 with
the ONNX, static, two-stage and OpenVINO gates, streaming TTFT, top-3; concurrency 1, 8, 32, 128) -> throughput
and memory (the ONNX and OpenVINO routers' runs are memory runs, ``--memory-s`` long, 60 s by default; the
others ``--throughput-s``) -> profile (py-spy, when installed) -> peers (LiteLLM proxy; aurelio semantic-router), each
installed into its own virtual environment on first use. ``--skip-peers`` leaves the peers out; a peer that
cannot be installed, started or read is recorded as skipped, with the reason, and the run goes on.

Every step prints a line when it starts and when it ends, stamped with the seconds since the run began.
bench.json is written after each phase (``complete`` false, ``phases_done`` naming what is in it), so a late
failure keeps the earlier figures; paths in it are relative to the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import REPO, gate_bench, machine, provenance, repo_relative
from bench.data import snips
from bench.encoder_profile import profile_encoder
from bench.http_pool import measure as measure_http_pool
from bench.peers.install import LITELLM, SEMANTIC_ROUTER, PeerInstall
from bench.router_bench import RouterProcess, Target, add_unloaded_overhead, compare, throughput
from bench.upstream import UpstreamProcess
from router.config import TopKConfig
from router.encoders import default_threads, usable_cores

RESULTS = REPO / "bench" / "results"
LEVELS = (1, 8, 32, 128)
# The routers beside the ONNX one, each in the same rounds: (key prefix in bench.json, target name in the rounds,
# label in the table).
VARIANTS = (("static", "router_static", "static encoder"), ("cascade", "router_cascade", "two-stage gate"),
            ("openvino", "router_openvino", "OpenVINO encoder"))


def _server_impl() -> dict[str, str]:
    def has(module: str) -> bool:
        try:
            __import__(module)
        except ImportError:
            return False
        return True
    return {"loop": "uvloop" if has("uvloop") else "asyncio", "http": "httptools" if has("httptools") else "h11"}


class Progress:
    """Console lines for long work: each step's start and end, stamped with the seconds since the run began.

    ``out`` takes one line (default: print, flushed, so piping to a file or ``tee`` shows it at once).
    """

    def __init__(self, out: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.out = out or (lambda line: print(line, flush=True))
        self.clock = clock
        self.started = clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def say(self, message: str) -> None:
        self.out(f"[{self.elapsed():6.1f} s] {message}")

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        """``with progress.step("x") as notes:`` prints "x ...", then "x: done in N s" and whatever the body
        appended to ``notes`` (or "x: failed after N s" with the exception, which goes on)."""
        t0 = self.clock()
        notes: list[str] = []
        self.say(f"{name} ...")
        try:
            yield notes
        except BaseException as exc:
            self.say(f"{name}: failed after {self.clock() - t0:.1f} s ({type(exc).__name__}: {exc})")
            raise
        self.say(f"{name}: done in {self.clock() - t0:.1f} s" + (f" ({'; '.join(notes)})" if notes else ""))

    def ticker(self, label: str, total_s: float, every_s: float = 15.0) -> Callable[[float, float], None]:
        """An ``on_sample`` for ``throughput``: a line every ``every_s`` seconds with the RSS so far."""
        last = [0.0]

        def tick(elapsed_s: float, rss: float) -> None:
            if elapsed_s - last[0] >= every_s - 0.5:
                last[0] = elapsed_s
                self.say(f"  {label}: {elapsed_s:.0f} s of ~{total_s:.0f} s, RSS {rss:.0f} MB")
        return tick


def skip_peer(status: dict[str, Any], name: str, why: str, progress: Progress) -> dict[str, Any]:
    """Record why a peer was left out (``status["skipped"]``) and say it on the console too."""
    status["skipped"] = why
    progress.say(f"{name} skipped: {why}")
    return status


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip()[-300:]}"


def install_peer(peer: PeerInstall, progress: Progress) -> str | None:
    """Install a peer's venv on first use, saying so before and after; return why it is unavailable, or None."""
    where = repo_relative(peer.venv)
    first_use = not peer.installed()
    if first_use:
        progress.say(f"installing {peer.name} into {where} (first use, can take minutes) ...")
    t0 = time.perf_counter()
    why = peer.install()
    took = time.perf_counter() - t0
    if why is None:
        progress.say(f"{peer.name}: installed into {where} in {took:.0f} s" if first_use
                     else f"{peer.name}: already installed in {where}")
    else:
        progress.say(f"{peer.name}: install did not finish after {took:.0f} s")
    return why


def run_gate(args: argparse.Namespace, progress: Progress) -> tuple[dict[str, Any], dict[str, Any], Any]:
    from router.cascade import CascadeGate
    from router.encoders import OnnxMiniLMEncoder, SentenceTransformerEncoder
    from router.static_encoder import StaticMiniLMEncoder

    t0 = time.perf_counter()
    with progress.step("gate: loading SNIPS and training the ONNX, static, sentence-transformers, two-stage and "
                       "OpenVINO gates"):
        data = snips(per_label=60, n_test=args.gate_queries + 64)
        onnx = OnnxMiniLMEncoder()
        gates: dict[str, Any] = {"onnx": gate_bench.train(onnx, data),
                                 "static": gate_bench.train(StaticMiniLMEncoder(), data)}
        if args.torch_threads:
            # torch's default (one thread per core) collapses on a shared 2-core machine: one short query took
            # 190-830 ms with 2 threads against 26 ms with 1 while other jobs ran. Bounded as the ONNX encoder is:
            # default_threads(cores), so the peer's torch and our gate use the same number of threads.
            import torch

            torch.set_num_threads(args.torch_threads)
        gates["st"] = gate_bench.train(SentenceTransformerEncoder(), data)
        openvino = _openvino_encoder(progress)
        if openvino is not None:
            gates["openvino"] = gate_bench.train(openvino, data)
        # The two-stage gate (gate.cascade): the static gate decides what it is sure of, the ONNX gate the rest.
        gates["cascade"] = CascadeGate.train(gates["onnx"], gates["static"], data.train_texts, data.train_labels,
                                             agreement=0.995)
    t1 = time.perf_counter()
    with progress.step(f"gate: timing {args.gate_queries} decisions per backend, interleaved") as notes:
        # sentence-transformers is the slow reference: every third query is enough for its percentiles.
        figures = gate_bench.gate_figures(gates, data.test_texts[:args.gate_queries], data.test_texts[:320],
                                          every={"st": 3})
        notes.append(f"ONNX p50 {_fmt(figures['onnx']['p50_ms'])} ms, static {_fmt(figures['static']['p50_ms'])}"
                     f" ms, two-stage {_fmt(figures['cascade']['p50_ms'])} ms"
                     + (f", OpenVINO {_fmt(figures['openvino']['p50_ms'])} ms" if "openvino" in figures else ""))
    t2 = time.perf_counter()
    with progress.step("gate: scaling, 4/16/64 experts and k 1/3/5"):
        scaling = gate_bench.scaling(onnx, n_queries=args.scaling_queries)
    t3 = time.perf_counter()
    phases = {"load_and_train": round(t1 - t0, 1), "timing": round(t2 - t1, 1), "scaling": round(t3 - t2, 1)}
    return {"torch_threads": args.torch_threads or "default", "phases_s": phases,
            "data": f"SNIPS: {len(data.train_texts)} training queries, {len(data.labels)} experts",
            "gate_accuracy_val": gates["onnx"].metadata.metrics.accuracy,
            "static_gate_accuracy_val": gates["static"].metadata.metrics.accuracy,
            "onnx": figures["onnx"], "static": figures["static"], "st": figures["st"],
            "openvino": ({**figures["openvino"], "precision": gates["openvino"].encoder.precision}
                         if "openvino" in gates else None),
            "cascade": {**figures["cascade"], **gate_bench.cascade_figures(gates["cascade"],
                                                                           data.test_texts[:args.gate_queries])},
            "scaling": scaling}, gates, data


def _openvino_encoder(progress: Progress) -> Any:
    """The openvino backend's encoder, or None (said) where the optional package is not installed."""
    try:
        from router.openvino_encoder import OpenVinoMiniLMEncoder

        return OpenVinoMiniLMEncoder()
    except ImportError as exc:
        progress.say(f"gate: the openvino backend is left out ({exc})")
        return None


Targets = Callable[[int], dict[str, Target]]


async def _levels(targets: Targets, direct: str, texts: Sequence[str], *, stream: bool, scale: float,
                  progress: Progress, label: str) -> list[dict[str, Any]]:
    rows = []
    for c in LEVELS:
        with progress.step(f"{label}, concurrency {c}") as notes:
            row = await compare(targets(c), direct, texts, concurrency=c, stream=stream, scale=scale)
            notes.append("overhead p50 ms: " + ", ".join(
                f"{name} {_fmt(row[name].get('overhead_p50_ms'))}" for name in targets(c) if name in row))
        rows.append(row)
    return add_unloaded_overhead(rows)


def _throughput(progress: Progress, label: str, target: Target, direct: str, texts: Sequence[str],
                seconds: float, on_sample: Callable[[float, float], None] | None = None) -> dict[str, Any]:
    with progress.step(f"throughput: {label}, {seconds:.0f} s at 64 clients") as notes:
        out = asyncio.run(throughput(target, direct, texts, seconds=seconds, on_sample=on_sample))
        notes.append(f"{_fmt(out['rps'])} req/s, RSS {_fmt(out['rss_mb_start'])} -> {_fmt(out['rss_mb_end'])} MB")
    return out


def run_router(args: argparse.Namespace, gates: dict[str, Any], texts: Sequence[str], progress: Progress,
               out: dict[str, Any] | None = None, checkpoint: Callable[[], object] = lambda: None) -> dict[str, Any]:
    """The router phase; fills ``out`` as it goes and calls ``checkpoint()`` after each part."""
    from bench.profile import profile_router

    out = {} if out is None else out
    out.update({"server": _server_impl(), "upstream_latency_ms": args.upstream_ms})
    gate = gates["onnx"]
    scale = args.scale
    with UpstreamProcess(latency_ms=args.upstream_ms) as up:
        direct = up.url + "/chat/completions"
        progress.say("router: starting the ONNX, static, two-stage and OpenVINO routers")
        with RouterProcess(gate, up.url, k=1) as router, \
                RouterProcess(gates["static"], up.url, k=1, backend="static") as static, \
                RouterProcess(gates["cascade"], up.url, k=1, backend="cascade") as cascade, \
                (RouterProcess(gates["openvino"], up.url, k=1, backend="openvino") if "openvino" in gates
                 else contextlib.nullcontext()) as openvino:
            peer: dict[str, Any] = {}
            out["litellm"] = peer
            with _litellm(up.url, args, peer, progress) as proxy:
                # LiteLLM and the static-encoder and two-stage routers run in the same rounds as the router, so
                # all of them meet the same outside load.
                def top1(c: int) -> dict[str, Target]:
                    return {"router": router, "router_static": static, "router_cascade": cascade,
                            **({"router_openvino": openvino} if openvino is not None else {}),
                            **({"litellm": proxy} if proxy and c in args.peer_levels else {})}
                out["top1"] = asyncio.run(_levels(top1, direct, texts, stream=False, scale=scale, progress=progress,
                                                  label="router overhead, top-1"
                                                        + (", with LiteLLM" if proxy else "")))
                checkpoint()
                # The ONNX router's run is the memory run: --memory-s long (60 s), its RSS sampled each second.
                tick = progress.ticker("memory run", args.memory_s) if args.memory_s >= 20 else None
                out["throughput_top1"] = _throughput(progress, "ONNX router (memory run)", router, direct, texts,
                                                     args.memory_s, tick)
                out["throughput_top1_static"] = _throughput(progress, "static router", static, direct, texts,
                                                            args.throughput_s)
                out["throughput_top1_cascade"] = _throughput(progress, "two-stage router", cascade, direct, texts,
                                                             args.throughput_s)
                if openvino is not None:
                    # A memory run too: OpenVINO keeps what it prepares for each input shape it meets.
                    tick = progress.ticker("OpenVINO memory run", args.memory_s) if args.memory_s >= 20 else None
                    out["throughput_top1_openvino"] = _throughput(progress, "OpenVINO router (memory run)", openvino,
                                                                  direct, texts, args.memory_s, tick)
                if proxy is not None:
                    try:
                        peer["throughput"] = _throughput(progress, "LiteLLM proxy", proxy, direct, texts,
                                                         args.throughput_s)
                    except Exception as exc:  # a peer's failure is a figure left out, not a lost run
                        skip_peer(peer, "LiteLLM", f"throughput run failed: {_failure(exc)}", progress)
                checkpoint()
            if not peer:
                out["litellm"] = None
            only: dict[str, Target] = {"router": router}
            out["stream_ttft"] = asyncio.run(_levels(lambda c: only, direct, texts, stream=True, scale=scale,
                                                     progress=progress, label="streaming TTFT overhead"))
            checkpoint()
            if not args.no_profile:
                for key, target, raw_name, label in (("profile", router, "profile_raw.txt", "ONNX"),
                                                     ("profile_static", static, "profile_static_raw.txt", "static")):
                    with progress.step(f"profile: the {label} router under py-spy, {args.profile_s:.0f} s at c8"):
                        result = profile_router(target, texts, RESULTS, seconds=args.profile_s, raw_name=raw_name)
                    if "skipped" in result:
                        progress.say(f"profile skipped: {result['skipped']}")
                    out[key] = result
                checkpoint()
        progress.say("router: starting the top-3 router")
        with RouterProcess(gate, up.url, k=3, workdir=str(router.workdir)) as router3:
            only3: dict[str, Target] = {"router": router3}
            out["top3"] = asyncio.run(_levels(lambda c: only3, direct, texts, stream=False, scale=scale,
                                              progress=progress, label="top-3 fan-out overhead"))
    return out


@contextlib.contextmanager
def _litellm(upstream_url: str, args: argparse.Namespace, status: dict[str, Any],
             progress: Progress) -> Iterator[Target | None]:
    """The LiteLLM proxy on the upstream, or None (with ``status["skipped"]`` saying why, on the console too)."""
    if args.skip_peers:
        yield None
        return
    proxy = None
    try:
        from bench.peers.litellm_proxy import LiteLLMProxy

        why = install_peer(LITELLM, progress)
        if why is None:
            # LiteLLM has no gate: it is asked for its one model by name, so its figures are pure proxy cost.
            with progress.step("LiteLLM: starting the proxy"):
                proxy = LiteLLMProxy(upstream_url)
                proxy.__enter__()
            status["version"] = LITELLM.version()  # what install_litellm.sh installed (its stamp names it)
    except Exception as exc:  # any failure to install or start it leaves the peer out, not the run
        why = _failure(exc)
        if proxy is not None:
            proxy.__exit__()
            proxy = None
    if proxy is None:
        skip_peer(status, "LiteLLM", why or "unavailable", progress)
        yield None
        return
    try:
        yield proxy
    finally:
        proxy.__exit__()


def parse_peer_output(stdout: str) -> dict[str, Any]:
    """The peer script's result: the JSON object on its last non-empty line (ValueError when there is none)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no output")
    result = json.loads(lines[-1])
    if not isinstance(result, dict):
        raise ValueError(f"last line is not a JSON object: {lines[-1][:200]!r}")
    return result


def run_semantic_router(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """aurelio semantic-router's decision time, or ``{"skipped": why}``; never raises for the peer's failures."""
    import subprocess

    status: dict[str, Any] = {}
    try:
        why = install_peer(SEMANTIC_ROUTER, progress)
        if why:
            return skip_peer(status, "semantic-router", why, progress)
        command = [str(SEMANTIC_ROUTER.venv / "bin" / "python"), "-m", "bench.peers.semantic_router_peer",
                   "--queries", str(args.peer_queries), "--torch-threads", str(args.torch_threads)]
        with progress.step(f"semantic-router: timing {args.peer_queries} decisions in its own venv") as notes:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
            result = parse_peer_output(done.stdout)
            notes.append(f"p50 {_fmt(result.get('p50_ms'))} ms")
        return result
    except subprocess.CalledProcessError as exc:
        why = f"failed (exit {exc.returncode}): {(exc.stderr or '').strip()[-300:]}"
    except subprocess.TimeoutExpired as exc:
        why = f"timed out after {exc.timeout:.0f} s: {exc.cmd[0]}"
    except Exception as exc:  # unreadable output, a missing venv: the peer is left out, the run goes on
        why = _failure(exc)
    return skip_peer(status, "semantic-router", why, progress)


# --- the report -------------------------------------------------------------------------------------------

def _at(levels: list[dict[str, Any]] | None, concurrency: int, key: str = "overhead_p50_ms",
        target: str = "router") -> Any:
    for row in levels or []:
        if row["concurrency"] == concurrency and target in row:
            return row[target].get(key)
    return None


def _ratio(ours: Any, theirs: Any) -> float | None:
    if not isinstance(ours, int | float) or not isinstance(theirs, int | float) or theirs == 0:
        return None
    return round(ours / theirs, 3)


def flatten(gate: dict[str, Any], router: dict[str, Any], semantic: dict[str, Any] | None) -> dict[str, Any]:
    """The headline keys the issue asks for, next to the full figures."""
    thr = router.get("throughput_top1", {})
    thr_static = router.get("throughput_top1_static", {})
    thr_cascade = router.get("throughput_top1_cascade", {})
    thr_openvino = router.get("throughput_top1_openvino") or {}
    openvino = gate.get("openvino") or {}
    litellm = router.get("litellm") or {}
    cpu_c32 = _at(router.get("top1"), 32, "cpu_ms_per_request")
    litellm_cpu_c32 = _at(router.get("top1"), 32, "cpu_ms_per_request", target="litellm")
    out: dict[str, Any] = {
        "gate_p50_ms": gate["onnx"]["p50_ms"], "gate_p99_ms": gate["onnx"]["p99_ms"],
        "gate_batch_qps": gate["onnx"]["batch_qps"],
        "st_gate_p50_ms": gate["st"]["p50_ms"], "st_gate_p99_ms": gate["st"]["p99_ms"],
        "st_gate_batch_qps": gate["st"]["batch_qps"],
        "static_gate_p50_ms": gate["static"]["p50_ms"], "static_gate_p99_ms": gate["static"]["p99_ms"],
        "static_gate_batch_qps": gate["static"]["batch_qps"],
        "cascade_gate_p50_ms": gate["cascade"]["p50_ms"], "cascade_gate_p99_ms": gate["cascade"]["p99_ms"],
        "cascade_gate_batch_qps": gate["cascade"]["batch_qps"],
        "cascade_fast_share": gate["cascade"]["fast_share"],
        "cascade_agreement_with_onnx": gate["cascade"]["agreement_with_full"],
        "openvino_precision": openvino.get("precision"),
        "openvino_gate_p50_ms": openvino.get("p50_ms"), "openvino_gate_p99_ms": openvino.get("p99_ms"),
        "openvino_gate_batch_qps": openvino.get("batch_qps"),
    }
    for c in LEVELS:
        out[f"router_overhead_p50_ms_c{c}"] = _at(router.get("top1"), c)
        out[f"router_overhead_p99_ms_c{c}"] = _at(router.get("top1"), c, "overhead_p99_ms")  # old name
        # router p99 minus direct p99 (two separate p99s; not a p99 of per-request overhead)
        out[f"router_p99_difference_ms_c{c}"] = _at(router.get("top1"), c, "p99_difference_ms")
    for prefix, target, _ in VARIANTS:
        for c in LEVELS:
            out[f"{prefix}_router_overhead_p50_ms_c{c}"] = _at(router.get("top1"), c, target=target)
    for c in LEVELS:
        out[f"stream_ttft_overhead_p50_ms_c{c}"] = _at(router.get("stream_ttft"), c)
    for c in LEVELS:
        out[f"top3_overhead_p50_ms_c{c}"] = _at(router.get("top3"), c)
    out.update({
        "router_rps_top1": thr.get("rps"), "router_cpu_ms_per_request_top1": thr.get("cpu_ms_per_request"),
        "direct_rps_same_client": thr.get("direct_rps_same_client"),
        "static_router_rps_top1": thr_static.get("rps"),
        "static_router_cpu_ms_per_request_top1": thr_static.get("cpu_ms_per_request"),
        "cascade_router_rps_top1": thr_cascade.get("rps"),
        "cascade_router_cpu_ms_per_request_top1": thr_cascade.get("cpu_ms_per_request"),
        "openvino_router_rps_top1": thr_openvino.get("rps"),
        "openvino_router_cpu_ms_per_request_top1": thr_openvino.get("cpu_ms_per_request"),
        "openvino_router_memory_run_s": thr_openvino.get("rss_span_s", thr_openvino.get("seconds")),
        "openvino_router_rss_mb_start": thr_openvino.get("rss_mb_start"),
        "openvino_router_rss_mb_end": thr_openvino.get("rss_mb_end"),
        "openvino_router_rss_growth_pct": thr_openvino.get("rss_growth_pct"),
        # The ONNX router's throughput run is the memory run (--memory-s): RSS sampled once a second.
        "router_memory_run_s": thr.get("rss_span_s", thr.get("seconds")),
        "router_rss_mb_start": thr.get("rss_mb_start"), "router_rss_mb_end": thr.get("rss_mb_end"),
        "router_rss_mb_max": thr.get("rss_mb_max"), "router_rss_growth_pct": thr.get("rss_growth_pct"),
        "litellm_overhead_p50_ms_c32": _at(router.get("top1"), 32, target="litellm"),
        "litellm_rps": (litellm.get("throughput") or {}).get("rps"),
        "litellm_cpu_ms_per_request": (litellm.get("throughput") or {}).get("cpu_ms_per_request"),
        "router_cpu_ms_per_request_c32": cpu_c32, "litellm_cpu_ms_per_request_c32": litellm_cpu_c32,
        "semantic_router_decision_p50_ms": (semantic or {}).get("p50_ms"),
        "gate_p50_ms_same_window": (semantic or {}).get("our_gate_p50_ms_same_window"),
        "st_gate_p50_ms_same_window": (semantic or {}).get("our_st_gate_p50_ms_same_window"),
        "router_rss_mb_per_min_late": thr.get("rss_mb_per_min_late"),
        "openvino_router_rss_mb_per_min_late": thr_openvino.get("rss_mb_per_min_late"),
    })
    for c in LEVELS:  # against the direct p50 at concurrency 1: the upper bracket (router_bench.add_unloaded_overhead)
        out[f"router_overhead_p50_vs_unloaded_ms_c{c}"] = _at(router.get("top1"), c, "overhead_p50_vs_unloaded_ms")
    out["litellm_overhead_p50_vs_unloaded_ms_c32"] = _at(router.get("top1"), 32, "overhead_p50_vs_unloaded_ms",
                                                         target="litellm")
    for c in LEVELS:
        peer = _at(router.get("top1"), c, target="litellm")
        if peer is not None:
            out[f"litellm_overhead_p50_ms_c{c}"] = peer
    out["ratio_overhead_router_vs_litellm_c32"] = _ratio(out["router_overhead_p50_ms_c32"],
                                                         out["litellm_overhead_p50_ms_c32"])
    out["ratio_rps_router_vs_litellm"] = _ratio(out["router_rps_top1"], out["litellm_rps"])
    for prefix, _, _ in VARIANTS:
        out[f"ratio_overhead_{prefix}_vs_litellm_c32"] = _ratio(out[f"{prefix}_router_overhead_p50_ms_c32"],
                                                                out["litellm_overhead_p50_ms_c32"])
        out[f"ratio_rps_{prefix}_vs_litellm"] = _ratio(out[f"{prefix}_router_rps_top1"], out["litellm_rps"])
    out["ratio_cpu_router_vs_litellm"] = _ratio(out["router_cpu_ms_per_request_top1"],
                                                out["litellm_cpu_ms_per_request"])
    out["ratio_gate_vs_semantic_router_p50"] = _ratio(out["gate_p50_ms_same_window"],
                                                      out["semantic_router_decision_p50_ms"])
    out["ratio_gate_onnx_vs_st_p50"] = _ratio(out["gate_p50_ms"], out["st_gate_p50_ms"])
    out["ratio_st_gate_vs_semantic_router_p50"] = _ratio(out["st_gate_p50_ms_same_window"],
                                                         out["semantic_router_decision_p50_ms"])
    out["ratio_overhead_vs_unloaded_router_vs_litellm_c32"] = _ratio(out["router_overhead_p50_vs_unloaded_ms_c32"],
                                                                     out["litellm_overhead_p50_vs_unloaded_ms_c32"])
    if out["litellm_overhead_p50_ms_c32"] is None and out["semantic_router_decision_p50_ms"] is None:
        out["peers"] = "not run"
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


P99_DIFFERENCE = "p99 difference (router p99 − direct p99)"


def memory_label(seconds: Any, encoder: str = "ONNX") -> str:
    """A memory row's label, saying how long the run its RSS samples cover was."""
    span = f" over {seconds:.0f} s" if isinstance(seconds, int | float) else ""
    return f"router RSS MB{span} ({encoder}, 64 clients), start -> end"


def table(flat: dict[str, Any], gate: dict[str, Any], router: dict[str, Any]) -> str:
    rows: list[tuple[str, Any, Any, Any, str]] = [
        ("gate decision p50 ms (ONNX int8)", flat["gate_p50_ms"], None, None, "<= 3"),
        ("  again, right after semantic-router ran", flat["gate_p50_ms_same_window"],
         flat["semantic_router_decision_p50_ms"], flat["ratio_gate_vs_semantic_router_p50"], ""),
        ("gate decision p99 ms (ONNX int8)", flat["gate_p99_ms"], None, None, ""),
        ("gate batch q/s (ONNX, batches of 64)", flat["gate_batch_qps"], None, None, ">= 400"),
        ("gate decision p50 ms (ST fp32, interleaved)", flat["st_gate_p50_ms"], None, None, ""),
        ("  again, alone, right after semantic-router ran", flat.get("st_gate_p50_ms_same_window"),
         flat["semantic_router_decision_p50_ms"], flat.get("ratio_st_gate_vs_semantic_router_p50"), ""),
        ("gate batch q/s (ST fp32)", flat["st_gate_batch_qps"], None, None, ""),
        ("gate decision p50 ms (static table)", flat["static_gate_p50_ms"], None, None, ""),
        ("gate batch q/s (static table)", flat["static_gate_batch_qps"], None, None, ""),
        ("gate decision p50 ms (two-stage gate)", flat["cascade_gate_p50_ms"], None, None, ""),
        ("  share decided by the static stage", flat["cascade_fast_share"], None, None, ""),
        ("  same pick as the ONNX gate", flat["cascade_agreement_with_onnx"], None, None, ""),
        ("gate batch q/s (two-stage)", flat["cascade_gate_batch_qps"], None, None, ""),
        (f"gate decision p50 ms (OpenVINO {flat.get('openvino_precision') or '-'})",
         flat.get("openvino_gate_p50_ms"), None, None, "<= 3"),
        ("gate batch q/s (OpenVINO)", flat.get("openvino_gate_batch_qps"), None, None, ">= 400"),
    ]
    for c in LEVELS:
        peer = flat.get(f"litellm_overhead_p50_ms_c{c}")
        rows.append((f"router overhead p50 ms, top-1, c{c}", flat[f"router_overhead_p50_ms_c{c}"], peer,
                     _ratio(flat[f"router_overhead_p50_ms_c{c}"], peer), "<= 2, <= 1/3 LiteLLM" if c == 32 else ""))
    rows += [(f"  same, against the direct p50 at c1 (upper bracket), c{c}",
              flat.get(f"router_overhead_p50_vs_unloaded_ms_c{c}"),
              flat.get("litellm_overhead_p50_vs_unloaded_ms_c32") if c == 32 else None,
              flat.get("ratio_overhead_vs_unloaded_router_vs_litellm_c32") if c == 32 else None, "")
             for c in LEVELS[1:]]
    for prefix, _, label in VARIANTS:
        for c in LEVELS:
            peer, ours = flat.get(f"litellm_overhead_p50_ms_c{c}"), flat[f"{prefix}_router_overhead_p50_ms_c{c}"]
            rows.append((f"  same, {label}, c{c}", ours, peer, _ratio(ours, peer), ""))
    rows += [(f"top-1 {P99_DIFFERENCE} ms, c{c}", flat.get(f"router_p99_difference_ms_c{c}"), None, None, "")
             for c in LEVELS]
    rows += [(f"stream TTFT overhead p50 ms, c{c}", flat[f"stream_ttft_overhead_p50_ms_c{c}"], None, None, "")
             for c in LEVELS]
    rows += [(f"top-3 fan-out overhead p50 ms, c{c}", flat[f"top3_overhead_p50_ms_c{c}"], None, None, "")
             for c in LEVELS]
    litellm_rps, litellm_cpu = flat["litellm_rps"], flat["litellm_cpu_ms_per_request"]
    rows.append(("throughput req/s, top-1", flat["router_rps_top1"], litellm_rps, flat["ratio_rps_router_vs_litellm"],
                 ">= 500"))
    rows += [(f"  same, {label}", flat[f"{prefix}_router_rps_top1"], litellm_rps,
              flat[f"ratio_rps_{prefix}_vs_litellm"], "") for prefix, _, label in VARIANTS]
    rows += [
        ("  same client, direct to upstream req/s", flat["direct_rps_same_client"], None, None, "client ceiling"),
        ("CPU ms per request (service process)", flat["router_cpu_ms_per_request_top1"], litellm_cpu,
         flat["ratio_cpu_router_vs_litellm"], ""),
    ]
    rows += [(f"  same, {label}", flat[f"{prefix}_router_cpu_ms_per_request_top1"], litellm_cpu,
              _ratio(flat[f"{prefix}_router_cpu_ms_per_request_top1"], litellm_cpu), "")
             for prefix, _, label in VARIANTS]
    rows.append(("  same, at c32 (rounds shared with LiteLLM)", flat["router_cpu_ms_per_request_c32"],
                 flat["litellm_cpu_ms_per_request_c32"],
                 _ratio(flat["router_cpu_ms_per_request_c32"], flat["litellm_cpu_ms_per_request_c32"]), ""))
    for prefix, encoder in (("", "ONNX"), ("openvino_", "OpenVINO")):  # the two memory runs
        rows += [
            (memory_label(flat.get(f"{prefix}router_memory_run_s"), encoder),
             f"{_fmt(flat.get(f'{prefix}router_rss_mb_start'))} -> {_fmt(flat.get(f'{prefix}router_rss_mb_end'))}",
             None, None, "flat"),
            ("  RSS growth, first to last sample %", flat.get(f"{prefix}router_rss_growth_pct"), None, None, ""),
            ("  RSS slope over the run's second half, MB/min", flat.get(f"{prefix}router_rss_mb_per_min_late"),
             None, None, "~0"),
        ]
    width = max(44, *(len(name) for name, *_ in rows))
    head = f"{'metric':<{width}} {'ours':>14} {'peer':>10} {'ratio':>7}  target"
    lines = [head, "-" * len(head)]
    lines += [f"{name:<{width}} {_fmt(ours):>14} {_fmt(peer):>10} {_fmt(ratio):>7}  {target}"
              for name, ours, peer, ratio, target in rows]
    for key, label in (("profile", "ONNX"), ("profile_static", "static")):
        buckets = (router.get(key) or {}).get("buckets_pct")
        if buckets:
            lines += ["", f"where the {label} router's time goes (py-spy, c8): "
                      + ", ".join(f"{name} {pct:.0f}%" for name, pct in list(buckets.items())[:5])]
    ops = gate.get("encoder_profile", {}).get("ops", [])[:4]
    lines += ["", "ONNX encoder, kernel time by operator: "
              + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in ops) + " (bench.encoder_profile)"]
    lines += ["", "peers: LiteLLM proxy (overhead, req/s, CPU), aurelio semantic-router (decision p50)", "",
              f"{'scaling: experts':<18} {'k':>3} {'p50 ms':>8} {'p99 ms':>8} {'score+top-k us':>15} {'batch q/s':>10}"]
    lines += [f"{r['experts']:<18} {r['k']:>3} {_fmt(r['p50_ms']):>8} {_fmt(r['p99_ms']):>8} "
              f"{_fmt(r['post_embedding_us']):>15} {_fmt(r['batch_qps_k1']):>10}" for r in gate["scaling"]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-peers", action="store_true", help="leave out LiteLLM and semantic-router")
    parser.add_argument("--no-profile", action="store_true", help="leave out the py-spy profile")
    parser.add_argument("--throughput-s", type=float, default=8.0,
                        help="length of each throughput run but the memory runs (static, two-stage, LiteLLM)")
    parser.add_argument("--memory-s", type=float, default=60.0,
                        help="length of the ONNX and OpenVINO routers' throughput runs, whose RSS samples give "
                             "memory flatness")
    parser.add_argument("--profile-s", type=float, default=5.0)
    parser.add_argument("--upstream-ms", type=float, default=5.0, help="the upstream's fixed latency")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the request count of every run")
    parser.add_argument("--gate-queries", type=int, default=300)
    parser.add_argument("--scaling-queries", type=int, default=100)
    parser.add_argument("--torch-threads", type=int, default=default_threads(usable_cores()),
                        help="torch threads for sentence-transformers and semantic-router, by default the ONNX "
                             "encoder's own thread count, so the peer gets as many as our gate (0: torch's default)")
    parser.add_argument("--peer-queries", type=int, default=150, help="semantic-router decisions timed")
    parser.add_argument("--peer-levels", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--out", type=Path, default=RESULTS / "bench.json")
    return parser.parse_args(argv)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The options this run used, JSON-ready (paths relative to the repository root), so it can be repeated."""
    return {key: repo_relative(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def assemble(base: dict[str, Any], *, gate: dict[str, Any] | None, router: dict[str, Any] | None,
             semantic: dict[str, Any] | None, pool_rows: list[dict[str, Any]] | None, phases: dict[str, float],
             elapsed_s: float, done: Sequence[str], complete: bool, error: str | None = None) -> dict[str, Any]:
    """bench.json's content so far: the headline keys (once the gate is measured), then the full figures.

    ``complete`` is false in the partial files written after each phase; ``phases_done`` names the phases in it,
    and ``error`` says what stopped a run that did not finish.
    """
    report = dict(base)
    if gate is not None:
        report.update(flatten(gate, router or {}, semantic))
    report.update({"http_pool": pool_rows, "gate": gate, "router": router, "semantic_router": semantic,
                   "phases_s": dict(phases), "elapsed_s": round(elapsed_s, 1),
                   "complete": complete, "phases_done": list(done)})
    if error is not None:
        report["error"] = error
    return report


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON in one step (a temporary file renamed over it): a crash mid-write leaves the
    previous file whole, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    started = progress.started
    base: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                            "machine": machine(), "code": provenance(), "options": options(args)}
    phases: dict[str, float] = {}
    done: list[str] = []
    state: dict[str, Any] = {"gate": None, "router": None, "semantic": None, "pool_rows": None}

    def save(*, complete: bool = False, error: str | None = None) -> dict[str, Any]:
        report = assemble(base, gate=state["gate"], router=state["router"], semantic=state["semantic"],
                          pool_rows=state["pool_rows"], phases=phases, elapsed_s=progress.elapsed(), done=done,
                          complete=complete, error=error)
        write_report(args.out, report)
        return report

    def finish(phase: str) -> None:
        phases[phase] = round(time.perf_counter() - started - sum(phases.values()), 1)
        done.append(phase)
        save()
        progress.say(f"{phase}: phase done in {phases[phase]} s; partial results in {repo_relative(args.out)}")

    progress.say(f"bench: {'without peers' if args.skip_peers else 'with LiteLLM and semantic-router'}; "
                 f"memory run {args.memory_s:.0f} s, other throughput runs {args.throughput_s:.0f} s; "
                 f"writing {repo_relative(args.out)} after each phase")
    try:
        gate, gates, data = run_gate(args, progress)
        state["gate"] = gate
        with progress.step("gate: onnxruntime's profile of the encoder"):
            gate["encoder_profile"] = profile_encoder(data.test_texts)
        with progress.step("HTTP clients: one expert's connections at 8 and 64 in flight"), \
                UpstreamProcess(latency_ms=args.upstream_ms) as up:
            state["pool_rows"] = asyncio.run(measure_http_pool(up.url + "/chat/completions", (8, 64), 2000))
        finish("gate")
        progress.say("router: overhead, throughput and memory, streaming, profile, top-3"
                     + ("" if args.skip_peers else ", LiteLLM in the same rounds"))
        state["router"] = {}
        run_router(args, gates, data.test_texts, progress, out=state["router"], checkpoint=save)
        finish("router")
        if not args.skip_peers:
            progress.say("peer: semantic-router decision time")
            try:
                semantic = run_semantic_router(args, progress)
            except Exception as exc:  # the peer is left out, the figures so far stay
                semantic = skip_peer({}, "semantic-router", _failure(exc), progress)
            state["semantic"] = semantic
            if "skipped" not in semantic:
                # The peer ran in another process, minutes after our gate was timed; time ours again right after
                # it, so the ratio compares two figures taken under the same outside load.
                with progress.step("gate: timing ours again, in the peer's window"):
                    # Each gate alone on the peer's queries, as the peer was timed: the ONNX gate, and the
                    # sentence-transformers gate (the same fp32 model as the peer's), not interleaved with others.
                    for key, name in (("our_gate_p50_ms_same_window", "onnx"),
                                      ("our_st_gate_p50_ms_same_window", "st")):
                        again = gate_bench.interleaved_times_ms(
                            {name: gate_bench.decider(gates[name], TopKConfig(k=1))},
                            data.test_texts[:args.peer_queries])[name]
                        semantic[key] = gate_bench.stats(again)["p50_ms"]
            finish("semantic_router")
    except BaseException as exc:
        try:
            save(error=_failure(exc))
        except Exception as write_exc:  # keep the run's own error, not this one
            progress.say(f"could not write the partial results: {_failure(write_exc)}")
        else:
            progress.say(f"stopped ({_failure(exc)}); the figures measured so far are in {repo_relative(args.out)}"
                         f" (phases done: {', '.join(done) or 'none'})")
        raise
    report = save(complete=True)
    flat = flatten(state["gate"], state["router"], state["semantic"])
    pool_rows = state["pool_rows"]
    print()
    print(table(flat, state["gate"], state["router"]))
    print("\none expert's connections, CPU ms per request (bench.http_pool): " + ", ".join(
        f"c{r['concurrency']} {r['client']} {r['cpu_ms_per_request']:.2f}" for r in pool_rows))
    print(f"\n{report['date']} on {report['machine']['cpu_model']} ({report['machine']['cores']} cores), "
          f"Python {report['machine']['python']}; load avg at start {report['machine']['load_avg_at_start']}")
    print(f"wrote {repo_relative(args.out)} in {report['elapsed_s']} s")


if __name__ == "__main__":
    main()
