"""A real vLLM server stopped as a deployment stops it, in the middle of a stream through the router.

docker-compose.yml and deploy/k8s/experts.yaml start each vLLM expert with ``--shutdown-timeout`` (the expert's
``timeout_s``, ``router.compose.vllm_drain_s``): on SIGTERM vLLM then finishes what is generating before it exits.
Its default (0) aborts instead; measured on this tier's tiny model, a stream cut that way did not even end, and
its client waited for its own read timeout. Here the server gets the flag as the generator writes it, the API
server alone gets SIGTERM (as Docker and Kubernetes signal a container's main process) a few pieces into a long
stream, and:

- the stream goes on from the same expert to its last token, with no switch;
- a request sent after the signal is answered by the other expert (the draining server refuses new work), so a
  rolling restart loses nothing, with or without the preStop sleep that keeps most new requests away;
- the server exits by itself once the stream is done, well inside the grace period the deployments give it.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from pathlib import Path

import pytest

from experts.types import ChatMessage, ChatRequest
from router.build import build_orchestrator
from router.compose import vllm_args
from router.config import ExpertConfig, load_config
from router.orchestrator import StreamEnd, StreamPiece
from tests.integration.test_router_vllm import MATH, SPACE, write_config
from tests.integration.vllm_server import ServerSpec, VLLMServer

pytestmark = pytest.mark.integration

# About 0.8 s of generation on the tiny model (2 ms a token), inside the server's 512 positions.
LONG = 380
SIGTERM_AFTER = 3


def drain_flags(timeout_s: float) -> tuple[str, ...]:
    """The drain flag and its value as ``moe compose`` writes them for an expert with this ``timeout_s``."""
    args = vllm_args(ExpertConfig(name="space", type="vllm", endpoint="http://space:8000/v1", model="m",
                                  timeout_s=timeout_s))
    at = args.index("--shutdown-timeout")
    return tuple(args[at:at + 2])


async def test_a_vllm_stopped_mid_stream_finishes_it_and_hands_new_requests_on(
        vllm_experts: dict[str, VLLMServer], vllm_server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    flags = drain_flags(30)
    assert flags == ("--shutdown-timeout", "30")
    draining: VLLMServer = vllm_server_factory(ServerSpec("tiny-drain", extra_args=flags))
    config = load_config(write_config(tmp_path / "router.yaml", {
        "space": (draining, SPACE), "math": (vllm_experts["tiny-a"], MATH)}))
    orchestrator = build_orchestrator(config)
    ask = ChatRequest(messages=[ChatMessage(role="user", content="how far away is the sun")], max_tokens=LONG,
                      ignore_eos=True)
    try:
        pieces: list[StreamPiece] = []
        end: StreamEnd | None = None
        signalled_at = None
        async with aclosing(orchestrator.stream(ask)) as events:
            async for event in events:
                if isinstance(event, StreamPiece):
                    pieces.append(event)
                    if len(pieces) == SIGTERM_AFTER:
                        draining.terminate()
                        signalled_at = time.monotonic()
                else:
                    end = event
        assert end is not None and signalled_at is not None
        print(f"\nSIGTERM after {SIGTERM_AFTER} pieces: {len(pieces)} pieces in all, finish {end.finish_reason}, "
              f"{time.monotonic() - signalled_at:.2f} s from the signal to the stream's end")
        assert {p.expert for p in pieces} == {"space"} and end.trace.switches == []
        assert [(a.expert, a.ok) for a in end.trace.attempts] == [("space", True)]
        assert end.finish_reason == "length"
        assert end.trace.attempts[0].usage.completion_tokens == LONG  # every token, as vLLM counted them

        # New work after the signal: the draining server refuses it (a 500 while it drains, then a refused
        # connection), and fallback hands it to the next expert in the gate's ranking.
        after = await orchestrator.complete(ask.model_copy(update={"max_tokens": 8}))
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
        assert "mode=drain" in draining.log_path.read_text(errors="replace")
    finally:
        await orchestrator.aclose()
