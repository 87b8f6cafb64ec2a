"""Turning plain (THOR off) chat generation into OpenAI chat responses and stream chunks.

Owns: `PlainChatBuilder`, one per `/v1/chat/completions` request that asks for what only
plain generation gives (`logprobs`, `response_format`, client function `tools`), with the
interface of streaming.Builder, so it goes through the same stream and non-stream paths
as every other request. It consumes the engine's `PlainChunk`s (n choices interleaved)
and produces `chat.completion.chunk`s whose deltas carry the message's `content`, its
`logprobs.content` entries (`token`, `logprob`, `bytes`, `top_logprobs`, for every
generated token, on the chunk of the engine output that produced the token), and
`tool_calls`; then the non-stream body, built from exactly the deltas the stream sends
(so concatenating a stream's deltas gives the non-stream message, field by field), and
`usage`.

A reasoning model's text is split at its think tags as the THOR path does it (thor/builder.py):
inside `<think>` it streams as the reasoning field(s) (`reasoning_content` / `reasoning`), the
tags go nowhere, and the rest is the message's text below, from its first visible character.

Client function calls, by `tool_choice`, on that text:
- `none` (or no tools): the text is `content` as it comes;
- `auto`: text is `content` until the model starts a call (`<tool_call>` for the Hermes
  format; a suffix that may still become one waits); when the choice finishes, the calls
  the engine's parser finds are sent, one `delta.tool_calls` entry each (id, name and the
  whole arguments), and finish_reason is `tool_calls`; text with no parseable call is
  content after all;
- `required` or a named function (the engine forced the call JSON): no content; the calls
  are sent when the choice finishes, finish_reason `tool_calls` (`stop` for a named function,
  as OpenAI and vLLM say it). A `required` text cut short (max_tokens) holds no call and is
  sent as content, finish_reason `length`.

Does not own: THOR's responses (thor/builder.py), plain completions (completions/plain.py),
parsing calls out of text (thor_engine.function_calls, through the engine), HTTP plumbing
(streaming.py, chat/serving.py), or anything about tokens beyond the texts and counts the engine reports.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.completions.plain import PlainTokenCounts
from server.metrics import ServerMetrics
from server.thor.records import trace_head
from thor_engine.engine import PlainChunk
from thor_engine.function_calls import FunctionCallParser, forced_calls, partial_overlap

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _logprob(token: str, logprob: float) -> dict[str, Any]:
    # as vLLM: the token's text, and its UTF-8 bytes (a partial character's text is U+FFFD)
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="replace"))}


@dataclass
class ChatChoiceState:
    index: int
    raw: str = ""  # what the model wrote outside <think> (the content, calls included)
    reasoning: str = ""  # what it wrote inside <think> (reasoning models), sent as it comes
    unsplit: str = ""  # text that may end in a partial think tag (reasoning models)
    in_think: bool = False
    content: str = ""  # content sent so far
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    completion_tokens: int = 0
    started: bool = False
    final: dict[str, Any] | None = None  # finish_reason once the choice has finished


class PlainChatBuilder(PlainTokenCounts):
    def __init__(
        self,
        *,
        response_id: str,
        model: str,
        n: int,
        prompt_tokens: int,
        top_logprobs: int | None,
        tool_choice: str | Mapping[str, Any],
        parser: FunctionCallParser | None,
        metrics: ServerMetrics,
        include_usage: bool = False,
        reasoning_model: bool = False,
        in_think: bool = False,
        reasoning_fields: str = "reasoning_content",
    ) -> None:
        """`top_logprobs` None: no logprobs. `tool_choice`: "none", "auto", "required" or a named
        function (as a dict); `parser` reads the model's calls for "auto". A reasoning model's text
        is split at its think tags (`in_think`: the prompt left it inside <think>)."""
        self.id, self.model = response_id, model
        self.created = int(time.time())
        self.choices = [ChatChoiceState(i, in_think=in_think) for i in range(n)]
        self.reasoning_model = reasoning_model
        self.reasoning_fields = reasoning_fields
        self.prompt_tokens = prompt_tokens
        self.top_logprobs = top_logprobs
        self.tool_choice = tool_choice
        self.parser = parser
        self.forced = tool_choice == "required" or isinstance(tool_choice, Mapping)
        if tool_choice == "auto" and parser is None:
            raise ValueError("tool_choice auto needs the model's function-call parser")
        self.metrics = metrics
        self.include_usage = include_usage
        self.t0 = time.monotonic()
        self.first_token_s: float | None = None

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return chunk

    def _choice(
        self, index: int, delta: dict[str, Any], logprobs: list[dict[str, Any]] | None = None, finish: str | None = None
    ) -> dict[str, Any]:
        lp = {"content": logprobs, "refusal": None} if logprobs is not None else None
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def _entries(self, c: PlainChunk) -> list[dict[str, Any]] | None:
        if self.top_logprobs is None:
            return None
        out = []
        for text, lp, tops in c.logprobs or ():
            # one entry per token id (two ids with the same text are two entries, as vLLM sends them)
            best = sorted(tops or (), key=lambda kv: kv[1], reverse=True)[: self.top_logprobs]
            out.append({**_logprob(text, lp), "top_logprobs": [_logprob(t, v) for t, v in best]})
        return out

    def _reasoning(self, text: str) -> dict[str, str]:
        if self.reasoning_fields == "both":
            return {"reasoning": text, "reasoning_content": text}
        return {self.reasoning_fields: text}

    def _split(self, st: ChatChoiceState, text: str, finished: bool) -> str:
        """Add a text to the choice: a reasoning model's text inside <think> is returned (new
        reasoning), the rest goes to `raw`, the tags themselves nowhere, and the content starts at
        its first visible character (as the THOR path renders reasoning models); a suffix that may
        be a partial tag waits until the choice finishes."""
        if not self.reasoning_model:
            st.raw += text
            return ""
        st.unsplit += text
        reasoning = ""
        while st.unsplit:
            tag = THINK_CLOSE if st.in_think else THINK_OPEN
            idx = st.unsplit.find(tag)
            end = idx if idx >= 0 else len(st.unsplit) - (0 if finished else partial_overlap(st.unsplit, tag))
            piece, st.unsplit = st.unsplit[:end], st.unsplit[end:]
            if st.in_think:
                reasoning += piece
            else:
                st.raw += piece if st.raw else piece.lstrip()
            if idx < 0:
                break
            st.unsplit = st.unsplit[len(tag) :]
            st.in_think = not st.in_think
        return reasoning

    def _new_content(self, st: ChatChoiceState, finished: bool) -> str:
        """Text that is now surely content and was not sent yet."""
        if self.forced:
            return ""
        if self.tool_choice == "auto" and not finished:
            assert self.parser is not None
            end = self.parser.content_end(st.raw)
        else:
            end = len(st.raw)
        return st.raw[len(st.content) : end] if end > len(st.content) else ""

    def _calls(self, st: ChatChoiceState) -> tuple[str, list[tuple[str, str]]]:
        """At the end of a choice: its content (all of it) and its calls."""
        if self.forced:
            calls = forced_calls(st.raw, self.tool_choice)
            return ("", calls) if calls else (st.raw, [])
        if self.tool_choice == "auto":
            assert self.parser is not None
            return self.parser.parse(st.raw)
        return st.raw, []

    def feed(self, c: PlainChunk) -> list[dict[str, Any]]:
        """Consume one engine chunk of one choice; return the stream chunks it produces."""
        if self.first_token_s is None and c.text:
            self.first_token_s = time.monotonic() - self.t0
            self.metrics.ttft.observe(self.first_token_s)
        st = self.choices[c.index]
        out: list[dict[str, Any]] = []
        if not st.started:
            st.started = True
            out.append(self._chunk([self._choice(st.index, {"role": "assistant", "content": ""})]))
        reasoning = self._split(st, c.text, c.finished)
        st.reasoning += reasoning
        st.completion_tokens = c.completion_tokens
        entries = self._entries(c)
        if entries:
            st.logprobs += entries
        text = self._new_content(st, False)
        st.content += text
        if text or entries or reasoning:
            delta = {**(self._reasoning(reasoning) if reasoning else {}), **({"content": text} if text else {})}
            out.append(self._chunk([self._choice(st.index, delta, entries)]))
        if not c.finished:
            return out
        content, calls = self._calls(st)
        rest = content[len(st.content) :] if content.startswith(st.content) else ""
        if rest:
            st.content += rest
            out.append(self._chunk([self._choice(st.index, {"content": rest})]))
        if calls:
            st.tool_calls = [
                {
                    "index": i,
                    "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
                for i, (name, arguments) in enumerate(calls)
            ]
            out.append(self._chunk([self._choice(st.index, {"tool_calls": st.tool_calls})]))
        # as OpenAI (and vLLM): `tool_calls` when the model chose to call (auto, required), `stop` for a named function
        named = isinstance(self.tool_choice, Mapping)
        finish = "tool_calls" if calls and not named and c.finish_reason == "stop" else c.finish_reason or "stop"
        st.final = {"finish_reason": finish}
        out.append(self._chunk([self._choice(st.index, {}, None, finish)]))
        if all(s.final for s in self.choices):
            self.metrics.generated_tokens.inc(self.generated_tokens())
        return out

    def _message(self, st: ChatChoiceState) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": st.content if st.content or not st.tool_calls else None,
            "refusal": None,
        }
        if self.reasoning_model:
            message.update(self._reasoning(st.reasoning))
        if st.tool_calls:
            message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in st.tool_calls]
        return message

    def response(self) -> dict[str, Any]:
        """The non-stream body: the same content, logprobs and calls the stream sends, accumulated."""
        choices = [
            {
                "index": st.index,
                "message": self._message(st),
                "logprobs": {"content": st.logprobs, "refusal": None} if self.top_logprobs is not None else None,
                "finish_reason": (st.final or {}).get("finish_reason"),
            }
            for st in self.choices
        ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def trace(self, request_summary: dict[str, Any]) -> dict[str, Any]:
        """The stored trace: the request summary, timings and each choice's message."""
        return {
            **trace_head(self.id, self.created, self.model, request_summary, self.first_token_s, self.t0),
            "choices": [
                {"index": st.index, "text": st.raw, "message": self._message(st), **(st.final or {})}
                for st in self.choices
            ],
        }
