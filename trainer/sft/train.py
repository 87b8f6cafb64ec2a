"""Cold-start SFT training: the HF ``Trainer`` on pre-tokenised trajectories.

Owns: `SftConfig` (every setting of a run), `run_sft` (load tokenizer and data, load the
base model untied, optionally wrap it in a peft LoRA adapter, train with
``transformers.Trainer`` on ``accelerate``, resume from the last checkpoint, then export
the served checkpoint, write the loss log/plot and ``sft.json``), and `PaddingCollator`
(right-pads ``input_ids`` with the pad token and ``labels`` with -100). Under
``accelerate launch`` every rank trains; only rank 0 exports and writes reports. What is
trained is exactly what is exported (the base is untied before training).

Does not own: loading and untying the base model (base_model.py), `SftError` (errors.py),
tokenisation (encode.py), reading the data (data.py), the checkpoint layout and model card
(export.py), plots and logs (report.py), the CLI (__main__.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.splits import TrainingProblems

from .base_model import load_base_model
from .data import DataStats, load_sft_dataset, training_problem_ids
from .encode import IGNORE_INDEX
from .errors import SftError
from .export import export_checkpoint

__all__ = [
    "CHECKPOINTS_DIR",
    "FINAL_DIR",
    "SFT_JSON",
    "PaddingCollator",
    "SftConfig",
    "SftResult",
    "run_sft",
]

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
SFT_JSON = "sft.json"
_WEIGHTS_DIR = ".trained-weights"


@dataclass
class SftConfig:
    data: Path
    model: Path
    out: Path
    lr: float | None = None  # default: 1e-5 full fine-tuning, 1e-4 LoRA
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 4096
    seed: int = 0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target: list[str] = field(default_factory=lambda: ["all-linear"])
    resume: bool = False
    overwrite: bool = False
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 1
    lr_scheduler: str = "cosine"
    warmup: float = 0.0  # steps (>= 1) or a fraction of all steps (< 1)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = False  # bf16 autocast (GPUs); master weights stay fp32
    gradient_checkpointing: bool = False
    export_dtype: str = "auto"  # auto = the base checkpoint's dtype; or bfloat16, float16, float32
    eval_json: Path | None = None
    disable_tqdm: bool = False

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.lora else 1e-5

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        d["learning_rate"] = self.learning_rate
        return d


@dataclass
class SftResult:
    out: Path
    final: Path | None  # None on ranks other than 0
    global_step: int
    final_loss: float | None
    world_size: int
    data: DataStats
    wall_s: float


@dataclass
class PaddingCollator:
    """Right-pads a batch: ``input_ids`` with *pad_id*, ``labels`` with -100, plus ``attention_mask``."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            if len(f["labels"]) != n:
                raise ValueError(f"feature {i}: {n} input_ids but {len(f['labels'])} labels")
            ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _checkpoints(out: Path) -> list[Path]:
    d = out / CHECKPOINTS_DIR
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def _log(msg: str) -> None:
    print(f"[sft] {msg}", file=sys.stderr, flush=True)


def _check_config(cfg: SftConfig) -> None:
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise SftError(f"nothing to train: --epochs {cfg.epochs} and no --max-steps; give one of them > 0")
    for name in ("batch_size", "grad_accum", "save_steps", "logging_steps", "max_length"):
        if getattr(cfg, name) < 1:
            raise SftError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.learning_rate <= 0:
        raise SftError(f"--lr must be > 0 (got {cfg.learning_rate})")
    if not Path(cfg.model).exists():
        raise SftError(
            f"{cfg.model}: no such base model directory (provision it: python -m thor_engine.models.provision)"
        )
    if cfg.export_dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise SftError(f"--export-dtype {cfg.export_dtype!r}: expected auto, bfloat16, float16 or float32")
    if cfg.eval_json is not None and not Path(cfg.eval_json).is_file():
        raise SftError(f"--eval-json {cfg.eval_json}: no such file (a trainer.evaluate summary.json)")


