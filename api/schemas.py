"""OpenAI request and response shapes (pydantic v2) for /v1/chat/completions, /v1/completions and /v1/models.

Requests validate strictly: a string where a number belongs, a float where an integer belongs, NaN or an
out-of-range value is a 400, never a silent coercion. Unknown fields are ignored, as OpenAI-compatible servers do,
so clients that send newer fields keep working. Fields past OpenAI's own (top_k, min_p, repetition_penalty,
ignore_eos, skip_special_tokens, min_tokens, stop_token_ids) follow vLLM / LMDeploy spelling; with the `openai`
client send them through `extra_body`.

Responses are built from the models below so their JSON has exactly OpenAI's shape (null fields included).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

MAX_N = 128  # OpenAI's own limit on choices per request
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit; the engine's too
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # any 64-bit seed, signed or not


def _check_unicode(value: Any) -> None:
    """JSON may carry lone UTF-16 surrogates ("\\ud800"): valid Python str, but no tokenizer nor UTF-8 encoder takes
    them, so they are refused here, in any string of the request."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode (a lone surrogate escape was found)") from None
    elif isinstance(value, list | tuple):
        for item in value:
            _check_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)


class _StrictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value):
        _check_unicode(value)
        return value


# ---- requests ---------------------------------------------------------------------------------------------
NonEmptyStr = Annotated[str, Field(min_length=1)]
StopStrings = Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_STRINGS)]
TokenId = Annotated[int, Field(ge=0)]


class TextPart(_StrictRequest):
    type: Literal["text"]
    text: str


class ImageURL(_StrictRequest):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_StrictRequest):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_StrictRequest):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_StrictRequest):
    include_usage: bool | None = False


class SamplingRequest(_StrictRequest):
    """Fields shared by chat and text completions."""

    model: str | None = None  # None: the served model (OpenAI requires it; curl users welcome)
    max_tokens: int | None = Field(None, ge=1)  # None: up to session_len
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: 1.0, as OpenAI; 0: greedy
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # 0 or -1: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: NonEmptyStr | StopStrings | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    min_tokens: int | None = Field(None, ge=0)
    user: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Accepted so clients that always send them work; anything but "off" is refused with a clear 400.
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


PromptTokens = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)] | PromptTokens | Annotated[
        list[PromptTokens], Field(min_length=1)
    ]
    max_tokens: int | None = Field(None, ge=0)  # 0: with echo, score the prompt only (nothing generated)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


# ---- responses --------------------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _only_set(self) -> dict:  # a delta carries just what changed: {"role": ...}, {"content": ...} or {}
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "quant-studio"
    root: str | None = None  # the folder the weights came from
    max_model_len: int | None = None  # session_len, as vLLM reports it


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
