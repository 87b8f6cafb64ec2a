"""Running an evaluation: every (problem, mode, sample) through a target, scored, recorded.

Owns: the work list (problems x modes x samples, modes interleaved per problem so a
partial run still compares modes on the same problems), concurrent submission under a
cap (vLLM batches what is in flight; never one problem at a time), per-sample seeds
(reproducible sampling at temperature > 0), scoring with `thor_engine.answer` (math-verify
in killable workers), appending each record as it finishes (`RecordLog`), `--resume`
(finished samples are skipped; samples that errored are tried again), the progress bar with
running accuracy per mode, the run's timing log (`run.json`), and rescoring a finished run's
records with the current checker (`--report-only --rescore`, after a scoring fix).

Does not own: loading problems (benchmarks.py), the targets, metrics or reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thor_engine.answer import AnswerChecker
from thor_engine.config import SamplingOptions
from thor_engine.prompting import with_tir_instructions

from .benchmarks import Problem
from .modes import Mode
from .records import (
    RECORDS_FILE,
    SPEC_FILE,
    RecordKey,
    RecordLog,
    RunSpec,
    SampleRecord,
    write_json_atomic,
    write_text_atomic,
)
from .targets import Target, TargetError

__all__ = ["RunResult", "latest_records", "rescore", "run_evaluation", "sample_seed"]

log = logging.getLogger(__name__)


def sample_seed(seed: int, problem: Problem, mode: str, sample: int) -> int:
    """A per-sample seed, the same on every run and target (so a resumed sample is the same draw).

    The mode is left out on purpose: paired modes draw with the same seeds."""
    return (seed * 1_000_003 + problem.index * 1009 + sample * 7 + sum(map(ord, problem.benchmark))) % (2**31)


def latest_records(records: Sequence[SampleRecord]) -> list[SampleRecord]:
    """One record per key: the last written (a retried error replaces the error)."""
    by_key: dict[RecordKey, SampleRecord] = {}
    for r in records:
        by_key[r.key] = r
    return list(by_key.values())


@dataclass
class RunResult:
    records: list[SampleRecord]
    new: int
    skipped: int
    errors: int
    wall_s: float
    fatal: str | None = None
    timing: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Job:
    problem: Problem
    mode: Mode
    sample: int


class _Progress:
    """tqdm bar over samples with running Avg per mode in the postfix."""

    def __init__(self, total: int, done: list[SampleRecord], enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="sample", disable=not enabled, dynamic_ncols=True, smoothing=0.05)
        self.right: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        for r in done:
            self._count(r)

    def _count(self, r: SampleRecord) -> None:
        self.seen[r.mode] = self.seen.get(r.mode, 0) + 1
        self.right[r.mode] = self.right.get(r.mode, 0) + int(r.correct)

    def update(self, r: SampleRecord) -> None:
        self._count(r)
        self.bar.set_postfix_str(
            " ".join(f"{m} {100 * self.right[m] / n:.1f}%" for m, n in self.seen.items() if n), refresh=False
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


async def run_evaluation(
    target: Target,
    problems: Sequence[Problem],
    modes: Sequence[Mode],
    spec: RunSpec,
    out_dir: Path,
    *,
    concurrency: int = 8,
    resume: bool = False,
    progress: bool = True,
    checker: AnswerChecker | None = None,
    on_record: Callable[[SampleRecord], None] | None = None,
) -> RunResult:
    """Run every missing sample; records go to `out_dir/records.jsonl` as they finish.

    A `TargetError` (the target stopped serving) ends the run early: what finished is kept,
    `RunResult.fatal` says why, and `--resume` carries on from there."""
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    logfile = RecordLog(out_dir / RECORDS_FILE)
    existing = latest_records(logfile.load()) if resume else []
    done = {r.key for r in existing if r.error is None}
    jobs = [
        _Job(p, m, s)
        for p in problems
        for s in range(spec.k)
        for m in modes
        if (p.benchmark, p.id, m.name, s) not in done
    ]
    skipped = len(problems) * len(modes) * spec.k - len(jobs)
    started = time.time()
    _log_timing(out_dir, spec, {"started": started, "todo": len(jobs), "skipped": skipped})
    own_checker = checker is None
    checker = checker or AnswerChecker(max_workers=2)
    bar = _Progress(len(jobs) + skipped, [r for r in existing if r.error is None], progress)
    bar.bar.update(skipped)
    slots = asyncio.Semaphore(concurrency)
    fatal: list[str] = []
    new: list[SampleRecord] = []
    errors = 0

    async def one(job: _Job) -> None:
        nonlocal errors
        async with slots:
            if fatal:
                return
            record = await _sample(target, job, spec, checker)
        if isinstance(record, str):
            fatal.append(record)
            return
        logfile.append(record)
        new.append(record)
        errors += record.error is not None
        bar.update(record)
        if on_record is not None:
            on_record(record)

    t0 = time.monotonic()
    tasks = [asyncio.create_task(one(j)) for j in jobs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        if own_checker:
            checker.close()
        wall = time.monotonic() - t0
        timing = {
            "started": started,
            "finished": time.time(),
            "wall_s": wall,
            "samples": len(new),
            "problems": len({(r.benchmark, r.problem_id) for r in new}),
            "fatal": fatal[0] if fatal else None,
        }
        _log_timing(out_dir, spec, timing, replace_last=True)
    records = latest_records([*existing, *new])
    return RunResult(records, len(new), skipped, errors, wall, fatal[0] if fatal else None, timing)


async def _sample(target: Target, job: _Job, spec: RunSpec, checker: AnswerChecker) -> SampleRecord | str:
    """One scored record, or the fatal error (a string) that should end the run."""
    p, mode = job.problem, job.mode
    messages = mode.messages(p.problem)
    sampling = SamplingOptions(
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        seed=sample_seed(spec.seed, p, mode.name, job.sample),
    )
    t0 = time.monotonic()
    base = {
        "benchmark": p.benchmark,
        "problem_id": p.id,
        "problem_index": p.index,
        "mode": mode.name,
        "sample": job.sample,
        "model": target.model,
        "target": target.kind,
        "prompt": with_tir_instructions(messages, mode.tir_instructions if mode.tools else None, "append"),
        "gold": p.answer,
    }
    try:
        gen = await target.generate(mode, messages, sampling)
    except TargetError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - one failed sample is recorded (and retried on --resume)
        log.warning("sample %s/%s %s #%d failed: %s", p.benchmark, p.id, mode.name, job.sample, exc)
        return SampleRecord(
            **base,
            text="",
            answer=None,
            correct=False,
            finish_reason="error",
            wall_s=time.monotonic() - t0,
            error=f"{type(exc).__name__}: {exc}",
        )
    wall = time.monotonic() - t0
    correct = bool(gen.answer) and await checker.answers_match_async(gen.answer or "", p.answer)
    return SampleRecord(
        **base,
        text=gen.text,
        answer=gen.answer,
        correct=correct,
        finish_reason=gen.finish_reason,
        tool_calls=gen.tool_calls,
        tools=gen.tools,
        usage=gen.usage,
        wall_s=wall,
    )


def _log_timing(out_dir: Path, spec: RunSpec, entry: dict[str, Any], *, replace_last: bool = False) -> None:
    """run.json: the spec plus one timing entry per invocation (throughput across resumes)."""
    import json

    path = out_dir / SPEC_FILE
    runs: list[dict[str, Any]] = []
    if path.exists():
        runs = json.loads(path.read_text(encoding="utf-8")).get("runs", [])
    if replace_last and runs:
        runs[-1] = {**runs[-1], **entry}
    else:
        runs.append(entry)
    write_json_atomic(path, {"spec": spec.model_dump(), "runs": runs})


async def rescore(out_dir: Path, *, checker: AnswerChecker | None = None) -> tuple[int, int]:
    """Score every record of a run again with the current checker (after a scoring fix).

    Rewrites records.jsonl atomically when anything changed; returns (records, flipped)."""
    logfile = RecordLog(out_dir / RECORDS_FILE)
    records = logfile.load()
    own = checker is None
    checker = checker or AnswerChecker(max_workers=2)
    try:
        flipped = 0
        for r in records:
            correct = bool(r.answer) and await checker.answers_match_async(r.answer or "", r.gold)
            if correct != r.correct:
                flipped += 1
                r.correct = correct
    finally:
        if own:
            checker.close()
    if flipped:
        write_text_atomic(logfile.path, "".join(r.model_dump_json() + "\n" for r in records))
    return len(records), flipped
