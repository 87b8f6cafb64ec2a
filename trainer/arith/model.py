"""The arithmetic task's base model: a from-scratch, untied, ~1M-parameter Qwen2.

Owns: the architecture (`MODEL_SPEC`: hidden 128, 4 layers, 4 heads of 32 (vLLM's CPU
attention supports head size 32, not 16), MLP 384, 1,024 positions, untied output layer,
float32 weights) and writing a seeded random initialisation plus the task's tokenizer and
a ``generation_config.json`` (EOS ``<|im_end|>``) as a Hugging Face directory that
transformers, ``python -m trainer.sft`` and vLLM load like any other model.

The output layer is untied because vLLM's in-place weight reload (the RL stage) silently
reloads tied embeddings wrongly; float32 because the model is tiny and RL compares the
learner's log-probs with vLLM's.

Does not own: the tokenizer's training (tokenizer.py) or any training of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .tokenizer import MODEL_MAX_LENGTH

__all__ = ["MODEL_SPEC", "write_base_model"]

MODEL_SPEC: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "dtype": "float32",
}


def write_base_model(out: Path, tokenizer: Any, *, seed: int) -> Path:
    """Write the randomly initialised model (seeded by *seed*) and *tokenizer* into *out*."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    spec = dict(MODEL_SPEC)
    rope_theta = spec.pop("rope_theta")
    spec.pop("dtype")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
        rope_parameters={"rope_theta": rope_theta, "rope_type": "default"},
        use_sliding_window=False,
        architectures=["Qwen2ForCausalLM"],
        **spec,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    if model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("the arithmetic base model came out tied; it must be untied for vLLM's weight reload")
    model.config.dtype = torch.float32
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
