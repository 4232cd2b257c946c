"""A LangChain chat model for a running router service: ``ChatMoERouter``.

It speaks to the service through ``router.sdk`` (so the wire format is written once), works in LCEL chains,
streams, and returns what plain ``ChatOpenAI`` cannot: the routing trace, in
``response_metadata["moe_trace"]``, and the expert that answered, in ``response_metadata["model_name"]``.
When streaming, both arrive on the last chunk. The network is injected for tests (``transport``,
``async_transport``), as everywhere in the SDK.

It takes its arguments as ``ChatOpenAI`` does: ``model_name`` is another name for ``model`` (``openai_api_key`` for
``api_key``, ``openai_api_base`` for ``base_url``, ``request_timeout`` for ``timeout``); ``default_headers``,
``max_retries`` and ``streaming`` mean what they mean there (see ``max_retries`` for which failures are retried);
any argument it does not declare (``seed``, ``frequency_penalty``, a typo) goes into ``model_kwargs``, with a
warning, and is sent with every request; ``with_structured_output`` takes ``method`` (``json_schema`` by default,
``function_calling``, ``json_mode``), ``include_raw``, ``strict`` and ``tools`` as ``ChatOpenAI`` does;
``bind(...)`` and call keywords override the model's own, ``model`` and ``combiner`` included (``deadline_s`` and
``budget_usd`` among them are the SDK's per-request limits, not request fields). A combiner
other than ``top1`` cannot combine a stream (one expert serves a stream), so with one, streaming calls (``stream``,
``astream``, ``astream_events``, LangGraph's messages mode) make one combined call and yield its answer as one chunk.

Each model keeps its HTTP connections between calls: one client for its blocking calls, and one per event loop for
its async calls (an httpx.AsyncClient belongs to the loop it first ran on). A copy or a pickle of the model opens
its own. ``close()`` and ``aclose()`` close them now (a later call opens new ones); otherwise an async client
closes when its loop shuts down (``asyncio.run``'s end), and a model collected closes its connections.

    from router.langchain import ChatMoERouter
    model = ChatMoERouter(base_url="http://127.0.0.1:8000", api_key="...")
    chain = prompt | model | StrOutputParser()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any, Literal, Self, TypeVar, cast

import httpx
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
from langchain_core.messages.ai import InputTokenDetails, OutputTokenDetails, UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableGenerator, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_function, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

from experts.types import Usage
from router import sdk, sdk_protocol
from router.trace import Trace

try:  # langchain-core 1.7.5+: what an integration raises for a refusal, whichever the provider
    from langchain_core.exceptions import ModelRefusalError
except ImportError:  # older: a parsing failure, as with_structured_output's include_raw reports one
    from langchain_core.exceptions import OutputParserException as ModelRefusalError  # type: ignore[assignment]

__all__ = ["ChatMoERouter"]

_T = TypeVar("_T")

# Other names ``ChatOpenAI`` takes for the same arguments. ``openai_api_key`` above all: left undeclared, the key
# would be sent in every request's body, which the service forwards to every expert.
# The limits an ``httpx.Timeout`` holds, by the names ``as_dict`` gives them.
_TIMEOUT_PARTS = frozenset({"connect", "read", "write", "pool"})
_ALIASES = {"model_name": "model", "request_timeout": "timeout", "openai_api_key": "api_key",
            "openai_api_base": "base_url"}


@dataclass(frozen=True)
class _Call:
    """One call's request, as ``ChatMoERouter._request`` reads it from the model and the call's keywords."""

    model: str
    combiner: str | None
    params: dict[str, Any]
    usage: bool  # whether a stream's last chunk carries the usage (``stream_usage``)
    parse_into: type[BaseModel] | None  # a ``response_format`` class a whole answer is parsed into


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
    # As the SDK's clients take it: seconds, an ``httpx.Timeout``, or None for none (``ChatOpenAI``'s
    # ``timeout=None``); a (connect, read) tuple, as ``ChatOpenAI`` takes it, is read as an ``httpx.Timeout``.
    timeout: sdk.Timeout = 120.0
    # Headers sent with every request (``ChatOpenAI``'s ``default_headers``): a gateway's, a tracing id.
    default_headers: dict[str, str] | None = None
    # Retries of a call the service could not be reached for (connection refused, connect timeout) or answered 429,
    # 502, 503 or 504, waiting its Retry-After (up to 60 s), else 0.5 s doubling up to 8 s. Never a call the
    # service was working on when it failed (a timeout waiting for the answer, a connection broken mid-answer, a
    # stream that had begun), nor a 500: the service already retries and falls back across experts, and a retry
    # here runs them all again. None or 0: none (``ChatOpenAI`` retries twice by default).
    max_retries: int | None = Field(default=None, ge=0)
    # As ``ChatOpenAI``'s: True makes ``invoke`` stream (LangChain reads it).
    streaming: bool = False
    # As ``ChatOpenAI``'s: whether a stream's last chunk carries the answer's usage (``usage_metadata``); never sent.
    stream_usage: bool = True
    # Any other OpenAI request field (seed, response_format, ...), sent as given; an argument this model does not
    # declare lands here (see ``build_extra``).
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    transport: httpx.BaseTransport | None = Field(default=None, exclude=True)
    async_transport: httpx.AsyncBaseTransport | None = Field(default=None, exclude=True)
    _clients: _Clients = PrivateAttr(default_factory=lambda: _Clients())

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

    @field_validator("timeout", mode="before")
    @classmethod
    def timeout_tuple(cls, value: Any) -> Any:
        """``ChatOpenAI``'s ``request_timeout=(connect, read)``, as httpx reads such a tuple; and the mapping
        ``timeout_json`` writes an ``httpx.Timeout`` as, read back into one."""
        if isinstance(value, tuple):
            return httpx.Timeout(value)
        if isinstance(value, dict) and set(value) == _TIMEOUT_PARTS:
            return httpx.Timeout(**value)
        return value

    @field_serializer("timeout", when_used="json")
    def timeout_json(self, value: sdk.Timeout) -> float | dict[str, float | None] | None:
        """An ``httpx.Timeout`` as JSON can hold it (its four limits by name), so ``model_dump(mode="json")`` (and
        LangChain's tracing, which dumps the model) works, and the dump builds the same model again."""
        return value.as_dict() if isinstance(value, httpx.Timeout) else value

    @model_validator(mode="after")
    def headers_sendable(self) -> Self:
        """A key or header no request could carry (a control character left inside it), refused now rather than
        on every call; the error never shows it."""
        sdk_protocol.client_headers(self._key(), self.default_headers)
        return self

    def __copy__(self) -> Self:
        """A copy (``model_copy``) opens its own connections: it may be given another ``base_url`` or key, and
        closing one must not close the other's."""
        copied = super().__copy__()
        copied._clients = _Clients()
        return copied

    def close(self) -> None:
        """Close the blocking calls' connections now; a later call opens new ones."""
        self._clients.close()

    async def aclose(self) -> None:
        """Close this event loop's async connections, and the blocking calls' ones; a later call opens new ones."""
        self._clients.close()
        await self._clients.aclose()

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
        langchain-core's own ``with_structured_output`` asks for) as ``"required"``, a tool's name (or ``True``
        with one tool) as that named function; ``"auto"``, ``"none"``, ``"required"`` and a dict as given.
        ``strict``, as ``ChatOpenAI`` takes it, goes on each tool's function (``"strict": true``), never at the
        request's top level."""
        converted = [convert_to_openai_tool(t, strict=strict) for t in tools]
        bound: dict[str, Any] = {"tools": converted, **kwargs}
        choice = _tool_choice(tool_choice, [t["function"]["name"] for t in converted])
        if choice is not None:
            bound["tool_choice"] = choice
        return self.bind(**bound)

    def with_structured_output(self, schema: dict[str, Any] | type | None = None, *,
                               method: Literal["function_calling", "json_mode", "json_schema"] = "json_schema",
                               include_raw: bool = False, strict: bool | None = None, tools: list[Any] | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """The answer as ``schema`` (a pydantic class: an instance of it; else a dict), as ``ChatOpenAI`` asks for
        it (langchain-openai 1.x): ``method="json_schema"`` (the default) sends the schema as ``response_format``
        (a pydantic class strict, as the OpenAI SDK sends it; ``strict`` overrides), ``"json_mode"`` asks for a
        JSON object (``{"type": "json_object"}``; ``schema`` may be None), ``"function_calling"`` forces a call of
        a tool named after the schema. A refusal (or a ``content_filter`` finish) raises ``ModelRefusalError``.
        ``include_raw=True`` gives ``{"raw", "parsed", "parsing_error"}`` rather than raising a parsing error.
        ``tools`` (json_schema only) are bound too: an answer that calls one parses as None. Other keywords are
        bound as ``bind(...)`` takes them.

        A request with ``response_format`` reaches every expert, as any request field does (an expert that
        cannot honour it answers as it can, and the parsing fails); one with tools, only experts declaring the
        ``tools`` capability."""
        if strict is not None and method == "json_mode":
            raise ValueError("strict= is not taken with method='json_mode' (a JSON object, no schema)")
        if tools and method != "json_schema":
            raise ValueError(f"tools= is taken with method='json_schema' only, not {method!r}")
        if schema is None and method != "json_mode":
            raise ValueError(f"method={method!r} needs a schema (only json_mode takes None)")
        # The pydantic class the answer is validated into; None: the answer is a dict.
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        model_class = cast("type[BaseModel]", schema) if pydantic else None
        traced = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        llm: Runnable[LanguageModelInput, BaseMessage]
        parser: Runnable[Any, Any]
        if method == "function_calling":
            assert schema is not None
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, strict=strict, parallel_tool_calls=False,
                                  ls_structured_output_format=traced, **kwargs)
            parser = (PydanticToolsParser(tools=[model_class], first_tool_only=True) if model_class
                      else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method == "json_mode":
            traced["kwargs"] = {"method": method}
            llm = self.bind(response_format={"type": "json_object"}, ls_structured_output_format=traced, **kwargs)
            parser = PydanticOutputParser(pydantic_object=model_class) if model_class else JsonOutputParser()
        elif method == "json_schema":
            assert schema is not None
            bound: dict[str, Any] = {"response_format": _response_format(schema, strict, pydantic),
                                     "ls_structured_output_format": {**traced,
                                                                     "schema": convert_to_openai_tool(schema)},
                                     **kwargs}
            if tools:
                bound["tools"] = [convert_to_openai_tool(t, strict=strict) for t in tools]
            llm = self.bind(**bound)
            parser = (RunnableLambda(partial(_answer_as, PydanticOutputParser(pydantic_object=model_class)))
                      if model_class else JsonOutputParser())
        else:
            raise ValueError(f"method {method!r} is none of json_schema, function_calling, json_mode")
        # Checked chunk by chunk, so a streamed structured answer still streams.
        checked = RunnableGenerator(_no_refusal, _ano_refusal) | parser
        if not include_raw:
            return llm | checked
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | checked, parsing_error=lambda _: None)
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")

    # -- the four entry points: thin shells over the SDK ----------------------------------------------------
    # Each takes the call's keywords (``bind(...)``, ``invoke(..., **kwargs)``) over the model's own, ``model`` and
    # ``combiner`` included; ``timeout`` among them is the call's HTTP timeout (the SDK's). Each reuses the model's
    # client (see the module docstring) and retries as ``max_retries`` says.
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        call = self._request(stop, kwargs)
        client = self._client()
        return _chat_result(self._retrying(lambda: client.chat(_wire(messages), model=call.model,
                                                               combiner=call.combiner, **call.params)),
                            call.parse_into)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        call = self._request(stop, kwargs)
        client = await self._async_client()
        return _chat_result(await self._aretrying(lambda: client.chat(_wire(messages), model=call.model,
                                                                      combiner=call.combiner, **call.params)),
                            call.parse_into)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        call = self._request(stop, kwargs)
        model, params = call.model, call.params
        client = self._client()
        if not _streams(call.combiner):  # a combined answer: one call, one chunk (see the module docstring)
            whole = _whole_chunk(self._retrying(lambda: client.chat(_wire(messages), model=model,
                                                                    combiner=call.combiner, **params)), call.usage)
            if run_manager and whole.message.content:
                run_manager.on_llm_new_token(whole.text, chunk=whole)
            yield whole
            return
        # A stream is retried until its first chunk comes, never after.
        pieces = self._retrying(lambda: _opened(client.stream(_wire(messages), model=model, **params)))
        with contextlib.closing(pieces):
            for piece in pieces:
                chunk = _chunk(piece, call.usage)
                if run_manager and piece.content:
                    run_manager.on_llm_new_token(piece.content, chunk=chunk)
                yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        call = self._request(stop, kwargs)
        model, params = call.model, call.params
        client = await self._async_client()
        if not _streams(call.combiner):
            whole = _whole_chunk(await self._aretrying(lambda: client.chat(_wire(messages), model=model,
                                                                           combiner=call.combiner, **params)),
                                 call.usage)
            if run_manager and whole.message.content:
                await run_manager.on_llm_new_token(whole.text, chunk=whole)
            yield whole
            return
        pieces = await self._aretrying(lambda: _aopened(client.stream(_wire(messages), model=model, **params)))
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                chunk = _chunk(piece, call.usage)
                if run_manager and piece.content:
                    await run_manager.on_llm_new_token(piece.content, chunk=chunk)
                yield chunk

    # -- shared ---------------------------------------------------------------------------------------------
    def _combine_llm_outputs(self, llm_outputs: list[dict[str, Any] | None]) -> dict[str, Any]:
        """``generate``'s ``llm_output`` over its calls, as ``ChatOpenAI``'s: the token usage added up, and the
        model: the expert, when one answered every call, else this model's."""
        outputs = [o for o in llm_outputs if o]
        usage: dict[str, Any] = {}
        for output in outputs:
            usage = _added(usage, output.get("token_usage") or {})
        names = {o.get("model_name") for o in outputs}
        return {"token_usage": usage, "model_name": names.pop() if len(names) == 1 else self.model}

    def _request(self, stop: list[str] | None, kwargs: dict[str, Any]) -> _Call:
        """The call's model, combiner and request parameters: the call's keywords over the model's own.

        ``stream_usage`` is this model's, never a request field. A pydantic class as ``response_format`` (as
        ``ChatOpenAI`` takes it) is sent as its JSON schema, and a whole answer is parsed into it
        (``additional_kwargs["parsed"]``)."""
        params = dict(kwargs)
        model = params.pop("model", None) or self.model
        combiner = params.pop("combiner") if "combiner" in params else self.combiner
        usage = params.pop("stream_usage", None)
        params = self._params(stop, params)
        usage = params.pop("stream_usage", self.stream_usage) if usage is None else usage  # from model_kwargs
        parse_into = params.get("response_format")
        if isinstance(parse_into, type) and is_basemodel_subclass(parse_into):
            params["response_format"] = _response_format(parse_into, None, pydantic=True)
        else:
            parse_into = None
        return _Call(model, combiner, params, bool(usage), parse_into)

    def _params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        params = {"temperature": self.temperature, "max_tokens": self.max_tokens, "top_p": self.top_p,
                  "stop": stop or self.stop, **self.model_kwargs, **kwargs}
        # ``stream`` is LangChain's own switch (``invoke(..., stream=True)`` takes the streaming path), already
        # acted on: the SDK's chat and stream say whether they stream, and refuse it as a request field.
        return {k: v for k, v in params.items() if v is not None and k != "stream"}

    def _key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None

    def _settings(self) -> tuple[Any, ...]:
        """What a client is built from: a client built from other settings (the model's fields changed since) is
        not reused."""
        return self.base_url, self._key(), self.timeout, self.default_headers, self.transport, self.async_transport

    def _client(self) -> sdk.Client:
        return self._clients.client(self._settings(), lambda: sdk.Client(
            self.base_url, api_key=self._key(), timeout=self.timeout, transport=self.transport,
            headers=self.default_headers))

    async def _async_client(self) -> sdk.AsyncClient:
        return await self._clients.aclient(self._settings(), lambda: sdk.AsyncClient(
            self.base_url, api_key=self._key(), timeout=self.timeout, transport=self.async_transport,
            headers=self.default_headers))

    def _retrying(self, call: Callable[[], _T]) -> _T:
        """``call()``, retried as ``max_retries`` says."""
        retry = 0
        while True:
            try:
                return call()
            except sdk.RouterAPIError as error:
                retry += 1
                wait = _retry_wait(error, retry, self.max_retries or 0)
                if wait is None:
                    raise
            time.sleep(wait)

    async def _aretrying(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """``await call()``, retried as ``max_retries`` says."""
        retry = 0
        while True:
            try:
                return await call()
            except sdk.RouterAPIError as error:
                retry += 1
                wait = _retry_wait(error, retry, self.max_retries or 0)
                if wait is None:
                    raise
            await asyncio.sleep(wait)


class _Clients:
    """The SDK clients one ``ChatMoERouter`` reuses: one for its blocking calls (an httpx.Client serves any number
    of threads), one per event loop for its async calls (an httpx.AsyncClient's connections belong to the loop
    that opened them), each built on first use from the model's settings then. An async one is built off the loop:
    building one loads the CA bundle (tens of milliseconds), which would stall every task on the loop.

    No part of the model's value: a deep copy or a pickle of the model gets an empty one (the model's own
    ``__copy__`` sees to ``model_copy``), and any two compare equal, so the model's ``==`` compares its fields."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sync: tuple[tuple[Any, ...], sdk.Client] | None = None
        # Per event loop, per settings the model had: the task building the client (its result, the client and the
        # generator that keeps it, see ``_kept``). One built from settings since changed is kept for the calls
        # still using it, and closes with its loop.
        self._async: dict[asyncio.AbstractEventLoop, list[tuple[tuple[Any, ...], asyncio.Task[_Kept]]]] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return _Clients, ()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Clients:
        return _Clients()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Clients)

    def client(self, settings: tuple[Any, ...], build: Callable[[], sdk.Client]) -> sdk.Client:
        with self._lock:
            if self._sync is None or self._sync[0] != settings:
                # One built from older settings is left to the calls still using it, and closes when collected.
                self._sync = settings, build()
            return self._sync[1]

    async def aclient(self, settings: tuple[Any, ...], build: Callable[[], sdk.AsyncClient]) -> sdk.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            for gone in [other for other in self._async if other.is_closed()]:
                del self._async[gone]  # closed with its loop (see ``_kept``)
            held = self._async.setdefault(loop, [])
            building = next((task for made, task in held if made == settings), None)
            if building is None:
                building = loop.create_task(_built(build))
                held.append((settings, building))
        try:
            # Shielded: a caller cancelled while it is built leaves it to the others waiting for it.
            client, _ = await asyncio.shield(building)
        except Exception:
            with self._lock:  # the next call tries afresh
                if (settings, building) in held:
                    held.remove((settings, building))
            raise
        return client

    def close(self) -> None:
        with self._lock:
            held, self._sync = self._sync, None
        if held is not None:
            held[1].close()

    async def aclose(self) -> None:
        with self._lock:
            held = self._async.pop(asyncio.get_running_loop(), [])
        for _, building in held:
            with contextlib.suppress(Exception):  # one that was never built has nothing to close
                _, keeper = await asyncio.shield(building)
                await keeper.aclose()


_Kept = tuple[sdk.AsyncClient, AsyncGenerator[None]]


async def _built(build: Callable[[], sdk.AsyncClient]) -> _Kept:
    """A client built off the loop, and the generator that closes it (``_kept``), started on the loop."""
    client = await asyncio.get_running_loop().run_in_executor(None, build)
    keeper = _kept(client)
    await anext(keeper)
    return client, keeper


async def _kept(client: sdk.AsyncClient) -> AsyncGenerator[None]:
    """Waits, parked at its yield, to close ``client`` on its event loop (where alone it can be closed): the loop
    closes it, and so the client, when it shuts down (``asyncio.run``'s end), or once it is collected (its model
    was), by the loop's finalizer for async generators (PEP 525)."""
    try:
        yield
    finally:
        await client.aclose()


# The failures ``max_retries`` retries (see ChatMoERouter.max_retries): the service unreachable, the request never
# sent, and the answers that say "later": too many requests, a gateway's 502 or 504, every expert failed (503).
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
_RETRIED_STATUSES = frozenset({429, 502, 503, 504})


def _retry_wait(error: sdk.RouterAPIError, retry: int, max_retries: int) -> float | None:
    """Seconds to wait before retry number ``retry`` of a call that failed with ``error``; None: not retried."""
    if retry > max_retries:
        return None
    if isinstance(error, sdk.RouterConnectionError):
        # The SDK chains httpx's failure: only one before the request was sent is retried.
        if not isinstance(error.__cause__, _NEVER_SENT):
            return None
    elif error.status not in _RETRIED_STATUSES:
        return None
    asked = error.retry_after_s
    if asked is not None and asked <= 60:
        return asked
    # As the OpenAI SDK backs off: 0.5 s doubling, up to 8 s, less up to a quarter so that clients spread out.
    return min(0.5 * 2 ** (retry - 1), 8.0) * (1 - 0.25 * random.random())


def _opened(stream: Iterator[_T]) -> Generator[_T]:
    """``stream`` with its first item fetched now, so that a failure to open it raises here (where it is retried)
    rather than part way through the caller's loop."""
    return _prefixed(next(stream, _END), stream)


def _prefixed(first: Any, stream: Iterator[_T]) -> Generator[_T]:
    try:
        if first is not _END:
            yield first
            yield from stream
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


async def _aopened(stream: AsyncIterator[_T]) -> AsyncGenerator[_T]:
    """``_opened`` for an async stream."""
    return _aprefixed(await anext(stream, _END), stream)


async def _aprefixed(first: Any, stream: AsyncIterator[_T]) -> AsyncGenerator[_T]:
    try:
        if first is not _END:
            yield first
            async for item in stream:
                yield item
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


_END = object()


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


def _added(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Token counts added up, key by key, their breakdowns (nested counts) too."""
    out = dict(total)
    for key, value in more.items():
        if isinstance(value, dict):
            out[key] = _added(out.get(key) or {}, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = (out.get(key) or 0) + value
        elif key not in out:
            out[key] = value
    return out


def _chat_result(result: sdk.ChatResult, parse_into: type[BaseModel] | None = None) -> ChatResult:
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


def _chunk(piece: sdk.StreamChunk, usage: bool = True) -> ChatGenerationChunk:
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


def _whole_chunk(result: sdk.ChatResult, usage: bool = True) -> ChatGenerationChunk:
    """A whole (combined) answer as the one and last chunk of a stream: what ``_chunk`` gives for the pieces of a
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


def _response_format(schema: dict[str, Any] | type, strict: bool | None, pydantic: bool) -> dict[str, Any]:
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


def _answer_as(parser: PydanticOutputParser[Any], message: BaseMessage) -> BaseModel | None:
    """A ``json_schema`` answer as the pydantic class; None when the model called a tool (``tools=``) instead, as
    ``ChatOpenAI`` gives it."""
    if isinstance(message, AIMessage) and message.tool_calls:
        return None
    parsed: BaseModel = parser.invoke(message)
    return parsed


def _refusing(message: BaseMessage) -> bool:
    """Whether ``message`` (or a chunk of one) is a refusal (where ``_chat_result`` and ``_chunk`` put it) or
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


def _no_refusal(messages: Iterator[BaseMessage]) -> Iterator[BaseMessage]:
    refusal = _Refusal()
    for message in messages:
        if refusal.passes(message):
            yield message
    refusal.end()


async def _ano_refusal(messages: AsyncIterator[BaseMessage]) -> AsyncIterator[BaseMessage]:
    refusal = _Refusal()
    async for message in messages:
        if refusal.passes(message):
            yield message
    refusal.end()
