"""On-policy weight sync from the learner into the in-process vLLM engine, with a probe.

Owns: moving the learner's weights into the running `AsyncLLM` between update rounds,
the way TRAINING.md measured it works: pause generation (waiting for in-flight
requests), `collective_rpc("reload_weights", kwargs={"weights_path": DIR})` with the
weights written as safetensors under shared memory (tensors cannot cross the
engine-core process boundary, files can), reset the prefix cache (cached KV was
computed by the old weights), resume. Then a probe on a fixed token sequence, with two
checks. Level: vLLM's prompt log-probs must match the learner's (mean absolute gap within
`tolerance`; this catches a tied head that reloads "successfully" stale, a wrong dtype).
Change: what vLLM's log-probs moved since the first probe must be what the learner's
moved (mean |(vLLM now - vLLM first) - (learner now - learner first)| at most
`change_tolerance` x the learner's mean change, once that change stands above the
precision noise, `NOISE_FACTOR` x the first probe's level gap): one update at lr 1e-6 moves
log-probs far less than the level tolerance, so only this sees a reload that did nothing.
Either mismatch is an error instead of training on a policy that is not the one sampled.
vLLM's prompt log-probs are the raw distribution's (temperature 1, whatever its
logprobs_mode): the learner's side is `Learner.probe_logprobs`.

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

__all__ = ["NOISE_FACTOR", "ProbeMismatch", "ProbeResult", "SyncResult", "WeightSync", "vllm_prompt_logprobs"]

#: The change check applies once the learner's change exceeds this many times the first probe's level
#: gap (float32 against float32: ~1e-6; bfloat16 inference: ~0.03) and 1e-6.
NOISE_FACTOR = 3.0

log = logging.getLogger("trainer.rl.sync")


class ProbeMismatch(RuntimeError):
    """vLLM's log-probs after a sync differ from the learner's: the engine does not run the trained weights."""


@dataclass
class ProbeResult:
    max_abs: float  # max |vLLM - learner| over the probe's tokens
    mean_abs: float  # mean |vLLM - learner|
    change: float  # mean |learner now - learner at the first probe|
    change_gap: float  # mean |(vLLM now - vLLM first) - (learner now - learner first)|
    change_checked: bool  # whether the change stood above the noise (else the change check is vacuous)


@dataclass
class SyncResult:
    seconds: float
    probe: ProbeResult

    @property
    def probe_max_abs(self) -> float:
        return self.probe.max_abs

    @property
    def probe_mean_abs(self) -> float:
        return self.probe.mean_abs


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

    def __init__(
        self,
        engine: Any,
        probe_ids: Sequence[int],
        probe_start: int,
        tolerance: float,
        change_tolerance: float = 0.5,
    ) -> None:
        self.engine = engine
        self.probe_ids = list(probe_ids)
        self.probe_start = probe_start
        self.tolerance = tolerance
        self.change_tolerance = change_tolerance
        self._first: tuple[list[float], list[float], float] | None = None  # learner, vLLM, level gap
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="thor-rl-weights-", dir=base))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    async def probe(self, learner_logprobs: Callable[[list[int], int], list[float]]) -> ProbeResult:
        """Compare vLLM with the learner (*learner_logprobs*: `Learner.probe_logprobs`); the first call
        is the reference of the change check. Raises ProbeMismatch."""
        ours = learner_logprobs(self.probe_ids, self.probe_start)
        theirs = await vllm_prompt_logprobs(self.engine, self.probe_ids, self.probe_start)
        gaps = [abs(a - b) for a, b in zip(ours, theirs, strict=True)]
        n = max(1, len(gaps))
        worst = max(gaps) if gaps else 0.0
        mean = sum(gaps) / n
        if not math.isfinite(worst) or mean > self.tolerance:
            raise ProbeMismatch(
                f"vLLM's log-probs differ from the learner's by {mean:.4f} on average (max {worst:.4f}; tolerance "
                f"{self.tolerance} on the mean) on the probe sequence: the engine is not running the trained "
                "weights (a tied lm_head? a dtype that loses too much? raise engine.probe_tolerance only if the gap "
                "is a known precision effect: bfloat16 inference against a float32 learner is about 0.03)"
            )
        if self._first is None:
            self._first = (ours, theirs, mean)
        ours0, theirs0, level0 = self._first
        dl = [a - a0 for a, a0 in zip(ours, ours0, strict=True)]
        dv = [b - b0 for b, b0 in zip(theirs, theirs0, strict=True)]
        change = sum(abs(x) for x in dl) / n
        change_gap = sum(abs(v - x) for v, x in zip(dv, dl, strict=True)) / n
        checked = change > max(NOISE_FACTOR * level0, 1e-6)
        if checked and change_gap > self.change_tolerance * change:
            moved = sum(abs(v) for v in dv) / n
            raise ProbeMismatch(
                f"since training started the learner's log-probs on the probe sequence moved by {change:.2e} on "
                f"average and vLLM's by {moved:.2e}; they differ by {change_gap:.2e} (tolerance "
                f"{self.change_tolerance} x the learner's change): the reload did not give vLLM the trained weights "
                "(a reload that loaded nothing or stale files? weights written elsewhere than the reloaded directory?)"
            )
        return ProbeResult(worst, mean, change, change_gap, checked)

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
        res = await self.probe(learner_logprobs)
        log.info(
            "weights synced in %.2fs; probe |dlogp| max %.2e mean %.2e; change %.2e, vLLM tracks it within %.2e",
            seconds,
            res.max_abs,
            res.mean_abs,
            res.change,
            res.change_gap,
        )
        return SyncResult(seconds, res)
