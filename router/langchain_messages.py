"""LangChain's messages to and from the SDK's: the request's messages as Chat Completions takes them, and an answer
(or a stream's chunk) as LangChain's message, with its tool calls, usage, refusal and the routing trace; the
``response_format`` a schema is sent as, and the refusal check a structured output makes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
from langchain_core.messages.ai import InputTokenDetails, OutputTokenDetails, UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_function
from pydantic import (
    BaseModel,
)

from experts.types import Usage
from router import sdk
from router.trace import Trace

try:  # langchain-core 1.7.5+: what an integration raises for a refusal, whichever the provider
    from langchain_core.exceptions import ModelRefusalError
except ImportError:  # older: a parsing failure, as with_structured_output's include_raw reports one
    from langchain_core.exceptions import OutputParserException as ModelRefusalError  # type: ignore[assignment]


__all__ = ["ano_refusal", "answer_as", "chat_result", "no_refusal", "openai_tool_choice",
           "schema_response_format", "stream_chunk", "whole_chunk", "wire_messages"]


def openai_tool_choice(choice: dict[str, Any] | str | bool | None, names: list[str]) -> dict[str, Any] | str | None:
    """LangChain's ``tool_choice`` as OpenAI's API takes it (see ``ChatMoERouter.bind_tools``)."""
    if choice is None or choice is False:
        return None
    if choice is True:
        if len(names) != 1:
            raise ValueError(f"tool_choice=True picks the one bound tool, but {len(names)} are bound; name one")
        return {"type": "function", "function": {"name": names[0]}}
    if isinstance(choice, dict) or choice in ("auto", "none", "required"):
        return choice
    if choice == "any":
        return "required"
    if choice in names:
        return {"type": "function", "function": {"name": choice}}
    raise ValueError(f"tool_choice {choice!r} is neither auto, none, required, any nor a bound tool "
                     f"({', '.join(names)})")


def wire_messages(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    converted = convert_to_openai_messages([_chat_completions(m) if isinstance(m, AIMessage) else m
                                            for m in messages])
    return converted if isinstance(converted, list) else [converted]


def _chat_completions(message: AIMessage) -> AIMessage:
    """``message`` as a Chat Completions assistant message holds it: the text and refusal parts of list content
    (standard content blocks with ``output_version="v1"``, or another provider's blocks), text without its
    annotations, and no other block, which an OpenAI-compatible upstream refuses in an assistant message: tool
    calls travel in ``tool_calls``, and reasoning, server-side tool calls and results, and provider-specific
    blocks have no place in one."""
    if not isinstance(message.content, list):
        return message
    content: list[str | dict[str, Any]] = []
    for block in message.content:
        if isinstance(block, str):
            content.append(block)
        elif block.get("type") == "text":
            content.append({"type": "text", "text": block.get("text", "")})
        elif block.get("type") == "refusal" and block.get("refusal"):
            content.append({"type": "refusal", "refusal": block["refusal"]})
    return message.model_copy(update={"content": content})


def _metadata(expert: str, finish_reason: str | None, trace: Trace) -> dict[str, Any]:
    return {"model_name": expert, "finish_reason": finish_reason, "moe_trace": trace.summary()}


def _usage(usage: Usage) -> UsageMetadata:
    """The usage as langchain-openai gives it: the totals, and the upstream's breakdowns (cached prompt tokens as
    ``cache_read``, reasoning tokens as ``reasoning``, audio tokens) where it sent any."""
    metadata = UsageMetadata(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                             total_tokens=usage.total_tokens)
    prompt, completion = usage.prompt_tokens_details or {}, usage.completion_tokens_details or {}
    given = {"audio": prompt.get("audio_tokens"), "cache_read": prompt.get("cached_tokens"),
             "cache_creation": prompt.get("cache_write_tokens")}
    if inputs := {k: v for k, v in given.items() if v is not None}:
        metadata["input_token_details"] = InputTokenDetails(**inputs)  # type: ignore[typeddict-item]
    given = {"audio": completion.get("audio_tokens"), "reasoning": completion.get("reasoning_tokens")}
    if outputs := {k: v for k, v in given.items() if v is not None}:
        metadata["output_token_details"] = OutputTokenDetails(**outputs)  # type: ignore[typeddict-item]
    return metadata


def chat_result(result: sdk.ChatResult, parse_into: type[BaseModel] | None = None) -> ChatResult:
    """``parse_into``: the pydantic class a ``response_format`` named, which an answer (not a refusal nor a tool
    call) is parsed into, as ``ChatOpenAI`` does it (a ``ValidationError`` when it does not fit)."""
    calls, invalid = _tool_calls(result.tool_calls or [])
    metadata = _metadata(result.expert, result.finish_reason, result.trace)
    info: dict[str, Any] = {"finish_reason": result.finish_reason}
    if result.logprobs is not None:  # where langchain-openai puts them
        metadata["logprobs"] = info["logprobs"] = result.logprobs
    # A refusal goes where langchain-openai puts it; reasoning where langchain-deepseek puts it.
    extra: dict[str, Any] = {"refusal": result.refusal} if result.refusal is not None else {}
    if result.reasoning_content is not None:
        extra["reasoning_content"] = result.reasoning_content
    if parse_into is not None and result.refusal is None and not calls:
        extra["parsed"] = parse_into.model_validate_json(result.content)
    message = AIMessage(content=result.content, tool_calls=calls, invalid_tool_calls=invalid, id=result.id or None,
                        additional_kwargs=extra, response_metadata=metadata, usage_metadata=_usage(result.usage))
    generation = ChatGeneration(message=message, generation_info=info)
    return ChatResult(generations=[generation],
                      llm_output={"model_name": result.expert, "token_usage": result.usage.model_dump()})


def stream_chunk(piece: sdk.StreamChunk, usage: bool = True) -> ChatGenerationChunk:
    # Tool-call deltas as LangChain's chunks: added together, they give the message its parsed tool_calls.
    calls = [tool_call_chunk(name=(d.get("function") or {}).get("name"), args=_args_text((d.get("function") or {}).get(
        "arguments")), id=d.get("id"), index=d.get("index")) for d in piece.tool_calls or []]
    # Pieces of a refusal (and of reasoning) add up, as content does.
    extra: dict[str, Any] = {"refusal": piece.refusal} if piece.refusal else {}
    if piece.reasoning_content:
        extra["reasoning_content"] = piece.reasoning_content
    info = {"logprobs": piece.logprobs} if piece.logprobs is not None else None
    if piece.trace is None:
        return ChatGenerationChunk(message=AIMessageChunk(content=piece.content, tool_call_chunks=calls,
                                                          additional_kwargs=extra, id=piece.id or None),
                                   generation_info=info)
    # The last chunk: the expert that finished the answer (after any mid-stream switch) and the trace.
    expert = piece.trace.answered_by or piece.expert
    message = AIMessageChunk(content=piece.content, tool_call_chunks=calls, id=piece.id or None,
                             additional_kwargs=extra,
                             response_metadata=_metadata(expert, piece.finish_reason, piece.trace),
                             usage_metadata=_usage(piece.trace.usage) if usage else None, chunk_position="last")
    return ChatGenerationChunk(message=message, generation_info={**(info or {}), "finish_reason": piece.finish_reason})


def whole_chunk(result: sdk.ChatResult, usage: bool = True) -> ChatGenerationChunk:
    """A whole (combined) answer as the one and last chunk of a stream: what ``stream_chunk`` gives for the pieces of a
    streamed one, added up (tool calls as chunks, so they parse as the streamed ones do)."""
    calls = [tool_call_chunk(name=(c.get("function") or {}).get("name"), args=_args_text((c.get("function") or {}).get(
        "arguments")), id=c.get("id"), index=c.get("index", i)) for i, c in enumerate(result.tool_calls or [])]
    extra: dict[str, Any] = {"refusal": result.refusal} if result.refusal is not None else {}
    if result.reasoning_content is not None:
        extra["reasoning_content"] = result.reasoning_content
    info: dict[str, Any] = {"finish_reason": result.finish_reason}
    if result.logprobs is not None:
        info["logprobs"] = result.logprobs
    message = AIMessageChunk(content=result.content, tool_call_chunks=calls, id=result.id or None,
                             additional_kwargs=extra,
                             response_metadata=_metadata(result.expert, result.finish_reason, result.trace),
                             usage_metadata=_usage(result.usage) if usage else None, chunk_position="last")
    return ChatGenerationChunk(message=message, generation_info=info)


def _tool_calls(raw: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """OpenAI tool calls as LangChain's; one without a function name, or whose arguments are not a JSON object, is
    kept as invalid, its arguments as text."""
    calls, invalid = [], []
    for item in raw:
        function = item.get("function") or {}
        name, arguments, call_id = function.get("name"), function.get("arguments"), item.get("id")
        args = _args_object(arguments)
        if isinstance(name, str) and args is not None:
            calls.append(tool_call(name=name, args=args, id=call_id))
        else:
            error = "the call names no function" if not isinstance(name, str) else "arguments are not a JSON object"
            invalid.append(invalid_tool_call(name=name, args=_args_text(arguments), id=call_id, error=error))
    return calls, invalid


def _args_object(arguments: Any) -> dict[str, Any] | None:
    """A tool call's arguments as a dict, None if they are none: OpenAI sends them as JSON text, some servers as
    the object itself; none, or empty text, is no arguments."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or arguments == "":
        return {}
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _args_text(arguments: Any) -> str | None:
    """A tool call's arguments as LangChain's chunks and invalid calls carry them: text (an object sent as one, as
    JSON)."""
    if arguments is None or isinstance(arguments, str):
        return arguments
    try:
        return json.dumps(arguments)
    except (TypeError, ValueError):
        return str(arguments)


