"""Turning the engine's typed events into OpenAI responses, stream chunks and traces.

Owns: one `ResponseBuilder` per request that consumes `thor_engine.events` and
produces (a) SSE chunks for `/v1/chat/completions` and `/v1/completions`, (b) the
non-stream response body, (c) the `thor` extension object (tool calls, backtracks,
answers, vote), and (d) the trace stored for `GET /v1/traces/{id}`, while keeping
the server's metrics. Finish reasons are mapped onto OpenAI's enum
(`stop`/`length`); THOR's own reason is kept in `thor.finish_reason`.

Does not own: HTTP plumbing (app.py) or anything about tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from thor_engine.events import Backtrack, CodeBlock, Event, Final, FinishReason, TextDelta, ToolCall, Vote

from .metrics import ServerMetrics

OPENAI_FINISH = {
    FinishReason.stop: "stop",
    FinishReason.length: "length",
    FinishReason.context_length: "length",
    FinishReason.tool_budget: "stop",
    FinishReason.tool_error: "stop",
    FinishReason.aborted: "stop",
}


@dataclass
class ChoiceState:
    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    backtracks: list[dict[str, Any]] = field(default_factory=list)
    final: Final | None = None
    started: bool = False


class ResponseBuilder:
    def __init__(
        self, *, kind: Literal["chat", "completion"], response_id: str, model: str, n: int,
        reasoning_fields: str, tools_enabled: bool, reasoning_model: bool, metrics: ServerMetrics,
    ) -> None:
        self.kind, self.id, self.model = kind, response_id, model
        self.created = int(time.time())
        self.choices = [ChoiceState(i) for i in range(n)]
        self.reasoning_fields = reasoning_fields
        self.tools_enabled = tools_enabled
        self.reasoning_model = reasoning_model
        self.metrics = metrics
        self.vote: Vote | None = None
        self.t0 = time.monotonic()
        self.first_token_s: float | None = None

    # --- field helpers ------------------------------------------------------------------

    def _reasoning(self, text: str) -> dict[str, str]:
        if self.reasoning_fields == "both":
            return {"reasoning": text, "reasoning_content": text}
        return {self.reasoning_fields: text}

    def _text_channel(self, ev: TextDelta) -> str:
        if self.kind == "completion":
            return "content"
        if not self.tools_enabled and not self.reasoning_model:
            return "content"  # plain chat: the model's text is the answer
        return "content" if ev.channel == "answer" else "reasoning"

    # --- streaming ------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def _chat_choice(self, index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _completion_choice(self, index: int, text: str, finish: str | None = None, stop_reason: Any = None,
                           thor: dict | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                             "stop_reason": stop_reason}
        if thor is not None:
            c["thor"] = thor
        return c

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
            if self.first_token_s is None:
                self.first_token_s = time.monotonic() - self.t0
                self.metrics.ttft.observe(self.first_token_s)
            channel = self._text_channel(ev)
            if channel == "content":
                st.content += ev.text
                if self.kind == "chat":
                    out.append(self._chunk([self._chat_choice(st.index, {"content": ev.text})]))
                else:
                    out.append(self._chunk([self._completion_choice(st.index, ev.text)]))
            else:
                st.reasoning += ev.text
                out.append(self._chunk([self._chat_choice(st.index, self._reasoning(ev.text))]))
            return out
        thor = self._thor_event(st, ev)
        if thor is not None:
            if self.kind == "chat":
                out.append(self._chunk([self._chat_choice(st.index, {"thor": thor})]))
            else:
                out.append(self._chunk([self._completion_choice(st.index, "", thor=thor)]))
        if isinstance(ev, Final):
            out.extend(self._finish(st, ev))
        return out

    def _thor_event(self, st: ChoiceState, ev: Event) -> dict[str, Any] | None:
        if isinstance(ev, CodeBlock):
            st.tool_calls.append({"call": ev.call, "attempt": ev.attempt, "language": ev.language, "code": ev.code})
            return {"type": "tool_call", "call": ev.call, "attempt": ev.attempt, "language": ev.language,
                    "code": ev.code}
        if isinstance(ev, ToolCall):
            self.metrics.tool_calls.labels(outcome=ev.outcome if ev.ok or ev.outcome != "ok" else "no_output").inc()
            self.metrics.tool_duration.observe(ev.duration_s)
            result = {
                "ok": ev.ok, "outcome": ev.outcome, "exit_code": ev.exit_code, "stdout": ev.stdout,
                "stderr": ev.stderr, "observation": ev.observation, "duration_s": round(ev.duration_s, 6),
                "cached": ev.cached, "committed": ev.committed,
            }
            for call in reversed(st.tool_calls):
                if call["call"] == ev.call:
                    call.update(result)
                    break
            return {"type": "tool_result", "call": ev.call, "attempt": ev.attempt, **result}
        if isinstance(ev, Backtrack):
            self.metrics.backtracks.inc()
            bt = {"call": ev.call, "attempt": ev.attempt, "reason": ev.reason, "mode": ev.mode,
                  "tokens_dropped": ev.tokens_dropped, "chars_retracted": ev.chars_retracted}
            st.backtracks.append(bt)
            # the retracted characters were streamed on the reasoning channel
            if ev.chars_retracted:
                st.reasoning = st.reasoning[: max(0, len(st.reasoning) - ev.chars_retracted)]
            return {"type": "backtrack", **bt}
        if isinstance(ev, Final):
            return {"type": "answer", "answer": ev.answer, "finish_reason": ev.finish_reason.value,
                    "usage": ev.usage.model_dump(), "tools": ev.tools.model_dump()}
        return None

    def _finish(self, st: ChoiceState, ev: Final) -> list[dict[str, Any]]:
        st.final = ev
        u = ev.usage
        self.metrics.generated_tokens.inc(u.generated_tokens)
        self.metrics.discarded_tokens.inc(u.discarded_tokens)
        self.metrics.tool_rounds.observe(ev.tools.calls)
        finish = OPENAI_FINISH[ev.finish_reason]
        out = []
        if self.kind == "chat":
            # Non-reasoning THOR models stream their whole trace as reasoning; the answer (the
            # text after the last tool output) is then sent as content.
            if not st.content and self.tools_enabled and not self.reasoning_model and ev.answer_text:
                st.content = ev.answer_text
                out.append(self._chunk([self._chat_choice(st.index, {"content": ev.answer_text})]))
            out.append(self._chunk([self._chat_choice(st.index, {}, finish)]))
        else:
            # the THOR loop does not report which user stop string ended it: stop_reason stays null
            out.append(self._chunk([self._completion_choice(st.index, "", finish, None)]))
        return out

    def usage(self) -> dict[str, int]:
        prompt = max((c.final.usage.prompt_tokens for c in self.choices if c.final), default=0)
        completion = sum(c.final.usage.completion_tokens for c in self.choices if c.final)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict[str, Any]:
        return self._chunk([], usage=self.usage())

    # --- non-stream ---------------------------------------------------------------------

    def _split(self, st: ChoiceState) -> tuple[str, str]:
        """(reasoning trace, content) of a finished choice."""
        f = st.final
        assert f is not None
        if self.kind == "chat" and (not self.tools_enabled) and not self.reasoning_model:
            return "", f.text
        if self.reasoning_model and "</think>" in f.text:
            head, tail = f.text.rsplit("</think>", 1)
            return head.replace("<think>", "", 1).strip(), tail.strip()
        answer = f.answer_text
        idx = f.text.rfind(answer) if answer else len(f.text)
        return f.text[: idx if idx >= 0 else len(f.text)].rstrip(), answer

    def thor_object(self) -> dict[str, Any]:
        choices = []
        for st in self.choices:
            f = st.final
            choices.append({
                "index": st.index,
                "answer": f.answer if f else None,
                "finish_reason": f.finish_reason.value if f else None,
                "tool_calls": st.tool_calls,
                "backtracks": st.backtracks,
                "usage": f.usage.model_dump() if f else None,
                "tools": f.tools.model_dump() if f else None,
            })
        obj: dict[str, Any] = {"trace_id": self.id, "choices": choices}
        if self.vote is not None:
            obj["vote"] = {"answer": self.vote.answer, "counts": self.vote.counts}
        return obj

    def response(self) -> dict[str, Any]:
        if self.kind == "chat":
            choices = []
            for st in self.choices:
                assert st.final is not None
                reasoning, content = self._split(st)
                message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
                if reasoning or self.tools_enabled:
                    message.update(self._reasoning(reasoning))
                choices.append({"index": st.index, "message": message, "logprobs": None,
                                "finish_reason": OPENAI_FINISH[st.final.finish_reason]})
            obj = "chat.completion"
        else:
            choices = []
            for st in self.choices:
                assert st.final is not None
                choices.append({"index": st.index, "text": st.final.text, "logprobs": None,
                                "finish_reason": OPENAI_FINISH[st.final.finish_reason], "stop_reason": None})
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage(), "thor": self.thor_object()}

    def trace(self, request_summary: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id, "object": "thor.trace", "created": self.created, "model": self.model,
            "request": request_summary,
            "timings": {"time_to_first_token_s": self.first_token_s, "total_s": time.monotonic() - self.t0},
            "choices": [
                {**c, "text": st.final.text if st.final else None,
                 "trajectory": st.final.trajectory if st.final else None}
                for c, st in zip(self.thor_object()["choices"], self.choices)
            ],
            "vote": self.thor_object().get("vote"),
        }
