"""Curves of an RL run, drawn from its `metrics.jsonl`.

Owns: one figure (`metrics.png`) with a panel per quantity people watch during RL:
trajectory reward and rollout accuracy, tool-call success (rollouts and step-level
continuations), kept trajectory and step-level groups, mean response length, the
learner's clip fraction and gradient norm, and the held-out evaluation's accuracy and
tool success with their intervals where the run evaluated.

Does not own: the metrics themselves (runner.py writes them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["plot_metrics"]


def _series(rows: list[dict[str, Any]], *path: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, int | float):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_metrics(metrics_path: str | Path, out: str | Path, eval_path: str | Path | None = None) -> Path:
    """Draw `out` from a metrics.jsonl (and the run's eval.jsonl next to it, if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    eval_path = Path(eval_path) if eval_path else metrics_path.with_name("eval.jsonl")
    evals = (
        [json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()] if eval_path.exists() else []
    )
    panels: list[tuple[str, list[tuple[str, tuple[str, ...]]]]] = [
        (
            "reward / accuracy (rollouts)",
            [("reward (kept)", ("trajectory", "reward")), ("accuracy", ("trajectory", "accuracy"))],
        ),
        (
            "tool-call success",
            [("rollouts", ("trajectory", "tool_success")), ("step-level", ("step_level", "code_success"))],
        ),
        ("kept groups", [("trajectory", ("trajectory", "groups_kept")), ("step-level", ("step_level", "groups_kept"))]),
        ("response length (tokens)", [("rollouts", ("trajectory", "response_tokens"))]),
        ("clip fraction", [("upper", ("learner", "clip_frac_high")), ("lower", ("learner", "clip_frac_low"))]),
        ("grad norm", [("grad norm", ("learner", "grad_norm"))]),
    ]
    n = len(panels) + (1 if evals else 0)
    cols = 3
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.4 * rows_n), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (title, lines) in zip(flat, panels, strict=False):
        for label, path in lines:
            xs, ys = _series(rows, *path)
            if xs:
                ax.plot(xs, ys, marker=".", label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if evals:
        ax = flat[len(panels)]
        keys = [k for k in evals[0] if k != "step"]
        for key in keys:
            steps = [e["step"] for e in evals if key in e]
            acc = [e[key]["accuracy"] for e in evals if key in e]
            lo = [e[key]["accuracy_low"] for e in evals if key in e]
            hi = [e[key]["accuracy_high"] for e in evals if key in e]
            ax.plot(steps, acc, marker="o", label=f"{key} accuracy")
            ax.fill_between(steps, lo, hi, alpha=0.2)
            tool = [
                (e["step"], e[key]["tool_success"]) for e in evals if key in e and e[key]["tool_success"] is not None
            ]
            if tool:
                ax.plot(
                    [s for s, _ in tool], [t for _, t in tool], marker="s", linestyle="--", label=f"{key} tool success"
                )
        ax.set_ylim(0, 1)
        ax.set_title("held-out evaluation (greedy, 95% CI)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
