"""Client function calling (OpenAI `tools`) in a model's own text, as vLLM does it.

Owns: `FunctionCallParser`, one per served model: whether the model's chat template
writes calls in the Hermes format (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`,
Qwen2.5 / Qwen3 and others; vLLM's `hermes` tool parser), parsing a finished text into
its content and calls with vLLM's own `Hermes2ProToolParser`, how much of a growing text
is surely content (so a stream can send it before a call starts), and the calls of a
text that structured outputs forced to be a call (`tool_choice` `required` or a named
function: vLLM's JSON schemas for both, `forced_call_schema`). Calls are plain
`(name, arguments JSON text)` pairs.

Does not own: the OpenAI shapes of requests and responses (server/), call ids, or
rendering tools into the prompt (prompting.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

Call = tuple[str, str]  # (function name, arguments as JSON text)


def _parameters(fn: Mapping[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    return dict(params) if params else {"type": "object", "properties": {}}


def forced_call_schema(
    tools: Sequence[Mapping[str, Any]], choice: str | Mapping[str, Any], parallel_tool_calls: bool | None = None
) -> dict[str, Any]:
    """The JSON schema vLLM forces for `tool_choice` (vllm.tool_parsers.utils.get_json_schema_from_tools):
    a named function's output is its arguments object; `required` is a non-empty array of
    `{"name", "parameters"}` objects (at most one when `parallel_tool_calls` is false)."""
    functions = [t["function"] for t in tools]
    if isinstance(choice, Mapping):
        name = choice["function"]["name"]
        return _parameters(next(f for f in functions if f["name"] == name))
    if choice != "required":
        raise ValueError(f"tool_choice {choice!r} forces no call")
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "anyOf": [
                {
                    "properties": {"name": {"type": "string", "enum": [f["name"]]}, "parameters": _parameters(f)},
                    "required": ["name", "parameters"],
                }
                for f in functions
            ],
        },
    }
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    defs: dict[str, Any] = {}
    for item in schema["items"]["anyOf"]:
        defs.update(item["properties"]["parameters"].pop("$defs", None) or {})
    if defs:
        schema["$defs"] = defs
    return schema


def forced_calls(text: str, choice: str | Mapping[str, Any]) -> list[Call]:
    """The calls in text that `forced_call_schema` constrained (as vLLM reads it): the named
    function with the text as its arguments, or each `{"name", "parameters"}` of the array.
    Text that is not (yet) such JSON, e.g. cut by max_tokens, holds no call."""
    if isinstance(choice, Mapping):
        return [(choice["function"]["name"], text)] if text.strip() else []
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    return [
        (item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False))
        for item in items
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]


def partial_overlap(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class FunctionCallParser:
    """Function calls in the served model's own call format (vLLM's Hermes parser)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None) or ""
        if isinstance(template, dict):  # several named templates
            template = " ".join(str(t) for t in template.values())
        #: whether the model writes calls itself (tool_choice `auto`); `required` and named
        #: functions are forced by structured outputs and work with any model
        self.supports_auto = TOOL_CALL_START in str(template)
        self._hermes: Any = None

    def _parser(self) -> Any:
        if self._hermes is None:
            from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

            self._hermes = Hermes2ProToolParser(self.tokenizer)
        return self._hermes

    def content_end(self, text: str) -> int:
        """How much of a growing text is surely content: up to a call's start, or up to a
        suffix that may still become one."""
        start = text.find(TOOL_CALL_START)
        return start if start >= 0 else len(text) - partial_overlap(text, TOOL_CALL_START)

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """A finished text's content (before the first call) and its calls, as vLLM's
        `hermes` parser reads them (text whose calls do not parse stays content; a last call
        without its closing tag, as generation stopped at it, is read too)."""
        info = self._parser().extract_tool_calls(text, request=None)
        if not info.tools_called:
            return text, []
        calls = [(tc.function.name, tc.function.arguments) for tc in info.tool_calls]
        return info.content or "", calls
