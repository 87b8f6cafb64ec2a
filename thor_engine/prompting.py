"""Rendering a request into prompt tokens: chat template plus THOR's TIR instructions.

Owns: the tool-integrated-reasoning instruction text, where it goes (a system
message unless the caller brought one, in which case the caller's wins), whether
the model is a reasoning ("thinking") model, and rendering chat messages with the
tokenizer's own chat template. Raw prompt text or token ids pass through
untouched.

Does not own: sampling, the loop, or HTTP message validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    tir_instructions: str | None = TIR_INSTRUCTIONS,
    enable_thinking: bool | None = None,
) -> list[int]:
    """Token ids of `messages` rendered by the model's chat template, ready for generation."""
    msgs = [dict(m) for m in messages]
    if tir_instructions and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": tir_instructions})
    kwargs: dict[str, Any] = {}
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_raw(tokenizer: Any, prompt: str) -> list[int]:
    """Raw prompt text, tokenised once (as vLLM's /v1/completions does)."""
    return tokenizer.encode(prompt, add_special_tokens=False)
