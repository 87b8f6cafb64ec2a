"""OpenAI-compatible request models, plus the `thor` extension, with validation.

Owns: the accepted request shapes of `/v1/chat/completions` and `/v1/completions`
(OpenAI's fields and vLLM's sampling extensions: `top_k`, `min_p`, penalties,
`min_tokens`, `logit_bias`, `stop_token_ids`, `ignore_eos`, `skip_special_tokens`,
`include_stop_str_in_output`, `chat_template_kwargs`), the `thor` options object,
and turning them into the engine's `ThorConfig` / `SamplingOptions` (request values,
then the checkpoint's generation_config.json defaults, then vLLM's neutral ones).
Chat's plain-generation fields are shaped and checked here too: `logprobs` /
`top_logprobs` (0..20, needs logprobs), `response_format` (text, json_object,
json_schema, mapped onto vLLM's structured-output constraint), function `tools`,
`tool_choice` (none, auto, required, a named function among the tools) and
`parallel_tool_calls`, and conversation messages carrying `tool_calls` / `tool_call_id`
(rendered for the chat template as vLLM does: arguments as objects); which of them ask for
plain generation (`plain_features`: the route refuses them with THOR's tools on, but for
function tools with tool_choice auto or none, which run with THOR).
OpenAI fields this server cannot honour (legacy functions / function_call, audio,
best_of, suffix...) are 400s, never accepted and dropped; `null`
means a field's default, as OpenAI's spec allows. Fields with no effect on the
answer (user, store, metadata, service_tier) and unknown fields are ignored, as
OpenAI's SDKs send many. Wrong types or values are 400s naming the field.

Does not own: response rendering (responses.py) or routing (routes/).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


def _none_is_default(cls: type[BaseModel], v: Any, info: Any) -> Any:
    """OpenAI's spec marks many fields nullable: null means the field's default."""
    if v is None:
        return cls.model_fields[info.field_name].get_default(call_default_factory=True)
    return v


def _unicode(text: str, what: str) -> str:
    """Text must encode as UTF-8: a lone UTF-16 surrogate (JSON `"\\ud800"`) cannot be tokenised."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("unicode_escape").decode()
        raise ValueError(
            f"{what} contains an unpaired UTF-16 surrogate ({bad}) at character {exc.start}; send valid Unicode"
        ) from None
    return text


def _reject_unless(value: Any, ok: bool, what: str) -> Any:
    if not ok:
        raise ValueError(what)
    return value


