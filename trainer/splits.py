"""Which problems may be trained on and which are held out for evaluation.

Owns: the split definitions (by problem id, per benchmark) and the checks that keep
training and evaluation apart:

- ``gsm8k`` (the 500-problem file in the shared data): rows 0-199 are held out
  (``eval``; the GSM8K figures in docs/evaluation.md use the first 100 of them); rows 200-499
  (300 problems) are ``train``.
- every other named benchmark (math500, aime24, aime25, amc23, minerva, olympiadbench)
  is ``eval`` only: they are small and they are the sets we report.
- a JSONL or dataset of the user's own (not a named benchmark) is ``train`` unless it
  says otherwise.

TIRGen refuses ``eval`` problems unless told (``--allow-eval-problems``). The training
problem ids travel with the data (every TIRGen sample carries its ``id``) and with the
checkpoint (SFT writes ``thor_training.json`` next to the weights); the evaluation
harness refuses to score a checkpoint on problems it was trained on unless told
(``--allow-train-overlap``).

Does not own: loading problems (trainer/evaluate/benchmarks.py) or the data itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from trainer.evaluate.benchmarks import BENCHMARKS, Problem

__all__ = [
    "TRAINING_PROBLEMS_FILE",
    "SplitError",
    "TrainingProblems",
    "check_no_overlap",
    "problem_key",
    "read_training_problems",
    "split_of",
    "split_problems",
]

SplitName = Literal["train", "eval"]

#: Rows of a benchmark file held out for evaluation; the rest may be trained on.
#: A benchmark absent from this table but named in BENCHMARKS is eval only.
HELD_OUT_ROWS: dict[str, int] = {"gsm8k": 200}

#: File written next to a trained checkpoint's weights: the problem ids it was trained on.
TRAINING_PROBLEMS_FILE = "thor_training.json"


class SplitError(ValueError):
    """Training and evaluation problems would overlap."""


def problem_key(benchmark: str, problem_id: str) -> str:
    """The id a problem is known by across TIRGen, SFT and evaluation: ``<benchmark>/<id>``."""
    return f"{benchmark}/{problem_id}"


def split_of(problem: Problem) -> SplitName:
    """The split a problem belongs to (see the module docstring)."""
    if problem.benchmark in HELD_OUT_ROWS:
        return "eval" if problem.index < HELD_OUT_ROWS[problem.benchmark] else "train"
    return "eval" if problem.benchmark in BENCHMARKS else "train"


def split_problems(problems: Sequence[Problem], split: SplitName | Literal["all"]) -> list[Problem]:
    """The problems of one split (``all``: every problem, unchecked)."""
    if split == "all":
        return list(problems)
    return [p for p in problems if split_of(p) == split]


class TrainingProblems(BaseModel):
    """What a checkpoint was trained on, by problem key."""

    problems: list[str] = Field(description="'<benchmark>/<id>' of every problem in the training data")
    sources: list[str] = Field(default_factory=list, description="the data files the problems came from")


def read_training_problems(model_dir: str | Path) -> TrainingProblems | None:
    """The training problems recorded in a checkpoint directory, or None for a model we did not train."""
    path = Path(model_dir) / TRAINING_PROBLEMS_FILE
    if not path.is_file():
        return None
    return TrainingProblems.model_validate(json.loads(path.read_text(encoding="utf-8")))


#: What the evaluate command's refusal tells the user to do.
EVALUATE_FIX = (
    "Evaluate on held-out problems (for gsm8k: --limit 200 or less from offset 0), or pass --allow-train-overlap "
    "to score them anyway."
)


def check_no_overlap(
    problems: Iterable[Problem], trained: TrainingProblems, *, model: str, fix: str = EVALUATE_FIX
) -> None:
    """Raise SplitError when any of `problems` is one the model was trained on.

    The one check of every evaluation (the evaluate command, RL's held-out evaluation); *fix* is
    the caller's way out (its flags or settings)."""
    seen = set(trained.problems)
    overlap = [problem_key(p.benchmark, p.id) for p in problems if problem_key(p.benchmark, p.id) in seen]
    if overlap:
        shown = ", ".join(overlap[:5]) + (f" and {len(overlap) - 5} more" if len(overlap) > 5 else "")
        raise SplitError(
            f"{len(overlap)} of the evaluation problems were in {model}'s training data ({shown}): its scores on "
            f"them say nothing about held-out accuracy. {fix}"
        )
