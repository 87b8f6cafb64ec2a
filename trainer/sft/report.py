"""SFT reports: the loss log as JSON and the loss curve as a PNG.

Owns: ``train_log.json`` (one entry per logging step: step, loss, learning rate, epoch,
grad norm; plus the Trainer's final summary entry) and ``loss.png`` (loss against
optimizer step, learning rate on a second axis), from the Trainer's ``log_history``
(which survives ``--resume``, so a resumed run's log covers every step).

Does not own: training (train.py) or evaluation plots (trainer/evaluate/report.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["LOG_FILE", "PLOT_FILE", "loss_points", "plot_loss", "write_reports"]

LOG_FILE = "train_log.json"
PLOT_FILE = "loss.png"


def loss_points(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The logging-step entries of a Trainer log_history, one per step (a resumed step logged twice keeps the last)."""
    by_step: dict[int, dict[str, Any]] = {}
    for h in history:
        if "loss" not in h:
            continue
        by_step[int(h["step"])] = {
            "step": int(h["step"]),
            "loss": float(h["loss"]),
            "lr": float(h.get("learning_rate", 0.0)),
            "epoch": float(h.get("epoch", 0.0)),
            "grad_norm": float(h["grad_norm"]) if h.get("grad_norm") is not None else None,
        }
    return [by_step[k] for k in sorted(by_step)]


def plot_loss(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [p["step"] for p in points]
    ax.plot(steps, [p["loss"] for p in points], marker="o" if len(points) < 30 else None, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (model tokens)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [p["lr"] for p in points], color="tab:orange", alpha=0.6, label="learning rate")
    ax2.set_ylabel("learning rate")
    ax.set_title("Cold-start SFT")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(history: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write train_log.json and loss.png into *out_dir*; return their paths."""
    out_dir = Path(out_dir)
    points = loss_points(history)
    summary = [h for h in history if "train_runtime" in h]
    log = out_dir / LOG_FILE
    log.write_text(json.dumps({"steps": points, "summary": summary[-1] if summary else None}, indent=2) + "\n")
    png = out_dir / PLOT_FILE
    plot_loss(points, png)
    return [log, png]
