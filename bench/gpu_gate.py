"""``python -m bench.gpu_gate``: the gate on other hardware than the 2-core machines the README's figures are from.

Either section, or both:

- ``--onnx --cores N``: the ONNX gate's one-query decision (p50, p99) and batched queries/s, measured as
  ``make bench`` measures them (SNIPS, 420 training queries, 7 experts, 300 queries), with this process held to
  ``N`` cores (``sched_setaffinity``, set before any encoder is built, so the encoder sizes its threads to them).
  This is the ONNX path on another CPU generation given the same number of cores.
- ``--device cuda``: the sentence-transformers gate (fp32, ``gate.encoder.device``) on that device against the
  same model on this machine's CPU. On CLINC150's 4,500 in-scope test queries (10 domains; the gate trained on
  the 15,000 training queries): embedding cosine, how often both pick the same expert, and accuracy; then one
  decision at a time (p50, p99) and queries/s at batches of 64, 256 and 1,024, interleaved.

Writes ``--out`` (default ``bench/results/gpu_gate.json``) and prints it. Data comes from ``$MOE_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import gate_bench
from bench.data import data_dir, snips
from router.config import EncoderConfig, TopKConfig
from router.encoders import Encoder, build_encoder

RESULTS = Path(__file__).resolve().parent / "results"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cores_total": os.cpu_count(),
                            "cores_used": len(os.sched_getaffinity(0))}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info.setdefault("cpu_model", value.strip())
        elif key.strip() == "flags":
            flags = set(value.split())
            info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
            break
    return info


def onnx_section(gate_queries: int) -> dict[str, Any]:
    """The ONNX row of ``make bench``'s gate step, alone."""
    data = snips(per_label=60, n_test=gate_queries + 64)
    encoder = build_encoder(EncoderConfig(backend="onnx"))
    gate = gate_bench.train(encoder, data)
    figures = gate_bench.gate_figures({"onnx": gate}, data.test_texts[:gate_queries], data.test_texts[:320])
    return {"data": f"SNIPS: {len(data.train_texts)} training queries, {len(data.labels)} experts",
            "threads": getattr(encoder, "threads", None), "parallel": getattr(encoder, "parallel", None),
            **figures["onnx"]}


def _clinc(root: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    from eval.datasets import load_clinc150_domains

    train = [q for q in load_clinc150_domains(root, "train") if q.label != "oos"]
    test = [q for q in load_clinc150_domains(root, "test") if q.label != "oos"]
    return [q.text for q in train], [q.label for q in train], [q.text for q in test], [q.label for q in test]


def _timed(encoder: Encoder, texts: list[str]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = encoder.encode(texts)
    return out, time.perf_counter() - start


def device_section(device: str, gate_queries: int) -> dict[str, Any]:
    import torch

    from router.gate import train_gate

    train_texts, train_labels, test_texts, test_labels = _clinc(data_dir())
    on_device = build_encoder(EncoderConfig(backend="sentence-transformers", device=device))
    on_cpu = build_encoder(EncoderConfig(backend="sentence-transformers"))
    on_device.encode(test_texts[:256])  # CUDA context, kernels, allocator
    cached = gate_bench.CachedEncoder(on_device)
    start = time.perf_counter()
    gate = train_gate(train_texts, train_labels, cached, experts=sorted(set(train_labels)), progress=False)
    train_s = time.perf_counter() - start
    dev_rows, dev_s = _timed(on_device, test_texts)
    cpu_rows, cpu_s = _timed(on_cpu, test_texts)
    cosine = (dev_rows * cpu_rows).sum(axis=1)
    picks_dev = gate.predict_proba(dev_rows, test_texts).argmax(axis=1)
    picks_cpu = gate.predict_proba(cpu_rows, test_texts).argmax(axis=1)
    experts, truth = np.array(gate.experts), np.array(test_labels)
    dev_gate, cpu_gate = copy.copy(gate), copy.copy(gate)
    dev_gate.encoder, cpu_gate.encoder = on_device, on_cpu
    gates = {device: dev_gate, "cpu": cpu_gate}
    one = gate_bench.interleaved_times_ms(
        {name: gate_bench.decider(g, TopKConfig(k=1)) for name, g in gates.items()}, test_texts[:gate_queries])
    batches = {f"{name}_batch{b}": gate_bench.interleaved_batch_qps(
        {name: gate_bench.decider(g, TopKConfig(k=1))}, test_texts[:2048], batch=b, rounds=1)[name]
        for b in (64, 256, 1024) for name, g in gates.items()}
    props = torch.cuda.get_device_properties(device) if device.startswith("cuda") else None
    return {
        "device": device, "gpu": props.name if props else None, "torch": torch.__version__,
        "torch_threads_cpu": torch.get_num_threads(),
        "data": f"CLINC150 domains: {len(train_texts)} training queries, {len(test_texts)} in-scope test queries, "
                f"{len(gate.experts)} experts",
        "gate_train_s": round(train_s, 2),
        "encode_all_test_s": {device: round(dev_s, 3), "cpu": round(cpu_s, 3)},
        "cosine_min": round(float(cosine.min()), 7), "cosine_mean": round(float(cosine.mean()), 7),
        "same_pick": round(float(np.mean(picks_dev == picks_cpu)), 5),
        "accuracy": {device: round(float(np.mean(experts[picks_dev] == truth)), 4),
                     "cpu": round(float(np.mean(experts[picks_cpu] == truth)), 4)},
        "one_query": {name: gate_bench.stats(times) for name, times in one.items()},
        "batch_qps": batches,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", action="store_true", help="the ONNX gate's figures as make bench measures them")
    parser.add_argument("--cores", type=int, default=None, help="hold this process to the first N usable cores")
    parser.add_argument("--device", default=None, help="the sentence-transformers gate on this torch device")
    parser.add_argument("--gate-queries", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_gate.json")
    args = parser.parse_args(argv)
    if not args.onnx and not args.device:
        parser.error("nothing to measure: give --onnx, --device DEVICE, or both")
    if args.device == "cpu":
        parser.error("--device is compared against the CPU: give a GPU device (cuda, cuda:N, mps)")
    if args.cores:
        usable = sorted(os.sched_getaffinity(0))
        if args.cores > len(usable):
            parser.error(f"--cores {args.cores}: only {len(usable)} usable here")
        os.sched_setaffinity(0, usable[:args.cores])
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine()}
    if args.onnx:
        print(f"ONNX gate on {out['machine']['cores_used']} cores …", flush=True)
        out["onnx"] = onnx_section(args.gate_queries)
    if args.device:
        print(f"sentence-transformers gate on {args.device} and on the CPU …", flush=True)
        out["device"] = device_section(args.device, args.gate_queries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
