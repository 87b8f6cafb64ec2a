"""Hierarchical-RL rollouts through the serving decoder: trajectory groups and step-level groups.

Owns: turning problems into GRPO groups of `RolloutRecord`s with THOR's reference rules,
by running `thor_engine`'s `ThorDecoder` (the very loop the server runs) on the
in-process vLLM engine with the real sandbox:

- **Trajectory level.** G samples of a problem (`rl_rollout_config`: reference
  observations, at most 5 calls, no self-correction, the trajectory ends at its first
  failed call). Reward 1 for a right `\\boxed` answer (math-verify), else 0; a
  repetitive text gets 0. Dropped: rollouts with a failed call, shorter than
  `min_response_tokens`, or without a non-empty `\\boxed` near the end (or, with
  `format_reward`, kept with that reward); a group with fewer survivors than
  `min_survivor_fraction` x G, or with zero reward variance, is dropped.
- **Re-encoded tokens.** Where the decoder cut the text inside a token (a stop or a fence
  sharing a token with what follows) it re-encodes the kept remainder: those model tokens
  were not sampled (no log-prob) and are masked from the loss, counted in `reencoded`.
- **Sandbox failures** (tool outcome `sandbox_error`: busy after retries, a dead worker)
  are not the code's: such a rollout is dropped as "sandbox error" (no reward, not a
  failed call) and is never a step-level source; a continuation whose block the sandbox
  could not run is dropped the same way (no step reward).
- **Step level.** From a rollout whose call failed (else, optionally, a random rollout with
  code), the trajectory is cut at the token level `backtrack_tokens` before the failed
  block's opening fence (never into the prompt or a tool output); G continuations run
  with `rl_step_config` and stop right after their first executed block, without its
  output. Reward 1 when that block ran (the serving rule: exit 0 and something printed).
  Only continuations that reached a block are kept; the same group filters apply. The
  loss covers only the regenerated tokens (the cut prefix is the record's prompt).

All groups of a round run as concurrent asyncio tasks on one engine, so vLLM batches
their requests; the sandbox pool bounds concurrent executions.

Does not own: advantages and the loss (loss.py), the schedule of rounds and dynamic
sampling across rounds (runner.py), or the decoder itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from thor_engine.answer import AnswerChecker
from thor_engine.config import SamplingOptions, rl_rollout_config, rl_step_config
from thor_engine.decoder import ThorDecoder
from thor_engine.events import CodeBlock, Final, FinishReason, ToolCall
from thor_engine.prompting import TIR_INSTRUCTIONS, render_chat
from thor_engine.tools import sandbox_request_scope
from trainer.evaluate.benchmarks import Problem
from trainer.evaluate.modes import MODES
from trainer.tirgen.filters import find_repetition

from .config import StepLevelConfig, TrajectoryConfig
from .records import RolloutRecord

__all__ = ["GroupResult", "Rollout", "RolloutWorker", "prompt_ids_for"]

#: The tool outcome of a call the sandbox itself could not run (thor_engine.tools: busy, a dead worker).
SANDBOX_ERROR = "sandbox_error"

#: A text repeating a 20-character window 5 times is degenerate: reward 0 (TIRGen's repetition rule).
REPETITION_WINDOW, REPETITION_COUNT = 20, 5


def prompt_ids_for(tokenizer: Any, problem: Problem) -> list[int]:
    """The prompt exactly as the server (and `trainer.evaluate --modes thor-rl`) renders it."""
    return render_chat(tokenizer, MODES["thor-rl"].messages(problem.problem), tir_instructions=TIR_INSTRUCTIONS)


@dataclass
class Rollout:
    """One sampled trajectory (or step continuation) and what the trainer reads from it."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    response_logprobs: list[float] | None
    text: str
    answer: str | None
    finish_reason: str
    calls: int
    ok_calls: int
    failed_calls: int
    #: (index of the opening fence's token in prompt+response, ran ok) per executed block, in order;
    #: ok is None when the sandbox itself failed (outcome sandbox_error): the code never ran
    blocks: list[tuple[int, bool | None]] = field(default_factory=list)
    correct: bool = False
    reward: float = 0.0
    drop: str | None = None  # why a filter dropped it (None: kept)
    #: model tokens the decoder re-encoded at a text cut (not sampled: no log-prob): masked from the loss
    reencoded: int = 0

    @property
    def failed_block(self) -> int | None:
        """Fence token of the first block whose code failed, if any (a sandbox failure is not the code's)."""
        return next((tok for tok, ok in self.blocks if ok is False), None)

    @property
    def sandbox_errors(self) -> int:
        """Blocks the sandbox could not run (outcome sandbox_error): they say nothing about the code."""
        return sum(ok is None for _, ok in self.blocks)


