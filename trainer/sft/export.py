"""The served checkpoint: what ``python -m server --model <dir>`` loads unchanged.

Owns: building ``<out>/final`` from the weights the Trainer saved (a full model, or a peft
LoRA adapter that is merged into the untied base here): bf16/fp16/fp32 safetensors with
``tie_word_embeddings=False`` and a separate ``lm_head.weight`` tensor (checked after
writing), the base model's tokenizer files and chat template copied byte for byte, its
``generation_config.json`` (or one made from the tokenizer's end tokens), and a README.md
model card (base model, data and sample counts, settings, final loss, and evaluation
results from a ``trainer.evaluate`` summary.json, now or later with `update_card`). The
card's inputs are kept in ``thor_sft.json`` so the card can be re-rendered.
Written into a temporary directory and moved into place, so a crash leaves no half export.

Does not own: training (train.py), loading the base model untied (base_model.py) or the
evaluation itself (trainer/evaluate/).

CLI (add evaluation results to an exported card)::

    python -m trainer.sft.export runs/sft/x/final --eval-json runs/eval/after/summary.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .base_model import load_base_model

__all__ = [
    "CARD_FILE",
    "CARD_JSON",
    "ExportError",
    "check_untied",
    "export_checkpoint",
    "render_card",
    "update_card",
]

CARD_FILE = "README.md"
CARD_JSON = "thor_sft.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


class ExportError(RuntimeError):
    """The export could not produce a checkpoint the server can serve."""


def _base_dtype(base: Path) -> str:
    cfg = json.loads((base / "config.json").read_text()) if (base / "config.json").is_file() else {}
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    return str(dtype).removeprefix("torch.")


def check_untied(model_dir: str | Path) -> None:
    """Raise ExportError unless the checkpoint is untied: config flag off and its own lm_head tensor."""
    from safetensors import safe_open

    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("tie_word_embeddings", False) or (cfg.get("text_config") or {}).get("tie_word_embeddings", False):
        raise ExportError(f"{d}/config.json says tie_word_embeddings=true: vLLM's weight reload would be wrong")
    keys: set[str] = set()
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            keys.update(st.keys())
    if not keys:
        raise ExportError(f"{d}: no safetensors weights")
    if not any(k.endswith("lm_head.weight") for k in keys):
        raise ExportError(f"{d}: no lm_head.weight tensor in the safetensors (the head is still tied)")


def _load_trained(weights: Path, base: Path) -> Any:
    """The trained model in fp32: the saved full model, or the base with the LoRA adapter merged."""
    if (weights / "adapter_config.json").is_file():
        from peft import PeftModel

        model, _ = load_base_model(base)
        merged = PeftModel.from_pretrained(model, str(weights)).merge_and_unload()
        return merged
    if not (weights / "config.json").is_file():
        raise ExportError(f"{weights}: neither a model (config.json) nor a LoRA adapter (adapter_config.json)")
    model, _ = load_base_model(weights)
    return model


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_card(info: dict[str, Any], eval_markdown: str | None = None) -> str:
    """The model card (Markdown) from the run's summary (sft.json's content) and optional eval tables."""
    s = info.get("settings", {})
    d = info.get("data", {})
    method = (
        f"LoRA (r={s.get('lora_r')}, alpha={s.get('lora_alpha')}, dropout={s.get('lora_dropout')}, "
        f"targets {', '.join(s.get('lora_target', []))}), merged into the base weights"
        if s.get("lora")
        else "full fine-tuning"
    )
    lines = [
        "---",
        f"base_model: {s.get('model', '')}",
        "tags: [thor, tool-integrated-reasoning, sft]",
        "---",
        "",
        f"# THOR cold-start SFT of {Path(str(s.get('model', 'the base model'))).name}",
        "",
        "Tool-integrated reasoning trajectories (text, ```python blocks, executed ```output blocks) "
        "trained with `python -m trainer.sft`: each segment tokenised as the THOR decoder appends it, loss on "
        "the model's tokens only (prompt and tool outputs masked), the chat template's end token appended. "
        "Serve with `python -m server --model <this directory>`. Embeddings untied (separate `lm_head`).",
        "",
        "## Data",
        "",
        f"- path: `{info.get('data_path', s.get('data', ''))}`",
        f"- samples read: {d.get('samples_read')}, dropped (longer than {d.get('max_length')} tokens): "
        f"{d.get('dropped_too_long')}, trained on: {d.get('kept')}",
        f"- tokens: {d.get('tokens')} in all, {d.get('trained_tokens')} with loss (per epoch)",
        "",
        "## Training",
        "",
        f"- method: {method}",
        f"- learning rate {_fmt(s.get('learning_rate'))} ({s.get('lr_scheduler')}, warmup {_fmt(s.get('warmup'))}), "
        f"batch {s.get('batch_size')} x accumulation {s.get('grad_accum')} x {info.get('world_size')} processes, "
        f"max length {s.get('max_length')}, seed {s.get('seed')}",
        f"- steps: {info.get('global_step')} (epochs {_fmt(info.get('epochs_done'))}), "
        f"final training loss: {_fmt(info.get('final_loss'))}",
        f"- device: {info.get('device')}, training time {_fmt(info.get('train_runtime_s'))} s",
        "",
        "## Evaluation",
        "",
    ]
    if eval_markdown:
        lines.append(eval_markdown.strip())
    else:
        lines.append(
            "Not evaluated yet. Run `python -m trainer.evaluate` against this checkpoint and add the results with "
            "`python -m trainer.sft.export <this directory> --eval-json <run>/summary.json`."
        )
    return "\n".join(lines) + "\n"


def _eval_markdown(eval_json: Path) -> str:
    from trainer.evaluate.metrics import Summary
    from trainer.evaluate.report import render_markdown

    try:
        summary = Summary.model_validate_json(Path(eval_json).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{eval_json}: not a trainer.evaluate summary.json ({e})") from e
    md = render_markdown(summary, title=f"Results ({Path(eval_json).parent.name})")
    # one heading level down, under the card's "Evaluation"
    return "\n".join("##" + ln if ln.startswith("#") else ln for ln in md.splitlines())


def update_card(model_dir: str | Path, eval_json: str | Path) -> Path:
    """Re-render ``README.md`` of an exported checkpoint with evaluation results added."""
    d = Path(model_dir)
    if not (d / CARD_JSON).is_file():
        raise ExportError(f"{d}: no {CARD_JSON}; not a checkpoint exported by trainer.sft")
    info = json.loads((d / CARD_JSON).read_text())
    info.setdefault("eval_json", [])
    if str(eval_json) not in info["eval_json"]:
        info["eval_json"].append(str(eval_json))
    md = "\n\n".join(_eval_markdown(Path(p)) for p in info["eval_json"])
    (d / CARD_FILE).write_text(render_card(info, md))
    (d / CARD_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return d / CARD_FILE


def export_checkpoint(
    weights: str | Path,
    base: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    card: dict[str, Any] | None = None,
    eval_json: str | Path | None = None,
    training_problems: Any = None,
) -> Path:
    """Write the served checkpoint into *out_dir* (replaced atomically) and return it.

    *training_problems* (`trainer.splits.TrainingProblems`): written as ``thor_training.json``, so the
    evaluation harness refuses to score the checkpoint on the problems it was trained on."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from thor_engine.models.provision import publish_dir

    weights, base, out_dir = Path(weights), Path(base), Path(out_dir)
    target = _base_dtype(base) if dtype == "auto" else dtype
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(target)
    if torch_dtype is None:
        raise ExportError(f"export dtype {target!r} (from {base}/config.json): expected bfloat16, float16 or float32")
    model = _load_trained(weights, base)
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.config.tie_word_embeddings = False
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight.data_ptr() == emb.weight.data_ptr():
        raise ExportError("the trained model's lm_head shares the embedding tensor; cannot export untied")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        copied = [n for n in TOKENIZER_FILES if (base / n).is_file()]
        for n in copied:
            shutil.copyfile(base / n, tmp / n)
        tok = AutoTokenizer.from_pretrained(str(base))
        if not copied:
            tok.save_pretrained(tmp)
        if not tok.chat_template:
            raise ExportError(f"{base}: the tokenizer has no chat template; the server needs one to render chats")
        if (base / "generation_config.json").is_file():
            shutil.copyfile(base / "generation_config.json", tmp / "generation_config.json")
        else:
            from .encode import end_token_id

            ends = sorted({end_token_id(tok), *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
            GenerationConfig(
                bos_token_id=tok.bos_token_id,
                eos_token_id=ends if len(ends) > 1 else ends[0],
                pad_token_id=tok.pad_token_id,
            ).save_pretrained(tmp)
        check_untied(tmp)
        info = dict(card or {})
        info["export_dtype"] = target
        info["eval_json"] = [str(eval_json)] if eval_json else []
        (tmp / CARD_JSON).write_text(json.dumps(info, indent=2) + "\n")
        md = _eval_markdown(Path(eval_json)) if eval_json else None
        (tmp / CARD_FILE).write_text(render_card(info, md))
        if training_problems is not None:
            from trainer.splits import TRAINING_PROBLEMS_FILE

            (tmp / TRAINING_PROBLEMS_FILE).write_text(training_problems.model_dump_json(indent=2) + "\n")
        publish_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m trainer.sft.export", description="Add evaluation results to an SFT checkpoint's model card."
    )
    ap.add_argument("model_dir", type=Path, help="an exported checkpoint (<sft out>/final)")
    ap.add_argument("--eval-json", type=Path, required=True, help="a trainer.evaluate summary.json")
    args = ap.parse_args(argv)
    try:
        path = update_card(args.model_dir, args.eval_json)
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
