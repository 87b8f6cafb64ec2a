"""The tiny TIR model: a trained test fixture that really writes THOR trajectories.

Build checks (transformers) and the real decoder on real vLLM (CPU) with the real
sandbox (nsjail): code blocks stop at their closing fence, run, and the model goes
on from the real output with its memorised text; continuations hit the prefix cache;
a failing first call exercises self-correction."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import require_vllm
from tests.support.tiny_tir_model import (
    TIR_PROBLEMS,
    TirProblem,
    build_tiny_tir_model,
    training_sequences,
)
from thor_engine.config import SamplingOptions, SelfCorrectionConfig, ThorConfig

ROOT = Path(__file__).resolve().parents[1]
TIR_DIR = ROOT / ".cache" / "models" / "tiny-tir"
FENCE = "\n```\n"


def problem(name: str) -> TirProblem:
    return next(p for p in TIR_PROBLEMS if p.name == name)


@pytest.fixture(scope="module")
def tir_model(default_model) -> Path:
    return build_tiny_tir_model(TIR_DIR, default_model)


# ----------------------------------------------------------------- problem set


def test_problem_set_covers_the_cases() -> None:
    kinds = {p.kind for p in TIR_PROBLEMS}
    assert kinds == {"single", "two_call", "self_correct", "long"}
    assert 6 <= len(TIR_PROBLEMS) <= 10
    assert len({p.prompt for p in TIR_PROBLEMS}) == len(TIR_PROBLEMS)
    for p in TIR_PROBLEMS:
        assert p.completion.endswith(f"\\boxed{{{p.answer}}}.")
        assert len(p.code_blocks) == len(p.observations) == p.rounds >= 1
        assert p.first_round.endswith(FENCE) and p.first_round.count("```") == 2
        assert "".join(text for _, text in p.segments()) == p.completion
    assert problem("divzero").observations[0] == "ZeroDivisionError: division by zero"
    assert problem("divisors360").rounds == 3


def test_training_sequences_match_the_decoders_tokens(default_model) -> None:
    """Prompt from render_chat, each model segment and each injection tokenised alone."""
    from transformers import AutoTokenizer

    from thor_engine.observation import injection
    from thor_engine.prompting import render_chat

    tok = AutoTokenizer.from_pretrained(default_model)
    for seq in training_sequences(tok):
        p = seq.problem
        prompt = render_chat(tok, [{"role": "user", "content": p.prompt}])
        assert seq.token_ids[: seq.prompt_len] == prompt
        obs_ids = tok.encode(injection(p.observations[0], True), add_special_tokens=False)
        first = tok.encode(p.first_round, add_special_tokens=False)
        assert seq.token_ids[seq.prompt_len : seq.prompt_len + len(first) + len(obs_ids)] == first + obs_ids
        assert seq.loss_mask[seq.prompt_len : seq.prompt_len + len(first)] == [1] * len(first)
        assert seq.loss_mask[seq.prompt_len + len(first) : seq.prompt_len + len(first) + len(obs_ids)] == [0] * len(
            obs_ids
        )
        assert tok.decode(seq.token_ids[-1:]) == "<|im_end|>" and seq.loss_mask[-1] == 1
    long = next(s for s in training_sequences(tok) if s.problem.kind == "long")
    assert 300 <= sum(long.loss_mask) <= 400


# ----------------------------------------------------------------- build (transformers)


def hf_rollout(model, tok, p: TirProblem) -> tuple[str, str]:
    """Greedy decoding as the decoder does it: stop at each closing fence, inject the
    memorised observation as tokens, go on to EOS. Returns (first round, whole completion)."""
    import torch

    from thor_engine.observation import injection
    from thor_engine.prompting import render_chat

    ids = render_chat(tok, [{"role": "user", "content": p.prompt}])
    start = len(ids)
    first_round = None
    observations = list(p.observations)
    for _ in range(p.rounds + 1):
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=500,
            do_sample=False,
            stop_strings=[FENCE],
            tokenizer=tok,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        )
        new = out[0, len(ids) :].tolist()
        ids += new
        text = tok.decode(new, skip_special_tokens=True)
        if first_round is None:
            first_round = text
        if not text.endswith(FENCE) or not observations:
            break
        ids += tok.encode(injection(observations.pop(0), True), add_special_tokens=False)
    return first_round or "", tok.decode(ids[start:], skip_special_tokens=True)


@pytest.mark.slow
def test_build_is_complete_and_idempotent(tir_model, default_model) -> None:
    cfg = json.loads((tir_model / "config.json").read_text())
    ref = json.loads((default_model / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2 and cfg["head_dim"] == 32
    assert cfg["vocab_size"] == ref["vocab_size"] and cfg["architectures"] == ["Qwen2ForCausalLM"]
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert (tir_model / name).is_file(), name
    marker = json.loads((tir_model / ".thor-tiny-tir.json").read_text())
    assert marker["wrong_tokens"] == {"bf16": 0, "fp32": 0} and marker["min_margin"]["bf16"] > 2
    mtime = (tir_model / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_tir_model(TIR_DIR, default_model) == tir_model
    assert (tir_model / "model.safetensors").stat().st_mtime_ns == mtime
    assert not list(TIR_DIR.parent.glob(".tiny-tir.*.tmp"))  # no temporary left behind


@pytest.mark.slow
def test_transformers_greedy_reproduces_every_trajectory(tir_model) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tir_model)
    model = AutoModelForCausalLM.from_pretrained(tir_model)
    model.eval()
    for p in TIR_PROBLEMS:
        first, whole = hf_rollout(model, tok, p)
        assert first == p.first_round, p.name  # exactly up to the first closing fence
        assert whole == p.completion, p.name  # and on from each injected output


@pytest.mark.slow
def test_build_is_deterministic_and_atomic(default_model, tmp_path) -> None:
    """Two builds (a few steps, unverified: this checks the build, not the memorising) are byte-identical."""
    a = build_tiny_tir_model(tmp_path / "a", default_model, steps=8, verify=False)
    b = build_tiny_tir_model(tmp_path / "b", default_model, steps=8, verify=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# ----------------------------------------------------------------- real decoder on vLLM


@contextlib.contextmanager
def vllm_cpu_env() -> Iterator[None]:
    """Small KV cache, both cores, only while the engine process is spawned."""
    want = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    saved = {k: os.environ.get(k) for k in want}
    for k, v in want.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


@pytest.fixture(scope="module")
async def tir_backend(tir_model) -> AsyncIterator:
    require_vllm()  # a missing engine is an error, not a skip
    from thor_engine.backends.vllm_backend import EngineOptions, VllmBackend

    with vllm_cpu_env():
        backend = await VllmBackend.start(
            EngineOptions(model=str(tir_model), dtype="bfloat16", enforce_eager=True, max_model_len=2048)
        )
    try:
        yield backend
    finally:
        backend.shutdown()


@pytest.fixture
async def executor(sandbox) -> AsyncIterator:
    from thor_engine.tools import SandboxExecutor
    from thor_sandbox.client import SandboxClient

    async with SandboxClient(sandbox.url) as client:
        yield SandboxExecutor(client)


async def run(
    backend, executor, p: TirProblem, config: ThorConfig | None = None, sampling: SamplingOptions | None = None
):
    from thor_engine.decoder import ThorDecoder, collect, finals
    from thor_engine.prompting import render_chat

    dec = ThorDecoder(backend, executor)
    ids = render_chat(backend.tokenizer, [{"role": "user", "content": p.prompt}])
    events = await collect(dec.stream(ids, config or ThorConfig(), sampling or SamplingOptions(max_tokens=800)))
    [final] = finals(events)
    return events, final


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.sandbox
async def test_decoder_runs_real_tool_rounds(tir_backend, executor) -> None:
    from thor_engine.decoder import FENCE_STOP
    from thor_engine.events import CodeBlock, FinishReason, ToolCall

    p = problem("modpow")  # two calls, reasoning between them
    events, final = await run(tir_backend, executor, p)
    tok = tir_backend.tokenizer
    blocks = [e for e in events if isinstance(e, CodeBlock)]
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [b.code for b in blocks] == p.code_blocks
    # really executed in the sandbox: stdout of the real run, observation from it
    assert [c.stdout for c in calls] == ["9\n", "14\n"]
    assert all(c.ok and c.committed and c.outcome == "ok" and c.duration_s > 0 for c in calls)
    for c in calls:
        assert f"```output\n{c.observation}\n```\n" in final.text
    assert final.text == p.completion
    assert final.answer == p.answer == "14"
    assert final.finish_reason is FinishReason.stop
    # the first engine request stopped exactly at the closing fence of the first block
    segs = final.trajectory["segments"]
    assert [s["kind"] for s in segs] == ["prompt", "model", "observation", "model", "observation", "model"]
    first = tok.decode(segs[1]["token_ids"])
    assert first == p.first_round and first.endswith(FENCE_STOP)
    # each continuation request was served (mostly) from the prefix cache
    u = final.usage
    assert u.engine_requests == 3 and u.discarded_tokens == 0
    assert u.cached_prompt_tokens > 0
    assert u.cached_prompt_tokens + u.prefilled_prompt_tokens == (
        len(segs[0]["token_ids"])
        + len(segs[1]["token_ids"])
        + len(segs[2]["token_ids"])
        + sum(len(s["token_ids"]) for s in segs[:5])
    )


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.sandbox
@pytest.mark.parametrize("name", [p.name for p in TIR_PROBLEMS])
async def test_every_memorised_trajectory_on_vllm(tir_backend, executor, name) -> None:
    p = problem(name)
    cfg = ThorConfig(self_correction=SelfCorrectionConfig(enabled=False))
    _, final = await run(tir_backend, executor, p, cfg)
    assert final.text == p.completion
    assert final.answer == p.answer
    assert final.tools.calls == p.rounds and final.usage.engine_requests == p.rounds + 1


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.sandbox
async def test_failing_first_call_exercises_self_correction(tir_backend, executor) -> None:
    from thor_engine.events import Backtrack, ToolCall

    p = problem("divzero")
    tok = tir_backend.tokenizer
    round_tokens = len(tok.encode(p.first_round, add_special_tokens=False))
    sc = SelfCorrectionConfig(enabled=True, max_retries=2)
    events, final = await run(
        tir_backend,
        executor,
        p,
        ThorConfig(self_correction=sc),
        SamplingOptions(max_tokens=800, temperature=0.7, seed=11),
    )
    backtracks = [e for e in events if isinstance(e, Backtrack)]
    calls = [e for e in events if isinstance(e, ToolCall)]
    # the memorised model fails the same way on every resample: 2 retries, then the error is committed
    assert len(backtracks) == 2
    assert all(b.tokens_dropped == round_tokens and b.reason == "error" for b in backtracks)
    assert [c.committed for c in calls] == [False, False, True, True]
    assert not calls[0].ok and calls[0].observation == "ZeroDivisionError: division by zero"
    assert calls[-1].ok and calls[-1].stdout == "undefined\n"
    assert final.usage.discarded_tokens == 2 * round_tokens
    assert final.usage.generated_tokens == final.usage.model_tokens + final.usage.discarded_tokens
    assert final.text == p.completion and final.answer == p.answer