def schema_response_format(schema: dict[str, Any] | type, strict: bool | None, pydantic: bool) -> dict[str, Any]:
    """``schema`` as ``ChatOpenAI`` sends it for ``method="json_schema"``: a ``response_format`` given whole, or
    ``json_schema``'s part of one, as given; a pydantic class strict (as the OpenAI SDK sends it) unless ``strict``
    says otherwise; another schema strict as ``strict``, or its own ``strict``, says."""
    if isinstance(schema, dict) and schema.get("type") == "json_schema" and "json_schema" in schema:
        return schema
    if isinstance(schema, dict) and "name" in schema and "schema" in schema:
        return {"type": "json_schema", "json_schema": schema}
    if strict is None:
        strict = pydantic or (isinstance(schema, dict) and schema.get("strict") is True)
    function = convert_to_openai_function(schema, strict=strict)
    function["schema"] = function.pop("parameters")
    return {"type": "json_schema", "json_schema": function}


def answer_as(parser: PydanticOutputParser[Any], message: BaseMessage) -> BaseModel | None:
    """A ``json_schema`` answer as the pydantic class; None when the model called a tool (``tools=``) instead, as
    ``ChatOpenAI`` gives it."""
    if isinstance(message, AIMessage) and message.tool_calls:
        return None
    parsed: BaseModel = parser.invoke(message)
    return parsed


