"""The RL learner: a Hugging Face causal LM trained with the hierarchical-GRPO loss under `accelerate`.

Owns: `Learner`: loading the starting checkpoint (fp32 by default, tied embeddings untied
at load because vLLM's in-place weight reload keeps a stale tied head; optional peft LoRA),
per-token log-probabilities of rollout records (batched, right-padded, only the response
positions' logits computed, the float32 log-softmax over the vocabulary `optim.logprob_chunk`
positions at a time and recomputed in the backward pass), the update (old log-probs recomputed first, then `epochs` passes
of shuffled mini-batches, each split over the processes and into micro-batches with gradient
accumulation, loss normalised by the mini-batch's global trained-token count, grad clip,
AdamW step), the weights vLLM reloads (`save_weights`: LoRA merged, untied, Hugging Face
names, one safetensors file), a servable export, resumable state (accelerate's
save_state/load_state), `probe_logprobs` for the post-sync probe, and the gap between the
rollouts' sampled log-probs and its old ones on the trained tokens (`logprob_gap`, bounded by
`update(max_logprob_gap=...)`: `OffPolicyError` before any step).

The same code runs on CPU, one GPU and under `accelerate launch` (DDP; tested with 2 CPU
processes, see tests/test_rl_learner.py). Every process gets the same records (the caller
broadcasts them) and takes its own slice of each mini-batch; every process runs the same
number of forward/backward passes (a process without a record for a micro-batch runs a
zero-weight pass), which DDP needs for its one synchronised backward per mini-batch and
FSDP/ZeRO-3 need because every forward gathers parameters. Under DDP (and FSDP, ZeRO),
gradients are averaged over processes, so each process's loss is scaled by the process
count: the step equals the single-process step on the whole mini-batch.

The model stays in eval mode (no dropout; LoRA dropout 0): the first mini-batch's ratio is
exactly 1 up to float rounding, as PPO expects.

Does not own: the loss (loss.py), records (records.py), settings (config.py), rollouts,
weight sync into vLLM and the probe's comparison (the runner), the command line.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.sft.export import TOKENIZER_FILES

from .loss import ADDITIVE_STATS, policy_loss

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from .config import LossConfig, ModelConfig, OptimConfig
    from .records import RolloutRecord

__all__ = ["WEIGHTS_FILE", "Learner", "LearnerError", "OffPolicyError"]

#: The file `save_weights` writes (vLLM's reload reads every *.safetensors of the directory).
WEIGHTS_FILE = "model.safetensors"
_PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"


class LearnerError(RuntimeError):
    """The learner cannot load, train on or save what it was given; the message names the fix."""


class OffPolicyError(LearnerError):
    """The rollouts' sampled log-probs are far from the learner's: the sampler did not run this policy."""


@dataclass
class _Batch:
    """A right-padded micro-batch and where each response token's log-prob comes from."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    keep: int  # logits of the last `keep` positions are computed
    gather: torch.Tensor  # [B, R]: index into the kept logits of the logit predicting response token j
    targets: torch.Tensor  # [B, R]: response token ids (0 where padded)
    mask: torch.Tensor  # [B, R]: the records' response_mask, 0 where padded
    lengths: list[int]  # response lengths


