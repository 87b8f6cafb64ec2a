"""The prompts TIRGen sends: the actor's, the critic's, and the one the trained policy will see.

Owns: three texts and the messages built from them.

- The **actor** is asked for plain step-by-step reasoning with the reference's
  instruction ("Please reason step by step, and put your final answer within
  \\boxed{}."); it never sees tools.
- The **critic** is written from the paper's description of TIRGen: take one fragment
  of the actor's reasoning, keep its pure reasoning as written, and turn each
  computable step into a short self-contained Python block that prints its result;
  the block is really executed (the critic's turn runs through THOR's decoder and the
  sandbox) and the critic continues from the real output, which confirms or replaces
  the number the actor wrote. A one-shot example shows the format, because small
  critics follow an example far better than a description.
- The **training** conversation is what a user of the server sends: the problem as the
  user message (for a share of the samples with the CoT instruction appended, so the
  trained model uses its tool under both prompts); the server adds THOR's tool
  instructions to it as it does at inference.

Does not own: rendering with a chat template (thor_engine.prompting), or the loop.
"""

from __future__ import annotations

from thor_engine.prompting import TIR_INSTRUCTIONS
from trainer.evaluate.modes import COT_PROMPT

__all__ = [
    "ACTOR_INSTRUCTION",
    "CRITIC_SYSTEM",
    "TIR_INSTRUCTIONS",
    "actor_messages",
    "critic_messages",
    "training_messages",
]

#: The reference's actor instruction (Qwen2.5-Math's CoT prompt), after the problem.
ACTOR_INSTRUCTION = COT_PROMPT

CRITIC_SYSTEM = (
    "You turn one step of a math solution into tool-integrated reasoning. Rewrite only the step you are given:\n"
    "- Keep its reasoning sentences as they are.\n"
    "- Wherever the step computes something (arithmetic, an equation, a sum, a count, a simplification), write a "
    "short self-contained ```python block that computes it and prints the result, instead of stating the number. "
    "After the block, stop: it is executed and its real output is shown to you in a ```output block.\n"
    "- Continue from the real output. If it differs from the number in the step, the output is right.\n"
    "- Write no code for steps that only reason. Do not go beyond the end of the step. Do not write the final answer."
)

_EXAMPLE_PROBLEM = "A baker makes 12 trays of 7 muffins and sells 59 muffins. How many muffins are left?"
_EXAMPLE_STEP = (
    "The baker makes 12 * 7 = 84 muffins in total.\nAfter selling 59 muffins, 84 - 59 = 35 muffins are left.\n"
)
_EXAMPLE_REWRITE = (
    "The baker makes 12 trays of 7 muffins. Let me compute the total and what is left after selling 59.\n"
    "```python\ntotal = 12 * 7\nleft = total - 59\nprint(total, left)\n```\n"
    "```output\n84 25\n```\n"
    "So the baker makes 84 muffins in total, and 84 - 59 = 25 muffins are left.\n"
)


def _critic_request(problem: str, solution_so_far: str, step: str) -> str:
    so_far = solution_so_far.strip() or "(nothing yet: this is the first step)"
    return f"Problem:\n{problem.strip()}\n\nSolution so far:\n{so_far}\n\nStep to rewrite:\n{step.strip()}\n"


def actor_messages(problem: str) -> list[dict[str, str]]:
    """The actor's conversation: the problem and the reference's CoT instruction."""
    return [{"role": "user", "content": f"{problem.strip()}\n{ACTOR_INSTRUCTION}"}]


def critic_messages(problem: str, solution_so_far: str, step: str) -> list[dict[str, str]]:
    """The critic's conversation for one fragment: instructions, a worked example, then the fragment."""
    return [
        {"role": "system", "content": CRITIC_SYSTEM},
        {"role": "user", "content": _critic_request(_EXAMPLE_PROBLEM, "", _EXAMPLE_STEP)},
        {"role": "assistant", "content": _EXAMPLE_REWRITE},
        {"role": "user", "content": _critic_request(problem, solution_so_far, step)},
    ]


def training_messages(problem: str, *, cot_instruction: bool) -> list[dict[str, str]]:
    """The conversation the trained policy is prompted with (THOR's tool instructions are added on rendering)."""
    content = f"{problem.strip()}\n{COT_PROMPT}" if cot_instruction else problem.strip()
    return [{"role": "user", "content": content}]
