"""ReplayExpert: recorded answers at recorded cost, and never an invented one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from experts.base import ExpertContext
from experts.errors import ExpertConfigError, NoRecording
from experts.recordings import load_mmlu_pro, load_routerbench, mmlu_pro_prompt
from experts.registry import build_expert
from experts.replay import ReplayExpert
from experts.types import ChatMessage, ChatRequest, estimate_tokens
from router.config import ExpertConfig

RB_PATH = "routerdc/routerbench_zs"
MP_PATH = "mmlu_pro_outcomes"


def replay(data_dir: Path, source: str, model: str, **extra: Any) -> ReplayExpert:
    cost = extra.pop("cost", {})
    config = ExpertConfig.model_validate({
        "name": extra.pop("name", "replayed"), "type": "replay", "model": model, "cost": cost,
        "replay": {"source": source, "path": RB_PATH if source == "routerbench" else MP_PATH, **extra},
    })
    expert = build_expert(config, ExpertContext(base_dir=data_dir))
    assert isinstance(expert, ReplayExpert)
    return expert


def ask(text: str, system: str | None = None) -> ChatRequest:
    messages = [ChatMessage(role="system", content=system)] if system else []
    return ChatRequest(messages=[*messages, ChatMessage(role="user", content=text)])


async def test_routerbench_replays_the_recorded_response_and_cost(data_dir: Path) -> None:
    store = load_routerbench(data_dir / RB_PATH)
    (row,) = [r for r in store.rows if r.sample_id == "mbpp.dev.1"]
    recorded = row.answers["claude-v2"]
    expert = replay(data_dir, "routerbench", "claude-v2")
    reply = await expert.generate(ask(row.prompt))
    assert reply.content == recorded.response
    assert reply.content.startswith("Here is a python function to identify non-prime numbers:")
    assert reply.cost_usd == recorded.cost_usd == 0.0061600000000000005  # the CSV cell, bit for bit
    assert reply.model == "claude-v2" and reply.expert == "replayed"
    assert reply.usage.prompt_tokens == math.ceil(len(row.prompt) / 4)
    assert reply.usage.completion_tokens == math.ceil(len(recorded.response) / 4)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert expert.recorded_outcome(row.prompt) == 1.0


async def test_lookup_uses_the_last_user_message_whitespace_normalised(data_dir: Path) -> None:
    store = load_routerbench(data_dir / RB_PATH)
    row = store.select(task="winograde", split="test")[0]
    expert = replay(data_dir, "routerbench", "gpt-4-1106-preview")
    messy = "\n " + row.prompt.replace("\n", "\n\n  ") + "  "
    reply = await expert.generate(ask(messy, system="You are helpful."))
    assert reply.content == row.answers["gpt-4-1106-preview"].response == "B"


async def test_column_overrides_model(data_dir: Path) -> None:
    store = load_routerbench(data_dir / RB_PATH)
    row = store.rows[0]
    expert = replay(data_dir, "routerbench", "some-served-name", column="zero-one-ai/Yi-34B-Chat")
    reply = await expert.generate(ask(row.prompt))
    assert reply.model == "zero-one-ai/Yi-34B-Chat"
    assert reply.cost_usd == row.answers["zero-one-ai/Yi-34B-Chat"].cost_usd


def test_an_unrecorded_model_is_named_by_the_key_that_gave_it(data_dir: Path) -> None:
    with pytest.raises(ExpertConfigError) as by_model:
        replay(data_dir, "routerbench", "not-a-model")
    assert by_model.value.field == "model" and by_model.value.message.startswith("model 'not-a-model' is not in")
    with pytest.raises(ExpertConfigError) as by_column:
        replay(data_dir, "routerbench", "served-name", column="not-a-column")
    assert by_column.value.field == "replay.column"
    assert by_column.value.message.startswith("replay.column 'not-a-column' is not in the routerbench recordings")


async def test_unrecorded_prompt_raises_no_recording(data_dir: Path) -> None:
    expert = replay(data_dir, "routerbench", "claude-v1")
    with pytest.raises(NoRecording) as caught:
        await expert.generate(ask("What is the capital of France?"))
    assert caught.value.expert == "replayed" and not caught.value.transient
    assert expert.recorded_outcome("What is the capital of France?") is None


def test_unknown_model_is_a_config_error_listing_the_known(data_dir: Path) -> None:
    with pytest.raises(ExpertConfigError) as caught:
        replay(data_dir, "mmlu_pro", "gpt-5")
    message = str(caught.value)
    assert "'gpt-5'" in message and "gemma-7b" in message and "Llama-2-7b-hf" in message


def test_missing_data_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ExpertConfigError, match="cannot load routerbench") as caught:
        replay(tmp_path, "routerbench", "claude-v1")
    # The path was relative: the message says against what it was read, and what usually went wrong.
    assert f"relative to the config's folder, {tmp_path}" in str(caught.value)
    assert "MOE_DATA_DIR" in str(caught.value)


async def test_mmlu_pro_answers_with_the_recorded_letter_at_configured_prices(data_dir: Path) -> None:
    question = load_mmlu_pro(data_dir / MP_PATH).question(70)
    prompt = mmlu_pro_prompt(question)
    expert = replay(data_dir, "mmlu_pro", "Llama-2-70b-hf", cost={"input_per_1k": 0.5, "output_per_1k": 2.0})
    reply = await expert.generate(ask(prompt))
    assert reply.content == "The answer is (F)."  # the recorded (wrong) letter; gold is I
    assert reply.usage.prompt_tokens == estimate_tokens(len(prompt))
    assert reply.usage.completion_tokens == estimate_tokens(256)  # the recorded output length
    assert reply.cost_usd == pytest.approx(reply.usage.prompt_tokens * 0.0005 + 64 * 0.002)
    assert expert.recorded_outcome(prompt) == 0
    assert replay(data_dir, "mmlu_pro", "gemma-7b").recorded_outcome(prompt) == 1


async def test_mmlu_pro_without_an_extracted_letter_answers_empty(data_dir: Path) -> None:
    store = load_mmlu_pro(data_dir / MP_PATH)
    q, outcome = next(
        (q, o) for q, o in zip(store.questions, store.outcomes("Qwen1.5-7B-Chat"), strict=True)
        if o.recorded and o.pred is None
    )
    reply = await replay(data_dir, "mmlu_pro", "Qwen1.5-7B-Chat").generate(ask(mmlu_pro_prompt(q)))
    assert reply.content == ""
    assert outcome.response_chars is not None
    assert reply.usage.completion_tokens == estimate_tokens(outcome.response_chars)


async def test_mmlu_pro_question_without_a_record_raises(data_dir: Path) -> None:
    store = load_mmlu_pro(data_dir / MP_PATH)
    q = next(q for q, c in zip(store.questions, store.correct("DeepSeek-Coder-V2"), strict=True) if c is None)
    expert = replay(data_dir, "mmlu_pro", "DeepSeek-Coder-V2")
    with pytest.raises(NoRecording):
        await expert.generate(ask(mmlu_pro_prompt(q)))
    assert expert.recorded_outcome(mmlu_pro_prompt(q)) is None


async def test_latency_is_simulated(data_dir: Path) -> None:
    row = load_routerbench(data_dir / RB_PATH).rows[0]
    reply = await replay(data_dir, "routerbench", "claude-v1", latency_ms=30).generate(ask(row.prompt))
    assert reply.latency_ms >= 30


async def test_stream_yields_the_recording_then_usage_and_cost(data_dir: Path) -> None:
    row = load_routerbench(data_dir / RB_PATH).rows[0]
    expert = replay(data_dir, "routerbench", "gpt-3.5-turbo-1106")
    pieces = [p async for p in expert.stream(ask(row.prompt))]
    assert "".join(p.content for p in pieces) == row.answers["gpt-3.5-turbo-1106"].response
    assert pieces[-1].finish_reason == "stop" and pieces[-1].usage is not None
    assert pieces[-1].cost_usd == row.answers["gpt-3.5-turbo-1106"].cost_usd
