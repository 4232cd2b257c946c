"""A real vLLM server stopped as a deployment stops it, in the middle of a stream through the router.

docker-compose.yml and deploy/k8s/experts.yaml start each vLLM expert with ``--shutdown-timeout`` (the expert's
``timeout_s``, ``router.compose.vllm_drain_s``): on SIGTERM vLLM then finishes what is generating before it exits.
Its default (0) aborts instead; measured on this tier's tiny model, a stream cut that way did not even end, and
its client waited for its own read timeout. Here the server gets the flag as the generator writes it, the API
server alone gets SIGTERM (as Docker and Kubernetes signal a container's main process) once four long streams
through the router are all on it (one generating, three queued behind it), and:

- every stream goes on from the same expert to its last token, with no switch, queued ones included, and vLLM's
  log says it drained them;
- a request sent after the signal is answered by the other expert (the draining server refuses new work), so a
  rolling restart loses nothing, with or without the preStop sleep that keeps most new requests away;
- the server exits by itself once the stream is done, well inside the grace period the deployments give it.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from experts.types import ChatMessage, ChatRequest
from router.build import build_orchestrator
from router.compose import vllm_args
from router.config import ExpertConfig, load_config
from tests.integration.test_router_vllm import MATH, SPACE, stream_and, write_config
from tests.integration.tiny_model import MAX_POSITIONS
from tests.integration.vllm_server import ServerSpec, VLLMServer

pytestmark = pytest.mark.integration

# Long streams, several at once, on a server that generates one at a time (--max-num-seqs 1): 1,500 tokens each,
# about 3 s apiece on the tiny model, so the four hold the server for some 12 s, well inside the 30 s drain limit.
# The test servers run at a lower CPU priority (tests.integration.vllm_server.SERVER_NICE) since this process's
# event loop was measured kept off the CPU for seconds while a server streamed; should that recur, the queue
# still holds most of the streams on the server when the signal comes. The drain server serves the model's whole
# length for them.
LONG = 1500
STREAMS = 4
QUESTIONS = ["how far away is the sun", "why do comets have tails", "what is the asteroid belt",
             "how hot is the surface of venus"]


def drain_flags(timeout_s: float) -> tuple[str, ...]:
    """The drain flag and its value as ``moe compose`` writes them for an expert with this ``timeout_s``."""
    args = vllm_args(ExpertConfig(name="space", type="vllm", endpoint="http://space:8000/v1", model="m",
                                  timeout_s=timeout_s))
    at = args.index("--shutdown-timeout")
    return tuple(args[at:at + 2])


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples, whatever their labels, in vLLM's Prometheus text (0 before it has any)."""
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def ask(question: str, max_tokens: int) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content=question)], max_tokens=max_tokens, ignore_eos=True)


async def test_a_vllm_stopped_mid_stream_finishes_it_and_hands_new_requests_on(
        vllm_experts: dict[str, VLLMServer], vllm_server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    flags = drain_flags(30)
    assert flags == ("--shutdown-timeout", "30")
    draining: VLLMServer = vllm_server_factory(ServerSpec("tiny-drain", extra_args=(
        *flags, "--max-model-len", str(MAX_POSITIONS), "--max-num-seqs", "1")))
    config = load_config(write_config(tmp_path / "router.yaml", {
        "space": (draining, SPACE), "math": (vllm_experts["tiny-a"], MATH)}))
    orchestrator = build_orchestrator(config)
    try:
        warm = await orchestrator.complete(ask(QUESTIONS[0], 1))
        assert warm.expert == "space"

        # SIGTERM once the server itself has received every stream (its own gauges and counter); how many it still
        # holds then is what it has to drain. The watch runs in a thread of its own, off this event loop, which the
        # streams' sends can hold up.
        def stop_when_all_arrived() -> tuple[float, float]:
            def read() -> str:
                # A connection of its own each time (urllib closes it): cheap, and never one the server closed.
                with urllib.request.urlopen(f"{draining.url.removesuffix('/v1')}/metrics", timeout=10) as reply:
                    return str(reply.read().decode())

            finished_before = metric(read(), "vllm:request_success_total")
            for _ in range(3000):
                text = read()
                held = metric(text, "vllm:num_requests_running") + metric(text, "vllm:num_requests_waiting")
                if held + metric(text, "vllm:request_success_total") - finished_before >= STREAMS:
                    draining.terminate()
                    return time.monotonic(), held
                time.sleep(0.01)
            raise AssertionError("the streams never all reached the server")

        stopper = asyncio.create_task(asyncio.to_thread(stop_when_all_arrived))
        done = await asyncio.gather(*(stream_and(orchestrator, ask(q, LONG)) for q in QUESTIONS[:STREAMS]))
        signalled_at, held = await stopper
        assert held >= 1, "SIGTERM came after every stream had finished: nothing was left to drain"
        print(f"\nSIGTERM with {held:.0f} of {STREAMS} streams on the server: pieces {[len(p) for p, _ in done]}; "
              f"the last stream ended {time.monotonic() - signalled_at:.2f} s after the signal")
        for pieces, end in done:
            assert {p.expert for p in pieces} == {"space"} and end.trace.switches == []
            assert [(a.expert, a.ok) for a in end.trace.attempts] == [("space", True)]
            assert end.finish_reason == "length"
            assert end.trace.attempts[0].usage.completion_tokens == LONG  # every token, as vLLM counted them

        # New work after the signal: the draining server refuses it (a 500 while it drains, then a refused
        # connection), and fallback hands it to the next expert in the gate's ranking.
        after = await orchestrator.complete(ask(QUESTIONS[0], 8))
        assert after.expert == "math"
        assert [(a.expert, a.ok) for a in after.trace.attempts] == [("space", False), ("math", True)]
        assert after.trace.decision is not None and after.trace.decision.ranking[0] == "space"

        for _ in range(600):
            if draining.api_server_pid() is None:
                break
            await asyncio.sleep(0.1)
        gone = time.monotonic() - signalled_at
        print(f"server gone {gone:.1f} s after SIGTERM (drain limit 30 s; grace period in the deployments 130 s)")
        assert draining.api_server_pid() is None, draining.log_tail()
        # The server's own account, written by now: it drained the streams rather than aborting them.
        drained = re.search(r"draining in-flight requests count=(\d+)", draining.log_path.read_text(errors="replace"))
        assert drained is not None, draining.log_tail()
        assert 1 <= int(drained.group(1)) <= held, (drained.group(0), held)
    finally:
        await orchestrator.aclose()
