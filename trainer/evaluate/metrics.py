"""Metrics of the evaluation harness: from `SampleRecord`s to a JSON-serialisable `Summary`.

Owns: the estimators (`pass_at_k`, `majority_at_k`), the intervals (`bootstrap_interval`,
`stratified_bootstrap`, `wilson_interval`, `paired_bootstrap`,
`stratified_paired_bootstrap`) and `summarise`, which turns a run's records into per
(benchmark, mode) results (Avg@k, maj@k, pass@k with intervals, tool statistics, the
key-insight table, tokens, wall time, finish reasons, errors), an "overall" row per mode
(the paper's "Avg" column) and paired comparisons of each mode against the first.

Does not own: producing or storing records (runner.py, targets.py, records.py), checking
answers (`thor_engine.answer`: this module never re-runs the checker), or rendering
(report.py).

Conventions: every rate is a fraction in 0..1 (reports print percentages). Intervals are
95% by default; bootstrap intervals are percentile intervals over `resamples` resamples
drawn from `numpy.random.default_rng(seed)`, so a summary is reproducible bit for bit.
Problems are the unit of the bootstrap (Avg@k, maj@k, pass@k, paired differences);
samples are the unit of the Wilson intervals (the key-insight table).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from statistics import NormalDist

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from thor_engine.answer import majority_vote, normalize_answer

from .records import SampleRecord

__all__ = [
    "BenchmarkModeResult",
    "Comparison",
    "Interval",
    "KeyInsight",
    "KeyInsightGroup",
    "MajorityVote",
    "ModeOverall",
    "PairedDifference",
    "ProblemResult",
    "Summary",
    "TokenStats",
    "ToolStats",
    "bootstrap_interval",
    "key_insight",
    "majority_at_k",
    "paired_bootstrap",
    "pass_at_k",
    "stratified_bootstrap",
    "stratified_paired_bootstrap",
    "summarise",
    "wilson_interval",
]

# Rows of the resample matrix drawn at once: bounds memory at _CHUNK * n int64s per stratum.
_CHUNK = 1000


# --------------------------------------------------------------------------- estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `n` samples of which `c` are correct.

    1 - C(n-c, k) / C(n, k), computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i)
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"), which never
    forms the huge binomials. pass@1 = c/n.
    """
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample (n={n}); a problem without samples has no score")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: correct count c={c} must lie in 0..n (n={n})")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass@k: k={k} must lie in 1..n (n={n} samples); the estimator needs at least k samples: "
            "use k <= the samples the problem has"
        )
    if k == 1:
        return c / n  # the product below telescopes to this; exact here
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


class MajorityVote(BaseModel):
    """maj@k of one problem: the majority answer and whether it is correct."""

    answer: str | None = Field(description="The majority answer as first written; None if no sample answered.")
    votes: int = Field(description="Samples whose answer normalises to the majority answer.")
    answered: int = Field(description="Samples with an answer at all.")
    correct: bool


def majority_at_k(samples: Sequence[SampleRecord]) -> MajorityVote:
    """The majority answer over `samples` (in the order given) and its correctness.

    Voting is `thor_engine.answer.majority_vote`: answers are grouped by
    `normalize_answer`, samples without an answer abstain, and a tie goes to the group
    seen first (so the caller's sample order decides ties; `summarise` passes samples
    sorted by their index). No answer at all is wrong.
    """
    answers = [s.answer for s in samples]
    winner = majority_vote(answers)
    answered = sum(1 for a in answers if a is not None and normalize_answer(a))
    if winner is None:
        return MajorityVote(answer=None, votes=0, answered=answered, correct=False)
    key = normalize_answer(winner)
    group = [s for s in samples if s.answer is not None and normalize_answer(s.answer) == key]
    # The checker is not run again: each sample's `correct` is already the checker's verdict
    # on its own answer. `majority_vote` returns the group's first spelling, so the verdict of
    # the first sample written that way is the verdict on exactly the majority answer (samples
    # that normalise the same get the same verdict from the checker's string-equality step).
    first = next(s for s in group if s.answer == winner)
    return MajorityVote(answer=winner, votes=len(group), answered=answered, correct=first.correct)


