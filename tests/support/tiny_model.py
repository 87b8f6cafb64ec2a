"""A tiny random-weight Qwen2 checkpoint with a real tokenizer, for fast tests.

Owns: writing a deterministic (seeded) Qwen2ForCausalLM with hidden size 64 and two
layers, carrying the tokenizer, chat template and token ids of a real model directory,
as a Hugging Face directory that transformers and vLLM load like any other. It decodes
at well over 100 tok/s on two CPU cores, so engine and decoder tests can run the real
vLLM path without paying for a real model. Builds are atomic and idempotent.

Does not own: the real models (see :mod:`thor_engine.models.provision`), or anything a
test asserts about generated text: the weights are random, the output is gibberish.

CLI::

    python -m tests.support.tiny_model OUT --tokenizer models/Qwen2.5-Coder-0.5B-Instruct
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from thor_engine.models.provision import publish_dir

__all__ = ["TINY_SPEC", "build_tiny_model"]

MARKER = ".thor-tiny.json"

#: Architecture of the tiny model (vocabulary and special ids come from the tokenizer).
TINY_SPEC: dict[str, int | float | bool] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    # vLLM's CPU attention supports head sizes 32, 64, 80, ... (not 16).
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "initializer_range": 0.5,
    "seed": 1234,
}

# Files copied verbatim from the tokenizer source when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)


def hash_tokenizer_source(h: Any, tokenizer_source: Path) -> None:
    """Feed the tokenizer files and config of *tokenizer_source* into the hash *h*."""
    for name in (*TOKENIZER_FILES, "config.json"):
        f = tokenizer_source / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())


def is_complete(out_dir: Path, marker: str, fp: str) -> bool:
    """True when *out_dir* holds a finished build whose marker records fingerprint *fp*."""
    try:
        return json.loads((out_dir / marker).read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


def copy_tokenizer(tokenizer_source: Path, tok: Any, dest: Path) -> None:
    """Copy the tokenizer files verbatim (saving *tok* when the source has no tokenizer.json)."""
    for name in TOKENIZER_FILES:
        src = tokenizer_source / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
    if not (dest / "tokenizer.json").is_file():
        tok.save_pretrained(dest)


def _fingerprint(tokenizer_source: Path) -> str:
    h = hashlib.sha256(json.dumps(TINY_SPEC, sort_keys=True).encode())
    hash_tokenizer_source(h, tokenizer_source)
    return h.hexdigest()


@contextlib.contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """One build of *out_dir* at a time across processes: two test workers asking for the same
    cached model wait for one build (and a reader never sees a directory being swapped)."""
    key = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"thor-build-{key}.lock", "w") as lock:  # not beside the model
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_tiny_model(out_dir: Path, tokenizer_source: Path, *, force: bool = False) -> Path:
    """Write the tiny model into *out_dir* (reused when already built from the same source).

    *tokenizer_source* is a Hugging Face model directory (e.g. a provisioned preset);
    its tokenizer, chat template, generation config and special token ids are reused,
    and the vocabulary size matches its ``config.json`` (or the tokenizer length).
    """
    out_dir, tokenizer_source = Path(out_dir), Path(tokenizer_source)
    if (
        not (tokenizer_source / "tokenizer.json").is_file()
        and not (tokenizer_source / "tokenizer_config.json").is_file()
    ):
        raise FileNotFoundError(f"{tokenizer_source} holds no tokenizer files")
    with build_lock(out_dir):
        return _build(out_dir, tokenizer_source, _fingerprint(tokenizer_source), force)


def _build(out_dir: Path, tokenizer_source: Path, fp: str, force: bool) -> Path:
    if not force and is_complete(out_dir, MARKER, fp):
        return out_dir

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_source)
    src_cfg: dict = {}
    if (tokenizer_source / "config.json").is_file():
        src_cfg = json.loads((tokenizer_source / "config.json").read_text())
    vocab = int(src_cfg.get("vocab_size") or len(tok))
    vocab = max(vocab, len(tok))

    spec = dict(TINY_SPEC)
    seed = int(spec.pop("seed"))
    config = Qwen2Config(
        vocab_size=vocab,
        bos_token_id=src_cfg.get("bos_token_id", tok.bos_token_id),
        eos_token_id=src_cfg.get("eos_token_id", tok.eos_token_id),
        pad_token_id=src_cfg.get("pad_token_id", tok.pad_token_id),
        rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
        use_sliding_window=False,
        architectures=["Qwen2ForCausalLM"],
        **spec,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.config.dtype = torch.bfloat16
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(tokenizer_source, tok, tmp)
        (tmp / MARKER).write_text(
            json.dumps({"fingerprint": fp, "tokenizer_source": str(tokenizer_source), "spec": TINY_SPEC}, indent=2)
            + "\n"
        )
        publish_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.support.tiny_model", description="Write a tiny random-weight Qwen2 model for tests."
    )
    ap.add_argument("out", type=Path, help="output model directory")
    ap.add_argument(
        "--tokenizer", type=Path, required=True, help="model directory whose tokenizer and chat template to reuse"
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = ap.parse_args(argv)
    try:
        path = build_tiny_model(args.out, args.tokenizer, force=args.force)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
