"""The wire types of `POST /v1/chat/completions`: OpenAI's chat request, with validation.

Owns: `ChatCompletionRequest` (OpenAI's fields plus the shared sampling fields and the `thor`
object of protocol.py, and vLLM's `chat_template_kwargs`), the conversation messages
(`ChatMessage`, carrying `tool_calls` / `tool_call_id`, rendered for the chat template as vLLM
does: arguments as objects), and the plain-generation fields: `logprobs` / `top_logprobs`
(0..20, needs logprobs), `response_format` (text, json_object, json_schema, mapped onto vLLM's
structured-output constraint), function `tools`, `tool_choice` (none, auto, required, a named
function among the tools) and `parallel_tool_calls`; which of them ask for plain generation
(`plain_features`: the route refuses them with THOR's tools on, but for function tools with
tool_choice auto or none, which run with THOR).
OpenAI fields this server cannot honour (legacy functions / function_call, audio, ...) are
400s, never accepted and dropped. Fields with no effect on the answer (user, store, metadata,
service_tier) and unknown fields are ignored, as OpenAI's SDKs send many.

Does not own: the route (chat/serving.py) or building responses (thor/builder.py, chat/plain.py).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.protocol import SamplingRequest, checked_unicode, reject_unless


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
            return checked_unicode(self.content, "the content")
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported; send text parts only")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string `text`")
            parts.append(checked_unicode(part["text"], "the content"))
        return "".join(parts)


class ChatCompletionRequest(SamplingRequest):
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
        return reject_unless(
            v, not v or bool(info.data.get("logprobs")), "top_logprobs needs logprobs: send `logprobs: true` too"
        )

    @field_validator("tools")
    @classmethod
    def _some_tools(cls, v: list[ChatTool] | None) -> list[ChatTool] | None:
        if v is not None and not v:
            raise ValueError("tools must not be an empty array: send at least one function, or omit tools")
        names = [t.function.name for t in v or ()]
        dup = sorted({n for n in names if names.count(n) > 1})
        return reject_unless(v, not dup, f"function names must be unique; repeated: {dup}")

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
        return reject_unless(
            v,
            v is None,
            f"the legacy `{info.field_name}` is not supported; send `tools` "
            '([{"type": "function", "function": {...}}]) and `tool_choice` instead',
        )

    @field_validator("audio", "prediction", "web_search_options")
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        return reject_unless(v, v is None, f"{info.field_name} is not supported by this server; omit it")

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, v: list[str] | None) -> list[str] | None:
        return reject_unless(
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
