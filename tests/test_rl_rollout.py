"""Hierarchical-RL rollouts (trainer/rl/rollout.py) on the real decoder and the real sandbox.

A scripted backend (real Qwen tokenizer, vLLM stop semantics) plays the policy so the
group rules are checked exactly: which rollouts are dropped and why, rewards, group
filters, masks and log-probs of the records, and the step-level cut at the token level.
"""

from __future__ import annotations

import itertools
import random

import pytest

from tests.support.scripted_backend import ScriptedBackend, scripted_logprob
from thor_engine.answer import AnswerChecker
from thor_engine.decoder import ThorDecoder
from trainer.evaluate.benchmarks import Problem
from trainer.rl.config import StepLevelConfig, TrajectoryConfig
from trainer.rl.rollout import Rollout, RolloutWorker, prompt_ids_for

pytestmark = pytest.mark.sandbox

ASSISTANT = "<|im_start|>assistant\n"
LEAD = "I will compute it with Python.\n"
SCRIPTS = {
    "print": LEAD + "```python\nprint(6 * 7)\n```\n",
    # the closing fence's last token is "`\n\n": the decoder cuts inside it and re-encodes "`\n"
    "print_cut": LEAD + "```python\nprint(6 * 7)\n```\n\n",
    "bare": LEAD + "```python\n6 * 7\n```\n",
    "wrong": "I estimate it directly: \\boxed{40}.",
    "nobox": "I cannot work out this product in my head, and I will not guess a number for it.",
}
AFTER_OUTPUT = "The answer is \\boxed{42}."
PROBLEM = Problem(benchmark="toy", id="p1", index=0, problem="What is 6 * 7?", answer="42")


def policy(kinds: list[str]):
    """First requests take the next script in turn; after a tool output the answer follows.

    A request that starts mid-way (a step-level prefix) continues the one script it is a prefix of."""
    order = itertools.cycle(kinds)

    def respond(prompt: str) -> str:
        done = prompt.split(ASSISTANT)[-1]
        if "```output" in done:
            return AFTER_OUTPUT
        if not done:
            return SCRIPTS[next(order)]
        for _ in range(len(kinds)):
            script = SCRIPTS[next(order)]
            if script.startswith(done) and len(script) > len(done):
                return script[len(done) :]
        return ""

    return respond


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(max_workers=1) as c:
        yield c


def worker(tokenizer, executor, checker, kinds, *, group=8, backtrack=100) -> RolloutWorker:
    dec = ThorDecoder(ScriptedBackend(tokenizer, policy(kinds)), executor)
    return RolloutWorker(
        dec,
        checker,
        TrajectoryConfig(group_size=group, max_tokens=200),
        StepLevelConfig(group_size=group, backtrack_tokens=backtrack, max_tokens=100),
    )


async def test_trajectory_group_rules(tokenizer, executor, checker):
    w = worker(tokenizer, executor, checker, ["print", "bare", "wrong", "nobox"])
    g = await w.trajectory_group(PROBLEM, "g0", seed=1)
    drops = sorted((r.drop or "kept", r.reward) for r in g.rollouts)
    assert drops == [
        ("failed call", 0.0),
        ("failed call", 0.0),
        ("kept", 0.0),
        ("kept", 0.0),
        ("kept", 1.0),
        ("kept", 1.0),
        ("no boxed answer", 0.0),
        ("no boxed answer", 0.0),
    ]
    assert g.kept and len(g.records) == 4
    failed = [r for r in g.rollouts if r.drop == "failed call"]
    assert all(r.finish_reason == "tool_error" and r.failed_block is not None for r in failed)
    prompt = prompt_ids_for(tokenizer, PROBLEM)
    for rec in g.records:
        assert rec.prompt_ids == prompt and rec.level == "trajectory" and rec.group == "g0"
        text = tokenizer.decode(rec.response_ids)
        if rec.reward == 1.0:
            # the tool output is in the response but masked; the model's tokens carry vLLM-style log-probs
            assert "```output\n42\n```" in text and 0 in rec.response_mask
            out = [t for t, m in zip(rec.response_ids, rec.response_mask, strict=True) if m == 0]
            assert tokenizer.decode(out).strip() == "```output\n42\n```".strip()
        assert rec.response_logprobs is not None
        for t, m, lp in zip(rec.response_ids, rec.response_mask, rec.response_logprobs, strict=True):
            assert lp == (pytest.approx(scripted_logprob(t)) if m else 0.0)


async def test_groups_without_variance_or_survivors_are_dropped(tokenizer, executor, checker):
    same = await worker(tokenizer, executor, checker, ["print"], group=4).trajectory_group(PROBLEM, "a", 1)
    assert not same.kept and same.reason == "zero variance" and not same.records
    few = await worker(tokenizer, executor, checker, ["print", "bare", "bare", "wrong"], group=4).trajectory_group(
        PROBLEM, "b", 1
    )
    assert [r.drop for r in few.rollouts].count("failed call") == 2
    assert few.kept  # 2 of 4 survive: exactly the half the reference requires
    fewer = await worker(tokenizer, executor, checker, ["print", "bare", "bare", "bare"], group=4).trajectory_group(
        PROBLEM, "c", 1
    )
    assert not fewer.kept and fewer.reason == "too few survivors (1/4)"


