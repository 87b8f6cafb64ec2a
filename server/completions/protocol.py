"""The wire type of `POST /v1/completions`: OpenAI's (legacy) completions request, with validation.

Owns: `CompletionRequest`: a prompt (text, token ids, or a batch of either), the shared
sampling fields and `thor` object of protocol.py, `logprobs`, `echo`, vLLM's `max_tokens: 0`
with `echo`; OpenAI fields this server cannot honour (`suffix`, `best_of`) are 400s naming the
field.

Does not own: the route (completions/serving.py) or building responses (completions/plain.py,
thor/builder.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from server.protocol import SamplingRequest, checked_unicode, none_is_default, reject_unless


class CompletionRequest(SamplingRequest):
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

    _more_nulls = field_validator("echo", "include_stop_str_in_output", mode="before")(classmethod(none_is_default))

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        return reject_unless(v, not v, "suffix is not supported by this server")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        return reject_unless(
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
            checked_unicode(text, "the prompt")
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
