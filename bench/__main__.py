"""``python -m bench``: every benchmark, a table of our figures next to the peers', and ``bench/results/bench.json``.

Order: gate decision (the three encoder backends, interleaved) -> scaling (4/16/64 experts, k 1/3/5) -> router
overhead against direct calls (top-1 with the ONNX and the static encoder, streaming TTFT, top-3; concurrency
1, 8, 32, 128) -> throughput and memory (both encoders) -> profile (py-spy, when installed) -> peers (LiteLLM
proxy; aurelio semantic-router), each installed into its own virtual environment on first use. ``--skip-peers``
leaves the peers out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import gate_bench
from bench.data import snips
from bench.encoder_profile import profile_encoder
from bench.http_pool import measure as measure_http_pool
from bench.router_bench import RouterProcess, Target, compare, throughput
from bench.upstream import UpstreamProcess
from router.config import TopKConfig

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = (1, 8, 32, 128)


def _machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {"cpu_model": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_at_start": load}


def _server_impl() -> dict[str, str]:
    def has(module: str) -> bool:
        try:
            __import__(module)
        except ImportError:
            return False
        return True
    return {"loop": "uvloop" if has("uvloop") else "asyncio", "http": "httptools" if has("httptools") else "h11"}


def run_gate(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], Any]:
    from router.cascade import CascadeGate
    from router.encoders import OnnxMiniLMEncoder, SentenceTransformerEncoder
    from router.static_encoder import StaticMiniLMEncoder

    t0 = time.perf_counter()
    data = snips(per_label=60, n_test=args.gate_queries + 64)
    onnx = OnnxMiniLMEncoder()
    gates: dict[str, Any] = {"onnx": gate_bench.train(onnx, data),
                             "static": gate_bench.train(StaticMiniLMEncoder(), data)}
    if args.torch_threads:
        # torch's default (one thread per core) collapses on a shared 2-core machine: one short query took
        # 190-830 ms with 2 threads against 26 ms with 1 while other jobs ran. Match the ONNX encoder's policy.
        import torch

        torch.set_num_threads(args.torch_threads)
    gates["st"] = gate_bench.train(SentenceTransformerEncoder(), data)
    # The two-stage gate (gate.cascade): the static gate decides what it is sure of, the ONNX gate the rest.
    gates["cascade"] = CascadeGate.train(gates["onnx"], gates["static"], data.train_texts, data.train_labels,
                                         agreement=0.995)
    t1 = time.perf_counter()
    # sentence-transformers is the slow reference: every third query is enough for its percentiles.
    figures = gate_bench.gate_figures(gates, data.test_texts[:args.gate_queries], data.test_texts[:320],
                                      every={"st": 3})
    t2 = time.perf_counter()
    scaling = gate_bench.scaling(onnx, n_queries=args.scaling_queries)
    t3 = time.perf_counter()
    print(f"  load+train {t1 - t0:.1f} s, timing {t2 - t1:.1f} s, scaling {t3 - t2:.1f} s", flush=True)
    phases = {"load_and_train": round(t1 - t0, 1), "timing": round(t2 - t1, 1), "scaling": round(t3 - t2, 1)}
    return {"torch_threads": args.torch_threads or "default", "phases_s": phases,
            "data": f"SNIPS: {len(data.train_texts)} training queries, {len(data.labels)} experts",
            "gate_accuracy_val": gates["onnx"].metadata.metrics.accuracy,
            "static_gate_accuracy_val": gates["static"].metadata.metrics.accuracy,
            "onnx": figures["onnx"], "static": figures["static"], "st": figures["st"],
            "cascade": {**figures["cascade"], **gate_bench.cascade_figures(gates["cascade"],
                                                                           data.test_texts[:args.gate_queries])},
            "scaling": scaling}, gates, data


Targets = Callable[[int], dict[str, Target]]


async def _levels(targets: Targets, direct: str, texts: Sequence[str], *, stream: bool,
                  scale: float) -> list[dict[str, Any]]:
    return [await compare(targets(c), direct, texts, concurrency=c, stream=stream, scale=scale) for c in LEVELS]


def run_router(args: argparse.Namespace, gates: dict[str, Any], texts: Sequence[str]) -> dict[str, Any]:
    from bench.profile import profile_router

    out: dict[str, Any] = {"server": _server_impl(), "upstream_latency_ms": args.upstream_ms}
    gate = gates["onnx"]
    with UpstreamProcess(latency_ms=args.upstream_ms) as up:
        direct = up.url + "/chat/completions"
        with RouterProcess(gate, up.url, k=1) as router, \
                RouterProcess(gates["static"], up.url, k=1, backend="static") as static, \
                RouterProcess(gates["cascade"], up.url, k=1, backend="cascade") as cascade:
            peer: dict[str, Any] = {}
            with _litellm(up.url, args, peer) as proxy:
                # LiteLLM and the static-encoder and two-stage routers run in the same rounds as the router, so
                # all of them meet the same outside load.
                def top1(c: int) -> dict[str, Target]:
                    return {"router": router, "router_static": static, "router_cascade": cascade,
                            **({"litellm": proxy} if proxy and c in args.peer_levels else {})}
                out["top1"] = asyncio.run(_levels(top1, direct, texts, stream=False, scale=args.scale))
                out["throughput_top1"] = asyncio.run(throughput(router, direct, texts, seconds=args.throughput_s))
                out["throughput_top1_static"] = asyncio.run(throughput(static, direct, texts,
                                                                       seconds=args.throughput_s))
                out["throughput_top1_cascade"] = asyncio.run(throughput(cascade, direct, texts,
                                                                        seconds=args.throughput_s))
                if proxy is not None:
                    peer["throughput"] = asyncio.run(throughput(proxy, direct, texts, seconds=args.throughput_s))
            out["litellm"] = peer or None
            only: dict[str, Target] = {"router": router}
            out["stream_ttft"] = asyncio.run(_levels(lambda c: only, direct, texts, stream=True, scale=args.scale))
            if not args.no_profile:
                out["profile"] = profile_router(router, texts, RESULTS, seconds=args.profile_s)
                out["profile_static"] = profile_router(static, texts, RESULTS, seconds=args.profile_s,
                                                       raw_name="profile_static_raw.txt")
        with RouterProcess(gate, up.url, k=3, workdir=str(router.workdir)) as router3:
            only3: dict[str, Target] = {"router": router3}
            out["top3"] = asyncio.run(_levels(lambda c: only3, direct, texts, stream=False, scale=args.scale))
    return out


@contextlib.contextmanager
def _litellm(upstream_url: str, args: argparse.Namespace, status: dict[str, Any]) -> Iterator[Target | None]:
    """The LiteLLM proxy on the upstream, or None (with ``status["skipped"]`` saying why)."""
    if args.skip_peers:
        yield None
        return
    from bench.peers.litellm_proxy import LiteLLMProxy, ensure_installed

    why = ensure_installed()
    if why:
        status["skipped"] = why
        yield None
        return
    # LiteLLM has no gate: it is asked for its one model by name, so its figures are pure proxy cost.
    proxy = LiteLLMProxy(upstream_url)
    try:
        proxy.__enter__()
    except RuntimeError as exc:
        status["skipped"] = str(exc)
        yield None
        return
    try:
        yield proxy
    finally:
        proxy.__exit__()


def run_semantic_router(args: argparse.Namespace) -> dict[str, Any]:
    import subprocess

    here = Path(__file__).resolve().parent
    script = here / "peers" / "install_semantic_router.sh"
    python = Path(os.environ.get("SEMANTIC_ROUTER_VENV", str(here / ".venv-semantic-router"))) / "bin" / "python"
    try:
        subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True, timeout=900)
        command = [str(python), "-m", "bench.peers.semantic_router_peer", "--queries", str(args.peer_queries),
                   "--torch-threads", str(args.torch_threads)]
        done = subprocess.run(command, cwd=here.parent, capture_output=True, text=True, timeout=300, check=True)
    except subprocess.CalledProcessError as exc:
        return {"skipped": f"failed: {(exc.stderr or '').strip()[-300:]}"}
    except subprocess.TimeoutExpired as exc:
        return {"skipped": f"timed out: {exc.cmd[0]}"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# --- the report -------------------------------------------------------------------------------------------

def _at(levels: list[dict[str, Any]] | None, concurrency: int, key: str = "overhead_p50_ms",
        target: str = "router") -> Any:
    for row in levels or []:
        if row["concurrency"] == concurrency and target in row:
            return row[target][key]
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
    }
    for c in LEVELS:
        out[f"router_overhead_p50_ms_c{c}"] = _at(router.get("top1"), c)
        out[f"router_overhead_p99_ms_c{c}"] = _at(router.get("top1"), c, "overhead_p99_ms")
    for c in LEVELS:
        out[f"static_router_overhead_p50_ms_c{c}"] = _at(router.get("top1"), c, target="router_static")
    for c in LEVELS:
        out[f"cascade_router_overhead_p50_ms_c{c}"] = _at(router.get("top1"), c, target="router_cascade")
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
        "router_rss_mb_start": thr.get("rss_mb_start"), "router_rss_mb_end": thr.get("rss_mb_end"),
        "litellm_overhead_p50_ms_c32": _at(router.get("top1"), 32, target="litellm"),
        "litellm_rps": (litellm.get("throughput") or {}).get("rps"),
        "litellm_cpu_ms_per_request": (litellm.get("throughput") or {}).get("cpu_ms_per_request"),
        "router_cpu_ms_per_request_c32": cpu_c32, "litellm_cpu_ms_per_request_c32": litellm_cpu_c32,
        "semantic_router_decision_p50_ms": (semantic or {}).get("p50_ms"),
        "gate_p50_ms_same_window": (semantic or {}).get("our_gate_p50_ms_same_window"),
    })
    for c in LEVELS:
        peer = _at(router.get("top1"), c, target="litellm")
        if peer is not None:
            out[f"litellm_overhead_p50_ms_c{c}"] = peer
    out["ratio_overhead_router_vs_litellm_c32"] = _ratio(out["router_overhead_p50_ms_c32"],
                                                         out["litellm_overhead_p50_ms_c32"])
    out["ratio_rps_router_vs_litellm"] = _ratio(out["router_rps_top1"], out["litellm_rps"])
    out["ratio_overhead_static_vs_litellm_c32"] = _ratio(out["static_router_overhead_p50_ms_c32"],
                                                         out["litellm_overhead_p50_ms_c32"])
    out["ratio_rps_static_vs_litellm"] = _ratio(out["static_router_rps_top1"], out["litellm_rps"])
    out["ratio_overhead_cascade_vs_litellm_c32"] = _ratio(out["cascade_router_overhead_p50_ms_c32"],
                                                          out["litellm_overhead_p50_ms_c32"])
    out["ratio_rps_cascade_vs_litellm"] = _ratio(out["cascade_router_rps_top1"], out["litellm_rps"])
    out["ratio_cpu_router_vs_litellm"] = _ratio(out["router_cpu_ms_per_request_top1"],
                                                out["litellm_cpu_ms_per_request"])
    out["ratio_gate_vs_semantic_router_p50"] = _ratio(out["gate_p50_ms_same_window"],
                                                      out["semantic_router_decision_p50_ms"])
    out["ratio_gate_onnx_vs_st_p50"] = _ratio(out["gate_p50_ms"], out["st_gate_p50_ms"])
    if out["litellm_overhead_p50_ms_c32"] is None and out["semantic_router_decision_p50_ms"] is None:
        out["peers"] = "not run"
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def table(flat: dict[str, Any], gate: dict[str, Any], router: dict[str, Any]) -> str:
    rows: list[tuple[str, Any, Any, Any, str]] = [
        ("gate decision p50 ms (ONNX int8)", flat["gate_p50_ms"], None, None, "<= 3"),
        ("  again, right after semantic-router ran", flat["gate_p50_ms_same_window"],
         flat["semantic_router_decision_p50_ms"], flat["ratio_gate_vs_semantic_router_p50"], ""),
        ("gate decision p99 ms (ONNX int8)", flat["gate_p99_ms"], None, None, ""),
        ("gate batch q/s (ONNX, batches of 64)", flat["gate_batch_qps"], None, None, ">= 400"),
        ("gate decision p50 ms (ST fp32)", flat["st_gate_p50_ms"], flat["semantic_router_decision_p50_ms"],
         _ratio(flat["st_gate_p50_ms"], flat["semantic_router_decision_p50_ms"]), ""),
        ("gate batch q/s (ST fp32)", flat["st_gate_batch_qps"], None, None, ""),
        ("gate decision p50 ms (static table)", flat["static_gate_p50_ms"], None, None, ""),
        ("gate batch q/s (static table)", flat["static_gate_batch_qps"], None, None, ""),
        ("gate decision p50 ms (two-stage gate)", flat["cascade_gate_p50_ms"], None, None, ""),
        ("  share decided by the static stage", flat["cascade_fast_share"], None, None, ""),
        ("  same pick as the ONNX gate", flat["cascade_agreement_with_onnx"], None, None, ""),
        ("gate batch q/s (two-stage)", flat["cascade_gate_batch_qps"], None, None, ""),
    ]
    for c in LEVELS:
        peer = flat.get(f"litellm_overhead_p50_ms_c{c}")
        rows.append((f"router overhead p50 ms, top-1, c{c}", flat[f"router_overhead_p50_ms_c{c}"], peer,
                     _ratio(flat[f"router_overhead_p50_ms_c{c}"], peer), "<= 2, <= 1/3 LiteLLM" if c == 32 else ""))
    for c in LEVELS:
        peer = flat.get(f"litellm_overhead_p50_ms_c{c}")
        rows.append((f"  same, static encoder, c{c}", flat[f"static_router_overhead_p50_ms_c{c}"], peer,
                     _ratio(flat[f"static_router_overhead_p50_ms_c{c}"], peer), ""))
    for c in LEVELS:
        peer = flat.get(f"litellm_overhead_p50_ms_c{c}")
        rows.append((f"  same, two-stage gate, c{c}", flat[f"cascade_router_overhead_p50_ms_c{c}"], peer,
                     _ratio(flat[f"cascade_router_overhead_p50_ms_c{c}"], peer), ""))
    rows += [(f"stream TTFT overhead p50 ms, c{c}", flat[f"stream_ttft_overhead_p50_ms_c{c}"], None, None, "")
             for c in LEVELS]
    rows += [(f"top-3 fan-out overhead p50 ms, c{c}", flat[f"top3_overhead_p50_ms_c{c}"], None, None, "")
             for c in LEVELS]
    rows += [
        ("throughput req/s, top-1", flat["router_rps_top1"], flat["litellm_rps"], flat["ratio_rps_router_vs_litellm"],
         ">= 500"),
        ("  same, static encoder", flat["static_router_rps_top1"], flat["litellm_rps"],
         flat["ratio_rps_static_vs_litellm"], ""),
        ("  same, two-stage gate", flat["cascade_router_rps_top1"], flat["litellm_rps"],
         flat["ratio_rps_cascade_vs_litellm"], ""),
        ("  same client, direct to upstream req/s", flat["direct_rps_same_client"], None, None, "client ceiling"),
        ("CPU ms per request (service process)", flat["router_cpu_ms_per_request_top1"],
         flat["litellm_cpu_ms_per_request"], flat["ratio_cpu_router_vs_litellm"], ""),
        ("  same, static encoder", flat["static_router_cpu_ms_per_request_top1"], flat["litellm_cpu_ms_per_request"],
         _ratio(flat["static_router_cpu_ms_per_request_top1"], flat["litellm_cpu_ms_per_request"]), ""),
        ("  same, two-stage gate", flat["cascade_router_cpu_ms_per_request_top1"],
         flat["litellm_cpu_ms_per_request"],
         _ratio(flat["cascade_router_cpu_ms_per_request_top1"], flat["litellm_cpu_ms_per_request"]), ""),
        ("  same, at c32 (rounds shared with LiteLLM)", flat["router_cpu_ms_per_request_c32"],
         flat["litellm_cpu_ms_per_request_c32"],
         _ratio(flat["router_cpu_ms_per_request_c32"], flat["litellm_cpu_ms_per_request_c32"]), ""),
        ("router RSS MB, start -> end of run", f"{_fmt(flat['router_rss_mb_start'])} -> "
         f"{_fmt(flat['router_rss_mb_end'])}", None, None, "flat"),
    ]
    head = f"{'metric':<44} {'ours':>14} {'peer':>10} {'ratio':>7}  target"
    lines = [head, "-" * len(head)]
    lines += [f"{name:<44} {_fmt(ours):>14} {_fmt(peer):>10} {_fmt(ratio):>7}  {target}"
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
    parser.add_argument("--throughput-s", type=float, default=8.0, help="length of each throughput run")
    parser.add_argument("--profile-s", type=float, default=5.0)
    parser.add_argument("--upstream-ms", type=float, default=5.0, help="the upstream's fixed latency")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the request count of every run")
    parser.add_argument("--gate-queries", type=int, default=300)
    parser.add_argument("--scaling-queries", type=int, default=100)
    parser.add_argument("--torch-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch threads for sentence-transformers and semantic-router (0: torch's default)")
    parser.add_argument("--peer-queries", type=int, default=150, help="semantic-router decisions timed")
    parser.add_argument("--peer-levels", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--out", type=Path, default=RESULTS / "bench.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                              "machine": _machine()}
    phases: dict[str, float] = {}
    print("gate: training on SNIPS and timing the three encoder backends, then 4-64 experts ...", flush=True)
    gate, gates, data = run_gate(args)
    onnx_gate = gates["onnx"]
    gate["encoder_profile"] = profile_encoder(data.test_texts)
    with UpstreamProcess(latency_ms=args.upstream_ms) as up:
        pool_rows = asyncio.run(measure_http_pool(up.url + "/chat/completions", (8, 64), 2000))
    phases["gate"] = round(time.perf_counter() - started, 1)
    print("router: overhead, streaming, throughput, profile, top-3" + ("" if args.skip_peers else ", LiteLLM"),
          "...", flush=True)
    router = run_router(args, gates, data.test_texts)
    phases["router"] = round(time.perf_counter() - started - sum(phases.values()), 1)
    semantic = None
    if not args.skip_peers:
        print("peer: semantic-router decision time ...", flush=True)
        semantic = run_semantic_router(args)
        # The peer ran in another process, minutes after our gate was timed; time ours again right after it,
        # so the ratio compares two figures taken under the same outside load.
        again = gate_bench.interleaved_times_ms({"onnx": gate_bench.decider(onnx_gate, TopKConfig(k=1))},
                                                data.test_texts[:args.peer_queries])["onnx"]
        semantic["our_gate_p50_ms_same_window"] = gate_bench.stats(again)["p50_ms"]
        phases["semantic_router"] = round(time.perf_counter() - started - sum(phases.values()), 1)
    flat = flatten(gate, router, semantic)
    report.update(flat)
    report["http_pool"] = pool_rows
    report.update({"gate": gate, "router": router, "semantic_router": semantic,
                   "phases_s": phases, "elapsed_s": round(time.perf_counter() - started, 1)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print()
    print(table(flat, gate, router))
    print("\none expert's connections, CPU ms per request (bench.http_pool): " + ", ".join(
        f"c{r['concurrency']} {r['client']} {r['cpu_ms_per_request']:.2f}" for r in pool_rows))
    print(f"\n{report['date']} on {report['machine']['cpu_model']} ({report['machine']['cores']} cores), "
          f"Python {report['machine']['python']}; load avg at start {report['machine']['load_avg_at_start']}")
    print(f"wrote {args.out} in {report['elapsed_s']} s")


if __name__ == "__main__":
    main()
