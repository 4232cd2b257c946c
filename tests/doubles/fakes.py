"""Test doubles for unit tests of the router's decisions: a fake gate and a fake in-process expert.

They are fakes, named as such, and live only in tests. Real experts and the real gate have their own tests.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np

from experts.base import Expert
from experts.errors import ExpertError, ExpertUnavailable
from experts.types import ChatRequest, ExpertReply, StreamDelta, Usage
from router.config import ExpertConfig, RouterConfig, parse_config
from router.encoders import Encoder
from router.gate import BaseGate


class FakeClock:
    """A clock that moves only when a test moves it (``now``), for breakers, rate buckets and retry windows."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeHashingEncoder(Encoder):
    """A fast stand-in for MiniLM in evaluation and training tests: a bag of hashed words, L2-normalised, so
    texts sharing words still land near each other. Not a model: suites run on it only to test their plumbing."""

    identity, checksum = "fake-hashing", "1" * 64

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        x = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                x[row, int(hashlib.sha256(word.encode()).hexdigest()[:8], 16) % self.dim] += 1.0
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class FakeEncoder:
    """Embeds a text as itself, so the fake gate can read the words."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(list(texts), dtype=object)


class FakeGate(BaseGate):
    """Scores experts by keyword: a query containing a key gets that key's score vector, else ``default``."""

    def __init__(self, experts: list[str], table: dict[str, list[float]], default: list[float]) -> None:
        self.experts = experts
        self.table = table
        self.default = default
        self.encoder = FakeEncoder()

    def predict_proba(self, embeddings: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        rows = [next((v for k, v in self.table.items() if k in str(t)), self.default) for t in embeddings]
        return np.asarray(rows, dtype=np.float64)

    def nearest(self, embedding: np.ndarray, k: int = 3) -> list[dict[str, object]]:
        return [{"text": f"an example like {embedding}", "label": self.experts[0], "similarity": 0.5}][:k]


class FakeExpert(Expert):
    """Answers with ``text`` after ``delay`` seconds, or raises ``fail(name)`` when set.

    For streams, ``pieces`` are yielded one by one and ``fail_after`` raises after that many pieces.
    """

    def __init__(self, config: ExpertConfig, text: str = "", *, delay: float = 0.0,
                 fail: Callable[[str], ExpertError] | None = None, pieces: list[str] | None = None,
                 fail_after: int | None = None, cost: float = 0.001) -> None:
        super().__init__(config)
        self.text = text or f"answer from {config.name}"
        self.delay = delay
        self.fail = fail
        self.pieces = pieces or [self.text]
        self.fail_after = fail_after
        self.fixed_cost = cost
        self.requests: list[ChatRequest] = []

    async def generate(self, request: ChatRequest) -> ExpertReply:
        self.requests.append(request)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail(self.name)
        return ExpertReply(expert=self.name, content=self.text, usage=Usage(prompt_tokens=3, completion_tokens=5,
                           total_tokens=8), cost_usd=self.fixed_cost)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        self.requests.append(request)
        await asyncio.sleep(self.delay)
        if self.fail and self.fail_after is None:
            raise self.fail(self.name)
        for i, piece in enumerate(self.pieces):
            if self.fail and self.fail_after is not None and i == self.fail_after:
                raise self.fail(self.name)
            yield StreamDelta(content=piece)
        yield StreamDelta(finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=len(self.pieces),
                          total_tokens=3 + len(self.pieces)), cost_usd=self.fixed_cost)



class FakeToolCallThenDies(FakeExpert):
    """Streams the start of a tool call, then its connection dies (``ExpertUnavailable``)."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        self.requests.append(request)
        yield StreamDelta(tool_calls=[{"index": 0, "id": "call-1", "type": "function",
                                       "function": {"name": "add", "arguments": '{"a":'}}])
        raise ExpertUnavailable(self.name, "peer closed")



class FakeRefusalThenDies(FakeExpert):
    """Streams the start of a refusal (OpenAI's ``delta.refusal``), then its connection dies."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        self.requests.append(request)
        yield StreamDelta(refusal="I can't help with that. ")
        raise ExpertUnavailable(self.name, "peer closed")


def fake_config(names: list[str], **overrides: object) -> RouterConfig:
    """A valid config whose experts are fakes standing in for replay experts."""
    raw: dict[str, object] = {
        "version": 1,
        "experts": [{"name": n, "type": "replay", "model": n, "timeout_s": 1.0,
                     "replay": {"source": "routerbench", "path": "unused"}} for n in names],
    }
    raw.update(overrides)
    return parse_config(raw, check_env=False)
