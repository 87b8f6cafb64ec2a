"""Turning plain (tool-free) `/v1/completions` output into OpenAI responses and stream chunks.

Owns: `PlainCompletionBuilder`, one per plain completion request, with the interface of
responses.ThorBuilder (`feed`, `usage_chunk`, `response`, `generated_tokens`,
`choices`, `trace`), so plain completions go through the same stream and non-stream
paths (streaming.py) as chat and THOR completions. It consumes the engine's
`PlainChunk`s (n choices per prompt, every prompt of a batch, interleaved as vLLM does:
choice index = prompt index x n + sample index) and produces `text_completion`
chunks carrying text, logprobs (tokens, token_logprobs, top_logprobs, and text_offset
counted over the tokens, independent of how the engine grouped them into chunks),
finish_reason and stop_reason, the non-stream body (the same text and logprobs,
accumulated, in index order), and `usage` (prompt tokens summed over the prompts, completion
and total tokens) as the engine counted it. With `echo`, a choice's first chunk starts with its
prompt's text and, with logprobs, its prompt tokens' entries (the first token's logprob and
top_logprobs null, as vLLM and OpenAI send them); `echo_only` (vLLM's `max_tokens: 0`) sends
the prompt alone and drops the one token the engine had to generate.
With vLLM's `return_token_ids`, each chunk also carries its new `token_ids` (and a choice's
first chunk `prompt_token_ids`), as vLLM 0.32 puts them; the non-stream choices carry both whole.
Also `PlainTokenCounts`: the generated tokens and `usage` both plain builders (this one and
chat.plain.PlainChatBuilder) count alike.

Does not own: THOR's responses (thor/builder.py), HTTP plumbing (streaming.py, completions/serving.py),
or anything about tokens beyond the counts the engine reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from server.metrics import ServerMetrics
from server.thor.records import trace_head
from thor_engine.engine import LogprobEntry, PlainChunk


def _empty_logprobs() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


class PlainTokenCounts:
    """What the plain builders (completions here, chat in chat/plain.py) count alike: the tokens
    the engine generated (what rate limits charge) and `usage`, which a stream's last chunk carries."""

    choices: list[Any]  # each with the `completion_tokens` the engine reported
    prompt_tokens: int

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        # each builder frames its own chunks (text_completion, chat.completion.chunk); never reached
        raise NotImplementedError

    def generated_tokens(self) -> int:
        """Tokens the engine generated for this request: what rate limits charge."""
        return sum(st.completion_tokens for st in self.choices)

    def usage(self) -> dict[str, Any]:
        completion = self.generated_tokens()
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def usage_chunk(self) -> dict[str, Any]:
        return self._chunk([], usage=self.usage())


@dataclass
class PlainChoice:
    index: int
    text: str = ""
    logprobs: dict[str, list[Any]] = field(default_factory=_empty_logprobs)
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    prompt_sent: bool = False  # whether a stream chunk carried prompt_token_ids yet
    token_chars: int = 0  # characters of the tokens with logprobs so far (where the next one starts)
    echoed: bool = False  # whether the prompt (echo) went out yet
    final: dict[str, Any] | None = None  # finish_reason and stop_reason once the choice has finished


