"""On-policy weight sync from the learner into the in-process vLLM engine, with a probe.

Owns: moving the learner's weights into the running `AsyncLLM` between update rounds,
the way TRAINING.md measured it works: pause generation (waiting for in-flight
requests), `collective_rpc("reload_weights", kwargs={"weights_path": DIR})` with the
weights written as safetensors under shared memory (tensors cannot cross the
engine-core process boundary, files can), reset the prefix cache (cached KV was
computed by the old weights), resume. Then a probe: vLLM's prompt log-probs of a fixed
token sequence must match the learner's (mean absolute gap within a tolerance). A tied checkpoint reloads
"successfully" with a stale head; the probe turns that (or any other silent mismatch)
into an error instead of training on a policy that is not the one sampled.

Does not own: writing the weights (learner.py) or deciding when to sync (runner.py).
On GPUs with large models vLLM's NCCL weight-transfer engine replaces the file hop;
the pause/reload/reset/resume protocol stays.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ProbeMismatch", "SyncResult", "WeightSync", "vllm_prompt_logprobs"]

log = logging.getLogger("trainer.rl.sync")


class ProbeMismatch(RuntimeError):
    """vLLM's log-probs after a sync differ from the learner's: the engine does not run the trained weights."""


@dataclass
class SyncResult:
    seconds: float
    probe_max_abs: float
    probe_mean_abs: float


async def vllm_prompt_logprobs(engine: Any, token_ids: Sequence[int], start: int) -> list[float]:
    """Log-probs vLLM assigns to `token_ids[start:]` given the tokens before each (prompt log-probs)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    final = None
    async for out in engine.generate(
        prompt={"prompt_token_ids": list(token_ids)}, sampling_params=params, request_id=f"probe-{uuid.uuid4().hex}"
    ):
        final = out
    if final is None or final.prompt_logprobs is None:
        raise ProbeMismatch("vLLM returned no prompt log-probs for the probe sequence")
    values: list[float] = []
    for pos in range(start, len(token_ids)):
        entry = final.prompt_logprobs[pos]
        lp = entry.get(token_ids[pos]) if entry else None
        if lp is None:
            raise ProbeMismatch(f"vLLM's prompt log-probs miss token {token_ids[pos]} at position {pos}")
        values.append(float(getattr(lp, "logprob", lp)))
    return values


class WeightSync:
    """Reloads weights into an `AsyncLLM` from a shared-memory directory and probes the result."""

    def __init__(self, engine: Any, probe_ids: Sequence[int], probe_start: int, tolerance: float) -> None:
        self.engine = engine
        self.probe_ids = list(probe_ids)
        self.probe_start = probe_start
        self.tolerance = tolerance
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="thor-rl-weights-", dir=base))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    async def probe(self, learner_logprobs: Callable[[list[int], int], list[float]]) -> tuple[float, float]:
        ours = learner_logprobs(self.probe_ids, self.probe_start)
        theirs = await vllm_prompt_logprobs(self.engine, self.probe_ids, self.probe_start)
        gaps = [abs(a - b) for a, b in zip(ours, theirs, strict=True)]
        worst = max(gaps) if gaps else 0.0
        mean = sum(gaps) / len(gaps) if gaps else 0.0
        if not math.isfinite(worst) or mean > self.tolerance:
            raise ProbeMismatch(
                f"vLLM's log-probs differ from the learner's by {mean:.4f} on average (max {worst:.4f}; tolerance "
                f"{self.tolerance} on the mean) on the probe sequence: the engine is not running the trained "
                "weights (a tied lm_head? a dtype that loses too much? raise engine.probe_tolerance only if the gap "
                "is a known precision effect: bfloat16 inference against a float32 learner is about 0.03)"
            )
        return worst, mean

    async def sync(
        self, write_weights: Callable[[Path], Any], learner_logprobs: Callable[[list[int], int], list[float]]
    ) -> SyncResult:
        t0 = time.perf_counter()
        for old in self.dir.iterdir():
            if old.is_file():
                old.unlink()
        write_weights(self.dir)
        await self.engine.pause_generation(mode="wait")
        try:
            await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(self.dir)})
            await self.engine.reset_prefix_cache()
        finally:
            await self.engine.resume_generation()
        seconds = time.perf_counter() - t0
        worst, mean = await self.probe(learner_logprobs)
        log.info("weights synced in %.2fs; probe |dlogp| max %.2e mean %.2e", seconds, worst, mean)
        return SyncResult(seconds, worst, mean)
