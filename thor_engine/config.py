"""THOR decoding options: one typed, validated configuration object per request.

Owns: every knob of the tool-integrated loop with the reference defaults of the
THOR paper's code (tool budget 10, self-correction with 4 retries and a 500-token
backtrack, 256-character observation truncation, the empty-observation message)
and our product defaults (the `notebook` observation profile). The server maps
its `thor` request field onto this; the trainer builds it directly, from the RL
presets `rl_rollout_config` (trajectory level) and `rl_step_config` (step level), whose
observation rules (`training_observation`) TIRGen's critic shares.

Does not own: sampling parameters (`SamplingOptions` below is only carried
through), engine arguments, or the sandbox's own limits.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: The reference code's observation when a failed call left no output at all.
REFERENCE_EMPTY_OBSERVATION = "timeout_decorator.timeout_decorator.TimeoutError: 'Timed Out'"
#: The reference code's text that closes an over-budget thinking block.
THINKING_CUT_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now."
    "\n</think>\n\n"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ObservationConfig(_Strict):
    """How a sandbox result becomes the text injected after a code block."""

    profile: Literal["notebook", "reference"] = Field(
        default="notebook",
        description="reference: THOR's rules exactly. notebook: the same rules, but the sandbox echoes the value "
        "of a trailing expression (like a notebook cell), so `123 * 457` without print() still yields 56211.",
    )
    max_chars: int = Field(default=256, ge=16, description="Observations this long or longer are shortened...")
    keep_head: int = Field(default=128, ge=0, description="...to their first keep_head characters + '...' + ...")
    keep_tail: int = Field(default=128, ge=0, description="...their last keep_tail characters.")
    empty_message: str = Field(
        default=REFERENCE_EMPTY_OBSERVATION, description="Observation of a failure with no output."
    )
    require_stdout: bool = Field(
        default=True, description="A call that prints nothing counts as failed (reference rule)."
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300, description="Wall-clock limit of one code execution.")

    @model_validator(mode="after")
    def _head_and_tail_fit(self) -> ObservationConfig:
        # A shortened observation is head + "..." + tail of a text at least max_chars long:
        # a head and tail longer than that together would repeat the middle of the text.
        # (The reference's 128 + 128 of 256 fit exactly; the "..." makes it 259 characters.)
        if self.keep_head + self.keep_tail > self.max_chars:
            raise ValueError(
                f"keep_head ({self.keep_head}) + keep_tail ({self.keep_tail}) exceed max_chars ({self.max_chars}): "
                "a shortened observation would repeat text; lower keep_head/keep_tail or raise max_chars"
            )
        return self


class SelfCorrectionConfig(_Strict):
    """Backtrack and resample when a tool call fails (THOR's inference-time self-correction)."""

    enabled: bool = True
    mode: Literal["tokens", "step"] = Field(
        default="tokens",
        description="tokens: drop backtrack_tokens tokens before the failed code block (reference). step: go back "
        "to the start of the reasoning step (paragraph) that led to the failed code.",
    )
    backtrack_tokens: int = Field(default=500, ge=0)
    max_retries: int = Field(default=4, ge=0, description="Consecutive resamples allowed for one call.")
    retries_consume_budget: bool = Field(
        default=True, description="Failed, retried calls count against max_tool_calls."
    )
    retry_temperature: float = Field(
        default=0.7,
        ge=0,
        le=2,
        description="Temperature for resampling when the request itself is greedy (temperature 0 would only "
        "reproduce the same failure).",
    )


class RepetitionConfig(_Strict):
    """Stop a trajectory that loops (finish_reason `repetition`): the model's own tokens end in a unit of at most
    `max_period` tokens repeated back to back at least `min_repeats` times, covering at least `min_span_tokens`.

    Checked on the tokens the model wrote into the kept trajectory, in order (tool outputs and injected text left
    out, discarded attempts forgotten); the looping text is kept, so the client sees what happened.
    """

    min_repeats: int = Field(
        default=4, ge=2, description="Whole copies of the repeating unit, back to back, that count as a loop."
    )
    max_period: int = Field(
        default=200, ge=1, le=4096, description="Longest repeating unit, in tokens (longer cycles are not caught)."
    )
    min_span_tokens: int = Field(
        default=64,
        ge=1,
        description="The repeated tail must cover at least this many tokens, so a short unit (`= = =`, a 3-token "
        "cycle) trips only after this many tokens, not after min_repeats copies.",
    )


class ThorConfig(_Strict):
    """Options of one tool-integrated generation."""

    max_tool_calls: int = Field(default=10, ge=0, description="Executions allowed per trajectory (reference: 10).")
    on_tool_budget: Literal["continue", "stop"] = Field(
        default="continue",
        description="When the budget is spent: continue to EOS without executing (reference) or stop the "
        "trajectory with finish_reason 'tool_budget' at the next code block.",
    )
    stop_on_tool_error: bool = Field(
        default=False, description="End the trajectory at the first failed call that is committed (RL rollouts)."
    )
    stop_after_execution: bool = Field(
        default=False,
        description="End the trajectory (finish_reason 'tool_executed') right after the first code block that runs "
        "in the sandbox, without appending its observation: the trajectory ends with the model's closing fence. "
        "Its CodeBlock and ToolCall events are still emitted; self-correction never resamples it (step-level RL).",
    )
    observation: ObservationConfig = ObservationConfig()
    self_correction: SelfCorrectionConfig = SelfCorrectionConfig()
    thinking_budget: int | None = Field(
        default=None, ge=1, description="Reasoning models: tokens allowed inside <think> before it is cut."
    )
    thinking_cut_text: str = THINKING_CUT_TEXT
    code_languages: tuple[str, ...] = Field(
        default=("python", "py", "python3", "py3"), description="Fence info strings that mark executable code."
    )
    max_generated_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Hard cap on tokens generated for one trajectory, discarded (backtracked) ones included. "
        "None: 4x the trajectory's max_tokens. Bounds the work of retries x tool calls x max_tokens.",
    )
    repetition: RepetitionConfig | None = Field(
        default=None,
        description="None: off. Otherwise end a looping trajectory early with finish_reason 'repetition' "
        "(its text kept) instead of letting it run to max_tokens.",
    )
    not_executed_message: str = Field(
        default="Code execution is not available any more (the tool budget is spent): answer from what you have.",
        description="Observation injected after a complete code block that may not run (tool budget spent, "
        "or the answer after a thinking cut): the model never gets to invent an output.",
    )


class SamplingOptions(_Strict):
    """Sampling parameters carried through to every generation request of a trajectory."""

    max_tokens: int | None = Field(default=None, ge=1, description="New tokens over the whole trajectory.")
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=-1, ge=-1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description="vLLM's int64 range.")
    stop: tuple[str, ...] = ()
    # vLLM's further sampling fields (neutral defaults = off), passed to every engine request.
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    min_p: float = Field(default=0.0, ge=0, le=1)
    min_tokens: int = Field(default=0, ge=0, description="New tokens before EOS or a stop may end generation.")
    logit_bias: tuple[tuple[int, float], ...] = Field(
        default=(), description="(token id, bias) pairs; a bias is clamped to [-100, 100] as vLLM does."
    )
    stop_token_ids: tuple[int, ...] = Field(default=(), description="Token ids that end generation like EOS.")
    ignore_eos: bool = False
    skip_special_tokens: bool = Field(default=True, description="Leave special tokens out of the output text.")
    include_stop_str_in_output: bool = Field(
        default=False, description="Keep the user stop string that ended the trajectory in its text (vLLM's option)."
    )
    logprobs: bool = Field(
        default=False,
        description="record the sampled token's log-probability for each generated token (RL): Final.trajectory's "
        "segments then carry a 'logprobs' list aligned with their token_ids (None where the model did not sample "
        "the token).",
    )


#: THOR's tool budget for RL rollouts (../shared/DESIGN.md section 2: 10 at inference, 5 in RL).
RL_MAX_TOOL_CALLS = 5

#: The observation profile of every training stage, the one setting TIRGen's critic (trainer/tirgen) and RL's
#: rollouts (`rl_rollout_config`, `rl_step_config`) both read: THOR's reference rules (a call that prints nothing
#: failed; no notebook echo of a trailing expression), so cold-start data never shows a block as run that RL
#: would count as failed.
TRAINING_OBSERVATION_PROFILE: Literal["notebook", "reference"] = "reference"


def training_observation() -> ObservationConfig:
    """The observation rules of training data and rollouts (`TRAINING_OBSERVATION_PROFILE`, other fields default)."""
    return ObservationConfig(profile=TRAINING_OBSERVATION_PROFILE)


def rl_rollout_config(max_tool_calls: int = RL_MAX_TOOL_CALLS) -> ThorConfig:
    """Trajectory-level RL rollouts with THOR's reference settings (../shared/DESIGN.md section 2).

    The training observation rules (`training_observation`: the reference profile, success
    iff exit code 0 and stdout non-empty, no notebook echo; TIRGen's critic reads the same), at most `max_tool_calls` executions (reference: 5 in RL), self-correction
    off (rollouts are sampled as the policy writes them), and the trajectory ends at its first
    committed failed call (`stop_on_tool_error`: such rollouts are filtered out of training and
    feed the step level instead).
    """
    return ThorConfig(
        max_tool_calls=max_tool_calls,
        stop_on_tool_error=True,
        observation=training_observation(),
        self_correction=SelfCorrectionConfig(enabled=False),
    )


def rl_step_config(max_tool_calls: int = RL_MAX_TOOL_CALLS) -> ThorConfig:
    """Step-level RL continuations (../shared/DESIGN.md section 2): `rl_rollout_config` plus
    `stop_after_execution`.

    The reference trains failed code steps by cutting the trajectory before the failed block
    (100 more tokens dropped) and sampling continuations that stop once their first code block
    has executed, without its output; the reward is whether that block ran (the same success
    rule as serving). The trajectory then ends with finish_reason `tool_executed`.
    """
    return rl_rollout_config(max_tool_calls).model_copy(update={"stop_after_execution": True})
