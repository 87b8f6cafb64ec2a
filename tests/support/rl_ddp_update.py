"""One RL learner update on a fixed batch, for the DDP test (tests/test_rl_learner.py).

Owns: the fixed batch (`fixed_records`: two groups of uneven prompt and response lengths,
tool-output tokens masked, one record with nothing to train on) and a script that builds a
`Learner` on MODEL, runs one `update` (two mini-batches with gradient accumulation), and
(main process) writes OUT/weights (save_weights) and OUT/stats.json. Run it with plain
python (one process) or under ``accelerate launch`` (several): the weights must agree.

Does not own: the tiny model (the test writes it) or any assertion (the test makes them).

    accelerate launch --config_file trainer/configs/accelerate/ddp_cpu.yaml \\
        tests/support/rl_ddp_update.py --model DIR --out DIR [--lora]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

from trainer.rl.config import LossConfig, ModelConfig, OptimConfig  # noqa: E402
from trainer.rl.loss import group_advantages  # noqa: E402
from trainer.rl.records import RolloutRecord  # noqa: E402

#: 9 records, 8 with trained tokens: mini-batches of 5 and 3; micro-batches of at most 2
OPTIM = OptimConfig(lr=1e-3, mini_batch_size=5, micro_batch_size=2, grad_clip=1.0)


def fixed_records(vocab: int, seed: int = 0) -> list[RolloutRecord]:
    """Two groups of four plus an all-masked record; rewards 1/0 so advantages are +-; some tool tokens."""
    rng = random.Random(seed)
    out: list[RolloutRecord] = []
    for g, plen in enumerate((4, 9)):
        prompt = [rng.randrange(vocab) for _ in range(plen)]
        for k in range(4):
            n = rng.randrange(3, 12)
            mask = [1] * n
            if k == 1:  # a tool output in the middle: not trained on
                mask[1:3] = [0, 0]
            out.append(
                RolloutRecord(
                    prompt_ids=prompt,
                    response_ids=[rng.randrange(vocab) for _ in range(n)],
                    response_mask=mask,
                    reward=float(k % 2 == 0),
                    group=f"g{g}",
                    level="trajectory" if g == 0 else "step",
                )
            )
    out.insert(3, RolloutRecord(prompt_ids=[1, 2], response_ids=[3, 4], response_mask=[0, 0], reward=1.0,
                                group="masked", level="trajectory"))  # fmt: skip
    group_advantages(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator

    from trainer.rl.learner import Learner

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--lora", action="store_true")
    args = ap.parse_args(argv)

    acc = Accelerator(cpu=True)
    print(
        f"[rl-ddp] process {acc.process_index} of {acc.num_processes} ({acc.distributed_type.value}, "
        f"backend {acc.state.backend or 'none'})",
        file=sys.stderr,
        flush=True,
    )
    mcfg = ModelConfig(path=str(args.model), lora=args.lora, lora_r=4, lora_alpha=8)
    learner = Learner(mcfg, OPTIM, LossConfig(), acc, seed=7)
    vocab = learner.base_model.config.vocab_size
    stats = learner.update(fixed_records(vocab))
    learner.save_weights(args.out / "weights")
    if acc.is_main_process:
        info = {"num_processes": acc.num_processes, "stats": stats}
        (args.out / "stats.json").write_text(json.dumps(info, indent=2) + "\n")
    acc.wait_for_everyone()
    acc.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
