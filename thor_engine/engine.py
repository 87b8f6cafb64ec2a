"""`ThorEngine`: the engine's face toward the server and other callers that think in text.

Owns: one served model (a generation backend) plus a tool executor, and the
operations a front end needs without touching tokens: preparing a prompt from
chat messages or raw text on a worker thread (chat-template refusals become
`ChatTemplateError`, lengths are checked against the context window; an input
longer than the context by its characters alone is `InputTooLong` before any
template or tokeniser runs), the
generation budget as vLLM computes it (`max_tokens_for`: clamped to the context,
checkpoint defaults), checking sampling token ids against the vocabulary,
running THOR trajectories (`stream`), plain generation without tools
(`generate_plain`, for vLLM-compatible /v1/completions, with the prompt tokens'
logprobs when asked, computed once per prompt whatever n: `echo`), vLLM's /tokenize and
/detokenize (bounded by the context), the model's aliases and
`generation_config.json` defaults, the engine health check, and shutdown.
Prompts are opaque `Prompt` handles: token ids stay inside thor_engine.

Does not own: HTTP, protocol shapes, auth or storage (server/), nor the loop
itself (decoder.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import math
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from .backend import EngineUnavailable, GenerationBackend, GenParams, InvalidParameter
from .config import SamplingOptions, ThorConfig
from .decoder import ThorDecoder
from .events import Event
from .final_answer import FinalAnswer
from .function_calls import FunctionCallParser
from .prompting import TIR_INSTRUCTIONS, TirMode, render_chat
from .streams import merge
from .tools import ToolExecutor

__all__ = [
    "ChatTemplateError",
    "EngineUnavailable",
    "InputTooLong",
    "InvalidParameter",
    "PlainChunk",
    "Prompt",
    "PromptTooLong",
    "ThorEngine",
]


class ChatTemplateError(InvalidParameter):
    """The model's chat template refused the conversation (roles, order, content)."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            "messages",
            f"this model's chat template rejected the conversation: {reason}. Send a conversation the template "
            "accepts (typically: optional system first, then alternating user/assistant turns ending with user).",
        )


class PromptTooLong(ValueError):
    def __init__(self, prompt_tokens: int, max_model_len: int, requested: int | None = None) -> None:
        self.prompt_tokens, self.max_model_len, self.requested = prompt_tokens, max_model_len, requested
        extra = f" plus max_tokens {requested}" if requested else ""
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + (requested or 0)} tokens ({prompt_tokens} in the prompt{extra}). "
            "Please reduce the length of the messages or max_tokens."
        )


class InputTooLong(PromptTooLong):
    """An input with more characters than the context can hold as tokens, whatever they are:
    refused by its length alone, before any template or tokeniser runs."""

    def __init__(self, chars: int, min_tokens: int, max_model_len: int, token_chars: int) -> None:
        ValueError.__init__(
            self,
            f"This model's maximum context length is {max_model_len} tokens. However, your input of {chars} "
            f"characters is at least {min_tokens} tokens (one token of this model's vocabulary stands for at most "
            f"{token_chars} characters). Please reduce the length of the input.",
        )
        self.prompt_tokens, self.max_model_len, self.requested = min_tokens, max_model_len, None


@dataclass(frozen=True)
class Prompt:
    """A prepared prompt. `num_tokens` is public; the ids are for thor_engine only."""

    _ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self._ids)


#: (token text, logprob, [(alternative token text, logprob), one per alternative token id]); a
#: prompt's first token: (text, None, None). Alternatives stay one per token id: several ids can
#: decode to the same text (byte pieces of one character all read U+FFFD).
LogprobEntry = tuple[str, float | None, list[tuple[str, float]] | None]


@dataclass
class PlainChunk:
    """A delta of plain (tool-free) generation for one choice."""

    index: int
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # per new token: (token text, logprob, [(alternative token text, logprob) per token id])
    logprobs: list[LogprobEntry] | None = None
    # with `prompt_logprobs`, on a choice's first chunk: one entry per prompt token, the first
    # one (no context) as (text, None, None), as vLLM and OpenAI report it
    prompt_logprobs: list[LogprobEntry] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # the new tokens' ids (vLLM's `return_token_ids`), and the prompt's ids on a choice's first chunk
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None


