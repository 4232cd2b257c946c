"""Router overhead and throughput: the service on loopback against the fast upstream, next to direct calls.

Overhead is the router's latency minus a direct call's to the same upstream at the same client concurrency.
Direct and routed runs alternate in rounds, so outside load on this shared machine falls on both alike.
The router's CPU time per request (from ``/proc``) is reported too: unlike wall time, it barely moves when
other processes compete for the cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import httpx
import yaml

from bench.upstream import LoadResult, chat_payload, run_load
from router.cascade import CascadeGate
from router.gate import Gate
from router.gate_artifact import is_trained

__all__ = ["RouterProcess", "Target", "add_unloaded_overhead", "compare", "cpu_seconds", "rss_growth", "rss_mb",
           "throughput"]

_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    return float("nan")


def cpu_seconds(pid: int) -> float:
    # Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class Target(Protocol):
    """A service under test: its chat-completions URL, its process id, and the model name to ask it for."""

    @property
    def url(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def model(self) -> str: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RouterProcess:
    """The router (``bench.router_server``) in a child process, its experts all served by one upstream."""

    model = "auto"

    def __init__(self, gate: Gate | CascadeGate, upstream_url: str, *, k: int = 1, workdir: str | None = None,
                 extra_args: Sequence[str] = (), backend: str = "onnx",
                 encoder_options: dict[str, Any] | None = None, gate_options: dict[str, Any] | None = None) -> None:
        """``encoder_options``: further ``gate.encoder`` keys (e.g. ``{"threads": 2}``); ``gate_options``:
        further ``gate`` keys (e.g. ``{"max_batch": 64}``), not those this class sets (``artifact``, ``top_k``,
        ``encoder``, ``cascade``: refused when the config is written)."""
        self.gate, self.upstream_url, self.k, self.backend = gate, upstream_url, k, backend
        self.encoder_options = dict(encoder_options or {})
        self.gate_options = dict(gate_options or {})
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="moe-bench-"))
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = self.workdir / "router.log"
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def write_config(self) -> Path:
        artifact = self.workdir / f"gate-{self.backend}"
        if not is_trained(artifact):
            self.gate.save(artifact)
        gate: dict[str, Any] = {
            "artifact": str(artifact), "top_k": {"policy": "fixed", "k": self.k},
            # "cascade": the two-stage gate, static then ONNX (router.cascade)
            **({"encoder": {"backend": "onnx", **self.encoder_options}, "cascade": {}}
               if self.backend == "cascade" else {"encoder": {"backend": self.backend, **self.encoder_options}})}
        taken = gate.keys() & self.gate_options.keys()
        if taken:
            raise ValueError(f"gate_options: {sorted(taken)} are set by RouterProcess; use its own arguments")
        config = {
            "version": 1,
            # Capacity far above the load, so no request is shed and every one measures the routing path.
            "experts": [{"name": e, "type": "openai", "endpoint": self.upstream_url, "model": e,
                         "max_concurrency": 1024, "timeout_s": 30} for e in self.gate.experts],
            "gate": {**gate, **self.gate_options},
            "combiner": {"strategy": "top1"},
            "fallback": {"max_attempts": max(3, self.k)},  # the panel counts towards it
        }
        tag = "".join(f"-{k}{v}" for k, v in sorted({**self.encoder_options, **self.gate_options}.items()))
        path = self.workdir / f"router-{self.backend}-k{self.k}{tag}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    def __enter__(self) -> RouterProcess:
        config = self.write_config()
        self.port = free_port()
        # The service's own logs (one line per request, as deployed) go to a file, not over the bench's table.
        self.log_path = config.with_suffix(".log")  # one per config: routers may share a workdir
        self._log = open(self.log_path, "wb")  # closed in __exit__
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.router_server", "--config", str(config),
                                      "--port", str(self.port), *self.extra_args],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"router exited with {self.proc.returncode}: " + " | ".join(tail))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("router did not start within 60 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _merge(parts: list[LoadResult]) -> LoadResult:
    out = LoadResult(parts[0].concurrency)
    for p in parts:
        out.latencies_ms += p.latencies_ms
        out.errors += p.errors
        out.elapsed_s += p.elapsed_s
        out.first_error = out.first_error or p.first_error
    return out


def _requests_for(concurrency: int, scale: float) -> int:
    return int(max(100, concurrency * 10, 400 if concurrency >= 8 else 0) * scale)


async def compare(targets: dict[str, Target], direct_url: str, texts: Sequence[str], *, concurrency: int,
                  stream: bool = False, rounds: int = 2, scale: float = 1.0, max_seconds: float = 1.5,
                  ) -> dict[str, Any]:
    """Targets (the router, peers) against direct calls at one concurrency.

    Each round runs direct, then every target in turn, so all of them share the same stretch of outside load;
    every other round takes the targets in reverse order, so no target is always the last, measured longest
    after the direct run and right after every other target's load. Per target: its summary, overhead p50 over
    direct (a difference of two p50s), its p99 minus direct's p99, and its process's CPU ms per request (the
    warm-up requests counted). Requests are not paired, so there is no per-request overhead to take a p99 of:
    ``p99_difference_ms`` is the difference of two p99s (it can be below the p50 overhead). ``overhead_p99_ms`` is
    the same figure under its old name, kept for readers of earlier results.
    """
    direct = [chat_payload(t, model="direct", stream=stream) for t in texts]
    n = _requests_for(concurrency, scale) // rounds
    via_direct: list[LoadResult] = []
    via: dict[str, list[LoadResult]] = {name: [] for name in targets}
    cpu = dict.fromkeys(targets, 0.0)
    handled = dict.fromkeys(targets, 0)
    order = list(targets.items())
    for round_no in range(rounds):
        via_direct.append(await run_load(direct_url, direct, concurrency=concurrency, requests=n,
                                         max_seconds=max_seconds, warmup=True, stream=stream))
        for name, target in (order if round_no % 2 == 0 else order[::-1]):
            payloads = [chat_payload(t, model=target.model, stream=stream) for t in texts]
            cpu_start = cpu_seconds(target.pid)
            result = await run_load(target.url, payloads, concurrency=concurrency, requests=n,
                                    max_seconds=max_seconds, warmup=True, stream=stream)
            cpu[name] += cpu_seconds(target.pid) - cpu_start
            # Each worker's unmeasured first request (it opens its connection) used CPU too.
            handled[name] += result.ok + result.errors + concurrency
            via[name].append(result)
    d = _merge(via_direct)
    row: dict[str, Any] = {"concurrency": concurrency, "direct": d.summary()}
    for name in targets:
        r = _merge(via[name])
        p99_difference = _diff(r.pct(99), d.pct(99))
        row[name] = {**r.summary(), "overhead_p50_ms": _diff(r.pct(50), d.pct(50)),
                     "p99_difference_ms": p99_difference, "overhead_p99_ms": p99_difference,
                     "cpu_ms_per_request": round(cpu[name] * 1000.0 / max(handled[name], 1), 3)}
    return row


def add_unloaded_overhead(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``overhead_p50_vs_unloaded_ms`` to every target of ``compare``'s rows: its p50 minus the direct p50 at
    the lowest concurrency (1), beside ``overhead_p50_ms`` (minus the direct p50 at the same concurrency).

    From 32 clients on, the direct runs are bound by the load client itself (one Python process, spending about
    ten times the upstream's CPU per request: its direct p50 was 17 ms at 32 clients and 54 ms at 128 against a
    5 ms upstream), while a routed run goes at a fraction of that rate and keeps little of the client's
    queueing. Subtracting the direct p50 at the same concurrency then takes the client's queueing off the router's
    figure too. The two figures bracket what a target adds: ``overhead_p50_ms`` from below,
    ``overhead_p50_vs_unloaded_ms`` from above (it keeps the client's own queueing at the routed rate).
    """
    base_row = min(rows, key=lambda row: row["concurrency"], default=None)
    base = (base_row or {}).get("direct", {}).get("p50_ms")
    for row in rows:
        for name, figures in row.items():
            if name not in ("concurrency", "direct") and isinstance(figures, dict):
                figures["overhead_p50_vs_unloaded_ms"] = _diff(figures.get("p50_ms"), base)
    return rows


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def rss_growth(samples: Sequence[float], span_s: float | None = None) -> dict[str, float | None]:
    """First, last and largest RSS sample (MB), and the growth from first to last in percent.

    With ``span_s`` (the time from the first sample to the last, samples evenly spaced), also
    ``rss_mb_per_min_late``: the least-squares slope of the second half of the samples, in MB per minute. First to
    last cannot tell a leak from the allocator settling after warm-up; a slope that is still positive at the end of
    the run can (0.6 MB/min is 36 MB an hour, where first-to-last over 60 s says +0.2%).
    """
    seen = [x for x in samples if isinstance(x, int | float) and math.isfinite(x)]
    if not seen:
        return {"rss_mb_start": None, "rss_mb_end": None, "rss_mb_max": None, "rss_growth_pct": None,
                "rss_mb_per_min_late": None}
    first, last = seen[0], seen[-1]
    growth = round(100.0 * (last - first) / first, 2) if first > 0 else None
    return {"rss_mb_start": first, "rss_mb_end": last, "rss_mb_max": max(seen), "rss_growth_pct": growth,
            "rss_mb_per_min_late": _late_slope(seen, span_s)}


