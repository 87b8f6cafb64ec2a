"""A TIRGen run over many problems: bounded concurrency, a durable log, resume, filters, the funnel.

Owns the run directory:

- ``run.json``: the settings (endpoints, models, generation and filter config, problems);
  a resumed run must match them.
- ``generated.jsonl``: one line per attempt (a sample, or a drop before the filters with
  its reason), appended and fsynced as each finishes, so a killed run loses nothing;
  ``--resume`` skips finished attempts and retries ones that failed on an endpoint error.
- ``samples.jsonl``: the kept samples (the dataset: `TirSample` per line, loadable with
  ``datasets.load_dataset("json", data_files=...)``); ``rejected.jsonl``: each rejected
  sample with its stage and reason.
- ``summary.json``, ``funnel.md`` and ``funnel.png``: attempted -> critic drops -> each
  filter -> kept, and the code-invocation ratio of generated and kept samples.

`refilter_run` re-runs today's filters, with the thresholds the run recorded in
``run.json``, over a finished run's log and rewrites every report in place: how a
shipped run (whose log and samples are gzipped: ``*.jsonl.gz``, written gzipped again)
is brought up to new filter stages without generating again or editing a sample.

Does not own: one sample (generate.py), the filters (filters.py), the CLI (__main__.py).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.evaluate.benchmarks import Problem
from trainer.evaluate.records import append_jsonl, load_jsonl, write_json_atomic, write_text_atomic
from trainer.splits import problem_key

from .endpoints import Actor, Critic
from .filters import FilterConfig, FilterResult, FunnelStage, apply_filters, format_funnel, plot_funnel
from .generate import Dropped, TirGenConfig, generate_sample
from .sample import TirSample

__all__ = ["RunSettingsError", "TirGenResult", "refilter_run", "run_tirgen", "write_reports"]

log = logging.getLogger("trainer.tirgen")

#: Drop reasons before the filters, in funnel order.
DROP_REASONS = ("endpoint_error", "critic_truncated", "critic_code_failed")


class RunSettingsError(ValueError):
    """--resume with settings that differ from the run's."""


@dataclass
class TirGenResult:
    out: Path
    attempted: int
    dropped: Counter[str]
    filters: FilterResult
    wall_s: float

    @property
    def kept(self) -> list[TirSample]:
        return self.filters.kept


