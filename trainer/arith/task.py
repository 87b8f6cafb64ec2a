"""The synthetic arithmetic problems.

Owns: the problems (``What is 37 * 48 + 12?`` / ``Compute 37 * 48 - 12.``: two two-digit
factors, beyond what a ~1M-parameter model computes in its head, so only the tool gets
them right), their exact values (`evaluate_expression`), their deterministic seeded
generation with train and held-out splits disjoint by expression, and the problem files
(``{"id", "problem", "answer"}`` JSON lines, readable by
``python -m trainer.evaluate --benchmarks``).

The phrasing (``What is`` or ``Compute``) is the problem's visible *style*; the cold start
ties its branch mix to it (coldstart.py), so greedy decoding of the SFT model takes
different branches on different problems.

Does not own: building the task directory (build.py), the cold-start trajectories
(coldstart.py), the tokenizer (tokenizer.py), or the model (model.py).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "ArithProblem",
    "Style",
    "evaluate_expression",
    "make_problems",
    "read_problems",
    "write_problems",
]

Style = Literal["what", "compute"]
STYLES: tuple[Style, ...] = ("what", "compute")
FACTOR_RANGE = (12, 99)
ADDEND_RANGE = (1, 99)


@dataclass(frozen=True)
class ArithProblem:
    id: str
    expression: str  # Python syntax, e.g. "37 * 48 + 12"
    style: Style

    @property
    def problem(self) -> str:
        if self.style == "what":
            return f"What is {self.expression}?"
        return f"Compute {self.expression}."

    @property
    def answer(self) -> str:
        return str(evaluate_expression(self.expression))

    def to_line(self) -> dict[str, str]:
        return {"id": self.id, "problem": self.problem, "answer": self.answer}


def evaluate_expression(expression: str) -> int:
    """The exact value of ``a * b + c`` / ``a * b - c`` (integers only, parsed, not eval'd)."""
    parts = expression.split()
    if len(parts) != 5 or parts[1] != "*" or parts[3] not in "+-" or not all(p.isdigit() for p in parts[::2]):
        raise ValueError(f"{expression!r} is not of the form 'a * b + c' or 'a * b - c'")
    a, b, c = int(parts[0]), int(parts[2]), int(parts[4])
    return a * b + c if parts[3] == "+" else a * b - c


def make_problems(seed: int, train_size: int, heldout_size: int) -> tuple[list[ArithProblem], list[ArithProblem]]:
    """(train, held-out) problems, distinct expressions throughout, the same for the same arguments."""
    if train_size < 1 or heldout_size < 1:
        raise ValueError(f"train_size ({train_size}) and heldout_size ({heldout_size}) must both be >= 1")
    space = (FACTOR_RANGE[1] - FACTOR_RANGE[0] + 1) ** 2 * 2 * (ADDEND_RANGE[1] - ADDEND_RANGE[0] + 1)
    if train_size + heldout_size > space // 4:
        raise ValueError(f"{train_size + heldout_size} problems asked; at most {space // 4} distinct ones are drawn")
    rng = random.Random(f"thor-arith-problems:{seed}")
    seen: set[str] = set()
    drawn: list[tuple[str, Style]] = []
    while len(drawn) < train_size + heldout_size:
        a, b = rng.randint(*FACTOR_RANGE), rng.randint(*FACTOR_RANGE)
        op, c = rng.choice("+-"), rng.randint(*ADDEND_RANGE)
        style: Style = rng.choice(STYLES)
        expression = f"{a} * {b} {op} {c}"
        if expression in seen:
            continue
        seen.add(expression)
        drawn.append((expression, style))
    train = [ArithProblem(f"train-{i:05d}", e, s) for i, (e, s) in enumerate(drawn[:train_size])]
    heldout = [ArithProblem(f"heldout-{i:05d}", e, s) for i, (e, s) in enumerate(drawn[train_size:])]
    return train, heldout


def write_problems(path: Path, problems: list[ArithProblem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.to_line(), ensure_ascii=False) + "\n")


def read_problems(path: Path) -> list[dict[str, str]]:
    """The ``{"id", "problem", "answer"}`` lines of a problem file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such problem file; build the task: python -m trainer.arith build OUT")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
