"""Turning one sandbox result into THOR's observation text.

Owns: the reference code's rules (configurable through `ObservationConfig`):
a call succeeds iff it exited 0 and printed something; otherwise the observation
is its stderr, reduced to the last line when it mentions an Error, or the
empty-observation message; long observations keep the head and tail; and the
injected block `\\n```output\\n{obs}\\n```\\n`. The `reference` profile applies
those rules to every failure, so a snippet stopped for printing too much or for
running out of memory reads as the reference's timeout message; the `notebook`
profile says what really happened (output too long, memory limit).

Does not own: executing code (tools.py) or tokenising the text (decoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ObservationConfig

OUTPUT_FENCE_OPEN = "```output\n"
OUTPUT_FENCE_CLOSE = "\n```\n"

#: What the notebook profile shows for snippets the sandbox stopped (by outcome).
NOTEBOOK_STOPPED = {
    "output_capped": "OutputLimitError: the code printed more than the sandbox allows and was stopped; "
    "print less (a summary or a few items)",
    "oom": "MemoryError: the code used more memory than the sandbox allows and was stopped",
}


@dataclass(frozen=True)
class Observation:
    text: str  # the observation itself (what goes between the fences)
    ok: bool  # did the call succeed by the configured rule


def judge(
    exit_code: int | None, stdout: str, stderr: str, cfg: ObservationConfig, *, outcome: str | None = None
) -> Observation:
    """The observation of one call. `outcome` is the sandbox's verdict (`ToolResult.outcome`):
    the notebook profile names an output-cap or memory kill instead of the reference's
    timeout message; without it the reference rules alone decide."""
    ok = exit_code == 0 and (bool(stdout.strip()) or not cfg.require_stdout)
    obs = stdout if ok else stderr
    if not ok and cfg.profile == "notebook" and outcome in NOTEBOOK_STOPPED:
        obs = NOTEBOOK_STOPPED[outcome]
    elif not ok and "Error" in obs:
        obs = obs.strip().split("\n")[-1]
    if not obs.strip():
        obs = "" if ok else cfg.empty_message
    obs = obs.strip()
    if len(obs) >= cfg.max_chars:
        obs = obs[: cfg.keep_head] + "..." + (obs[-cfg.keep_tail :] if cfg.keep_tail else "")
    return Observation(obs, ok)


def injection(observation: str, model_text_ends_with_newline: bool) -> str:
    """The text appended after the model's closing fence."""
    lead = "" if model_text_ends_with_newline else "\n"
    return f"{lead}{OUTPUT_FENCE_OPEN}{observation}{OUTPUT_FENCE_CLOSE}"
