"""Turning the engine's typed events into a Responses API response: output items and stream events.

Owns: `ResponsesBuilder`, one per `POST /v1/responses`, with the interface streaming.respond
needs (`feed`, `response`, `generated_tokens`, `trace`, `choices`) plus the stream's opening
events and its error event. It produces, in order, the output items OpenAI's Responses API
defines for server-side code execution:
- `reasoning` items: the model's text between tool calls (and inside <think>: those are
  marked `encrypted_content: THINKING`, so a later turn puts them back inside <think>);
- one `code_interpreter_call` per committed call: its code, its output as `logs` (the
  observation the model read), status `completed`, `failed` (the code failed; no
  `.completed` event) or `incomplete` (not run: the tool budget was spent; never
  `.interpreting`, which waits for the end of the batch of engine events that holds the call);
- the `message` with the answer: the model's text after the last tool output; for a
  `text.format` of JSON, only the constrained answer generated after the loop
  (thor_engine/final_answer.py), streamed live, everything before it reasoning (no message
  when the response ended before its answer).
Stream events follow OpenAI's published sequence (`response.created`, `.in_progress`,
`output_item.added`, `content_part.added`, `reasoning_text.delta`/`.done`,
`code_interpreter_call.in_progress`, `_code.delta`/`.done`, `.interpreting`, `.completed`,
`output_text.delta`/`.done`, `content_part.done`, `output_item.done`, then
`response.completed` or `response.incomplete`; on a failure `error` then `response.failed`,
and an engine abort is `response.failed` too, never a completed response), numbered by
`sequence_number`; the final response is built from exactly the items the stream sent.

The one rule, as for chat (thor/builder.py): a client never sees what self-correction takes
back. Text a backtrack may still retract is held until its tool call is committed; a
discarded attempt never becomes an item (it is kept in `thor.tool_calls` and the trace).
With the code interpreter on, a round's text is held until it is known to be reasoning (a
code block opens) or the answer (the trajectory ends). Text nothing can retract any more
(self-correction off or spent) streams live: the prose the moment a fence opens, the code as
the model writes it; the call is `interpreting` while the sandbox runs and its output is sent
the moment the sandbox returns. A trajectory cut inside a code block leaves that call
`incomplete` (never run, no outputs).

Does not own: the request (responses/protocol.py), HTTP and SSE framing (streaming.py),
storage, or anything about tokens.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from server.errors import ApiError
from server.metrics import ServerMetrics
from server.responses.protocol import CONTAINER_ID, THINKING, items_to_messages
from server.thor.records import backtrack_record, call_record, result_record, retract, trace_head, trajectory_record
from thor_engine.codeblocks import find_blocks, is_code_language
from thor_engine.events import Backtrack, CodeBlock, Event, Final, FinishReason, TextDelta, ToolCall, Vote

#: finish reasons that leave a response `incomplete` (OpenAI: max_output_tokens; thor.finish_reason says which)
INCOMPLETE = {FinishReason.length, FinishReason.context_length, FinishReason.generation_cap, FinishReason.repetition}
#: the `error.message` of a response whose generation the engine aborted (status `failed`)
ABORTED_MESSAGE = "the engine aborted the generation before it finished; retry the request"
#: OpenAI's `ResponseErrorCode` values this server can report; anything else is a `server_error`
_ERROR_CODES = frozenset({"server_error", "rate_limit_exceeded", "invalid_prompt"})


def _error_code(code: str | None) -> str:
    return code if code in _ERROR_CODES else "server_error"


def _thinking_mark(kind: ItemKind) -> dict[str, str]:
    """A thinking item carries `THINKING` as its opaque `encrypted_content` (OpenAI's field for the
    reasoning state a later turn needs): sent back as input, its text goes inside <think> again."""
    return {"encrypted_content": THINKING} if kind == "thinking" else {}


#: "thinking" is a reasoning item of text inside <think> (marked with `THINKING`), "reasoning" one of
#: the prose before a code block outside it
ItemKind = Literal["thinking", "reasoning", "message"]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _Piece:
    text: str
    channel: Literal["reasoning", "answer"]
    retractable: bool


@dataclass
class _Open:
    """The reasoning or message item being streamed."""

    kind: ItemKind
    index: int
    id: str
    text: str = ""


@dataclass
class _Call:
    """A code interpreter call sent to the client, waiting for its result."""

    index: int
    id: str
    code: str


@dataclass
class _Choice:
    final: Final | None = None


@dataclass
class ResponsesBuilder:
    response_id: str
    model: str
    #: the request's settings the response object echoes (instructions, tools, temperature...)
    params: dict[str, Any]
    tools_enabled: bool
    reasoning_model: bool
    metrics: ServerMetrics
    #: the conversation so far (earlier turns and this input, as chat messages): what is stored
    conversation: list[dict[str, str]] = field(default_factory=list)
    #: this request's input items (what `GET /v1/responses/{id}/input_items` lists)
    input_items: list[dict[str, Any]] = field(default_factory=list)
    #: the fence info strings the engine runs (ThorConfig.code_languages)
    code_languages: tuple[str, ...] = ("python", "py")
    include_usage: bool = False  # the Responses API carries usage in its final event only
    #: `text.format` asked for JSON: the message is only the constrained answer, the rest reasoning
    structured: bool = False

    def __post_init__(self) -> None:
        self.id = self.response_id
        self.created = int(time.time())
        self.choices = [_Choice()]
        self.output: list[dict[str, Any]] = []
        self.seq = 0
        self.t0 = time.monotonic()
        self.first_token_s: float | None = None
        self.completed_at: int | None = None
        self._open: _Open | None = None
        self._call: _Call | None = None
        self._block: CodeBlock | None = None
        self._pending: list[_Piece] = []
        self._prose_sent = 0  # characters of the round's held text already sent as reasoning
        self._code_sent = ""  # code of the open call already sent as deltas (a call streamed live)
        self.attempts: list[dict[str, Any]] = []  # every code block run, discarded attempts included
        self.backtracks: list[dict[str, Any]] = []
        self._failure: dict[str, str] | None = None  # the response's `error` when it failed
        self._interpreting: dict[str, Any] = {}  # the open call whose `interpreting` event waits
        self._answered = False  # the constrained answer has begun (a structured request)

    # --- events -------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return ev

    def opening(self) -> list[dict[str, Any]]:
        """`response.created` and `response.in_progress`: sent before the engine's first event."""
        snapshot = self.response(status="in_progress")
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def failure_events(self, err: ApiError) -> list[dict[str, Any]]:
        """A stream that fails after it started: the open item closed `incomplete`, OpenAI's `error`
        event, then `response.failed` (the response with status `failed` and its `error`), so
        the SDK's stream helpers end on a failed response, never on a silently cut stream."""
        self._failure = {"code": _error_code(err.code), "message": err.message}
        closed = self._close_open("incomplete")
        return [
            *closed,
            self._event("error", code=err.code or err.type, message=err.message, param=err.param),
            self._event("response.failed", response=self.response()),
        ]

    # --- items --------------------------------------------------------------------------------

    def _open_item(self, kind: ItemKind) -> list[dict[str, Any]]:
        index = len(self.output)
        if kind != "message":
            item: dict[str, Any] = {
                "id": _new_id("rs"),
                "type": "reasoning",
                "summary": [],
                "content": [],
                **_thinking_mark(kind),
                "status": "in_progress",
            }
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            item = {
                "id": _new_id("msg"),
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.output.append(item)
        self._open = _Open(kind, index, item["id"])
        return [
            self._event("response.output_item.added", output_index=index, item=dict(item)),
            self._event(
                "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
            ),
        ]

    def _text(self, kind: ItemKind, text: str) -> list[dict[str, Any]]:
        """Send `text` into the open item of `kind` (closing another kind first)."""
        out: list[dict[str, Any]] = []
        if self._open is None or self._open.kind != kind:
            if kind == "message":
                text = text.lstrip()  # the answer starts at its first visible character
            if not text:
                return out
            out += self._close_open()
            out += self._open_item(kind)
        if not text:
            return out
        o = self._open
        assert o is not None
        o.text += text
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        out.append(self._event(name, item_id=o.id, output_index=o.index, content_index=0, delta=text, **extra))
        return out

    def _close_open(self, status: str = "completed") -> list[dict[str, Any]]:
        o, self._open = self._open, None
        if o is None:
            return []
        if o.kind != "message":
            part: dict[str, Any] = {"type": "reasoning_text", "text": o.text}
            item: dict[str, Any] = {
                "id": o.id,
                "type": "reasoning",
                "summary": [],
                "content": [part],
                **_thinking_mark(o.kind),
                "status": status,
            }
            done = self._event(
                "response.reasoning_text.done", item_id=o.id, output_index=o.index, content_index=0, text=o.text
            )
        else:
            part = {"type": "output_text", "text": o.text, "annotations": [], "logprobs": []}
            item = {"id": o.id, "type": "message", "role": "assistant", "status": status, "content": [part]}
            done = self._event(
                "response.output_text.done",
                item_id=o.id,
                output_index=o.index,
                content_index=0,
                text=o.text,
                logprobs=[],
            )
        self.output[o.index] = item
        return [
            done,
            self._event("response.content_part.done", item_id=o.id, output_index=o.index, content_index=0, part=part),
            self._event("response.output_item.done", output_index=o.index, item=item),
        ]

    def _open_call(self) -> list[dict[str, Any]]:
        out = self._close_open()
        index = len(self.output)
        item = {
            "id": _new_id("ci"),
            "type": "code_interpreter_call",
            "status": "in_progress",
            "container_id": CONTAINER_ID,
            "code": "",
            "outputs": None,
        }
        self.output.append(item)
        self._call = _Call(index, item["id"], "")
        self._code_sent = ""
        return [
            *out,
            self._event("response.output_item.added", output_index=index, item=dict(item)),
            self._event("response.code_interpreter_call.in_progress", output_index=index, item_id=item["id"]),
        ]

    def _code_delta(self, delta: str) -> list[dict[str, Any]]:
        assert self._call is not None
        self._code_sent += delta
        ids = {"output_index": self._call.index, "item_id": self._call.id}
        return [self._event("response.code_interpreter_call_code.delta", **ids, delta=delta)] if delta else []

    def _start_call(self, block: CodeBlock) -> list[dict[str, Any]]:
        """The block closed and is about to run: its code is complete (after the deltas streamed
        live, if any), and the sandbox is interpreting it."""
        out = [] if self._call is not None else self._open_call()
        sent = self._code_sent
        out += self._code_delta(block.code[len(sent) :] if block.code.startswith(sent) else "")
        assert self._call is not None
        self._call.code = block.code
        ids = {"output_index": self._call.index, "item_id": self._call.id}
        # `interpreting` waits for the next event: a block the tool budget refuses is followed at once by
        # its `not_executed` result (the same batch of engine events), and was never interpreted
        self._interpreting = ids
        return [*out, self._event("response.code_interpreter_call_code.done", **ids, code=block.code)]

    def _finish_call(self, ev: ToolCall) -> list[dict[str, Any]]:
        call, self._call = self._call, None
        assert call is not None
        ran = ev.outcome != "not_executed"
        status = "completed" if ev.ok else "failed" if ran else "incomplete"
        out = self._flush_interpreting() if ran else []  # a refused call was never interpreted
        self._interpreting = {}
        item = {
            "id": call.id,
            "type": "code_interpreter_call",
            "status": status,
            "container_id": CONTAINER_ID,
            "code": call.code,
            "outputs": [{"type": "logs", "logs": ev.observation}],
        }
        self.output[call.index] = item
        ids = {"output_index": call.index, "item_id": call.id}
        if status == "completed":  # a failed or refused call ends with its item's status, never `completed`
            out.append(self._event("response.code_interpreter_call.completed", **ids))
        return [*out, self._event("response.output_item.done", output_index=call.index, item=item)]

    def _release_round(self, block: CodeBlock) -> list[dict[str, Any]]:
        """The round's held text is reasoning up to its code block's opening fence; then the call."""
        text = "".join(p.text for p in self._pending)
        blocks = find_blocks(text)
        out = self._prose(self._prose_sent, blocks[-1].start if blocks else len(text))
        self._pending.clear()
        self._prose_sent = 0
        return out + self._start_call(block)

    def _prose(self, start: int, end: int) -> list[dict[str, Any]]:
        """The held text from `start` to `end` as reasoning items: text inside <think> a thinking item,
        the rest a reasoning item (a new item where the channel changes)."""
        out: list[dict[str, Any]] = []
        at = 0
        for piece in self._pending:
            lo, hi = max(start, at), min(end, at + len(piece.text))
            if lo < hi:
                out += self._text(
                    "thinking" if piece.channel == "reasoning" else "reasoning", piece.text[lo - at : hi - at]
                )
            at += len(piece.text)
        return out

    def _stream_live(self) -> list[dict[str, Any]]:
        """Held text nothing can take back, with a code block open in it: the prose before the fence
        is reasoning (a call follows), and the code streams as it is written, but for a last line
        that may yet be the closing fence. An indented fence waits for its block (its code is
        dedented), and so does a closed one (the block event is next)."""
        text = "".join(p.text for p in self._pending)
        blocks = find_blocks(text)
        if not blocks or blocks[-1].closed or not is_code_language(blocks[-1].language, self.code_languages):
            return []
        block = blocks[-1]
        if text[block.start] != "`":
            return []
        out = self._prose(self._prose_sent, block.start)
        self._prose_sent = block.start
        first_line = text.find("\n", block.start)
        if first_line < 0:
            return out
        code = text[first_line + 1 :]
        tail = code[code.rfind("\n") + 1 :]
        if not tail.lstrip(" \t") or tail.lstrip(" \t").startswith("`"):
            code = code[: len(code) - len(tail)]  # a line that may yet be the closing fence waits
        if self._call is None:
            out += self._open_call()
        return out + self._code_delta(code[len(self._code_sent) :])

    def _release_final(self) -> list[dict[str, Any]]:
        """The trajectory ended: its held text is the answer (and reasoning inside <think>)."""
        if self._call is not None:  # it ended inside a code block streamed live: the call never ran
            return self._abandon_call()
        if self.structured:  # a structured request's answer is only its constrained text
            return self._release_reasoning()
        out: list[dict[str, Any]] = []
        skip, self._prose_sent = self._prose_sent, 0  # already sent as reasoning (a fence had opened)
        for piece in self._pending:
            text, skip = piece.text[skip:], max(0, skip - len(piece.text))
            out += self._text("thinking" if piece.channel == "reasoning" else "message", text)
        self._pending.clear()
        return out

    def _release_reasoning(self) -> list[dict[str, Any]]:
        """Held text that can only be reasoning now (a structured request's answer is generated apart)."""
        text_len = sum(len(p.text) for p in self._pending)
        out = self._prose(self._prose_sent, text_len)
        self._pending.clear()
        self._prose_sent = 0
        return out

    def _abandon_call(self) -> list[dict[str, Any]]:
        call = self._call
        assert call is not None
        text = "".join(p.text for p in self._pending)
        self._pending.clear()
        first_line = text.find("\n", self._prose_sent)
        self._prose_sent = 0
        code = text[first_line + 1 :] if first_line >= 0 else ""
        out = self._code_delta(code[len(self._code_sent) :] if code.startswith(self._code_sent) else "")
        self._call = None
        item = {
            "id": call.id,
            "type": "code_interpreter_call",
            "status": "incomplete",
            "container_id": CONTAINER_ID,
            "code": code,
            "outputs": None,
        }
        self.output[call.index] = item
        return [
            *out,
            self._event(
                "response.code_interpreter_call_code.done", output_index=call.index, item_id=call.id, code=code
            ),
            self._event("response.output_item.done", output_index=call.index, item=item),
        ]

    # --- the engine's events --------------------------------------------------------------------

    def feed(self, ev: Event) -> list[dict[str, Any]]:
        """Consume one engine event; return the stream events it produces (possibly none)."""
        if self._interpreting and not isinstance(ev, ToolCall):
            out = self._flush_interpreting()
            return out + self._feed(ev)
        return self._feed(ev)

    def end_batch(self) -> list[dict[str, Any]]:
        """The engine's events ready now are all fed: a call still waiting for its result runs in the
        sandbox (`interpreting`)."""
        return self._flush_interpreting()

    def _flush_interpreting(self) -> list[dict[str, Any]]:
        ids, self._interpreting = self._interpreting, {}
        return [self._event("response.code_interpreter_call.interpreting", **ids)] if ids else []

    def _feed(self, ev: Event) -> list[dict[str, Any]]:
        if isinstance(ev, Vote):
            return []
        if isinstance(ev, TextDelta):
            return self._feed_text(ev)
        if isinstance(ev, Backtrack):
            self.metrics.backtracks.inc()
            retract(self._pending, ev.chars_retracted)
            self._block = None
            self.backtracks.append(backtrack_record(ev))
            return []
        if isinstance(ev, CodeBlock):
            self._block = ev
            self.attempts.append(call_record(ev))
            if not any(p.retractable for p in self._pending):
                return self._release_round(ev)  # nothing can take it back: show it while it runs
            return []
        if isinstance(ev, ToolCall):
            return self._feed_result(ev)
        if isinstance(ev, Final):
            return self._finish(ev)
        return []

    def _feed_text(self, ev: TextDelta) -> list[dict[str, Any]]:
        if self.first_token_s is None:
            self.first_token_s = time.monotonic() - self.t0
            self.metrics.ttft.observe(self.first_token_s)
        if ev.markup or ev.source == "observation":  # an observation is its call's output, in the call's item
            return []
        if ev.constrained:  # the structured answer: what the loop left held is reasoning; the answer streams live
            out = [] if self._answered else self._release_reasoning()
            self._answered = True
            return out + self._text("message", ev.text)
        if not self.tools_enabled and not ev.retractable:
            return self._text("thinking" if ev.channel == "reasoning" else "message", ev.text)
        self._pending.append(_Piece(ev.text, ev.channel, ev.retractable))
        if any(p.retractable for p in self._pending):
            return []  # a backtrack may take it: held until its call is committed
        return self._stream_live()

    def _feed_result(self, ev: ToolCall) -> list[dict[str, Any]]:
        self.metrics.count_tool_result(ev)
        for attempt in reversed(self.attempts):
            if attempt["execution"] == ev.execution:
                attempt.update(result_record(ev))
                break
        if not ev.committed:
            return []  # self-correction discards it: a Backtrack follows
        out: list[dict[str, Any]] = []
        if self._call is None:
            assert self._block is not None, "a committed tool result without its code block"
            out += self._release_round(self._block)
        self._block = None
        return out + self._finish_call(ev)

    def _finish(self, ev: Final) -> list[dict[str, Any]]:
        self.choices[0].final = ev
        self.completed_at = int(time.time())
        self.metrics.count_trajectory(ev)
        if ev.finish_reason == FinishReason.aborted:  # the engine dropped the request: not an answer
            self._failure = {"code": "server_error", "message": ABORTED_MESSAGE}
        status = self._status()
        out = self._release_final() + self._close_open("completed" if status == "completed" else "incomplete")
        return [*out, self._event(f"response.{status}", response=self.response())]

    def _status(self) -> Literal["completed", "incomplete", "failed"]:
        f = self.choices[0].final
        if self._failure is not None:
            return "failed"
        return "incomplete" if f is not None and f.finish_reason in INCOMPLETE else "completed"

    # --- the response object --------------------------------------------------------------------

    def usage(self) -> dict[str, Any] | None:
        f = self.choices[0].final
        if f is None:
            return None
        u = f.usage
        reasoning = u.completion_tokens - u.answer_tokens - u.observation_tokens
        return {
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": u.prompt_cached_tokens,
                "cache_write_tokens": u.prompt_tokens - u.prompt_cached_tokens,
            },
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {
                "reasoning_tokens": reasoning if (self.tools_enabled or self.reasoning_model) else 0,
                "observation_tokens": u.observation_tokens,
            },
            "total_tokens": u.prompt_tokens + u.completion_tokens,
        }

    def thor_object(self) -> dict[str, Any]:
        return {"trace_id": self.id, **trajectory_record(self.choices[0].final, self.attempts, self.backtracks)}

    def response(self, status: str | None = None) -> dict[str, Any]:
        """The response object: as the stream's last event carries it (`status` None), or a snapshot."""
        f = self.choices[0].final
        if status is None:
            status = self._status()
        done = status != "in_progress"
        body = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": self.completed_at if status in ("completed", "incomplete") else None,
            "error": self._failure if status == "failed" else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": self.model,
            "output": [dict(item) for item in self.output] if done else [],
            **self.params,
        }
        if done and f is not None:  # usage is not nullable in OpenAI's schema: only a finished trajectory has it
            body["usage"] = self.usage()
        if done:
            body["thor"] = self.thor_object()
        return body

    def generated_tokens(self) -> int:
        f = self.choices[0].final
        return f.usage.generated_tokens if f else 0

    def usage_chunk(self) -> dict[str, Any]:
        return {}  # never sent: usage is in response.completed

    def conversation_after(self) -> list[dict[str, str]]:
        """The conversation with this response's output appended: what `previous_response_id` continues."""
        return self.conversation + items_to_messages(self.output)

    def trace(self, request_summary: dict[str, Any]) -> dict[str, Any]:
        f = self.choices[0].final
        return {
            **trace_head(self.id, self.created, self.model, request_summary, self.first_token_s, self.t0),
            "text": f.text if f else None,
            "response": self.response(),
            "conversation": self.conversation_after(),
            "input_items": self.input_items,
        }
