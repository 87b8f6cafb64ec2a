"""`ThorEngine`: the engine's face toward the server and other callers that think in text.

Owns: one served model (a generation backend) plus a tool executor, and the
operations a front end needs without touching tokens: preparing a prompt from
chat messages or raw text (with its length checked against the context window),
running THOR trajectories (`stream`), plain generation without tools
(`generate_plain`, for vLLM-compatible /v1/completions), readiness and shutdown.
Prompts are opaque `Prompt` handles: token ids stay inside thor_engine.

Does not own: HTTP, protocol shapes, auth or storage (server/), nor the loop
itself (decoder.py).
"""

from __future__ import annotations

import contextlib
import functools
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from .backend import GenerationBackend, GenParams
from .config import SamplingOptions, ThorConfig
from .decoder import ThorDecoder
from .events import Event
from .prompting import TIR_INSTRUCTIONS, render_chat
from .streams import merge
from .tools import ToolExecutor


class PromptTooLong(ValueError):
    def __init__(self, prompt_tokens: int, max_model_len: int, requested: int | None = None) -> None:
        self.prompt_tokens, self.max_model_len, self.requested = prompt_tokens, max_model_len, requested
        extra = f" plus max_tokens {requested}" if requested else ""
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + (requested or 0)} tokens ({prompt_tokens} in the prompt{extra}). "
            "Please reduce the length of the messages or max_tokens."
        )


@dataclass(frozen=True)
class Prompt:
    """A prepared prompt. `num_tokens` is public; the ids are for thor_engine only."""

    _ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self._ids)


@dataclass
class PlainChunk:
    """A delta of plain (tool-free) generation for one choice."""

    index: int
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # per new token: (token text, logprob, {alternative token text: logprob})
    logprobs: list[tuple[str, float, dict[str, float]]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ThorEngine:
    def __init__(self, backend: GenerationBackend, executor: ToolExecutor, model_name: str) -> None:
        self.backend = backend
        self.decoder = ThorDecoder(backend, executor)
        self.model_name = model_name

    @property
    def max_model_len(self) -> int:
        return self.backend.max_model_len

    @property
    def reasoning_model(self) -> bool:
        return self.decoder.reasoning_model

    # --- prompts -------------------------------------------------------------------------

    def chat_prompt(
        self, messages: Sequence[dict[str, Any]], *, tir_instructions: str | None = TIR_INSTRUCTIONS,
        enable_thinking: bool | None = None,
    ) -> Prompt:
        ids = render_chat(self.backend.tokenizer, messages, tir_instructions=tir_instructions,
                          enable_thinking=enable_thinking)
        return self._checked(ids)

    def text_prompt(self, prompt: str | Sequence[int]) -> Prompt:
        if isinstance(prompt, str):
            ids = self.backend.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            vocab = len(self.backend.tokenizer)
            bad = [t for t in prompt if not 0 <= int(t) < vocab]
            if bad:
                raise ValueError(f"prompt token ids out of range for this model's vocabulary of {vocab}: {bad[:5]}")
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        return self._checked(ids)

    def _checked(self, ids: list[int]) -> Prompt:
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(len(ids), self.max_model_len)
        return Prompt(tuple(ids))

    def check_budget(self, prompt: Prompt, max_tokens: int | None) -> None:
        if max_tokens is not None and prompt.num_tokens + max_tokens > self.max_model_len:
            raise PromptTooLong(prompt.num_tokens, self.max_model_len, max_tokens)

    # --- generation ----------------------------------------------------------------------

    def stream(
        self, prompt: Prompt, config: ThorConfig, sampling: SamplingOptions, *, n: int = 1, vote: bool = False,
        request_id: str | None = None,
    ) -> AsyncIterator[Event]:
        """THOR trajectories as typed events (see thor_engine.events)."""
        return self.decoder.stream(list(prompt._ids), config, sampling, n=n, vote=vote, request_id=request_id)

    async def generate_plain(
        self, prompt: Prompt, sampling: SamplingOptions, *, n: int = 1, logprobs: int | None = None,
        include_stop_str_in_output: bool = False, request_id: str | None = None,
    ) -> AsyncIterator[PlainChunk]:
        """Plain generation (no tools), n choices interleaved, as vLLM's /v1/completions does it."""
        rid = request_id or uuid.uuid4().hex
        max_tokens = sampling.max_tokens or (self.max_model_len - prompt.num_tokens)
        tok = self.backend.tokenizer
        async def one(i: int) -> AsyncIterator[PlainChunk]:
            seed = None if sampling.seed is None else sampling.seed + i
            params = GenParams(
                max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                seed=seed, stop=sampling.stop, include_stop_str_in_output=include_stop_str_in_output,
                logprobs=logprobs,
            )
            produced = 0
            async with contextlib.aclosing(self.backend.generate(list(prompt._ids), params, f"{rid}-{i}")) as gen:
                async for chunk in gen:
                    produced += len(chunk.token_ids)
                    lp = None
                    if logprobs is not None and chunk.logprobs:
                        lp = [_logprob_entry(tok, tid, d) for tid, d in zip(chunk.token_ids, chunk.logprobs)]
                    yield PlainChunk(
                        index=i, text=chunk.text, finished=chunk.finished, finish_reason=chunk.finish_reason,
                        stop_reason=chunk.stop_reason, logprobs=lp, prompt_tokens=prompt.num_tokens,
                        completion_tokens=produced,
                    )

        async with contextlib.aclosing(merge([functools.partial(one, i) for i in range(n)])) as merged:
            async for item in merged:
                yield item

    async def num_unfinished_requests(self) -> int:
        return await self.backend.num_unfinished_requests()

    def shutdown(self) -> None:
        shutdown = getattr(self.backend, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _logprob_entry(tok: Any, token_id: int, alternatives: dict[int, Any]) -> tuple[str, float, dict[str, float]]:
    def lp(v: Any) -> float:
        value = float(getattr(v, "logprob", v))
        return value if math.isfinite(value) else -9999.0

    own = alternatives.get(token_id)
    text = tok.decode([token_id])
    tops = {tok.decode([t]): lp(v) for t, v in alternatives.items()}
    return text, lp(own) if own is not None else 0.0, tops
