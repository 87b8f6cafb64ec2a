"""The generation backend protocol the decoder drives, and its value types.

Owns: the small interface between the tool-integrated decoder and a token
generator: one streaming generation request from a list of prompt token ids,
with stop strings and vLLM's sampling fields, returning new token ids and their
text as they arrive (with their logprobs, and the prompt tokens' logprobs, when asked); the engine health check; the two errors backends raise for
callers to map (`InvalidParameter`: the engine refused a value; `EngineUnavailable`:
the engine is dead).
vLLM's AsyncLLMEngine (backends/vllm_backend.py) is the production backend; a
scripted backend (tests/support/scripted_backend.py) replays fixed text for deterministic
unit tests of the decoder loop and is never a default.

Does not own: the TIR loop (decoder.py), tokenisation of observations
(the decoder uses the backend's tokenizer), or HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable


class InvalidParameter(ValueError):
    """A request value the engine cannot serve; `param` names the request field (servers: a 400)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class EngineUnavailable(RuntimeError):
    """The engine cannot serve any more (vLLM: its engine core process died); servers: a 503."""


@dataclass(frozen=True)
class GenParams:
    """Sampling parameters of one generation request (a subset of vLLM's SamplingParams)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    # vLLM's structured outputs: one constraint, as StructuredOutputsParams' fields
    # (`{"json": schema}`, `{"json_object": True}`, `{"regex": ...}`, `{"choice": [...]}`); None: free text.
    structured_outputs: Mapping[str, Any] | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    # Stop strings are kept in the output: the decoder needs the closing fence's tokens.
    include_stop_str_in_output: bool = True
    logprobs: int | None = None
    # logprobs of the prompt's own tokens (vLLM's `prompt_logprobs`: this many alternatives each)
    prompt_logprobs: int | None = None
    # vLLM's further sampling fields, with vLLM's neutral defaults (see SamplingOptions).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    # Backends clamp min_tokens to max_tokens (one round of a trajectory may be shorter).
    min_tokens: int = 0
    # token id -> bias added to its logit (vLLM clamps to [-100, 100]).
    logit_bias: Mapping[int, float] | None = None
    # Generation stops after any of these token ids (kept in token_ids, not in text).
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True


@dataclass
class GenChunk:
    """New output of a running generation request (a delta, not cumulative)."""

    token_ids: list[int]
    text: str
    finished: bool = False
    # "stop" (EOS or a stop string), "length" (max_tokens) or "abort".
    finish_reason: Literal["stop", "length", "abort"] | None = None
    # The stop string that ended generation, or None for EOS / not finished.
    stop_reason: str | int | None = None
    # Prompt tokens served from the prefix cache (reported once, on the first chunk).
    num_cached_tokens: int | None = None
    logprobs: list[dict[int, Any]] | None = field(default=None)
    # With `GenParams.prompt_logprobs`: the prompt tokens' logprobs (None for the first token, which
    # has no context), as vLLM reports them; a backend may split them over its first chunks.
    prompt_logprobs: list[dict[int, Any] | None] | None = None


@runtime_checkable
class GenerationBackend(Protocol):
    """What the decoder needs from an inference engine."""

    @property
    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer for the served model (encode/decode/chat template)."""

    @property
    def max_model_len(self) -> int:
        """Longest prompt + generation the engine accepts, in tokens."""

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end generation."""

    def generate(self, prompt_token_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[GenChunk]:
        """Stream one generation request. Closing the iterator early aborts the request."""

    def check_structured_outputs(self, structured: Mapping[str, Any]) -> None:
        """Raise InvalidParameter for a structured-output constraint `generate` would refuse."""

    async def abort(self, request_id: str) -> None:
        """Abort a running request (no-op if it already finished)."""

    async def num_unfinished_requests(self) -> int:
        """Requests the engine is still working on (0 when idle): used to verify aborts."""

    async def check_health(self) -> None:
        """Return if the engine can serve; raise (e.g. vLLM's EngineDeadError) when it cannot."""
