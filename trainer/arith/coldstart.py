"""The designed cold start: SFT trajectories whose tool use is half right and half broken.

Owns: the three branches a cold-start trajectory takes, their mix per problem style
(`MIX`), the seeded per-problem choice (`plan`), the exact text of each branch, and
writing the trajectories as TIRGen samples (``trainer/tirgen/sample.py``) for
``python -m trainer.sft``:

- ``print``: ``I will compute it with Python.`` + a block that prints the expression, the
  observation of its real output, then ``The answer is \\boxed{<output>}.`` (right);
- ``bare``: the same opening, but the block is the bare expression: under THOR's
  reference rule (no stdout is a failure) it fails with the reference's empty-output
  message, then a wrong guess (wrong);
- ``direct``: no code, a wrong guess (wrong).

The guess (`Mix.guess`) is ``nearby`` (the answer +- 1..30, drawn per problem) or
``rounded`` (both factors rounded to tens and multiplied, e.g. 40 * 50 = 2000 for
37 * 48 + 12; moved off the answer when it hits it): a rough estimate the model can learn
exactly from what it sees, so its loss does not compete with learning to copy the tool's
output (see __init__.py for what each gave).

``print`` and ``bare`` share every character up to the code, so which one is taken is a
single token decision right after the opening fence (what step-level RL can change); code
or no code is decided at the first token of the answer (what trajectory-level RL can
change). The problem's phrasing (task.py's style) sets the mix: ``What is ...?`` mostly
prints, ``Compute ...`` mostly writes the bare expression, each with a share of the other
branches, so a greedy SFT model succeeds on about half the problems and sampling at
temperature 1 still explores every branch on every problem.

The prompt segment is what the server renders for the problem as a user message with
THOR's tool instructions (``trainer.tirgen.prompts.training_messages`` without the CoT
instruction, as the ``thor-rl`` evaluation mode sends it); observations are exactly
``thor_engine.observation.judge`` + ``injection`` under the reference profile. The SFT
trainer appends the end-of-turn token itself.

Does not own: the problems (task.py), building the task directory (build.py), the tokenizer
(tokenizer.py) or training (trainer.sft).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from thor_engine.config import training_observation
from thor_engine.observation import injection, judge
from thor_engine.prompting import TIR_INSTRUCTIONS, with_tir_instructions
from trainer.tirgen.prompts import training_messages
from trainer.tirgen.sample import SegmentText, TirSample

from .task import ArithProblem, Style, evaluate_expression

__all__ = [
    "BRANCHES",
    "MIX",
    "OBSERVATION",
    "OPENING",
    "Branch",
    "Mix",
    "Plan",
    "corpus",
    "plan",
    "prompt_text",
    "rounded_estimate",
    "sample",
    "segments",
    "write_samples",
]

Branch = Literal["print", "bare", "direct"]
BRANCHES: tuple[Branch, ...] = ("print", "bare", "direct")

#: The opening shared by the print and bare branches (everything before the code).
OPENING = "I will compute it with Python.\n```python\n"
DIRECT_OPENING = "I estimate it directly: "
#: The training observation rules (THOR's reference: a call that prints nothing fails), as RL and the thor-rl mode run them.
OBSERVATION = training_observation()
SOURCE = "train"  # the benchmark name trainer.evaluate gives problems/train.jsonl (its stem)
GUESS_SPREAD = 30  # wrong guesses are the answer +- 1..GUESS_SPREAD


@dataclass(frozen=True)
class Mix:
    """Branch shares per style: the style's own branch gets *lean*, the other code branch and
    ``direct`` share the rest (overall: print and bare (1 - direct) / 2 each when styles are even)."""

    lean: float = 0.8
    direct: float = 0.1
    guess: Literal["nearby", "rounded"] = "nearby"

    def shares(self, style: Style) -> dict[Branch, float]:
        other = 1.0 - self.lean - self.direct
        if other < 0 or self.lean < 0 or self.direct < 0:
            raise ValueError(f"mix lean={self.lean} direct={self.direct}: shares must be >= 0 and sum to <= 1")
        if style == "what":
            return {"print": self.lean, "bare": other, "direct": self.direct}
        return {"print": other, "bare": self.lean, "direct": self.direct}


MIX = Mix()


@dataclass(frozen=True)
class Plan:
    """One problem's cold-start trajectory: its branch and (bare, direct) its wrong guess."""

    problem: ArithProblem
    branch: Branch
    guess: int | None


