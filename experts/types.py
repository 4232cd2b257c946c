"""Request and reply shapes shared by experts and the router.

They follow the OpenAI chat-completions wire format closely, so a request that arrives at the service can be
handed to an expert without translation and unknown OpenAI fields (``tools``, ``seed``, ...) pass through.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = ["CHARS_PER_TOKEN", "DETAILS", "MAX_TOKENS_LIMIT", "ROLES", "ChatMessage", "ChatRequest", "ExpertReply",
           "StreamDelta", "Usage", "estimate_tokens", "reasoning_of", "usage_details"]

# Where no tokenizer counted, tokens are estimated from characters: a common rule of thumb for English text with
# BPE tokenizers.
CHARS_PER_TOKEN = 4
# The largest token limit a request may name: what OpenAI-compatible servers (vLLM included) hold in an int32.
MAX_TOKENS_LIMIT = 2**31 - 1
IMAGE_PARTS = frozenset({"image_url", "input_image"})
# Content parts an upstream reads as media tokens, not text: images, audio (``input_audio``) and files (``file``,
# the Responses API's ``input_file``), their base64 data no measure of the prompt's length.
MEDIA_PARTS = IMAGE_PARTS | {"input_audio", "file", "input_file"}
# The roles a message may have: OpenAI's, ``function`` (its deprecated one) included.
ROLES = ("system", "user", "assistant", "tool", "developer", "function")
# With no tools left to call, these tool_choice values mean "answer in text", which a request without tools does
# anyway; OpenAI (and vLLM) refuse tool_choice on a request without tools, so they are left out of its body.
TOOLLESS_CHOICES = ("none", "auto")


class ChatMessage(BaseModel):
    # extra="allow": tool_calls, tool_call_id, name ... travel untouched to the expert.
    model_config = ConfigDict(extra="allow")

    role: str = Field(json_schema_extra={"enum": list(ROLES)})
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        # The roles in words, rather than pydantic's "should match pattern" and a regular expression.
        if value not in ROLES:
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise ValueError(f"{shown!r} is not one of {', '.join(ROLES)}")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        # One message naming the field, instead of pydantic's error per branch of the union.
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(part, dict) for part in value):
            for i, part in enumerate(value):
                if not isinstance(part.get("type"), str):
                    raise ValueError(f"content part {i} needs a 'type' (for example 'text' or 'image_url')")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {i} is of type 'text' but its 'text' is not a string")
            return value
        raise ValueError(f"content must be a string, a list of content parts (objects) or null, not "
                         f"{type(value).__name__}")

    @model_validator(mode="after")
    def _content_needed(self) -> ChatMessage:
        if self.content is None and self.role in ("system", "user", "developer"):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not isinstance((self.model_extra or {}).get("tool_call_id"), str):
            # As OpenAI refuses it: a tool result must say which call it answers. Caught here, before an
            # expert is called (and paid) to refuse it.
            raise ValueError("a tool message needs a tool_call_id (a string): the id of the tool call it answers")
        return self

    def has_image(self) -> bool:
        """Whether the message holds an image part (``image_url``, or the Responses API's ``input_image``)."""
        return isinstance(self.content, list) and any(p.get("type") in IMAGE_PARTS for p in self.content)

    def has_media(self) -> bool:
        """Whether the message holds an image, audio or file part (``MEDIA_PARTS``)."""
        return isinstance(self.content, list) and any(p.get("type") in MEDIA_PARTS for p in self.content)

    def text(self) -> str:
        """The message's text; multi-part content keeps only its text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


# What the encoders' normaliser drops or reads as a space: whitespace, control and format characters (zero-width
# spaces, a BOM, a soft hyphen, direction marks), private-use characters, and combining marks (accents, stripped).
# Not unassigned code points: the tokenizer reads each as [UNK], something to route on.
_WORDLESS = frozenset({"Cc", "Cf", "Co", "Mn", "Me", "Zs", "Zl", "Zp"})


def is_blank(text: str) -> bool:
    """Whether ``text`` holds nothing the gate could route on: only whitespace, control or format characters
    (``"\u200b\u200b"``, ``"\x00"``, ``"\ufeff"``), private-use characters or combining marks, all of which the
    encoder drops."""
    return all(c.isspace() or c == "\ufffd" or unicodedata.category(c) in _WORDLESS for c in text)


def _routed_index(messages: list[ChatMessage]) -> int:
    """Which message the gate routes on: the last user message, else the last message."""
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), len(messages) - 1)


class ChatRequest(BaseModel):
    """An OpenAI chat-completions request. ``model`` is the router's choice; experts replace it with theirs."""

    model_config = ConfigDict(extra="allow")

    model: str = "auto"
    messages: list[ChatMessage] = Field(min_length=1)
    # Strict: "5" or 5.0 for a token count, "0.5" for a temperature, "yes" for stream are refused, not coerced.
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, strict=True, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0, strict=True, allow_inf_nan=False)
    stream: bool = Field(default=False, strict=True)
    # The router returns one answer per request: its combiner chooses (or writes) it from the experts' answers.
    n: int | None = Field(default=None, strict=True)
    tools: list[dict[str, Any]] | None = None

    @field_validator("stream", mode="before")
    @classmethod
    def _stream_null(cls, value: Any) -> Any:
        return False if value is None else value  # OpenAI's stream is nullable, null meaning false

    @model_validator(mode="after")
    def _stream_options(self) -> ChatRequest:
        """``stream_options`` stays an extra, but one the router reads: an object whose ``include_usage`` is a
        boolean, as OpenAI checks it. A streamed upstream request gets the client's keys (vLLM's
        ``continuous_usage_stats``, say) with ``include_usage`` forced true (see ``upstream_payload``)."""
        options = (self.model_extra or {}).get("stream_options")
        if options is None:
            return self
        # ``where`` names the field at fault, as for messages: a whole-model validator's error has no place.
        if not isinstance(options, dict):
            raise PydanticCustomError("stream_options", "stream_options must be an object, got {got}",
                                      {"got": type(options).__name__, "where": ("stream_options",)})
        if "include_usage" in options and not isinstance(options["include_usage"], bool):
            raise PydanticCustomError("stream_options", "stream_options.include_usage must be a boolean, got {got}",
                                      {"got": json.dumps(options["include_usage"]),
                                       "where": ("stream_options", "include_usage")})
        return self

    @field_validator("messages")
    @classmethod
    def _something_to_route(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        # The gate routes on one message's text: an empty one would route on nothing and reach an expert anyway.
        i = _routed_index(messages)
        if is_blank(messages[i].text()) and not messages[i].has_media():
            which = "the last user message" if messages[i].role == "user" else "the last message"
            # ``where`` names the field at fault (messages[i].content), which the error's own place, the
            # messages list, does not.
            raise PydanticCustomError("unroutable", "{which} (messages[{index}]), which the gate routes on, holds no "
                                      "text: its content is empty, or only whitespace, control or zero-width "
                                      "characters",
                                      {"which": which, "index": i, "where": ("messages", i, "content")})
        return messages

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"n={value} is not supported: the router returns one choice per request (the "
                             "combiner picks or writes it from the experts' answers); send n=1 or leave it out")
        return value

    def query_text(self) -> str:
        """The text the gate routes on: the last user message (the last message when no user speaks)."""
        return self.messages[_routed_index(self.messages)].text()

    def history(self) -> list[ChatMessage]:
        """The messages before the one the gate routes on (``query_text``'s): the conversation it continues, its
        system and developer instructions included."""
        return self.messages[:_routed_index(self.messages)]

    def after_question(self) -> list[ChatMessage]:
        """The messages after the one the gate routes on: in an agent's loop, the tool calls made for it (assistant
        messages) and their results (tool messages)."""
        return self.messages[_routed_index(self.messages) + 1:]

    def text_chars(self) -> int:
        """The characters of the prompt as an upstream reads it, what its length is judged and estimated by: the
        messages' text, what else they carry (as JSON: tool calls with their arguments, a name, content parts that
        are neither text nor media), and the tools offered (their definitions, as JSON). A request of plain
        messages counts its text alone. Images, audio and files (``MEDIA_PARTS``) are not counted: an upstream
        reads them as media tokens, and their base64 data would count tens of thousands of characters."""
        chars = sum(len(m.text()) for m in self.messages)
        for m in self.messages:
            if m.model_extra:  # tool calls, a name, and any field a message carries to the expert
                chars += len(json.dumps(m.model_extra, ensure_ascii=False, default=str))
            if isinstance(m.content, list):  # parts neither text nor media (an "input_text", say) go too
                chars += sum(len(json.dumps(p, ensure_ascii=False, default=str)) for p in m.content
                             if p.get("type") != "text" and p.get("type") not in MEDIA_PARTS)
        if self.tools:
            chars += len(json.dumps(self.tools, ensure_ascii=False, default=str))
        return chars

    def estimated_prompt_tokens(self) -> int:
        """The prompt in tokens, estimated where no expert counted it: ``CHARS_PER_TOKEN`` characters a token."""
        return self.text_chars() // CHARS_PER_TOKEN

    def upstream_payload(self, model: str, *, stream: bool) -> dict[str, Any]:
        """The JSON body for an OpenAI-compatible upstream serving ``model``.

        An empty ``tools`` list means no tools, and goes as none: OpenAI refuses ``"tools": []``. Without tools,
        ``tool_choice`` "none" or "auto" and ``parallel_tool_calls`` say nothing and are left out too (OpenAI
        refuses both on a request without tools); a ``tool_choice`` that demands a call is sent as it is, for
        the upstream to refuse (``router.requests.parse_chat`` refuses it before that)."""
        body = self.model_dump(exclude_none=True)
        body["model"] = model
        body["stream"] = stream
        if not body.get("tools"):
            body.pop("tools", None)
            body.pop("parallel_tool_calls", None)
            if body.get("tool_choice") in TOOLLESS_CHOICES:
                del body["tool_choice"]
        # A strict server refuses stream_options on a request that does not stream.
        options = body.pop("stream_options", None)
        if stream:
            # The client's options, with include_usage forced on: the router counts tokens and cost from it.
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return body


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # The upstream's breakdowns, as OpenAI and vLLM send them (``cached_tokens``; ``reasoning_tokens``): counts
    # by name, summed over attempts like the totals; None (and left out of the JSON) when no upstream sent any.
    prompt_tokens_details: dict[str, int] | None = None
    completion_tokens_details: dict[str, int] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_details(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        return {k: v for k, v in body.items() if v is not None or k not in DETAILS}

    @classmethod
    def counted(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """A usage with its total filled in (an estimate's, or a recording's)."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            prompt_tokens_details=_summed(self.prompt_tokens_details, other.prompt_tokens_details),
            completion_tokens_details=_summed(self.completion_tokens_details, other.completion_tokens_details),
        )


DETAILS = ("prompt_tokens_details", "completion_tokens_details")


def _summed(a: dict[str, int] | None, b: dict[str, int] | None) -> dict[str, int] | None:
    if a is None or b is None:
        return a if b is None else dict(b)
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


def usage_details(raw: Any) -> dict[str, int] | None:
    """An upstream's ``*_tokens_details`` object as counts by name: what is not a whole count (null, a nested
    object, a negative number) is left out, never a reason to refuse the answer; None when nothing is left."""
    if not isinstance(raw, dict):
        return None
    kept = {str(k): v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
    return kept or None


@dataclass
class ExpertReply:
    """One expert's complete answer."""

    expert: str
    content: str
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    finish_reason: str = "stop"
    tool_calls: list[dict[str, Any]] | None = None
    model: str = ""
    # Passed through as the upstream sent them: the choice's token log-probabilities (when the request asked
    # for ``logprobs``) and the message's ``refusal``.
    logprobs: dict[str, Any] | None = None
    refusal: str | None = None
    # The model's reasoning before its answer (vLLM's reasoning parsers: ``message.reasoning_content``, or
    # ``reasoning`` in newer versions); None when the upstream sent none.
    reasoning_content: str | None = None
    # True when the upstream sent no usage and ``usage`` (and ``cost_usd``, unless the upstream priced the call)
    # is our estimate: the prompt at about 4 characters a token, the answer likewise.
    usage_estimated: bool = False
    # Set by an expert that is itself a router: the inner routing trace (its ``summary()``), nested in ours.
    nested: dict[str, Any] | None = None
    # The upstream's fields the router has no use for, as sent, by where they were ("response", "choice",
    # "message"): ``system_fingerprint``, vLLM's ``prompt_logprobs``, a choice's ``stop_reason`` or ``token_ids``,
    # a message's ``annotations``. The service passes on those of the reply whose text it returns.
    extra: dict[str, dict[str, Any]] | None = None


@dataclass
class StreamDelta:
    """One streamed piece of an expert's answer. The last one carries ``finish_reason`` and, if known, usage."""

    content: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    tool_calls: list[dict[str, Any]] | None = None
    # As the upstream's chunk had them: the piece's token log-probabilities, and a refusal's text.
    logprobs: dict[str, Any] | None = None
    refusal: str = ""
    # A piece of the model's reasoning (``delta.reasoning_content``, or ``delta.reasoning``), before its answer.
    reasoning_content: str = ""
    # Set with usage when the expert knows the call's USD cost itself (recorded, or sent as ``usage.cost``).
    cost_usd: float | None = None
    # Set with usage when it is our estimate: a stream that finished without a usage chunk, counted as a token per
    # delta and the prompt at about 4 characters a token (``ExpertReply.usage_estimated``).
    usage_estimated: bool = False
    # An inner router's trace, on the last delta (see ``ExpertReply.nested``).
    nested: dict[str, Any] | None = None

    def has_output(self) -> bool:
        """Whether the delta carries anything for the client: text, tool calls, a refusal, reasoning, or the
        log-probabilities of a token that completed no text (vLLM sends those with an empty ``content``); the last
        delta has only usage, a finish reason or a trace."""
        return bool(self.content or self.tool_calls or self.refusal or self.reasoning_content or self.logprobs)


def reasoning_of(message: Mapping[str, Any]) -> str | None:
    """A message's (or a stream delta's) reasoning, as OpenAI-compatible servers send it: vLLM's
    ``reasoning_content``, or ``reasoning`` as newer vLLM (and OpenRouter) name it. Anything but a string is left
    out: reasoning is extra, not worth failing an answer over."""
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str):
            return value
    return None


def estimate_tokens(chars: int) -> int:
    """Tokens in ``chars`` characters of text, by ``CHARS_PER_TOKEN``, rounded up."""
    return math.ceil(chars / CHARS_PER_TOKEN)