# --------------------------------------------------------------------------- intervals


class Interval(BaseModel):
    """A point estimate with its interval, all in the same unit (fractions for rates)."""

    model_config = ConfigDict(frozen=True)

    value: float
    low: float
    high: float


def _check_confidence(confidence: float, resamples: int | None = None) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must lie strictly between 0 and 1 (0.95 for a 95% interval)")
    if resamples is not None and resamples < 1:
        raise ValueError(f"resamples={resamples} must be at least 1 (10_000 is the default)")


def _resampled_means(rng: np.random.Generator, values: np.ndarray, resamples: int) -> np.ndarray:
    """Means of `resamples` bootstrap resamples (with replacement) of `values`."""
    n = len(values)
    out = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        out[start : start + rows] = values[idx].mean(axis=1)
    return out


def _stratified_means(
    strata: Sequence[Sequence[float]], confidence: float, resamples: int, seed: int
) -> tuple[float, np.ndarray]:
    """The mean of the strata's means, and its bootstrap distribution (problems resampled within each stratum)."""
    _check_confidence(confidence, resamples)
    if not strata:
        raise ValueError("a bootstrap needs at least one group of values; got none")
    arrays = [np.asarray(list(s), dtype=float) for s in strata]
    for i, a in enumerate(arrays):
        if a.size == 0:
            raise ValueError(f"bootstrap group {i} is empty: every group needs at least one value")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"bootstrap group {i} holds a NaN or infinite value; scores must be finite")
    rng = np.random.default_rng(seed)
    point = float(np.mean([a.mean() for a in arrays]))
    dist = np.mean([_resampled_means(rng, a, resamples) for a in arrays], axis=0)
    return point, dist


def _percentile_interval(point: float, dist: np.ndarray, confidence: float) -> Interval:
    alpha = 1.0 - confidence
    low, high = (float(q) for q in np.quantile(dist, [alpha / 2, 1 - alpha / 2]))
    # A constant sample gives a constant distribution whose float means may differ from the
    # point in the last bits; such rounding noise is not allowed to exclude the point.
    tolerance = 1e-12 * max(1.0, abs(point))
    if point < low <= point + tolerance:
        low = point
    if point - tolerance <= high < point:
        high = point
    return Interval(value=point, low=low, high=high)


