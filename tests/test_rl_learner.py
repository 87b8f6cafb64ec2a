"""The RL learner (trainer/rl/learner.py) on a tiny random Qwen2, against plain transformers.

Owns: log-probs equal a plain per-sequence transformers forward (batched, right-padded, uneven
lengths; the probe's `sequence_logprobs` too); an update raises positive-advantage responses'
log-probs and lowers negative ones, with old log-probs fixed before the first step; a tied
checkpoint is untied at load; `save_weights` round-trips into transformers with identical
log-probs (full and LoRA, the LoRA merge equal to peft's); the export loads with
AutoModelForCausalLM and carries the tokenizer; save_state/load_state resume to identical
parameters; clear errors; and DDP for real: `accelerate launch` with 2 CPU processes (gloo)
running one update equals the single-process update.

Does not own: the loss's arithmetic (tests/test_rl_loss.py) or vLLM's weight reload (the runner's).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.rl_ddp_update import OPTIM as DDP_OPTIM
from tests.support.rl_ddp_update import fixed_records
from trainer.rl.config import LossConfig, ModelConfig, OptimConfig
from trainer.rl.learner import WEIGHTS_FILE, Learner, LearnerError
from trainer.rl.records import RolloutRecord

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256


def write_tiny(path: Path, *, tied: bool = False) -> Path:
    """A seeded random 2-layer Qwen2 (hidden 64) with a 256-token vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("rl-learner") / "tiny")


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("rl-learner") / "tied", tied=True)


def learner(path: Path, *, lora: bool = False, **optim) -> Learner:
    settings = {"lr": 1e-3, "mini_batch_size": 16, "micro_batch_size": 3, **optim}
    return Learner(
        ModelConfig(path=str(path), lora=lora, lora_r=4, lora_alpha=8), OptimConfig(**settings), LossConfig()
    )


