"""A LangChain chat model for a running router service: ``ChatMoERouter``.

It speaks to the service through ``router.sdk`` (so the wire format is written once), works in LCEL chains,
streams, and returns what plain ``ChatOpenAI`` cannot: the routing trace, in
``response_metadata["moe_trace"]``, and the expert that answered, in ``response_metadata["model_name"]``.
When streaming, both arrive on the last chunk. The network is injected for tests (``transport``,
``async_transport``), as everywhere in the SDK.

It takes its arguments as ``ChatOpenAI`` does: ``model_name`` is another name for ``model`` (``openai_api_key`` for
``api_key``, ``request_timeout`` for ``timeout``), any argument it does not
declare (``seed``, ``frequency_penalty``, a typo) goes into ``model_kwargs``, with a warning, and is sent with every
request; ``bind(...)`` and call keywords override the model's own, ``model`` and ``combiner`` included. A combiner
other than ``top1`` cannot combine a stream (one expert serves a stream), so with one, streaming calls (``stream``,
``astream``, ``astream_events``, LangGraph's messages mode) make one combined call and yield its answer as one chunk.

    from router.langchain import ChatMoERouter
    model = ChatMoERouter(base_url="http://127.0.0.1:8000", api_key="...")
    chain = prompt | model | StrOutputParser()
"""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import httpx
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, SecretStr, model_validator

from experts.types import Usage
from router import sdk
from router.trace import Trace

__all__ = ["ChatMoERouter"]

# Other names ``ChatOpenAI`` takes for the same arguments. ``openai_api_key`` above all: left undeclared, the key
# would be sent in every request's body, which the service forwards to every expert.
_ALIASES = {"model_name": "model", "request_timeout": "timeout", "openai_api_key": "api_key"}


