"""Turning one sandbox result into THOR's observation text.

Owns: the reference code's rules (configurable through `ObservationConfig`):
a call succeeds iff it exited 0 and printed something; otherwise the observation
is its stderr, reduced to the last line when it mentions an Error, or the
empty-observation message; long observations keep the head and tail; and the
injected block `\\n```output\\n{obs}\\n```\\n`.

Does not own: executing code (tools.py) or tokenising the text (decoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ObservationConfig

OUTPUT_FENCE_OPEN = "```output\n"
OUTPUT_FENCE_CLOSE = "\n```\n"


@dataclass(frozen=True)
class Observation:
    text: str  # the observation itself (what goes between the fences)
    ok: bool  # did the call succeed by the configured rule


def judge(exit_code: int | None, stdout: str, stderr: str, cfg: ObservationConfig) -> Observation:
    ok = exit_code == 0 and (bool(stdout.strip()) or not cfg.require_stdout)
    obs = stdout if ok else stderr
    if not ok and "Error" in obs:
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
