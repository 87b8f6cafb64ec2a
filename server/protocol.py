"""What the generation surfaces' requests share: the `thor` options object and the sampling fields.

Owns: `ThorOptions` (the `thor` extension object: THOR on or off, tool budget, self-correction,
observation, repetition guard) and its conversion into the engine's `ThorConfig`;
`SamplingRequest`, the base of chat, completions and Responses requests (OpenAI's sampling
fields and vLLM's extensions: `top_k`, `min_p`, penalties, `min_tokens`, `logit_bias`,
`stop_token_ids`, `ignore_eos`, `skip_special_tokens`, `include_stop_str_in_output`), turned into
the engine's `SamplingOptions` (request values, then the checkpoint's generation_config.json
defaults, then vLLM's neutral ones); `StreamOptions`; and the field checks every surface's
wire types use (`none_is_default`: `null` means a field's default, as OpenAI's spec allows;
`checked_unicode`: text that cannot be tokenised; `reject_unless`). Wrong types or values are
400s naming the field.

Does not own: a surface's own wire types (chat/protocol.py, completions/protocol.py,
responses/protocol.py, tokenization.py) or response rendering (the surfaces' builders).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from thor_engine.config import ObservationConfig, RepetitionConfig, SamplingOptions, SelfCorrectionConfig, ThorConfig


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


class ThorRepetition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_repeats: int | None = Field(default=None, ge=2, le=1000)
    # a token costs up to O(max_period) in a degenerate stream: bounded for clients
    max_period: int | None = Field(default=None, ge=1, le=1000)
    min_span_tokens: int | None = Field(default=None, ge=1, le=100_000)


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
    repetition: ThorRepetition | bool | None = Field(
        default=None,
        description="End a looping trajectory early (thor finish_reason `repetition`, OpenAI's `length`): true = "
        "the defaults (or the server's), an object sets min_repeats / max_period / min_span_tokens, false = off. "
        "Default: the server's setting (THOR_REPETITION_GUARD, off).",
    )
    vote: bool = False
    trace: bool = Field(
        default=True, description="false: store no trace of this request (GET /v1/traces/{id} answers 404)."
    )
    tir_instructions: Literal["append", "if_no_system", "off"] | bool | None = Field(
        default=None,
        description="Where THOR's tool-use instructions go when tools are on: `append` them to the client's "
        "system message (or add one), `if_no_system` (only when the client sent none), `off`. true = the "
        "server default, false = off. Default: the server's setting (append).",
    )

    def tir_mode(self, default: str) -> str:
        if self.tir_instructions is None or self.tir_instructions is True:
            return default
        return "off" if self.tir_instructions is False else self.tir_instructions

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
        rep = self.repetition
        if rep is False:
            update["repetition"] = None
        elif rep is True:
            update["repetition"] = base.repetition or RepetitionConfig()
        elif rep is not None:
            update["repetition"] = RepetitionConfig(
                **{**(base.repetition or RepetitionConfig()).model_dump(), **rep.model_dump(exclude_none=True)}
            )
        if self.observation is not None:
            try:  # the merged settings are checked together (e.g. keep_head + keep_tail within max_chars): a 400
                update["observation"] = ObservationConfig(
                    **{**base.observation.model_dump(), **self.observation.model_dump(exclude_none=True)}
                )
            except ValidationError as exc:
                raise RequestValidationError(
                    [{**e, "loc": ("body", "thor", "observation", *e["loc"])} for e in exc.errors()]
                ) from exc
        return base.model_copy(update=update)


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

#: vLLM's neutral values for the sampling fields a checkpoint's generation_config.json may set.
NEUTRAL_SAMPLING: dict[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def none_is_default(cls: type[BaseModel], v: Any, info: Any) -> Any:
    """OpenAI's spec marks many fields nullable: null means the field's default."""
    if v is None:
        return cls.model_fields[info.field_name].get_default(call_default_factory=True)
    return v


def checked_unicode(text: str, what: str) -> str:
    """Text must encode as UTF-8: a lone UTF-16 surrogate (JSON `"\\ud800"`) cannot be tokenised."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("unicode_escape").decode()
        raise ValueError(
            f"{what} contains an unpaired UTF-16 surrogate ({bad}) at character {exc.start}; send valid Unicode"
        ) from None
    return text


def reject_unless(value: Any, ok: bool, what: str) -> Any:
    if not ok:
        raise ValueError(what)
    return value


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    thor: ThorOptions | None = None

    _nulls = field_validator("n", "stream", "min_tokens", "ignore_eos", "skip_special_tokens", mode="before")(
        classmethod(none_is_default)
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        for s in stops:
            checked_unicode(s, "a stop sequence")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return v
        bad = [k for k in v if not k.strip().lstrip("-").isdigit()]
        if bad:
            raise ValueError(f"keys must be token ids (integers as strings), got {bad[:5]}")
        if not all(math.isfinite(b) for b in v.values()):
            raise ValueError("biases must be finite numbers (they are clamped to [-100, 100])")
        if len(v) > 1024:
            raise ValueError("at most 1024 token biases are allowed")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v and len(v) > 1024:
            raise ValueError("at most 1024 stop token ids are allowed")
        return v

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self, max_tokens: int | None, defaults: dict[str, Any] | None = None) -> SamplingOptions:
        """Priority as vLLM's server: the request, then the checkpoint's generation_config.json
        (`defaults`), then vLLM's neutral value."""
        defaults = defaults or {}

        def pick(name: str) -> Any:
            value = getattr(self, name)
            if value is None:
                value = defaults.get(name, NEUTRAL_SAMPLING[name])
            return value

        top_k = int(pick("top_k"))
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            top_k=-1 if top_k == 0 else top_k,
            min_p=pick("min_p"),
            presence_penalty=pick("presence_penalty"),
            frequency_penalty=pick("frequency_penalty"),
            repetition_penalty=pick("repetition_penalty"),
            seed=None if self.seed == -1 else self.seed,  # vLLM: -1 means unseeded
            stop=self.stop_list(),
            min_tokens=self.min_tokens,
            logit_bias=tuple((int(k), max(-100.0, min(100.0, float(b)))) for k, b in (self.logit_bias or {}).items()),
            stop_token_ids=tuple(dict.fromkeys(self.stop_token_ids or ())),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
        )
