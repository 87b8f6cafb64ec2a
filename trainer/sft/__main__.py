"""``python -m trainer.sft``: cold-start SFT on TIRGen data, exporting a checkpoint the server serves.

Owns: the command line (flags -> `SftConfig`) and turning errors into one clear line and
exit status 1. Works the same under ``accelerate launch`` (configs in
trainer/configs/accelerate/: ddp_cpu.yaml, fsdp2.yaml, deepspeed_zero3.yaml).

Does not own: anything the run does (train.py, base_model.py, data.py, export.py, report.py).

Example::

    python -m trainer.sft --data runs/tirgen/x/samples.jsonl \\
        --model models/Qwen2.5-Coder-0.5B-Instruct --out runs/sft/x --lora --epochs 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .data import DataError
from .encode import SegmentError
from .errors import SftError
from .export import ExportError
from .train import SftConfig, run_sft


def build_parser() -> argparse.ArgumentParser:
    d = SftConfig(data=Path(), model=Path(), out=Path())
    ap = argparse.ArgumentParser(
        prog="python -m trainer.sft",
        description="Cold-start SFT: train on tool-integrated trajectories (loss on model tokens only) and export "
        "<out>/final for `python -m server --model`.",
    )
    ap.add_argument("--data", type=Path, required=True, help="samples.jsonl, a TIRGen output dir, or a saved dataset")
    ap.add_argument("--model", type=Path, required=True, help="base model directory (Hugging Face format)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (checkpoints/, final/, reports)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-5, or 1e-4 with --lora)")
    ap.add_argument("--epochs", type=float, default=d.epochs)
    ap.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps; > 0 overrides --epochs")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    ap.add_argument("--grad-accum", type=int, default=d.grad_accum)
    ap.add_argument(
        "--max-length", type=int, default=d.max_length, help="longer sequences are dropped (counted), not truncated"
    )
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--lora", action="store_true", help="train a peft LoRA adapter, merged into the weights on export")
    ap.add_argument("--lora-r", type=int, default=d.lora_r)
    ap.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    ap.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    ap.add_argument(
        "--lora-target", nargs="+", default=d.lora_target, help="module names, or all-linear (default; not lm_head)"
    )
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in <out>/checkpoints")
    ap.add_argument("--overwrite", action="store_true", help="delete <out>/checkpoints of an earlier run first")
    ap.add_argument("--save-steps", type=int, default=d.save_steps)
    ap.add_argument("--save-total-limit", type=int, default=d.save_total_limit)
    ap.add_argument("--logging-steps", type=int, default=d.logging_steps)
    ap.add_argument("--lr-scheduler", default=d.lr_scheduler, help="a transformers scheduler name (cosine, constant)")
    ap.add_argument("--warmup", type=float, default=d.warmup, help="warmup steps, or a fraction of all steps if < 1")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--export-dtype", default=d.export_dtype, help="auto (the base's), bfloat16, float16 or float32")
    ap.add_argument("--eval-json", type=Path, default=None, help="a trainer.evaluate summary.json for the model card")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = SftConfig(
        data=a.data,
        model=a.model,
        out=a.out,
        lr=a.lr,
        epochs=a.epochs,
        max_steps=a.max_steps,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        max_length=a.max_length,
        seed=a.seed,
        lora=a.lora,
        lora_r=a.lora_r,
        lora_alpha=a.lora_alpha,
        lora_dropout=a.lora_dropout,
        lora_target=list(a.lora_target),
        resume=a.resume,
        overwrite=a.overwrite,
        save_steps=a.save_steps,
        save_total_limit=a.save_total_limit,
        logging_steps=a.logging_steps,
        lr_scheduler=a.lr_scheduler,
        warmup=a.warmup,
        weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm,
        bf16=a.bf16,
        gradient_checkpointing=a.gradient_checkpointing,
        export_dtype=a.export_dtype,
        eval_json=a.eval_json,
        disable_tqdm=a.no_progress,
    )
    try:
        result = run_sft(cfg)
    except (SftError, DataError, SegmentError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.final is not None:
        print(result.final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
