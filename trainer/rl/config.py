"""The one typed configuration of `python -m trainer.rl`: a YAML file plus flag overrides.

Owns: every setting of a hierarchical-RL run, grouped by what it controls (model,
problems, trajectory-level rollouts, step-level rollouts, the loss, the optimiser,
the schedule of steps/checkpoints/evaluations, the engine and sandbox), with THOR's
reference values as defaults (group size 16, at most 5 tool calls, temperature 1.0,
asymmetric clip 0.2/0.28, dual-clip 3.0, 0.01 x NLL on positive-advantage tokens, no
KL, AdamW lr 1e-6, grad clip 1.0), validation with errors that name the field, and
loading/saving (the run directory keeps the resolved config; resume refuses a changed one).

Does not own: what the settings do (rollout.py, loss.py, learner.py, runner.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "EngineConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ProblemsConfig",
    "RlConfig",
    "RlConfigError",
    "ScheduleConfig",
    "StepLevelConfig",
    "TrajectoryConfig",
    "load_config",
]


class RlConfigError(ValueError):
    """A configuration file or flag that cannot be used; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Section):
    path: str = Field(description="Hugging Face checkpoint to start from (an SFT output's final/, or any model dir)")
    lora: bool = Field(default=False, description="train a LoRA adapter (merged into the weights vLLM and exports get)")
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_target: list[str] | str = "all-linear"
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="the learner's parameter dtype (float32 on CPU); bfloat16 only with lora (the adapter and "
        "its optimizer stay float32)",
    )

    @model_validator(mode="after")
    def _no_bf16_full_fine_tuning(self) -> ModelConfig:
        if self.dtype == "bfloat16" and not self.lora:
            raise ValueError(
                "dtype bfloat16 with full fine-tuning: AdamW's steps on bfloat16 weights round away (at lr 1e-6 "
                "about 98% of the weights never change), so the run would silently train nothing. Use dtype: "
                "float32 (float32 master weights; vLLM can still sample in bfloat16, engine.dtype), or lora: true "
                "(a bfloat16 base with a float32 adapter)"
            )
        return self


class ProblemsConfig(_Section):
    path: str = Field(
        description="training problems: a JSONL file with a problem and a gold answer per line, or a benchmark name "
        "of trainer.evaluate (gsm8k rows 200-499 are the training split: offset 200)"
    )
    offset: int = Field(default=0, ge=0)
    limit: int | None = Field(default=None, ge=1)
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str = "id"
    allow_eval_problems: bool = Field(
        default=False, description="train on problems of a held-out evaluation split (trainer/splits.py)"
    )


class TrajectoryConfig(_Section):
    """Trajectory-level GRPO: whole rollouts, reward 1 for a right boxed answer."""

    group_size: int = Field(default=16, ge=2)
    groups_per_step: int = Field(default=8, ge=1, description="kept trajectory groups a batch needs")
    temperature: float = Field(default=1.0, gt=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=2048, ge=16, description="new tokens per trajectory")
    max_tool_calls: int = Field(default=5, ge=1)
    min_response_tokens: int = Field(default=8, ge=0, description="shorter rollouts are dropped")
    boxed_tail_chars: int = Field(
        default=200, ge=1, description="a kept rollout has a non-empty \\boxed{} within its last N characters"
    )
    min_survivor_fraction: float = Field(
        default=0.5, ge=0, le=1, description="a group with fewer kept rollouts than this fraction is dropped"
    )
    format_reward: float | None = Field(
        default=None, description="reward of a rollout without a boxed answer instead of dropping it (e.g. -0.5)"
    )
    max_rounds: int = Field(
        default=4, ge=1, description="dynamic sampling: sampling rounds per step before training on what is kept"
    )


class StepLevelConfig(_Section):
    """Step-level GRPO: regenerate a failed code step, reward 1 when the new block runs."""

    enabled: bool = True
    group_size: int = Field(default=16, ge=2)
    max_groups_per_step: int = Field(default=8, ge=0, description="step groups created per step at most")
    backtrack_tokens: int = Field(default=100, ge=0, description="tokens dropped before the failed block's fence")
    max_tokens: int = Field(default=512, ge=16, description="new tokens per regeneration")
    use_random_code_rollout: bool = Field(
        default=True, description="when no rollout failed, cut a random rollout that has code"
    )