class ChatMoERouter(BaseChatModel):
    """A chat model whose every call is routed by the mixture-of-experts service."""

    # A refused argument's error names the problem, never the arguments as given: pydantic would print them all,
    # the key among them (``input_value={'api_key': 'sk-...``).
    model_config = ConfigDict(hide_input_in_errors=True)

    base_url: str = "http://127.0.0.1:8000"
    api_key: SecretStr | None = None
    # "auto" (or the service's name) routes; an expert's name calls that expert directly.
    model: str = "auto"
    # The combiner (``x-moe-combiner``: top1, vote, consensus, fuse, escalate); None: the service's configured one.
    # Streams are served by one expert and never send it; with one other than top1, a streaming call is served by
    # one combined (non-streamed) call instead, yielded as one chunk.
    combiner: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    # Seconds, as the SDK's clients take it; None: no timeout (``ChatOpenAI``'s ``timeout=None``).
    timeout: float | None = 120.0
    # Any other OpenAI request field (seed, response_format, ...), sent as given; an argument this model does not
    # declare lands here (see ``build_extra``).
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    transport: httpx.BaseTransport | None = Field(default=None, exclude=True)
    async_transport: httpx.AsyncBaseTransport | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def build_extra(cls, values: Any) -> Any:
        """The arguments as ``ChatOpenAI`` takes them, rather than silently dropped: ``model_name`` (and
        ``request_timeout``) as another name for ``model`` (and ``timeout``); any argument this model does not
        declare moved into ``model_kwargs`` with a warning, so it is sent as a request field; and one of this
        model's own parameters given in ``model_kwargs`` moved out to it, with a warning."""
        if not isinstance(values, dict) or not isinstance(values.get("model_kwargs", {}), dict):
            return values  # for pydantic to refuse
        values = dict(values)
        for alias, name in _ALIASES.items():
            if alias in values:
                given = values.pop(alias)
                if name in values and values[name] != given:
                    shown = (f"{alias} and {name}" if name == "api_key"  # never a key in an error message
                             else f"{alias}={given!r} and {name}={values[name]!r}")
                    raise ValueError(f"{shown} both given: {alias} is another name for {name}; give one")
                values[name] = given
        declared = set(cls.model_fields)
        extra = dict(values.get("model_kwargs") or {})
        # stacklevel 4: the warning names the caller's ChatMoERouter(...) line (past pydantic's and LangChain's
        # __init__).
        for name in [k for k in values if k not in declared]:
            if name in extra:
                raise ValueError(f"{name} given twice, as an argument and in model_kwargs")
            warnings.warn(f"{name} is not a ChatMoERouter parameter: moved into model_kwargs, it is sent with every "
                          "request as a request field; check that is what you meant", UserWarning, stacklevel=4)
            extra[name] = values.pop(name)
        own = declared - set(BaseChatModel.model_fields)  # this model's parameters, not LangChain's (``metadata``)
        for name in sorted(own & extra.keys()):
            if name in values:
                raise ValueError(f"{name} given twice, as an argument and in model_kwargs")
            warnings.warn(f"{name} is a ChatMoERouter parameter: give it as {name}=..., not in model_kwargs",
                          UserWarning, stacklevel=4)
            values[name] = extra.pop(name)
        if extra or "model_kwargs" in values:
            values["model_kwargs"] = extra
        return values

    @property
    def _llm_type(self) -> str:
        return "moe-router"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model, "combiner": self.combiner,
                **self._params(None, {})}

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool], *,
                   tool_choice: dict[str, Any] | str | bool | None = None, strict: bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Send ``tools`` with each call; the service routes it only to experts declaring the capability.

        ``tool_choice`` takes LangChain's values, sent as OpenAI's API (and vLLM) take them: ``"any"`` (what
        ``with_structured_output`` asks for) as ``"required"``, a tool's name (or ``True`` with one tool) as that
        named function; ``"auto"``, ``"none"``, ``"required"`` and a dict as given. ``strict``, as ``ChatOpenAI``
        takes it, goes on each tool's function (``"strict": true``), never at the request's top level."""
        converted = [convert_to_openai_tool(t, strict=strict) for t in tools]
        bound: dict[str, Any] = {"tools": converted, **kwargs}
        choice = _tool_choice(tool_choice, [t["function"]["name"] for t in converted])
        if choice is not None:
            bound["tool_choice"] = choice
        return self.bind(**bound)

    # -- the four entry points: thin shells over the SDK ----------------------------------------------------
    # Each takes the call's keywords (``bind(...)``, ``invoke(..., **kwargs)``) over the model's own, ``model`` and
    # ``combiner`` included; ``timeout`` among them is the call's HTTP timeout (the SDK's).
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        model, combiner, params = self._request(stop, kwargs)
        with self._client() as client:
            result = client.chat(_wire(messages), model=model, combiner=combiner, **params)
        return _chat_result(result)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        model, combiner, params = self._request(stop, kwargs)
        async with self._async_client() as client:
            result = await client.chat(_wire(messages), model=model, combiner=combiner, **params)
        return _chat_result(result)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        model, combiner, params = self._request(stop, kwargs)
        with self._client() as client:
            if not _streams(combiner):  # a combined answer: one call, one chunk (see the module docstring)
                whole = _whole_chunk(client.chat(_wire(messages), model=model, combiner=combiner, **params))
                if run_manager and whole.message.content:
                    run_manager.on_llm_new_token(whole.text, chunk=whole)
                yield whole
                return
            for piece in client.stream(_wire(messages), model=model, **params):
                chunk = _chunk(piece)
                if run_manager and piece.content:
                    run_manager.on_llm_new_token(piece.content, chunk=chunk)
                yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        model, combiner, params = self._request(stop, kwargs)
        async with self._async_client() as client:
            if not _streams(combiner):
                whole = _whole_chunk(await client.chat(_wire(messages), model=model, combiner=combiner, **params))
                if run_manager and whole.message.content:
                    await run_manager.on_llm_new_token(whole.text, chunk=whole)
                yield whole
                return
            async for piece in client.stream(_wire(messages), model=model, **params):
                chunk = _chunk(piece)
                if run_manager and piece.content:
                    await run_manager.on_llm_new_token(piece.content, chunk=chunk)
                yield chunk

    # -- shared ---------------------------------------------------------------------------------------------
    def _request(self, stop: list[str] | None, kwargs: dict[str, Any]) -> tuple[str, str | None, dict[str, Any]]:
        """The call's model, combiner and request parameters: the call's keywords over the model's own."""
        params = dict(kwargs)
        model = params.pop("model", None) or self.model
        combiner = params.pop("combiner") if "combiner" in params else self.combiner
        return model, combiner, self._params(stop, params)

    def _params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        params = {"temperature": self.temperature, "max_tokens": self.max_tokens, "top_p": self.top_p,
                  "stop": stop or self.stop, **self.model_kwargs, **kwargs}
        # ``stream`` is LangChain's own switch (``invoke(..., stream=True)`` takes the streaming path), already
        # acted on: the SDK's chat and stream say whether they stream, and refuse it as a request field.
        return {k: v for k, v in params.items() if v is not None and k != "stream"}

    def _key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None

    def _client(self) -> sdk.Client:
        return sdk.Client(self.base_url, api_key=self._key(), timeout=self.timeout, transport=self.transport)

    def _async_client(self) -> sdk.AsyncClient:
        # One per call: an httpx.AsyncClient is tied to the event loop it first ran on.
        return sdk.AsyncClient(self.base_url, api_key=self._key(), timeout=self.timeout,
                               transport=self.async_transport)


