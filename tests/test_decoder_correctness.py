"""The decoder's promises, each pinned by the case that broke it (issue 7, D1-D8).

A scripted backend (real Qwen tokenizer, vLLM stop-string semantics) plays a model that
misbehaves in a known way; the real sandbox runs the code. Each test fails on the decoder
before the correctness pass.
"""

from __future__ import annotations

import pytest

from tests.support.scripted_backend import ScriptedBackend
from thor_engine.config import SamplingOptions, SelfCorrectionConfig, ThorConfig
from thor_engine.decoder import ThorDecoder, collect, finals
from thor_engine.detokenize import TokenText
from thor_engine.events import Backtrack, CodeBlock, FinishReason, TextDelta, ToolCall, Vote
from thor_engine.prompting import render_chat

pytestmark = pytest.mark.sandbox

ASSISTANT = "<|im_start|>assistant\n"
CUT = "Considering the limited time by the user"


def done_text(prompt: str) -> str:
    return prompt.split(ASSISTANT)[-1]


def prompt_ids(tokenizer, suffix: str = "") -> list[int]:
    ids = render_chat(tokenizer, [{"role": "user", "content": "What is 6*7?"}])
    return ids + (tokenizer.encode(suffix, add_special_tokens=False) if suffix else [])


async def run(tokenizer, executor, responder, cfg=None, sampling=None, prompt=None, **kw):
    backend = ScriptedBackend(tokenizer, responder)
    dec = ThorDecoder(backend, executor)
    events = await collect(
        dec.stream(
            prompt or prompt_ids(tokenizer), cfg or ThorConfig(), sampling or SamplingOptions(max_tokens=400), **kw
        )
    )
    return backend, events


def streamed(events) -> str:
    """The text a stream consumer ends up with: deltas, minus what backtracks retract."""
    out = ""
    for e in events:
        if isinstance(e, TextDelta):
            out += e.text
        elif isinstance(e, Backtrack):
            out = out[: len(out) - e.chars_retracted]
    return out


# --- D1: a complete code block is executed, never passed over; invented output never kept ----


INVENTED = "999"


@pytest.mark.parametrize(
    "first_round",
    [
        "Compute.\n```python\nprint(6*7)\n```\n```output\n999\n```\n",  # stops at the common fence
        "Compute.\n```python\nprint(6*7)\n```output\n999\n```\n",  # output fence where the closing one belongs
        "Compute.\n```python\nprint(6*7)\n```   \n```output\n999\n```\n",  # trailing spaces
        "Compute.\r\n```python\r\nprint(6*7)\r\n```\r\n```output\r\n999\r\n```\r\n",  # CRLF
        "1. Compute:\n    ```python\n    print(6*7)\n    ```\n    ```output\n    999\n    ```\n",  # list item
        "Compute.\n````python\nprint(6*7)\n````\n````output\n999\n````\n",  # four backticks
        "Compute.\n```python\nprint(6*7)\n```\n``` Output\n999\n```\n",  # another spelling of the output fence
    ],
    ids=["plain", "output-as-closing", "trailing-spaces", "crlf", "indented", "four-backticks", "Output"],
)
async def test_block_runs_and_invented_output_never_kept(tokenizer, executor, first_round):
    def responder(prompt: str) -> str:
        done = done_text(prompt)
        if "```output\n42" in done:
            return "So the answer is \\boxed{42}."
        return first_round + "Therefore \\boxed{999}."  # the model's own invented result

    backend, events = await run(tokenizer, executor, responder)
    [final] = finals(events)
    [call] = [e for e in events if isinstance(e, ToolCall)]
    assert call.ok and call.observation == "42" and call.committed
    [block] = [e for e in events if isinstance(e, CodeBlock)]
    assert block.code.replace("\r\n", "\n") == "print(6*7)\n"  # indented blocks run dedented
    assert INVENTED not in final.text, final.text
    assert final.answer == "42"
    assert streamed(events) == final.text
    # the engine request was stopped at the block: nothing invented was generated past the output fence
    assert len(backend.requests) == 2


async def test_output_block_without_code_ends_the_trajectory(tokenizer, executor):
    _, events = await run(tokenizer, executor, lambda p: "Result:\n```output\n999\n```\nSo \\boxed{999}.")
    [final] = finals(events)
    assert final.text == "Result:\n" and final.answer is None
    assert not [e for e in events if isinstance(e, ToolCall)]
    assert streamed(events) == final.text


async def test_block_past_the_budget_is_refused_not_invented(tokenizer, executor):
    def responder(prompt: str) -> str:
        k = done_text(prompt).count("```output")
        return f"Call {k}.\n```python\nprint({k})\n```\n```output\n{k}\n```\n" if k < 2 else "\\boxed{1}"

    cfg = ThorConfig(max_tool_calls=1)
    _, events = await run(tokenizer, executor, responder, cfg)
    [final] = finals(events)
    assert final.tools.calls == 1 and final.tools.not_executed == 1
    # the second block got the refusal as its output, never the model's own "1"
    assert f"```output\n{cfg.not_executed_message}\n```" in final.text
    assert "```output\n1\n```" not in final.text
    refused = [e for e in events if isinstance(e, ToolCall) and e.outcome == "not_executed"]
    assert len(refused) == 1 and refused[0].committed


