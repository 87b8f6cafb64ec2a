"""`python -m trainer.rl`: hierarchical RL (trajectory + step-level GRPO) from a config file.

Owns: the command line: the YAML config (see trainer/configs/rl/), flags for the common
settings and `--set section.key=value` for any other, `--resume`, logging, exit codes
(0 done, 1 the run failed: no sandbox, vLLM could not load, a probe mismatch, off-policy rollouts; 2 a bad
config or flag).

Does not own: the run (runner.py) or the settings' meaning (config.py).

Examples::

    python -m trainer.rl --config trainer/configs/rl/arith-demo.yaml --out runs/rl/arith
    python -m trainer.rl --config runs/rl/arith/config.yaml --resume
    accelerate launch --config_file trainer/configs/accelerate/ddp_cpu.yaml -m trainer.rl --config ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import yaml

from .config import RlConfigError, load_config

EXIT_OK, EXIT_RUN, EXIT_INPUT = 0, 1, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.rl",
        description="Hierarchical RL for THOR: trajectory-level and step-level GRPO with rollouts through the "
        "serving decoder on vLLM and the real sandbox; writes checkpoints `python -m server --model` serves.",
    )
    p.add_argument("--config", help="YAML config (trainer/configs/rl/*.yaml); flags below override it")
    p.add_argument("--out", help="run directory (config key: out)")
    p.add_argument("--model", help="starting checkpoint (model.path)")
    p.add_argument("--problems", help="training problems JSONL (problems.path)")
    p.add_argument("--steps", type=int, help="RL steps (schedule.steps)")
    p.add_argument("--group-size", type=int, help="samples per group, both levels (trajectory/step.group_size)")
    p.add_argument("--groups-per-step", type=int, help="kept trajectory groups per batch (trajectory.groups_per_step)")
    p.add_argument("--lr", type=float, help="learning rate (optim.lr)")
    p.add_argument("--no-step-level", action="store_true", help="trajectory-level GRPO only (step.enabled=false)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (model.lora=true)")
    p.add_argument("--eval-every", type=int, help="held-out evaluation every N steps (eval.every)")
    p.add_argument("--seed", type=int, help="schedule.seed")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting, e.g. --set trajectory.max_tokens=256 --set loss.nll_coef=0 (VALUE is YAML)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="engine and HTTP logs")
    return p.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    flat = {
        "out": args.out,
        "model.path": args.model,
        "problems.path": args.problems,
        "schedule.steps": args.steps,
        "trajectory.groups_per_step": args.groups_per_step,
        "optim.lr": args.lr,
        "eval.every": args.eval_every,
        "schedule.seed": args.seed,
    }
    o.update({k: v for k, v in flat.items() if v is not None})
    if args.group_size is not None:
        o["trajectory.group_size"] = o["step.group_size"] = args.group_size
    if args.no_step_level:
        o["step.enabled"] = False
    if args.lora:
        o["model.lora"] = True
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RlConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trajectory.max_tokens=256")
        try:
            o[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise RlConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from e
    return o


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # vLLM's engine core and worker are other processes: their log level comes from the environment
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        for name in ("vllm", "httpx", "thor_engine.vllm", "thor_sandbox"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, overrides(args))
    except RlConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    if args.print_config:
        print(cfg.dump())
        return EXIT_OK
    from .learner import LearnerError
    from .runner import RlRunError, run
    from .sync import ProbeMismatch

    try:
        final = run(cfg, resume=args.resume, progress=not args.no_progress)
    except (RlRunError, ProbeMismatch, LearnerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUN
    print(f"[rl] done: serve it with `python -m server --model {final}`", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
