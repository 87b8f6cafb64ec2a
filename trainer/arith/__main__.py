"""``python -m trainer.arith build OUT``: write the arithmetic task directory.

Owns: the command line (flags -> `build_task`) and turning errors into one clear line and
exit status 1. Prints the paths of the built task.

Does not own: anything the build does (build.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .build import DEFAULT_HELDOUT_SIZE, DEFAULT_TRAIN_SIZE, build_task
from .coldstart import MIX


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m trainer.arith",
        description="The synthetic arithmetic tool-use task: problems, a from-scratch tiny base model and its "
        "tokenizer, and cold-start SFT samples (for python -m trainer.sft).",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write OUT/problems, OUT/base and OUT/coldstart (reused when already built)")
    b.add_argument("out", type=Path, help="task directory")
    b.add_argument("--seed", type=int, default=0, help="seeds the problems, the branch mix and the initial weights")
    b.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE, help="training problems (and samples)")
    b.add_argument("--heldout-size", type=int, default=DEFAULT_HELDOUT_SIZE, help="held-out problems")
    b.add_argument(
        "--guess",
        choices=("nearby", "rounded"),
        default=MIX.guess,
        help="the cold start's wrong guesses: the answer +- 1..30, or the factors rounded to tens and multiplied",
    )
    b.add_argument("--force", action="store_true", help="rebuild even when a complete build is there")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        task = build_task(
            a.out,
            seed=a.seed,
            train_size=a.train_size,
            heldout_size=a.heldout_size,
            mix=replace(MIX, guess=a.guess),
            force=a.force,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name in ("base_model", "train_problems", "heldout_problems", "coldstart_samples"):
        print(f"{name}: {getattr(task, name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