# --- D2: the last budget unit -------------------------------------------------------------------


async def test_failure_on_the_last_budget_unit_is_committed(tokenizer, executor):
    def responder(prompt: str) -> str:
        done = done_text(prompt)
        if "```output" in done:
            return "The division failed, so \\boxed{0}."
        return "Try.\n```python\nprint(1/0)\n```\n```output\n5\n```\n"

    _, events = await run(tokenizer, executor, responder, ThorConfig(max_tool_calls=1))
    [final] = finals(events)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.ok, c.committed) for c in calls] == [(False, True)]
    assert not [e for e in events if isinstance(e, Backtrack)]
    assert "ZeroDivisionError" in final.text and "```output\n5" not in final.text


async def test_retry_only_while_the_resample_can_run(tokenizer, executor):
    def responder(prompt: str) -> str:
        done = done_text(prompt)
        if "```output" in done:
            return "\\boxed{0}"
        return "Try.\n```python\nprint(1/0)\n```\n"

    _, events = await run(tokenizer, executor, responder, ThorConfig(max_tool_calls=2))
    calls = [e for e in events if isinstance(e, ToolCall)]
    # first failure: budget for a resample (2 units) -> retry; the resample fails on the last unit -> commit
    assert [(c.attempt, c.committed) for c in calls] == [(0, False), (1, True)]
    assert all(c.outcome != "not_executed" for c in calls)


# --- D3: step-mode backtrack over a blank line ---------------------------------------------------


async def test_step_mode_goes_back_over_the_blank_line(tokenizer, executor):
    attempts = {"n": 0}

    def responder(prompt: str) -> str:
        done = done_text(prompt)
        if "```output" in done:
            return "\\boxed{5}"
        attempts["n"] += 1
        idea = "bad idea" if attempts["n"] == 1 else "good idea"
        code = "print(undefined)" if attempts["n"] == 1 else "print(5)"
        full = f"First paragraph stays.\n\nSecond paragraph, {idea}.\n\n```python\n{code}\n```\n"
        return full[len(done) :] if full.startswith(done) else full

    cfg = ThorConfig(self_correction=SelfCorrectionConfig(mode="step"))
    backend, events = await run(tokenizer, executor, responder, cfg)
    [bt] = [e for e in events if isinstance(e, Backtrack)]
    assert backend.requests[1].prompt_text.endswith("First paragraph stays.\n\n")
    assert "bad idea" not in finals(events)[0].text and "good idea" in finals(events)[0].text
    assert bt.chars_retracted == len("Second paragraph, bad idea.\n\n```python\nprint(undefined)\n```\n")


# --- D5: thinking state ---------------------------------------------------------------------------


async def test_closed_think_block_in_prompt_is_not_thinking(think_tokenizer, executor):
    tok = think_tokenizer
    answer = "The answer is " + "really " * 60 + "\\boxed{42}."
    _, events = await run(
        tok,
        executor,
        lambda p: answer[len(done_text(p).split("</think>\n\n")[-1]) :],
        ThorConfig(thinking_budget=10),
        prompt=prompt_ids(tok, "<think>\n\n</think>\n\n"),
    )
    [final] = finals(events)
    assert CUT not in final.text
    assert final.text == answer and final.answer_text == answer and final.answer == "42"
    assert {e.channel for e in events if isinstance(e, TextDelta)} == {"answer"}


async def test_backtrack_across_think_close_restores_thinking(think_tokenizer, executor):
    tok = think_tokenizer
    attempts = {"n": 0}

    def responder(prompt: str) -> str:
        attempts["n"] += 1
        if attempts["n"] == 1:
            return "<think>\nLet me think.\n\nMaybe code.\n</think>\nAnswer:\n```python\nprint(1/0)\n```\n"
        return "hmm " * 300  # thinking again, never closing: the budget must cut it

    cfg = ThorConfig(thinking_budget=60, self_correction=SelfCorrectionConfig(mode="step"))
    _, events = await run(tok, executor, responder, cfg, sampling=SamplingOptions(max_tokens=500))
    [final] = finals(events)
    assert [e for e in events if isinstance(e, Backtrack)]
    assert final.text.startswith("<think>\nLet me think.\n\nhmm")
    after = events[next(i for i, e in enumerate(events) if isinstance(e, Backtrack)) :]
    first_text = next(e for e in after if isinstance(e, TextDelta))
    assert first_text.channel == "reasoning"  # the cut landed inside <think>
    assert CUT in final.text  # the thinking budget still applies after the backtrack
    assert final.finish_reason is not FinishReason.length


# --- D6: a hard cap on generated tokens ---------------------------------------------------------


