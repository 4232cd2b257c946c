"""A real vLLM server stopped as a deployment stops it, in the middle of a stream through the router.

docker-compose.yml and deploy/k8s/experts.yaml start each vLLM expert with ``--shutdown-timeout`` (the expert's
``timeout_s``, ``router.compose.vllm_drain_s``): on SIGTERM vLLM then finishes what is generating before it exits.
Its default (0) aborts instead; measured on this tier's tiny model, a stream cut that way did not even end, and
its client waited for its own read timeout. Here the server gets the flag as the generator writes it, the API
server alone gets SIGTERM (as Docker and Kubernetes signal a container's main process) once four long streams
through the router are running on it, and:

- every stream goes on from the same expert to its last token, with no switch, and vLLM's log says it drained
  them all;
- a request sent after the signal is answered by the other expert (the draining server refuses new work), so a
  rolling restart loses nothing, with or without the preStop sleep that keeps most new requests away;
- the server exits by itself once the stream is done, well inside the grace period the deployments give it.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from experts.types import ChatMessage, ChatRequest
from router.build import build_orchestrator
from router.compose import vllm_args
from router.config import ExpertConfig, load_config
from tests.integration.test_router_vllm import MATH, SPACE, stream_and, write_config
from tests.integration.vllm_server import ServerSpec, VLLMServer

pytestmark = pytest.mark.integration

# Long streams, several at once: 440 tokens each (about 0.9 s alone on the tiny model), inside 512 positions.
LONG = 440
STREAMS = 4
QUESTIONS = ["how far away is the sun", "why do comets have tails", "what is the asteroid belt",
             "how hot is the surface of venus"]


def drain_flags(timeout_s: float) -> tuple[str, ...]:
    """The drain flag and its value as ``moe compose`` writes them for an expert with this ``timeout_s``."""
    args = vllm_args(ExpertConfig(name="space", type="vllm", endpoint="http://space:8000/v1", model="m",
                                  timeout_s=timeout_s))
    at = args.index("--shutdown-timeout")
    return tuple(args[at:at + 2])


def ask(question: str, max_tokens: int) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content=question)], max_tokens=max_tokens, ignore_eos=True)


async def test_a_vllm_stopped_mid_stream_finishes_it_and_hands_new_requests_on(
        vllm_experts: dict[str, VLLMServer], vllm_server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    flags = drain_flags(30)
    assert flags == ("--shutdown-timeout", "30")
    draining: VLLMServer = vllm_server_factory(ServerSpec("tiny-drain", extra_args=flags))
    config = load_config(write_config(tmp_path / "router.yaml", {
        "space": (draining, SPACE), "math": (vllm_experts["tiny-a"], MATH)}))
    orchestrator = build_orchestrator(config)
    try:
        # SIGTERM once the server itself has every stream running (its own gauge), however far this process's
        # reading of them lags behind.
        async def stop_when_all_run() -> float:
            async with httpx.AsyncClient(base_url=draining.url.removesuffix("/v1")) as http:
                for _ in range(3000):
                    found = re.search(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)$",
                                      (await http.get("/metrics")).text, re.MULTILINE)
                    if found is not None and float(found.group(1)) >= STREAMS:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the streams never ran together on the server")
            draining.terminate()
            return time.monotonic()

        stopper = asyncio.create_task(stop_when_all_run())
        done = await asyncio.gather(*(stream_and(orchestrator, ask(q, LONG)) for q in QUESTIONS[:STREAMS]))
        signalled_at = await stopper
        print(f"\nSIGTERM with {STREAMS} streams running: pieces {[len(p) for p, _ in done]}; the last stream "
              f"ended {time.monotonic() - signalled_at:.2f} s after the signal")
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

        for _ in range(300):
            if draining.api_server_pid() is None:
                break
            await asyncio.sleep(0.1)
        gone = time.monotonic() - signalled_at
        print(f"server gone {gone:.1f} s after SIGTERM (drain limit 30 s; grace period in the deployments 130 s)")
        assert draining.api_server_pid() is None, draining.log_tail()
        # The server's own account, written by now: it drained the streams rather than aborting them.
        drained = re.search(r"draining in-flight requests count=(\d+)", draining.log_path.read_text(errors="replace"))
        assert drained is not None and int(drained.group(1)) == STREAMS, draining.log_tail()
    finally:
        await orchestrator.aclose()
