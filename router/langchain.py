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
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any, Literal, Self, TypeVar, cast

import httpx
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableGenerator, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
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
from router.langchain_clients import Clients, aopened, opened, retry_wait
from router.langchain_messages import (
    ano_refusal,
    answer_as,
    chat_result,
    no_refusal,
    openai_tool_choice,
    schema_response_format,
    stream_chunk,
    whole_chunk,
    wire_messages,
)

__all__ = ["ChatMoERouter"]

# What a model pickled before the clients had a module of their own names (``Clients.__reduce__``).
_Clients = Clients

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
    _clients: Clients = PrivateAttr(default_factory=lambda: Clients())

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
        copied._clients = Clients()
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
        choice = openai_tool_choice(tool_choice, [t["function"]["name"] for t in converted])
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
            bound: dict[str, Any] = {"response_format": schema_response_format(schema, strict, pydantic),
                                     "ls_structured_output_format": {**traced,
                                                                     "schema": convert_to_openai_tool(schema)},
                                     **kwargs}
            if tools:
                bound["tools"] = [convert_to_openai_tool(t, strict=strict) for t in tools]
            llm = self.bind(**bound)
            parser = (RunnableLambda(partial(answer_as, PydanticOutputParser(pydantic_object=model_class)))
                      if model_class else JsonOutputParser())
        else:
            raise ValueError(f"method {method!r} is none of json_schema, function_calling, json_mode")
        # Checked chunk by chunk, so a streamed structured answer still streams.
        checked = RunnableGenerator(no_refusal, ano_refusal) | parser
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
        return chat_result(self._retrying(lambda: client.chat(wire_messages(messages), model=call.model,
                                                               combiner=call.combiner, **call.params)),
                            call.parse_into)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        call = self._request(stop, kwargs)
        client = await self._async_client()
        return chat_result(await self._aretrying(lambda: client.chat(wire_messages(messages), model=call.model,
                                                                      combiner=call.combiner, **call.params)),
                            call.parse_into)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        call = self._request(stop, kwargs)
        model, params = call.model, call.params
        client = self._client()
        if not _streams(call.combiner):  # a combined answer: one call, one chunk (see the module docstring)
            whole = whole_chunk(self._retrying(lambda: client.chat(wire_messages(messages), model=model,
                                                                    combiner=call.combiner, **params)), call.usage)
            if run_manager and whole.message.content:
                run_manager.on_llm_new_token(whole.text, chunk=whole)
            yield whole
            return
        # A stream is retried until its first chunk comes, never after.
        pieces = self._retrying(lambda: opened(client.stream(wire_messages(messages), model=model, **params)))
        with contextlib.closing(pieces):
            for piece in pieces:
                chunk = stream_chunk(piece, call.usage)
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
            whole = whole_chunk(await self._aretrying(lambda: client.chat(wire_messages(messages), model=model,
                                                                           combiner=call.combiner, **params)),
                                 call.usage)
            if run_manager and whole.message.content:
                await run_manager.on_llm_new_token(whole.text, chunk=whole)
            yield whole
            return
        pieces = await self._aretrying(lambda: aopened(client.stream(wire_messages(messages), model=model, **params)))
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                chunk = stream_chunk(piece, call.usage)
                if run_manager and piece.content:
                    await run_manager.on_llm_new_token(piece.content, chunk=chunk)
                yield chunk

    # -- shared ---------------------------------------------------------------------------------------------
    def _combine_llm_outputs(self, llm_outputs: list[dict[str, Any] | None]) -> dict[str, Any]:
        """``generate``'s ``llm_output`` over its calls, as ``ChatOpenAI``'s: the token usage added up, and the
        model: the expert, when one answered every call, else this model's."""
        outputs = [o for o in llm_outputs if o]
        usage = sum((Usage.model_validate(o.get("token_usage") or {}) for o in outputs), Usage())  # its __add__
        names = {o.get("model_name") for o in outputs}
        return {"token_usage": usage.model_dump(), "model_name": names.pop() if len(names) == 1 else self.model}

    def _request(self, stop: list[str] | None, kwargs: dict[str, Any]) -> _Call:
        """The call's model, combiner and request parameters: the call's keywords over the model's own.

        ``stream_usage`` is this model's, never a request field. A pydantic class as ``response_format`` (as
        ``ChatOpenAI`` takes it) is sent as its JSON schema, and a whole answer is parsed into it
        (``additional_kwargs["parsed"]``)."""
        params = dict(kwargs)
        model = params.pop("model", None) or self.model
        combiner = params.pop("combiner") if "combiner" in params else self.combiner
        params = self._params(stop, params)  # the call's keywords over model_kwargs
        usage = params.pop("stream_usage", self.stream_usage)
        parse_into = params.get("response_format")
        if isinstance(parse_into, type) and is_basemodel_subclass(parse_into):
            params["response_format"] = schema_response_format(parse_into, None, pydantic=True)
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
                wait = retry_wait(error, retry, self.max_retries or 0)
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
                wait = retry_wait(error, retry, self.max_retries or 0)
                if wait is None:
                    raise
            await asyncio.sleep(wait)


def _streams(combiner: str | None) -> bool:
    """Whether a call with ``combiner`` may stream: only with none (the service streams with one expert whatever
    its configured combiner) or ``top1``, as the service reads the name (case and surrounding space aside)."""
    return combiner is None or combiner.strip().lower() == "top1"