async def test_generated_tokens_are_capped(tokenizer, executor):
    def responder(prompt: str) -> str:
        return "Some reasoning first.\n" * 5 + "```python\nprint(1/0)\n```\n"

    cfg = ThorConfig(
        max_generated_tokens=150,
        self_correction=SelfCorrectionConfig(retries_consume_budget=False, max_retries=50, backtrack_tokens=1000),
    )
    _, events = await run(tokenizer, executor, responder, cfg, sampling=SamplingOptions(max_tokens=100))
    [final] = finals(events)
    assert final.finish_reason is FinishReason.generation_cap
    assert final.usage.generated_tokens <= 150
    # the default cap: 4x max_tokens
    _, events = await run(
        tokenizer,
        executor,
        responder,
        ThorConfig(
            self_correction=SelfCorrectionConfig(retries_consume_budget=False, max_retries=50, backtrack_tokens=1000)
        ),
        sampling=SamplingOptions(max_tokens=60),
    )
    [final] = finals(events)
    assert final.finish_reason is FinishReason.generation_cap and final.usage.generated_tokens <= 240


# --- D8 -------------------------------------------------------------------------------------------


async def test_vote_with_one_sample_and_counts_keyed_as_the_answer(tokenizer, executor):
    _, events = await run(tokenizer, executor, lambda p: "\\boxed{7}", n=1, vote=True)
    assert isinstance(events[-1], Vote) and events[-1].answer == "7" and events[-1].counts == {"7": 1}
    vote = ThorDecoder.vote(["\\frac12", "1/2", "3", None])
    assert vote.answer == "\\frac12"
    assert vote.counts == {"\\frac12": 2, "3": 1}
    assert vote.answer in vote.counts


async def test_answer_never_comes_from_tool_output(tokenizer, executor):
    def printed(prompt: str) -> str:
        done = done_text(prompt)
        if "```output" in done:
            return "The answer is 42."
        return "```python\nprint('\\\\boxed{99}')\n```\n"

    _, events = await run(tokenizer, executor, printed)
    [final] = finals(events)
    assert "\\boxed{99}" in final.text and final.answer is None

    def earlier(prompt: str) -> str:
        done = done_text(prompt)
        if "```output" in done:
            return "Done."
        return "I think \\boxed{42}.\n```python\nprint('\\\\boxed{99}')\n```\n"

    _, events = await run(tokenizer, executor, earlier)
    assert finals(events)[0].answer == "42"


async def test_call_index_is_stable_across_attempts(tokenizer, executor):
    attempts = {"n": 0}

    def responder(prompt: str) -> str:
        done = done_text(prompt)
        if done.count("```output") == 1:
            return "Next.\n```python\nprint(2)\n```\n"
        if done.count("```output") == 2:
            return "\\boxed{2}"
        attempts["n"] += 1
        return "```python\nprint(1/0)\n```\n" if attempts["n"] == 1 else "```python\nprint(1)\n```\n"

    _, events = await run(
        tokenizer, executor, responder, ThorConfig(self_correction=SelfCorrectionConfig(backtrack_tokens=0))
    )
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.call, c.attempt, c.execution) for c in calls] == [(0, 0, 0), (0, 1, 1), (1, 0, 2)]
    blocks = [e for e in events if isinstance(e, CodeBlock)]
    assert [(b.call, b.execution) for b in blocks] == [(0, 0), (0, 1), (1, 2)]


def test_token_text_matches_full_decode(tokenizer):
    text = "Ünïcödé ∑ 数学 🙂 emoji \\boxed{x}\n```python\nprint('é')\n```\n" * 3
    ids = tokenizer.encode(text, add_special_tokens=False)
    tt = TokenText(tokenizer)
    for i, tid in enumerate(ids):
        tt.extend([tid])
        full = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        if not full.endswith("\ufffd"):
            assert tt.text == full
            assert tt.offset(i + 1) == len(full)
    assert tt.text == text
    for k in (0, 5, len(ids) // 2, len(ids) - 1):
        c = tt.offset(k)
        assert tt.tokens_within(c) >= k and tokenizer.decode(ids[: tt.tokens_within(c)]).__len__() <= c + 1
    tt.truncate(len(ids) // 2)
    assert tt.text == tokenizer.decode(ids[: len(ids) // 2]).rstrip("\ufffd")
    tt.extend(ids[len(ids) // 2 :])
    assert tt.text == text


async def test_sandbox_error_is_committed_not_resampled(tokenizer):
    """A sandbox failure (outcome sandbox_error, from tools.py after its busy retries) is not the
    code's fault: the observation is committed, self-correction does not resample the code."""
    from thor_engine.tools import ToolResult

    class BrokenSandbox:  # a test double for the one outcome a healthy sandbox cannot produce on demand
        async def execute(self, code: str, *, timeout_s: float, echo_last_expression: bool) -> ToolResult:
            return ToolResult(None, "", "SandboxError: the sandbox is busy", "sandbox_error", 0.0)

    def responder(prompt: str) -> str:
        return "\\boxed{1}" if "```output" in done_text(prompt) else "```python\nprint(1)\n```\n"

    _, events = await run(tokenizer, BrokenSandbox(), responder)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.outcome, c.committed) for c in calls] == [("sandbox_error", True)]
    assert not [e for e in events if isinstance(e, Backtrack)]