def _streams(combiner: str | None) -> bool:
    """Whether a call with ``combiner`` may stream: only with none (the service streams with one expert whatever
    its configured combiner) or ``top1``, as the service reads the name (case and surrounding space aside)."""
    return combiner is None or combiner.strip().lower() == "top1"


def _tool_choice(choice: dict[str, Any] | str | bool | None, names: list[str]) -> dict[str, Any] | str | None:
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


def _wire(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    converted = convert_to_openai_messages(messages)
    return converted if isinstance(converted, list) else [converted]


def _metadata(expert: str, finish_reason: str | None, trace: Trace) -> dict[str, Any]:
    return {"model_name": expert, "finish_reason": finish_reason, "moe_trace": trace.summary()}


def _usage(usage: Usage) -> UsageMetadata:
    return UsageMetadata(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                         total_tokens=usage.total_tokens)


def _chat_result(result: sdk.ChatResult) -> ChatResult:
    calls, invalid = _tool_calls(result.tool_calls or [])
    metadata = _metadata(result.expert, result.finish_reason, result.trace)
    info: dict[str, Any] = {"finish_reason": result.finish_reason}
    if result.logprobs is not None:  # where langchain-openai puts them
        metadata["logprobs"] = info["logprobs"] = result.logprobs
    # A refusal goes where langchain-openai puts it; reasoning where langchain-deepseek puts it.
    extra: dict[str, Any] = {"refusal": result.refusal} if result.refusal is not None else {}
    if result.reasoning_content is not None:
        extra["reasoning_content"] = result.reasoning_content
    message = AIMessage(content=result.content, tool_calls=calls, invalid_tool_calls=invalid, id=result.id or None,
                        additional_kwargs=extra, response_metadata=metadata, usage_metadata=_usage(result.usage))
    generation = ChatGeneration(message=message, generation_info=info)
    return ChatResult(generations=[generation],
                      llm_output={"model_name": result.expert, "token_usage": result.usage.model_dump()})


def _chunk(piece: sdk.StreamChunk) -> ChatGenerationChunk:
    # Tool-call deltas as LangChain's chunks: added together, they give the message its parsed tool_calls.
    calls = [tool_call_chunk(name=(d.get("function") or {}).get("name"), args=(d.get("function") or {}).get(
        "arguments"), id=d.get("id"), index=d.get("index")) for d in piece.tool_calls or []]
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
                             usage_metadata=_usage(piece.trace.usage), chunk_position="last")
    return ChatGenerationChunk(message=message, generation_info={**(info or {}), "finish_reason": piece.finish_reason})


def _whole_chunk(result: sdk.ChatResult) -> ChatGenerationChunk:
    """A whole (combined) answer as the one and last chunk of a stream: what ``_chunk`` gives for the pieces of a
    streamed one, added up (tool calls as chunks, so they parse as the streamed ones do)."""
    calls = [tool_call_chunk(name=(c.get("function") or {}).get("name"), args=(c.get("function") or {}).get(
        "arguments"), id=c.get("id"), index=c.get("index", i)) for i, c in enumerate(result.tool_calls or [])]
    extra: dict[str, Any] = {"refusal": result.refusal} if result.refusal is not None else {}
    if result.reasoning_content is not None:
        extra["reasoning_content"] = result.reasoning_content
    info: dict[str, Any] = {"finish_reason": result.finish_reason}
    if result.logprobs is not None:
        info["logprobs"] = result.logprobs
    message = AIMessageChunk(content=result.content, tool_call_chunks=calls, id=result.id or None,
                             additional_kwargs=extra,
                             response_metadata=_metadata(result.expert, result.finish_reason, result.trace),
                             usage_metadata=_usage(result.usage), chunk_position="last")
    return ChatGenerationChunk(message=message, generation_info=info)


def _tool_calls(raw: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """OpenAI tool calls as LangChain's; one whose arguments are not a JSON object is kept as invalid."""
    calls, invalid = [], []
    for item in raw:
        function = item.get("function") or {}
        name, arguments, call_id = function.get("name"), function.get("arguments") or "{}", item.get("id")
        try:
            args = json.loads(arguments)
        except ValueError:
            args = None
        if isinstance(name, str) and isinstance(args, dict):
            calls.append(tool_call(name=name, args=args, id=call_id))
        else:
            invalid.append(invalid_tool_call(name=name, args=arguments, id=call_id, error="arguments are not JSON"))
    return calls, invalid
