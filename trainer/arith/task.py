"""The synthetic arithmetic problems, and building the whole task directory.

Owns: the problems (``What is 37 * 48 + 12?`` / ``Compute 37 * 48 - 12.``: two two-digit
factors, beyond what a ~1M-parameter model computes in its head, so only the tool gets
them right), their deterministic seeded generation with train and held-out splits disjoint
by expression, the problem files (``{"id", "problem", "answer"}`` JSON lines, readable by
``python -m trainer.evaluate --benchmarks``), and `build_task`: problems, tokenizer, base
model and cold-start samples written into one directory, idempotently (a marker holds a
fingerprint of every input; a complete build is reused) and atomically (built in a
temporary sibling directory, then renamed into place).

The phrasing (``What is`` or ``Compute``) is the problem's visible *style*; the cold start
ties its branch mix to it (coldstart.py), so greedy decoding of the SFT model takes
different branches on different problems.

Does not own: the cold-start trajectories (coldstart.py), the tokenizer (tokenizer.py), or
the model (model.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from thor_engine.models.provision import publish_dir

if TYPE_CHECKING:
    from .coldstart import Mix

__all__ = [
    "DEFAULT_HELDOUT_SIZE",
    "DEFAULT_TRAIN_SIZE",
    "MARKER",
    "TASK_VERSION",
    "ArithProblem",
    "ArithTask",
    "Style",
    "build_task",
    "make_problems",
    "read_problems",
    "write_problems",
]

#: Bump when anything that changes the bytes of a build changes (the fingerprint includes it).
TASK_VERSION = 1
DEFAULT_TRAIN_SIZE = 4000
DEFAULT_HELDOUT_SIZE = 200
MARKER = ".thor-arith.json"

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


@dataclass(frozen=True)
class ArithTask:
    """Where a built task's parts are."""

    root: Path
    base_model: Path  # from-scratch, untied Qwen2ForCausalLM + tokenizer (Hugging Face format)
    train_problems: Path  # problems/train.jsonl
    heldout_problems: Path  # problems/heldout.jsonl
    coldstart_samples: Path  # coldstart/samples.jsonl (TirSample lines, for python -m trainer.sft)

    @classmethod
    def at(cls, root: Path) -> ArithTask:
        root = Path(root)
        return cls(
            root=root,
            base_model=root / "base",
            train_problems=root / "problems" / "train.jsonl",
            heldout_problems=root / "problems" / "heldout.jsonl",
            coldstart_samples=root / "coldstart" / "samples.jsonl",
        )


def _fingerprint(settings: dict[str, object]) -> str:
    from . import model
    from .tokenizer import TOKENIZER_VOCAB_SIZE

    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(str(TOKENIZER_VOCAB_SIZE).encode())
    h.update(json.dumps(model.MODEL_SPEC, sort_keys=True).encode())
    for name in ("task.py", "coldstart.py", "tokenizer.py", "model.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def _is_complete(root: Path, fp: str) -> bool:
    try:
        return json.loads((root / MARKER).read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


def build_task(
    out: Path,
    *,
    seed: int = 0,
    train_size: int = DEFAULT_TRAIN_SIZE,
    heldout_size: int = DEFAULT_HELDOUT_SIZE,
    mix: Mix | None = None,
    force: bool = False,
) -> ArithTask:
    """Build (or reuse) the task under *out*: problems, base model, cold-start samples.

    The same arguments give the same bytes (problems, samples, tokenizer, weights). A
    complete build with the same fingerprint is reused unless *force*; otherwise the whole
    directory is built next to *out* and renamed onto it, so a reader never sees half a task.
    *mix*: the cold start's branch shares and guess kind (default `coldstart.MIX`).
    """
    from . import coldstart, model
    from .tokenizer import TOKENIZER_VOCAB_SIZE, train_tokenizer

    out = Path(out)
    mix = coldstart.MIX if mix is None else mix
    settings = {
        "version": TASK_VERSION,
        "seed": seed,
        "train_size": train_size,
        "heldout_size": heldout_size,
        "mix": asdict(mix),
    }
    fp = _fingerprint(settings)
    if not force and _is_complete(out, fp):
        return ArithTask.at(out)

    train, heldout = make_problems(seed, train_size, heldout_size)
    plans = [coldstart.plan(p, seed, mix) for p in train]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        task = ArithTask.at(tmp)
        write_problems(task.train_problems, train)
        write_problems(task.heldout_problems, heldout)
        tokenizer = train_tokenizer(coldstart.corpus(plans), TOKENIZER_VOCAB_SIZE)
        model.write_base_model(task.base_model, tokenizer, seed=seed)
        coldstart.write_samples(task.coldstart_samples, plans, tokenizer, tokenizer_name="base")
        (tmp / MARKER).write_text(json.dumps({"fingerprint": fp, **settings}, indent=2) + "\n")
        publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ArithTask.at(out)