class _Counters:
    """What resume needs besides weights and optimizer: registered with accelerate's checkpointing."""

    def __init__(self, model_path: str, lora: bool) -> None:
        self.update_calls = 0
        self.optimizer_steps = 0
        self.model_path = model_path
        self.lora = lora

    def state_dict(self) -> dict[str, Any]:
        return {
            "update_calls": self.update_calls,
            "optimizer_steps": self.optimizer_steps,
            "model_path": self.model_path,
            "lora": self.lora,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if bool(sd.get("lora")) != self.lora:
            raise LearnerError(
                f"the saved learner state {'has' if sd.get('lora') else 'has no'} LoRA adapter but this learner "
                f"{'has' if self.lora else 'has not'}: resume with the same model.lora setting"
            )
        self.update_calls = int(sd["update_calls"])
        self.optimizer_steps = int(sd["optimizer_steps"])


def _split(items: list[int], k: int) -> list[list[int]]:
    """*items* in *k* consecutive chunks whose sizes differ by at most one (some empty when k > len)."""
    base, extra = divmod(len(items), k)
    out, s = [], 0
    for i in range(k):
        n = base + (1 if i < extra else 0)
        out.append(items[s : s + n])
        s += n
    return out


def _chunk_logprobs(logits: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, t: float) -> torch.Tensor:
    """Log-probs ``[B, C]`` of *targets* at kept-logit positions *idx* ``[B, C]``, in float32, at temperature *t*."""
    import torch

    sel = torch.gather(logits, 1, idx[..., None].expand(-1, -1, logits.shape[-1])).float()
    if t != 1.0:
        sel = sel / t
    return torch.gather(sel, -1, targets[..., None]).squeeze(-1) - torch.logsumexp(sel, dim=-1)


class Learner:
    """The policy being trained; see the module docstring. One Learner per `Accelerator`.

    *accelerator*: the run's `accelerate.Accelerator` (None: a new one, CPU when no GPU is
    visible). *seed*: LoRA initialisation and the mini-batch shuffles (the same on every
    process). *temperature*: the sampling temperature of the rollouts; logits are divided by
    it before the log-softmax so the learner's log-probs are those of the sampling distribution.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim_cfg: OptimConfig,
        loss_cfg: LossConfig,
        accelerator: Accelerator | None = None,
        seed: int = 0,
        *,
        temperature: float = 1.0,
    ) -> None:
        import torch
        from accelerate import Accelerator

        from trainer.sft.base_model import load_base_model

        if temperature <= 0:
            raise LearnerError(f"temperature must be > 0 (the rollouts' sampling temperature), got {temperature}")
        self.model_cfg, self.optim_cfg, self.loss_cfg = model_cfg, optim_cfg, loss_cfg
        self.seed, self.temperature = seed, float(temperature)
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.source = Path(model_cfg.path)
        if not (self.source / "config.json").is_file():
            raise LearnerError(
                f"model.path {self.source}: no config.json there; give a Hugging Face checkpoint directory "
                "(an SFT run's final/, or a provisioned model)"
            )
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[model_cfg.dtype]
        model, self.was_tied = load_base_model(self.source, dtype=dtype)
        model.config.use_cache = False
        if model_cfg.lora:
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(
                r=model_cfg.lora_r,
                lora_alpha=model_cfg.lora_alpha,
                lora_dropout=0.0,  # dropout would make old and new log-probs differ at ratio 1
                target_modules=model_cfg.lora_target,
                task_type="CAUSAL_LM",
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = get_peft_model(model, lcfg)
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise LearnerError(f"{self.source}: the model has no trainable parameters")
        optimizer = torch.optim.AdamW(
            params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model.eval()
        self._counters = _Counters(str(self.source), model_cfg.lora)
        self.accelerator.register_for_checkpointing(self._counters)
        dist = str(self.accelerator.distributed_type)
        self._collective_forward = "FSDP" in dist or "DEEPSPEED" in dist

    # ------------------------------------------------------------------ basics

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model without the DDP/FSDP wrapper (a peft model with LoRA)."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def base_model(self) -> torch.nn.Module:
        """The Hugging Face model (inside the peft wrapper with LoRA)."""
        m = self.unwrapped
        return m.get_base_model() if self.model_cfg.lora else m

    @property
    def optimizer_steps(self) -> int:
        return self._counters.optimizer_steps

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ log-probs

    def _build(self, pairs: list[tuple[list[int], list[int], list[int]]]) -> _Batch:
        """Right-pad (prompt, response, mask) triples into one batch."""
        import torch

        for prompt, response, _ in pairs:
            if not prompt:
                raise LearnerError("a record has no prompt_ids: the first response token needs a context to score")
            if not response:
                raise LearnerError("internal: an empty response reached a forward pass")
        lens = [len(p) + len(r) for p, r, _ in pairs]
        width, rmax = max(lens), max(len(r) for _, r, _ in pairs)
        min_prompt = min(len(p) for p, _, _ in pairs)
        keep = width - (min_prompt - 1)
        pad = 0
        n = len(pairs)
        ids = torch.full((n, width), pad, dtype=torch.long)
        att = torch.zeros((n, width), dtype=torch.long)
        gather = torch.zeros((n, rmax), dtype=torch.long)
        targets = torch.zeros((n, rmax), dtype=torch.long)
        mask = torch.zeros((n, rmax), dtype=torch.float32)
        for i, (p, r, m) in enumerate(pairs):
            ids[i, : lens[i]] = torch.tensor(p + r, dtype=torch.long)
            att[i, : lens[i]] = 1
            # response token j sits at position len(p) + j; the logit predicting it at len(p) + j - 1,
            # which is index len(p) - min_prompt + j among the kept logits
            gather[i, : len(r)] = torch.arange(len(r)) + (len(p) - min_prompt)
            targets[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = torch.tensor(m, dtype=torch.float32)
        pos = torch.arange(width, dtype=torch.long).expand(n, width).clone()
        dev = self.accelerator.device
        return _Batch(
            ids.to(dev), att.to(dev), pos.to(dev), keep, gather.to(dev), targets.to(dev), mask.to(dev),
            [len(r) for _, r, _ in pairs],
        )  # fmt: skip

    def _forward(self, model: torch.nn.Module, b: _Batch, temperature: float | None = None) -> torch.Tensor:
        """Log-probs ``[B, R]`` (float32) of the response tokens under *model*, of the distribution at
        *temperature* (None: the learner's); grad as the caller enables it."""
        import torch

        out = model(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            position_ids=b.position_ids,
            use_cache=False,
            logits_to_keep=b.keep,
        )
        logits = out.logits
        t = self.temperature if temperature is None else temperature
        chunk = self.optim_cfg.logprob_chunk
        grad = torch.is_grad_enabled() and logits.requires_grad
        parts = []
        for s in range(0, b.gather.shape[1], chunk):
            idx, tgt = b.gather[:, s : s + chunk], b.targets[:, s : s + chunk]
            if grad:  # the chunk's float32 [B, chunk, V] is recomputed in the backward pass, not kept
                from torch.utils.checkpoint import checkpoint

                parts.append(checkpoint(_chunk_logprobs, logits, idx, tgt, t, use_reentrant=False))
            else:
                parts.append(_chunk_logprobs(logits, idx, tgt, t))
        return torch.cat(parts, dim=1)

    def _logprobs_of(
        self,
        pairs: list[tuple[list[int], list[int], list[int]]],
        calls: int | None = None,
        temperature: float | None = None,
    ) -> list:
        """Per-pair log-prob lists (no grad), in micro-batches sorted by length; *calls* pads the forward count."""
        import torch

        micro = self.optim_cfg.micro_batch_size
        order = sorted((i for i, (_, r, _) in enumerate(pairs) if r), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        chunks = [order[s : s + micro] for s in range(0, len(order), micro)]
        out: list[list[float]] = [[] for _ in pairs]
        model = self.unwrapped
        with torch.no_grad():
            for chunk in chunks:
                lp = self._forward(model, self._build([pairs[i] for i in chunk]), temperature).cpu()
                for row, i in enumerate(chunk):
                    out[i] = lp[row, : len(pairs[i][1])].tolist()
            for _ in range(len(chunks), calls or 0):  # collective forwards (FSDP/ZeRO-3) need equal counts
                self._forward(model, self._build([self._dummy]))
        return out

    @property
    def _dummy(self) -> tuple[list[int], list[int], list[int]]:
        return ([0], [0], [0])

    def logprobs(self, records: list[RolloutRecord]) -> list[list[float]]:
        """Each record's per-response-token log-prob of ``prompt_ids + response_ids`` under the current policy.

        One float per response token (tool-output tokens included; the mask is not applied), [] for an
        empty response. No grad. Every process computes all records (call it on every process under
        FSDP/ZeRO-3, with the same records)."""
        return self._logprobs_of([(r.prompt_ids, r.response_ids, r.response_mask) for r in records])

    def sequence_logprobs(self, token_ids: list[int], start: int, *, temperature: float | None = None) -> list[float]:
        """Log-probs of ``token_ids[start:]``, each given the tokens before it, at *temperature* (None: the
        learner's)."""
        if not 1 <= start < len(token_ids):
            raise LearnerError(
                f"start must be in [1, {len(token_ids) - 1}] for {len(token_ids)} tokens (the first scored "
                f"token needs a context), got {start}"
            )
        resp = list(token_ids[start:])
        return self._logprobs_of([(list(token_ids[:start]), resp, [1] * len(resp))], temperature=temperature)[0]

    def probe_logprobs(self, token_ids: list[int], start: int) -> list[float]:
        """What vLLM's prompt log-probs of the same tokens are (the post-sync probe): those of the raw
        distribution (temperature 1), whatever the sampling temperature and vLLM's logprobs_mode."""
        return self.sequence_logprobs(token_ids, start, temperature=1.0)

    # ------------------------------------------------------------------ the update

    def _plan(self, n: int) -> list[tuple[list[int], list[list[list[int]]]]]:
        """Mini-batches of record indices, each with, per process, its micro-batches (same count on all)."""
        procs = self.accelerator.num_processes
        mb, micro = self.optim_cfg.mini_batch_size, self.optim_cfg.micro_batch_size
        plan = []
        for epoch in range(self.optim_cfg.epochs):
            order = list(range(n))
            # str seeds are hashed with sha512: the same shuffle on every process and after a resume
            random.Random(f"{self.seed}/{self._counters.update_calls}/{epoch}").shuffle(order)
            for s in range(0, n, mb):
                idx = order[s : s + mb]
                slices = [idx[p::procs] for p in range(procs)]
                k = max(1, math.ceil(max(len(sl) for sl in slices) / micro))
                plan.append((idx, [_split(sl, k) for sl in slices]))
        return plan

    def update(self, records: list[RolloutRecord], *, max_logprob_gap: float | None = None) -> dict[str, float]:
        """Train on *records* (advantages already set); returns stats averaged over the optimizer steps.

        Records with no trained token (response mask all 0) are skipped. Call it on every process
        with the same records. Stats: ``loss``, ``pg_loss``, ``nll``, ``clip_frac_high``,
        ``clip_frac_low``, ``dual_clip_frac``, ``approx_kl``, ``ratio_mean``, ``grad_norm`` (before
        clipping) and ``tokens`` (trained tokens per step): means over steps; ``ratio_max`` and
        ``grad_norm_max``: maxima; ``updates`` (optimizer steps), ``records`` (trained on),
        ``skipped``, ``seconds``; ``logprob_gap`` and ``logprob_gap_max``: mean and max of |the
        sampler's log-prob (``response_logprobs``) - the learner's old log-prob| over the trained
        tokens of records that carry sampled log-probs (NaN when none does).

        *max_logprob_gap*: raise `OffPolicyError`, before any step, when ``logprob_gap`` exceeds it
        (the rollouts were not sampled from this policy: a stale engine, another temperature or
        logprobs_mode)."""
        import torch

        t0 = time.monotonic()
        acc = self.accelerator
        train = [r for r in records if any(r.response_mask)]
        if not train:
            raise LearnerError(
                f"update() got {len(records)} records and none has a trained token (all response masks are 0): "
                "nothing to train on; skip the update for this batch"
            )
        for r in train:
            if not math.isfinite(r.advantage):
                raise LearnerError(f"record of group {r.group!r} has advantage {r.advantage}; set finite advantages")
        procs, rank = acc.num_processes, acc.process_index
        plan = self._plan(len(train))

        # old log-probs: the learner's own, before any step, for the records this process will see
        needed_by = [sorted({i for _, per in plan for c in per[p] for i in c}) for p in range(procs)]
        micro = self.optim_cfg.micro_batch_size
        calls = max(math.ceil(len(x) / micro) for x in needed_by) if self._collective_forward else None
        mine = needed_by[rank]
        old_lists = self._logprobs_of(
            [(train[i].prompt_ids, train[i].response_ids, train[i].response_mask) for i in mine], calls
        )
        old = dict(zip(mine, old_lists, strict=True))
        owner: dict[int, int] = {}  # each record counted once across processes
        for p, idx in enumerate(needed_by):
            for i in idx:
                owner.setdefault(i, p)
        gap = self._logprob_gap(train, {i: v for i, v in old.items() if owner[i] == rank})
        if max_logprob_gap is not None and gap[0] > max_logprob_gap:
            raise OffPolicyError(
                f"the rollouts' sampled log-probs differ from the learner's by {gap[0]:.4f} on average (max "
                f"{gap[1]:.4f}) over the trained tokens, above the tolerance {max_logprob_gap}: the sampler is not "
                "running the learner's policy (stale weights after a sync? another temperature, or a vLLM "
                "logprobs_mode other than processed_logprobs? top_p < 1 renormalises vLLM's log-probs over the "
                "nucleus); nothing was trained"
            )

        trainable = self._trainable()
        steps: list[dict[str, float]] = []
        for idx, per in plan:
            expected = sum(train[i].trained_tokens for i in idx)
            local = sum(train[i].trained_tokens for c in per[rank] for i in c)
            total = int(acc.reduce(torch.tensor([float(local)], device=acc.device), "sum").item())
            if total != expected:
                raise LearnerError(
                    f"the processes hold different records ({total} trained tokens in a mini-batch across processes, "
                    f"{expected} expected): broadcast the batch from the main process before update()"
                )
            sums: dict[str, float] = defaultdict(float)
            rmax = 0.0
            chunks = per[rank]
            for j, chunk in enumerate(chunks):
                sync = j == len(chunks) - 1
                with nullcontext() if sync else acc.no_sync(self.model):
                    if chunk:
                        recs = [train[i] for i in chunk]
                        b = self._build([(r.prompt_ids, r.response_ids, r.response_mask) for r in recs])
                        old_t = torch.zeros_like(b.mask)
                        for row, i in enumerate(chunk):
                            old_t[row, : b.lengths[row]] = torch.tensor(old[i], dtype=old_t.dtype)
                        adv = torch.tensor([r.advantage for r in recs], dtype=torch.float32, device=acc.device)
                        mask = b.mask
                    else:  # no record for this micro-batch here: a zero-weight pass keeps the processes in step
                        b = self._build([self._dummy])
                        old_t = torch.zeros_like(b.mask)
                        adv = torch.zeros(1, device=acc.device)
                        mask = torch.zeros_like(b.mask)
                    logp = self._forward(self.model, b)
                    loss, st = policy_loss(logp, old_t, adv, mask, self.loss_cfg, float(total))
                    # DDP/FSDP average gradients over processes: scale back up to the sum
                    acc.backward(loss * procs)
                for k in ADDITIVE_STATS:
                    sums[k] += st[k]
                rmax = max(rmax, st["ratio_max"])
            grad_norm = acc.clip_grad_norm_(trainable, self.optim_cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._counters.optimizer_steps += 1
            vec = acc.reduce(torch.tensor([sums[k] for k in ADDITIVE_STATS], device=acc.device), "sum").cpu()
            step = {k: float(v) for k, v in zip(ADDITIVE_STATS, vec.tolist(), strict=True)}
            step["ratio_max"] = float(acc.gather(torch.tensor([rmax], device=acc.device)).max())
            step["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            step["tokens"] = float(total)
            steps.append(step)
        self._counters.update_calls += 1

        stats = {k: sum(s[k] for s in steps) / len(steps) for k in (*ADDITIVE_STATS, "grad_norm", "tokens")}
        stats["ratio_max"] = max(s["ratio_max"] for s in steps)
        stats["grad_norm_max"] = max(s["grad_norm"] for s in steps)
        stats["updates"] = float(len(steps))
        stats["records"] = float(len(train))
        stats["skipped"] = float(len(records) - len(train))
        stats["logprob_gap"], stats["logprob_gap_max"] = gap
        stats["seconds"] = time.monotonic() - t0
        return stats

    def _logprob_gap(self, train: list[RolloutRecord], old: dict[int, list[float]]) -> tuple[float, float]:
        """(mean, max) |sampled - old| log-prob over trained tokens with a sampled value, over all processes."""
        import torch

        acc = self.accelerator
        total, count, worst = 0.0, 0, 0.0
        for i, lps in old.items():
            sampled = train[i].response_logprobs
            if sampled is None:
                continue
            for a, b, m in zip(sampled, lps, train[i].response_mask, strict=True):
                if m:
                    d = abs(a - b)
                    total, count, worst = total + d, count + 1, max(worst, d)
        summed = acc.reduce(torch.tensor([total, float(count)], dtype=torch.float64, device=acc.device), "sum")
        worst = float(acc.gather(torch.tensor([worst], device=acc.device)).max())
        total, n = (float(x) for x in summed.tolist())
        return (total / n, worst) if n else (float("nan"), float("nan"))

    # ------------------------------------------------------------------ weights out

    def state_dict_merged(self) -> dict[str, torch.Tensor] | None:
        """The current weights with Hugging Face names (LoRA merged), on the CPU; None off the main process.

        Gathers the full state dict (a collective under FSDP/ZeRO-3: call it on every process)."""
        import torch

        sd = self.accelerator.get_state_dict(self.model)
        if not self.accelerator.is_main_process:
            return None
        sd = {k.removeprefix(_PEFT_PREFIX) if self.model_cfg.lora else k: v for k, v in sd.items()}
        if self.model_cfg.lora:
            from peft.tuners.lora import LoraLayer

            merged: dict[str, torch.Tensor] = {}
            for name, mod in self.base_model.named_modules():
                if not isinstance(mod, LoraLayer):
                    continue
                a, b = (
                    sd.pop(f"{name}.lora_A.{_ADAPTER}.weight", None),
                    sd.pop(f"{name}.lora_B.{_ADAPTER}.weight", None),
                )
                w = sd.pop(f"{name}.base_layer.weight", None)
                if a is None or b is None or w is None:
                    raise LearnerError(
                        f"LoRA layer {name} is not a plain linear adapter (embedding/conv/DoRA adapters are not "
                        "supported): set model.lora_target to linear layers"
                    )
                scale = float(mod.scaling[_ADAPTER])
                if getattr(mod, "fan_in_fan_out", False):  # W is stored transposed: W + s (BA)^T = W + s A^T B^T
                    b, a = a.T, b.T
                # one fused pass (W + s B A): the merge is most of save_weights' time with LoRA
                merged[f"{name}.weight"] = torch.addmm(w.float(), b.float(), a.float(), alpha=scale).to(w.dtype)
            for k in list(sd):
                if "lora_" in k:
                    raise LearnerError(f"state dict entry {k} was not merged: unsupported LoRA layer type")
                if ".base_layer." in k:
                    sd[k.replace(".base_layer.", ".")] = sd.pop(k)
            sd.update(merged)
        out = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
        if "lm_head.weight" in out and "model.embed_tokens.weight" in out:
            if out["lm_head.weight"].data_ptr() == out["model.embed_tokens.weight"].data_ptr():
                out["lm_head.weight"] = out["lm_head.weight"].clone()  # never write a shared (tied) tensor
        return out

    def _config(self, dtype: torch.dtype) -> Any:
        import copy

        cfg = copy.deepcopy(self.base_model.config)
        cfg.tie_word_embeddings = False
        cfg.use_cache = True
        cfg.dtype = dtype
        return cfg

    def save_weights(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the current weights for ``collective_rpc("reload_weights", kwargs={"weights_path": dir})``.

        One ``model.safetensors`` (Hugging Face parameter names, LoRA merged, ``lm_head.weight`` its own
        tensor) plus the untied ``config.json``, replaced atomically; *dtype*: default the learner's.
        Only the main process writes (under FSDP/ZeRO-3 call it on every process: the gather is
        collective). Returns the directory on every process."""
        from safetensors.torch import save_file

        d = Path(directory)
        sd = self.state_dict_merged()
        if sd is None:
            return d
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{WEIGHTS_FILE}.tmp"
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, d / WEIGHTS_FILE)
        self._config(next(iter(sd.values())).dtype).to_json_file(str(d / "config.json"))
        return d

    def export(
        self, directory: str | Path, dtype: str = "auto", extra_files: dict[str, str] | None = None
    ) -> Path | None:
        """A servable checkpoint in *directory* (replaced atomically): merged, untied weights, config,
        the starting checkpoint's tokenizer files, chat template and generation_config, plus *extra_files*
        (name -> text: a model card, thor_training.json). *dtype*: ``auto`` (the starting checkpoint's),
        ``bfloat16``, ``float16`` or ``float32``. Call on every process; the main process writes and gets
        the path, the others None."""
        import torch

        from thor_engine.models.provision import publish_dir
        from trainer.sft.export import check_untied

        if dtype == "auto":
            src = json.loads((self.source / "config.json").read_text())
            dtype = str(src.get("dtype") or src.get("torch_dtype") or "bfloat16").removeprefix("torch.")
        tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
        if tdtype is None:
            raise LearnerError(f"export dtype {dtype!r}: expected auto, bfloat16, float16 or float32")
        tok_files = [n for n in TOKENIZER_FILES if (self.source / n).is_file()]
        if not any(n in tok_files for n in ("tokenizer.json", "tokenizer_config.json")):
            raise LearnerError(
                f"{self.source} has no tokenizer files: the export would not be servable; start from a checkpoint "
                "that carries its tokenizer (copy tokenizer.json, tokenizer_config.json and the chat template in)"
            )
        sd = self.state_dict_merged()
        if sd is None:
            return None
        from safetensors.torch import save_file

        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            save_file({k: v.to(tdtype) for k, v in sd.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            self._config(tdtype).to_json_file(str(tmp / "config.json"))
            for n in (*tok_files, "generation_config.json"):
                if (self.source / n).is_file():
                    shutil.copyfile(self.source / n, tmp / n)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            check_untied(tmp)
            publish_dir(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return out

    # ------------------------------------------------------------------ resume

    def save_state(self, directory: str | Path) -> Path:
        """Weights (adapter and base with LoRA), optimizer, RNG states and the update counters (call on every
        process: accelerate's save_state)."""
        d = Path(directory)
        self.accelerator.save_state(str(d))
        return d

    def load_state(self, directory: str | Path) -> None:
        """Restore what `save_state` wrote into this learner (built with the same model and LoRA settings)."""
        d = Path(directory)
        if not d.is_dir():
            raise LearnerError(f"learner state {d} does not exist; pass a directory written by save_state")
        self.accelerator.load_state(str(d))