class LossConfig(_Section):
    clip_low: float = Field(default=0.2, ge=0)
    clip_high: float = Field(default=0.28, ge=0)
    dual_clip: float | None = Field(default=3.0, gt=1, description="dual-clip bound for negative advantages")
    nll_coef: float = Field(default=0.01, ge=0, description="x NLL on tokens with positive advantage")
    adv_eps: float = Field(default=1e-6, gt=0)


class OptimConfig(_Section):
    lr: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(default=1.0, gt=0)
    mini_batch_size: int = Field(default=64, ge=1, description="samples per optimiser update (across processes)")
    micro_batch_size: int = Field(default=8, ge=1, description="samples per forward/backward on one process")
    epochs: int = Field(default=1, ge=1, description="passes over a rollout batch")
    logprob_chunk: int = Field(
        default=512,
        ge=1,
        description="response positions whose full-vocabulary float32 log-softmax exists at once (memory: "
        "micro_batch_size x logprob_chunk x vocab x 4 bytes, recomputed in the backward pass)",
    )


class EvalConfig(_Section):
    every: int = Field(default=0, ge=0, description="evaluate every N steps (0: only before and after)")
    benchmarks: str | None = Field(default=None, description="trainer.evaluate --benchmarks (empty: no evaluation)")
    problem_field: str | None = None
    answer_field: str | None = None
    id_field: str | None = None
    limit: int | None = Field(default=None, ge=1)
    modes: str = "thor-rl"
    max_tokens: int = Field(default=2048, ge=16)
    concurrency: int = Field(default=8, ge=1)
    allow_train_overlap: bool = Field(
        default=False, description="score evaluation problems the checkpoints are trained on (refused otherwise)"
    )


class ScheduleConfig(_Section):
    steps: int = Field(default=100, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(default=10, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_rollouts: bool = Field(default=True, description="keep every step's rollout records as JSONL")


class EngineConfig(_Section):
    max_model_len: int | None = None
    max_num_seqs: int | None = Field(default=None, ge=1)
    dtype: str = "auto"
    enforce_eager: bool = True
    sandbox_url: str | None = Field(default=None, description="a running sandbox; default: start a local pool")
    sandbox_pool: int = Field(default=4, ge=1)
    concurrency: int = Field(default=64, ge=1, description="rollouts in flight at once (vLLM batches them)")
    gpu_memory_utilization: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="vLLM's share of the GPU's memory; the learner (weights, optimizer, activations) shares the "
        "same GPU (no effect on CPU)",
    )
    probe_tolerance: float = Field(
        default=0.05,
        gt=0,
        description="max mean |vLLM - learner| log-prob gap on the probe sequence after a sync (float32: ~1e-6; "
        "bfloat16 inference against a float32 learner: ~0.03)",
    )
    probe_change_tolerance: float = Field(
        default=0.5,
        gt=0,
        description="after a sync, vLLM's probe log-probs must have moved since the first probe as the learner's "
        "did: mean |vLLM change - learner change| at most this x the learner's mean change (sync.py)",
    )
    rollout_logprob_tolerance: float | None = Field(
        default=0.1,
        gt=0,
        description="max mean |vLLM's sampled log-prob - the learner's old log-prob| over a batch's trained "
        "tokens; above it the update is refused (null: only logged as learner.logprob_gap)",
    )


class RlConfig(_Section):
    model: ModelConfig
    problems: ProblemsConfig
    out: str = Field(description="run directory: checkpoints, metrics, plots, rollouts")
    trajectory: TrajectoryConfig = TrajectoryConfig()
    step: StepLevelConfig = StepLevelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    engine: EngineConfig = EngineConfig()

    @model_validator(mode="after")
    def _batches_fit(self) -> RlConfig:
        if self.optim.micro_batch_size > self.optim.mini_batch_size:
            raise ValueError(
                f"optim.micro_batch_size ({self.optim.micro_batch_size}) exceeds optim.mini_batch_size "
                f"({self.optim.mini_batch_size}); lower micro_batch_size"
            )
        return self

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise RlConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RlConfig:
    """Read a YAML config and apply dotted overrides (`{"trajectory.group_size": 8}`)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RlConfigError(
                f"config file {p} does not exist; pass --config with a YAML file (see trainer/configs/rl/)"
            )
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RlConfigError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise RlConfigError(f"{p} must hold a mapping of sections (model, problems, trajectory, ...)")
    for k, v in (overrides or {}).items():
        _set(tree, k, v)
    try:
        return RlConfig.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "config"
            lines.append(f"  {loc}: {err['msg']}")
        raise RlConfigError("invalid RL configuration:\n" + "\n".join(lines)) from None