def plan(problem: ArithProblem, seed: int, mix: Mix = MIX) -> Plan:
    """The branch and guess of *problem*, drawn from a generator seeded by (seed, problem id)."""
    rng = random.Random(f"thor-arith-coldstart:{seed}:{problem.id}")
    shares = mix.shares(problem.style)
    branch: Branch = rng.choices(BRANCHES, weights=[shares[b] for b in BRANCHES])[0]
    delta = rng.choice([d for d in range(-GUESS_SPREAD, GUESS_SPREAD + 1) if d != 0])
    if branch == "print":
        return Plan(problem, branch, None)
    if mix.guess == "nearby":
        return Plan(problem, branch, int(problem.answer) + delta)
    return Plan(problem, branch, rounded_estimate(problem.expression))


def rounded_estimate(expression: str) -> int:
    """``a * b +- c`` estimated as round(a) * round(b) (to tens), never equal to the exact value."""
    a, _, b, _, _ = expression.split()
    estimate = (int(a) + 5) // 10 * 10 * ((int(b) + 5) // 10 * 10)
    exact = evaluate_expression(expression)
    return estimate + 10 if estimate == exact else estimate


def _observation(stdout: str) -> str:
    obs = judge(0, stdout, "", OBSERVATION)
    return injection(obs.text, model_text_ends_with_newline=True)


def segments(p: Plan) -> list[tuple[str, str]]:
    """The completion of a plan as (kind, text) runs: model text and injected observations."""
    expression, answer = p.problem.expression, p.problem.answer
    if p.branch == "print":
        return [
            ("model", f"{OPENING}print({expression})\n```\n"),
            ("observation", _observation(f"{answer}\n")),
            ("model", f"The answer is \\boxed{{{answer}}}."),
        ]
    if p.branch == "bare":
        return [
            ("model", f"{OPENING}{expression}\n```\n"),
            ("observation", _observation("")),
            ("model", f"The code printed nothing, so I estimate: \\boxed{{{p.guess}}}."),
        ]
    return [("model", f"{DIRECT_OPENING}\\boxed{{{p.guess}}}.")]


def messages(problem: ArithProblem) -> list[dict[str, str]]:
    """The conversation the policy sees (the thor-rl mode's: the problem as the user message)."""
    return training_messages(problem.problem, cot_instruction=False)


def prompt_text(tokenizer: Any, problem: ArithProblem) -> str:
    """The prompt as the server renders it: the chat template over the messages plus THOR's tool
    instructions, ending with the assistant header (``render_chat``'s text, before tokenising)."""
    return tokenizer.apply_chat_template(
        with_tir_instructions(messages(problem), TIR_INSTRUCTIONS), tokenize=False, add_generation_prompt=True
    )


def corpus(plans: list[Plan]) -> Iterator[str]:
    """The text the tokenizer learns its merges from: each training conversation, roles included."""
    for p in plans:
        completion = "".join(text for _, text in segments(p))
        yield f"system\n{TIR_INSTRUCTIONS}\nuser\n{p.problem.problem}\nassistant\n{completion}"


def sample(p: Plan, tokenizer: Any, *, tokenizer_name: str) -> TirSample:
    segs = [SegmentText(kind="prompt", text=prompt_text(tokenizer, p.problem))]
    segs += [SegmentText(kind=k, text=t) for k, t in segments(p)]  # type: ignore[arg-type]
    answer = p.problem.answer if p.branch == "print" else str(p.guess)
    return TirSample(
        id=f"{SOURCE}/{p.problem.id}",
        problem_id=p.problem.id,
        source=SOURCE,
        problem=p.problem.problem,
        gold=p.problem.answer,
        messages=messages(p.problem),
        segments=segs,
        answer=answer,
        correct=answer == p.problem.answer,
        code_calls=0 if p.branch == "direct" else 1,
        failed_calls=1 if p.branch == "bare" else 0,
        actor_model="trainer.arith (designed cold start)",
        tokenizer=tokenizer_name,
        meta={"branch": p.branch, "style": p.problem.style, "expression": p.problem.expression},
    )


def write_samples(path: Path, plans: list[Plan], tokenizer: Any, *, tokenizer_name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in plans:
            f.write(json.dumps(sample(p, tokenizer, tokenizer_name=tokenizer_name).model_dump(), ensure_ascii=False))
            f.write("\n")
