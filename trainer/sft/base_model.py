"""The base model as SFT, the export and the RL learner load it: a causal LM with its own output layer.

Owns: `load_base_model` (a Hugging Face causal LM, fp32 by default: master weights for
training) and `untie_output_embeddings` (a tied model gets its embedding copied into a
separate ``lm_head``; `SftError` when it cannot be untied).

Untying: vLLM's in-place weight reload (the RL stage) is silently wrong with tied
embeddings, so a tied base is untied before training (train.py), before a LoRA adapter is
merged into it (export.py) and before RL updates it (trainer/rl/learner.py).

Does not own: training (train.py), writing the served checkpoint (export.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SftError

__all__ = ["load_base_model", "untie_output_embeddings"]


def untie_output_embeddings(model: Any) -> bool:
    """Give a tied model its own ``lm_head`` (a copy of the embedding); True when it was tied."""
    import torch

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    cfgs = [model.config, getattr(model.config, "text_config", None)]
    tied_cfg = any(c is not None and getattr(c, "tie_word_embeddings", False) for c in cfgs)
    shared = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    for c in cfgs:
        if c is not None and hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False
    if head is not None and shared:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    if head is not None and head.weight.data_ptr() == emb.weight.data_ptr():
        raise SftError("could not untie the output layer from the embedding; the export would be tied")
    return tied_cfg or shared


def load_base_model(path: str | Path, dtype: Any = None) -> tuple[Any, bool]:
    """The base causal LM (fp32 by default: master weights for training), untied. Returns (model, was_tied)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    was_tied = untie_output_embeddings(model)
    return model, was_tied