class ThorEngine:
    def __init__(self, backend: GenerationBackend, executor: ToolExecutor, model_name: str) -> None:
        self.backend = backend
        self.decoder = ThorDecoder(backend, executor)
        self.model_name = model_name
        # Chat templates and tokenisation of long prompts take real CPU time: one worker thread
        # keeps them off the event loop (one, so the tokenizer is never used by two threads).
        self._render_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="thor-render")
        self._token_chars: int | None = None  # the longest token's characters, once an input needed it

    @property
    def model_aliases(self) -> frozenset[str]:
        """Other names clients may use for the served model: the path the engine loaded, as
        `vllm serve <path>` accepts it."""
        path = getattr(self.backend, "model_path", None)
        if not path:
            return frozenset()
        local = Path(path)
        return frozenset({path, str(local.resolve())} if local.exists() else {path})

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults of the checkpoint (generation_config.json) for fields a request omits."""
        return dict(getattr(self.backend, "generation_defaults", None) or {})

    async def check_health(self) -> None:
        """Raise when the engine cannot serve (vLLM: its engine core died)."""
        await self.backend.check_health()

    @property
    def max_model_len(self) -> int:
        return self.backend.max_model_len

    @property
    def reasoning_model(self) -> bool:
        return self.decoder.reasoning_model

    def thinking(self, prompt: Prompt) -> str | None:
        """Where a reasoning model's prompt leaves it: "open" (inside <think>: the template opened
        it), "closed" (the template closed it: thinking switched off), or None (not a reasoning
        model, or the model may still open <think> itself)."""
        if not self.reasoning_model:
            return None
        tail = self.backend.tokenizer.decode(list(prompt._ids[-16:]), skip_special_tokens=False)
        opened, closed = tail.rfind("<think>"), tail.rfind("</think>")
        if opened > closed:
            return "open"
        return "closed" if closed > opened else None

    # --- prompts -------------------------------------------------------------------------

    def chat_prompt(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tir_instructions: str | None = TIR_INSTRUCTIONS,
        tir_mode: TirMode = "append",
        enable_thinking: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> Prompt:
        """Render and tokenise a conversation (blocking: servers use `prepare_chat`); `tools`
        (OpenAI function tools) reach the template as its `tools` variable.

        Raises ChatTemplateError when the template refuses the conversation, InvalidParameter
        for bad `chat_template_kwargs`, PromptTooLong when nothing is left for generation."""
        ids = self._render(
            messages,
            tir_instructions=tir_instructions,
            tir_mode=tir_mode,
            enable_thinking=enable_thinking,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
        )
        return self._checked(ids)

    def _render(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> list[int]:
        """`render_chat` with the template's refusals as ChatTemplateError / InvalidParameter."""
        try:
            return render_chat(self.backend.tokenizer, messages, **kwargs)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(str(exc) or type(exc).__name__) from exc
        except TypeError as exc:  # e.g. a template concatenating a field the message lacks (vLLM: a 400 too)
            raise ChatTemplateError(f"{type(exc).__name__}: {exc}") from exc
        except ValueError as exc:
            if "chat_template_kwargs" in str(exc):
                raise InvalidParameter("chat_template_kwargs", str(exc)) from exc
            raise ChatTemplateError(str(exc)) from exc

    async def prepare_chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Prompt:
        """`chat_prompt` on the render thread, so the event loop keeps serving meanwhile; a
        conversation too long for the context by its characters alone is refused first
        (InputTooLong), without rendering it."""
        await self.check_input_chars(_content_chars(messages), most=self.max_model_len - 1)
        return await self._off_loop(functools.partial(self.chat_prompt, messages, **kwargs))

    async def prepare_text(self, prompt: str | Sequence[int]) -> Prompt:
        """`text_prompt` on the render thread; a prompt too long for the context by its length
        alone (characters, or token ids) is refused first, without tokenising it."""
        if isinstance(prompt, str):
            await self.check_input_chars(len(prompt), most=self.max_model_len - 1)
        elif len(prompt) >= self.max_model_len:
            raise PromptTooLong(len(prompt), self.max_model_len)
        return await self._off_loop(functools.partial(self.text_prompt, prompt))

    def _longest_token(self) -> int:
        """The most characters of input one token can stand for: the length of the longest entry
        of the vocabulary (byte-level BPE spells each byte as one character, so an entry is at least
        as long as the text it decodes to; special tokens are spelt as themselves)."""
        if self._token_chars is None:
            self._token_chars = max(1, max((len(t) for t in self.backend.tokenizer.get_vocab()), default=1))
        return self._token_chars

    async def check_input_chars(self, chars: int, *, most: int) -> None:
        """InputTooLong when `chars` characters are more than `most` tokens however they tokenise
        (at least chars / the longest token): a cheap bound checked before any template or
        tokeniser runs, which is where a huge input would otherwise hold the one render thread."""
        if chars <= most:  # cannot be more than `most` tokens
            return
        per = self._token_chars or await asyncio.get_running_loop().run_in_executor(
            self._render_pool, self._longest_token
        )
        least = -(-chars // per)
        if least > most:
            raise InputTooLong(chars, least, self.max_model_len, per)

    async def _off_loop(self, fn: Callable[[], Prompt]) -> Prompt:
        return await asyncio.get_running_loop().run_in_executor(self._render_pool, fn)

    # --- tokenizer utilities (vLLM's /tokenize and /detokenize) ---------------------------

    async def tokenize(
        self,
        *,
        text: str | None = None,
        messages: Sequence[dict[str, Any]] | None = None,
        add_special_tokens: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        return_token_strs: bool = False,
    ) -> tuple[list[int], list[str] | None]:
        """Token ids of raw `text`, or of `messages` rendered by the chat template exactly as
        given (no THOR instructions added), as vLLM's /tokenize computes them, and with
        `return_token_strs` each token's string (both on the render thread). At most
        `max_model_len` tokens, as vLLM allows: a longer input is PromptTooLong, refused by its
        characters alone (InputTooLong) before tokenising when it cannot fit.

        Raises ChatTemplateError / InvalidParameter as `chat_prompt` does."""
        chars = len(text or "") if messages is None else _content_chars(messages)
        await self.check_input_chars(chars, most=self.max_model_len)

        def run() -> tuple[list[int], list[str] | None]:
            if messages is None:
                ids = self.backend.tokenizer.encode(text or "", add_special_tokens=add_special_tokens)
            else:
                ids = self._render(
                    messages,
                    tir_instructions=None,
                    chat_template_kwargs=chat_template_kwargs,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                )
                if add_special_tokens and self.backend.tokenizer.bos_token_id is not None:
                    ids = [self.backend.tokenizer.bos_token_id, *ids]
            if len(ids) > self.max_model_len:
                raise PromptTooLong(len(ids), self.max_model_len)
            return ids, self.token_strings(ids) if return_token_strs else None

        return await asyncio.get_running_loop().run_in_executor(self._render_pool, run)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The tokenizer's own string for each id (byte-level pieces as the vocabulary spells them)."""
        return [str(t) for t in self.backend.tokenizer.convert_ids_to_tokens(list(ids))]

    async def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids (special tokens kept, as vLLM's /detokenize); more than
        `max_model_len` ids, or out-of-vocabulary ones, are an InvalidParameter naming `tokens`."""
        if len(ids) > self.max_model_len:
            raise InvalidParameter(
                "tokens",
                f"{len(ids)} token ids are more than this model's maximum context length of {self.max_model_len} "
                "tokens; send at most that many per request",
            )
        vocab = len(self.backend.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidParameter(
                "tokens", f"token ids out of range for this model's vocabulary of {vocab}: {bad[:5]}"
            )

        def run() -> str:
            return self.backend.tokenizer.decode(list(ids))

        return await asyncio.get_running_loop().run_in_executor(self._render_pool, run)

    @functools.cached_property
    def function_calls(self) -> FunctionCallParser:
        """Parses client function calls out of this model's text (vLLM's parser for its family)."""
        return FunctionCallParser(self.backend.tokenizer)

    @property
    def versions(self) -> dict[str, str]:
        """Versions of the generation stack (`vllm` when the backend is vLLM)."""
        return dict(getattr(self.backend, "versions", None) or {})

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

    def max_tokens_for(self, prompt: Prompt, requested: int | None, default: int | None = None) -> int:
        """The generation budget as vLLM 0.32's server computes it (`get_max_tokens`): the request's
        max_tokens, else `default` (the server's) capped by the checkpoint's max_new_tokens, and
        always clamped to the room the context leaves after the prompt (never a 400 for asking more)."""
        room = self.max_model_len - prompt.num_tokens
        if requested is not None:
            return max(1, min(requested, room))
        candidates = [room, default, self.generation_defaults.get("max_tokens")]
        return max(1, min(int(v) for v in candidates if v is not None))

    def check_sampling(self, sampling: SamplingOptions) -> None:
        """Reject token ids this model does not have (vLLM answers these with a 400 too)."""
        vocab = len(self.backend.tokenizer)
        bad_bias = [t for t, _ in sampling.logit_bias if not 0 <= t < vocab]
        if bad_bias:
            raise InvalidParameter(
                "logit_bias",
                f"logit_bias has token ids outside this model's vocabulary "
                f"of {vocab}: {bad_bias[:5]}; use ids in [0, {vocab})",
            )
        bad_stop = [t for t in sampling.stop_token_ids if not 0 <= t < vocab]
        if bad_stop:
            raise InvalidParameter(
                "stop_token_ids",
                f"stop_token_ids outside this model's vocabulary of {vocab}: {bad_stop[:5]}; use ids in [0, {vocab})",
            )
        if sampling.max_tokens is not None and sampling.min_tokens > sampling.max_tokens:
            raise InvalidParameter(
                "min_tokens",
                f"min_tokens ({sampling.min_tokens}) must be at most max_tokens "
                f"({sampling.max_tokens}, after clamping to the context left by the prompt)",
            )

    # --- generation ----------------------------------------------------------------------

    def check_structured_outputs(self, structured: Mapping[str, Any]) -> None:
        """Refuse (InvalidParameter) a constraint the engine could not compile, before generating."""
        self.backend.check_structured_outputs(structured)

    def stream(
        self,
        prompt: Prompt,
        config: ThorConfig,
        sampling: SamplingOptions,
        *,
        n: int = 1,
        vote: bool = False,
        request_id: str | None = None,
        final: FinalAnswer | None = None,
    ) -> AsyncIterator[Event]:
        """THOR trajectories as typed events (see thor_engine.events); with `final`, each ends in a
        constrained answer (thor_engine.final_answer)."""
        return self.decoder.stream(
            list(prompt._ids), config, sampling, n=n, vote=vote, request_id=request_id, final=final
        )

    async def generate_plain(
        self,
        prompt: Prompt,
        sampling: SamplingOptions,
        *,
        n: int = 1,
        structured_outputs: Mapping[str, Any] | None = None,  # vLLM's constraint, e.g. {"json": schema}
        logprobs: int | None = None,
        include_stop_str_in_output: bool = False,
        request_id: str | None = None,
        prompt_logprobs: int | None = None,
        first_index: int = 0,
    ) -> AsyncIterator[PlainChunk]:
        """Plain generation (no tools), n choices interleaved, as vLLM's /v1/completions does it.

        Choices are numbered from `first_index` (a batch of prompts: prompt k's from k x n). With
        `prompt_logprobs`, each choice's first chunk carries every prompt token's logprob entry
        (vLLM's `echo` with `logprobs`), computed once: the first sample asks the engine for them,
        turns them into entries on the render thread, and the other samples reuse those entries."""
        rid = request_id or uuid.uuid4().hex
        max_tokens = sampling.max_tokens or (self.max_model_len - prompt.num_tokens)
        tok = self.backend.tokenizer
        # the prompt's entries, from the first sample to the others (each waits for it before its first chunk)
        shared: asyncio.Future[list[LogprobEntry]] = asyncio.get_running_loop().create_future()

        async def one(i: int) -> AsyncIterator[PlainChunk]:
            seed = None if sampling.seed is None else sampling.seed + i
            params = GenParams(
                max_tokens=max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                structured_outputs=dict(structured_outputs) if structured_outputs else None,
                seed=seed,
                stop=sampling.stop,
                include_stop_str_in_output=include_stop_str_in_output,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs if i == 0 else None,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                repetition_penalty=sampling.repetition_penalty,
                min_p=sampling.min_p,
                min_tokens=sampling.min_tokens,
                logit_bias=dict(sampling.logit_bias) or None,
                stop_token_ids=sampling.stop_token_ids,
                ignore_eos=sampling.ignore_eos,
                skip_special_tokens=sampling.skip_special_tokens,
            )
            produced, sent_prompt = 0, False
            # vLLM may split the prompt's logprobs over chunked-prefill outputs that carry no token yet
            pending: list[dict[int, Any] | None] = []
            prompt_done = prompt_logprobs is None
            index = first_index + i
            try:
                gen = self.backend.generate(list(prompt._ids), params, f"{rid}-{index}")
                async with contextlib.aclosing(gen):
                    async for chunk in gen:
                        produced += len(chunk.token_ids)
                        plp = None
                        if not prompt_done:
                            if i > 0:  # the first sample's entries (shielded: a cancelled waiter leaves them be)
                                plp = await asyncio.shield(shared)
                            else:
                                pending += chunk.prompt_logprobs or []
                                if not (chunk.token_ids or chunk.finished):
                                    continue
                                plp = await asyncio.get_running_loop().run_in_executor(
                                    self._render_pool, self._prompt_entries, prompt, pending
                                )
                                shared.set_result(plp)
                            prompt_done = True
                        lp = None
                        if logprobs is not None and chunk.logprobs:
                            lp = [
                                _logprob_entry(tok, tid, d)
                                for tid, d in zip(chunk.token_ids, chunk.logprobs, strict=False)
                            ]
                        yield PlainChunk(
                            index=index,
                            text=chunk.text,
                            finished=chunk.finished,
                            finish_reason=chunk.finish_reason,
                            stop_reason=chunk.stop_reason,
                            logprobs=lp,
                            prompt_logprobs=plp,
                            prompt_tokens=prompt.num_tokens,
                            completion_tokens=produced,
                            token_ids=list(chunk.token_ids),
                            prompt_token_ids=None if sent_prompt else list(prompt._ids),
                        )
                        sent_prompt = True
            finally:
                if i == 0 and not shared.done():  # failed or cancelled first: the waiters must not hang
                    shared.cancel()

        # one choice is read directly: merge's task and queue would cost a task switch per token
        choices = one(0) if n == 1 else merge([functools.partial(one, i) for i in range(n)])
        async with contextlib.aclosing(choices) as merged:
            async for item in merged:
                yield item

    def _prompt_entries(self, prompt: Prompt, found: list[dict[int, Any] | None]) -> list[LogprobEntry]:
        """One logprob entry per prompt token from the backend's prompt logprobs (the first: no context)."""
        if len(found) != prompt.num_tokens:
            raise RuntimeError(
                f"the engine returned prompt logprobs for {len(found)} of the prompt's {prompt.num_tokens} tokens"
            )
        tok = self.backend.tokenizer
        return [
            (tok.decode([tid]), None, None) if d is None else _logprob_entry(tok, tid, d)
            for tid, d in zip(prompt._ids, found, strict=True)
        ]

    async def num_unfinished_requests(self) -> int:
        return await self.backend.num_unfinished_requests()

    def shutdown(self) -> None:
        self._render_pool.shutdown(wait=False, cancel_futures=True)
        shutdown = getattr(self.backend, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _content_chars(messages: Sequence[Mapping[str, Any]]) -> int:
    """Characters of the messages' contents (text parts included): a lower bound on what the
    chat template renders."""
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def _logprob_entry(tok: Any, token_id: int, alternatives: dict[int, Any]) -> LogprobEntry:
    def lp(v: Any) -> float:
        value = float(getattr(v, "logprob", v))
        return value if math.isfinite(value) else -9999.0

    own = alternatives.get(token_id)
    text = tok.decode([token_id])
    tops = [(tok.decode([t]), lp(v)) for t, v in alternatives.items()]
    return text, lp(own) if own is not None else 0.0, tops
