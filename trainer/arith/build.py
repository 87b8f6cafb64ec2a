"""Building the whole arithmetic task directory: problems, tokenizer, base model and cold-start samples.

Owns: `build_task` (the problems (task.py), the tokenizer trained on the cold-start corpus
(tokenizer.py), the from-scratch base model (model.py) and the cold-start samples
(coldstart.py) written into one directory, idempotently: a marker (`MARKER`) holds a
fingerprint of every input, the source of these modules included, and a complete build is
reused; and atomically: built in a temporary sibling directory, then renamed into place),
`ArithTask` (where a built task's parts are), `TASK_VERSION` and the default sizes.

Does not own: the problems (task.py), the cold-start trajectories (coldstart.py), the
tokenizer (tokenizer.py), the model (model.py) or the command line (__main__.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from thor_engine.models.provision import publish_dir

from . import coldstart, model
from .coldstart import Mix
from .task import make_problems, write_problems
from .tokenizer import TOKENIZER_VOCAB_SIZE, train_tokenizer

__all__ = [
    "DEFAULT_HELDOUT_SIZE",
    "DEFAULT_TRAIN_SIZE",
    "MARKER",
    "TASK_VERSION",
    "ArithTask",
    "build_task",
]

#: Bump when anything that changes the bytes of a build changes (the fingerprint includes it).
TASK_VERSION = 1
DEFAULT_TRAIN_SIZE = 4000
DEFAULT_HELDOUT_SIZE = 200
MARKER = ".thor-arith.json"


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
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(str(TOKENIZER_VOCAB_SIZE).encode())
    h.update(json.dumps(model.MODEL_SPEC, sort_keys=True).encode())
    for name in ("build.py", "task.py", "coldstart.py", "tokenizer.py", "model.py"):
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