@dataclass
class GroupResult:
    group: str
    level: Literal["trajectory", "step"]
    problem: Problem
    rollouts: list[Rollout]
    reason: str | None = None  # why the whole group was dropped (None: kept)
    records: list[RolloutRecord] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        return self.reason is None


def _rollout_from(final: Final, blocks: list[tuple[int, bool | None]], prompt_len: int) -> Rollout:
    traj = final.trajectory or {}
    ids: list[int] = []
    mask: list[int] = []
    lps: list[float] = []
    has_lp = False
    reencoded = 0
    for seg in traj.get("segments", []):
        n = len(seg["token_ids"])
        ids.extend(seg["token_ids"])
        seg_lp = seg.get("logprobs")
        model = seg["kind"] == "model"
        if seg_lp is not None:
            has_lp = True
            lps.extend(0.0 if v is None else float(v) for v in seg_lp)
            # a model token without a sampled log-prob was re-encoded at a cut, not sampled: never trained on
            mask.extend(1 if model and v is not None else 0 for v in seg_lp)
            if model and len(ids) - n >= prompt_len:
                reencoded += sum(v is None for v in seg_lp)
        else:
            lps.extend([0.0] * n)
            mask.extend([1 if model else 0] * n)
    t = final.tools
    return Rollout(
        prompt_ids=ids[:prompt_len],
        response_ids=ids[prompt_len:],
        response_mask=mask[prompt_len:],
        response_logprobs=lps[prompt_len:] if has_lp else None,
        text=final.text,
        answer=final.answer,
        finish_reason=final.finish_reason.value,
        calls=t.calls,
        ok_calls=t.ok,
        failed_calls=t.failed,
        blocks=blocks,
        reencoded=reencoded,
    )


def _filter_group(rollouts: list[Rollout], group_size: int, min_fraction: float) -> str | None:
    kept = [r for r in rollouts if r.drop is None]
    if len(kept) < max(1, min_fraction * group_size):
        return f"too few survivors ({len(kept)}/{group_size})"
    if len({r.reward for r in kept}) < 2:
        return "zero variance"
    return None


