"""Tests of TIRGen's multi-stage filters (trainer/tirgen/filters.py) on real `TirSample`s.

Owns: a rejecting and a passing case for every stage, the code-quality and repetition
boundaries, dedup (exactly one sample per problem), the single-call down-sample (deterministic,
about half, never touching multi-call samples), funnel consistency, the funnel table and plot.

Also the shipped run (docs/training/tirgen-gsm8k-default): its samples hold only real outputs,
and `python -m trainer.tirgen --refilter` over its log reproduces its samples, summary and funnel.

Does not own: generating samples (TIRGen's end-to-end tests) or the sample schema.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from thor_engine.codeblocks import find_blocks
from thor_engine.config import REFERENCE_EMPTY_OBSERVATION
from thor_engine.observation import NOTEBOOK_STOPPED, injection
from trainer.tirgen.filters import (
    ALL_STAGES,
    FilterConfig,
    apply_filters,
    code_invocation_ratio,
    filter_boxed,
    filter_code_passed,
    filter_code_quality,
    filter_correct,
    filter_dollars,
    filter_fences,
    filter_has_code,
    filter_length,
    filter_real_outputs,
    filter_repetition,
    filter_result_before_code,
    filter_think,
    find_repetition,
    format_funnel,
    plot_funnel,
    real_code_lines,
)
from trainer.tirgen.sample import SegmentText, TirSample

PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nA shop sells 12 boxes of 7 pens and 3 loose pens. How many pens?\n"
    "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# Six real lines (plus a comment and a blank line that do not count).
GOOD_CODE = (
    "# pens in the boxes, then the loose ones\n"
    "boxes = 12\n"
    "per_box = 7\n"
    "\n"
    "in_boxes = boxes * per_box\n"
    "loose = 3\n"
    "total = in_boxes + loose\n"
    "print(total)\n"
)


#: What a model writes between code blocks (varied: the same sentence before every block would be a repetition).
TRANSITIONS = (
    "Let me verify the product.\n\n",
    "Now I check the sum again.\n\n",
    "A second way to see it:\n\n",
    "Next, confirm the count of loose pens.\n\n",
    "Double-checking with another form:\n\n",
    "Finally, recount everything.\n\n",
)


def block(code: str, lang: str = "python") -> str:
    return f"```{lang}\n{code}```\n"


def make(
    pid: str = "p1",
    *,
    blocks: list[str] | None = None,
    outputs: list[str] | None = None,
    intro: str = "We count the pens in the boxes, $12 \\times 7$, and add the $3$ loose ones.\n\n",
    final: str = "The shop has $87$ pens in all.\n\n\\boxed{87}",
    correct: bool | None = True,
    failed: int = 0,
    reasoning: bool = False,
    prompt: str = PROMPT,
    think: tuple[str, str] = ("", ""),
    source: str = "gsm8k",
) -> TirSample:
    """A sample as TIRGen writes it: prompt, then model text and injected observations alternating."""
    blocks = [block(GOOD_CODE)] if blocks is None else blocks
    outputs = ["87"] * len(blocks) if outputs is None else outputs
    segments = [SegmentText(kind="prompt", text=prompt)]
    text = think[0] + intro
    for n, (code_block, out) in enumerate(zip(blocks, outputs, strict=True)):
        text += ("" if n == 0 else TRANSITIONS[n % len(TRANSITIONS)]) + code_block
        segments.append(SegmentText(kind="model", text=text))
        segments.append(SegmentText(kind="observation", text=injection(out, text.endswith("\n"))))
        text = ""
    segments.append(SegmentText(kind="model", text=text + think[1] + final))
    return TirSample(
        id=f"{source}/{pid}",
        problem_id=pid,
        source=source,
        problem="A shop sells 12 boxes of 7 pens and 3 loose pens. How many pens?",
        gold="87",
        messages=[{"role": "user", "content": "A shop sells 12 boxes of 7 pens and 3 loose pens. How many pens?"}],
        segments=segments,
        answer="87",
        correct=correct,
        code_calls=len(blocks),
        failed_calls=failed,
        actor_model="actor",
        critic_model="critic",
        reasoning_model=reasoning,
    )


CFG = FilterConfig()


def test_the_reference_sample_passes_every_stage() -> None:
    s = make(blocks=[block(GOOD_CODE), block(GOOD_CODE)])
    result = apply_filters([s], CFG)
    assert result.kept == [s]
    assert result.rejected == []


# --- correct -------------------------------------------------------------------------------------------------------


def test_correct() -> None:
    assert filter_correct(make(), CFG) is None
    assert "wrong answer" in (filter_correct(make(correct=False), CFG) or "")
    assert "not graded" in (filter_correct(make(correct=None), CFG) or "")


# --- code_passed ---------------------------------------------------------------------------------------------------


def test_code_passed_rejects_counted_failures() -> None:
    assert "failed" in (filter_code_passed(make(failed=1), CFG) or "")


@pytest.mark.parametrize(
    "observation",
    [
        "NameError: name 'totl' is not defined",
        REFERENCE_EMPTY_OBSERVATION,
        NOTEBOOK_STOPPED["output_capped"],
        'Traceback (most recent call last):\n  File "<stdin>", line 1\nZeroDivisionError: division by zero',
        "sympy.core.sympify.SympifyError: could not parse",
    ],
)
def test_code_passed_rejects_error_observations(observation: str) -> None:
    reason = filter_code_passed(make(outputs=[observation]), CFG)
    assert reason is not None and "error" in reason


@pytest.mark.parametrize("observation", ["87", "RelativeError 0.001\n87", "Error count: 0", "errors: []"])
def test_code_passed_accepts_outputs_that_merely_mention_errors(observation: str) -> None:
    assert filter_code_passed(make(outputs=[observation]), CFG) is None


# --- length --------------------------------------------------------------------------------------------------------


def test_length_in_characters() -> None:
    s = make()
    assert filter_length(s, CFG) is None
    assert "min_chars" in (filter_length(s, FilterConfig(min_chars=len(s.completion) + 1)) or "")
    assert filter_length(s, FilterConfig(min_chars=len(s.completion))) is None
    assert "max_chars" in (filter_length(s, FilterConfig(max_chars=len(s.completion) - 1)) or "")
    long = make(intro="We count the pens carefully. " * 700)
    assert len(long.completion) > CFG.max_chars
    assert "max_chars" in (filter_length(long, CFG) or "")
    short = make(blocks=[], outputs=[], intro="", final="\\boxed{87}")
    assert "min_chars" in (filter_length(short, CFG) or "")


def test_length_in_tokens_with_a_real_tokenizer(tokenizer) -> None:
    s = make()
    n = len(tokenizer.encode(s.completion, add_special_tokens=False))
    assert 20 < n < len(s.completion)
    assert filter_length(s, FilterConfig(max_tokens=n).with_tokenizer(tokenizer)) is None
    assert "max_tokens" in (filter_length(s, FilterConfig(max_tokens=n - 1).with_tokenizer(tokenizer)) or "")
    assert "min_tokens" in (filter_length(s, FilterConfig(min_tokens=n + 1).with_tokenizer(tokenizer)) or "")
    # Without a tokenizer the token bounds are not checked.
    assert filter_length(s, FilterConfig(max_tokens=1)) is None


# --- boxed ---------------------------------------------------------------------------------------------------------


def test_boxed() -> None:
    assert filter_boxed(make(), CFG) is None
    assert "no complete" in (filter_boxed(make(final="The shop has 87 pens."), CFG) or "")
    assert "empty" in (filter_boxed(make(final="So the answer is \\boxed{ }"), CFG) or "")
    assert "no complete" in (filter_boxed(make(final="So the answer is \\boxed{87"), CFG) or "")
    # A box that only a code block prints is not the model's answer.
    boxed_in_code = make(blocks=[block(GOOD_CODE + 'print("\\\\boxed{87}")\n')], final="The shop has 87 pens.")
    assert "\\boxed" in boxed_in_code.model_text
    assert filter_boxed(boxed_in_code, CFG) is not None


# --- dollars -------------------------------------------------------------------------------------------------------


def test_dollars() -> None:
    assert filter_dollars(make(), CFG) is None
    assert "odd" in (filter_dollars(make(final="It is $87 pens.\n\n\\boxed{87}"), CFG) or "")
    # $$ counts as two; an escaped \$ does not count.
    assert filter_dollars(make(final="$$87$$ pens cost \\$5.\n\n\\boxed{87}"), CFG) is None
    assert filter_dollars(make(final="$$87$ pens.\n\n\\boxed{87}"), CFG) is not None
    # A `$` inside code or an observation is not math.
    code_with_dollar = block(GOOD_CODE + 'print(f"${total}")\n')
    assert filter_dollars(make(blocks=[code_with_dollar], outputs=["$87"]), CFG) is None


def test_fences() -> None:
    assert filter_fences(make(), CFG) is None
    # a stray fence after the last output (seen in real TIRGen data) opens a block that swallows the answer
    stray = make(final="So Carmen spent 70 minutes.\n```\n\\boxed{70}")
    assert "unclosed code fence" in (filter_fences(stray, CFG) or "")


# --- real_outputs, result_before_code: what is trained is what really ran ------------------------------------------

#: A model that writes the output block itself (as two samples of the shipped GSM8K run did).
INVENTED = make("invented", final="So the shop has 87 pens.\n```output\n87\n```\nThe shop has \\boxed{87} pens.")
#: A second python block in the ending that never ran: no observation follows it.
UNRUN = make("unrun", final="Let me check it once more.\n" + block(GOOD_CODE) + "The shop has \\boxed{87} pens.")
#: The actor's computed line carried over before the code that computes it (the critic's old prefill).
CARRIED = make("carried", intro="The boxes hold 12 * 7 = 84 pens, plus the 3 loose ones.\n")


def test_real_outputs() -> None:
    assert filter_real_outputs(make(blocks=[block(GOOD_CODE)] * 2), CFG) is None
    assert "output block the model wrote itself" in (filter_real_outputs(INVENTED, CFG) or "")
    assert "python block with no observation" in (filter_real_outputs(UNRUN, CFG) or "")
    # a block followed by more model text before its observation did not produce that observation
    s = make()
    s.segments[1] = SegmentText(kind="model", text=s.segments[1].text + "It prints 87.\n")
    assert "no observation" in (filter_real_outputs(s, CFG) or "")
    # an output fence in a code block's string is still model-written output text
    assert filter_real_outputs(make(blocks=[block(GOOD_CODE + 'print("```output")\n')]), CFG) is not None


def test_result_before_code() -> None:
    assert filter_result_before_code(make(), CFG) is None
    assert "'12 * 7 = 84' before the code" in (filter_result_before_code(CARRIED, CFG) or "")
    latex = make(intro="The boxes hold $12 \\times 7 = 84$ pens.\n")
    assert "before the code" in (filter_result_before_code(latex, CFG) or "")
    # restating the real output after it, or writing the expression without its value, is fine
    after = make(final="So 12 * 7 + 3 = 87 pens.\n\\boxed{87}")
    assert filter_result_before_code(after, CFG) is None
    assert filter_result_before_code(make(intro="The boxes hold 12 * 7 pens; x = 12 * 7 + 3.\n"), CFG) is None
    # a second block's prose (after the first observation) is checked too
    second = make(blocks=[block(GOOD_CODE), "Then 87 - 3 = 84 pens are in boxes.\n" + block(GOOD_CODE)])
    assert "'87 - 3 = 84'" in (filter_result_before_code(second, CFG) or "")


def test_invented_unrun_and_carried_samples_are_rejected_at_their_named_funnel_stage() -> None:
    good = make("good")
    result = apply_filters([INVENTED, UNRUN, CARRIED, good], CFG)
    assert result.kept == [good]
    assert {r.sample.problem_id: r.stage for r in result.rejected} == {
        "invented": "real_outputs",
        "unrun": "real_outputs",
        "carried": "result_before_code",
    }
    table = format_funnel(result.funnel)
    assert "| real_outputs | 4 | 2 | 2 |" in table and "| result_before_code | 2 | 1 | 1 |" in table


# --- think ---------------------------------------------------------------------------------------------------------


def test_think_passes_a_complete_block_with_code_inside() -> None:
    s = make(reasoning=True, think=("<think>\n", "</think>\n\n"))
    assert filter_think(s, CFG) is None
    # Templates that open the block in the prompt.
    opened = make(reasoning=True, prompt=PROMPT + "<think>\n", think=("", "</think>\n\n"))
    assert filter_think(opened, CFG) is None


def test_think_only_applies_to_reasoning_models() -> None:
    assert filter_think(make(reasoning=False), CFG) is None
    assert filter_think(make(reasoning=True), CFG) is not None


@pytest.mark.parametrize(
    ("think", "extra_final", "why"),
    [
        (("<think>\n", ""), "", "unclosed"),
        (("", "</think>\n"), "", "never opened"),
        (("<think>\n", "</think>\n"), "<think>again</think>\n", "two blocks"),
    ],
)
def test_think_rejects_incomplete_or_repeated_blocks(think: tuple[str, str], extra_final: str, why: str) -> None:
    s = make(reasoning=True, think=think, final=extra_final + "\\boxed{87}")
    assert filter_think(s, CFG) is not None, why


def test_think_rejects_a_think_block_without_code_inside() -> None:
    s = make(reasoning=True, intro="<think>\nTwelve sevens are 84, plus 3.\n</think>\n\nLet me check.\n\n")
    reason = filter_think(s, CFG)
    assert reason is not None and "no complete code block" in reason


# --- has_code ------------------------------------------------------------------------------------------------------


def test_has_code() -> None:
    assert filter_has_code(make(), CFG) is None
    no_code = make(blocks=[], outputs=[], intro="Twelve boxes of seven pens are $84$ pens; with $3$ more, $87$.\n\n")
    assert filter_has_code(no_code, CFG) == "no code call"


# --- code_quality --------------------------------------------------------------------------------------------------


def code_with_real_lines(n: int) -> str:
    """`n` real lines with comments and blank lines around them (which do not count)."""
    lines = ["# compute step by step", ""]
    for i in range(n - 1):
        lines += [f"x{i} = {i} * 7", "    # still a comment", ""]
    lines.append("print('done')")
    return "\n".join(lines) + "\n"


def test_real_code_lines_ignores_blank_and_comment_lines() -> None:
    assert real_code_lines(code_with_real_lines(5)) == 5
    assert real_code_lines("\n# a\n   \n  # b\nx = 1  # c\n") == 1


def test_code_quality_boundary_five_real_lines_is_low_six_is_fine() -> None:
    five = make(blocks=[block(code_with_real_lines(5))])
    six = make(blocks=[block(code_with_real_lines(6))])
    assert "1 of 1" in (filter_code_quality(five, CFG) or "")
    assert filter_code_quality(six, CFG) is None


def test_code_quality_fraction_threshold() -> None:
    low, good = block(code_with_real_lines(2)), block(code_with_real_lines(8))
    two_of_five = make(blocks=[low, low, good, good, good])  # 0.4: not more than 40%
    three_of_five = make(blocks=[low, low, low, good, good])
    assert filter_code_quality(two_of_five, CFG) is None
    assert "3 of 5" in (filter_code_quality(three_of_five, CFG) or "")


# --- repetition ----------------------------------------------------------------------------------------------------


def test_find_repetition_counts_non_overlapping_occurrences() -> None:
    assert find_repetition("a" * 100, 20, 5) == ("a" * 20, 5)
    assert find_repetition("a" * 99, 20, 5) is None
    assert find_repetition(" " * 400, 20, 5) is None  # whitespace only: indentation, not a loop


def test_repetition_catches_a_looping_generation() -> None:
    loop = "Wait, let me recompute the total number of pens again. " * 8
    s = make(final="Twelve boxes of seven are 84. " + loop + "\\boxed{87}")
    reason = filter_repetition(s, CFG)
    assert reason is not None and "prose" in reason
    looping_code = block(GOOD_CODE + "total = total + 0  # no change here\n" * 6)
    reason = filter_repetition(make(blocks=[looping_code]), CFG)
    assert reason is not None and "code block" in reason


def test_repetition_passes_a_normal_solution_with_repeated_short_tokens() -> None:
    math = (
        "We have $\\frac{1}{2} = \\frac{2}{4} = \\frac{3}{6} = \\frac{4}{8} = \\frac{5}{10} = \\frac{6}{12}$, "
        "so $x = 2$, $y = 3$, $z = 4$, $w = 5$, $v = 6$ and $x + y = 5$, $y + z = 7$, $z + w = 9$.\n\n"
    )
    # Six self-contained blocks, each repeating the same imports and indentation.
    code = (
        "import sympy as sp\n"
        "from fractions import Fraction\n"
        "for k in range(1, 7):\n"
        "    if k % 2 == 0:\n"
        "        if k > 2:\n"
        "            print(Fraction(k, 2 * k))\n"
    )
    s = make(intro=math, blocks=[block(code)] * 6, outputs=["1/2"] * 6)
    assert filter_repetition(s, CFG) is None
    assert apply_filters([s], CFG).kept == [s]


#: Two good code blocks: a multi-call sample, which the single-call down-sample never drops.
TWO = [block(GOOD_CODE)] * 2


# --- dedup ---------------------------------------------------------------------------------------------------------


def test_dedup_keeps_exactly_one_sample_per_problem_whatever_the_order() -> None:
    samples = [
        make(f"p{p}", intro=f"Attempt {a}: we count the pens, $12 \\times 7$, and add $3$.\n\n", blocks=TWO)
        for p in range(3)
        for a in range(4)
    ]
    samples += [make("p0", source="math", blocks=TWO)]  # same problem id, other source: another problem
    result = apply_filters(samples, CFG)
    ids = [s.id for s in result.kept]
    assert sorted(ids) == sorted({s.id for s in samples}) and len(ids) == 4
    assert result.by_stage["dedup"] == len(samples) - 4
    shuffled = samples[:]
    random.Random(7).shuffle(shuffled)
    again = apply_filters(shuffled, CFG)
    assert {s.completion for s in again.kept} == {s.completion for s in result.kept}


def test_dedup_keeps_a_passing_sample_when_the_first_one_fails() -> None:
    bad = make("p1", correct=False, blocks=TWO)
    good = make("p1", intro="We multiply, $12 \\times 7$, then add the $3$ loose pens.\n\n", blocks=TWO)
    result = apply_filters([bad, good], CFG)
    assert result.kept == [good]
    assert [(r.stage, r.sample is bad) for r in result.rejected] == [("correct", True)]


# --- single_call_downsample ----------------------------------------------------------------------------------------


def test_single_call_downsample_is_deterministic_and_about_half() -> None:
    singles = [make(f"s{i}") for i in range(200)]
    first = apply_filters(singles, CFG)
    n = len(first.kept)
    assert 70 <= n <= 130
    assert first.by_stage["single_call_downsample"] == 200 - n
    rerun = apply_filters(list(reversed(singles)), CFG)
    assert {s.id for s in rerun.kept} == {s.id for s in first.kept}
    other_seed = apply_filters(singles, FilterConfig(seed=1))
    assert {s.id for s in other_seed.kept} != {s.id for s in first.kept}
    assert apply_filters(singles, FilterConfig(single_call_keep_fraction=1.0)).kept == singles
    assert apply_filters(singles, FilterConfig(single_call_keep_fraction=0.0)).kept == []


def test_single_call_downsample_never_drops_multi_call_samples() -> None:
    multis = [make(f"m{i}", blocks=[block(GOOD_CODE)] * 2) for i in range(200)]
    result = apply_filters(multis, CFG)
    assert result.kept == multis


# --- funnel and the whole pipeline ---------------------------------------------------------------------------------


def mixed_batch() -> list[TirSample]:
    loop = "Let me recompute the total number of pens again. " * 6
    return [
        make("a"),
        make("a", intro="Another way: $7 \\times 12$ pens in boxes and $3$ loose ones.\n\n"),
        make("b", correct=False),
        make("c", failed=1),
        make("d", intro="", blocks=[], outputs=[], final="\\boxed{87}"),
        make("e", final="The shop has 87 pens."),
        make("f", final="It costs $5.\n\n\\boxed{87}"),
        make("g", reasoning=True),
        make(
            "h",
            blocks=[],
            outputs=[],
            intro="Twelve boxes of seven pens are $84$ pens, and the $3$ loose pens make it $87$.\n\n",
        ),
        make(
            "i",
            blocks=[block("print(12 * 7 + 3)\n")],
            intro="We count all the pens with one line of Python: twelve boxes of seven, plus three.\n\n",
        ),
        make("j", final=loop + "\\boxed{87}"),
        INVENTED,
        CARRIED,
        *[make(f"k{n}", blocks=[block(GOOD_CODE)] * 2) for n in range(3)],
        *[make(f"s{n}") for n in range(10)],
    ]


def test_funnel_counts_are_consistent() -> None:
    samples = mixed_batch()
    result = apply_filters(samples, CFG)
    names = [s.name for s in result.funnel]
    assert names == ["generated", *ALL_STAGES, "kept"]
    for before, after in zip(result.funnel, result.funnel[1:], strict=False):
        assert before.n_out == after.n_in
    assert result.funnel[0].n_in == len(samples) and result.funnel[-1].n_out == len(result.kept)
    assert len(result.rejected) == len(samples) - len(result.kept)
    for stage in result.funnel[1:-1]:
        assert stage.dropped == result.by_stage[stage.name]
    # Every per-sample stage rejected its planted sample.
    for name in ("correct", "code_passed", "length", "boxed", "dollars", "real_outputs", "result_before_code"):
        assert result.by_stage[name] == 1, name
    for name in ("think", "has_code", "code_quality"):
        assert result.by_stage[name] == 1, name
    assert result.by_stage["repetition"] == 1 and result.by_stage["dedup"] == 1
    assert result.generated == len(samples)
    summary = result.summary()
    assert summary["kept"] == len(result.kept) and summary["funnel"][0]["in"] == len(samples)


def test_code_invocation_ratio_for_generated_and_kept() -> None:
    samples = mixed_batch()
    result = apply_filters(samples, CFG)
    with_code = sum(1 for s in samples if s.code_calls > 0)
    assert result.code_invocation_generated == pytest.approx(with_code / len(samples))
    assert with_code < len(samples)
    assert result.code_invocation_kept == 1.0
    assert code_invocation_ratio([]) == 0.0


def test_disabling_a_stage_by_name() -> None:
    samples = mixed_batch()
    off = apply_filters(samples, FilterConfig(disabled={"correct", "dedup"}))
    stages = {s.name: s for s in off.funnel}
    assert not stages["correct"].enabled and stages["correct"].dropped == 0
    assert off.by_stage["correct"] == 0 and off.by_stage["dedup"] == 0
    assert any(s.problem_id == "b" for s in off.kept)
    assert len(off.kept) > len(apply_filters(samples, CFG).kept)


def test_unknown_stage_names_are_refused_with_the_valid_ones_listed() -> None:
    with pytest.raises(ValidationError) as e:
        FilterConfig(disabled={"corect"})
    assert "'corect'" in str(e.value) and "single_call_downsample" in str(e.value)


def test_format_funnel_is_a_markdown_table() -> None:
    result = apply_filters(mixed_batch(), FilterConfig(disabled={"think"}))
    table = format_funnel(result.funnel)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| stage | in | out |") and len(lines) == 2 + len(result.funnel)
    assert f"| generated | {result.generated} | {result.generated} | 0 | 100.0% |" in table
    assert "| think (off) |" in table
    assert lines[-1].startswith(f"| kept | {len(result.kept)} | {len(result.kept)} |")


def test_plot_funnel_writes_a_png(tmp_path) -> None:
    result = apply_filters(mixed_batch(), CFG)
    path = plot_funnel(result.funnel, tmp_path / "out" / "funnel.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


# --- the shipped run -----------------------------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parents[1] / "docs" / "training" / "tirgen-gsm8k-default"


def _jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_the_shipped_samples_hold_only_real_outputs() -> None:
    samples = [TirSample.model_validate(d) for d in _jsonl_gz(SHIPPED / "samples.jsonl.gz")]
    assert len(samples) == json.loads((SHIPPED / "summary.json").read_text())["kept"] > 0
    for s in samples:
        completion = [seg for seg in s.segments if seg.kind != "prompt"]
        blocks = 0
        for n, seg in enumerate(completion):
            if seg.kind != "model":
                continue
            assert "```output" not in seg.text, f"{s.id}: an output block the model wrote itself"
            for b in find_blocks(seg.text):
                assert b.language == "python" and b.closed, (s.id, b)
                blocks += 1
                assert not seg.text[b.end :].strip(), f"{s.id}: model text between a block and its output"
                assert n + 1 < len(completion) and completion[n + 1].kind == "observation", f"{s.id}: no output"
        assert blocks == s.code_calls == sum(seg.kind == "observation" for seg in completion) > 0, s.id


def test_refilter_reproduces_the_shipped_run_from_its_log(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "generated.jsonl.gz", "summary.json"):
        shutil.copy(SHIPPED / name, run / name)
    r = subprocess.run(
        [sys.executable, "-m", "trainer.tirgen", "--refilter", str(run)],
        cwd=SHIPPED.parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _jsonl_gz(run / "samples.jsonl.gz") == _jsonl_gz(SHIPPED / "samples.jsonl.gz")
    assert json.loads((run / "summary.json").read_text()) == json.loads((SHIPPED / "summary.json").read_text())
    assert (run / "funnel.md").read_text() == (SHIPPED / "funnel.md").read_text()
    rejected = _jsonl_gz(run / "rejected.jsonl.gz")
    invented = sorted(d["id"] for d in rejected if d["stage"] == "real_outputs")
    assert {"gsm8k/gsm8k-326", "gsm8k/gsm8k-465"} <= set(invented), invented
