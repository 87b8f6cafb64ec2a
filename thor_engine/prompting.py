"""Rendering a request into prompt tokens: chat template plus THOR's TIR instructions.

Owns: the tool-integrated-reasoning instruction text, where it goes (`TirMode`:
appended to the caller's system message by default, only when the caller brought
none, or never), whether the model is a reasoning ("thinking") model, and
rendering chat messages with the tokenizer's own chat template plus the caller's
`chat_template_kwargs` and function `tools`, and tokenising text the server did not write
as plain text (`encode_plain`): a message or tool output that spells a control token
(`<|im_end|>`, `<|im_start|>`) is that text, never the control token, so it cannot end a
turn or open a new one. Only the template's own control tokens are control tokens. Raw
prompt text or token ids (`/v1/completions`, where the client writes the template itself)
pass through untouched.

Does not own: sampling, the loop, or HTTP message validation.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Literal

TIR_INSTRUCTIONS = (
    "You are a careful mathematician who also programs. Solve the problem by reasoning step by step, and use "
    "Python whenever a computation, equation, or check is involved: write a self-contained ```python code block "
    "that imports what it needs and prints its result. After each block, stop; the block is executed and its "
    "output is shown to you in a ```output block. Continue reasoning from the output. Put the final answer "
    "within \\boxed{}."
)


def is_reasoning_model(tokenizer: Any) -> bool:
    """True for models with a <think> block (e.g. Qwen3): their code runs inside the thinking."""
    vocab = tokenizer.get_vocab()
    return "<think>" in vocab and "</think>" in vocab


TirMode = Literal["append", "if_no_system", "off"]
TIR_MODES: tuple[str, ...] = ("append", "if_no_system", "off")

#: Template arguments THOR sets itself; a request's `chat_template_kwargs` may not override them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "chat_template",
        "tokenize",
        "add_generation_prompt",
        "continue_final_message",
        "return_dict",
        "return_tensors",
        "return_assistant_tokens_mask",
        "tools",
        "documents",
    }
)


def with_tir_instructions(
    messages: Sequence[dict[str, Any]], tir_instructions: str | None, mode: TirMode = "append"
) -> list[dict[str, Any]]:
    """`messages` with THOR's instructions placed by `mode`.

    append: added to the caller's first system message (a client that always sends its own
    "You are a helpful assistant" keeps tool use), or as a system message when there is none.
    if_no_system: only when the caller brought no system message (the caller's wins).
    off: never. Text the system message already contains is not added twice."""
    msgs = [dict(m) for m in messages]
    if not tir_instructions or mode == "off":
        return msgs
    system = next((m for m in msgs if m.get("role") == "system"), None)
    if system is None:
        msgs.insert(0, {"role": "system", "content": tir_instructions})
    elif mode == "append":
        content = str(system.get("content") or "")
        if tir_instructions not in content:
            system["content"] = f"{content.rstrip()}\n\n{tir_instructions}" if content.strip() else tir_instructions
    elif mode != "if_no_system":
        raise ValueError(f"unknown TIR instruction mode {mode!r}; use one of {', '.join(TIR_MODES)}")
    return msgs


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    tir_instructions: str | None = TIR_INSTRUCTIONS,
    tir_mode: TirMode = "append",
    enable_thinking: bool | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids of `messages` rendered by the model's chat template, ready for generation
    (or, for `/tokenize`, without the generation prompt, or continuing the last message).

    `chat_template_kwargs` reach the template as variables (e.g. Qwen3's `enable_thinking`), and
    `tools` (OpenAI function tools, for client function calling) as its `tools` variable;
    a template that rejects the conversation raises jinja2.TemplateError (callers report it)."""
    msgs = with_tir_instructions(messages, tir_instructions, tir_mode)
    kwargs: dict[str, Any] = dict(chat_template_kwargs or {})
    clash = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if clash:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(clash)}: THOR sets these itself")
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    # the caller's text reaches the template with every control-token spelling swapped for a
    # placeholder, so each control token in the rendering is the template's own
    specials = special_tokens(tokenizer)
    nonce = secrets.token_hex(8)
    swap = {tok: f"\ue000{nonce}.{i}\ue001" for i, tok in enumerate(specials)}
    hide = _replacer(swap)
    text = tokenizer.apply_chat_template(
        _map_strings(msgs, hide),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        **({"tools": _map_strings([dict(t) for t in tools], hide)} if tools else {}),
        **kwargs,
    )
    restore = _replacer({v: k for k, v in swap.items()})
    ids: list[int] = []
    # as the tokenizer itself does: control tokens first, the text between them encoded on its own
    for i, piece in enumerate(_special_pattern(specials).split(text) if specials else [text]):
        if i % 2:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            ids += encode_plain(tokenizer, restore(piece))
    return ids


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's control tokens (added tokens marked special), e.g. Qwen's `<|im_end|>`."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found = {str(t) for t in decoder.values() if getattr(t, "special", False)}
    return sorted(found | set(getattr(tokenizer, "all_special_tokens", ()) or ()))


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text the server did not write (a tool's output, a client's message): a
    control token's spelling in it is plain text, never the control token."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def _special_pattern(specials: Sequence[str]) -> re.Pattern[str]:
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")


def _replacer(table: Mapping[str, str]) -> Any:
    if not table:
        return lambda s: s
    pattern = _special_pattern(list(table))
    return lambda s: pattern.sub(lambda m: table[m.group(0)], s)


def _map_strings(value: Any, fn: Any) -> Any:
    """`value` with `fn` applied to every string in it (message fields, tool definitions)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map_strings(v, fn) for v in value]
    return value


def encode_raw(tokenizer: Any, prompt: str) -> list[int]:
    """Raw prompt text, tokenised once (as vLLM's /v1/completions does)."""
    return tokenizer.encode(prompt, add_special_tokens=False)
