"""The evaluation metrics (trainer/evaluate/metrics.py) against hand-computed cases.

Covers the pass@k estimator, maj@k voting (ties, abstentions, normalisation), the
bootstrap / Wilson / paired intervals, and `summarise` on a hand-built run of two
benchmarks x two modes x k=2 whose every number below was worked out by hand (see
`run_records`).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from math import comb

import pytest

from trainer.evaluate.metrics import (
    Summary,
    bootstrap_interval,
    majority_at_k,
    paired_bootstrap,
    pass_at_k,
    stratified_bootstrap,
    stratified_paired_bootstrap,
    summarise,
    wilson_interval,
)
from trainer.evaluate.records import SampleRecord, ToolCallRecord, ToolTotals, UsageRecord

# --------------------------------------------------------------------------- builders


def record(
    benchmark: str,
    problem_id: str,
    mode: str,
    sample: int,
    answer: str | None,
    correct: bool,
    calls: list[ToolCallRecord] | None = None,
    *,
    backtracks: int = 0,
    discarded: int = 0,
    finish_reason: str = "stop",
    error: str | None = None,
    wall_s: float = 2.0,
) -> SampleRecord:
    calls = calls or []
    executed = [c for c in calls if c.outcome != "not_executed"]
    return SampleRecord(
        benchmark=benchmark,
        problem_id=problem_id,
        problem_index=int(problem_id[1:]),
        mode=mode,
        sample=sample,
        model="hand-built",
        target="in-process",
        prompt=[{"role": "user", "content": f"problem {problem_id}"}],
        text=f"... \\boxed{{{answer}}}" if answer is not None else "",
        answer=answer,
        gold="gold",
        correct=correct,
        finish_reason=finish_reason,
        tool_calls=calls,
        tools=ToolTotals(
            calls=len(executed),
            ok=sum(c.ok for c in executed),
            failed=sum(not c.ok for c in executed),
            backtracks=backtracks,
            not_executed=len(calls) - len(executed),
            duration_s=sum(c.duration_s for c in executed),
        ),
        usage=UsageRecord(
            prompt_tokens=50, completion_tokens=100, generated_tokens=100 + discarded, discarded_tokens=discarded
        ),
        wall_s=wall_s,
        error=error,
    )


def call(
    outcome: str, *, committed: bool = True, call_index: int = 0, attempt: int = 0, duration_s: float = 0.5
) -> ToolCallRecord:
    return ToolCallRecord(
        call=call_index,
        attempt=attempt,
        code="print(1)",
        ok=outcome == "ok",
        outcome=outcome,
        committed=committed,
        duration_s=0.0 if outcome == "not_executed" else duration_s,
    )


def run_records() -> list[SampleRecord]:
    """Two benchmarks (b1: p1, p2; b2: q1, q2, q3), modes cot and thor, k=2.

    cot (no tools)                              thor
    b1 p1: "5" right, "6" wrong   acc .5        p1: right [ok], right [error (discarded), ok]  acc 1
       p2: "1" wrong, "2" wrong   acc 0         p2: "7" right [no calls], "8" wrong [error, not_executed]  acc .5
    b2 q1: right, right           acc 1         q1: right [ok], right [ok, ok]  acc 1
       q2: None, None             acc 0         q2: "2" right [timeout], "9" wrong [no calls]  acc .5
       q3: "3" wrong, "4" right   acc .5        q3: "4" right [ok], generation error  acc .5
    """
    r = record
    return [
        # cot, b1
        r("b1", "p1", "cot", 0, "5", True),
        r("b1", "p1", "cot", 1, "6", False),
        r("b1", "p2", "cot", 0, "1", False, finish_reason="length", wall_s=4.0),
        r("b1", "p2", "cot", 1, "2", False),
        # cot, b2
        r("b2", "q1", "cot", 0, "10", True),
        r("b2", "q1", "cot", 1, "10", True),
        r("b2", "q2", "cot", 0, None, False, finish_reason="length"),
        r("b2", "q2", "cot", 1, None, False, finish_reason="length"),
        r("b2", "q3", "cot", 0, "3", False),
        r("b2", "q3", "cot", 1, "4", True),
        # thor, b1
        r("b1", "p1", "thor", 0, "5", True, [call("ok")]),
        r(
            "b1",
            "p1",
            "thor",
            1,
            "5",
            True,
            [call("error", committed=False, duration_s=0.25), call("ok", attempt=1, duration_s=0.25)],
            backtracks=1,
            discarded=30,
        ),
        r("b1", "p2", "thor", 0, "7", True),
        r("b1", "p2", "thor", 1, "8", False, [call("error", duration_s=1.0), call("not_executed", call_index=1)]),
        # thor, b2
        r("b2", "q1", "thor", 0, "10", True, [call("ok")]),
        r("b2", "q1", "thor", 1, "10", True, [call("ok"), call("ok", call_index=1)]),
        r("b2", "q2", "thor", 0, "2", True, [call("timeout")]),
        r("b2", "q2", "thor", 1, "9", False),
        r("b2", "q3", "thor", 0, "4", True, [call("ok")]),
        r("b2", "q3", "thor", 1, None, False, finish_reason="error", error="engine died"),
    ]


# --------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 0, 1, 0.0),
        (5, 0, 5, 0.0),
        (5, 5, 1, 1.0),
        (5, 5, 3, 1.0),
        (5, 2, 1, 0.4),
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 1, 3, 0.75),  # 1 - C(3,3)/C(4,3) = 1 - 1/4
        (4, 1, 4, 1.0),  # n - c < k: every k-subset holds the correct one
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (2, 1, 2, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct() -> None:
    for c in range(8):
        assert pass_at_k(7, c, 1) == c / 7


def test_pass_at_k_is_stable_where_the_binomials_are_huge() -> None:
    # C(1000, 500) has ~300 digits; the product form must still match the exact ratio.
    exact = 1 - Fraction(comb(990, 500), comb(1000, 500))
    assert pass_at_k(1000, 10, 500) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 1, 0), (3, 4, 1), (3, -1, 1), (0, 0, 1)])
def test_pass_at_k_rejects_impossible_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match=r"pass@k"):
        pass_at_k(n, c, k)


# --------------------------------------------------------------------------- maj@k


def _samples(*answers: tuple[str | None, bool]) -> list[SampleRecord]:
    return [record("b", "p0", "m", i, a, ok) for i, (a, ok) in enumerate(answers)]


def test_majority_tie_goes_to_the_first_seen_answer() -> None:
    vote = majority_at_k(_samples(("5", True), ("6", False)))
    assert (vote.answer, vote.correct, vote.votes, vote.answered) == ("5", True, 1, 2)
    vote = majority_at_k(_samples(("6", False), ("5", True)))
    assert (vote.answer, vote.correct) == ("6", False)


def test_majority_beats_first_seen_when_not_tied() -> None:
    vote = majority_at_k(_samples(("6", False), ("5", True), ("5", True)))
    assert (vote.answer, vote.correct, vote.votes) == ("5", True, 2)


def test_majority_groups_by_normalised_answer_and_takes_the_first_spelling() -> None:
    # \frac12 and 1/2 normalise the same: two votes against one for 3.
    vote = majority_at_k(_samples(("3", False), ("\\frac12", True), ("1/2", True)))
    assert (vote.answer, vote.votes, vote.correct) == ("\\frac12", 2, True)


def test_majority_abstentions_do_not_vote_and_no_answer_is_wrong() -> None:
    vote = majority_at_k(_samples((None, False), ("", False), ("4", True)))
    assert (vote.answer, vote.votes, vote.answered, vote.correct) == ("4", 1, 1, True)
    vote = majority_at_k(_samples((None, False), (None, False)))
    assert (vote.answer, vote.votes, vote.answered, vote.correct) == (None, 0, 0, False)


def test_majority_correctness_is_the_flag_of_the_winning_spelling() -> None:
    # The checker is not re-run: the verdict of the first sample written as the winner is used.
    vote = majority_at_k(_samples(("7", False), ("7", False), ("8", True)))
    assert (vote.answer, vote.correct) == ("7", False)


# --------------------------------------------------------------------------- intervals


def test_bootstrap_is_deterministic_given_the_seed() -> None:
    values = [0.13, 0.71, 0.42, 0.05, 0.99, 0.37, 0.58, 0.26, 0.84, 0.61]  # continuous: no tied quantiles
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    assert bootstrap_interval(values, seed=3) != bootstrap_interval(values, seed=4)


def test_bootstrap_contains_the_mean_and_narrows_as_n_grows() -> None:
    small = bootstrap_interval([0.0, 1.0] * 10)
    large = bootstrap_interval([0.0, 1.0] * 500)
    for iv in (small, large):
        assert iv.value == 0.5
        assert iv.low < 0.5 < iv.high
    assert (large.high - large.low) < (small.high - small.low) / 4
    # n = 1000, p = .5: the normal interval is 0.5 +- 1.96 * 0.5 / sqrt(1000) = +-0.031.
    assert (large.high - large.low) / 2 == pytest.approx(1.96 * 0.5 / math.sqrt(1000), abs=0.003)


def test_bootstrap_of_constant_scores_is_a_point() -> None:
    assert bootstrap_interval([0.0] * 12).model_dump() == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert bootstrap_interval([1.0] * 12).model_dump() == {"value": 1.0, "low": 1.0, "high": 1.0}


def test_bootstrap_rejects_no_values_and_bad_confidence() -> None:
    with pytest.raises(ValueError, match="empty"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1.0], confidence=95)


def test_stratified_bootstrap_is_the_unweighted_mean_of_group_means() -> None:
    iv = stratified_bootstrap([[1.0, 1.0], [0.0] * 8])
    assert iv.value == 0.5  # pooled would be 0.2
    assert (iv.low, iv.high) == (0.5, 0.5)  # each group is constant within itself
    iv = stratified_bootstrap([[0.0, 1.0] * 5, [1.0] * 4])
    assert iv.value == 0.75
    assert 0.5 < iv.low < 0.75 < iv.high < 1.0


def test_wilson_known_values() -> None:
    iv = wilson_interval(8, 10)
    assert (iv.value, round(iv.low, 4), round(iv.high, 4)) == (0.8, 0.4902, 0.9433)
    iv = wilson_interval(0, 10)
    assert (iv.value, iv.low, round(iv.high, 4)) == (0.0, 0.0, 0.2775)
    iv = wilson_interval(10, 10)
    assert (iv.value, round(iv.low, 4), iv.high) == (1.0, 0.7225, 1.0)
    iv = wilson_interval(1, 2, confidence=0.9)  # z = 1.6449
    assert (round(iv.low, 4), round(iv.high, 4)) == (0.1209, 0.8791)
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)


def test_paired_bootstrap_sign_and_exclusions() -> None:
    a = {f"p{i}": 1.0 for i in range(20)} | {"only_a": 1.0}
    b = {f"p{i}": float(i % 4 == 0) for i in range(20)} | {"only_b1": 0.0, "only_b2": 0.0}
    d = paired_bootstrap(a, b)
    assert (d.paired, d.only_a, d.only_b) == (20, 1, 2)
    assert d.difference == pytest.approx(0.75)
    assert 0 < d.low < 0.75 < d.high <= 1
    assert d.excludes_zero and d.share_le_zero == 0.0
    r = paired_bootstrap(b, a)
    assert r.difference == pytest.approx(-0.75)
    assert r.excludes_zero and r.share_le_zero == 1.0
    assert (r.only_a, r.only_b) == (2, 1)


def test_paired_bootstrap_without_a_difference_does_not_exclude_zero() -> None:
    same = {f"p{i}": float(i % 2) for i in range(10)}
    d = paired_bootstrap(same, dict(same))
    assert (d.difference, d.low, d.high, d.share_le_zero, d.excludes_zero) == (0.0, 0.0, 0.0, 1.0, False)
    # one problem better, one worse, eight equal: the interval straddles 0
    b = dict(same) | {"p0": 1.0, "p1": 0.0}
    d = paired_bootstrap(same, b)
    assert d.difference == 0.0 and d.low < 0 < d.high and not d.excludes_zero
    assert 0.3 < d.share_le_zero < 1.0


def test_paired_bootstrap_with_nothing_in_common_is_an_error() -> None:
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap({"x": 1.0}, {"y": 0.0})


def test_stratified_paired_bootstrap_counts_unpaired_strata() -> None:
    d = stratified_paired_bootstrap({"s1": {"a": 1.0}, "s2": {"b": 1.0, "c": 0.0}}, {"s1": {"a": 0.0}})
    assert (d.difference, d.paired, d.only_a, d.only_b) == (1.0, 1, 2, 0)


# --------------------------------------------------------------------------- summarise


@pytest.fixture(scope="module")
def summary() -> Summary:
    return summarise(run_records(), modes=["cot", "thor"], resamples=2000)


def test_summary_shape(summary: Summary) -> None:
    assert (summary.k, summary.modes, summary.benchmarks, summary.records) == (2, ["cot", "thor"], ["b1", "b2"], 20)
    assert [(r.benchmark, r.mode, r.problems, r.samples) for r in summary.results] == [
        ("b1", "cot", 2, 4),
        ("b1", "thor", 2, 4),
        ("b2", "cot", 3, 6),
        ("b2", "thor", 3, 6),
    ]
    assert summary.missing == []
    assert all(r.incomplete_problems == 0 for r in summary.results)


def test_summary_accuracy_numbers(summary: Summary) -> None:
    table = {
        # (benchmark, mode): (Avg@2, maj@2, pass@2)
        ("b1", "cot"): (0.25, 0.5, 0.5),  # p1 tie 5/6 -> "5" right
        ("b2", "cot"): (0.5, 1 / 3, 2 / 3),  # q2 no answer -> wrong; q3 tie 3/4 -> "3" wrong
        ("b1", "thor"): (0.75, 1.0, 1.0),  # p2 tie 7/8 -> "7" right
        ("b2", "thor"): (2 / 3, 1.0, 1.0),  # q3: one answer "4" (the error abstains)
    }
    for (bench, mode), (avg, maj, pas) in table.items():
        res = summary.result(bench, mode)
        assert res is not None
        assert res.avg_at_k.value == pytest.approx(avg), (bench, mode)
        assert res.maj_at_k.value == pytest.approx(maj), (bench, mode)
        assert res.pass_at_k.value == pytest.approx(pas), (bench, mode)
        assert res.pass_at_1.value == pytest.approx(avg)
        for iv in (res.avg_at_k, res.maj_at_k, res.pass_at_k):
            assert 0.0 <= iv.low <= iv.value <= iv.high <= 1.0
    b2 = summary.result("b2", "cot")
    assert b2 is not None
    assert [(p.problem_id, p.correct, p.majority_answer, p.majority_correct) for p in b2.per_problem] == [
        ("q1", 2, "10", True),
        ("q2", 0, None, False),
        ("q3", 1, "3", False),
    ]
    cot, thor = summary.mode_overall("cot"), summary.mode_overall("thor")
    assert cot is not None and thor is not None
    assert cot.avg_at_k.value == pytest.approx((0.25 + 0.5) / 2)  # unweighted over benchmarks
    assert thor.avg_at_k.value == pytest.approx((0.75 + 2 / 3) / 2)
    assert cot.maj_at_k.value == pytest.approx((0.5 + 1 / 3) / 2)
    assert thor.pass_at_k.value == 1.0 and (thor.pass_at_k.low, thor.pass_at_k.high) == (1.0, 1.0)
    assert thor.benchmarks == ["b1", "b2"]


def test_summary_tool_statistics(summary: Summary) -> None:
    t = summary.result("b1", "thor")
    assert t is not None
    tools = t.tools
    assert tools.executed_calls == 4  # the not_executed block is not a call
    assert tools.calls_per_problem == 2.0  # p1: 1 + 2, p2: 0 + 1
    assert tools.calls_per_sample == 1.0
    assert tools.call_success_rate == 0.5
    assert (tools.committed_calls, tools.committed_success_rate) == (3, pytest.approx(2 / 3))
    assert tools.backtracks_per_sample == 0.25
    assert tools.discarded_tokens_per_sample == 7.5
    assert tools.sandbox_s_per_sample == 0.5  # (0.5 + 0.25 + 0.25 + 1.0) / 4
    assert tools.not_executed == 1
    assert tools.outcomes == {"ok": 2, "error": 2}
    b2 = summary.result("b2", "thor")
    assert b2 is not None
    assert (b2.tools.executed_calls, b2.tools.call_success_rate, b2.tools.outcomes) == (
        5,
        0.8,
        {"ok": 4, "timeout": 1},
    )
    c = summary.result("b1", "cot")
    assert c is not None
    assert (c.tools.executed_calls, c.tools.call_success_rate, c.tools.committed_success_rate) == (0, None, None)


def test_summary_key_insight(summary: Summary) -> None:
    def counts(ki):  # (samples, correct) per group
        return [(g.samples, g.correct) for g in (ki.all_succeeded, ki.some_failed, ki.no_calls)]

    b1 = summary.result("b1", "thor")
    b2 = summary.result("b2", "thor")
    assert b1 is not None and b2 is not None
    # p1s1's failed attempt was discarded: "some failed" over all attempts, "all succeeded" over committed ones
    assert counts(b1.key_insight) == [(1, 1), (2, 1), (1, 1)]
    assert counts(b1.key_insight_committed) == [(2, 2), (1, 0), (1, 1)]
    # q3s1 (generation error) is left out
    assert counts(b2.key_insight) == [(3, 3), (1, 1), (1, 0)]
    thor = summary.mode_overall("thor")
    assert thor is not None
    assert counts(thor.key_insight) == [(4, 4), (3, 2), (2, 1)]
    assert thor.key_insight.some_failed.accuracy == wilson_interval(2, 3)
    assert thor.key_insight.all_succeeded.accuracy == wilson_interval(4, 4)
    cot = summary.mode_overall("cot")
    assert cot is not None
    assert counts(cot.key_insight) == [(0, 0), (0, 0), (10, 4)]
    assert cot.key_insight.all_succeeded.accuracy is None


def test_summary_tokens_time_finish_reasons_errors(summary: Summary) -> None:
    c = summary.result("b1", "cot")
    assert c is not None
    assert c.finish_reasons == {"stop": 3, "length": 1}
    assert c.wall_s_per_sample == 2.5  # (2 + 2 + 4 + 2) / 4
    assert (c.tokens.completion_per_sample, c.tokens.generated_per_sample, c.tokens.prompt_per_sample) == (
        100.0,
        100.0,
        50.0,
    )
    t = summary.result("b1", "thor")
    assert t is not None and t.tokens.generated_per_sample == 107.5
    b2 = summary.result("b2", "thor")
    assert b2 is not None
    assert (b2.errors, b2.error_examples, b2.finish_reasons) == (1, {"engine died": 1}, {"stop": 5, "error": 1})


def test_summary_comparisons(summary: Summary) -> None:
    (cmp,) = summary.comparisons
    assert (cmp.mode, cmp.baseline) == ("thor", "cot")
    b1, b2 = cmp.per_benchmark["b1"], cmp.per_benchmark["b2"]
    # b1: +.5 on both problems: a constant difference
    assert (b1.difference, b1.low, b1.high, b1.share_le_zero, b1.excludes_zero, b1.paired) == (
        0.5,
        0.5,
        0.5,
        0.0,
        True,
        2,
    )
    # b2: differences 0, +.5, 0 -> mean 1/6; a resample is <= 0 iff it misses q2: (2/3)^3
    assert b2.difference == pytest.approx(1 / 6)
    assert (b2.low, b2.high, b2.excludes_zero) == (0.0, 0.5, False)
    assert b2.share_le_zero == pytest.approx((2 / 3) ** 3, abs=0.03)
    assert cmp.overall is not None
    assert cmp.overall.difference == pytest.approx((0.5 + 1 / 6) / 2)
    assert cmp.overall.paired == 5 and (cmp.overall.only_a, cmp.overall.only_b) == (0, 0)
    assert cmp.overall.low == pytest.approx(0.25) and cmp.overall.high == pytest.approx(0.5)


def test_summarise_k_keeps_the_first_samples() -> None:
    s = summarise(run_records(), modes=["cot", "thor"], k=1, resamples=500)
    c = s.result("b1", "cot")
    assert c is not None and s.k == 1 and s.records == 10
    assert (c.samples, c.avg_at_k.value, c.maj_at_k.value, c.pass_at_k.value) == (2, 0.5, 0.5, 0.5)


def test_summarise_partial_run_counts_incomplete_problems() -> None:
    records = [r for r in run_records() if not (r.mode == "cot" and r.problem_id == "p1" and r.sample == 1)]
    s = summarise(records, modes=["cot", "thor"], resamples=500)
    c = s.result("b1", "cot")
    assert c is not None and s.k == 2
    assert (c.incomplete_problems, c.samples) == (1, 3)
    p1 = c.per_problem[0]
    assert (p1.problem_id, p1.samples, p1.accuracy, p1.pass_at_k) == ("p1", 1, 1.0, 1.0)  # pass@1 of one sample


def test_summarise_selection_order_and_missing() -> None:
    s = summarise(run_records(), modes=["thor", "cot", "tir-ref"], benchmarks=["b2"], resamples=500)
    assert s.modes == ["thor", "cot", "tir-ref"] and s.benchmarks == ["b2"]
    assert s.missing == ["b2/tir-ref"]
    assert [(c.mode, c.baseline) for c in s.comparisons] == [("cot", "thor"), ("tir-ref", "thor")]
    assert s.comparisons[0].per_benchmark["b2"].difference == pytest.approx(-1 / 6)
    assert s.comparisons[1].per_benchmark == {} and s.comparisons[1].overall is None
    # modes default to the order of first appearance
    assert summarise(run_records(), resamples=100).modes == ["cot", "thor"]


def test_summarise_refuses_duplicate_records() -> None:
    records = run_records()
    with pytest.raises(ValueError, match="mixes runs"):
        summarise([*records, records[0]])


def test_summarise_is_deterministic_and_json_round_trips(summary: Summary) -> None:
    again = summarise(run_records(), modes=["cot", "thor"], resamples=2000)
    assert again == summary
    text = json.dumps(summary.model_dump(mode="json"))
    assert Summary.model_validate_json(text) == summary
