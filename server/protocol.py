"""OpenAI-compatible request models, plus the `thor` extension, with validation.

Owns: the accepted request shapes of `/v1/chat/completions` and `/v1/completions`
(OpenAI's fields and vLLM's extensions such as `top_k`, `include_stop_str_in_output`,
`stop_reason`), the `thor` options object, and turning them into the engine's
`ThorConfig` / `SamplingOptions`. Unknown fields are ignored as OpenAI's SDKs send
many; wrong types or values are 400s naming the field.

Does not own: response rendering (responses.py) or routing (app.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from thor_engine.config import ObservationConfig, SamplingOptions, SelfCorrectionConfig, ThorConfig


class ThorSelfCorrection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None
    mode: Literal["tokens", "step"] | None = None
    backtrack_tokens: int | None = Field(default=None, ge=0, le=100_000)
    max_retries: int | None = Field(default=None, ge=0, le=32)
    retries_consume_budget: bool | None = None


class ThorObservation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profile: Literal["notebook", "reference"] | None = None
    max_chars: int | None = Field(default=None, ge=16, le=100_000)
    keep_head: int | None = Field(default=None, ge=0, le=100_000)
    keep_tail: int | None = Field(default=None, ge=0, le=100_000)
    timeout_s: float | None = Field(default=None, gt=0, le=300)


class ThorOptions(BaseModel):
    """The `thor` extra-body field. Anything left out takes the server's default."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(default=True, description="false: plain chat, no tools, no TIR instructions.")
    max_tool_calls: int | None = Field(default=None, ge=0, le=100)
    on_tool_budget: Literal["continue", "stop"] | None = None
    stop_on_tool_error: bool | None = None
    self_correction: ThorSelfCorrection | bool | None = None
    observation: ThorObservation | None = None
    thinking_budget: int | None = Field(default=None, ge=1)
    vote: bool = False
    tir_instructions: bool = Field(default=True, description="Add THOR's tool-use system prompt when none is given.")

    def to_config(self, base: ThorConfig) -> ThorConfig:
        update: dict[str, Any] = {}
        for name in ("max_tool_calls", "on_tool_budget", "stop_on_tool_error", "thinking_budget"):
            value = getattr(self, name)
            if value is not None:
                update[name] = value
        if not self.enabled:
            update["max_tool_calls"] = 0
            update["on_tool_budget"] = "continue"
        sc = self.self_correction
        if isinstance(sc, bool):
            update["self_correction"] = base.self_correction.model_copy(update={"enabled": sc})
        elif sc is not None:
            update["self_correction"] = SelfCorrectionConfig(
                **{**base.self_correction.model_dump(), **sc.model_dump(exclude_none=True)}
            )
        if self.observation is not None:
            update["observation"] = ObservationConfig(
                **{**base.observation.model_dump(), **self.observation.model_dump(exclude_none=True)}
            )
        return base.model_copy(update=update)


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    thor: ThorOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self, max_tokens: int | None) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k in (None, 0) else self.top_k,
            seed=self.seed,
            stop=self.stop_list(),
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported; send text parts only")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs are not supported on /v1/chat/completions by this server; use /v1/completions")
        if self.tools:
            raise ValueError("function tools are not supported: THOR runs Python code blocks itself (see `thor`)")
        for i, m in enumerate(self.messages):
            try:
                m.text()
            except ValueError as exc:
                raise ValueError(f"messages[{i}].content: {exc}") from None
        return self

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    include_stop_str_in_output: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
        return self

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]
