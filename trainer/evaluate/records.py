"""The evaluation record: one JSON line per sample, and the run directory that holds them.

Owns: `SampleRecord` (everything one sample of one problem in one mode produced: the
prompt, the whole trajectory text, the extracted answer and its correctness, every tool
call with its outcome, usage and timings), its key for resuming, `RunSpec` (what a run
directory was made for, so `--resume` refuses to mix runs), and `RecordLog` (append-only
JSONL with a flush + fsync per record: a killed run loses at most the line being written,
and a torn last line is dropped on load).

Does not own: producing records (runner.py and targets.py), metrics (metrics.py) or
reports (report.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "RECORDS_FILE",
    "SPEC_FILE",
    "RecordKey",
    "RecordLog",
    "RunSpec",
    "SampleRecord",
    "ToolCallRecord",
    "ToolTotals",
    "UsageRecord",
    "append_jsonl",
    "load_jsonl",
]

T = TypeVar("T")

RECORDS_FILE = "records.jsonl"
SPEC_FILE = "run.json"

#: (benchmark, problem_id, mode, sample): what `--resume` uses to skip finished work.
RecordKey = tuple[str, str, str, int]


class ToolCallRecord(BaseModel):
    """One sandbox execution (retries are separate records with the same `call`)."""

    call: int
    attempt: int = 0
    language: str = "python"
    code: str
    ok: bool
    outcome: str = Field(description="ok, error, timeout, no_output, not_executed, sandbox_error, ...")
    committed: bool = Field(description="False when self-correction discarded this call and resampled.")
    observation: str = ""
    duration_s: float = 0.0


class ToolTotals(BaseModel):
    calls: int = 0
    ok: int = 0
    failed: int = 0
    backtracks: int = 0
    not_executed: int = 0
    duration_s: float = 0.0


class UsageRecord(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = Field(default=0, description="Tokens of the final trajectory after the prompt.")
    generated_tokens: int = Field(default=0, description="All tokens generated, discarded ones included.")
    discarded_tokens: int = 0
    observation_tokens: int = 0


class SampleRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    benchmark: str
    problem_id: str
    problem_index: int = Field(description="Row of the problem in its benchmark file (0-based).")
    mode: str
    sample: int = Field(description="0..k-1")
    model: str
    target: str = Field(description="in-process, thor-server, openai-completions or openai-chat")
    prompt: list[dict[str, Any]] = Field(
        description="The chat messages the model saw (THOR's tool instructions included where the mode uses them)."
    )
    text: str = Field(description="The whole completion: reasoning, code, outputs, answer.")
    answer: str | None = Field(description="The extracted final answer (last \\boxed{}), None if none.")
    gold: str
    correct: bool
    finish_reason: str
    tool_calls: list[ToolCallRecord] = []
    tools: ToolTotals = ToolTotals()
    usage: UsageRecord = UsageRecord()
    wall_s: float = Field(description="Seconds from submitting the sample to its last event.")
    error: str | None = Field(
        default=None, description="Set when the sample could not be generated (it then counts as wrong)."
    )

    @property
    def key(self) -> RecordKey:
        return (self.benchmark, self.problem_id, self.mode, self.sample)

    @property
    def executed_calls(self) -> list[ToolCallRecord]:
        """Calls that actually ran in the sandbox (refused blocks are not calls)."""
        return [c for c in self.tool_calls if c.outcome != "not_executed"]


class RunSpec(BaseModel):
    """What a run directory was made for; `--resume` requires the same spec."""

    model_config = ConfigDict(extra="forbid")

    model: str
    target: str
    benchmarks: list[str]
    modes: list[str]
    k: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    offset: int
    limit: int | None

    def differences(self, other: RunSpec) -> list[str]:
        mine, theirs = self.model_dump(), other.model_dump()
        return [f"{k}: {theirs[k]!r} there, {mine[k]!r} now" for k in mine if mine[k] != theirs[k]]


class RecordLog:
    """Append-only JSONL of SampleRecords in a run directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[SampleRecord]:
        """Every complete record; a torn last line (a run killed mid-write) is dropped and truncated away."""
        return load_jsonl(self.path, SampleRecord.model_validate_json)

    def append(self, record: SampleRecord) -> None:
        append_jsonl(self.path, record.model_dump_json())

    def __iter__(self) -> Iterator[SampleRecord]:
        return iter(self.load())


def load_jsonl(path: Path, parse: Callable[[bytes], T]) -> list[T]:
    """The complete lines of an append-only JSONL log, parsed; reading stops at a torn or unparsable line
    (a writer killed mid-write), which is truncated away so later appends start on a clean line."""
    if not path.exists():
        return []
    items: list[T] = []
    good_bytes = 0
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                items.append(parse(raw))
            except ValueError:
                break
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return items


def append_jsonl(path: Path, line: str) -> None:
    """Append one JSON line and fsync it: a finished item survives a kill."""
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temp file + rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
