"""The decoder on real vLLM (CPU build): the tiny random model for engine mechanics
(n > 1, cancellation, prefix cache) and the default model for a real tool call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from thor_engine.backend import GenParams
from thor_engine.backends.vllm_backend import EngineOptions, VllmBackend
from thor_engine.config import SamplingOptions, ThorConfig
from thor_engine.decoder import FENCE_STOP, ThorDecoder, collect, finals
from thor_engine.events import CodeBlock, FinishReason, TextDelta, ToolCall
from thor_engine.prompting import render_chat
from thor_engine.tools import SandboxExecutor
from thor_sandbox.client import SandboxClient

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.sandbox]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(default_model) -> Path:
    from tests.support.tiny_model import build_tiny_model

    return build_tiny_model(ROOT / ".cache" / "models" / "tiny-random-qwen2", tokenizer_source=default_model)


@pytest.fixture(scope="module")
async def tiny_backend(tiny_model) -> AsyncIterator[VllmBackend]:
    backend = await VllmBackend.start(
        EngineOptions(model=str(tiny_model), dtype="bfloat16", enforce_eager=True, max_model_len=2048)
    )
    yield backend
    backend.shutdown()


@pytest.fixture
async def executor(sandbox) -> AsyncIterator[SandboxExecutor]:
    async with SandboxClient(sandbox.url) as client:
        yield SandboxExecutor(client)


async def wait_idle(backend: VllmBackend, timeout: float = 120.0) -> int:
    """Unfinished engine requests once they are gone (0), or after `timeout`: a liveness bound
    for a hung engine on a busy machine, not a speed requirement."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (n := await backend.num_unfinished_requests()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return n


async def test_prefix_cache_serves_repeated_prompt(tiny_backend):
    tok = tiny_backend.tokenizer
    ids = tok.encode("word " * 600, add_special_tokens=False)
    cached = []
    for i in range(2):
        async for chunk in tiny_backend.generate(ids, GenParams(max_tokens=4), f"pc-{i}"):
            if chunk.num_cached_tokens is not None:
                cached.append(chunk.num_cached_tokens)
    assert cached[0] == 0
    assert cached[1] >= len(ids) - 128  # whole blocks of the repeated prompt come from the cache


async def test_n_samples_run_concurrently(tiny_backend, executor):
    dec = ThorDecoder(tiny_backend, executor)
    ids = render_chat(tiny_backend.tokenizer, [{"role": "user", "content": "Say anything."}])
    events = await collect(dec.stream(ids, ThorConfig(), SamplingOptions(max_tokens=40, temperature=1.0, seed=3), n=4))
    fs = finals(events)
    assert [f.sample for f in fs] == [0, 1, 2, 3]
    for f in fs:  # length exactly when the 40-token budget was spent; stop (EOS) only before it
        assert (f.finish_reason, f.usage.completion_tokens == 40) in {
            (FinishReason.length, True),
            (FinishReason.stop, False),
        }, (f.finish_reason, f.usage)
    assert len({f.text for f in fs}) > 1  # different seeds per sample
    # events of different samples interleave: they were generated side by side
    order = [e.sample for e in events if isinstance(e, TextDelta)]
    first_final = next(i for i, e in enumerate(events) if e.type == "final")
    assert len(set(order[:first_final])) > 1
    assert await wait_idle(tiny_backend) == 0


async def test_cancellation_leaves_nothing_running(tiny_backend, executor):
    dec = ThorDecoder(tiny_backend, executor)
    ids = render_chat(tiny_backend.tokenizer, [{"role": "user", "content": "Write a lot."}])
    agen = dec.stream(ids, ThorConfig(), SamplingOptions(max_tokens=1500, temperature=1.0, seed=1), n=2)
    deltas = 0
    async for ev in agen:
        deltas += isinstance(ev, TextDelta)
        if deltas >= 20:
            break
    assert await tiny_backend.num_unfinished_requests() >= 1  # they were really running
    await agen.aclose()
    assert await wait_idle(tiny_backend) == 0


class RecordingBackend:
    """The real backend, recording the parameters of every generation request it is sent."""

    def __init__(self, inner: VllmBackend) -> None:
        self.inner, self.params = inner, []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def generate(self, prompt_token_ids, params: GenParams, request_id: str):
        self.params.append(params)
        return self.inner.generate(prompt_token_ids, params, request_id)


async def test_echo_prompt_logprobs_are_computed_once_per_prompt(tiny_backend, executor):
    """`echo` with logprobs and n samples: the engine scores the prompt once (one request asks for
    prompt logprobs) and every choice carries the same entries, one per prompt token."""
    from thor_engine.engine import ThorEngine

    recording = RecordingBackend(tiny_backend)
    engine = ThorEngine(recording, executor, "tiny")  # type: ignore[arg-type]
    prompt = engine.text_prompt("word " * 200)
    sampling = SamplingOptions(max_tokens=3, temperature=1.0, seed=5)
    chunks = [c async for c in engine.generate_plain(prompt, sampling, n=4, logprobs=2, prompt_logprobs=2)]
    assert len(recording.params) == 4
    assert [p.prompt_logprobs for p in recording.params].count(2) == 1
    assert [p.prompt_logprobs for p in recording.params].count(None) == 3
    firsts = {}
    for c in chunks:
        firsts.setdefault(c.index, c)
    assert sorted(firsts) == [0, 1, 2, 3]
    entries = [firsts[i].prompt_logprobs for i in range(4)]
    assert entries[0] is not None and len(entries[0]) == prompt.num_tokens
    assert entries[0][0][1] is None and all(isinstance(e[1], float) for e in entries[0][1:])
    assert all(e == entries[0] for e in entries)
    assert [c.prompt_logprobs for c in chunks].count(None) == len(chunks) - 4  # on first chunks only
    assert await wait_idle(tiny_backend) == 0


@pytest.fixture(scope="module")
async def default_backend(default_model) -> AsyncIterator[VllmBackend]:
    backend = await VllmBackend.start(
        EngineOptions(model=str(default_model), dtype="bfloat16", enforce_eager=True, max_model_len=4096)
    )
    yield backend
    backend.shutdown()


async def test_default_model_writes_and_runs_code(default_backend, executor):
    dec = ThorDecoder(default_backend, executor)
    tok = default_backend.tokenizer
    ids = render_chat(tok, [{"role": "user", "content": "What is 123*457? Use Python."}])
    events = await collect(dec.stream(ids, ThorConfig(), SamplingOptions(max_tokens=400)))
    [final] = finals(events)
    blocks = [e for e in events if isinstance(e, CodeBlock)]
    calls = [e for e in events if isinstance(e, ToolCall) and e.committed]
    assert blocks and calls, final.text
    assert calls[0].ok and "56211" in calls[0].observation  # really executed in the sandbox
    assert f"```output\n{calls[0].observation}\n```" in final.text
    assert final.answer == "56211"
    # the first engine request stopped exactly at the closing fence of the block
    first_model = final.trajectory["segments"][1]
    assert first_model["kind"] == "model"
    assert tok.decode(first_model["token_ids"]).endswith(FENCE_STOP)
    # the continuation request was served from the prefix cache
    u = final.usage
    assert u.engine_requests >= 2 and u.cached_prompt_tokens > 0
    assert u.cached_prompt_tokens / (u.cached_prompt_tokens + u.prefilled_prompt_tokens) > 0.5
    assert await wait_idle(default_backend) == 0