def _late_slope(samples: Sequence[float], span_s: float | None) -> float | None:
    """MB per minute over the second half of evenly spaced samples (None: no span, or under 4 samples)."""
    if span_s is None or span_s <= 0 or len(samples) < 4:
        return None
    step = span_s / (len(samples) - 1)
    late = samples[len(samples) // 2:]
    xs = [i * step for i in range(len(late))]
    mx, my = sum(xs) / len(xs), sum(late) / len(late)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, late, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return round(slope * 60.0, 3) + 0.0  # + 0.0: no "-0.0" for a flat tail


async def throughput(router: Target, direct_url: str, texts: Sequence[str], *, seconds: float,
                     concurrency: int = 64, on_sample: Callable[[float, float], None] | None = None,
                     ) -> dict[str, Any]:
    """Top-1 requests/s through the router for ``seconds``, with its RSS sampled once a second.

    The same client against the upstream directly gives the ceiling this client can drive on this machine.
    ``on_sample(seconds_since_start, rss_mb)`` is called after each RSS sample (progress for long runs).
    ``rss_span_s`` is the time from the first RSS sample to the last: the length the memory figures cover.
    """
    routed = [chat_payload(t, model=router.model) for t in texts]
    direct = [chat_payload(t, model="direct") for t in texts]
    ceiling = await run_load(direct_url, direct, concurrency=concurrency, requests=10**9,
                             max_seconds=min(seconds, 3.0), warmup=True)
    await run_load(router.url, routed, concurrency=concurrency, requests=concurrency * 4, max_seconds=5.0)
    samples = [rss_mb(router.pid)]
    first_sample = time.perf_counter()
    cpu_start = cpu_seconds(router.pid)

    async def sample() -> None:
        while True:
            await asyncio.sleep(1.0)
            samples.append(rss_mb(router.pid))
            if on_sample is not None:
                on_sample(time.perf_counter() - first_sample, samples[-1])

    sampler = asyncio.create_task(sample())
    try:
        result = await run_load(router.url, routed, concurrency=concurrency, requests=10**9, max_seconds=seconds)
    finally:
        sampler.cancel()
    cpu = cpu_seconds(router.pid) - cpu_start
    samples.append(rss_mb(router.pid))
    span = time.perf_counter() - first_sample
    return {
        "concurrency": concurrency, "seconds": round(result.elapsed_s, 2), "requests": result.ok,
        "errors": result.errors, "first_error": result.first_error, "rps": round(result.rps, 1),
        "p50_ms": _diff(result.pct(50), 0.0), "p99_ms": _diff(result.pct(99), 0.0),
        "direct_rps_same_client": round(ceiling.rps, 1),
        "cpu_ms_per_request": round(cpu * 1000.0 / max(result.ok, 1), 3),
        "cpu_share": round(cpu / max(result.elapsed_s, 1e-9), 2),
        **rss_growth(samples, span), "rss_span_s": round(span, 1), "rss_mb_samples": samples,
    }