class PlainCompletionBuilder(PlainTokenCounts):
    def __init__(
        self,
        *,
        response_id: str,
        model: str,
        n: int,
        prompt_tokens: int,
        logprobs: int | None,
        metrics: ServerMetrics,
        include_usage: bool = False,
        return_token_ids: bool = False,
        num_prompts: int = 1,
        echo: list[str] | None = None,
        echo_only: bool = False,
    ) -> None:
        """`n` choices for each of `num_prompts` prompts; `prompt_tokens` summed over them; `echo`:
        each prompt's text, to prepend to its choices; `echo_only`: send nothing generated."""
        self.id, self.model = response_id, model
        self.return_token_ids = return_token_ids
        self.created = int(time.time())
        self.n = n
        self.echo, self.echo_only = echo, echo_only
        self.choices = [PlainChoice(i) for i in range(num_prompts * n)]
        self.prompt_tokens = prompt_tokens
        self.logprobs = logprobs
        self.metrics = metrics
        # plain completion chunks carry no `usage` key; the usage chunk comes at the end
        self.include_usage = include_usage
        self.t0 = time.monotonic()
        self.first_token_s: float | None = None

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def _add_logprobs(self, st: PlainChoice, entries: list[LogprobEntry] | None) -> dict[str, list[Any]] | None:
        """This chunk's logprobs (also added to the choice's). A token's `text_offset` is where it
        starts in the choice's tokens put end to end: the same however the engine grouped tokens
        into chunks (a chunk's text can lag its tokens while the detokeniser holds a partial
        character back), so a stream's offsets equal the non-stream ones."""
        if entries is None:
            return None
        part = _empty_logprobs()
        for text, lp, tops in entries:
            for d in (part, st.logprobs):
                d["tokens"].append(text)
                d["token_logprobs"].append(lp)
                # the legacy shape is {token text: logprob}: ids with the same text share a key, as in vLLM
                d["top_logprobs"].append(dict(tops) if tops is not None else None)
                d["text_offset"].append(st.token_chars)
            st.token_chars += len(text)
        return part

    def feed(self, c: PlainChunk) -> list[dict[str, Any]]:
        """Consume one chunk of one choice; return the stream chunks it produces (possibly none)."""
        if self.first_token_s is None and c.text:
            self.first_token_s = time.monotonic() - self.t0
            self.metrics.ttft.observe(self.first_token_s)
        st = self.choices[c.index]
        text, entries = c.text, c.logprobs
        if self.echo_only:  # the engine generated one token that is not part of the answer
            text, entries = "", None
        if self.echo is not None and not st.echoed:
            st.echoed = True
            text = self.echo[c.index // self.n] + text
            if self.logprobs is not None:
                entries = [*(c.prompt_logprobs or []), *(entries or [])]
        lp = self._add_logprobs(st, entries)
        st.text += text
        st.completion_tokens = c.completion_tokens
        if self.return_token_ids:
            st.token_ids += c.token_ids
            if st.prompt_token_ids is None:
                st.prompt_token_ids = c.prompt_token_ids
        if c.finished:
            st.final = {"finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if all(s.final for s in self.choices):
                self.metrics.generated_tokens.inc(self.generated_tokens())
        ids = self.return_token_ids and bool(c.token_ids)  # tokens whose text the detokeniser still holds
        if not (text or c.finished or lp or ids):
            return []
        finish, stop = (c.finish_reason, c.stop_reason) if c.finished else (None, None)
        choice = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish, "stop_reason": stop}
        if self.return_token_ids:
            if st.prompt_token_ids is not None and not st.prompt_sent:
                choice["prompt_token_ids"] = st.prompt_token_ids
                st.prompt_sent = True
            choice["token_ids"] = list(c.token_ids)
        return [self._chunk([choice])]

    def _ids(self, st: PlainChoice) -> dict[str, Any]:
        if not self.return_token_ids:
            return {}
        return {"prompt_token_ids": st.prompt_token_ids, "token_ids": st.token_ids}

    def response(self) -> dict[str, Any]:
        """The non-stream body: the same text and logprobs the stream sends, accumulated."""
        choices = [
            {
                "index": st.index,
                "text": st.text,
                "logprobs": st.logprobs if self.logprobs is not None else None,
                "finish_reason": (st.final or {}).get("finish_reason"),
                "stop_reason": (st.final or {}).get("stop_reason"),
                **self._ids(st),
            }
            for st in self.choices
        ]
        return self._chunk(choices, usage=self.usage())

    def trace(self, request_summary: dict[str, Any]) -> dict[str, Any]:
        """The stored trace: the request summary, timings and each choice's text."""
        return {
            **trace_head(self.id, self.created, self.model, request_summary, self.first_token_s, self.t0),
            "choices": [{"index": st.index, "text": st.text, **(st.final or {})} for st in self.choices],
        }
