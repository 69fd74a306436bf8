"""OpenAI request and response models (chat, completions, streamed chunks, usage, models, errors).

Requests are validated in pydantic's *strict* mode: ``"n": "2"``, ``"max_tokens": 1.5`` or
``"temperature": "hot"`` are 400s, not silently coerced. Ranges (``temperature >= 0``, ``0 < top_p <= 1``,
...) are checked once, by :class:`SamplingParams`, which names the offending field. Unknown fields are
kept in ``model_extra`` so that the server can log them as ignored instead of rejecting them.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deltaserve.errors import InvalidRequestError
from deltaserve.sampling import SamplingParams
from deltaserve.server.errors import unsupported

MAX_N = 128  # choices per request: each is an engine request, so bound what one request can enqueue


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


# -- requests -----------------------------------------------------------------------------------------
class StreamOptions(_Request):
    include_usage: bool | None = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class MediaPart(_Request):
    """Image / audio / video / file parts: valid OpenAI, but deltaserve serves text-only models (501)."""

    type: Literal["image_url", "input_image", "input_audio", "video_url", "file"]


ContentPart = Annotated[TextPart | MediaPart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # An assistant turn may carry only tool calls; every other role must say something.
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role!r} message needs a 'content' (a string or a list of text parts)")
        return self

    def to_template(self) -> dict[str, Any]:
        """The dict the chat template sees: text parts joined by newlines (as vLLM does)."""
        if isinstance(self.content, list):
            media = [p.type for p in self.content if isinstance(p, MediaPart)]
            if media:
                raise unsupported(f"content part type {media[0]!r} is not supported: this server runs a "
                                  f"text-only model; send text parts", "messages")
            text = "\n".join(p.text for p in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return {**(self.model_extra or {}), "role": role, "content": text}


class SamplingRequest(_Request):
    """Fields shared by chat and completions; extras (top_k, min_p, ...) as sent through ``extra_body``."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = 0
    ignore_eos: bool | None = False
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    response_format: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise unsupported(f"{name} is not supported; use repetition_penalty", name)
        if self.logit_bias:
            raise unsupported("logit_bias is not supported", "logit_bias")
        # A client asking for JSON relies on getting it: free text in its place would be a silent failure.
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise unsupported(f"response_format type {kind!r} is not supported: deltaserve has no constrained "
                              "(JSON) decoding; leave response_format out or send {\"type\": \"text\"}",
                              "response_format")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Validated SamplingParams of the whole request; raises InvalidRequestError naming the field."""
        self.check_supported()
        n = 1 if self.n is None else self.n
        if isinstance(n, int) and n > MAX_N:
            raise InvalidRequestError(f"n={n} must be <= {MAX_N}", "n")
        return SamplingParams(
            n=n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed, stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
            max_tokens=max_tokens, min_tokens=self.min_tokens or 0, ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens is not False,
            include_stop_str_in_output=bool(self.include_stop_str_in_output))


def per_choice(params: SamplingParams, index: int) -> SamplingParams:
    """The params of choice ``index`` of an n>1 request: seed + index (as vLLM), so choices differ."""
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None  # the legacy form of tools and tool_choice
    function_call: str | dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        # No tool-call parser: a client offering tools expects tool_calls back, never free text about them.
        # tool_choice "none" says the tools may be ignored, and they are (they do not reach the template).
        if self.tools and self.tool_choice != "none":
            raise unsupported("tool calling is not supported: deltaserve does not parse tool calls; leave tools "
                              "out, or send tool_choice \"none\" to have them ignored", "tools")
        if self.functions and self.function_call != "none":
            raise unsupported("function calling is not supported: deltaserve does not parse function calls; "
                              "leave functions out, or send function_call \"none\" to have them ignored",
                              "functions")

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", "top_logprobs")
        k = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        try:
            return self.sampling_params(max_tokens, k)
        except InvalidRequestError as e:
            if e.param == "logprobs":  # the chat API calls the count top_logprobs
                raise InvalidRequestError(str(e).replace("logprobs", "top_logprobs", 1), "top_logprobs") from e
            if e.param == "max_tokens" and self.max_completion_tokens is not None:
                raise InvalidRequestError(str(e).replace("max_tokens", "max_completion_tokens", 1),
                                          "max_completion_tokens") from e
            raise


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def to_sampling_params(self) -> SamplingParams:
        if self.echo:
            raise unsupported("echo is not supported (deltaserve does not compute prompt logprobs)", "echo")
        if self.suffix:
            raise unsupported("suffix (fill-in-the-middle) is not supported", "suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise unsupported("best_of other than n is not supported", "best_of")
        return self.sampling_params(self.max_tokens, self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise InvalidRequestError("prompt is empty: send a string, a list of strings or token ids", "prompt")
        return list(p)


# -- responses ----------------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltaserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": "assistant", "content": ""} first, then {"content": ...}, {} at the end
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None  # serialised only with stream_options.include_usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None  # always set on non-streamed responses and on the usage chunk