def bootstrap_interval(
    values: Iterable[float], *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean of `values` (one value per problem).

    Deterministic given `seed`. All-equal values give a zero-width interval.
    """
    point, dist = _stratified_means([list(values)], confidence, resamples, seed)
    return _percentile_interval(point, dist, confidence)


def stratified_bootstrap(
    groups: Sequence[Sequence[float]], *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Interval of the unweighted mean of the groups' means, resampling values within each group.

    This is the paper's "Avg" column: each benchmark counts once whatever its size, and a
    resample draws each benchmark's problems from that benchmark only.
    """
    point, dist = _stratified_means(groups, confidence, resamples, seed)
    return _percentile_interval(point, dist, confidence)


def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a proportion (samples, not problems, are the unit)."""
    _check_confidence(confidence)
    if n < 1:
        raise ValueError(f"a Wilson interval needs at least one trial (n={n}); report an empty group as n=0 instead")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in 0..n (n={n})")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 (p = 1) the lower (upper) bound is exactly 0 (1); floats leave ~1e-17 there.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(value=p, low=low, high=high)


class PairedDifference(BaseModel):
    """Mean per-problem difference a - b of two modes on the same problems, with its interval."""

    difference: float = Field(description="Mean over paired problems of a - b (for stratified: mean over strata).")
    low: float
    high: float
    share_le_zero: float = Field(
        description="Share of bootstrap resamples whose difference is <= 0: a one-sided p-like figure for a > b."
    )
    excludes_zero: bool = Field(description="The interval lies wholly above or wholly below 0.")
    paired: int = Field(description="Problems scored in both modes (the ones compared).")
    only_a: int = Field(description="Problems scored only in mode a: excluded.")
    only_b: int = Field(description="Problems scored only in mode b: excluded.")
    confidence: float


def stratified_paired_bootstrap(
    a: Mapping[str, Mapping[str, float]],
    b: Mapping[str, Mapping[str, float]],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """Paired bootstrap over strata (benchmarks): scores keyed stratum -> problem id -> score.

    The statistic is the unweighted mean over strata of the mean paired difference;
    resamples draw problems within each stratum. Problems (or whole strata) present on one
    side only are excluded and counted. Strata and problem ids are sorted, so the result
    does not depend on dict order.
    """
    strata: list[list[float]] = []
    only_a = only_b = 0
    for name in sorted(set(a) | set(b)):
        sa, sb = a.get(name, {}), b.get(name, {})
        common = sorted(set(sa) & set(sb))
        only_a += len(set(sa) - set(sb))
        only_b += len(set(sb) - set(sa))
        if common:
            strata.append([sa[p] - sb[p] for p in common])
    if not strata:
        raise ValueError(
            f"paired bootstrap: no problem is scored on both sides ({only_a} only in a, {only_b} only in b); "
            "compare modes run on the same problems"
        )
    point, dist = _stratified_means(strata, confidence, resamples, seed)
    interval = _percentile_interval(point, dist, confidence)
    return PairedDifference(
        difference=point,
        low=interval.low,
        high=interval.high,
        share_le_zero=float(np.mean(dist <= 0)),
        excludes_zero=interval.low > 0 or interval.high < 0,
        paired=sum(len(s) for s in strata),
        only_a=only_a,
        only_b=only_b,
        confidence=confidence,
    )


def paired_bootstrap(
    a: Mapping[str, float],
    b: Mapping[str, float],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """Paired bootstrap of the mean difference a - b over problems scored in both (keyed by problem id)."""
    return stratified_paired_bootstrap({"": a}, {"": b}, confidence=confidence, resamples=resamples, seed=seed)


# --------------------------------------------------------------------------- summary models


class ProblemResult(BaseModel):
    problem_id: str
    problem_index: int
    samples: int
    correct: int
    accuracy: float = Field(description="correct / samples: this problem's Avg@k.")
    majority_answer: str | None
    majority_correct: bool
    pass_at_k: float = Field(description="Unbiased pass@min(k, samples).")


class ToolStats(BaseModel):
    executed_calls: int = Field(description="Sandbox runs (outcome != not_executed), retries included.")
    calls_per_problem: float = Field(description="Executed calls summed over a problem's samples, mean over problems.")
    calls_per_sample: float
    call_success_rate: float | None = Field(description="ok / executed calls; None without calls.")
    committed_calls: int = Field(description="Executed calls kept in the final trajectory.")
    committed_success_rate: float | None
    backtracks_per_sample: float
    discarded_tokens_per_sample: float
    sandbox_s_per_sample: float = Field(description="Sum of executed calls' duration_s, mean over samples.")
    not_executed: int = Field(description="Code blocks refused (budget spent, answer phase): not calls.")
    outcomes: dict[str, int] = Field(description="Executed calls by outcome (ok, error, timeout, ...).")


class KeyInsightGroup(BaseModel):
    samples: int
    correct: int
    accuracy: Interval | None = Field(description="Wilson interval; None for an empty group.")


class KeyInsight(BaseModel):
    """Accuracy of trajectories split by whether their tool calls succeeded (samples with an error excluded)."""

    all_succeeded: KeyInsightGroup = Field(description="At least one call, and every one succeeded.")
    some_failed: KeyInsightGroup = Field(description="At least one call failed.")
    no_calls: KeyInsightGroup


class TokenStats(BaseModel):
    prompt_per_sample: float
    completion_per_sample: float
    generated_per_sample: float
    observation_per_sample: float


class BenchmarkModeResult(BaseModel):
    benchmark: str
    mode: str
    problems: int
    samples: int
    k: int
    incomplete_problems: int = Field(description="Problems with fewer than k samples (a partial run).")
    avg_at_k: Interval = Field(description="Mean over problems of the per-problem accuracy.")
    maj_at_k: Interval
    pass_at_k: Interval = Field(description="Unbiased pass@k; at k = the samples a problem has when fewer.")
    pass_at_1: Interval = Field(description="Unbiased pass@1 (equal to Avg@k by definition).")
    tools: ToolStats
    key_insight: KeyInsight = Field(
        description="Split on every executed call, attempts discarded by backtracks included."
    )
    key_insight_committed: KeyInsight = Field(description="Split on the committed calls only.")
    tokens: TokenStats
    wall_s_per_sample: float
    finish_reasons: dict[str, int]
    errors: int
    error_examples: dict[str, int] = Field(description="The most frequent error messages (first 200 characters).")
    per_problem: list[ProblemResult]


class ModeOverall(BaseModel):
    """The paper's "Avg" column: unweighted mean over benchmarks; intervals resample problems within each."""

    mode: str
    benchmarks: list[str] = Field(description="The benchmarks this mode has results on (the mean is over these).")
    avg_at_k: Interval
    maj_at_k: Interval
    pass_at_k: Interval
    key_insight: KeyInsight = Field(description="Samples pooled over benchmarks.")
    key_insight_committed: KeyInsight


class Comparison(BaseModel):
    """Paired differences of per-problem Avg@k: `mode` minus `baseline`."""

    mode: str
    baseline: str
    per_benchmark: dict[str, PairedDifference]
    overall: PairedDifference | None = Field(description="Unweighted mean over benchmarks; None if nothing paired.")


class Summary(BaseModel):
    k: int
    modes: list[str] = Field(description="In the order given; the first is the comparisons' baseline.")
    benchmarks: list[str]
    records: int
    confidence: float
    resamples: int
    seed: int
    results: list[BenchmarkModeResult]
    overall: list[ModeOverall]
    comparisons: list[Comparison]
    missing: list[str] = Field(description='"benchmark/mode" pairs asked for with no records.')

    def result(self, benchmark: str, mode: str) -> BenchmarkModeResult | None:
        return next((r for r in self.results if r.benchmark == benchmark and r.mode == mode), None)

    def mode_overall(self, mode: str) -> ModeOverall | None:
        return next((o for o in self.overall if o.mode == mode), None)


# --------------------------------------------------------------------------- summarise


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _group(samples: Sequence[SampleRecord], confidence: float) -> KeyInsightGroup:
    correct = sum(s.correct for s in samples)
    interval = wilson_interval(correct, len(samples), confidence=confidence) if samples else None
    return KeyInsightGroup(samples=len(samples), correct=correct, accuracy=interval)


def key_insight(
    samples: Iterable[SampleRecord], *, committed_only: bool = False, confidence: float = 0.95
) -> KeyInsight:
    """Split samples by their executed calls: all succeeded / some failed / none.

    A call failed when `ok` is False (error, timeout, sandbox error...). With
    `committed_only`, calls discarded by self-correction are ignored. Samples whose
    generation failed (`error` set) are left out: they say nothing about tool use.
    """
    groups: dict[str, list[SampleRecord]] = {"all": [], "failed": [], "none": []}
    for s in samples:
        if s.error is not None:
            continue
        calls = [c for c in s.executed_calls if c.committed or not committed_only]
        groups["none" if not calls else "all" if all(c.ok for c in calls) else "failed"].append(s)
    return KeyInsight(
        all_succeeded=_group(groups["all"], confidence),
        some_failed=_group(groups["failed"], confidence),
        no_calls=_group(groups["none"], confidence),
    )


def _tool_stats(by_problem: Mapping[str, Sequence[SampleRecord]]) -> ToolStats:
    samples = [s for group in by_problem.values() for s in group]
    executed = [c for s in samples for c in s.executed_calls]
    committed = [c for c in executed if c.committed]
    return ToolStats(
        executed_calls=len(executed),
        calls_per_problem=_mean([sum(len(s.executed_calls) for s in g) for g in by_problem.values()]),
        calls_per_sample=len(executed) / len(samples),
        call_success_rate=sum(c.ok for c in executed) / len(executed) if executed else None,
        committed_calls=len(committed),
        committed_success_rate=sum(c.ok for c in committed) / len(committed) if committed else None,
        backtracks_per_sample=_mean([s.tools.backtracks for s in samples]),
        discarded_tokens_per_sample=_mean([s.usage.discarded_tokens for s in samples]),
        sandbox_s_per_sample=_mean([sum(c.duration_s for c in s.executed_calls) for s in samples]),
        not_executed=sum(1 for s in samples for c in s.tool_calls if c.outcome == "not_executed"),
        outcomes=dict(Counter(c.outcome for c in executed).most_common()),
    )


def _benchmark_mode(
    benchmark: str,
    mode: str,
    by_problem: Mapping[str, list[SampleRecord]],
    k: int,
    confidence: float,
    resamples: int,
    seed: int,
) -> BenchmarkModeResult:
    problems: list[ProblemResult] = []
    for pid, group in by_problem.items():
        n, c = len(group), sum(s.correct for s in group)
        vote = majority_at_k(group)
        problems.append(
            ProblemResult(
                problem_id=pid,
                problem_index=group[0].problem_index,
                samples=n,
                correct=c,
                accuracy=pass_at_k(n, c, 1),
                majority_answer=vote.answer,
                majority_correct=vote.correct,
                pass_at_k=pass_at_k(n, c, min(k, n)),
            )
        )
    problems.sort(key=lambda p: (p.problem_index, p.problem_id))
    samples = [s for group in by_problem.values() for s in group]
    boot = {"confidence": confidence, "resamples": resamples, "seed": seed}
    avg = bootstrap_interval([p.accuracy for p in problems], **boot)
    errors = Counter((s.error or "")[:200] for s in samples if s.error is not None)
    return BenchmarkModeResult(
        benchmark=benchmark,
        mode=mode,
        problems=len(problems),
        samples=len(samples),
        k=k,
        incomplete_problems=sum(1 for p in problems if p.samples < k),
        avg_at_k=avg,
        maj_at_k=bootstrap_interval([float(p.majority_correct) for p in problems], **boot),
        pass_at_k=bootstrap_interval([p.pass_at_k for p in problems], **boot),
        pass_at_1=avg,  # pass_at_k(n, c, 1) == c / n: the same values, hence the same interval
        tools=_tool_stats(by_problem),
        key_insight=key_insight(samples, confidence=confidence),
        key_insight_committed=key_insight(samples, committed_only=True, confidence=confidence),
        tokens=TokenStats(
            prompt_per_sample=_mean([s.usage.prompt_tokens for s in samples]),
            completion_per_sample=_mean([s.usage.completion_tokens for s in samples]),
            generated_per_sample=_mean([s.usage.generated_tokens for s in samples]),
            observation_per_sample=_mean([s.usage.observation_tokens for s in samples]),
        ),
        wall_s_per_sample=_mean([s.wall_s for s in samples]),
        finish_reasons=dict(Counter(s.finish_reason for s in samples).most_common()),
        errors=sum(errors.values()),
        error_examples=dict(errors.most_common(5)),
        per_problem=problems,
    )


def _ordered(given: list[str] | None, seen: list[str], what: str) -> list[str]:
    if given is None:
        return seen
    if len(set(given)) != len(given):
        raise ValueError(f"{what} {given} repeat a name; list each once")
    if not given:
        raise ValueError(f"an empty list of {what} selects nothing; pass None for all of them")
    return list(given)


def summarise(
    records: Iterable[SampleRecord],
    *,
    modes: list[str] | None = None,
    benchmarks: list[str] | None = None,
    k: int | None = None,
    seed: int = 0,
    confidence: float = 0.95,
    resamples: int = 10_000,
) -> Summary:
    """Everything the reports show, computed from a run's records.

    `modes` / `benchmarks` select and order (default: all, in order of first appearance);
    the first mode is the baseline of the comparisons. `k` keeps samples 0..k-1 only
    (default: the most samples any problem has); a problem with fewer than k samples (a
    partial run) is scored on what it has and counted in `incomplete_problems`. A
    (benchmark, mode) asked for with no records is listed in `missing`.
    """
    _check_confidence(confidence, resamples)
    if k is not None and k < 1:
        raise ValueError(f"k={k} must be at least 1 (the samples per problem to score)")
    records = list(records)
    seen_keys: set[tuple[str, str, str, int]] = set()
    for r in records:
        if r.key in seen_keys:
            raise ValueError(
                f"two records for benchmark={r.benchmark!r} problem={r.problem_id!r} mode={r.mode!r} "
                f"sample={r.sample}: the run directory mixes runs; summarise one run's records.jsonl"
            )
        seen_keys.add(r.key)
    mode_list = _ordered(modes, list(dict.fromkeys(r.mode for r in records)), "modes")
    bench_list = _ordered(benchmarks, list(dict.fromkeys(r.benchmark for r in records)), "benchmarks")
    chosen = [r for r in records if r.mode in mode_list and r.benchmark in bench_list and (k is None or r.sample < k)]

    grouped: dict[tuple[str, str], dict[str, list[SampleRecord]]] = {}
    for r in sorted(chosen, key=lambda r: r.sample):
        grouped.setdefault((r.benchmark, r.mode), {}).setdefault(r.problem_id, []).append(r)
    if k is None:
        k = max((len(g) for problems in grouped.values() for g in problems.values()), default=1)

    results: list[BenchmarkModeResult] = []
    missing: list[str] = []
    for bench in bench_list:
        for mode in mode_list:
            if (bench, mode) in grouped:
                results.append(_benchmark_mode(bench, mode, grouped[(bench, mode)], k, confidence, resamples, seed))
            else:
                missing.append(f"{bench}/{mode}")

    boot = {"confidence": confidence, "resamples": resamples, "seed": seed}
    overall: list[ModeOverall] = []
    for mode in mode_list:
        mine = [r for r in results if r.mode == mode]
        if not mine:
            continue
        mode_samples = [r for r in chosen if r.mode == mode]
        overall.append(
            ModeOverall(
                mode=mode,
                benchmarks=[r.benchmark for r in mine],
                avg_at_k=stratified_bootstrap([[p.accuracy for p in r.per_problem] for r in mine], **boot),
                maj_at_k=stratified_bootstrap(
                    [[float(p.majority_correct) for p in r.per_problem] for r in mine], **boot
                ),
                pass_at_k=stratified_bootstrap([[p.pass_at_k for p in r.per_problem] for r in mine], **boot),
                key_insight=key_insight(mode_samples, confidence=confidence),
                key_insight_committed=key_insight(mode_samples, committed_only=True, confidence=confidence),
            )
        )

    def scores(mode: str) -> dict[str, dict[str, float]]:
        return {r.benchmark: {p.problem_id: p.accuracy for p in r.per_problem} for r in results if r.mode == mode}

    comparisons: list[Comparison] = []
    if mode_list:
        baseline = mode_list[0]
        base = scores(baseline)
        for mode in mode_list[1:]:
            mine = scores(mode)
            per_benchmark = {}
            for bench in bench_list:
                a, b = mine.get(bench, {}), base.get(bench, {})
                if set(a) & set(b):
                    per_benchmark[bench] = paired_bootstrap(a, b, **boot)
            paired_any = any(set(mine.get(x, {})) & set(base.get(x, {})) for x in bench_list)
            comparisons.append(
                Comparison(
                    mode=mode,
                    baseline=baseline,
                    per_benchmark=per_benchmark,
                    overall=stratified_paired_bootstrap(mine, base, **boot) if paired_any else None,
                )
            )

    return Summary(
        k=k,
        modes=mode_list,
        benchmarks=bench_list,
        records=len(chosen),
        confidence=confidence,
        resamples=resamples,
        seed=seed,
        results=results,
        overall=overall,
        comparisons=comparisons,
        missing=missing,
    )
