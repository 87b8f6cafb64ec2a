"""Weight sync into the in-process vLLM engine and its probe (trainer/rl/sync.py), for real: a tiny
Qwen2 (real tokenizer) on vLLM (CPU, float32) and the RL learner on the same weights.

Owns: a reload that did nothing stops the run even when the update is far below the level
tolerance (one AdamW step at the reference lr 1e-6); a real reload passes with vLLM tracking
the learner's change; at a temperature other than 1 the probe (raw log-probs) and the rollouts'
sampled log-probs (the engine's processed_logprobs) agree with the learner.

Does not own: the learner's arithmetic (tests/test_rl_learner.py), a whole run (tests/test_rl.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.rl_ddp_update import fixed_records
from thor_engine.backends.vllm_backend import VllmBackend
from thor_engine.config import SamplingOptions, rl_rollout_config
from thor_engine.decoder import ThorDecoder
from trainer.evaluate.benchmarks import Problem
from trainer.rl.config import (
    EngineConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ProblemsConfig,
    RlConfig,
    StepLevelConfig,
    TrajectoryConfig,
)
from trainer.rl.learner import Learner
from trainer.rl.loss import group_advantages
from trainer.rl.records import RolloutRecord
from trainer.rl.rollout import RolloutWorker, prompt_ids_for
from trainer.rl.runner import engine_options
from trainer.rl.sync import ProbeMismatch, WeightSync, vllm_prompt_logprobs

pytestmark = [pytest.mark.vllm, pytest.mark.sandbox, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PROBLEM = Problem(benchmark="toy", id="p1", index=0, problem="What is 37 * 48 + 12?", answer="1788")


@pytest.fixture(scope="module")
def checker():
    from thor_engine.answer import AnswerChecker

    with AnswerChecker(max_workers=1) as c:
        yield c


@pytest.fixture(scope="module")
def tiny(default_model) -> Path:
    from tests.support.tiny_model import build_tiny_model

    return build_tiny_model(ROOT / ".cache" / "models" / "tiny-random-qwen2", tokenizer_source=default_model)


@pytest.fixture(scope="module")
def policy0(tiny, tmp_path_factory) -> Path:
    """What the runner starts vLLM from: the learner's untied export of the starting checkpoint."""
    return Learner(ModelConfig(path=str(tiny)), OptimConfig(), LossConfig()).export(
        tmp_path_factory.mktemp("rl-sync") / "policy-0", dtype="float32"
    )


@pytest.fixture(scope="module")
async def backend(policy0, tmp_path_factory) -> AsyncIterator[VllmBackend]:
    """The engine as the runner starts it (engine_options), float32."""
    cfg = RlConfig(
        model=ModelConfig(path=str(policy0)),
        problems=ProblemsConfig(path="unused.jsonl"),
        out=str(tmp_path_factory.mktemp("rl-sync-run")),
        engine=EngineConfig(dtype="float32", max_model_len=1024, max_num_seqs=8),
    )
    b = await VllmBackend.start(engine_options(cfg, policy0))
    yield b
    b.shutdown()


class NoopReload:
    """The real engine, except that `reload_weights` can be made to do nothing: a fault a healthy vLLM
    cannot show on demand (a reload that loaded nothing)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.noop = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "reload_weights" and self.noop:
            return []
        return await self.engine.collective_rpc(method, *args, **kwargs)


def probe_sequence(tokenizer) -> tuple[list[int], int]:
    prompt = prompt_ids_for(tokenizer, PROBLEM)
    tail = tokenizer.encode("I will compute it with Python.\n```python\nprint(1 + 2)\n```\n", add_special_tokens=False)
    return prompt + tail, len(prompt)


async def test_a_reload_that_did_nothing_stops_the_run(backend, tiny) -> None:
    lrn = Learner(ModelConfig(path=str(tiny)), OptimConfig(lr=1e-6), LossConfig())  # the reference lr
    engine = NoopReload(backend.engine)
    ids, start = probe_sequence(backend.tokenizer)
    sync = WeightSync(engine, ids, start, tolerance=0.05)  # the level tolerance the runner had
    try:
        first = await sync.sync(lrn.save_weights, lrn.probe_logprobs)  # the learner's weights, for real
        assert first.probe.mean_abs < 1e-4 and first.probe.change == 0
        assert lrn.update(fixed_records(lrn.base_model.config.vocab_size))["updates"] >= 1

        engine.noop = True
        with pytest.raises(ProbeMismatch, match="the reload did not give vLLM the trained weights"):
            await sync.sync(lrn.save_weights, lrn.probe_logprobs)
        # the level check alone passes: one update moves log-probs far less than its tolerance
        ours = lrn.probe_logprobs(ids, start)
        theirs = await vllm_prompt_logprobs(backend.engine, ids, start)
        level = sum(abs(a - b) for a, b in zip(ours, theirs, strict=True)) / len(ours)
        assert level < 0.05 / 10

        engine.noop = False  # a reload that works: vLLM moved as the learner did
        res = await sync.sync(lrn.save_weights, lrn.probe_logprobs)
        assert res.probe.change_checked and res.probe.change > 0
        assert res.probe.change_gap < 0.1 * res.probe.change
        print(f"level {level:.2e}, change {res.probe.change:.2e}, change gap {res.probe.change_gap:.2e}")
    finally:
        sync.close()


async def test_temperature_other_than_one_keeps_probe_and_sampled_logprobs_consistent(
    backend, tiny, executor, checker
) -> None:
    """At temperature 0.7 the rollouts' sampled log-probs (through the decoder) are those of the tempered
    distribution, as the learner's old log-probs; the probe compares raw log-probs on both sides."""
    lrn = Learner(ModelConfig(path=str(tiny)), OptimConfig(lr=1e-6), LossConfig(), temperature=0.7)
    ids, start = probe_sequence(backend.tokenizer)
    sync = WeightSync(backend.engine, ids, start, tolerance=1e-3)
    try:
        await sync.sync(lrn.save_weights, lrn.probe_logprobs)  # vLLM runs this learner's weights
    finally:
        sync.close()
    worker = RolloutWorker(
        ThorDecoder(backend, executor), checker, TrajectoryConfig(temperature=0.7, max_tokens=24), StepLevelConfig()
    )
    prompt = prompt_ids_for(backend.tokenizer, PROBLEM)
    sampling = SamplingOptions(temperature=0.7, max_tokens=24, seed=3, logprobs=True)
    rollouts = await worker._sample(prompt, rl_rollout_config(5), sampling, 4, "temp")
    records = [
        RolloutRecord(r.prompt_ids, r.response_ids, r.response_mask, reward=float(i % 2), group="g",
                      level="trajectory", response_logprobs=r.response_logprobs)
        for i, r in enumerate(rollouts)
    ]  # fmt: skip
    group_advantages(records)
    assert sum(r.trained_tokens for r in records) > 20
    stats = lrn.update(records, max_logprob_gap=1e-3)
    assert stats["logprob_gap"] < 1e-3, stats
    print(f"temperature 0.7: sampled vs learner gap {stats['logprob_gap']:.2e} (max {stats['logprob_gap_max']:.2e})")
