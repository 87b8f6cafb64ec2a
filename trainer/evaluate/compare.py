"""Two evaluation runs side by side: did training change accuracy and tool use, per mode?

Owns `compare_runs` (``python -m trainer.evaluate --compare BEFORE AFTER``): for every mode
and benchmark both runs scored, on the problems both scored,

- accuracy (Avg over samples per problem) in each run with its percentile-bootstrap
  interval, and the paired difference after - before (paired bootstrap over problems);
- the code-invocation ratio (share of trajectories with at least one executed call,
  Wilson interval) in each run;
- the tool-call success rate (committed calls that succeeded / committed calls, Wilson).

Written as ``compare.json`` and ``compare.md`` into the AFTER run's directory.

Does not own: scoring (records carry `correct`), the intervals' formulas (metrics.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from .metrics import Interval, bootstrap_interval, paired_bootstrap, wilson_interval
from .records import RecordLog, SampleRecord, write_json_atomic, write_text_atomic
from .runner import latest_records

__all__ = ["compare_runs"]


def _load(run: Path) -> dict[tuple[str, str], dict[str, list[SampleRecord]]]:
    """(benchmark, mode) -> problem id -> its samples."""
    path = run / "records.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run} holds no evaluation run (no records.jsonl): pass two `--out` directories")
    out: dict[tuple[str, str], dict[str, list[SampleRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in latest_records(RecordLog(path).load()):
        out[(r.benchmark, r.mode)][r.problem_id].append(r)
    return out


def _fmt(i: Interval | None) -> str:
    return "—" if i is None else f"{100 * i.value:.1f} ({100 * i.low:.1f} to {100 * i.high:.1f})"


def _side(samples: dict[str, list[SampleRecord]], ids: list[str]) -> dict[str, Any]:
    per_problem = {p: sum(bool(s.correct) for s in samples[p]) / len(samples[p]) for p in ids}
    flat = [s for p in ids for s in samples[p]]
    with_code = sum(1 for s in flat if any(c.committed for c in s.tool_calls))
    committed = [c for s in flat for c in s.tool_calls if c.committed]
    ok = sum(1 for c in committed if c.ok)
    return {
        "per_problem": per_problem,
        "accuracy": bootstrap_interval(per_problem.values()),
        "code_ratio": wilson_interval(with_code, len(flat)),
        "with_code": with_code,
        "samples": len(flat),
        "call_success": wilson_interval(ok, len(committed)) if committed else None,
        "calls": len(committed),
    }


def compare_runs(before: Path, after: Path) -> dict[str, Any]:
    """Compare two runs (see the module docstring); write compare.json / compare.md into `after`."""
    a, b = _load(before), _load(after)
    rows: list[dict[str, Any]] = []
    for key in [k for k in a if k in b]:
        ids = sorted(set(a[key]) & set(b[key]))
        if not ids:
            continue
        x, y = _side(a[key], ids), _side(b[key], ids)
        diff = paired_bootstrap(y["per_problem"], x["per_problem"])
        rows.append(
            {
                "benchmark": key[0],
                "mode": key[1],
                "problems": len(ids),
                "before": {k: v for k, v in x.items() if k != "per_problem"},
                "after": {k: v for k, v in y.items() if k != "per_problem"},
                "accuracy_difference": diff,
            }
        )
    if not rows:
        raise ValueError(f"{before} and {after} share no (benchmark, mode) with problems scored in both")
    result = {"before": str(before), "after": str(after), "rows": rows}
    write_json_atomic(after / "compare.json", _jsonable(result))
    lines = [
        f"# {after.name} vs {before.name}",
        "",
        "| Benchmark | Mode | Problems | Accuracy before | Accuracy after | After - before (pp) | Code before | "
        "Code after | Call success before | Call success after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = r["accuracy_difference"]
        x, y = r["before"], r["after"]
        lines.append(
            f"| {r['benchmark']} | {r['mode']} | {r['problems']} | {_fmt(x['accuracy'])} | {_fmt(y['accuracy'])} | "
            f"{100 * d.difference:+.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f}) | {_fmt(x['code_ratio'])} | "
            f"{_fmt(y['code_ratio'])} | {_fmt(x['call_success'])} (n={x['calls']}) | "
            f"{_fmt(y['call_success'])} (n={y['calls']}) |"
        )
    lines += [
        "",
        "Cells: % (95% interval). Accuracy: percentile bootstrap over problems; the difference: paired bootstrap "
        "over the problems both runs scored. Code: share of trajectories with at least one executed (committed) "
        "call; call success: committed calls that succeeded; both Wilson intervals over samples.",
        "",
    ]
    write_text_atomic(after / "compare.md", "\n".join(lines))
    return result


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj
