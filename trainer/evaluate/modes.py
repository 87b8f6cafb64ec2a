"""Evaluation modes: what "thor", "thor-nosc", "cot" and "tir-ref" mean, in one place.

Owns: the table of modes, each one the chat messages a problem becomes, whether THOR's
tool instructions are added, and the `ThorConfig` the decoder runs with; plus how a
mode is asked of a THOR server (its `thor` request field), so that every target runs
the same prompts and settings.

- ``thor``: tools + self-correction, the server's defaults (notebook observation profile).
- ``thor-nosc``: the same without self-correction (a failed call is kept, not resampled).
- ``thor-cotq``: ``thor`` with the CoT instruction at the end of the user message, as many
  users (and Qwen2.5-Math's evaluation) write it: does the model still use its tool?
- ``cot``: no tools; Qwen2.5-Math's chain-of-thought system prompt.
- ``tir-ref``: the reference code's settings (reference observation profile: no stdout
  is a failure and nothing is echoed; 10 calls; backtrack 500 tokens; 4 retries).
- ``thor-rl``: what RL rollouts optimise (reference observation profile, 5 calls, no
  self-correction), without stopping at a failed call: a trained checkpoint's tool use
  as it is, with nothing resampled away.
- ``thor-json``: ``thor``, then the answer as JSON `{"answer": <integer>}` under the
  structured-output constraint (`response_format` json_schema with THOR on: the loop, then
  the constrained answer); the answer scored is the JSON's, not a boxed one.
- ``json``: the same request with THOR off: the constrained JSON is the whole output (what a
  client asking for structured output gets from plain generation).

Does not own: sampling (the run's), scoring, or the targets that run a mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from thor_engine.config import (
    TRAINING_OBSERVATION_PROFILE,
    ObservationConfig,
    SelfCorrectionConfig,
    ThorConfig,
    training_observation,
)
from thor_engine.prompting import TIR_INSTRUCTIONS

__all__ = ["COT_PROMPT", "INTEGER_ANSWER", "MODES", "Mode", "parse_modes"]

#: Qwen2.5-Math's CoT prompt (its evaluation's system message), as THOR's Table 1 baselines use.
COT_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Mode:
    name: str
    description: str
    tools: bool
    config: ThorConfig
    system_prompt: str | None = None
    #: THOR's tool instructions, appended to the system message (as the server does) when tools are on.
    tir_instructions: str | None = TIR_INSTRUCTIONS
    #: The `thor` request field that asks a THOR server for this mode.
    server_options: dict[str, Any] = field(default_factory=dict)
    #: Text appended to the user message (on a new line), as a user would write it.
    user_suffix: str | None = None
    #: A JSON answer asked for as a client asks (`response_format` json_schema): its schema has an
    #: `answer` property, and the answer scored is that value (`structured_answer`), not a boxed one.
    answer_schema: dict[str, Any] | None = None

    @property
    def response_format(self) -> dict[str, Any] | None:
        """The chat request's `response_format` for this mode (None: free text)."""
        if self.answer_schema is None:
            return None
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": self.answer_schema}}

    def structured_answer(self, content: str) -> str | None:
        """The `answer` of a JSON answer as text (None when it is not a JSON object with one)."""
        try:
            value = json.loads(content)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("answer") is None or isinstance(value["answer"], (dict, list)):
            return None
        return str(value["answer"])

    def messages(self, problem: str) -> list[dict[str, str]]:
        """The chat messages of a problem (THOR's tool instructions are added by the engine)."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        content = f"{problem}\n{self.user_suffix}" if self.user_suffix else problem
        return [*msgs, {"role": "user", "content": content}]


_THOR = ThorConfig()
_NO_TOOLS = _THOR.model_copy(update={"max_tool_calls": 0, "on_tool_budget": "continue"})

#: The structured answer of the `*-json` modes: an integer (GSM8K's answers are integers).
INTEGER_ANSWER: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}},
    "required": ["answer"],
    "additionalProperties": False,
}

MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode(
            "thor",
            "tools + self-correction (server defaults)",
            tools=True,
            config=_THOR,
            server_options={},
        ),
        Mode(
            "thor-nosc",
            "tools, no self-correction",
            tools=True,
            config=_THOR.model_copy(update={"self_correction": SelfCorrectionConfig(enabled=False)}),
            server_options={"self_correction": False},
        ),
        Mode(
            "thor-cotq",
            "tools + self-correction; the user message ends with the CoT instruction",
            tools=True,
            config=_THOR,
            server_options={},
            user_suffix=COT_PROMPT,
        ),
        Mode(
            "cot",
            "no tools, Qwen2.5-Math CoT prompt",
            tools=False,
            config=_NO_TOOLS,
            system_prompt=COT_PROMPT,
            tir_instructions=None,
            server_options={"enabled": False},
        ),
        Mode(
            "tir-ref",
            "reference settings: reference observations, 10 calls, backtrack 500",
            tools=True,
            config=ThorConfig(
                max_tool_calls=10,
                observation=ObservationConfig(profile="reference"),
                self_correction=SelfCorrectionConfig(enabled=True, backtrack_tokens=500, max_retries=4),
            ),
            server_options={
                "max_tool_calls": 10,
                "observation": {"profile": "reference"},
                "self_correction": {"enabled": True, "backtrack_tokens": 500, "max_retries": 4},
            },
        ),
        Mode(
            "thor-rl",
            "RL rollout settings: reference observations, 5 calls, no self-correction",
            tools=True,
            config=ThorConfig(
                max_tool_calls=5,
                observation=training_observation(),
                self_correction=SelfCorrectionConfig(enabled=False),
            ),
            server_options={
                "max_tool_calls": 5,
                "observation": {"profile": TRAINING_OBSERVATION_PROFILE},
                "self_correction": False,
            },
        ),
        Mode(
            "thor-json",
            "tools + self-correction, then the answer as JSON {answer: integer} under the constraint",
            tools=True,
            config=_THOR,
            server_options={},
            answer_schema=INTEGER_ANSWER,
        ),
        Mode(
            "json",
            "no tools: the answer as JSON {answer: integer} from the first token (THOR off)",
            tools=False,
            config=_NO_TOOLS,
            tir_instructions=None,
            server_options={"enabled": False},
            answer_schema=INTEGER_ANSWER,
        ),
    )
}


def parse_modes(spec: str) -> list[Mode]:
    """`"thor,cot"` -> the modes, in the order given; ValueError naming the unknown one."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--modes is empty; choose from " + ", ".join(MODES))
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--modes lists a mode twice: {spec!r}")
    return [MODES[n] for n in names]
