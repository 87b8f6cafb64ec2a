"""The hierarchical-GRPO objective: group advantages and the per-token policy loss (pure torch).

Owns: `group_advantages` (GRPO: each record's reward standardised within its group) and
`policy_loss` (PPO-clip with asymmetric clip range and dual-clip for negative advantages,
as verl's ``compute_policy_loss``, plus ``nll_coef`` x NLL on positive-advantage tokens;
summed over the masked tokens and divided by the caller's token count, so micro-batches and
processes add up to the token-mean of a whole mini-batch). No KL term, no entropy bonus
(THOR's reference settings, ../shared/DESIGN.md section 2).

Why our own and not TRL's: TRL's GRPOTrainer computes its loss inside the trainer's step
(no standalone function to call on our records), and it has no NLL term on positive-advantage
tokens; the dozen lines below are easier to check against verl than an adapter would be.

Does not own: the model, log-probabilities or batching (learner.py), rewards and groups
(rollout.py), the data contract (records.py), the settings (config.py: `LossConfig`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .config import LossConfig
    from .records import RolloutRecord

__all__ = ["ADDITIVE_STATS", "group_advantages", "policy_loss"]

#: Stats of `policy_loss` that add up over micro-batches and processes (each is normalised by
#: the same global ``token_count`` as the loss); ``ratio_max`` is a max, ``tokens`` a raw count.
ADDITIVE_STATS = (
    "loss",
    "pg_loss",
    "nll",
    "clip_frac_high",
    "clip_frac_low",
    "dual_clip_frac",
    "approx_kl",
    "ratio_mean",
)


def group_advantages(records: Iterable[RolloutRecord], eps: float = 1e-6) -> None:
    """Set ``record.advantage = (reward - mean) / (std + eps)`` over the records of each group.

    ``std`` is the unbiased sample standard deviation (Bessel's n - 1), what verl's GRPO
    (``torch.std``) and hence THOR's training computed, so advantages keep THOR's scale.
    A group whose rewards are all equal (including a group of one record, whose sample std is
    undefined) gets advantage 0 everywhere: it carries no learning signal (the rollout filters
    drop such groups anyway). Records of one group may come in any order.
    """
    groups: dict[str, list[RolloutRecord]] = defaultdict(list)
    for r in records:
        groups[r.group].append(r)
    for members in groups.values():
        rewards = [float(r.reward) for r in members]
        for x in rewards:
            if not math.isfinite(x):
                raise ValueError(f"group {members[0].group!r}: reward {x} is not finite; rewards must be numbers")
        n = len(rewards)
        mean = sum(rewards) / n
        if n < 2 or all(x == rewards[0] for x in rewards):
            for r in members:
                r.advantage = 0.0
            continue
        std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / (n - 1))
        for r, x in zip(members, rewards, strict=True):
            r.advantage = (x - mean) / (std + eps)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    token_count: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch and its stats.

    *logp*, *old_logp*, *mask*: ``[batch, tokens]`` (log-probs of the sampled tokens under the
    current policy, with grad, and under the policy that the update started from; mask 1 on
    trained tokens). *advantages*: ``[batch]`` (one per record, broadcast over its tokens) or
    ``[batch, tokens]``. *token_count*: the number of masked tokens of the WHOLE mini-batch
    (every micro-batch on every process), so that summing the losses of all micro-batches gives
    the token-mean over the mini-batch.

    Per token, with ratio ``r = exp(logp - old_logp)`` and advantage ``A``:
    ``pg = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``; for ``A < 0`` with dual-clip
    ``c``, ``pg = min(pg, -A c)``; plus ``nll_coef * (-logp)`` where ``A > 0``.

    Stats (floats): ``loss``, ``pg_loss``, ``nll`` (the NLL term before its coefficient),
    ``clip_frac_high`` (tokens where the upper clip is active: A > 0, r > 1 + clip_high),
    ``clip_frac_low`` (A < 0, r < 1 - clip_low), ``dual_clip_frac`` (A < 0 and the dual-clip
    bound is what counts), ``approx_kl`` (mean of old - new log-prob, verl's ``ppo_kl``) and
    ``ratio_mean``: each summed over this micro-batch's masked tokens and divided by
    *token_count*, i.e. this micro-batch's share of the mini-batch mean (add them up, see
    `ADDITIVE_STATS`); ``ratio_max`` over the masked tokens (0 when none); ``tokens``: this
    micro-batch's masked token count.
    """
    import torch

    if token_count <= 0:
        raise ValueError(f"token_count must be > 0 (the mini-batch's masked tokens), got {token_count}")
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} must match"
        )
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    if advantages.shape != logp.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [batch] or {tuple(logp.shape)}")
    m = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    old = old_logp.detach().to(logp.dtype)

    log_ratio = torch.clamp(logp - old, min=-20.0, max=20.0)  # as verl: no overflow on wild ratios
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    clipped = torch.maximum(pg1, pg2)
    neg = adv < 0
    if cfg.dual_clip is not None:
        pg3 = -adv * cfg.dual_clip
        dual_active = neg & (clipped > pg3)
        pg = torch.where(neg, torch.minimum(clipped, pg3), clipped)
    else:
        dual_active = torch.zeros_like(neg)
        pg = clipped
    pos = (adv > 0).to(logp.dtype)
    nll = -logp * pos

    n = float(token_count)
    pg_sum = (pg * m).sum() / n
    nll_sum = (nll * m).sum() / n
    loss = pg_sum + cfg.nll_coef * nll_sum

    with torch.no_grad():
        mb = m > 0
        stats = {
            "loss": loss.item(),
            "pg_loss": pg_sum.item(),
            "nll": nll_sum.item(),
            "clip_frac_high": float(((adv > 0) & (ratio > 1.0 + cfg.clip_high) & mb).sum()) / n,
            "clip_frac_low": float((neg & (ratio < 1.0 - cfg.clip_low) & mb).sum()) / n,
            "dual_clip_frac": float((dual_active & mb).sum()) / n,
            "approx_kl": float(((old - logp) * m).sum()) / n,
            "ratio_mean": float((ratio * m).sum()) / n,
            "ratio_max": float(ratio[mb].max()) if bool(mb.any()) else 0.0,
            "tokens": float(m.sum()),
        }
    return loss, stats