def _refusing(message: BaseMessage) -> bool:
    """Whether ``message`` (or a chunk of one) is a refusal (where ``chat_result`` and ``stream_chunk`` put it) or
    finished for a content filter: there is no answer to parse."""
    return bool(message.additional_kwargs.get("refusal")) or \
        message.response_metadata.get("finish_reason") == "content_filter"


def _refused(message: BaseMessage) -> ModelRefusalError:
    """``ModelRefusalError`` for a refusing ``message``, as ``ChatOpenAI``'s structured output raises it."""
    if refusal := message.additional_kwargs.get("refusal"):
        return ModelRefusalError(str(refusal), raw_message=message)
    return ModelRefusalError("the answer was stopped by a content filter", raw_message=message)


class _Refusal:
    """The messages a structured output's parser is given, until one refuses: a streamed refusal comes in pieces,
    so from its first on the rest are added to it, and the whole refusal is raised once the stream ends."""

    def __init__(self) -> None:
        self.refusal: BaseMessage | None = None

    def passes(self, message: BaseMessage) -> bool:
        if isinstance(self.refusal, AIMessageChunk) and isinstance(message, AIMessageChunk):
            self.refusal = self.refusal + message
        elif self.refusal is None and _refusing(message):
            self.refusal = message
        return self.refusal is None

    def end(self) -> None:
        if self.refusal is not None:
            raise _refused(self.refusal)


def no_refusal(messages: Iterator[BaseMessage]) -> Iterator[BaseMessage]:
    refusal = _Refusal()
    for message in messages:
        if refusal.passes(message):
            yield message
    refusal.end()


async def ano_refusal(messages: AsyncIterator[BaseMessage]) -> AsyncIterator[BaseMessage]:
    refusal = _Refusal()
    async for message in messages:
        if refusal.passes(message):
            yield message
    refusal.end()