async def test_step_group_cuts_at_tokens_and_rewards_the_first_block(tokenizer, executor, checker):
    w = worker(tokenizer, executor, checker, ["bare"], group=6, backtrack=3)
    source = (await w.trajectory_group(PROBLEM, "t", 1)).rollouts[0]
    fence = source.failed_block
    assert fence is not None
    full = source.prompt_ids + source.response_ids
    assert tokenizer.decode(full[fence:]).lstrip("\n").startswith("```python\n6 * 7")
    cut = w.cut_point(source, fence)
    assert cut == fence - 3 and cut > len(source.prompt_ids)
    # continuations from 3 tokens before the fence: half print (the block runs), half do not
    w2 = worker(tokenizer, executor, checker, ["print", "bare", "wrong"], group=6, backtrack=3)
    g = await w2.step_group(PROBLEM, source, fence, "s", seed=2)
    assert g.level == "step" and g.kept
    assert sorted(r.reward for r in g.rollouts if r.drop is None) == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    # from the prompt (100 tokens back reach it): a continuation may write no code at all: dropped
    w3 = worker(tokenizer, executor, checker, ["print", "bare", "wrong"], group=6, backtrack=100)
    assert w3.cut_point(source, fence) == len(source.prompt_ids)
    g3 = await w3.step_group(PROBLEM, source, fence, "s3", seed=2)
    assert sorted(r.reward for r in g3.rollouts if r.drop is None) == [0.0, 0.0, 1.0, 1.0]
    assert [r.drop for r in g3.rollouts].count("no code block") == 2
    assert g3.kept and len(g3.records) == 4
    for rec in g.records:
        assert rec.prompt_ids == full[:cut]  # the cut is on tokens: nothing re-tokenised
        assert all(rec.response_mask)  # only the regenerated tokens, no output block appended
        assert tokenizer.decode(rec.response_ids).endswith("```\n")
        assert "```output" not in tokenizer.decode(rec.response_ids)


def test_cut_point_never_enters_an_output_or_the_prompt(tokenizer, executor, checker):
    w = worker(tokenizer, executor, checker, ["print"], backtrack=100)
    r = Rollout(
        prompt_ids=[1] * 10,
        response_ids=list(range(30)),
        response_mask=[1] * 12 + [0] * 6 + [1] * 12,
        response_logprobs=None,
        text="",
        answer=None,
        finish_reason="tool_error",
        calls=2,
        ok_calls=1,
        failed_calls=1,
        blocks=[(12, True), (35, False)],
    )
    assert w.cut_point(r, 35) == 10 + 18  # right after the committed output, not 100 tokens back
    assert w.cut_point(r, 15) == 10  # never into the prompt
    picked = w.step_source([r], random.Random(0))
    assert picked is not None and picked[1] == 35


async def test_a_sandbox_failure_is_not_the_codes_failure(tokenizer, executor, checker):
    """A call the sandbox could not run (outcome sandbox_error: a busy sandbox, no retries left) is carried
    through: the rollout is dropped as a sandbox error (no reward 0, not a failed call), it is no step-level
    source, and a continuation whose block the sandbox could not run gets no step reward."""
    from tests.test_tools import busy_sandbox, hold_the_worker
    from thor_engine.tools import SandboxExecutor, SandboxPolicy
    from thor_sandbox.client import SandboxClient

    healthy = worker(tokenizer, executor, checker, ["bare"], group=4, backtrack=3)
    source = (await healthy.trajectory_group(PROBLEM, "t", 1)).rollouts[0]
    assert source.failed_block is not None  # a real failure of the code (no stdout): a step source

    with busy_sandbox() as svc:
        async with SandboxClient(svc.url, retries=0) as client:
            holder = await hold_the_worker(client, svc.url, 30)  # the only worker is busy: every call gets 503
            broken = SandboxExecutor(client, SandboxPolicy(busy_retries=0))
            w = worker(tokenizer, broken, checker, ["print", "bare"], group=4, backtrack=3)
            g = await w.trajectory_group(PROBLEM, "b", 1)
            s = await w.step_group(PROBLEM, source, source.failed_block, "s", seed=2)
            holder.cancel()
    assert [r.drop for r in g.rollouts] == ["sandbox error"] * 4
    assert all(r.sandbox_errors == 1 and r.failed_block is None for r in g.rollouts)
    assert not g.kept and not g.records
    assert w.step_source(g.rollouts, random.Random(0)) is None  # nothing to regenerate: the code never ran
    assert [r.drop for r in s.rollouts] == ["sandbox error"] * 4
    assert not s.kept and not s.records and s.reason == "too few survivors (0/4)"


async def test_reencoded_tokens_at_a_cut_are_not_trained_as_sampled(tokenizer, executor, checker):
    """A cut inside a token (the closing fence shares "`\\n\\n" with the next line) leaves a re-encoded
    model token with no sampled log-prob: it is masked from the loss and counted, at both levels."""
    w = worker(tokenizer, executor, checker, ["print_cut", "wrong"], group=4, backtrack=3)
    g = await w.trajectory_group(PROBLEM, "g", 1)
    assert g.kept and sorted(r.reward for r in g.rollouts) == [0.0, 0.0, 1.0, 1.0]
    for rec in g.records:
        # every trained token carries the log-prob it was sampled with; nothing else is trained
        for t, m, lp in zip(rec.response_ids, rec.response_mask, rec.response_logprobs, strict=True):
            assert lp == (pytest.approx(scripted_logprob(t)) if m else 0.0)
        assert rec.info["reencoded_tokens"] == (1 if rec.reward else 0)
    assert [r.reencoded for r in g.rollouts] == [1, 0, 1, 0]
    source = (await worker(tokenizer, executor, checker, ["bare"], group=4).trajectory_group(PROBLEM, "t", 1)).rollouts[
        0
    ]
    s = await w.step_group(PROBLEM, source, source.failed_block, "s", seed=2)
    cut = [r for r in s.rollouts if r.drop is None and r.reencoded]
    assert cut and all(r.response_mask[-1] == 0 and r.response_logprobs[-1] == 0.0 for r in cut)
