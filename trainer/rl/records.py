"""The RL data contract: one rollout sample as the learner consumes it.

Owns: `RolloutRecord`, kept close to verl's agent-loop output (`prompt_ids`,
`response_ids`, `response_mask` with 1 = model token / 0 = tool output or injected
text, `response_logprobs`, a scalar reward) plus what hierarchical GRPO needs on
top: the group a sample was drawn in, its level (whole trajectory or step-level
regeneration) and its advantage. A multi-node backend (Ray actors, verl) maps onto
this with an adapter: rename fields, no rewrite.

For a step-level sample, `prompt_ids` is the original prompt plus the kept prefix of
the failed trajectory (cut at the token level), and `response_ids` are only the
regenerated tokens: the loss covers nothing before the cut.

Does not own: producing records (rollout.py), advantages (loss.py) or training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["RolloutRecord"]


@dataclass
class RolloutRecord:
    prompt_ids: list[int]
    response_ids: list[int]
    #: 1 for tokens the model sampled (trained on), 0 for tool outputs and injected text.
    response_mask: list[int]
    reward: float
    #: Samples of one group share a prompt (or a cut prefix) and are compared with each other.
    group: str
    level: Literal["trajectory", "step"]
    problem_id: str = ""
    #: GRPO advantage, (reward - group mean) / (group std + eps); set before the update.
    advantage: float = 0.0
    #: vLLM's log-probability of each sampled response token (0.0 where the mask is 0), when asked.
    response_logprobs: list[float] | None = None
    #: Diagnostics: finish reason, tool calls and their success, answer, correctness.
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.response_mask):
            raise ValueError(
                f"response_ids ({len(self.response_ids)}) and response_mask ({len(self.response_mask)}) differ in length"
            )
        if self.response_logprobs is not None and len(self.response_logprobs) != len(self.response_ids):
            raise ValueError("response_logprobs must have one entry per response token")

    @property
    def trained_tokens(self) -> int:
        return sum(self.response_mask)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutRecord:
        return cls(**d)
