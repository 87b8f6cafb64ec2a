"""Benchmark loading (trainer/evaluate/benchmarks.py) and scoring on each benchmark's real answer forms.

Every named loader runs on its real file in ``shared/data/benchmarks``; the answer table takes its
gold answers from those files and checks them against spellings a model writes, through the real
math-verify workers of ``thor_engine.answer``. Custom files and ``datasets`` directories are
written to a temporary folder and read back with the real ``datasets`` library.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from thor_engine.answer import _verify_in_worker, answers_match, normalize_answer
from trainer.evaluate.benchmarks import (
    BENCHMARKS,
    DATA_DIR_ENV,
    BenchmarkError,
    Problem,
    default_data_dir,
    load_benchmark,
    select,
)

COUNTS = {
    "math500": 500,
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "minerva_math": 272,
    "olympiadbench": 675,
    "gsm8k": 500,
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, dict[str, Problem]]:
    return {name: {p.id: p for p in load_benchmark(name)} for name in BENCHMARKS}


# --------------------------------------------------------------------- named loaders on the real files


def test_the_seven_sets_are_mapped() -> None:
    assert set(BENCHMARKS) == set(COUNTS)
    for spec in BENCHMARKS.values():
        assert (default_data_dir() / spec.file).is_file(), spec.file


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_every_row_yields_a_problem_and_a_gold_answer(name: str) -> None:
    problems = load_benchmark(name)
    with (default_data_dir() / BENCHMARKS[name].file).open() as f:
        lines = sum(1 for line in f if line.strip())
    assert len(problems) == COUNTS[name] == lines
    assert [p.index for p in problems] == list(range(len(problems)))
    assert len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert p.benchmark == name
        assert p.problem.strip(), p.id
        assert p.answer.strip() and p.answer == p.answer.strip(), p.id


def test_ids_are_the_sets_own_where_they_have_one(loaded: dict[str, dict[str, Problem]]) -> None:
    assert next(iter(loaded["aime24"])) == "60"  # the file's "id"
    assert next(iter(loaded["aime25"])) == "0"
    assert "1606" in loaded["olympiadbench"]
    assert "271" in loaded["minerva_math"]  # "idx"
    assert list(loaded["math500"])[:2] == ["math500-0", "math500-1"]  # no id field in this copy
    assert list(loaded["gsm8k"])[-1] == "gsm8k-499"


def test_gold_answer_forms_as_read(loaded: dict[str, dict[str, Problem]]) -> None:
    # AIME24 stores "025", AMC23 27.0, AIME25 70: all become plain integers.
    assert loaded["aime24"]["67"].answer == "25"
    assert loaded["amc23"]["0"].answer == "27"
    assert loaded["aime25"]["0"].answer == "70"
    # GSM8K: after "#### ", thousands separators dropped.
    assert loaded["gsm8k"]["gsm8k-0"].answer == "70000"
    assert loaded["gsm8k"]["gsm8k-119"].answer == "1450000"
    assert all("," not in p.answer and "#" not in p.answer for p in loaded["gsm8k"].values())
    # Minerva: the content of the box in the solution.
    assert loaded["minerva_math"]["0"].answer == "1.6"
    assert loaded["minerva_math"]["12"].answer.startswith(r"\frac{2 \pi c^{2} R^{2}}")
    # OlympiadBench: the one-element final_answer list, several answers inside one string.
    assert loaded["olympiadbench"]["1664"].answer == "$69$,$84$"
    # Meta where the set has it.
    assert loaded["math500"]["math500-0"].meta == {"subject": "Algebra", "level": "1"}
    assert loaded["olympiadbench"]["2419"].meta["unit"] == "$cm^2$"
    assert loaded["minerva_math"]["0"].meta["type"].startswith("Introduction to Astronomy")


def test_minerva_every_solution_has_exactly_one_box() -> None:
    """So the last box is the answer on every row (checked here, not assumed)."""
    with (default_data_dir() / BENCHMARKS["minerva_math"].file).open() as f:
        solutions = [json.loads(line)["solution"] for line in f]
    assert len(solutions) == 272
    assert all(s.count("\\boxed") == 1 for s in solutions)


def test_olympiadbench_final_answer_lists(loaded: dict[str, dict[str, Problem]]) -> None:
    """In this copy every list has one element; multi-answers (94 rows) are inside that string."""
    with (default_data_dir() / BENCHMARKS["olympiadbench"].file).open() as f:
        rows = [json.loads(line) for line in f]
    assert {len(r["final_answer"]) for r in rows} == {1}
    assert sum(r["is_multiple_answer"] for r in rows) == 94
    assert all(loaded["olympiadbench"][str(r["id"])].answer == r["final_answer"][0].strip() for r in rows)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_every_gold_matches_itself_and_parses_in_math_verify(name: str) -> None:
    """Every gold is accepted against itself, and math-verify parses it (so a gold is never
    reachable by string equality alone: an equivalent spelling can match it)."""
    problems = load_benchmark(name)
    assert all(answers_match(p.answer, p.answer) for p in problems)
    unparsed = [p.id for p in problems if _verify_in_worker([(normalize_answer(p.answer),) * 2], 5) is not True]
    assert unparsed == []


# --------------------------------------------------------------------- gold answers against model spellings

# (benchmark, id, gold exactly as loaded from the real file, equivalent spellings, wrong spellings)
ANSWER_TABLE: list[tuple[str, str, str, list[str], list[str]]] = [
    # MATH500: fractions, roots, intervals, tuples, sets, degrees, money, units, text, matrices, bases.
    ("math500", "math500-2", r"\frac{11}{2}", ["11/2", "5.5", r"\dfrac{11}{2}", r"x = \frac{11}{2}", r"\frac{11}2"],
     ["11/3", "5.4", r"\frac{2}{11}"]),
    ("math500", "math500-1", r"x \in [-2,7]", ["[-2,7]", "[-2, 7]", r"\left[-2,7\right]", r"-2 \le x \le 7"],
     ["(-2,7)", "[-2,7)", "[-7,2]"]),
    ("math500", "math500-5", r"(-\sqrt{3}, \sqrt{3})", [r"(-\sqrt3,\sqrt3)", r"\left(-\sqrt{3}, \sqrt{3}\right)"],
     [r"[-\sqrt{3}, \sqrt{3}]", r"(-\sqrt{2}, \sqrt{2})"]),
    ("math500", "math500-8", "6+9i", ["9i+6", "6 + 9i"], ["6-9i", "9+6i"]),
    ("math500", "math500-16", r"\frac{\sqrt{3}}{3}", [r"\frac{1}{\sqrt{3}}", r"\sqrt{3}/3", r"\frac{\sqrt3}3"],
     [r"\sqrt{3}", r"\frac{\sqrt{3}}{2}"]),
    ("math500", "math500-23", r"\text{Evelyn}", ["Evelyn", r"\textbf{Evelyn}", r"\text{ Evelyn }"],
     [r"\text{Angela}", "Briana"]),
    ("math500", "math500-44", r"(-\infty, 2) \cup (3, \infty)",
     [r"(-\infty,2)\cup(3,\infty)", r"(3,\infty)\cup(-\infty,2)", r"\left(-\infty, 2\right) \cup \left(3, \infty\right)"],
     [r"(-\infty, 2] \cup [3, \infty)", "(2,3)"]),
    ("math500", "math500-53", "x=5", ["5", "x = 5", "5.0"], ["x=6", "-5"]),
    ("math500", "math500-60", r"\frac9{19}", [r"\frac{9}{19}", "9/19"], [r"\frac{19}{9}", "0.47"]),
    ("math500", "math500-68", r"137 \frac{1}{2}", [r"137\frac{1}{2}", "137.5", r"\frac{275}{2}"], ["68.5", "137"]),
    ("math500", "math500-196", r"1\frac{4}{5}", [r"\frac{9}{5}", "1.8", r"1 \frac{4}{5}"], [r"\frac{4}{5}", "1.45"]),
    ("math500", "math500-70", r"\left(\frac{3}{5},\frac{8}{3}\right]",
     [r"(\frac{3}{5}, \frac{8}{3}]", "(3/5, 8/3]", r"\left(\dfrac35,\dfrac83\right]"],
     [r"[\frac{3}{5}, \frac{8}{3}]", r"(\frac{3}{5}, \frac{8}{3})"]),
    ("math500", "math500-78", r"\$32,\!348", ["32348", r"\$32,348", "32,348", r"32{,}348", "32,348 dollars"],
     ["32,347", "32.348"]),
    ("math500", "math500-85", r"\$18.90", ["18.90", "18.9", r"\$18.9", r"\$ 18.90"], ["18.09", "19"]),
    ("math500", "math500-96", r"\frac 34", ["3/4", "0.75", r"\frac{3}{4}", r"\tfrac34"], [r"\frac{4}{3}", "0.7"]),
    ("math500", "math500-149", r"10,\!080", ["10080", "10,080", r"10{,}080", r"10\,080"], ["10,800", "1008"]),
    ("math500", "math500-168", r"145^\circ", ["145", r"145^{\circ}", "145°", "145 degrees", r"145\text{ degrees}"],
     [r"35^\circ", "154"]),
    ("math500", "math500-180", r"864 \mbox{ inches}^2", ["864", r"864 \text{ inches}^2", "864 square inches"],
     ["846", "864^2"]),
    ("math500", "math500-208", "-2,1", ["1,-2", "-2, 1"], ["-2", "2,-1"]),
    ("math500", "math500-262", r"\{1\pm\sqrt{5},-2\}",
     [r"-2, 1+\sqrt{5}, 1-\sqrt{5}", r"\{-2, 1-\sqrt{5}, 1+\sqrt{5}\}"], [r"1+\sqrt{5}, 1-\sqrt{5}"]),
    ("math500", "math500-274", "3, 5, 7", ["3,5,7", "7, 5, 3", r"\{3,5,7\}"], ["3,5", "3,5,7,9"]),
    ("math500", "math500-284", r"1 \pm \sqrt{19}", [r"1+\sqrt{19}, 1-\sqrt{19}"], [r"1+\sqrt{19}", r"-1 \pm \sqrt{19}"]),
    ("math500", "math500-287", r"\text{(B)}", ["B", "(B)", r"\textbf{(B)}"], ["C", r"\text{(C)}"]),
    ("math500", "math500-311", "204_5", ["204_{5}"], ["204_6", "204_{6}", "205_5"]),
    ("math500", "math500-326", ".35625", ["0.35625", r"\frac{57}{160}"], ["0.3562", "35625"]),
    ("math500", "math500-327", r"11,\! 111,\! 111,\! 100", ["11111111100", "11,111,111,100"], ["1111111100"]),
    ("math500", "math500-362", r"\frac{270}7\text{ degrees}", [r"\frac{270}{7}", "270/7", r"\frac{270}{7}^\circ"],
     [r"\frac{270}{17}", "38"]),
    ("math500", "math500-363", r"5.4 \text{ cents}", ["5.4", "5.4 cents", "5.40"], ["5.5", "54"]),
    ("math500", "math500-366", r"15\mbox{ cm}^2", ["15", r"15 \text{ cm}^2", r"15\text{cm}^{2}", r"15 \mathrm{~cm}^2"],
     ["15^2", "16"]),
    ("math500", "math500-370", r"\$36", ["36", r"\$36.00", "36 dollars"], [r"\$63", "37"]),
    ("math500", "math500-380", r"11\sqrt2", [r"11\sqrt{2}", r"\sqrt{242}"], [r"11\sqrt{3}", r"\sqrt{22}"]),
    ("math500", "math500-385", r"12\pi", [r"12 \pi", r"\pi \cdot 12", r"12\pi\text{ cm}^2"], ["12", r"6\pi"]),
    ("math500", "math500-396", r"\dfrac{17}{50}", ["0.34", "17/50"], ["0.35", r"\frac{50}{17}"]),
    ("math500", "math500-446", r"-\frac{\pi}{6}", [r"-\pi/6", r"-\frac{1}{6}\pi"], [r"\frac{\pi}{6}", r"-\frac{\pi}{3}"]),
    ("math500", "math500-458", r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}",
     [r"\begin{pmatrix} -\frac{1}{3} \\ \frac{2}{3} \\ \frac{5}{3} \end{pmatrix}",
      r"\begin{bmatrix} -1/3 \\ 2/3 \\ 5/3 \end{bmatrix}"],
     [r"\begin{pmatrix} 1/3 \\ 2/3 \\ 5/3 \end{pmatrix}"]),
    ("math500", "math500-463", r"\cot x", [r"\cot(x)", r"\frac{\cos x}{\sin x}"], [r"\tan x", r"\cot 2x"]),
    ("math500", "math500-466", "y = 2x + 3", ["y=2x+3", "y = 3 + 2x"], ["y = 2x - 3", "y = 3x + 2"]),
    ("math500", "math500-475", r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", [r"[\pi^2/8, 5\pi^2/4]"],
     [r"(\frac{\pi^2}{8}, \frac{5 \pi^2}{4})"]),
    ("math500", "math500-486", r"3 \pm 2 \sqrt{2}", [r"3+2\sqrt{2}, 3-2\sqrt{2}"], [r"3+2\sqrt{2}"]),
    ("math500", "math500-489", r"\left( 3, \frac{\pi}{2} \right)", [r"(3, \frac{\pi}{2})", r"(3,\pi/2)"],
     [r"(\frac{\pi}{2}, 3)", r"(3, \pi)"]),
    ("math500", "math500-155", "58,500", ["58500", r"\$58,500", "58,500.00"], ["58.5", "5850"]),
    # AIME / AMC: integers, "025" and 27.0 in the files.
    ("aime24", "67", "25", ["025", "25.0", r"\boxed{025}"], ["250", "52", "24"]),
    ("aime24", "60", "204", [r"204 \text{ minutes}", "204 minutes"], ["240", "3.4"]),
    ("aime25", "0", "70", ["070", "70.0"], ["7", "700"]),
    ("amc23", "0", "27", ["27.0", r"27 \text{ miles}", "27 miles"], ["18", "2.7"]),
    ("amc23", "17", "-1", ["-1.0"], ["1", "-1.1"]),
    ("amc23", "44", "1625", ["1,625", "1625.0"], ["1652", "162.5"]),
    # Minerva: e-notation golds, units in \mathrm, Python literals, symbols, trailing variables.
    ("minerva_math", "0", "1.6", [r"1.6 \mathrm{~cm}", r"1.6\text{ cm}", "1.60", "1.6 cm"], ["16", "0.16"]),
    ("minerva_math", "1", "4.5e33",
     [r"4.5 \times 10^{33}", r"4.5 \cdot 10^{33}", "4.5E33", "4.5e+33",
      r"4.5 \times 10^{33} \mathrm{ergs} \mathrm{s}^{-1}", r"4.5\times 10^{33}\ \text{erg/s}"],
     [r"4.5 \times 10^{32}", "4.5", "5.4e33"]),
    ("minerva_math", "13", "8.7e8", [r"8.7 \times 10^{8} \mathrm{~cm}", r"8.7\times10^8\text{ cm}"], [r"8.7 \times 10^{9}"]),
    ("minerva_math", "44", "1e-5", ["10^{-5}", r"1 \times 10^{-5}", "0.00001"], ["10^{5}", "1e-4"]),
    ("minerva_math", "174", "3.89e-10", [r"3.89 \times 10^{-10}", r"3.89\times10^{-10}\text{ m}"],
     [r"3.89 \times 10^{10}", "3.89"]),
    ("minerva_math", "201", "3.61e2", ["361", r"3.61 \times 10^{2}"], ["36.1"]),
    ("minerva_math", "20", "6630", [r"6630 \mathrm{~\AA}", r"6.63 \times 10^{3}"], ["663"]),
    ("minerva_math", "38", "-1./3", [r"-\frac{1}{3}", "-1/3", "-0.3333333333"], [r"\frac{1}{3}", "-3"]),
    ("minerva_math", "49", "-3./2", [r"-\frac{3}{2}", "-1.5"], [r"\frac{3}{2}", "-2/3"]),
    ("minerva_math", "5", "np.arcsin(10/13)",
     [r"\arcsin(10/13)", r"\arcsin\left(\frac{10}{13}\right)", r"\sin^{-1}\left(\frac{10}{13}\right)"],
     [r"\arccos(10/13)", r"\arcsin(13/10)"]),
    ("minerva_math", "67", r"1+\sqrt{3} i", [r"1+i\sqrt{3}"], [r"1-\sqrt{3} i", r"\sqrt{3}+i"]),
    ("minerva_math", "74", "e^{t} / 3", [r"\frac{e^t}{3}", r"\frac{1}{3}e^{t}"], ["3e^t", "e^{-t}/3"]),
    ("minerva_math", "121", "0.10", ["0.1", r"\frac{1}{10}", ".1"], ["0.01", "1"]),
    ("minerva_math", "148", "+2", ["2"], ["-2"]),
    ("minerva_math", "177", "56.0", ["56", "56.00"], ["5.6", "65"]),
    ("minerva_math", "71", r"\frac{1}{2a}(\exp{a*t} - \exp{-a*t})", [r"\frac{e^{at}-e^{-at}}{2a}"],
     [r"\frac{e^{at}+e^{-at}}{2a}"]),
    ("minerva_math", "86", r"I(0) e^{-\frac{t}{R C}}", ["I(0)e^{-t/(RC)}"], [r"I(0) e^{\frac{t}{RC}}"]),
    ("minerva_math", "269", "E_{1},E_{2}", ["E_1, E_2"], ["E_{1}"]),
    ("minerva_math", "110", r"2.2 \tau", [r"2.2\tau", r"\tau \cdot 2.2"], ["2.2", r"22 \tau"]),
    ("minerva_math", "104", r"\frac{37}{4} m", [r"\frac{37 m}{4}", "9.25 m"], [r"\frac{37}{4}", "9.25"]),
    ("minerva_math", "116", r"\frac{1}{m} t", [r"\frac{t}{m}", "t/m"], [r"\frac{1}{m}", "mt"]),
    ("minerva_math", "137", r"\frac{1}{\sqrt{2}}c", [r"\frac{c}{\sqrt{2}}", r"\frac{\sqrt{2}}{2} c"],
     [r"\frac{1}{\sqrt{2}}", r"\sqrt{2}c"]),
    ("minerva_math", "245", "MR=SRMC", ["MR = SRMC"], ["MR=LRMC"]),
    # OlympiadBench: multi-answer strings, tuples, intervals, percentages, units, functions.
    ("olympiadbench", "1664", "$69$,$84$", ["69, 84", "84, 69"], ["69", "69, 85"]),
    ("olympiadbench", "1618", "$(1,8,19), (2,7,13), (4,5,7)$",
     ["(1,8,19),(2,7,13),(4,5,7)", "(4,5,7), (2,7,13), (1,8,19)"],
     ["(1,8,19), (2,7,13)", "(1,8,19), (2,7,13), (4,7,5)"]),
    ("olympiadbench", "2099", r"$90^{\circ}$,$60^{\circ}$", [r"90^\circ, 60^\circ", "90, 60", r"60^{\circ}, 90^{\circ}"],
     [r"90^\circ", "90, 30"]),
    ("olympiadbench", "2254", r"$\frac{32}{9}$,$\frac{1}{2}$", [r"\frac{1}{2}, \frac{32}{9}", "32/9, 1/2"],
     [r"\frac{32}{9}"]),
    ("olympiadbench", "2255", "62.5%", [r"62.5\%", "62.5"], [r"0.625\%", r"6.25\%"]),
    ("olympiadbench", "2276", r"$8 \%$", [r"8\%", "8"], [r"0.8\%", "80"]),
    ("olympiadbench", "2592", "4.2", [r"4.2\%", "4.20"], ["4.3", "42"]),
    ("olympiadbench", "1970", r"$(-\infty, 0) \cup\{1\}$.", [r"(-\infty,0)\cup\{1\}"],
     [r"(-\infty,0]\cup\{1\}", r"(-\infty, 1)"]),
    ("olympiadbench", "2243", r"(-\infty,-5)", [r"(-\infty, -5)", "x < -5"], [r"(-\infty,-5]", r"x \le -5"]),
    ("olympiadbench", "1964", r"$k \geqslant 2$", [r"k \ge 2", r"[2, \infty)"], [r"k > 2", r"k \geq 3"]),
    ("olympiadbench", "2410", r"$[\frac{1}{2}, 8]$", ["[1/2, 8]", "[0.5,8]"], [r"(\frac{1}{2}, 8)"]),
    ("olympiadbench", "1659", "$f(x)=2 x$", ["f(x)=2x", "2x"], ["f(x)=x", "f(x)=2"]),
    ("olympiadbench", "1940", "$f(x)=x$,$f(x)=2-x$", ["f(x)=2-x, f(x)=x"], ["f(x)=x"]),
    ("olympiadbench", "1641", r"$\binom{2n}{n}$", [r"\frac{(2n)!}{(n!)^2}", r"{2n \choose n}"], [r"\binom{2n}{2}"]),
    ("olympiadbench", "2346", "$10^{100}$,$10^{1 / 100}$", [r"10^{\frac{1}{100}}, 10^{100}"], ["10^{100}"]),
    ("olympiadbench", "2419", "$166$", ["166", r"166 \text{ cm}^2", r"166\mathrm{~cm}^{2}"], ["167"]),
    ("olympiadbench", "2426", r"$\frac{600}{7}$", ["600/7", r"\frac{600}{7} \text{ km/h}"], [r"\frac{700}{6}"]),
    ("olympiadbench", "2253", "45", ["45 minutes", r"45 \text{ minutes}", r"45\text{ min}"], ["54"]),
    ("olympiadbench", "2435", r"$18.8^{\circ}$", [r"18.8^\circ", "18.8"], [r"18.9^\circ"]),
    ("olympiadbench", "2469", r"$(-\frac{1}{2}, \frac{7}{2})$", ["(-0.5, 3.5)", "(-1/2, 7/2)"],
     [r"(\frac{7}{2}, -\frac{1}{2})"]),
    ("olympiadbench", "2035", r"$\frac{8}{\sqrt[3]{7}}$", [r"8 \cdot 7^{-1/3}", r"\frac{8\sqrt[3]{49}}{7}"],
     [r"\frac{8}{\sqrt{7}}"]),
    ("olympiadbench", "2461", r"$\frac{\log 2}{\log 2-\log 3}$", [r"\frac{\log 2}{\log(2/3)}"],
     [r"\frac{\log 3}{\log 2-\log 3}"]),
    ("olympiadbench", "2891", r"$\quad(2+\sqrt{2}, 1+\sqrt{2})$", [r"(2+\sqrt{2}, 1+\sqrt{2})"],
     [r"(1+\sqrt{2}, 2+\sqrt{2})"]),
    ("olympiadbench", "2174", r"$2021 \cdot 505 \cdot 337$", ["343943885"], [r"2021 \cdot 505"]),
    ("olympiadbench", "1675", "$k=1$", ["1", "k = 1"], ["k=2"]),
    ("olympiadbench", "2185", "$6m$", ["6 m", r"m \cdot 6"], ["6", "6n"]),
    ("olympiadbench", "2349", "$221,$8$", ["221, 8", "8, 221"], ["221"]),
    # GSM8K: integers, written with commas, dollars, decimals, percent signs, unit words.
    ("gsm8k", "gsm8k-0", "70000", ["70,000", r"\$70,000", "70000.00", r"70{,}000", "70,000 dollars", r"\$70,000.00"],
     ["7000", "700000", "70,001"]),
    ("gsm8k", "gsm8k-1", "160", [r"160 \text{ minutes}", "160 minutes"], ["16", "100"]),
    ("gsm8k", "gsm8k-2", "13", ["13 years", r"13 \text{ years}", r"\text{13 years}"], ["12 years"]),
    ("gsm8k", "gsm8k-34", "25", [r"25\%", "25 percent"], [r"0.25\%", "52"]),
    ("gsm8k", "gsm8k-119", "1450000", ["1,450,000", r"\$1,450,000", r"1.45 \times 10^{6}"], ["145000", "1,450"]),
    ("gsm8k", "gsm8k-112", "2", [r"\$2", "2.00", r"\$2.00"], ["20"]),
]  # fmt: skip

MATCH_CASES = [
    pytest.param(bench, pid, gold, pred, expected, id=f"{bench}-{pid}-{'eq' if expected else 'ne'}-{pred}")
    for bench, pid, gold, equal, wrong in ANSWER_TABLE
    for pred, expected in [(p, True) for p in equal] + [(p, False) for p in wrong]
]


def test_answer_table_covers_every_benchmark() -> None:
    assert {row[0] for row in ANSWER_TABLE} == set(COUNTS)
    assert sum(not c.values[4] for c in MATCH_CASES) >= 100  # wrong spellings too, not only agreements


@pytest.mark.parametrize(("benchmark", "pid", "gold", "pred", "expected"), MATCH_CASES)
def test_gold_against_model_spellings(
    loaded: dict[str, dict[str, Problem]], benchmark: str, pid: str, gold: str, pred: str, expected: bool
) -> None:
    assert loaded[benchmark][pid].answer == gold  # the table's golds are the real files'
    assert answers_match(pred, gold) is expected
    assert answers_match(rf"\boxed{{{pred}}}", gold) is expected  # as extracted from a completion


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("4.5e33", r"4.5\times10^{33}"),
        ("1e-5", r"1\times10^{-5}"),
        ("4.50E+3", r"4.5\times10^3"),
        ("-1./3", r"-\frac{1}{3}"),
        ("np.arcsin(10/13)", r"\arcsin(10/13)"),
        ("E_{1},E_{2}", "E_1,E_2"),
        (r"4.5 \times 10^{33} \mathrm{ergs} \mathrm{s}^{-1}", r"4.5\times10^{33}"),
        (r"20 \mathrm{~km} / \mathrm{s}", "20"),
        (r"1.6 \mathrm{~cm}", "1.6"),
        ("864 square inches", "864"),
        ("x < -5", r"(-\infty,-5)"),
        (r"-2 \le x \le 7", "[-2,7]"),
        (r"5 > x", r"(-\infty,5)"),
        (r"k \geqslant 2", r"[2,\infty)"),
        ("x<y", "x<y"),  # bounds must be values
        ("y = 2x + 3", "y=2x+3"),
        (r"\frac{37}{4} m", r"\frac{37}{4}m"),  # a trailing variable is not a unit
        (r"2 \text{ moves}", "2"),
        (r"69 \text{ and } 84", "69and84"),  # text between numbers is not a unit tail
        # Not a unit tail (ends in x); a backtracking unit-tail pattern would never finish here.
        ("1" + r" \text{a}" * 150 + "x", "1" + "a" * 150 + "x"),
    ],
)
def test_normalisation_of_benchmark_forms(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


# --------------------------------------------------------------------- files by path


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_custom_jsonl_with_field_options(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [{"q": "1+1?", "a": 2, "key": "p1", "note": "easy"}, {"q": "2+2?", "a": "4", "key": "p2", "note": "x"}],
    )
    problems = load_benchmark(str(path), problem_field="q", answer_field="a", id_field="key")
    assert problems == [
        Problem(benchmark="mine", id="p1", index=0, problem="1+1?", answer="2", meta={"note": "easy"}),
        Problem(benchmark="mine", id="p2", index=1, problem="2+2?", answer="4", meta={"note": "x"}),
    ]


def test_custom_jsonl_found_fields_and_answer_forms(tmp_path: Path) -> None:
    """Without options: problem/question, answer/final_answer, id fields by name; the auto form."""
    path = _write_jsonl(
        tmp_path / "myset" / "test.jsonl",
        [
            {"question": "a", "answer": "Work...\n#### 1,234"},
            {"question": "b", "answer": r"so $x=\boxed{\frac{1}{2}}$."},
            {"question": "c", "answer": 27.0},
            {"question": "d", "answer": ["$1$", "$2$"]},
            {"question": "e", "answer": "  (1, 2) "},
        ],
    )
    problems = load_benchmark(str(path))
    assert {p.benchmark for p in problems} == {"myset"}  # test.jsonl takes its folder's name
    assert [p.id for p in problems] == [f"myset-{i}" for i in range(5)]
    assert [p.answer for p in problems] == ["1234", r"\frac{1}{2}", "27", "$1$, $2$", "(1, 2)"]


def test_id_field_found_by_name_falls_back_to_indices_when_not_unique(tmp_path: Path) -> None:
    rows = [{"problem": "p", "answer": "1", "id": 7}, {"problem": "q", "answer": "2", "id": 7}]
    path = _write_jsonl(tmp_path / "dup.jsonl", rows)
    assert [p.id for p in load_benchmark(str(path))] == ["dup-0", "dup-1"]
    with pytest.raises(BenchmarkError, match=r"id '7' .*already used.*--id-field"):
        load_benchmark(str(path), id_field="id")


@pytest.mark.parametrize("name", ["math500", "aime25", "amc23", "olympiadbench", "gsm8k"])
def test_a_named_set_read_by_path_gives_the_same_problems(name: str) -> None:
    by_name = load_benchmark(name)
    by_path = load_benchmark(str(default_data_dir() / BENCHMARKS[name].file))
    assert [(p.benchmark, p.id, p.problem, p.answer) for p in by_path] == [
        (p.benchmark, p.id, p.problem, p.answer) for p in by_name
    ]


def test_minerva_by_path_with_the_solution_as_answer_field() -> None:
    by_path = load_benchmark(str(default_data_dir() / "minerva_math" / "test.jsonl"), answer_field="solution")
    assert [p.answer for p in by_path] == [p.answer for p in load_benchmark("minerva_math")]


def test_missing_field_error_names_file_row_field_and_flag(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", [{"q": "x", "a": "1"}, {"q": "y", "ans": "2"}])
    with pytest.raises(BenchmarkError) as info:
        load_benchmark(str(path), problem_field="q", answer_field="a")
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "line 2" in message and "'a'" in message
    assert "['ans', 'q']" in message and "--answer-field" in message


def test_no_known_field_error_lists_the_fields_and_the_flag(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "n.jsonl", [{"prompt": "x", "answer": "1"}])
    with pytest.raises(
        BenchmarkError, match=r"n\.jsonl line 1: no problem field .*\['answer', 'prompt'\].*--problem-field"
    ):
        load_benchmark(str(path))


def test_empty_answer_is_an_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "e.jsonl", [{"problem": "x", "answer": "1"}, {"problem": "y", "answer": " "}])
    with pytest.raises(BenchmarkError, match=r"e\.jsonl line 2: no gold answer .*'answer'"):
        load_benchmark(str(path))
    # A named set whose row has no "#### " line has no gold answer either.
    _write_jsonl(tmp_path / "root" / "gsm8k" / "test.jsonl", [{"question": "x", "answer": "no marker"}])
    with pytest.raises(BenchmarkError, match=r"line 1: no gold answer \(gsm8k form\)"):
        load_benchmark("gsm8k", data_dir=tmp_path / "root")


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": \n')
    with pytest.raises(BenchmarkError, match=r"bad\.jsonl line 3: invalid JSON"):
        load_benchmark(str(path))


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(BenchmarkError) as info:
        load_benchmark("math5000")
    message = str(info.value)
    assert "unknown benchmark 'math5000'" in message and "JSONL" in message
    assert all(name in message for name in COUNTS)


def test_missing_path_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="no such file"):
        load_benchmark(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(BenchmarkError, match="unsupported file type"):
        load_benchmark(str(tmp_path / "x.txt"))


def test_field_options_are_refused_for_a_named_benchmark() -> None:
    with pytest.raises(BenchmarkError, match="named benchmark"):
        load_benchmark("gsm8k", answer_field="solution")


def test_data_dir_argument_env_and_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_jsonl(tmp_path / "aime25" / "test.jsonl", [{"problem": "P", "answer": 5, "id": "a"}])
    assert load_benchmark("aime25", data_dir=tmp_path)[0].answer == "5"
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path
    assert [p.id for p in load_benchmark("AIME25")] == ["a"]
    with pytest.raises(BenchmarkError, match=rf"benchmark 'math500': .* not found; set {DATA_DIR_ENV}"):
        load_benchmark("math500")


def test_default_data_dir_is_the_shared_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Beside the repository where it exists there; a clone elsewhere (CI) finds the shared copy."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.delenv("THOR_SHARED_DATA_DIR", raising=False)
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"
    found = default_data_dir()
    assert found == (beside if beside.is_dir() else Path("/work/shared/data/benchmarks"))
    assert (found / "gsm8k" / "test.jsonl").is_file()
    (tmp_path / "benchmarks").mkdir()
    monkeypatch.setenv("THOR_SHARED_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path / "benchmarks"


# --------------------------------------------------------------------- Hugging Face datasets from local files


def test_dataset_saved_to_disk(tmp_path: Path) -> None:
    rows = {"question": ["1+1?", "2+3?"], "final_answer": [["2"], ["5"]], "uid": ["u1", "u2"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "tiny"))
    problems = load_benchmark(str(tmp_path / "tiny"), id_field="uid")
    assert [(p.benchmark, p.id, p.problem, p.answer) for p in problems] == [
        ("tiny", "u1", "1+1?", "2"),
        ("tiny", "u2", "2+3?", "5"),
    ]


def test_dataset_dict_saved_to_disk_picks_the_split(tmp_path: Path) -> None:
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"problem": ["t"], "answer": ["1"]}),
            "test": datasets.Dataset.from_dict({"problem": ["a", "b"], "answer": ["2", "3"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [p.answer for p in load_benchmark(str(tmp_path / "dd"))] == ["2", "3"]
    assert [p.answer for p in load_benchmark(str(tmp_path / "dd"), split="train")] == ["1"]
    with pytest.raises(BenchmarkError, match=r"no split 'dev'; it has \['test', 'train'\]"):
        load_benchmark(str(tmp_path / "dd"), split="dev")


def test_missing_field_in_a_dataset_names_the_row(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"problem": ["a"], "target": ["1"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(BenchmarkError, match=r"ds row 0: no answer field .*\['problem', 'target'\].*--answer-field"):
        load_benchmark(str(tmp_path / "ds"))
    assert load_benchmark(str(tmp_path / "ds"), answer_field="target")[0].answer == "1"


def test_not_a_saved_dataset_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkError, match="not a dataset saved with save_to_disk"):
        load_benchmark(str(tmp_path / "empty"))


@pytest.mark.parametrize("suffix", ["parquet", "csv", "json"])
def test_local_parquet_csv_json_files(tmp_path: Path, suffix: str) -> None:
    ds = datasets.Dataset.from_dict({"problem": ["a", "b"], "answer": ["1", "2"]})
    path = tmp_path / f"local.{suffix}"
    getattr(ds, f"to_{suffix}")(str(path))
    problems = load_benchmark(str(path))
    assert [(p.benchmark, p.problem, p.answer) for p in problems] == [("local", "a", "1"), ("local", "b", "2")]


# --------------------------------------------------------------------- select


def test_select_offset_and_limit() -> None:
    problems = load_benchmark("aime25")
    assert [p.id for p in select(problems, limit=3)] == ["0", "1", "2"]
    assert [p.id for p in select(problems, offset=28)] == ["28", "29"]
    assert [p.id for p in select(problems, offset=10, limit=2)] == ["10", "11"]
    assert select(problems, offset=40) == []
    assert select(problems, limit=0) == []
    with pytest.raises(BenchmarkError, match="--offset"):
        select(problems, offset=-1)
    with pytest.raises(BenchmarkError, match="--limit"):
        select(problems, limit=-2)
