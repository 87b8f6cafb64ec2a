"""Answer extraction, normalisation, equivalence checking and majority voting.

The equivalence table runs against the real math-verify in real worker processes.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from thor_engine.answer import (
    AnswerChecker,
    _verify_in_worker,
    answers_match,
    answers_match_async,
    extract_boxed,
    majority_vote,
    normalize_answer,
)

# (pred, gold, expected). Each expected value is the mathematical truth.
EQUAL = [
    # Known failures of the reference verifier (bare strings parse to nothing or a fragment).
    ("(1, 2)", "(1,2)"),
    (r"\sqrt 2", r"\sqrt{2}"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"\pi/2", r"\frac{\pi}{2}"),
    (r"\{1,2\}", r"\{2,1\}"),
    (r"\left\{ 3, 1, 2 \right\}", r"\{1,2,3\}"),
    (r"\text{(B)}", "B"),
    (r"\textbf{(C)}", "C"),
    ("(D)", "D"),
    # Fractions and decimals.
    ("1/2", "0.5"),
    (r"\frac{1}{2}", "0.5"),
    (r"\frac12", r"\frac{1}{2}"),
    (r"\dfrac{3}{4}", "0.75"),
    (r"\tfrac{1}{3}", r"\frac{1}{3}"),
    ("1/3", "0.3333333"),
    (".5", "0.5"),
    ("2.50", "2.5"),
    ("3.0", "3"),
    (r"-\frac{1}{2}", r"\frac{-1}{2}"),
    ("5.", "5"),
    # Thousands separators.
    ("1,000", "1000"),
    ("1,234,567", "1234567"),
    (r"1{,}000", "1000"),
    (r"1\,000", "1000"),
    (r"\$1,000", "1000"),
    # Percentages.
    (r"50\%", "50"),
    ("50%", "50"),
    ("0.5", r"50\%"),
    # Intervals.
    ("[1, 2)", "[1,2)"),
    (r"(-\infty, 3]", r"(-\infty,3]"),
    (r"\left[ 0, 1 \right]", "[0,1]"),
    (r"x \in [1, 2)", "[1,2)"),
    # Matrices and vectors.
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"),
    (r"\begin{bmatrix}1&2\\3&4\end{bmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}"),
    (r"\begin{pmatrix}\frac{1}{2}\\0\end{pmatrix}", r"\begin{pmatrix}0.5\\0\end{pmatrix}"),
    # Units, degrees, money.
    (r"5\text{ cm}", "5"),
    (r"12 \text{ inches}", "12"),
    (r"6\text{ cm}^2", "6"),
    ("7 meters", "7"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", "30"),
    ("45 degrees", "45"),
    (r"\$5.00", "5"),
    (r"10 \mbox{ dollars}", "10"),
    # Assignments and equations.
    ("x=3", "3"),
    (r"k = \frac{1}{2}", "0.5"),
    ("y=2x+1", "y=1+2x"),
    ("y = x", "x = y"),
    ("x^2-1=0", "x^2=1"),
    ("2x+1", "y=2x+1"),
    # Symbolic equality.
    (r"x^2+2x+1", r"(x+1)^2"),
    (r"3\sqrt{2}", r"\sqrt{18}"),
    (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"),
    ("10^{3}", "1000"),
    (r"2\pi", r"2 \pi"),
    ("a+b", "b+a"),
    ("1+i", "i+1"),
    (r"\pi r^2", r"r^2\pi"),
    # Delimiters, boxes, spacing, text.
    (r"$\frac{1}{2}$", r"\frac{1}{2}"),
    (r"\boxed{7}", "7"),
    (r"\displaystyle \frac{1}{2}", "0.5"),
    (r"\text{Monday}", "Monday"),
    (r"\varnothing", r"\emptyset"),
    (r"\infty", r"\infty"),
]

UNEQUAL = [
    ("2", "3"),
    ("1/2", "2"),
    (r"\sqrt{2}", "2"),
    ("(3,1)", "(1,3)"),  # an ordered pair is not the interval (1,3)
    ("(1,2)", "(2,1)"),
    ("x+1", "x-1"),
    ("(0,1)", "[0,1]"),
    ("[1,2)", "[1,2]"),
    (r"\frac{1}{3}", "0.333"),
    ("3.14", r"\pi"),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\4&3\end{pmatrix}"),
    ("A", "B"),
    (r"\text{(B)}", "C"),
    ("1000", "100"),
    ("1,000", "1"),
    (r"\{1,2\}", r"\{1,2,3\}"),
    ("x^2", "2x"),
    ("-5", "5"),
    (r"\frac{\pi}{2}", r"\pi"),
    ("2,3", "3"),
    ("y=2x+1", "y=2x-1"),
    ("", "5"),
    ("5", ""),
]

TABLE = [(p, g, True) for p, g in EQUAL] + [(p, g, False) for p, g in UNEQUAL]


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(max_workers=2) as c:
        yield c


@pytest.mark.parametrize(("pred", "gold", "expected"), TABLE)
def test_answers_match_table(checker: AnswerChecker, pred: str, gold: str, expected: bool) -> None:
    assert checker.answers_match(pred, gold) is expected


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("(1, 2)", "(1,2)", True),
        (r"\sqrt 2", r"\sqrt{2}", True),
        (r"\{2, 1\}", r"\{1,2\}", True),
        ("[1, 2)", "[1,2)", True),
        (r"\text{(B)}", "B", True),
        ("(0,1)", "[0,1]", False),
        ("(3, 1)", "(1,3)", False),
    ],
)
def test_math_verify_path_without_normalisation(pred: str, gold: str, expected: bool) -> None:
    """The reference verifier's failures, raw, straight through the worker function.

    Bare, math-verify reads ``(1, 2)`` as ``2`` and ``(1,2)`` as nothing; wrapped in
    ``$...$`` both are the same pair. (Runs in the main thread, where its alarms work.)
    """
    assert _verify_in_worker([(gold, pred)], 5) is expected


def test_table_size() -> None:
    assert len(TABLE) >= 60 and len(UNEQUAL) >= 15


async def test_async_variant(checker: AnswerChecker) -> None:
    assert await checker.answers_match_async("1/2", "0.5") is True
    assert await checker.answers_match_async(r"\sqrt{2}", "2") is False
    assert await checker.answers_match_async("x = 3", "3") is True  # fast path


def test_concurrent_threads_share_the_pool(checker: AnswerChecker) -> None:
    cases = TABLE * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda case: checker.answers_match(case[0], case[1]), cases))
    assert results == [expected for _, _, expected in cases]


async def test_concurrent_async_calls(checker: AnswerChecker) -> None:
    results = await asyncio.gather(*(checker.answers_match_async(p, g) for p, g, _ in TABLE))
    assert list(results) == [expected for _, _, expected in TABLE]


def test_module_level_default_checker() -> None:
    assert answers_match(r"\frac{1}{2}", "0.5") is True
    assert answers_match("2", "3") is False


async def test_module_level_async() -> None:
    assert await answers_match_async(r"\frac{\pi}{2}", r"\pi/2") is True


# --------------------------------------------------------------------- timeouts


# sympy evaluates this tower of powers for far longer than any deadline.
TOWER = "9^{9^{9^{9^{9}}}}"


def test_timeout_kills_worker_and_checker_recovers() -> None:
    with AnswerChecker(max_workers=1) as checker:
        assert checker.answers_match("1/2", "0.5") is True  # worker spawned and warm
        assert checker.answers_match(TOWER, "1", timeout=0.5) is False
        assert checker.worker_kills == 1  # the deadline fired and the worker was killed: nothing waits on sympy
        # A fresh worker replaces the killed one.
        assert checker.answers_match("1/2", "0.5") is True
        assert checker.answers_match(r"\sqrt{2}", "2") is False
        assert checker.worker_kills == 1


def test_tiny_timeout_returns_false_then_recovers() -> None:
    with AnswerChecker(max_workers=1) as checker:
        assert checker.answers_match("0.75", r"\frac{3}{4}") is True
        assert checker.answers_match("0.75", r"\frac{3}{4}", timeout=1e-6) is False
        assert checker.worker_kills == 1
        assert checker.answers_match("0.75", r"\frac{3}{4}") is True


async def test_async_timeout_does_not_block_loop() -> None:
    with AnswerChecker(max_workers=1) as checker:
        assert await checker.answers_match_async(TOWER, "2", timeout=0.5) is False
        assert await checker.answers_match_async("1/4", "0.25") is True


def test_closed_checker_refuses_work() -> None:
    checker = AnswerChecker(max_workers=1)
    checker.close()
    checker.close()  # idempotent
    assert checker.answers_match("x=1", "1") is True  # the fast path needs no worker
    with pytest.raises(RuntimeError):
        checker.answers_match("1/2", "0.5")


# ---------------------------------------------------------------- extract_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"The answer is \boxed{5}.", "5"),
        (r"so $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{a{b{c}}d}", "a{b{c}}d"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped set braces do not count
        (r"\boxed{\left\{ 1 \right\}}", r"\left\{ 1 \right\}"),
        (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
        (r"\boxed 5$", "5"),
        (r"answer: \boxed 42", "42"),
        (r"\fbox{7}", "7"),
        (r"\boxed{1} and \fbox{3}", "3"),
        (r"\boxed {8}", "8"),
        (r"\boxed{}", ""),
        ("no box here", None),
        ("", None),
        (r"\boxed{\frac{1}{2}", None),  # unbalanced (truncated) last box
        (r"\boxed{1} then \boxed{2", None),
        (r"\boxed{1} \boxed", None),
        (r"\boxedx{1}", None),  # another control word
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


# ------------------------------------------------------------------ normalize_answer


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  $\\frac{1}{2}$ ", r"\frac{1}{2}"),
        (r"\dfrac12", r"\frac{1}{2}"),
        (r"\sqrt 2", r"\sqrt{2}"),
        (r"\sqrt[3]{2}", r"\sqrt[3]{2}"),
        (r"\pi r^2", r"\pi r^2"),  # the space ends a control word: kept
        ("(1, 2)", "(1,2)"),
        ("1,000", "1000"),
        ("1,2", "1,2"),  # a list, not a thousands separator
        ("12,34", "12,34"),
        (r"\{3, 1, 2\}", r"\{1,2,3\}"),
        (r"\{1\}\cup\{2\}", r"\{1\}\cup\{2\}"),  # not one set: left alone
        (r"50\%", "50"),
        (r"30^{\circ}", "30"),
        (r"5\text{ cm}", "5"),
        ("5 cm", "5"),
        ("2 m", "2m"),  # a single letter outside \text may be a variable
        (r"\text{(B)}", "B"),
        ("x=3", "3"),
        ("y=2x+1", "y=2x+1"),  # an equation, not a value
        (r"x \in (0, 1]", "(0,1]"),
        ("2.500", "2.5"),
        ("3.0", "3"),
        ("-.25", "-0.25"),
        ("7.", "7"),
        ("1/2", r"\frac{1}{2}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"x \le 2y", r"x\leq2y"),
        (r"x \le 3", r"(-\infty,3]"),  # a one-variable inequality is its interval
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}"),
        (r"\boxed{4}", "4"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


# -------------------------------------------------------------------- majority_vote


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (["1", "2", "2"], "2"),
        ([r"\frac{1}{2}", "1/2", "0.5", "0.5"], r"\frac{1}{2}"),  # 1/2 and \frac12 group
        (["3", "4"], "3"),  # tie: first seen wins
        (["4", "3", "3", "4"], "4"),
        ([None, None], None),
        ([], None),
        ([None, "", "7"], "7"),  # None and empty answers abstain
        ([r"\{1,2\}", r"\{2,1\}", "3"], r"\{1,2\}"),
        (["x=5", "5", "6", "6"], "x=5"),  # the group's first spelling is returned
        ([r"5\text{ cm}", "6", "5"], r"5\text{ cm}"),
    ],
)
def test_majority_vote(answers: list[str | None], expected: str | None) -> None:
    assert majority_vote(answers) == expected