def run_sft(cfg: SftConfig) -> SftResult:
    """Train, then (rank 0) export ``<out>/final`` and write reports; see the module docstring."""
    import torch
    from accelerate import PartialState
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from .report import write_reports

    t0 = time.monotonic()
    _check_config(cfg)
    out = Path(cfg.out)
    use_cpu = not torch.cuda.is_available()
    state = PartialState(cpu=use_cpu)
    main = state.is_main_process
    _log(
        f"process {state.process_index} of {state.num_processes} "
        f"({state.distributed_type.value}, backend {state.backend or 'none'}, {'cpu' if use_cpu else 'cuda'})"
    )

    existing = _checkpoints(out)
    if existing and not cfg.resume and not cfg.overwrite:
        raise SftError(
            f"{out / CHECKPOINTS_DIR} holds {existing[-1].name} from an earlier run: "
            "pass --resume to continue it or --overwrite to start over"
        )
    if cfg.overwrite and main:
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
        existing = []
    state.wait_for_everyone()
    if cfg.overwrite:
        existing = []
    resume_from = str(existing[-1]) if cfg.resume and existing else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume and resume_from is None:
            _log(f"--resume: no checkpoint under {out / CHECKPOINTS_DIR} yet, starting from the base model")
        elif resume_from:
            _log(f"resuming from {resume_from}")

    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
    dataset, stats = load_sft_dataset(cfg.data, tokenizer, cfg.max_length)
    if main:
        _log(
            f"data: {stats.samples_read} samples read, {stats.dropped_too_long} dropped (longer than "
            f"{cfg.max_length} tokens), {stats.kept} kept; {stats.tokens} tokens, {stats.trained_tokens} trained on"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SftError(f"{cfg.model}: the tokenizer has neither a pad nor an EOS token to pad batches with")

    model, was_tied = load_base_model(cfg.model)
    if main and was_tied:
        _log("the base model ties lm_head to the embedding: untied (lm_head = a copy of the embedding)")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        target: str | list[str] = cfg.lora_target[0] if cfg.lora_target == ["all-linear"] else list(cfg.lora_target)
        lcfg = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=target,
            task_type="CAUSAL_LM",
        )
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, lcfg)
        if main:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            _log(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}: {trainable:,} of {total:,} parameters trained")

    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS_DIR),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to="none",
        bf16=cfg.bf16,
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and state.num_processes > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=not use_cpu,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=cfg.disable_tqdm,
        gradient_checkpointing=False,  # enabled on the model above (LoRA needs input grads first)
    )
    train_ds = dataset.remove_columns(["length"])

    class _Wall(TrainerCallback):
        """Log lines name the step and the wall clock (the Trainer's own line has neither)."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if state.is_world_process_zero and logs and "loss" in logs:
                _log(
                    f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                    f"lr {logs.get('learning_rate', 0):.3g} epoch {logs.get('epoch', 0):.2f} "
                    f"{time.monotonic() - t0:.0f}s"
                )

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=PaddingCollator(pad_id),
        processing_class=tokenizer,
        callbacks=[_Wall()],
    )
    train_out = trainer.train(resume_from_checkpoint=resume_from)
    world_size = trainer.args.world_size

    # the trained weights as the Trainer saves them (gathered under FSDP / ZeRO-3; the
    # adapter alone with LoRA), then rank 0 builds the served checkpoint from them
    weights = out / _WEIGHTS_DIR
    trainer.save_model(str(weights))
    state.wait_for_everyone()
    final: Path | None = None
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    final_loss = losses[-1] if losses else None
    if main:
        wall = time.monotonic() - t0
        summary = {
            "settings": cfg.to_dict(),
            "data": stats.to_dict(),
            "world_size": world_size,
            "device": "cpu" if use_cpu else "cuda",
            "base_tied_embeddings": was_tied,
            "resumed_from": resume_from,
            "global_step": trainer.state.global_step,
            "epochs_done": trainer.state.epoch,
            "input_tokens_seen": int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0),
            "final_loss": final_loss,
            "train_runtime_s": train_out.metrics.get("train_runtime"),
            "wall_s": round(wall, 2),
        }
        write_reports(history, out)
        final = export_checkpoint(
            weights,
            cfg.model,
            out / FINAL_DIR,
            dtype=cfg.export_dtype,
            card={**summary, "data_path": str(cfg.data)},
            eval_json=cfg.eval_json,
            training_problems=TrainingProblems(problems=training_problem_ids(cfg.data), sources=[str(cfg.data)]),
        )
        shutil.rmtree(weights, ignore_errors=True)
        summary["wall_s"] = round(time.monotonic() - t0, 2)
        summary["final_dir"] = str(final)
        (out / SFT_JSON).write_text(json.dumps(summary, indent=2) + "\n")
        _log(f"done: step {trainer.state.global_step}, final loss {final_loss}, served checkpoint {final}")
    state.wait_for_everyone()
    return SftResult(out, final, trainer.state.global_step, final_loss, world_size, stats, time.monotonic() - t0)