class _Log:
    """Append-only JSONL of attempts (the evaluation harness's log functions: fsync per line, a torn
    last line dropped)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[dict[str, Any]]:
        return load_jsonl(self.path, json.loads)

    def append(self, entry: dict[str, Any]) -> None:
        append_jsonl(self.path, json.dumps(entry, ensure_ascii=False))


def _check_settings(out: Path, settings: dict[str, Any], resume: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    if path.exists():
        if not resume:
            raise RunSettingsError(f"{out} already holds a TIRGen run: pass --resume to continue it, or another --out")
        old = json.loads(path.read_text(encoding="utf-8"))
        # the problem list may grow (--limit) and the filters may change (they run again on every report)
        changed = sorted(k for k in settings if k not in ("problems", "filters") and old.get(k) != settings[k])
        if changed:
            raise RunSettingsError(
                f"{out}: --resume with different settings ({', '.join(changed)}); use the run's settings or a new --out"
            )
    write_json_atomic(path, settings)


def _funnel(attempted: int, dropped: Counter[str], filters: FilterResult) -> list[FunnelStage]:
    stages = [FunnelStage("attempted", attempted, attempted, True)]
    n = attempted
    for reason in DROP_REASONS:
        stages.append(FunnelStage(reason, n, n - dropped[reason], True))
        n -= dropped[reason]
    return stages + [s for s in filters.funnel if s.name != "generated"]


async def run_tirgen(
    problems: Sequence[Problem],
    actor: Actor,
    critic: Critic,
    policy_tokenizer: Any,
    out: Path,
    *,
    config: TirGenConfig,
    filters: FilterConfig,
    samples_per_problem: int = 1,
    concurrency: int = 8,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
) -> TirGenResult:
    """Generate, log, filter and report (see the module docstring). Raises TargetError when an endpoint
    stops serving (what finished is kept; rerun with resume=True)."""
    _check_settings(
        out,
        {
            **(settings or {}),
            "actor_model": actor.model,
            "critic_model": critic.model,
            "config": config.model_dump(),
            "filters": {
                **filters.model_dump(mode="json", exclude={"count_tokens"}),
                "disabled": sorted(filters.disabled),
            },
            "samples_per_problem": samples_per_problem,
            "seed": seed,
            "problems": [problem_key(p.benchmark, p.id) for p in problems],
        },
        resume,
    )
    record = _Log(out / "generated.jsonl")
    done = {
        (e["id"], e["attempt"])
        for e in record.load()
        if not (e["status"] == "dropped" and e["reason"] == "endpoint_error")
    }
    work = [
        (p, a) for p in problems for a in range(samples_per_problem) if (problem_key(p.benchmark, p.id), a) not in done
    ]
    if done:
        log.warning("resuming %s: %d attempts done, %d to go", out, len(done), len(work))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(work), desc="tirgen", unit="problem", dynamic_ncols=True)
    counts: Counter[str] = Counter()
    sem = asyncio.Semaphore(concurrency)
    start = time.monotonic()

    async def one(p: Problem, attempt: int) -> None:
        key = problem_key(p.benchmark, p.id)
        async with sem:
            result = await generate_sample(p, actor, critic, policy_tokenizer, config, seed=seed + attempt * 7919)
        if isinstance(result, Dropped):
            entry = {
                "id": key,
                "attempt": attempt,
                "status": "dropped",
                "reason": result.reason,
                "detail": result.detail,
            }
            counts[result.reason] += 1
        else:
            entry = {"id": key, "attempt": attempt, "status": "sample", "sample": result.model_dump()}
            counts["correct" if result.correct else "wrong"] += 1
            counts["with_code"] += result.code_calls > 0
        record.append(entry)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: counts[k] for k in ("with_code", "correct", "critic_code_failed") if counts[k]})

    try:
        tasks = [asyncio.create_task(one(p, a)) for p, a in work]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    finally:
        if bar is not None:
            bar.close()
    return write_reports(out, filters, wall_s=time.monotonic() - start)


def _write_jsonl(path: Path, lines: list[str], *, compress: bool) -> None:
    text = "".join(line + "\n" for line in lines)
    if not compress:
        write_text_atomic(path, text)
        return
    path = path.with_name(path.name + ".gz")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))  # mtime 0: the same samples, the same bytes
    os.replace(tmp, path)


def _load_log(out: Path) -> tuple[list[dict[str, Any]], bool]:
    """The run's attempts, and whether its log is gzipped (a shipped run)."""
    if (out / "generated.jsonl").is_file():
        return _Log(out / "generated.jsonl").load(), False
    if (out / "generated.jsonl.gz").is_file():
        with gzip.open(out / "generated.jsonl.gz", "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()], True
    raise FileNotFoundError(
        f"{out} holds no TIRGen run (no generated.jsonl or generated.jsonl.gz): check --out / --refilter, or run "
        "without --report-only"
    )


def refilter_run(out: Path, tokenizer: Any = None) -> TirGenResult:
    """Re-run the filters (today's stages, the thresholds and disabled stages in the run's ``run.json``) over the
    attempts logged in `out` and rewrite its samples, rejections, summary and funnel. With `tokenizer` the token
    lengths are checked too (as the run did with its policy tokenizer)."""
    path = out / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out} holds no TIRGen run (no run.json): pass the run directory to --refilter")
    recorded = json.loads(path.read_text(encoding="utf-8"))["filters"]
    cfg = FilterConfig(**{k: v for k, v in recorded.items() if k in FilterConfig.model_fields})
    if tokenizer is not None:
        cfg = cfg.with_tokenizer(tokenizer)
    old = out / "summary.json"
    wall_s = json.loads(old.read_text(encoding="utf-8")).get("wall_s", 0.0) if old.is_file() else 0.0
    return write_reports(out, cfg, wall_s=wall_s)


def write_reports(out: Path, filters: FilterConfig, *, wall_s: float = 0.0) -> TirGenResult:
    """Filter every logged attempt and write samples.jsonl, rejected.jsonl, summary.json, funnel.md/png
    (the JSONL files gzipped when the log is)."""
    entries, compress = _load_log(out)
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for e in entries:
        latest[(e["id"], e["attempt"])] = e
    dropped: Counter[str] = Counter(e["reason"] for e in latest.values() if e["status"] == "dropped")
    samples = [TirSample.model_validate(e["sample"]) for e in latest.values() if e["status"] == "sample"]
    result = apply_filters(samples, filters)
    _write_jsonl(out / "samples.jsonl", [s.model_dump_json() for s in result.kept], compress=compress)
    _write_jsonl(
        out / "rejected.jsonl",
        [
            json.dumps({"id": s.id, "stage": stage, "reason": reason, "sample": s.model_dump()}, ensure_ascii=False)
            for s, stage, reason in result.rejected
        ],
        compress=compress,
    )
    funnel = _funnel(len(latest), dropped, result)
    summary = {
        "attempted": len(latest),
        "dropped_before_filters": dict(dropped),
        "generated": len(samples),
        "kept": len(result.kept),
        "code_invocation_ratio": {
            "generated": result.code_invocation_generated,
            "kept": result.code_invocation_kept,
        },
        "funnel": [{"stage": s.name, "in": s.n_in, "out": s.n_out, "enabled": s.enabled} for s in funnel],
        "filters": result.summary(),
        "wall_s": round(wall_s, 1),
    }
    write_json_atomic(out / "summary.json", summary)
    ratio = summary["code_invocation_ratio"]
    write_text_atomic(
        out / "funnel.md",
        format_funnel(funnel)
        + f"\n\nCode-invocation ratio: {ratio['generated']:.1%} of generated samples, {ratio['kept']:.1%} of kept.\n",
    )
    plot_funnel(funnel, out / "funnel.png")
    return TirGenResult(out=out, attempted=len(latest), dropped=dropped, filters=result, wall_s=wall_s)
