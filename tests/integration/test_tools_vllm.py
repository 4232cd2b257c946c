"""Tool calling through the router on a real vLLM server (CPU build, tiny random-weight Llama, hermes parser).

Random weights never call a tool on their own, so every call here is forced: ``tool_choice`` "required" or a
named function makes vLLM decode against the tools' JSON schemas (guided decoding), and its hermes parser turns
the output into OpenAI tool calls. The schemas bound every string and number, so a random model's forced JSON
ends well inside ``max_tokens``. Greedy decoding (temperature 0) repeats itself, so the router's answer can be
compared with vLLM's own for the same request; only the tool-call ids differ (vLLM draws a fresh one per call).

`moe serve` runs in front of two experts: ``chatty`` (tiny-a, no ``tools`` capability), the gate's choice for
every question below, and ``agent`` (tiny-b, the tool-calling server, declared with ``tools``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field

from router.config import load_config
from router.train import train_from_config
from tests.integration.vllm_server import VLLMServer

CHATTY = ["how long do I boil an egg", "a recipe for tomato soup", "how to bake sourdough bread",
          "what spices go into a curry", "how do I caramelise onions", "best way to roast vegetables"]
AGENT = ["solve the equation 3x + 5 = 20", "compute 17 times 23", "is 97 a prime number",
         "what is the derivative of x squared", "factor the polynomial x^2 - 9", "integrate sin x from 0 to pi"]
# A cooking question: the gate ranks chatty first, but only agent may take a request that carries tools.
ASK: list[Any] = [{"role": "user", "content": "what spices go into a curry? look it up"}]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two small whole numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS: list[dict[str, Any]] = [WEATHER, ADD]
# parallel_tool_calls=False caps "required" at one call (vLLM's schema gets maxItems 1); without it a random
# model keeps appending calls until max_tokens. It also shows the router passes the field on.
FORCED: dict[str, Any] = {"tools": TOOLS, "parallel_tool_calls": False, "temperature": 0, "seed": 7,
                          "max_tokens": 64}
CHOICES: dict[str, Any] = {"required": "required", "named": {"type": "function", "function": {"name": "add"}}}
VLLM_CALL_ID = re.compile(r"^chatcmpl-tool-[0-9a-f]+$")


def check_arguments(name: str, arguments: str) -> dict[str, Any]:
    """The call's arguments, parsed, after checking them against its tool's schema."""
    args = json.loads(arguments)
    if name == "add":
        assert set(args) == {"a", "b"} and all(isinstance(v, int) and 0 <= v <= 99 for v in args.values())
    else:
        assert name == "get_weather" and set(args) == {"city"} and 1 <= len(args["city"]) <= 12
    return dict(args)


def write_config(path: Path, chatty: VLLMServer, agent: VLLMServer) -> Path:
    def expert(name: str, server: VLLMServer, capabilities: list[str], examples: list[str]) -> dict[str, Any]:
        return {"name": name, "type": "vllm", "endpoint": server.url, "model": server.spec.served_name,
                "timeout_s": 60, "capabilities": capabilities, "examples": examples}

    path.write_text(yaml.safe_dump({
        "version": 1,
        "service": {"name": "moe-router"},
        "gate": {"artifact": str(path.parent / "gate"), "top_k": {"policy": "fixed", "k": 1}},
        "fallback": {"enabled": True, "max_attempts": 2, "deadline_s": 120},
        "experts": [expert("chatty", chatty, ["chat", "stream"], CHATTY),
                    expert("agent", agent, ["chat", "stream", "tools"], AGENT)],
    }))
    train_from_config(load_config(path), progress=False)
    return path


@pytest.fixture(scope="module")
def router_url(vllm_experts: dict[str, VLLMServer], vllm_tools_expert: VLLMServer,
               moe_serve: Callable[[Path], AbstractContextManager[str]],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    chatty = next(s for s in vllm_experts.values() if s is not vllm_tools_expert)
    config = write_config(tmp_path_factory.mktemp("router-tools") / "router.yaml", chatty, vllm_tools_expert)
    with moe_serve(config) as url:
        yield url


@pytest.fixture(scope="module")
def router(router_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{router_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def vllm(vllm_tools_expert: VLLMServer) -> Iterator[OpenAI]:
    """The tool-calling vLLM server itself, to compare the router's answers with."""
    with OpenAI(base_url=vllm_tools_expert.url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.mark.parametrize("choice", CHOICES)
def test_forced_tool_call_comes_back_as_vllm_made_it(router: OpenAI, vllm: OpenAI, vllm_tools_expert: VLLMServer,
                                                     choice: str) -> None:
    routed = router.chat.completions.create(model="auto", messages=ASK, tool_choice=CHOICES[choice], **FORCED)
    direct = vllm.chat.completions.create(model=vllm_tools_expert.name, messages=ASK,
                                          tool_choice=CHOICES[choice], **FORCED)

    assert routed.model == "agent"
    trace = routed.model_extra["moe"]
    assert trace["decision"]["ranking"][0] == "chatty"  # the gate's favourite, passed over: it has no tools
    assert [a["expert"] for a in trace["attempts"]] == ["agent"]
    [call] = routed.choices[0].message.tool_calls or []
    [expected] = direct.choices[0].message.tool_calls or []
    # OpenAI's (and vLLM's) finish reasons: "tool_calls" when the model chose to call, "stop" for a named call.
    assert routed.choices[0].finish_reason == direct.choices[0].finish_reason
    assert routed.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")
    assert call.type == "function" and VLLM_CALL_ID.match(call.id)
    assert call.model_dump(exclude={"id"}) == expected.model_dump(exclude={"id"})
    assert call.function.name in {t["function"]["name"] for t in TOOLS}
    if choice == "named":
        assert call.function.name == "add"
    check_arguments(call.function.name, call.function.arguments)
    assert routed.usage is not None and direct.usage is not None
    assert routed.usage.completion_tokens == direct.usage.completion_tokens


def _tool_deltas(client: OpenAI, model: str) -> tuple[list[list[dict[str, Any]]], str | None]:
    """Each chunk's ``delta.tool_calls`` as sent, and the stream's finish reason."""
    deltas, finish = [], None
    for chunk in client.chat.completions.create(model=model, messages=ASK, tool_choice="required", stream=True,
                                                **FORCED):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        if choice.delta.tool_calls:
            deltas.append([c.model_dump(exclude_none=True) for c in choice.delta.tool_calls])
    return deltas, finish


def _reassemble(deltas: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One call from OpenAI-format stream deltas, checking their shape on the way: the first opens call 0 with
    its id, type and name, the rest carry fragments of its arguments for the same index."""
    first, *rest = (d for chunk in deltas for d in chunk)
    assert first["index"] == 0 and first["type"] == "function" and VLLM_CALL_ID.match(first["id"])
    assert all(d["index"] == 0 and "id" not in d and "name" not in d["function"] for d in rest)
    arguments = "".join(d["function"].get("arguments", "") for d in [first, *rest])
    return {"name": first["function"]["name"], "arguments": arguments}


def test_streamed_tool_call_deltas_arrive_in_openai_format(router: OpenAI, vllm: OpenAI,
                                                           vllm_tools_expert: VLLMServer) -> None:
    routed, finish = _tool_deltas(router, "auto")
    direct, direct_finish = _tool_deltas(vllm, vllm_tools_expert.name)

    assert finish == direct_finish == "tool_calls"
    assert len(routed) > 1  # the arguments arrive in pieces, not as one buffered call
    # Where vLLM cuts the arguments depends on how many tokens each engine step hands its streamer, so two
    # streams of the same call are cut differently; the call they make up is the same.
    call = _reassemble(routed)
    assert call == _reassemble(direct)
    check_arguments(call["name"], call["arguments"])


class AddArgs(BaseModel):
    # Bounded, so a random model's forced integers are short.
    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


@tool(args_schema=AddArgs)
def add(a: int, b: int) -> int:
    """Add two small whole numbers."""
    return a + b


def run_agent(llm: ChatOpenAI, question: str, *, stream: bool, max_turns: int = 3) -> list[BaseMessage]:
    """The loop every tool-using agent runs: call the model, run the tools it asks for, send their results back,
    until it answers in text. Random weights never call a tool unprompted, so the model is made to call one
    until a tool result is in (tool_choice "required") and then forbidden to (tool_choice "none")."""
    messages: list[BaseMessage] = [HumanMessage(question)]
    for _ in range(max_turns):
        has_result = any(isinstance(m, ToolMessage) for m in messages)
        bound = llm.bind_tools([add], tool_choice="none" if has_result else "required", parallel_tool_calls=False)
        if stream:  # the chunks add up to one message, tool calls included
            reply: Any = None
            for chunk in bound.stream(messages):
                reply = chunk if reply is None else reply + chunk
            assert isinstance(reply, AIMessageChunk)
        else:
            reply = bound.invoke(messages)
        assert isinstance(reply, AIMessage)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        for call in reply.tool_calls:
            messages.append(ToolMessage(str(add.invoke(call["args"])), tool_call_id=call["id"]))
    raise AssertionError(f"the agent did not answer in {max_turns} turns: {messages}")


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
def test_langchain_agent_loop_with_a_tool_completes(router_url: str, stream: bool) -> None:
    llm = ChatOpenAI(base_url=f"{router_url}/v1", api_key="unused", model="auto",  # type: ignore[arg-type,call-arg]
                     temperature=0, seed=7, max_tokens=48, max_retries=0)
    messages = run_agent(llm, "What is 2 + 3? Use the add tool.", stream=stream)

    assert len(messages) == 4  # question, tool call, tool result, answer
    call, result, final = messages[1:]
    assert isinstance(call, AIMessage) and isinstance(result, ToolMessage) and isinstance(final, AIMessage)
    [tool_call] = call.tool_calls
    assert tool_call["name"] == "add" and VLLM_CALL_ID.match(tool_call["id"] or "")
    assert call.invalid_tool_calls == []
    args = check_arguments("add", json.dumps(tool_call["args"]))
    assert result.content == str(args["a"] + args["b"])
    assert final.tool_calls == [] and isinstance(final.content, str) and final.content
    assert call.response_metadata["model_name"] == final.response_metadata["model_name"] == "agent"


def test_tools_aimed_at_an_expert_without_the_capability_are_refused(router: OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            router.chat.completions.create(model="chatty", messages=ASK, tool_choice="required", stream=stream,
                                           **FORCED)
        assert info.value.status_code == 400
        error = info.value.body
        assert isinstance(error, dict)
        assert (error["code"], error["param"]) == ("tools_not_supported", "tools")
        assert "chatty" in error["message"] and "experts that do: agent" in error["message"]
