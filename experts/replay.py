"""An expert that answers from recorded real outputs of a real LLM, at the recorded cost.

It never invents an answer: a prompt with no recording for its model raises ``NoRecording``. A prompt is
found by the request's last user message, whitespace-normalised (``experts.recordings.normalize_prompt``).

What a reply holds, per source:

* ``routerbench``: the model's full recorded response, and the recorded USD cost.
* ``mmlu_pro``: ``"The answer is (X)."`` with the letter the model really answered; the recorded CoT text is
  not kept upstream of this project, only its letter and length. Where the model answered but no letter
  could be extracted from its output, the content is the empty string: the model gave no usable answer, and
  inventing a letter would be a lie. MMLU-Pro has no prices, so cost is the config's per-1k prices times
  the token counts below.

Token counts are **estimates**: neither source records tokens, so ``ceil(chars / 4)``. Prompt tokens count
the request's message text; completion tokens count the recorded output (for MMLU-Pro the length of the
model's real generated text, ``response_chars``, not of the short rendering above), so cost tracks what the
model really produced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from experts.base import Expert, ExpertContext, ExpertSpec
from experts.errors import ExpertConfigError, NoRecording
from experts.recordings import load_mmlu_pro, load_routerbench
from experts.types import ChatRequest, ExpertReply, Usage, estimate_tokens

__all__ = ["Recording", "ReplayExpert"]


@dataclass(frozen=True, slots=True)
class Recording:
    """One recorded answer, in the terms a reply needs."""

    content: str
    output_chars: int  # length of what the model really generated
    correct: float | None
    cost_usd: float | None  # None: the source has no price; the expert prices the estimated tokens


class _Source(Protocol):
    models: tuple[str, ...]

    def recording(self, prompt: str, model: str) -> Recording | None: ...


class _RouterBenchSource:
    def __init__(self, path: Path) -> None:
        self.store = load_routerbench(path)
        self.models = self.store.models

    def recording(self, prompt: str, model: str) -> Recording | None:
        row = self.store.find(prompt, model)
        if row is None:
            return None
        answer = row.answers[model]
        text = answer.response
        return Recording(content=text, output_chars=len(text), correct=answer.correct, cost_usd=answer.cost_usd)


class _MMLUProSource:
    def __init__(self, path: Path) -> None:
        self.store = load_mmlu_pro(path)
        self.models = self.store.models

    def recording(self, prompt: str, model: str) -> Recording | None:
        found = self.store.find(prompt, model)
        if found is None:
            return None
        _, outcome = found
        content = f"The answer is ({outcome.pred})." if outcome.pred else ""
        chars = outcome.response_chars if outcome.response_chars is not None else len(content)
        return Recording(content=content, output_chars=chars, correct=outcome.correct, cost_usd=None)


_SOURCES: dict[str, Callable[[Path], _Source]] = {
    "routerbench": _RouterBenchSource,
    "mmlu_pro": _MMLUProSource,
}


class ReplayExpert(Expert):
    """Plays one recorded model (``replay.column``, else ``model``) from one source."""

    def __init__(self, config: ExpertSpec, context: ExpertContext | None = None) -> None:
        super().__init__(config, context)
        replay = config.replay
        if replay is None:
            raise ExpertConfigError(self.name, "type 'replay' needs a replay block (source, path)")
        path = Path(replay.path)
        if not path.is_absolute():
            path = self.context.base_dir / path
        try:
            self._source: _Source = _SOURCES[replay.source](path)
        except (OSError, ValueError) as exc:
            hint = ""
            if isinstance(exc, FileNotFoundError) and not Path(replay.path).is_absolute():
                # The usual cause: a relative path (from $MOE_DATA_DIR, say) read against the config's folder.
                hint = (f" (replay.path {replay.path!r} is relative to the config's folder, {self.context.base_dir}; "
                        "a variable such as MOE_DATA_DIR that it holds should be an absolute path)")
            raise ExpertConfigError(self.name, f"cannot load {replay.source} recordings: {exc}{hint}",
                                    "replay.path") from exc
        self.model = config.recorded_model
        if self.model not in self._source.models:
            key = "replay.column" if replay.column else "model"  # the key the recorded model was read from
            raise ExpertConfigError(
                self.name,
                f"{key} {self.model!r} is not in the {replay.source} recordings; "
                f"known: {', '.join(self._source.models)}",
                key,
            )
        self._latency_s = replay.latency_ms / 1000.0

    def recording(self, prompt: str) -> Recording | None:
        """This expert's recording for ``prompt``, or None."""
        return self._source.recording(prompt, self.model)

    def recorded_outcome(self, prompt: str) -> float | None:
        """Whether the recorded answer to ``prompt`` was right (1.0 / 0.0); None when there is no recording."""
        found = self.recording(prompt)
        return None if found is None else found.correct

    async def generate(self, request: ChatRequest) -> ExpertReply:
        started = time.perf_counter()
        found = self.recording(request.query_text())
        if found is None:
            # Fails at once, as an endpoint's 404 would: there is no work to simulate.
            raise NoRecording(self.name, f"no recording of {self.model!r} for this prompt")
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        usage = Usage.counted(estimate_tokens(request.text_chars()), estimate_tokens(found.output_chars))
        return ExpertReply(
            expert=self.name,
            content=found.content,
            usage=usage,
            cost_usd=found.cost_usd if found.cost_usd is not None else self.cost(usage),
            latency_ms=(time.perf_counter() - started) * 1000.0,
            model=self.model,
        )
