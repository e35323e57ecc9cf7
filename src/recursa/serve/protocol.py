"""The OpenAI API's request and response bodies, as pydantic models.

These models validate what clients send (a bad field is a 400 with OpenAI's error body, never a
5xx) and, through FastAPI, write the server's OpenAPI spec (`GET /openapi.json`), which the
tests fuzz with schemathesis. Fields follow OpenAI's names; vLLM's extras that recursa supports
are `top_k`, `stop_token_ids` and `ignore_eos`; recursa's own response extra is `exit_depths`
(per output token, the depth, in stage passes, its prediction came from).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from recursa.engine.sampling_params import SamplingParams
from recursa.errors import RecursaError

# below this a temperature is treated as greedy: dividing logits by it would overflow to inf/NaN
GREEDY_BELOW = 1e-5
# top_p is raised to this: a smaller one rounds to 0 in float32 and would drop every token (NaN);
# the nucleus is the top token alone either way (any vocabulary under 1e6 tokens)
TOP_P_MIN = 1e-6
SEED_RANGE = dict(ge=-(2**63), le=2**64 - 1)   # what torch.Generator.manual_seed accepts


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingRequest(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str | None = Field(None, description="the served model name (GET /v1/models); omitted = that model")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, description=f"0 (or below {GREEDY_BELOW}) = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1 = off")
    seed: int | None = Field(None, **SEED_RANGE)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(1, description="only 1 is supported")
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = Field(None, description="not supported")

    def unsupported(self) -> str | None:
        """Why this request cannot be served as asked (a 400), or None."""
        if self.n != 1:
            return f"n={self.n}: only n=1 is supported (send several requests)"
        if self.logprobs not in (None, False, 0):
            return "logprobs are not supported"
        return None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's SamplingParams; max_tokens is the default when the request gives none."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(temperature=self.temperature if self.temperature >= GREEDY_BELOW else 0.0,
                              top_k=self.top_k, top_p=max(self.top_p, TOP_P_MIN), seed=self.seed,
                              max_tokens=self.max_tokens or max_tokens, stop=stop,
                              stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="text, token ids, or a list of either (one choice per prompt)")
    echo: bool = Field(False, description="not supported")
    best_of: int | None = Field(None, description="only 1 is supported")
    suffix: str | None = Field(None, description="not supported")

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of > 1 is not supported"
        if self.suffix:
            return "suffix is not supported"
        return super().unsupported()

    def prompts(self) -> list:
        """A list of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise RecursaError("the prompt is empty")
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    add_generation_prompt: bool = True
    tools: list[dict] | None = Field(None, description="not supported")

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools are not supported"
        return super().unsupported()


# ---- responses (documented in the OpenAPI spec; the handlers build the same shapes as dicts) ----

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None
    exit_depths: list[int] = Field(description="recursa: per output token, the depth its prediction came from")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None
    exit_depths: list[int]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
