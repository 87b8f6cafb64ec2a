"""Typed events of a tool-integrated generation: the one interface for server and trainer.

Owns: the event types a trajectory emits while it runs, in order:
`TextDelta` (model text, tagged reasoning or answer), `CodeBlock` (a complete block
about to run), `ToolCall` (its result and observation), `Backtrack` (a failed call
discarded by self-correction), `Final` (answer, finish reason, usage, tool
statistics and the token-level trajectory), and `Vote` (majority over n samples).
Every event carries `sample` (0..n-1). All are pydantic models, so they serialise
to JSON as they are (`python -m thor_engine --json`).

Does not own: producing them (decoder.py) or presenting them (server/).
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, Field


class FinishReason(str, Enum):
    stop = "stop"  # the model ended (EOS or a user stop string)
    length = "length"  # max_tokens (new tokens over the whole trajectory) reached
    context_length = "context_length"  # the model's context window is full
    tool_budget = "tool_budget"  # a code block past max_tool_calls with on_tool_budget=stop
    tool_error = "tool_error"  # a committed failed call with stop_on_tool_error
    generation_cap = "generation_cap"  # max_generated_tokens (kept + discarded) reached
    tool_executed = "tool_executed"  # the first executed block ran, with stop_after_execution (no observation)
    repetition = "repetition"  # ThorConfig.repetition: the model's text ended in a loop (kept), cut short
    aborted = "aborted"  # the consumer went away


class _Event(BaseModel):
    sample: int = 0


class TextDelta(_Event):
    type: Literal["text"] = "text"
    text: str
    channel: Literal["reasoning", "answer"]
    source: Literal["model", "observation", "injected"] = Field(
        default="model", description="Who wrote it: the model, a tool output, or the decoder (e.g. a thinking cut)."
    )
    markup: bool = Field(
        default=False, description="A <think> or </think> tag: part of the text, not of either channel."
    )
    retractable: bool = Field(
        default=False,
        description="A later Backtrack may still take this text back (self-correction can still fire). Text "
        "before a committed ToolCall, and all text once this is False, is final.",
    )
    constrained: bool = Field(
        default=False,
        description="Text of the constrained final answer (thor_engine.final_answer): the answer a structured "
        "request asked for, generated after the loop; all other text of such a request is reasoning.",
    )


class CodeBlock(_Event):
    type: Literal["code"] = "code"
    call: int = Field(description="Index of this tool call in the trajectory (0-based); retries keep it.")
    attempt: int = Field(description="0 for a first try, k for the k-th resample after failures.")
    execution: int = Field(default=0, description="Index of this sandbox run in the trajectory (retries included).")
    language: str
    code: str
    fence_token: int = Field(
        description="Index, in the trajectory's token ids (prompt included: an index into Final.trajectory's "
        "ids), of the token holding the first backtick of this block's opening fence. The ids before it decode "
        "to the text before the fence."
    )


class ToolCall(_Event):
    type: Literal["tool_result"] = "tool_result"
    call: int
    attempt: int
    execution: int = 0
    ok: bool
    outcome: str
    exit_code: int | None
    stdout: str
    stderr: str
    observation: str
    duration_s: float
    cached: bool = False
    committed: bool = Field(description="False when self-correction discards this call and resamples.")


class Backtrack(_Event):
    type: Literal["backtrack"] = "backtrack"
    call: int
    attempt: int = Field(description="The resample about to start (1 = first retry).")
    reason: str
    mode: Literal["tokens", "step"]
    tokens_dropped: int
    chars_retracted: int = Field(description="Characters of already-streamed text this backtrack takes back.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(
        description="Tokens after the prompt in the final trajectory (model + observations)."
    )
    model_tokens: int
    answer_tokens: int = Field(
        default=0, description="Tokens of the answer text (Final.answer_text); the rest is reasoning."
    )
    observation_tokens: int
    injected_tokens: int
    discarded_tokens: int = Field(description="Generated tokens thrown away by backtracks.")
    generated_tokens: int = Field(description="All tokens the engine generated, discarded ones included.")
    prompt_cached_tokens: int = Field(
        default=0, description="Tokens of the request's prompt served from the prefix cache."
    )
    cached_prompt_tokens: int = Field(
        description="Prompt tokens of continuation requests served from the prefix cache."
    )
    prefilled_prompt_tokens: int = Field(description="Prompt tokens of continuation requests the engine prefilled.")
    engine_requests: int


class ToolStats(BaseModel):
    calls: int = 0
    ok: int = 0
    failed: int = 0
    committed: int = 0
    backtracks: int = 0
    not_executed: int = 0  # complete blocks refused with `not_executed_message` (budget spent, after a cut)
    duration_s: float = 0.0


class Final(_Event):
    type: Literal["final"] = "final"
    text: str = Field(description="The whole completion: reasoning, code, outputs, answer.")
    answer_text: str = Field(description="Text after the last tool output (or after </think>), leading space dropped.")
    answer: str | None = Field(
        description="Content of the last \\boxed{} in the answer text, else in the model's own text (never in a tool "
        "output)."
    )
    finish_reason: FinishReason
    usage: Usage
    tools: ToolStats
    trajectory: dict | None = Field(default=None, description="Token ids and segment kinds (Trajectory.to_dict()).")


class Vote(BaseModel):
    type: Literal["vote"] = "vote"
    answer: str | None
    counts: dict[str, int]


Event = TextDelta | CodeBlock | ToolCall | Backtrack | Final | Vote
