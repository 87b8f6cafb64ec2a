"""Reports of the evaluation harness: a `Summary` rendered as Markdown, PNG plots and JSON.

Owns: `render_markdown` (the paper's layout: one row per mode, one column per benchmark
plus "Avg"; then maj@k, pass@k, paired differences, the key-insight table, tool
statistics, tokens and time, finish reasons and errors), `plot_accuracy` and
`plot_key_insight` (matplotlib, drawn on the Agg canvas: no display needed), and
`write_reports` (summary.json, table.md, accuracy.png, key_insight.png, each written
atomically).

Does not own: computing anything (metrics.py computes; this module only formats what the
`Summary` holds), reading records or running models.

The summary stores fractions in 0..1; everything here prints percentages with one decimal
(differences in percentage points).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import BenchmarkModeResult, Interval, KeyInsight, KeyInsightGroup, PairedDifference, Summary
from .records import write_json_atomic, write_text_atomic

__all__ = ["plot_accuracy", "plot_key_insight", "render_markdown", "write_reports"]

DASH = "\u2014"  # em dash: no value
RANGE = "\u2013"  # en dash between an interval's bounds
MINUS = "\u2212"

# --------------------------------------------------------------------------- formatting


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(iv: Interval | None) -> str:
    return DASH if iv is None else f"{_pct(iv.value)} ({_pct(iv.low)}{RANGE}{_pct(iv.high)})"


def _pp(x: float) -> str:
    """Percentage points with a sign; -0.0 prints as 0.0."""
    v = round(100 * x, 1)
    return "0.0" if v == 0 else f"{v:+.1f}"


def _diff_cell(d: PairedDifference | None) -> str:
    if d is None:
        return DASH
    point = f"**{_pp(d.difference)}**" if d.excludes_zero else _pp(d.difference)
    return f"{point} ({_pp(d.low)} to {_pp(d.high)}), ≤0: {_pct(d.share_le_zero)}%"


def _conf(summary: Summary) -> str:
    return _pct(summary.confidence).removesuffix(".0")


def _num(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def _esc(text: str) -> str:
    """Table-safe text: pipes escaped, line breaks flattened."""
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(_esc(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _group_cell(g: KeyInsightGroup) -> str:
    return f"n={g.samples}: {DASH}" if g.accuracy is None else f"n={g.samples}: {_cell(g.accuracy)}"


# --------------------------------------------------------------------------- Markdown


def _metric_table(
    summary: Summary, pick: Callable[[BenchmarkModeResult], Interval], overall_pick: Callable[..., Interval]
) -> list[str]:
    rows = []
    for mode in summary.modes:
        cells = [_esc(mode)]
        for bench in summary.benchmarks:
            res = summary.result(bench, mode)
            cells.append(_cell(pick(res)) if res is not None else DASH)
        overall = summary.mode_overall(mode)
        cells.append(_cell(overall_pick(overall)) if overall is not None else DASH)
        rows.append(cells)
    return _table(["Mode", *summary.benchmarks, "Avg"], rows)


def _coverage_lines(summary: Summary) -> list[str]:
    lines = []
    sizes = []
    for bench in summary.benchmarks:
        counts = {r.problems for r in summary.results if r.benchmark == bench}
        sizes.append(f"{bench} {'/'.join(str(c) for c in sorted(counts)) or 0}")
    lines.append(f"Problems per benchmark: {', '.join(sizes)}.")
    incomplete = [f"{r.benchmark}/{r.mode} ({r.incomplete_problems})" for r in summary.results if r.incomplete_problems]
    if incomplete:
        lines.append(
            f"Partial run: problems with fewer than k={summary.k} samples, scored on the samples they have: "
            + ", ".join(incomplete)
            + "."
        )
    partial_avg = [o.mode for o in summary.overall if len(o.benchmarks) < len(summary.benchmarks)]
    if partial_avg:
        lines.append(f"Avg covers only the benchmarks with results for: {', '.join(partial_avg)}.")
    if summary.missing:
        lines.append(f"No records for: {', '.join(summary.missing)}.")
    return lines


def _comparison_lines(summary: Summary) -> list[str]:
    if not summary.comparisons:
        return []
    conf = _conf(summary)
    lines = [f"## Paired differences of Avg@{summary.k} (percentage points)", ""]
    rows = []
    for c in summary.comparisons:
        cells = [f"{_esc(c.mode)} {MINUS} {_esc(c.baseline)}"]
        cells += [_diff_cell(c.per_benchmark.get(bench)) for bench in summary.benchmarks]
        cells.append(_diff_cell(c.overall))
        rows.append(cells)
    lines += _table(["Mode vs baseline", *summary.benchmarks, "Avg"], rows)
    lines += [
        "",
        f"Paired bootstrap over the problems both modes answered. **Bold**: the {conf}% interval "
        "excludes 0. ≤0: the share of resamples in which the mode did not beat the baseline "
        "(a one-sided p-like figure).",
    ]
    for c in summary.comparisons:
        if c.overall is None:
            lines.append(f"{_esc(c.mode)} and {_esc(c.baseline)} share no problem: nothing to compare.")
            continue
        o = c.overall
        verdict = (
            f"the interval excludes 0: {_esc(c.mode)} is {'better' if o.difference > 0 else 'worse'} on average"
            if o.excludes_zero
            else "the interval includes 0: no difference shown at this sample size"
        )
        excluded = f"; excluded (one side only): {o.only_a} + {o.only_b}" if o.only_a or o.only_b else ""
        lines.append(
            f"{_esc(c.mode)} vs {_esc(c.baseline)}: {_pp(o.difference)} points over "
            f"{o.paired} paired problems{excluded}; {verdict}."
        )
    return [*lines, ""]


def _key_insight_sentence(mode: str, ki: KeyInsight) -> str | None:
    ok, bad = ki.all_succeeded, ki.some_failed
    if ok.accuracy is None or bad.accuracy is None:
        return None
    overlap = ok.accuracy.low <= bad.accuracy.high and bad.accuracy.low <= ok.accuracy.high
    return (
        f"{_esc(mode)}: right in {_pct(ok.accuracy.value)}% of trajectories whose calls all succeeded "
        f"(n={ok.samples}) vs {_pct(bad.accuracy.value)}% of those with a failed call (n={bad.samples}): "
        f"{_pp(ok.accuracy.value - bad.accuracy.value)} points; the intervals "
        f"{'overlap' if overlap else 'do not overlap'}."
    )


def _key_insight_lines(summary: Summary) -> list[str]:
    lines = ["## Key insight: tool-call success vs answer accuracy (%)", ""]
    header = ["Mode", "Calls counted", "All calls succeeded", "Some call failed", "No calls"]
    align = ["---", "---", "---:", "---:", "---:"]
    rows = []
    for o in summary.overall:
        for label, ki in (("every attempt", o.key_insight), ("committed only", o.key_insight_committed)):
            rows.append(
                [_esc(o.mode), label] + [_group_cell(g) for g in (ki.all_succeeded, ki.some_failed, ki.no_calls)]
            )
    lines += _table(header, rows, align)
    errored = sum(r.errors for r in summary.results)
    lines += [
        "",
        "Samples are the unit (Wilson intervals), pooled over benchmarks. A call failed when its "
        "outcome was not ok (error, timeout, no output, sandbox error). 'every attempt' counts calls "
        "later discarded by self-correction; 'committed only' counts the calls kept in the final "
        "trajectory. Refused code blocks (not executed) are not calls."
        + (f" Samples whose generation failed are left out ({errored})." if errored else ""),
    ]
    sentences = [s for o in summary.overall if (s := _key_insight_sentence(o.mode, o.key_insight))]
    if sentences:
        lines += ["", *sentences]
    by_bench = [
        [_esc(r.benchmark), _esc(r.mode)]
        + [_group_cell(g) for g in (r.key_insight.all_succeeded, r.key_insight.some_failed, r.key_insight.no_calls)]
        for r in summary.results
    ]
    lines += ["", "By benchmark (every attempt):", ""]
    lines += _table(
        ["Benchmark", "Mode", "All calls succeeded", "Some call failed", "No calls"],
        by_bench,
        ["---", "---", "---:", "---:", "---:"],
    )
    return [*lines, ""]


def _rate(x: float | None) -> str:
    return DASH if x is None else _pct(x)


def _tool_lines(summary: Summary) -> list[str]:
    rows = []
    for r in summary.results:
        t = r.tools
        outcomes = ", ".join(f"{_esc(k)} {v}" for k, v in t.outcomes.items()) or DASH
        rows.append(
            [
                _esc(r.benchmark),
                _esc(r.mode),
                _num(t.calls_per_problem),
                _num(t.calls_per_sample),
                _rate(t.call_success_rate),
                _rate(t.committed_success_rate),
                _num(t.backtracks_per_sample),
                _num(t.discarded_tokens_per_sample, 1),
                _num(t.sandbox_s_per_sample),
                str(t.not_executed),
                outcomes,
            ]
        )
    header = [
        "Benchmark",
        "Mode",
        "Calls/problem",
        "Calls/sample",
        "Success %",
        "Committed success %",
        "Backtracks/sample",
        "Discarded tokens/sample",
        "Sandbox s/sample",
        "Not executed",
        "Outcomes",
    ]
    lines = ["## Tool statistics", ""]
    lines += _table(header, rows, ["---", "---"] + ["---:"] * 8 + ["---"])
    lines += [
        "",
        f"Calls are sandbox runs, retries included; calls/problem sums a problem's samples (up to k={summary.k}). "
        "Not executed: code blocks refused (tool budget spent, answer phase).",
        "",
    ]
    return lines


def _usage_lines(summary: Summary) -> list[str]:
    rows = [
        [
            _esc(r.benchmark),
            _esc(r.mode),
            str(r.problems),
            str(r.samples),
            _num(r.tokens.prompt_per_sample, 1),
            _num(r.tokens.completion_per_sample, 1),
            _num(r.tokens.generated_per_sample, 1),
            _num(r.tokens.observation_per_sample, 1),
            _num(r.wall_s_per_sample),
        ]
        for r in summary.results
    ]
    header = [
        "Benchmark",
        "Mode",
        "Problems",
        "Samples",
        "Prompt tokens",
        "Completion tokens",
        "Generated tokens",
        "Observation tokens",
        "Wall s",
    ]
    lines = ["## Tokens and wall time per sample", ""]
    lines += _table(header, rows, ["---", "---"] + ["---:"] * 7)
    lines += [
        "",
        "Completion: the final trajectory; generated: every token sampled, discarded ones included. "
        "Wall s: from submitting the sample to its last event.",
        "",
    ]
    return lines


def _finish_lines(summary: Summary) -> list[str]:
    rows = [
        [
            _esc(r.benchmark),
            _esc(r.mode),
            ", ".join(f"{_esc(k)} {v}" for k, v in r.finish_reasons.items()) or DASH,
            str(r.errors),
        ]
        for r in summary.results
    ]
    lines = ["## Finish reasons and errors", ""]
    lines += _table(["Benchmark", "Mode", "Finish reasons (samples)", "Errors"], rows, ["---", "---", "---", "---:"])
    examples = [(r, msg, n) for r in summary.results for msg, n in r.error_examples.items()]
    if examples:
        lines += ["", "Errors (samples that could not be generated count as wrong):", ""]
        lines += [
            f"- {_esc(r.benchmark)}/{_esc(r.mode)} ({n} sample{'' if n == 1 else 's'}): {_esc(msg)}"
            for r, msg, n in examples
        ]
    return [*lines, ""]


def render_markdown(summary: Summary, *, title: str | None = None) -> str:
    """The whole report as Markdown (GitHub tables), in the paper's layout first."""
    k = summary.k
    conf = _conf(summary)
    lines = [
        f"# {title or f'Evaluation: Avg@{k}'}",
        "",
        f"{summary.records} samples; k = {k}; modes: {', '.join(summary.modes) or 'none'}; "
        f"benchmarks: {', '.join(summary.benchmarks) or 'none'}. Cells: value ({conf}% interval), in percent. "
        f"Intervals: percentile bootstrap over problems ({summary.resamples} resamples, seed {summary.seed}); "
        "Wilson over samples in the key-insight table.",
        "",
        f"## Avg@{k} (%)",
        "",
    ]
    lines += _metric_table(summary, lambda r: r.avg_at_k, lambda o: o.avg_at_k)
    lines += [
        "",
        f"Avg@{k}: per-problem accuracy over its samples, averaged over problems. Avg: the unweighted mean "
        "of the benchmark columns; its interval resamples problems within each benchmark.",
        *_coverage_lines(summary),
        "",
        f"## maj@{k} (%)",
        "",
    ]
    lines += _metric_table(summary, lambda r: r.maj_at_k, lambda o: o.maj_at_k)
    lines += [
        "",
        "Majority vote over the samples' normalised answers (ties go to the answer seen first; "
        "no answer counts as wrong).",
        "",
        f"## pass@{k} (%)",
        "",
    ]
    lines += _metric_table(summary, lambda r: r.pass_at_k, lambda o: o.pass_at_k)
    lines += [
        "",
        f"Unbiased estimator 1 - C(n-c, k)/C(n, k) per problem (k = the samples a problem has, if fewer than {k}). "
        f"pass@1 equals Avg@{k}.",
        "",
    ]
    lines += _comparison_lines(summary)
    lines += _key_insight_lines(summary)
    lines += _tool_lines(summary)
    lines += _usage_lines(summary)
    lines += _finish_lines(summary)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- plots