class _SamplingRequest(BaseModel):
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
        classmethod(_none_is_default)
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
            _unicode(s, "a stop sequence")
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


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    """A client function the model may call (OpenAI `tools[]`)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`: call this function."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str


class MessageToolCall(BaseModel):
    """A call in an earlier assistant message of the conversation."""

    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction

    def for_template(self) -> dict[str, Any]:
        """As chat templates want it (and vLLM passes it): arguments as an object, not JSON text."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`response_format`: free text, any JSON object, or JSON that follows a schema."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a `json_schema` object: {"name": ..., "schema": {...}}')
        return self

    def structured_outputs(self) -> dict[str, Any] | None:
        """vLLM's structured-output constraint for this format (None: free text), as vLLM's own
        server maps it: json_object onto `json_object`, json_schema onto `json` (a missing
        schema: any JSON object)."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            assert self.json_schema is not None
            schema = self.json_schema.json_schema
            return {"json": schema} if schema is not None else {"json_object": True}
        return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template gets it (developer is system, as vLLM renders it)."""
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            msg["tool_calls"] = [c.for_template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            msg["name"] = self.name
        return msg

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return _unicode(self.content, "the content")
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported; send text parts only")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string `text`")
            parts.append(_unicode(part["text"], "the content"))
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: Any) -> int | None:
        return _reject_unless(
            v, not v or bool(info.data.get("logprobs")), "top_logprobs needs logprobs: send `logprobs: true` too"
        )

    @field_validator("tools")
    @classmethod
    def _some_tools(cls, v: list[ChatTool] | None) -> list[ChatTool] | None:
        if v is not None and not v:
            raise ValueError("tools must not be an empty array: send at least one function, or omit tools")
        names = [t.function.name for t in v or ()]
        dup = sorted({n for n in names if names.count(n) > 1})
        return _reject_unless(v, not dup, f"function names must be unique; repeated: {dup}")

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, v: Any, info: Any) -> Any:
        tools: list[ChatTool] | None = info.data.get("tools")
        if v in (None, "none"):
            return v
        if not tools:
            raise ValueError(f"tool_choice {v if isinstance(v, str) else 'naming a function'} needs `tools`")
        if isinstance(v, NamedToolChoice) and v.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names function {v.function.name!r}, which is not in `tools`")
        return v

    # What this server cannot do is refused, never accepted and dropped.
    @field_validator("functions", "function_call")
    @classmethod
    def _no_legacy_functions(cls, v: Any, info: Any) -> Any:
        return _reject_unless(
            v,
            v is None,
            f"the legacy `{info.field_name}` is not supported; send `tools` "
            '([{"type": "function", "function": {...}}]) and `tool_choice` instead',
        )

    @field_validator("audio", "prediction", "web_search_options")
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        return _reject_unless(v, v is None, f"{info.field_name} is not supported by this server; omit it")

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, v: list[str] | None) -> list[str] | None:
        return _reject_unless(
            v, not v or set(v) <= {"text"}, 'this server answers in text only; omit modalities or send ["text"]'
        )

    @field_validator("messages")
    @classmethod
    def _texts(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        for i, m in enumerate(v):
            try:
                m.text()
            except ValueError as exc:
                raise ValueError(f"messages[{i}].content: {exc}") from None
        return v

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_kwargs(self) -> dict[str, Any]:
        """`chat_template_kwargs`, plus `reasoning_effort` as vLLM passes it (and thinking on unless
        it is `none`, when the client did not say)."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
        return kwargs

    def chat_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def effective_tool_choice(self) -> str | NamedToolChoice:
        """vLLM's default: `auto` when tools are given, `none` without."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def function_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template and the call schemas take them."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def plain_features(self) -> list[str]:
        """The fields asking for what only plain generation (THOR off) can give: token logprobs
        (a THOR answer follows tool outputs the model did not write), a constrained output format,
        client function calls (THOR's tool is its own Python sandbox)."""
        used = []
        if self.logprobs:
            used.append("logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            used.append("response_format")
        if self.tools:
            used.append("tools")
        return used


class CompletionRequest(_SamplingRequest):
    """`/v1/completions`: one prompt or a batch (a list of texts or of token-id lists), served as
    vLLM does; `echo` prepends each prompt (and, with `logprobs`, its tokens' logprobs). The checks
    that need the server's settings or several fields together (batch size, `thor` with a batch
    or `echo`, `max_tokens: 0` without `echo`) are the route's."""

    prompt: str | list[int] | list[str] | list[list[int]]
    # 0 only with `echo` (vLLM: the prompt and its logprobs, nothing generated)
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    include_stop_str_in_output: bool = False
    # vLLM's: each choice also carries `token_ids` (and `prompt_token_ids`); plain completions only
    return_token_ids: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    _more_nulls = field_validator("echo", "include_stop_str_in_output", mode="before")(classmethod(_none_is_default))

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        return _reject_unless(v, not v, "suffix is not supported by this server")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        return _reject_unless(
            v,
            v in (None, 1),
            "best_of is not supported (vLLM's engine dropped it); sample with n and pick on the client",
        )

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_kind_of_batch(cls, v: Any) -> Any:
        if isinstance(v, list) and len({type(p) for p in v if isinstance(p, str | list)}) > 1:
            raise ValueError("a batch of prompts mixes texts and token-id lists: send all texts or all token-id lists")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_texts(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty: send a text, a list of token ids, or a list of either")
        for text in [v] if isinstance(v, str) else [p for p in v if isinstance(p, str)]:
            _unicode(text, "the prompt")
        return v

    @property
    def batched(self) -> bool:
        """Whether `prompt` is a list of prompts (texts or token-id lists), even a list of one."""
        p = self.prompt
        return isinstance(p, list) and bool(p) and isinstance(p[0], (str, list))

    def prompts(self) -> list[str | list[int]]:
        """The prompts in order: one for a text or a token-id list, each of a batch otherwise."""
        return list(self.prompt) if self.batched else [self.prompt]  # type: ignore[list-item]


# --- vLLM's tokenizer utilities: POST /tokenize, POST /detokenize -------------------------------


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: `prompt` (raw text) or `messages` (rendered by the chat template as
    given, without THOR's instructions), never both."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    # vLLM's defaults: special tokens for raw text, none on top of the template for messages
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either `prompt` (text) or `messages` (a conversation), not both or neither")
        if self.continue_final_message and self.add_generation_prompt and self.messages is not None:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if self.prompt is not None and (self.continue_final_message or self.chat_template_kwargs):
            raise ValueError("continue_final_message and chat_template_kwargs apply to `messages` only")
        return self

    def chat_messages(self) -> list[dict[str, Any]] | None:
        if self.messages is None:
            return None
        return [m.for_template() for m in self.messages]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(min_length=1)
