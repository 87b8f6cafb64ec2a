"""Chat and completions through the THOR engine: its typed events as OpenAI responses, stream chunks and traces.

Owns: one `ThorBuilder` per request that consumes `thor_engine.events` and
produces (a) SSE chunks for `/v1/chat/completions` and `/v1/completions`, (b) the
non-stream response body, (c) the `thor` extension object (tool calls, backtracks,
answers, vote), and (d) the trace stored for `GET /v1/traces/{id}`, while keeping
the server's metrics. Finish reasons are mapped onto OpenAI's enum
(`stop`/`length`); THOR's own reason is kept in `thor.finish_reason`.

The one rule for the message fields, streamed or not:
- a plain client (one that ignores `thor` events) never sees text that
  self-correction later takes back: text that a backtrack may still retract is
  held back until its tool call is committed (or nothing can retract it any more);
- with THOR tools on, `content` is the answer: the model's text after the last
  tool output (and outside `<think>`), without leading whitespace; everything
  else the model wrote, the code and the tool outputs go to the reasoning field
  (`<think>` tags themselves go nowhere);
- without tools, a non-reasoning model's text is `content` as it comes, and a
  reasoning model's text is split at its think tags;
- completions put the whole trajectory in `text`;
- chat with THOR on and client function `tools` (tool_choice auto): the turn ends where
  the model closes a call to a client function (`</tool_call>` is a stop string); the
  calls its answer ends with become `tool_calls` (finish_reason `tool_calls`), sent whole
  when the trajectory ends, and their text leaves `content`. Only a call the model
  completed (the trajectory ended as the model's own stop, not cut by max_tokens or the
  context) to a function the request offered is a call; otherwise its text stays `content`.
- a structured request (a JSON format or a forced call, thor_engine/final_answer.py): `content`
  is only the constrained answer, streamed as generated (a forced call's JSON becomes
  `tool_calls` at the end, finish_reason `tool_calls`, or `stop` for a named function);
  everything before it, the instruction included, is reasoning; a request cut before its
  answer has no content (finish_reason `length`).
The non-stream body is built from exactly the deltas the stream sends, so
concatenating a stream's deltas gives the non-stream message, field by field.

Does not own: HTTP plumbing (api_server.py) or anything about tokens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from server.metrics import ServerMetrics
from server.thor.records import backtrack_record, call_record, result_record, retract, trace_head, trajectory_record
from thor_engine.events import Backtrack, CodeBlock, Event, Final, FinishReason, TextDelta, ToolCall, Vote
from thor_engine.function_calls import TOOL_CALL_START, FunctionCallParser, forced_calls

#: THOR's finish reasons onto OpenAI's enum (chat and completions share stop/length).
OPENAI_FINISH = {
    FinishReason.stop: "stop",
    FinishReason.length: "length",
    FinishReason.context_length: "length",
    FinishReason.generation_cap: "length",
    FinishReason.tool_budget: "stop",
    FinishReason.tool_error: "stop",
    FinishReason.tool_executed: "stop",
    FinishReason.repetition: "length",  # cut short like max_tokens (thor.finish_reason says why)
    FinishReason.aborted: "stop",
}


@dataclass
class _Piece:
    text: str
    field: Literal["reasoning", "content"]


@dataclass
class ChoiceState:
    index: int
    reasoning: str = ""  # released reasoning text
    content: str = ""  # released answer (chat) or text (completions)
    pending: list[_Piece] = field(default_factory=list)  # held back: a backtrack may still take it
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    backtracks: list[dict[str, Any]] = field(default_factory=list)
    final: Final | None = None
    started: bool = False
    function_calls: list[dict[str, Any]] = field(default_factory=list)  # calls to the client's functions
    constrained: bool = False  # the constrained final answer has begun


class ThorBuilder:
    def __init__(
        self,
        *,
        kind: Literal["chat", "completion"],
        response_id: str,
        model: str,
        n: int,
        reasoning_fields: str,
        tools_enabled: bool,
        reasoning_model: bool,
        metrics: ServerMetrics,
        include_usage: bool = False,
        function_calls: FunctionCallParser | None = None,
        function_names: Collection[str] = (),
        forced_choice: str | Mapping[str, Any] | None = None,
        structured: bool = False,
    ) -> None:
        self.kind, self.id, self.model = kind, response_id, model
        #: chat with THOR on and client functions (tool_choice auto): the answer's calls, parsed at the end
        self.function_calls = function_calls
        #: the functions the request offered: a call to any other is no call
        self.function_names = frozenset(function_names)
        #: a forced call (tool_choice "required" or a named function): the constrained answer is the call
        self.forced_choice = forced_choice
        #: a constrained final answer was asked for: only its text is content; without it, all is reasoning
        self.structured = structured
        self.created = int(time.time())
        self.choices = [ChoiceState(i) for i in range(n)]
        self.reasoning_fields = reasoning_fields
        self.tools_enabled = tools_enabled
        self.reasoning_model = reasoning_model
        self.metrics = metrics
        # OpenAI sends `"usage": null` on every chunk of a stream that asked for usage
        self.include_usage = include_usage
        self.vote: Vote | None = None
        self.t0 = time.monotonic()
        self.first_token_s: float | None = None

    # --- field helpers ------------------------------------------------------------------

    def _reasoning(self, text: str) -> dict[str, str]:
        if self.reasoning_fields == "both":
            return {"reasoning": text, "reasoning_content": text}
        return {self.reasoning_fields: text}

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return chunk

    def _chat_choice(self, index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _completion_choice(
        self, index: int, text: str, finish: str | None = None, stop_reason: Any = None, thor: dict | None = None
    ) -> dict[str, Any]:
        c: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": stop_reason,
        }
        if thor is not None:
            c["thor"] = thor
        return c

    # --- which field text goes to, and when ----------------------------------------------

    def _field(self, ev: TextDelta) -> Literal["reasoning", "content"] | None:
        if self.kind == "completion":
            return "content"
        if ev.markup:
            return None
        if ev.source != "model" or ev.channel == "reasoning":
            return "reasoning"
        return "content"

    def _hold(self, ev: TextDelta, target: str | None) -> bool:
        """Must this text wait (for a commit, or for the end) before a plain client sees it?"""
        if ev.retractable:
            return True
        if ev.constrained:  # the answer as generated; a forced call's JSON waits to become tool_calls
            return self.forced_choice is not None
        # with tools on, model text of the current round becomes reasoning if a code block follows
        return self.kind == "chat" and self.tools_enabled and target == "content"

    def _release(self, st: ChoiceState, *, final: bool) -> list[dict[str, Any]]:
        """Send what is held. Before a commit, the round's answer text is reasoning after all."""
        out: list[dict[str, Any]] = []
        for piece in st.pending:
            target = piece.field if final else "reasoning" if self.kind == "chat" else piece.field
            out.extend(self._send(st, piece.text, target))
        st.pending.clear()
        return out

    def _send(self, st: ChoiceState, text: str, target: str) -> list[dict[str, Any]]:
        if target == "content" and self.kind == "chat" and not st.content:
            text = text.lstrip()  # the answer starts at its first visible character
        if not text:
            return []
        if target == "content":
            st.content += text
            if self.kind == "chat":
                return [self._chunk([self._chat_choice(st.index, {"content": text})])]
            return [self._chunk([self._completion_choice(st.index, text)])]
        st.reasoning += text
        return [self._chunk([self._chat_choice(st.index, self._reasoning(text))])]

    # --- streaming ------------------------------------------------------------------------

    def feed(self, ev: Event) -> list[dict[str, Any]]:
        """Consume one event; return the stream chunks it produces (possibly none)."""
        if isinstance(ev, Vote):
            self.vote = ev
            return [self._chunk([], thor={"type": "vote", "answer": ev.answer, "counts": ev.counts})]
        st = self.choices[ev.sample]
        out: list[dict[str, Any]] = []
        if self.kind == "chat" and not st.started:
            st.started = True
            out.append(self._chunk([self._chat_choice(st.index, {"role": "assistant", "content": ""})]))
        if isinstance(ev, TextDelta):
            st.constrained = st.constrained or ev.constrained
            if self.first_token_s is None:
                self.first_token_s = time.monotonic() - self.t0
                self.metrics.ttft.observe(self.first_token_s)
            target = self._field(ev)
            if ev.source != "model":  # an observation or injected text: a commit point
                out.extend(self._release(st, final=False))
            if target is None:
                return out
            if self._hold(ev, target):
                st.pending.append(_Piece(ev.text, target))
                return out
            # final text that need not wait: whatever was held before it is final too
            out.extend(self._release(st, final=False))
            out.extend(self._send(st, ev.text, target))
            return out
        if isinstance(ev, Backtrack):
            retract(st.pending, ev.chars_retracted)
        thor = self._thor_event(st, ev)
        if isinstance(ev, ToolCall) and ev.committed:
            out.extend(self._release(st, final=False))
        if thor is not None:
            if self.kind == "chat":
                out.append(self._chunk([self._chat_choice(st.index, {"thor": thor})]))
            else:
                out.append(self._chunk([self._completion_choice(st.index, "", thor=thor)]))
        if isinstance(ev, Final):
            calls = self._client_calls(st, ev)
            # a structured request that ended before its answer (cut, or a client call): its text is reasoning
            out.extend(self._release(st, final=bool(calls) or st.constrained or not self.structured))
            if calls:
                st.function_calls = calls
                out.append(self._chunk([self._chat_choice(st.index, {"tool_calls": calls})]))
            out.extend(self._finish(st, ev))
        return out

    def _client_calls(self, st: ChoiceState, ev: Final) -> list[dict[str, Any]]:
        """The calls to client functions the held answer ends with (its text is taken out of it):
        only calls the model completed (it stopped by itself: a call cut by max_tokens or the
        context is unfinished, however well its text parses) to functions the request offered.
        A forced call is the whole constrained answer (vLLM's JSON for `tool_choice`)."""
        if ev.finish_reason != FinishReason.stop:
            return []
        answer = "".join(p.text for p in st.pending if p.field == "content")
        if self.forced_choice is not None:
            calls = forced_calls(answer, self.forced_choice)
            if not calls:
                return []
            retract(st.pending, len(answer))
        else:
            if self.function_calls is None:
                return []
            start = answer.find(TOOL_CALL_START)
            if start < 0:
                return []
            _, calls = self.function_calls.parse(answer[start:])
            if not calls or any(name not in self.function_names for name, _ in calls):
                return []  # no call parses, or one names a function not offered: the text stays the answer
            retract(st.pending, len(answer) - len(answer[:start].rstrip()))  # the call and the space before it
        return [
            {
                "index": i,
                "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            for i, (name, arguments) in enumerate(calls)
        ]

    def _thor_event(self, st: ChoiceState, ev: Event) -> dict[str, Any] | None:
        if isinstance(ev, CodeBlock):
            st.tool_calls.append(call_record(ev))
            return {"type": "tool_call", **call_record(ev)}
        if isinstance(ev, ToolCall):
            self.metrics.count_tool_result(ev)
            result = result_record(ev)
            for call in reversed(st.tool_calls):
                if call["execution"] == ev.execution:
                    call.update(result)
                    break
            return {"type": "tool_result", "call": ev.call, "attempt": ev.attempt, "execution": ev.execution, **result}
        if isinstance(ev, Backtrack):
            self.metrics.backtracks.inc()
            bt = backtrack_record(ev)
            st.backtracks.append(bt)
            return {"type": "backtrack", **bt}
        if isinstance(ev, Final):
            return {
                "type": "answer",
                "answer": ev.answer,
                "finish_reason": ev.finish_reason.value,
                "usage": ev.usage.model_dump(),
                "tools": ev.tools.model_dump(),
            }
        return None

    def _finish(self, st: ChoiceState, ev: Final) -> list[dict[str, Any]]:
        st.final = ev
        self.metrics.count_trajectory(ev)
        finish = self._finish_reason(st, ev)
        if self.kind == "chat":
            return [self._chunk([self._chat_choice(st.index, {}, finish)])]
        # the THOR loop does not report which user stop string ended it: stop_reason stays null
        return [self._chunk([self._completion_choice(st.index, "", finish, None)])]

    def _finish_reason(self, st: ChoiceState, ev: Final) -> str:
        # as OpenAI (and vLLM): `tool_calls` when the model chose to call (auto, required), `stop` for a named function
        if st.function_calls and not isinstance(self.forced_choice, Mapping):
            return "tool_calls"
        return OPENAI_FINISH[ev.finish_reason]

    def usage(self) -> dict[str, Any]:
        done = [c.final for c in self.choices if c.final]
        prompt = max((f.usage.prompt_tokens for f in done), default=0)
        completion = sum(f.usage.completion_tokens for f in done)
        cached = max((f.usage.prompt_cached_tokens for f in done), default=0)
        reasoning = sum(f.usage.completion_tokens - f.usage.answer_tokens - f.usage.observation_tokens for f in done)
        observation = sum(f.usage.observation_tokens for f in done)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning if (self.tools_enabled or self.reasoning_model) else 0,
                "observation_tokens": observation,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
                "audio_tokens": 0,
            },
        }

    def generated_tokens(self) -> int:
        """Tokens the engine generated for this request (discarded ones included): what rate limits charge."""
        return sum(c.final.usage.generated_tokens for c in self.choices if c.final)

    def usage_chunk(self) -> dict[str, Any]:
        return self._chunk([], usage=self.usage())

    # --- non-stream ---------------------------------------------------------------------

    def thor_object(self) -> dict[str, Any]:
        choices = []
        for st in self.choices:
            choices.append({"index": st.index, **trajectory_record(st.final, st.tool_calls, st.backtracks)})
        obj: dict[str, Any] = {"trace_id": self.id, "choices": choices}
        if self.vote is not None:
            obj["vote"] = {"answer": self.vote.answer, "counts": self.vote.counts}
        return obj

    def response(self) -> dict[str, Any]:
        """The non-stream body: the same released text the stream sends, accumulated."""
        choices = []
        for st in self.choices:
            assert st.final is not None
            finish = self._finish_reason(st, st.final)
            if self.kind == "chat":
                content = st.content if st.content or not st.function_calls else None
                message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
                if st.reasoning or self.tools_enabled or self.reasoning_model:
                    message.update(self._reasoning(st.reasoning))
                if st.function_calls:
                    message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in st.function_calls]
                choices.append({"index": st.index, "message": message, "logprobs": None, "finish_reason": finish})
            else:
                choices.append(
                    {
                        "index": st.index,
                        "text": st.content,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    }
                )
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
            "thor": self.thor_object(),
        }

    def trace(self, request_summary: dict[str, Any]) -> dict[str, Any]:
        return {
            **trace_head(self.id, self.created, self.model, request_summary, self.first_token_s, self.t0),
            "choices": [
                {
                    **c,
                    "text": st.final.text if st.final else None,
                    "trajectory": st.final.trajectory if st.final else None,
                }
                for c, st in zip(self.thor_object()["choices"], self.choices, strict=True)
            ],
            "vote": self.thor_object().get("vote"),
        }