def _save_png(fig: Figure, path: Path) -> None:
    """Render on the Agg canvas to a temp file, then rename: no half-written PNG is ever visible."""
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


def _errors(ivs: list[Interval | None]) -> tuple[list[float], list[list[float]]]:
    heights = [100 * iv.value if iv is not None else math.nan for iv in ivs]
    below = [100 * (iv.value - iv.low) if iv is not None else 0.0 for iv in ivs]
    above = [100 * (iv.high - iv.value) if iv is not None else 0.0 for iv in ivs]
    return heights, [below, above]


def _annotate(ax: Axes, xs: list[float], ivs: list[Interval | None], texts: list[str], *, always: bool = False) -> None:
    """Write each text just above its bar's error bar (at the axis floor for an empty bar, if `always`)."""
    for x, iv, text in zip(xs, ivs, texts, strict=True):
        if iv is None and not always:
            continue
        top = 0.0 if iv is None else 100 * iv.high
        ax.text(x, top + 1.5, text, ha="center", va="bottom", fontsize=7)


def plot_accuracy(summary: Summary, path: Path) -> None:
    """Grouped bars: benchmark (and Avg) x mode, Avg@k in percent with interval error bars."""
    columns = [*summary.benchmarks, "Avg"]
    modes = summary.modes
    width = 0.8 / max(1, len(modes))
    fig = Figure(figsize=(max(6.0, 1.4 * len(columns) * max(1, len(modes)) ** 0.5 + 2), 4.5))
    ax = fig.add_subplot()
    for i, mode in enumerate(modes):
        ivs: list[Interval | None] = []
        for bench in summary.benchmarks:
            res = summary.result(bench, mode)
            ivs.append(res.avg_at_k if res is not None else None)
        overall = summary.mode_overall(mode)
        ivs.append(overall.avg_at_k if overall is not None else None)
        heights, yerr = _errors(ivs)
        xs = [c + (i - (len(modes) - 1) / 2) * width for c in range(len(columns))]
        label = mode if any(iv is not None for iv in ivs) else f"{mode} (no results)"
        ax.bar(xs, heights, width, yerr=yerr, capsize=3, label=label)
        _annotate(ax, xs, ivs, [f"{h:.1f}" for h in heights])
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylim(0, 108)
    ax.set_ylabel(f"Avg@{summary.k} (%)")
    ax.set_title(f"Accuracy by benchmark and mode (Avg@{summary.k}, {_conf(summary)}% intervals)")
    ax.yaxis.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    if modes:
        ax.legend(title="mode", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if not summary.results:
        ax.text(0.5, 0.5, "no results", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    _save_png(fig, path)


_GROUPS = (("all_succeeded", "all calls succeeded"), ("some_failed", "some call failed"), ("no_calls", "no calls"))


def plot_key_insight(summary: Summary, path: Path) -> None:
    """Per mode, accuracy of trajectories whose calls all succeeded / some failed / made none.

    Two panels (every attempt; committed calls only), Wilson error bars, n above each bar.
    """
    modes = [o.mode for o in summary.overall]
    fig = Figure(figsize=(max(8.0, 2.4 * len(modes) * 2), 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / len(_GROUPS)
    for ax, committed in zip(axes, (False, True), strict=True):
        for j, (field, label) in enumerate(_GROUPS):
            groups: list[KeyInsightGroup] = []
            for o in summary.overall:
                ki = o.key_insight_committed if committed else o.key_insight
                groups.append(getattr(ki, field))
            heights, yerr = _errors([g.accuracy for g in groups])
            xs = [m + (j - 1) * width for m in range(len(modes))]
            ax.bar(xs, [0.0 if math.isnan(h) else h for h in heights], width, yerr=yerr, capsize=3, label=label)
            _annotate(ax, xs, [g.accuracy for g in groups], [f"n={g.samples}" for g in groups], always=True)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylim(0, 112)
        ax.set_title("calls counted: committed only" if committed else "calls counted: every attempt")
        ax.yaxis.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_ylabel("accuracy of the trajectories (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(_GROUPS), fontsize=8, frameon=False)
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "no results", transform=ax.transAxes, ha="center", va="center")
    fig.suptitle("Key insight: tool-call success vs answer accuracy (Wilson intervals; n = samples)")
    fig.tight_layout(rect=(0.0, 0.06, 1.0, 1.0))
    _save_png(fig, path)


def write_reports(summary: Summary, out_dir: Path) -> list[Path]:
    """Write summary.json, table.md, accuracy.png and key_insight.png into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in ("summary.json", "table.md", "accuracy.png", "key_insight.png")]
    write_json_atomic(paths[0], summary.model_dump(mode="json"))
    write_text_atomic(paths[1], render_markdown(summary))
    plot_accuracy(summary, paths[2])
    plot_key_insight(summary, paths[3])
    return paths
