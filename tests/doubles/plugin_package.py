"""A test double of an installed package that extends the router through entry points (``experts.plugins``): it
writes, into a folder to put on ``sys.path`` or ``PYTHONPATH``, a module and the ``.dist-info`` metadata that
``importlib.metadata`` finds, as ``pip install`` would leave them.

The module holds an expert type that answers from a Python function (``echo``), a combiner strategy that takes the
longest answer (``longest``) and an encoder backend that hashes words (``hash``); further entry points name a module
that does not exist (the expert type ``broken``, the combiner and encoder ``gone``) and a class of the wrong kind
(``misfiled``)."""

from __future__ import annotations

from pathlib import Path

DISTRIBUTION = "moe-plugin-double"
MODULE = "moe_plugin_double"

SOURCE = '''
from __future__ import annotations

import hashlib

import numpy as np

from experts.base import Expert
from experts.types import ChatRequest, ExpertReply, Usage
from router.combine import Combined, Combiner, CombinerSettings, Contribution, WeightedAnswer
from router.encoders import Encoder


class EchoExpert(Expert):
    """Answers with its model's name and the question, from no server at all."""

    async def generate(self, request: ChatRequest) -> ExpertReply:
        return ExpertReply(expert=self.name, content=f"{self.config.model}: {request.query_text()}",
                           usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))


class LongestAnswer(Combiner):
    name = "longest"

    @classmethod
    def from_settings(cls, settings: CombinerSettings) -> LongestAnswer:
        return cls()

    def combine(self, answers: list[WeightedAnswer]) -> Combined:
        best = max(answers, key=lambda a: len(a.content))
        return Combined(content=best.content, expert=best.expert, contributions=[
            Contribution(expert=a.expert, weight=a.weight, agreed=a is best) for a in answers])


class HashEncoder(Encoder):
    """Each word's hash sets one of 64 dimensions: texts that share words are close."""

    identity = "hash-words-64"
    checksum = "0" * 64
    dim = 64

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norms = np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out / norms


class Misfiled:
    """Not an expert, a combiner or an encoder."""
'''

ENTRY_POINTS = f"""[moe_router.experts]
echo = {MODULE}:EchoExpert
broken = {MODULE}.missing:Thing
misfiled = {MODULE}:Misfiled

[moe_router.combiners]
longest = {MODULE}:LongestAnswer
gone = {MODULE}.missing:Combiner

[moe_router.encoders]
hash = {MODULE}:HashEncoder
gone = {MODULE}.missing:Encoder
"""


def write_plugin_package(folder: Path) -> Path:
    """The package, installed into ``folder`` (returned): its module and its ``.dist-info``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODULE}.py").write_text(SOURCE)
    info = folder / f"{MODULE}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return folder