def plain(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_logprobs(model, rec: RolloutRecord) -> list[float]:
    """log p(response token | everything before it), one sequence at a time, no padding."""
    ids = torch.tensor([rec.prompt_ids + rec.response_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    p = len(rec.prompt_ids)
    return [lp[p + j - 1, t].item() for j, t in enumerate(rec.response_ids)]


def assert_logprobs_close(got: list[list[float]], want: list[list[float]], atol: float = 2e-5) -> None:
    assert [len(x) for x in got] == [len(x) for x in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), atol=atol, rtol=0)


RECORDS = fixed_records(VOCAB)  # 9 records: two groups of uneven lengths, masked tool tokens, one all-masked


# ----------------------------------------------------------------- log-probs


def test_logprobs_equal_a_plain_transformers_forward(tiny) -> None:
    lrn = learner(tiny)
    ref = plain(tiny)
    got = lrn.logprobs(RECORDS)  # micro-batches of 3 mixing prompt lengths 2, 4 and 9
    assert_logprobs_close(got, [reference_logprobs(ref, r) for r in RECORDS])
    assert all(v < 0 for row in got for v in row)
    # the probe: a sequence scored from an index
    seq = RECORDS[5].prompt_ids + RECORDS[5].response_ids
    assert_logprobs_close([lrn.sequence_logprobs(seq, 3)], [reference_logprobs(ref, _split_at(seq, 3))])
    empty = RolloutRecord(prompt_ids=[1], response_ids=[], response_mask=[], reward=0, group="e", level="step")
    assert lrn.logprobs([empty, RECORDS[0]])[0] == []


def _split_at(seq: list[int], start: int) -> RolloutRecord:
    resp = seq[start:]
    return RolloutRecord(seq[:start], resp, [1] * len(resp), reward=0.0, group="p", level="trajectory")


def test_temperature_scales_the_logits(tiny) -> None:
    lrn = Learner(ModelConfig(path=str(tiny)), OptimConfig(), LossConfig(), temperature=0.5)
    ref = plain(tiny)
    rec = RECORDS[0]
    ids = torch.tensor([rec.prompt_ids + rec.response_ids])
    with torch.no_grad():
        lp = torch.log_softmax(ref(ids).logits.float() / 0.5, -1)[0]
    p = len(rec.prompt_ids)
    want = [lp[p + j - 1, t].item() for j, t in enumerate(rec.response_ids)]
    assert_logprobs_close(lrn.logprobs([rec]), [want])


class _Float32Logits:
    """Records the largest float32 tensor with a vocabulary-sized last dimension any op creates."""

    def __init__(self, vocab: int) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() and t.shape[-1] == vocab:
                        outer.largest = max(outer.largest, t.numel())
                return out

        self.largest = 0
        self.mode = Mode()


def test_logprobs_are_computed_in_chunks(tiny) -> None:
    """Only `logprob_chunk` positions of float32 full-vocabulary log-softmax exist at once, forward and
    backward (a bfloat16 base with LoRA: the model's own logits are bfloat16); chunked = unchunked."""
    rec = RECORDS[4]  # 11 response tokens
    chunked = Learner(
        ModelConfig(path=str(tiny), dtype="bfloat16", lora=True, lora_r=4),
        OptimConfig(micro_batch_size=1, mini_batch_size=1, logprob_chunk=2),
        LossConfig(),
    )
    probe = _Float32Logits(VOCAB)
    with probe.mode:
        chunked.update([rec])
    assert 0 < probe.largest <= 2 * VOCAB < len(rec.response_ids) * VOCAB
    whole = Learner(  # one chunk: what the learner did before, [B, R, V] at once
        ModelConfig(path=str(tiny), dtype="bfloat16", lora=True, lora_r=4),
        OptimConfig(micro_batch_size=1, mini_batch_size=1),
        LossConfig(),
    )
    probe = _Float32Logits(VOCAB)
    with probe.mode:
        whole.update([rec])
    assert probe.largest == len(rec.response_ids) * VOCAB
    a = learner(tiny, logprob_chunk=2)
    b = learner(tiny)
    assert_logprobs_close(a.logprobs(RECORDS), b.logprobs(RECORDS), atol=1e-6)
    a.update(RECORDS)
    b.update(RECORDS)
    for (k, pa), pb in zip(a.unwrapped.named_parameters(), b.unwrapped.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------- the update


def test_update_follows_the_advantages(tiny) -> None:
    lrn = learner(tiny, mini_batch_size=16, micro_batch_size=3)
    before = lrn.logprobs(RECORDS)
    stats = lrn.update(RECORDS)
    after = lrn.logprobs(RECORDS)
    assert stats["updates"] == 1 and stats["records"] == 8 and stats["skipped"] == 1
    assert stats["tokens"] == sum(r.trained_tokens for r in RECORDS)
    # one step from the policy that sampled: ratio 1 (up to batching round-off), nothing clipped
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and stats["approx_kl"] == pytest.approx(0, abs=1e-5)
    assert stats["clip_frac_high"] == stats["clip_frac_low"] == stats["dual_clip_frac"] == 0
    assert stats["grad_norm"] > 0 and lrn.optimizer_steps == 1
    moved = 0
    for rec, b, a in zip(RECORDS, before, after, strict=True):
        trained_b = sum(x for x, m in zip(b, rec.response_mask, strict=True) if m)
        trained_a = sum(x for x, m in zip(a, rec.response_mask, strict=True) if m)
        if rec.advantage > 0:
            assert trained_a > trained_b, rec
            moved += 1
        elif rec.advantage < 0:
            assert trained_a < trained_b, rec
            moved += 1
    assert moved == 8


def test_sampled_logprob_gap_is_measured_and_bounded(tiny) -> None:
    """The gap between the sampler's log-probs and the learner's old ones on trained tokens is a stat of
    every update; above `max_logprob_gap` the update is refused before any step (rollouts of another policy)."""
    import dataclasses

    from trainer.rl.learner import OffPolicyError

    lrn = learner(tiny)
    own = lrn.logprobs(RECORDS)
    sampled = [dataclasses.replace(r, response_logprobs=lp) for r, lp in zip(RECORDS, own, strict=True)]
    stats = lrn.update(sampled, max_logprob_gap=1e-4)  # sampled by this very policy: no gap
    assert stats["logprob_gap"] == pytest.approx(0, abs=1e-5) and stats["logprob_gap_max"] < 1e-4
    lrn = learner(tiny)
    # another policy: 0.5 off on every token, except the masked ones (never compared)
    off = [
        dataclasses.replace(
            r, response_logprobs=[x + (0.5 if m else 9.0) for x, m in zip(lp, r.response_mask, strict=True)]
        )
        for r, lp in zip(RECORDS, own, strict=True)
    ]
    before = [p.detach().clone() for p in lrn.model.parameters()]
    with pytest.raises(OffPolicyError, match=r"differ from the learner's by 0\.50.*nothing was trained"):
        lrn.update(off, max_logprob_gap=0.1)
    assert lrn.optimizer_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, lrn.model.parameters(), strict=True))
    assert lrn.update(off)["logprob_gap"] == pytest.approx(0.5, abs=1e-4)  # no bound: measured only
    assert math.isnan(lrn.update(RECORDS)["logprob_gap"])  # no sampled log-probs: nothing to compare


def test_old_logprobs_stay_those_before_the_first_step(tiny) -> None:
    """Several mini-batches and epochs: later steps see ratios away from 1 (old log-probs are not
    recomputed between steps) and the step count is epochs x mini-batches."""
    lrn = learner(tiny, mini_batch_size=3, micro_batch_size=2, epochs=2, lr=3e-3)
    stats = lrn.update(RECORDS)
    assert stats["updates"] == 2 * 3  # 8 trained records in mini-batches of 3, 3, 2; two epochs
    assert stats["ratio_max"] > 1.01 and stats["approx_kl"] != 0
    assert stats["records"] == 8 and stats["skipped"] == 1


def test_tied_checkpoint_is_untied(tiny_tied) -> None:
    cfg = json.loads((tiny_tied / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    lrn = learner(tiny_tied, lr=1e-2)
    assert lrn.was_tied
    m = lrn.base_model
    assert m.config.tie_word_embeddings is False
    head, emb = m.get_output_embeddings().weight, m.get_input_embeddings().weight
    assert head.data_ptr() != emb.data_ptr() and torch.equal(head, emb)
    assert_logprobs_close(lrn.logprobs(RECORDS), [reference_logprobs(plain(tiny_tied), r) for r in RECORDS])
    lrn.update(RECORDS)
    assert not torch.equal(head, emb)  # trained apart: the head vLLM reloads is its own tensor


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_save_weights_round_trips_into_transformers(tmp_path, tiny, lora) -> None:
    from safetensors import safe_open

    lrn = learner(tiny, lora=lora, lr=3e-2 if lora else 1e-3)
    lrn.update(RECORDS)
    d = lrn.save_weights(tmp_path / "w")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", WEIGHTS_FILE]
    loaded = plain(d)
    assert loaded.config.tie_word_embeddings is False
    assert_logprobs_close(lrn.logprobs(RECORDS), [reference_logprobs(loaded, r) for r in RECORDS], atol=1e-5)
    # not the starting weights
    start = plain(tiny)
    assert max((a - b).abs().max().item() for a, b in zip(loaded.parameters(), start.parameters(), strict=True)) > 1e-4
    # the same tensor names transformers itself writes
    with safe_open(str(d / WEIGHTS_FILE), framework="pt") as st:
        names = set(st.keys())
    start.save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as st:
        assert names == set(st.keys())
    assert "lm_head.weight" in names and not any("lora" in n for n in names)
    if lora:  # the merge equals peft's own
        import copy

        merged = copy.deepcopy(lrn.unwrapped).merge_and_unload()
        sd = loaded.state_dict()
        for k, v in merged.state_dict().items():
            torch.testing.assert_close(sd[k], v, rtol=1e-6, atol=1e-6)
        assert lrn.unwrapped.peft_config  # the learner's own model kept its adapter


def test_export_is_a_loadable_checkpoint(tmp_path, tiny, default_model) -> None:
    from transformers import AutoTokenizer

    from trainer.sft.export import TOKENIZER_FILES, check_untied

    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    copied = [n for n in (*TOKENIZER_FILES, "generation_config.json") if (default_model / n).is_file()]
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json"} <= set(copied)
    for name in copied:
        shutil.copyfile(default_model / name, src / name)
    lrn = learner(src)
    with pytest.raises(LearnerError, match="export dtype 'int8'"):
        lrn.export(tmp_path / "x", dtype="int8")
    lrn.update(RECORDS)
    out = lrn.export(tmp_path / "export", dtype="float32", extra_files={"README.md": "# card\n"})
    assert out == tmp_path / "export"
    check_untied(out)
    for name in copied:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert (out / "README.md").read_text() == "# card\n"
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert_logprobs_close(lrn.logprobs(RECORDS), [reference_logprobs(plain(out), r) for r in RECORDS], atol=1e-5)
    # auto: the starting checkpoint's dtype (float32 here); a second export replaces the first
    assert json.loads((lrn.export(out) / "config.json").read_text())["dtype"] == "float32"

    with pytest.raises(LearnerError, match="has no tokenizer files"):
        learner(tiny).export(tmp_path / "no-tok")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_save_state_load_state_resumes_identically(tmp_path, tiny, lora) -> None:
    first, second = RECORDS[:5], RECORDS[4:]
    a = learner(tiny, lora=lora, mini_batch_size=2, micro_batch_size=1, lr=1e-2)
    a.update(first)
    a.save_state(tmp_path / "state")
    a.update(second)

    b = learner(tiny, lora=lora, mini_batch_size=2, micro_batch_size=1, lr=1e-2)
    b.load_state(tmp_path / "state")
    # first: 4 trained records (RECORDS[3] is all-masked) in mini-batches of 2; second: 5 -> 3 steps
    assert (b.optimizer_steps, a.optimizer_steps) == (2, 5)
    b.update(second)  # same shuffle (update count restored), same Adam moments
    sa, sb = a.unwrapped.state_dict(), b.unwrapped.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = learner(tiny, lora=lora, mini_batch_size=2, micro_batch_size=1, lr=1e-2)
    c.update(second)  # without the state: a different model
    assert any(not torch.equal(sa[k], v) for k, v in c.unwrapped.state_dict().items())


def test_clear_errors(tmp_path, tiny) -> None:
    with pytest.raises(LearnerError, match=r"no config\.json there"):
        learner(tmp_path)
    lrn = learner(tiny)
    masked = RECORDS[3]
    assert masked.trained_tokens == 0
    with pytest.raises(LearnerError, match="none has a trained token"):
        lrn.update([masked])
    with pytest.raises(LearnerError, match=r"start must be in \[1, 2\]"):
        lrn.sequence_logprobs([1, 2, 3], 0)
    no_prompt = RolloutRecord(prompt_ids=[], response_ids=[5], response_mask=[1], reward=1, group="x", level="step")
    with pytest.raises(LearnerError, match="no prompt_ids"):
        lrn.logprobs([no_prompt])
    with pytest.raises(LearnerError, match=r"state .* does not exist"):
        lrn.load_state(tmp_path / "missing")


def test_bfloat16_full_fine_tuning_is_refused(tiny) -> None:
    """AdamW on bfloat16 weights at lr 1e-6 leaves about 98% of them unchanged: refused with the fix;
    LoRA on a bfloat16 base is fine (peft keeps the adapter, hence its optimizer state, in float32)."""
    from pydantic import ValidationError

    from trainer.rl.config import RlConfigError, load_config

    with pytest.raises(ValidationError, match=r"bfloat16 with full fine-tuning.*dtype: float32.*lora: true"):
        ModelConfig(path=str(tiny), dtype="bfloat16")
    with pytest.raises(RlConfigError, match="model: Value error, dtype bfloat16 with full fine-tuning"):
        load_config(None, {"model.path": str(tiny), "problems.path": "p.jsonl", "out": "o", "model.dtype": "bfloat16"})
    lrn = Learner(
        ModelConfig(path=str(tiny), dtype="bfloat16", lora=True, lora_r=4), OptimConfig(lr=1e-6), LossConfig()
    )
    trainable = [p for p in lrn.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert lrn.base_model.model.embed_tokens.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------- DDP, for real


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ddp_two_cpu_processes_equal_one(tmp_path, tiny, lora) -> None:
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    script = str(ROOT / "tests" / "support" / "rl_ddp_update.py")
    extra = ["--lora"] if lora else []
    one = subprocess.run(
        [sys.executable, script, "--model", str(tiny), "--out", str(tmp_path / "one"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-4000:]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch",
         "--config_file", str(ROOT / "trainer/configs/accelerate/ddp_cpu.yaml"),
         "--main_process_port", str(free_port()),
         script, "--model", str(tiny), "--out", str(tmp_path / "two"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    assert "[rl-ddp] process 0 of 1 (NO" in one.stderr
    for rank in (0, 1):  # both ranks joined the gloo process group
        assert f"[rl-ddp] process {rank} of 2 (MULTI_CPU, backend gloo)" in two.stderr

    s1 = json.loads((tmp_path / "one" / "stats.json").read_text())
    s2 = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert (s1["num_processes"], s2["num_processes"]) == (1, 2)
    # the same global token-mean: two optimizer steps (mini-batches of 5 and 3 records), the same
    # token counts, losses and gradient norms (Adam's first steps hide a gradient scale error; the
    # norm does not)
    st1, st2 = s1["stats"], s2["stats"]
    assert st1["updates"] == st2["updates"] == 2 and st1["skipped"] == st2["skipped"] == 1
    assert st1["tokens"] == st2["tokens"] == sum(r.trained_tokens for r in fixed_records(VOCAB)) / 2
    for k in ("loss", "pg_loss", "nll", "grad_norm", "grad_norm_max", "ratio_mean", "ratio_max"):
        assert st2[k] == pytest.approx(st1[k], rel=1e-5, abs=1e-7), k

    w1 = load_file(str(tmp_path / "one" / "weights" / WEIGHTS_FILE))
    w2 = load_file(str(tmp_path / "two" / "weights" / WEIGHTS_FILE))
    start = plain(tiny).state_dict()
    assert w1.keys() == w2.keys() == start.keys()
    for k in w1:
        # a key bias shifts every score of a query by the same amount, which the softmax cancels:
        # its gradient is 0 in exact arithmetic and float round-off, which Adam's first step blows
        # up to about +-lr, differs between any two summation orders
        if not k.endswith("self_attn.k_proj.bias"):
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    moved = max((w1[k] - start[k]).abs().max().item() for k in w1)
    assert moved > DDP_OPTIM.lr / 10  # both runs trained (and equally)