class RolloutWorker:
    """Runs trajectory and step-level groups on one decoder (one engine, one sandbox)."""

    def __init__(
        self,
        decoder: ThorDecoder,
        checker: AnswerChecker,
        trajectory: TrajectoryConfig,
        step: StepLevelConfig,
        *,
        sandbox_slots: int = 4,
    ) -> None:
        self.decoder = decoder
        self.tokenizer = decoder.tokenizer
        self.checker = checker
        self.tcfg = trajectory
        self.scfg = step
        self.sandbox_slots = sandbox_slots

    async def _sample(
        self, prompt: list[int], config: Any, sampling: SamplingOptions, n: int, tag: str
    ) -> list[Rollout]:
        sandbox_request_scope(self.sandbox_slots)
        blocks: dict[int, list[tuple[int, bool | None]]] = {i: [] for i in range(n)}
        pending: dict[tuple[int, int], int] = {}
        finals: list[Final] = []
        stream = self.decoder.stream(prompt, config, sampling, n=n, request_id=tag)
        async with contextlib.aclosing(stream) as events:
            async for ev in events:
                if isinstance(ev, CodeBlock):
                    pending[(ev.sample, ev.execution)] = ev.fence_token
                elif isinstance(ev, ToolCall) and ev.outcome != "not_executed":
                    fence = pending.pop((ev.sample, ev.execution), None)
                    if fence is not None:
                        blocks[ev.sample].append((fence, None if ev.outcome == SANDBOX_ERROR else ev.ok))
                elif isinstance(ev, Final):
                    finals.append(ev)
        finals.sort(key=lambda f: f.sample)
        return [_rollout_from(f, blocks[f.sample], len(prompt)) for f in finals]

    # --- trajectory level ---------------------------------------------------------------

    async def trajectory_group(self, problem: Problem, group: str, seed: int) -> GroupResult:
        cfg = self.tcfg
        prompt = prompt_ids_for(self.tokenizer, problem)
        sampling = SamplingOptions(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=seed, logprobs=True
        )
        rollouts = await self._sample(prompt, rl_rollout_config(cfg.max_tool_calls), sampling, cfg.group_size, group)
        for r in rollouts:
            await self._score_trajectory(r, problem)
        result = GroupResult(group, "trajectory", problem, rollouts)
        result.reason = _filter_group(rollouts, cfg.group_size, cfg.min_survivor_fraction)
        if result.kept:
            result.records = [self._record(r, result) for r in rollouts if r.drop is None]
        return result

    async def _score_trajectory(self, r: Rollout, problem: Problem) -> None:
        cfg = self.tcfg
        if r.answer:
            r.correct = await self.checker.answers_match_async(r.answer, problem.answer)
        r.reward = 1.0 if r.correct else 0.0
        if find_repetition(r.text, REPETITION_WINDOW, REPETITION_COUNT) is not None:
            r.reward = 0.0
        tail = r.text[-cfg.boxed_tail_chars :]
        boxed_near_end = "\\boxed" in tail and bool((r.answer or "").strip())  # the decoder's answer
        if r.sandbox_errors:  # the sandbox failed, not the model: neither a reward nor a failed call
            r.drop = "sandbox error"
        elif r.failed_calls or r.finish_reason == FinishReason.tool_error.value:
            r.drop = "failed call"
        elif sum(r.response_mask) < cfg.min_response_tokens:
            r.drop = "too short"
        elif not boxed_near_end:
            if cfg.format_reward is None:
                r.drop = "no boxed answer"
            else:
                r.reward = cfg.format_reward

    # --- step level ---------------------------------------------------------------------

    def step_source(self, rollouts: Sequence[Rollout], rng: random.Random) -> tuple[Rollout, int] | None:
        """A rollout to regenerate a step of, and the token (in prompt+response) its block opens at."""
        failed = [r for r in rollouts if r.failed_block is not None]
        if failed:
            r = rng.choice(failed)
            return r, r.failed_block  # type: ignore[return-value]
        if self.scfg.use_random_code_rollout:
            with_code = [r for r in rollouts if r.blocks and not r.sandbox_errors]
            if with_code:
                r = rng.choice(with_code)
                return r, rng.choice(r.blocks)[0]
        return None

    def cut_point(self, r: Rollout, fence: int) -> int:
        """Tokens of prompt+response kept: `backtrack_tokens` before the fence, never into the prompt or an output."""
        plen = len(r.prompt_ids)
        floor = plen
        for i in range(min(fence, plen + len(r.response_ids)) - 1, plen - 1, -1):
            if r.response_mask[i - plen] == 0:  # a tool output or injected text: committed, stays
                floor = i + 1
                break
        return max(floor, fence - self.scfg.backtrack_tokens)

    async def step_group(self, problem: Problem, source: Rollout, fence: int, group: str, seed: int) -> GroupResult:
        cfg = self.scfg
        cut = self.cut_point(source, fence)
        prefix = (source.prompt_ids + source.response_ids)[:cut]
        sampling = SamplingOptions(
            temperature=self.tcfg.temperature,
            top_p=self.tcfg.top_p,
            max_tokens=cfg.max_tokens,
            seed=seed,
            logprobs=True,
        )
        rollouts = await self._sample(prefix, rl_step_config(self.tcfg.max_tool_calls), sampling, cfg.group_size, group)
        for r in rollouts:
            if r.finish_reason != FinishReason.tool_executed.value or not r.blocks:
                r.drop = "no code block"
            elif r.blocks[0][1] is None:  # the sandbox could not run the block: no verdict on the code
                r.drop = "sandbox error"
            r.reward = 1.0 if r.blocks and r.blocks[0][1] else 0.0
        result = GroupResult(group, "step", problem, rollouts)
        result.reason = _filter_group(rollouts, cfg.group_size, self.tcfg.min_survivor_fraction)
        if result.kept:
            result.records = [self._record(r, result) for r in rollouts if r.drop is None]
        return result

    @staticmethod
    def _record(r: Rollout, g: GroupResult) -> RolloutRecord:
        return RolloutRecord(
            prompt_ids=r.prompt_ids,
            response_ids=r.response_ids,
            response_mask=r.response_mask,
            reward=r.reward,
            group=g.group,
            level=g.level,
            problem_id=g.problem.id,
            response_logprobs=r.response_logprobs,
            info={
                "finish_reason": r.finish_reason,
                "calls": r.calls,
                "ok_calls": r.ok_calls,
                "sandbox_errors": r.sandbox_errors,
                "reencoded_tokens": r.reencoded,
                "answer": r.answer,
                "correct": r.correct,
            },
        )


async def gather_groups(coros: Sequence[Any], limit: int) -> list[GroupResult]:
    """Run group coroutines with at most `limit` in flight; results in input order."""
    slots = asyncio.Semaphore(max(1, limit))

    async def one(c: Any) -> GroupResult:
        async with slots:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))
