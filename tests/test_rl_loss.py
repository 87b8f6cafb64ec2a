"""The RL objective (trainer/rl/loss.py) against values computed by hand.

Owns: GRPO group advantages (unbiased std, eps, zero-variance and one-record groups, mixed
group order) and the per-token policy loss: the PPO ratio inside and outside the asymmetric
clip range on both sides with positive and negative advantages, the dual-clip bound, the
NLL term only on positive-advantage tokens, masked tokens contributing nothing (value and
gradient), the token-mean over a global count (two micro-batches add up to one batch), stats.

Does not own: log-probabilities from a model or the update loop (tests/test_rl_learner.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.rl.config import LossConfig
from trainer.rl.loss import ADDITIVE_STATS, group_advantages, policy_loss
from trainer.rl.records import RolloutRecord

CFG = LossConfig()  # clip 0.2 / 0.28, dual-clip 3.0, nll 0.01: THOR's reference settings


def rec(group: str, reward: float) -> RolloutRecord:
    return RolloutRecord(
        prompt_ids=[1], response_ids=[2], response_mask=[1], reward=reward, group=group, level="trajectory"
    )


# ----------------------------------------------------------------- advantages


def test_group_advantages_unbiased_std_per_group() -> None:
    a = [rec("a", r) for r in (1.0, 0.0, 0.0, 1.0)]
    b = [rec("b", r) for r in (0.0, 1.0)]
    mixed = [a[0], b[0], a[1], a[2], b[1], a[3]]  # groups interleaved
    group_advantages(mixed)
    std_a = math.sqrt(4 * 0.25 / 3)  # unbiased: sum of squares / (n - 1)
    hi, lo = 0.5 / (std_a + 1e-6), -0.5 / (std_a + 1e-6)
    assert [r.advantage for r in a] == pytest.approx([hi, lo, lo, hi])
    std_b = math.sqrt(0.5)
    assert [r.advantage for r in b] == pytest.approx([-0.5 / (std_b + 1e-6), 0.5 / (std_b + 1e-6)])
    # a population std (n) would give 0.5 / 0.5 = 1.0 for group a; the unbiased one less
    assert abs(a[0].advantage) < 0.9


def test_group_advantages_eps_and_uneven_rewards() -> None:
    g = [rec("g", r) for r in (0.0, 0.0, 1.0)]
    group_advantages(g, eps=0.5)
    mean = 1 / 3
    std = math.sqrt(((0 - mean) ** 2 * 2 + (1 - mean) ** 2) / 2)
    assert [r.advantage for r in g] == pytest.approx([-mean / (std + 0.5)] * 2 + [(1 - mean) / (std + 0.5)])
    assert sum(r.advantage for r in g) == pytest.approx(0.0, abs=1e-12)


def test_zero_variance_and_single_record_groups_get_zero() -> None:
    same = [rec("same", 1.0) for _ in range(4)]
    zeros = [rec("zeros", 0.0) for _ in range(3)]
    one = [rec("one", 1.0)]
    for r in (*same, *zeros, *one):
        r.advantage = 7.0  # stale values are overwritten
    group_advantages([*same, *zeros, *one])
    assert all(r.advantage == 0.0 for r in (*same, *zeros, *one))


def test_non_finite_reward_is_named() -> None:
    with pytest.raises(ValueError, match="group 'x': reward nan is not finite"):
        group_advantages([rec("x", float("nan")), rec("x", 1.0)])


# ----------------------------------------------------------------- policy loss

#: one token per case: (advantage, ratio, expected pg term, which clip is active)
CASES = [
    (1.0, 1.1, -1.1, None),  # inside the range, A > 0
    (1.0, 1.5, -1.28, "high"),  # above 1 + 0.28, A > 0: clipped at 1.28
    (1.0, 0.5, -0.5, None),  # below 1 - 0.2 with A > 0: the unclipped (smaller) ratio counts, no clip
    (-1.0, 0.5, 0.8, "low"),  # below 1 - 0.2, A < 0: clipped at 0.8
    (-1.0, 0.9, 0.9, None),  # inside, A < 0
    (-1.0, 1.5, 1.5, None),  # above 1 + 0.28 with A < 0: the unclipped ratio counts (below the dual bound 3)
    (-2.0, 4.0, 6.0, "dual"),  # A < 0, ratio 4 > dual-clip 3: the loss is bounded at -A * 3 = 6 (not 8)
    (2.0, 1.2, -2.4, None),  # the advantage scales the term
]


def case_tensors(cases=CASES):
    adv = torch.tensor([[c[0] for c in cases]], dtype=torch.float64)
    ratio = torch.tensor([[c[1] for c in cases]], dtype=torch.float64)
    old = torch.full_like(ratio, -1.5)
    logp = (old + torch.log(ratio)).requires_grad_(True)
    return logp, old, adv, torch.ones_like(ratio)


def test_clip_and_dual_clip_by_hand() -> None:
    logp, old, adv, mask = case_tensors()
    n = len(CASES)
    loss, stats = policy_loss(logp, old, adv, mask, CFG, token_count=n)
    pg = sum(c[2] for c in CASES) / n
    nll = sum(-(-1.5 + math.log(c[1])) for c in CASES if c[0] > 0) / n
    assert stats["pg_loss"] == pytest.approx(pg)
    assert stats["nll"] == pytest.approx(nll)
    assert loss.item() == pytest.approx(pg + 0.01 * nll) and stats["loss"] == pytest.approx(loss.item())
    assert stats["clip_frac_high"] == pytest.approx(1 / n)
    assert stats["clip_frac_low"] == pytest.approx(1 / n)
    assert stats["dual_clip_frac"] == pytest.approx(1 / n)
    assert stats["ratio_max"] == pytest.approx(4.0) and stats["tokens"] == n
    assert stats["ratio_mean"] == pytest.approx(sum(c[1] for c in CASES) / n)
    assert stats["approx_kl"] == pytest.approx(sum(-math.log(c[1]) for c in CASES) / n)

    # gradients by hand: d(-A r)/d logp = -A r where the unclipped term counts, 0 where a clip
    # (or the dual bound) holds; plus -0.01 from the NLL on A > 0 tokens
    loss.backward()
    want = []
    for a, r, _, clip in CASES:
        g = 0.0 if clip else -a * r
        want.append((g - (0.01 if a > 0 else 0.0)) / n)
    torch.testing.assert_close(logp.grad, torch.tensor([want], dtype=torch.float64))


def test_without_dual_clip_the_negative_side_is_unbounded() -> None:
    logp, old, adv, mask = case_tensors([(-2.0, 4.0, 8.0, None)])
    _, stats = policy_loss(logp, old, adv, mask, CFG.model_copy(update={"dual_clip": None}), token_count=1)
    assert stats["pg_loss"] == pytest.approx(8.0) and stats["dual_clip_frac"] == 0.0
    _, stats = policy_loss(logp, old, adv, mask, CFG, token_count=1)
    assert stats["pg_loss"] == pytest.approx(6.0) and stats["dual_clip_frac"] == 1.0


def test_nll_only_on_positive_advantage_tokens() -> None:
    cfg = CFG.model_copy(update={"nll_coef": 0.5})
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = logp.detach().clone()  # ratio 1: the pg term is -A on every token
    adv = torch.tensor([[1.0, 0.0, -1.0]])
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 3), cfg, token_count=3)
    assert stats["nll"] == pytest.approx(1.0 / 3)  # only the A > 0 token's -logp
    assert loss.item() == pytest.approx((-1 + 0 + 1) / 3 + 0.5 / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[(-1.0 - 0.5) / 3, 0.0, 1.0 / 3]]))


def test_masked_tokens_contribute_nothing() -> None:
    logp, old, adv, mask = case_tensors()
    base, base_stats = policy_loss(logp, old, adv, mask, CFG, token_count=len(CASES))
    # an extra token with wild values, masked out: same loss, same stats, zero gradient
    logp2 = torch.cat([logp.detach(), torch.tensor([[3.0]], dtype=torch.float64)], 1).requires_grad_(True)
    old2 = torch.cat([old, torch.tensor([[-9.0]], dtype=torch.float64)], 1)
    adv2 = torch.cat([adv, torch.tensor([[5.0]], dtype=torch.float64)], 1)
    mask2 = torch.cat([mask, torch.zeros(1, 1, dtype=torch.float64)], 1)
    loss, stats = policy_loss(logp2, old2, adv2, mask2, CFG, token_count=len(CASES))
    assert loss.item() == pytest.approx(base.item())
    assert stats == pytest.approx(base_stats)
    loss.backward()
    assert logp2.grad[0, -1] == 0.0
    # all masked: zero loss, zero stats, no NaN
    none, st = policy_loss(logp2, old2, adv2, torch.zeros_like(mask2), CFG, token_count=4)
    assert none.item() == 0.0 and st["tokens"] == 0 and st["ratio_max"] == 0.0


def test_token_mean_over_a_global_count_adds_up_across_micro_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=gen, dtype=torch.float64) * 3
    old = logp + (torch.rand(4, 6, generator=gen, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64)  # per record, broadcast over tokens
    mask = (torch.rand(4, 6, generator=gen) > 0.3).double()
    total = float(mask.sum())

    whole = logp.clone().requires_grad_(True)
    loss, stats = policy_loss(whole, old, adv, mask, CFG, token_count=total)
    loss.backward()

    parts = logp.clone().requires_grad_(True)
    summed: dict[str, float] = dict.fromkeys(ADDITIVE_STATS, 0.0)
    loss_sum = 0.0
    for rows in (slice(0, 1), slice(1, 4)):  # uneven micro-batches, each normalised by the GLOBAL count
        part_loss, st = policy_loss(parts[rows], old[rows], adv[rows], mask[rows], CFG, token_count=total)
        part_loss.backward()
        loss_sum += part_loss.item()
        for k in ADDITIVE_STATS:
            summed[k] += st[k]
    assert loss_sum == pytest.approx(loss.item())
    assert summed == pytest.approx({k: stats[k] for k in ADDITIVE_STATS})
    torch.testing.assert_close(parts.grad, whole.grad)
    # a per-micro-batch mean would weight the first record's tokens differently
    local, _ = policy_loss(logp[0:1], old[0:1], adv[0:1], mask[0:1], CFG, token_count=float(mask[0].sum()))
    assert local.item() != pytest.approx(policy_loss(logp[0:1], old[0:1], adv[0:1], mask[0:1], CFG, total)[0].item())


def test_bad_inputs_are_named() -> None:
    logp, old, adv, mask = case_tensors()
    with pytest.raises(ValueError, match="token_count must be > 0"):
        policy_loss(logp, old, adv, mask, CFG, token_count=0)
    with pytest.raises(ValueError, match="must match"):
        policy_loss(logp, old[:, :3], adv, mask, CFG, token_count=1)
    with pytest.raises(ValueError, match=r"advantages \(1, 3\) must be \[batch\]"):
        policy_loss(logp, old, adv[:, :3], mask, CFG, token_count=1)
