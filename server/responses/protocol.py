"""The request of `POST /v1/responses` (OpenAI's Responses API) and its input as a conversation.

Owns: `CreateResponseRequest` (OpenAI's fields, vLLM's sampling extensions and the `thor`
options, as chat accepts them; what cannot work is a 400 naming the field, never accepted
and dropped; `metadata` within OpenAI's bounds; the input items as stored, rebuilt from the
fields this server reads, with unique ids), which THOR settings a request asks for (`code_interpreter` in `tools` turns
the THOR loop on, `tool_choice: "none"` or no tool turns it off, `max_tool_calls` is the
tool budget, `reasoning.effort` the thinking budget of a reasoning model), and
`items_to_messages`: input items (strings, messages, and the output items of an earlier
response: reasoning, `code_interpreter_call`, message) as the chat messages the chat
template renders. A code interpreter call comes back as the fenced code and the output
block the model read, so a continued conversation shows the model its own trajectory, and
thinking items (`THINKING`) go back inside <think>...</think>.

Does not own: rendering the response (responses/builder.py), storing responses (the store,
through streaming.py) or routing (responses/serving.py).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.protocol import SamplingRequest, ThorOptions, checked_unicode, none_is_default
from thor_engine.config import SamplingOptions
from thor_engine.final_answer import FinalAnswer, json_answer
from thor_engine.observation import injection

#: what a code interpreter call's `container_id` says (the calls run in this server's sandbox)
CONTAINER_ID = "thor-sandbox"

#: `reasoning.effort` as the thinking budget (tokens inside <think>) of a reasoning model;
#: `none` turns thinking off. A `thor.thinking_budget` in the request wins.
EFFORT_BUDGET: dict[str, int | None] = {
    "minimal": 512,
    "low": 2048,
    "medium": 8192,
    "high": 32768,
    "xhigh": None,
    "max": None,
}

_FORWARD_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

#: the `encrypted_content` of a reasoning item whose text the model wrote inside <think>: rendered
#: back inside <think>...</think>, so a reasoning model's chat template strips earlier thinking
#: as it does for chat's history
THINKING = "thor:thinking"
#: OpenAI's bounds on `metadata` (the `Metadata` schema): 16 pairs, keys <= 64, values <= 512 characters
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512


class ReasoningParam(BaseModel):
    model_config = ConfigDict(extra="ignore")
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None

    @field_validator("summary", "generate_summary")
    @classmethod
    def _no_summary(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError(
                "reasoning summaries are not produced by this server: the reasoning item carries the model's "
                "full reasoning text instead; omit reasoning.summary"
            )
        return v


class CreateResponseRequest(SamplingRequest):
    """`POST /v1/responses`. `n` is not a Responses field: one output per response."""

    model: str | None = None  # type: ignore[assignment]  # optional here: the served model
    input: str | list[dict[str, Any]] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=0)
    reasoning: ReasoningParam | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None

    _resp_nulls = field_validator("store", mode="before")(classmethod(none_is_default))

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > METADATA_MAX_PAIRS:
            raise ValueError(f"metadata has {len(v)} pairs; at most {METADATA_MAX_PAIRS} are allowed")
        for key, value in v.items():
            checked_unicode(key, "metadata")
            checked_unicode(value, "metadata")
            if len(key) > METADATA_MAX_KEY:
                raise ValueError(f"metadata key {key[:20]!r}... is {len(key)} characters; at most {METADATA_MAX_KEY}")
            if len(value) > METADATA_MAX_VALUE:
                raise ValueError(
                    f"metadata[{key!r}] is {len(value)} characters; values are at most {METADATA_MAX_VALUE}"
                )
        return v

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("the Responses API returns one output; use /v1/chat/completions for n samples")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, tool in enumerate(v or []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "code_interpreter":
                raise ValueError(
                    f"tools[{i}]: type {kind!r} is not supported on /v1/responses; this server runs one tool, "
                    '`{"type": "code_interpreter"}` (Python in its sandbox)'
                )
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if v is None or v in ("auto", "none"):
            return v
        if isinstance(v, dict) and v.get("type") == "code_interpreter":
            return v
        raise ValueError(
            'tool_choice must be "auto", "none" or {"type": "code_interpreter"}: the model decides when to run '
            "code (a call cannot be forced)"
        )

    @field_validator("text")
    @classmethod
    def _text(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        fmt = (v or {}).get("format") or {"type": "text"}
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError('text.format.type must be "text", "json_object" or "json_schema"')
        if fmt["type"] == "json_schema" and not isinstance(fmt.get("schema"), dict):
            raise ValueError('text.format of type "json_schema" needs `schema` (a JSON schema object) and `name`')
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("logprobs are not returned by /v1/responses; use /v1/completions")
        return v

    @field_validator("background")
    @classmethod
    def _no_background(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("background responses are not supported; stream the response instead (stream: true)")
        return v

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, v: str | None) -> str | None:
        if v == "auto":
            raise ValueError(
                'truncation "auto" is not supported: this server never drops input; a conversation longer than '
                "the context is a 400"
            )
        return v

    @field_validator("conversation", "prompt")
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        if v is not None:
            what = "previous_response_id or input items" if info.field_name == "conversation" else "input"
            raise ValueError(f"{info.field_name} is not supported by this server; use {what}")
        return v

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(v, str):
            checked_unicode(v, "input")
        else:
            items_to_messages(v)  # every item must be one this server can render
        return v

    # --- what the request asks for ---------------------------------------------------------

    def final_answer(self) -> FinalAnswer | None:
        """`text.format` as the constrained answer after the loop (or the whole output, tools off)."""
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if fmt["type"] == "json_object":
            return json_answer(None)
        if fmt["type"] == "json_schema":
            return json_answer(fmt["schema"], name=fmt.get("name"))
        return None

    def code_interpreter(self) -> bool:
        """Does the request turn the THOR loop on?"""
        on = any(t.get("type") == "code_interpreter" for t in self.tools or []) and self.tool_choice != "none"
        return on and (self.thor is None or self.thor.enabled)

    def thor_options(self, reasoning_model: bool) -> ThorOptions:
        """The `thor` options with the Responses fields folded in (max_tool_calls, reasoning.effort)."""
        opts = self.thor.model_copy() if self.thor is not None else ThorOptions()
        if not self.code_interpreter():
            opts.enabled = False
        if self.max_tool_calls is not None and opts.max_tool_calls is None:
            opts.max_tool_calls = self.max_tool_calls
        effort = self.reasoning.effort if self.reasoning else None
        if reasoning_model and effort not in (None, "none") and opts.thinking_budget is None:
            opts.thinking_budget = EFFORT_BUDGET[effort]
        return opts

    def template_kwargs(self) -> dict[str, Any]:
        """`chat_template_kwargs`, plus `reasoning.effort` as chat's `reasoning_effort` passes it."""
        kwargs = dict(self.chat_template_kwargs or {})
        effort = self.reasoning.effort if self.reasoning else None
        if effort is not None:
            kwargs.setdefault("reasoning_effort", effort)
            kwargs.setdefault("enable_thinking", effort != "none")
        return kwargs

    def response_fields(self, sampling: SamplingOptions, *, tools_on: bool, store: bool) -> dict[str, Any]:
        """What the response object echoes of this request (the sampling as applied)."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": self.max_tool_calls,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}] if tools_on else [],
            "tool_choice": self.tool_choice or "auto",
            "parallel_tool_calls": False,  # one call at a time: each call's output is read before the next
            "previous_response_id": self.previous_response_id,
            "reasoning": {"effort": self.reasoning.effort if self.reasoning else None, "summary": None},
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "store": store,
            "metadata": self.metadata or {},
            **({"user": self.user} if self.user is not None else {}),
        }

    def input_items(self) -> list[dict[str, Any]]:
        """This request's input as the items `GET /v1/responses/{id}/input_items` lists, rebuilt from
        the fields this server reads (nothing else a client sent is stored): messages with typed
        text parts, reasoning items with their text, code interpreter calls with their code and
        logs. Every item has an id, unique in the list (the list's cursor): an item without one, or
        repeating an earlier item's, gets a fresh one."""
        raw: list[Any] = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        items: list[dict[str, Any]] = []
        seen: set[str] = set()
        for item in raw:
            kind = item.get("type", "message")
            if kind == "reasoning":
                text = _content_text(item.get("content"), "input")
                new: dict[str, Any] = {
                    "type": "reasoning",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": text}],
                    **({"encrypted_content": THINKING} if item.get("encrypted_content") == THINKING else {}),
                    "status": "completed",
                }
                prefix = "rs"
            elif kind == "code_interpreter_call":
                logs = _call_logs(item)
                status = item.get("status")
                new = {
                    "type": "code_interpreter_call",
                    "status": status if status in ("completed", "incomplete", "failed") else "completed",
                    "container_id": CONTAINER_ID,
                    "code": item["code"],
                    "outputs": None if logs is None else [{"type": "logs", "logs": logs}],
                }
                prefix = "ci"
            else:
                role = item["role"]
                part: dict[str, Any] = {
                    "type": "output_text" if role == "assistant" else "input_text",
                    "text": _content_text(item.get("content"), "input"),
                }
                if role == "assistant":
                    part |= {"annotations": [], "logprobs": []}
                new = {"type": "message", "role": role, "content": [part], "status": "completed"}
                prefix = "msg"
            item_id = item.get("id")
            if not isinstance(item_id, str) or not item_id or len(item_id) > 128 or item_id in seen:
                item_id = f"{prefix}_{uuid.uuid4().hex}"
            seen.add(item_id)
            items.append({"id": item_id, **new})
        return items

    def input_messages(self) -> list[dict[str, str]]:
        """This request's input (without instructions or an earlier response) as chat messages."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return items_to_messages(self.input)


# --- input items -> chat messages --------------------------------------------------------------


def _part_text(part: Any, where: str) -> str:
    if isinstance(part, str):
        return part
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text", "reasoning_text", "summary_text") and isinstance(
        part.get("text"), str
    ):
        return checked_unicode(part["text"], where)
    raise ValueError(f"{where}: content part type {kind!r} is not supported; send text parts (input_text) only")


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return checked_unicode(content, where)
    if isinstance(content, list):
        return "".join(_part_text(p, where) for p in content)
    raise ValueError(f"{where}: content must be a string or a list of text parts")


def code_round_text(code: str, logs: str | None) -> str:
    """A code interpreter call as the model wrote and read it: the fenced code, then its output block."""
    fence = f"```python\n{code}{'' if code.endswith(chr(10)) else chr(10)}```\n"
    return fence + (injection(logs, True) if logs is not None else "")


def _call_logs(item: dict[str, Any]) -> str | None:
    """The output a code interpreter call's model read (its `logs` outputs); None when it never ran."""
    outputs = item.get("outputs") or []
    if not outputs:
        return None
    return "".join(o.get("logs", "") for o in outputs if isinstance(o, dict) and o.get("type") == "logs")


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Input items as chat messages. Consecutive assistant-side items (reasoning, code interpreter
    calls, assistant messages) become one assistant turn, in order, as the model wrote it: the
    thinking of a reasoning model (reasoning items marked `THINKING`, and the calls among and
    right after them) inside <think>...</think>, so the model's chat template treats it as chat's
    history (most strip earlier turns' thinking). ValueError names the item that cannot be rendered."""
    messages: list[dict[str, str]] = []
    thinking = False  # inside a <think> span of the current assistant turn

    def assistant(text: str, *, think: bool | None = None) -> None:
        """`think` True opens (or continues) a <think> span, False closes it, None continues as is."""
        nonlocal thinking
        if think is True and not thinking:
            text, thinking = "<think>" + text, True
        elif think is False and thinking:
            text, thinking = "</think>\n\n" + text, False
        if messages and messages[-1]["role"] == "assistant":
            messages[-1]["content"] += text
        else:
            messages.append({"role": "assistant", "content": text})

    def end_turn() -> None:
        nonlocal thinking
        if thinking:
            messages[-1]["content"] += "</think>\n\n"
            thinking = False

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object (a message or an output item of an earlier response)")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _FORWARD_ROLES:
                raise ValueError(f"{where}.role must be one of user, assistant, system, developer; got {role!r}")
            text = _content_text(item.get("content"), f"{where}.content")
            if role == "assistant":
                assistant(text, think=False)
            else:
                end_turn()
                messages.append({"role": _FORWARD_ROLES[role], "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or []
            assistant(_content_text(parts, f"{where}.content"), think=item.get("encrypted_content") == THINKING)
        elif kind == "code_interpreter_call":
            code = item.get("code")
            if not isinstance(code, str):
                raise ValueError(f"{where}.code must be the call's code (a string)")
            outputs = item.get("outputs")
            if outputs is not None and not isinstance(outputs, list):
                raise ValueError(f"{where}.outputs must be a list of logs outputs or null")
            assistant(code_round_text(code, _call_logs(item)))
        elif kind == "item_reference":
            raise ValueError(
                f"{where}: item references are not supported; pass the item itself or use previous_response_id"
            )
        else:
            raise ValueError(
                f"{where}: item type {kind!r} is not supported; send messages, or reasoning, code_interpreter_call "
                "and message items of an earlier response"
            )
    if messages:
        end_turn()
    return messages
