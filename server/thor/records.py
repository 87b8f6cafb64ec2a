"""What the THOR response builders keep of a trajectory's tool events, and the text they hold.

Owns: the records of a code block (`call_record`), its result (`result_record`), a
self-correction backtrack (`backtrack_record`) and a finished trajectory (`trajectory_record`),
the head of a stored trace (`trace_head`), as the `thor` objects, stream events and traces
of chat, completions (thor/builder.py) and the Responses API (responses/builder.py) show them, and
`retract`: taking the last characters of held text back when a backtrack discards them.
Does not own: when text is held or released (the builders) or the events (thor_engine.events).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from thor_engine.events import Backtrack, CodeBlock, Final, ToolCall


class HeldText(Protocol):
    text: str


def call_record(ev: CodeBlock) -> dict[str, Any]:
    return {"call": ev.call, "attempt": ev.attempt, "execution": ev.execution, "language": ev.language, "code": ev.code}


def result_record(ev: ToolCall) -> dict[str, Any]:
    return {
        "ok": ev.ok,
        "outcome": ev.outcome,
        "exit_code": ev.exit_code,
        "stdout": ev.stdout,
        "stderr": ev.stderr,
        "observation": ev.observation,
        "duration_s": round(ev.duration_s, 6),
        "cached": ev.cached,
        "committed": ev.committed,
    }


def backtrack_record(ev: Backtrack) -> dict[str, Any]:
    return {
        "call": ev.call,
        "attempt": ev.attempt,
        "reason": ev.reason,
        "mode": ev.mode,
        "tokens_dropped": ev.tokens_dropped,
        "chars_retracted": ev.chars_retracted,
    }


def trajectory_record(
    final: Final | None, tool_calls: list[dict[str, Any]], backtracks: list[dict[str, Any]]
) -> dict[str, Any]:
    """A trajectory's entry in the `thor` object: its answer, THOR's finish reason, every call
    (discarded attempts included), the backtracks, and THOR's detailed usage and tool statistics."""
    return {
        "answer": final.answer if final else None,
        "finish_reason": final.finish_reason.value if final else None,
        "tool_calls": tool_calls,
        "backtracks": backtracks,
        "usage": final.usage.model_dump() if final else None,
        "tools": final.tools.model_dump() if final else None,
    }


def trace_head(
    trace_id: str, created: int, model: str, request_summary: dict[str, Any], first_token_s: float | None, t0: float
) -> dict[str, Any]:
    """The fields every stored trace starts with: who, when, the request, and its timings."""
    return {
        "id": trace_id,
        "object": "thor.trace",
        "created": created,
        "model": model,
        "request": request_summary,
        "timings": {"time_to_first_token_s": first_token_s, "total_s": time.monotonic() - t0},
    }


def retract(pending: list[Any], chars: int) -> None:
    """Take back the last `chars` characters of the held pieces (`.text`); text already sent is
    never retracted: the decoder marks all text a backtrack may take, so more is a bug."""
    while chars > 0 and pending:
        last: HeldText = pending[-1]
        if len(last.text) <= chars:
            chars -= len(last.text)
            pending.pop()
        else:
            last.text = last.text[: len(last.text) - chars]
            chars = 0
    if chars > 0:
        raise RuntimeError(f"backtrack retracts {chars} characters already sent to the client")
