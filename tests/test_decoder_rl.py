"""The decoder's additions for RL rollouts (issue 10): stop after the first executed block,
the opening fence's token index on every `CodeBlock`, sampled log-probabilities per token,
and the RL presets.

A scripted backend (real Qwen tokenizer, vLLM stop-string semantics, a log-probability per
token that is a function of its id) with the real sandbox for the loop; one test runs the
tiny TIR model on real vLLM (CPU) for the log-probabilities the engine really returns.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.scripted_backend import ScriptedBackend, scripted_logprob
from tests.test_decoder_correctness import streamed
from thor_engine.backend import GenChunk, GenParams
from thor_engine.config import (
    ObservationConfig,
    SamplingOptions,
    SelfCorrectionConfig,
    ThorConfig,
    rl_rollout_config,
    rl_step_config,
)
from thor_engine.decoder import ThorDecoder, collect, finals
from thor_engine.events import Backtrack, CodeBlock, Final, FinishReason, TextDelta, ToolCall
from thor_engine.prompting import render_chat
from thor_engine.trajectory import SegmentKind, Trajectory

pytestmark = pytest.mark.sandbox

ASSISTANT = "<|im_start|>assistant\n"


def done_text(prompt: str) -> str:
    return prompt.split(ASSISTANT)[-1]


def prompt_ids(tokenizer, question: str = "What is 6*7?") -> list[int]:
    return render_chat(tokenizer, [{"role": "user", "content": question}])


async def run(tokenizer, executor, responder, cfg=None, sampling=None, prompt=None, backend=None):
    backend = backend or ScriptedBackend(tokenizer, responder)
    dec = ThorDecoder(backend, executor)
    events = await collect(
        dec.stream(prompt or prompt_ids(tokenizer), cfg or ThorConfig(), sampling or SamplingOptions(max_tokens=400))
    )
    return backend, events


def traj_ids(final: Final) -> list[int]:
    return [t for s in final.trajectory["segments"] for t in s["token_ids"]]


def assert_fence_token(tokenizer, ids: list[int], prompt_len: int, fence_token: int, text: str, fence_pos: int):
    """`ids[fence_token]` is the token holding character `fence_pos` (a backtick opening a fence) of the
    completion `text` (the decoding of ids[prompt_len:]); the ids before it decode to text before the fence."""
    assert text[fence_pos : fence_pos + 3] == "```"
    assert prompt_len <= fence_token < len(ids)
    before = tokenizer.decode(ids[prompt_len:fence_token])
    through = tokenizer.decode(ids[prompt_len : fence_token + 1])
    assert text.startswith(before) and text.startswith(through)
    assert len(before) <= fence_pos < len(through), (before, through, fence_pos)
    assert "`" in tokenizer.decode([ids[fence_token]])


# --- stop_after_execution ----------------------------------------------------------------------


ROUND = "Compute it.\n```python\n{code}\n```\n"


def model_writing(code: str):
    """A model that writes one block and invents its output; given a real output, it answers."""

    def respond(prompt: str) -> str:
        if "```output" in done_text(prompt):
            return "So \\boxed{42}."
        return ROUND.format(code=code) + "```output\n999\n```\nSo \\boxed{42}."

    return respond


async def test_stop_after_execution_ends_at_the_closing_fence_of_a_successful_block(tokenizer, executor):
    backend, events = await run(tokenizer, executor, model_writing("print(6*7)"), rl_step_config())
    [final] = finals(events)
    assert final.finish_reason is FinishReason.tool_executed
    # the trajectory ends with the model's closing fence: no observation, nothing after it
    assert final.text == ROUND.format(code="print(6*7)")
    segs = final.trajectory["segments"]
    assert [s["kind"] for s in segs] == ["prompt", "model"]
    assert tokenizer.decode(segs[1]["token_ids"]) == ROUND.format(code="print(6*7)")
    assert final.usage.observation_tokens == 0 and final.usage.injected_tokens == 0
    assert len(backend.requests) == 1  # no continuation request after the block
    # the tool call is still reported, with the observation the model would have seen
    [block] = [e for e in events if isinstance(e, CodeBlock)]
    [call] = [e for e in events if isinstance(e, ToolCall)]
    assert block.code == "print(6*7)\n"
    assert call.ok and call.outcome == "ok" and call.observation == "42" and call.committed
    assert (final.tools.calls, final.tools.ok, final.tools.failed, final.tools.committed) == (1, 1, 0, 1)
    assert streamed(events) == final.text
    # without the flag the same model goes on from the real output
    _, events = await run(tokenizer, executor, model_writing("print(6*7)"), rl_rollout_config())
    [final] = finals(events)
    assert final.finish_reason is FinishReason.stop and "```output\n42\n```\n" in final.text


async def test_stop_after_execution_with_a_failing_block(tokenizer, executor):
    _, events = await run(tokenizer, executor, model_writing("print(1/0)"), rl_step_config())
    [final] = finals(events)
    assert final.finish_reason is FinishReason.tool_executed  # not tool_error: the step ended either way
    assert final.text == ROUND.format(code="print(1/0)")
    assert [s["kind"] for s in final.trajectory["segments"]] == ["prompt", "model"]
    [call] = [e for e in events if isinstance(e, ToolCall)]
    assert not call.ok and call.observation == "ZeroDivisionError: division by zero" and call.committed
    assert (final.tools.calls, final.tools.ok, final.tools.failed) == (1, 0, 1)
    # the reference rule: a block that prints nothing failed too
    _, events = await run(tokenizer, executor, model_writing("x = 6*7"), rl_step_config())
    [final] = finals(events)
    [call] = [e for e in events if isinstance(e, ToolCall)]
    assert final.finish_reason is FinishReason.tool_executed and not call.ok


async def test_stop_after_execution_never_self_corrects(tokenizer, executor):
    """With self-correction on, the failed first block is still where the trajectory ends: no
    backtrack, no resample, and none of its text is marked retractable."""
    cfg = ThorConfig(stop_after_execution=True)
    assert cfg.self_correction.enabled
    backend, events = await run(tokenizer, executor, model_writing("print(1/0)"), cfg)
    [final] = finals(events)
    assert final.finish_reason is FinishReason.tool_executed
    assert not [e for e in events if isinstance(e, Backtrack)] and final.tools.backtracks == 0
    assert not any(e.retractable for e in events if isinstance(e, TextDelta))
    assert len(backend.requests) == 1 and final.usage.discarded_tokens == 0


async def test_stop_after_execution_from_a_cut_prefix(tokenizer, executor):
    """Step level: the prompt is a cut trajectory (prompt + kept model text); the continuation
    runs to its first executed block, and only the regenerated tokens follow the prefix."""
    prefix = prompt_ids(tokenizer) + tokenizer.encode("Let me compute the product", add_special_tokens=False)

    def responder(prompt: str) -> str:
        assert done_text(prompt) == "Let me compute the product"
        return " with code.\n```python\nprint(6*7)\n```\nThen \\boxed{42}."

    _, events = await run(tokenizer, executor, responder, rl_step_config(), prompt=prefix)
    [final] = finals(events)
    assert final.finish_reason is FinishReason.tool_executed
    assert final.text == " with code.\n```python\nprint(6*7)\n```\n"
    segs = final.trajectory["segments"]
    assert segs[0]["token_ids"] == prefix and [s["kind"] for s in segs] == ["prompt", "model"]
    [block] = [e for e in events if isinstance(e, CodeBlock)]
    assert_fence_token(tokenizer, traj_ids(final), len(prefix), block.fence_token, final.text, final.text.index("```"))


async def test_block_closed_right_before_eos_stops_too(tokenizer, executor):
    _, events = await run(tokenizer, executor, lambda p: "```python\nprint(2+2)\n```", rl_step_config())
    [final] = finals(events)
    assert final.finish_reason is FinishReason.tool_executed
    assert final.text == "```python\nprint(2+2)\n```"  # the EOS after the fence was dropped
    assert final.tools.ok == 1


# --- CodeBlock.fence_token ----------------------------------------------------------------------


async def test_fence_token_of_two_calls_after_a_committed_observation(tokenizer, executor):
    first = "First I multiply.\n```python\nprint(6*7)\n```\n"
    second = "Now I add one.\n```python\nprint(42+1)\n```\n"

    def responder(prompt: str) -> str:
        k = done_text(prompt).count("```output")
        return [first, second, "So \\boxed{43}."][k]

    _, events = await run(tokenizer, executor, responder)
    [final] = finals(events)
    blocks = [e for e in events if isinstance(e, CodeBlock)]
    assert [b.call for b in blocks] == [0, 1]
    ids, plen = traj_ids(final), len(prompt_ids(tokenizer))
    text = final.text
    pos0 = text.index("```python")
    pos1 = text.index("```python", text.index("```output\n42\n```\n"))
    assert_fence_token(tokenizer, ids, plen, blocks[0].fence_token, text, pos0)
    assert_fence_token(tokenizer, ids, plen, blocks[1].fence_token, text, pos1)
    # the second fence lies after the first observation's tokens
    segs = final.trajectory["segments"]
    assert [s["kind"] for s in segs] == ["prompt", "model", "observation", "model", "observation", "model"]
    assert blocks[1].fence_token >= sum(len(s["token_ids"]) for s in segs[:3])
    # cutting there keeps exactly the text before the fence (what step-level RL does)
    assert tokenizer.decode(ids[plen : blocks[1].fence_token]) == text[:pos1]


async def test_fence_token_at_the_start_and_of_an_indented_fence(tokenizer, executor):
    _, events = await run(tokenizer, executor, lambda p: "```python\nprint(1)\n```\n", rl_step_config())
    [final] = finals(events)
    [block] = [e for e in events if isinstance(e, CodeBlock)]
    plen = len(prompt_ids(tokenizer))
    assert block.fence_token == plen  # the first completion token opens the fence
    assert_fence_token(tokenizer, traj_ids(final), plen, block.fence_token, final.text, 0)

    indented = "1. Compute:\n    ```python\n    print(6*7)\n    ```\n"
    _, events = await run(tokenizer, executor, lambda p: indented, rl_step_config())
    [final] = finals(events)
    [block] = [e for e in events if isinstance(e, CodeBlock)]
    assert final.text == indented
    # the fence's first backtick, not the indentation that starts its line
    assert_fence_token(tokenizer, traj_ids(final), plen, block.fence_token, final.text, indented.index("```"))


async def test_fence_token_of_self_correction_attempts_and_refused_blocks(tokenizer, executor):
    reasoning = "".join(f"Step {i}.\n" for i in range(30))
    outputs: list[str] = []

    def responder(prompt: str) -> str:
        done = done_text(prompt)
        k = done.count("```output")
        if k == 1:
            out = "Once more.\n```python\nprint(7)\n```\n"  # past the budget: refused
        elif k == 2:
            out = "\\boxed{6}"
        else:
            code = "print(1/0)" if not outputs else "print(2*3)"
            full = reasoning + f"```python\n{code}\n```\n"
            out = full[len(done) :] if full.startswith(done) else full
        outputs.append(out)
        return out

    cfg = ThorConfig(max_tool_calls=2, self_correction=SelfCorrectionConfig(backtrack_tokens=10))
    backend, events = await run(tokenizer, executor, responder, cfg)
    [final] = finals(events)
    blocks = [e for e in events if isinstance(e, CodeBlock)]
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(b.call, b.attempt) for b in blocks] == [(0, 0), (0, 1), (1, 0)]
    assert [c.outcome for c in calls] == ["error", "ok", "not_executed"]
    plen = len(prompt_ids(tokenizer))
    # the discarded attempt: an index into the trajectory as it stood (the first request's prompt + output)
    then = backend.requests[0].prompt_token_ids + tokenizer.encode(outputs[0], add_special_tokens=False)
    assert_fence_token(tokenizer, then, plen, blocks[0].fence_token, outputs[0], outputs[0].index("```python"))
    # the committed resample and the refused block: indices into the final trajectory
    ids, text = traj_ids(final), final.text
    assert_fence_token(tokenizer, ids, plen, blocks[1].fence_token, text, text.index("```python"))
    assert_fence_token(
        tokenizer, ids, plen, blocks[2].fence_token, text, text.index("```python", text.index("Once more."))
    )


# --- sampled log-probabilities -----------------------------------------------------------------


def check_logprobs_aligned(final: Final) -> list[tuple[str, int, float | None]]:
    """Every segment has one log-prob per token; model tokens carry the scripted value of their own
    id (or None when re-encoded), every other kind None. Returns (kind, id, logprob) per token."""
    out = []
    for seg in final.trajectory["segments"]:
        assert len(seg["logprobs"]) == len(seg["token_ids"]), seg["kind"]
        for tid, lp in zip(seg["token_ids"], seg["logprobs"], strict=True):
            if seg["kind"] == "model" and lp is not None:
                assert lp == scripted_logprob(tid)
            else:
                assert lp is None or seg["kind"] == "model"
            out.append((seg["kind"], tid, lp))
    return out


async def test_logprobs_follow_every_token_through_observations(tokenizer, executor):
    def responder(prompt: str) -> str:
        k = done_text(prompt).count("```output")
        return ["A.\n```python\nprint(6*7)\n```\n", "B.\n```python\nprint(1)\n```", "So \\boxed{42}."][k]

    sampling = SamplingOptions(max_tokens=400, logprobs=True)
    backend, events = await run(tokenizer, executor, responder, sampling=sampling)
    [final] = finals(events)
    assert all(r.params.logprobs == 0 for r in backend.requests)
    tokens = check_logprobs_aligned(final)
    kinds = [s["kind"] for s in final.trajectory["segments"]]
    assert kinds == ["prompt", "model", "observation", "model", "observation", "model"]
    # every model token was sampled (none re-encoded here): each has its float, all else None
    assert all((lp is not None) == (kind == "model") for kind, _, lp in tokens)
    assert sum(lp is not None for _, _, lp in tokens) == final.usage.model_tokens
    # the EOS after the second block (dropped so the block could run) took its log-prob with it
    assert tokenizer.eos_token_id not in [tid for kind, tid, _ in tokens if kind == "model"][:-1]
    # without the option: the same dict as before (no "logprobs" keys) and no engine logprobs asked
    backend, events = await run(tokenizer, executor, responder)
    [final] = finals(events)
    assert all(r.params.logprobs is None for r in backend.requests)
    assert all(set(s) == {"kind", "token_ids"} for s in final.trajectory["segments"])


async def test_logprobs_after_a_text_cut_and_a_backtrack(tokenizer, executor):
    # the stop string starts inside the token ".ST": the kept "." is re-encoded (no sampled logprob)
    sampling = SamplingOptions(max_tokens=100, stop=("STOP",), logprobs=True)
    _, events = await run(tokenizer, executor, lambda p: "so 42.STOP. and more", sampling=sampling)
    [final] = finals(events)
    assert final.text == "so 42."
    tokens = check_logprobs_aligned(final)
    model = [(tid, lp) for kind, tid, lp in tokens if kind == "model"]
    assert tokenizer.decode([tid for tid, _ in model]) == "so 42."
    assert model[-1][1] is None and all(lp is not None for _, lp in model[:-1])

    # a backtrack drops the failed block and tokens before it: the kept ones keep their own values
    reasoning = "".join(f"Step {i} of it.\n" for i in range(20))
    attempts = {"n": 0}

    def responder(prompt: str) -> str:
        done = done_text(prompt)
        if "```output" in done:
            return "Done \\boxed{6}."
        attempts["n"] += 1
        full = reasoning + ("```python\nprint(1/0)\n```\n" if attempts["n"] == 1 else "```python\nprint(2*3)\n```\n")
        return full[len(done) :] if full.startswith(done) else full

    cfg = ThorConfig(self_correction=SelfCorrectionConfig(backtrack_tokens=15))
    _, events = await run(tokenizer, executor, responder, cfg, SamplingOptions(max_tokens=600, logprobs=True))
    [final] = finals(events)
    assert final.tools.backtracks == 1 and final.answer == "6"
    tokens = check_logprobs_aligned(final)
    assert all((lp is not None) == (kind == "model") for kind, _, lp in tokens)


class _NoLogprobs:
    """A backend that ignores `GenParams.logprobs` (as a misconfigured remote engine would)."""

    def __init__(self, inner: ScriptedBackend) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.max_model_len = inner.max_model_len
        self.eos_token_ids = inner.eos_token_ids

    async def generate(self, prompt_token_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[Any]:
        async for chunk in self.inner.generate(prompt_token_ids, params, request_id):
            yield GenChunk(chunk.token_ids, chunk.text, chunk.finished, chunk.finish_reason, chunk.stop_reason)

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)


async def test_missing_engine_logprobs_is_an_error_not_a_gap(tokenizer, executor):
    backend = _NoLogprobs(ScriptedBackend(tokenizer, lambda p: "Hello."))
    with pytest.raises(RuntimeError, match="log-probabilities"):
        await run(tokenizer, executor, None, sampling=SamplingOptions(logprobs=True), backend=backend)


def test_trajectory_logprobs_stay_aligned():
    t = Trajectory.from_prompt([1, 2, 3], record_logprobs=True)
    t.append([4, 5], SegmentKind.model, [-0.1, -0.2])
    t.append([6], SegmentKind.model)  # re-encoded: nothing sampled
    t.append([7], SegmentKind.observation)
    t.protect()
    t.append([8, 9], SegmentKind.model, [-0.8, -0.9])
    assert t.logprobs == [None, None, None, -0.1, -0.2, None, None, -0.8, -0.9]
    assert t.truncate(8) == [9]
    assert t.logprobs == [None, None, None, -0.1, -0.2, None, None, -0.8]
    d = t.to_dict()
    assert [s["logprobs"] for s in d["segments"]] == [[None] * 3, [-0.1, -0.2, None], [None], [-0.8]]
    with pytest.raises(ValueError, match="one per token"):
        t.append([10, 11], SegmentKind.model, [-1.0])
    plain = Trajectory.from_prompt([1, 2])
    plain.append([3], SegmentKind.model)
    assert plain.logprobs is None and plain.to_dict() == {
        "segments": [{"kind": "prompt", "token_ids": [1, 2]}, {"kind": "model", "token_ids": [3]}],
        "protected": 2,
    }
    with pytest.raises(ValueError, match="record_logprobs"):
        plain.append([4], SegmentKind.model, [-0.5])


# --- presets ------------------------------------------------------------------------------------


def test_rl_presets_are_the_reference_settings():
    r = rl_rollout_config()
    assert r.max_tool_calls == 5
    assert r.observation == ObservationConfig(profile="reference")
    assert not r.self_correction.enabled
    assert r.stop_on_tool_error and not r.stop_after_execution
    assert r.on_tool_budget == "continue"
    s = rl_step_config()
    assert s.stop_after_execution and s.model_copy(update={"stop_after_execution": False}) == r
    assert rl_rollout_config(3).max_tool_calls == 3 and rl_step_config(3).max_tool_calls == 3
    # the serving defaults are untouched
    assert not ThorConfig().stop_after_execution and not SamplingOptions().logprobs


def test_every_finish_reason_maps_to_an_openai_one():
    from server.thor.builder import OPENAI_FINISH

    assert set(OPENAI_FINISH) == set(FinishReason)
    assert OPENAI_FINISH[FinishReason.tool_executed] == "stop"


# --- real vLLM ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.vllm
async def test_vllm_logprobs_one_finite_value_per_model_token(tiny_tir_model, executor):
    """The tiny TIR model on vLLM (CPU) writes a two-call trajectory; with logprobs=True every
    token it sampled carries a finite log-probability <= 0, every other token None."""
    from tests.conftest import require_vllm
    from tests.support.tiny_tir_model import TIR_PROBLEMS
    from tests.test_tiny_tir_model import vllm_cpu_env

    require_vllm()  # a missing engine is an error, not a skip
    from thor_engine.backends.vllm_backend import EngineOptions, VllmBackend

    with vllm_cpu_env():
        backend = await VllmBackend.start(
            EngineOptions(model=str(tiny_tir_model), dtype="bfloat16", enforce_eager=True, max_model_len=2048)
        )
    try:
        p = next(p for p in TIR_PROBLEMS if p.name == "modpow")
        ids = render_chat(backend.tokenizer, [{"role": "user", "content": p.prompt}])
        dec = ThorDecoder(backend, executor)
        sampling = SamplingOptions(max_tokens=800, logprobs=True)
        events = await collect(dec.stream(ids, rl_rollout_config(), sampling))
    finally:
        backend.shutdown()
    [final] = finals(events)
    assert final.text == p.completion and final.tools.calls == 2  # the memorised trajectory, really run
    segs = final.trajectory["segments"]
    assert [s["kind"] for s in segs] == ["prompt", "model", "observation", "model", "observation", "model"]
    model_lps = []
    for seg in segs:
        assert len(seg["logprobs"]) == len(seg["token_ids"])
        if seg["kind"] == "model":
            model_lps += seg["logprobs"]
        else:
            assert all(lp is None for lp in seg["logprobs"])
    assert len(model_lps) == final.usage.model_tokens > 0
    assert all(lp is not None and math.isfinite(lp) and lp <= 0 for lp in model_lps)
    # a memorised greedy trajectory: the model is confident on most of its tokens
    assert sum(lp > math.log(0.5) for lp in model_lps) > len(model_lps) / 2
    # the fences sit where the text says
    blocks = [e for e in events if isinstance(e, CodeBlock)]
    flat = [t for s in segs for t in s["token_ids"]]
    assert_fence_token(
        backend.tokenizer, flat, len(ids), blocks[0].fence_token, final.text, final.text.index("```python")
    )
