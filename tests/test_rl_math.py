"""Tests for the RLHF math: alignkit.ops.advantages (GAE, whitening, group baselines) and
alignkit.rl (KL estimators, token rewards, KL controllers, PPO losses, RSO, best-of-n)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from alignkit.ops.advantages import gae, gae_reference_loop, group_advantages, whiten
from alignkit.rl import (
    AdaptiveKLController,
    FixedKLController,
    best_of_n,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    rso_sample,
    token_rewards,
)

TIGHT = {"rtol": 1e-12, "atol": 1e-12}  # float64 throughout
EXACT = {"rtol": 0.0, "atol": 0.0}
NAN = float("nan")


def t(*rows, grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def ragged_mask(gen: torch.Generator, B: int, T: int) -> torch.Tensor:
    """Right-padded rows of random lengths 0..T, then a few holes punched inside (skipped steps)."""
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).double()
    holes = torch.rand(B, T, generator=gen, dtype=torch.float64) < 0.15
    mask[holes] = 0.0
    mask[0] = 1.0  # one full row
    mask[1] = 0.0  # one empty row
    return mask


# ============================================================================= GAE
def test_gae_three_step_golden():
    """r = [1, 0, 2], V = [0.5, 1.0, 1.5], gamma = 0.9, lam = 0.8 (gamma*lam = 0.72); V after the
    last token is 0.
        delta_2 = 2 + 0.9*0   - 1.5 = 0.5
        delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35
        delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4
        A_2 = 0.5;  A_1 = 0.35 + 0.72*0.5 = 0.71;  A_0 = 1.4 + 0.72*0.71 = 1.9112
        returns = A + V = [2.4112, 1.71, 2.0]
    Row 2 is the same episode right-padded to T = 5 with garbage (NaN) in the padding: same
    numbers, 0 on padding. Row 3 has a hole at t = 1 (mask [1, 0, 1, 1, 0]): the step after t = 0
    is t = 2, so it reproduces the same numbers at t = 0, 2, 3.
    """
    rewards = t([1.0, 0.0, 2.0, NAN, NAN], [1.0, 99.0, 0.0, 2.0, NAN])
    values = t([0.5, 1.0, 1.5, NAN, NAN], [0.5, -7.0, 1.0, 1.5, NAN])
    mask = t([1, 1, 1, 0, 0], [1, 0, 1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t([1.9112, 0.71, 0.5, 0, 0], [1.9112, 0, 0.71, 0.5, 0]), **TIGHT)
    torch.testing.assert_close(ret, t([2.4112, 1.71, 2.0, 0, 0], [2.4112, 0, 1.71, 2.0, 0]), **TIGHT)


def test_gae_matches_reference_loop_on_ragged_masks():
    """Vectorised reverse scan == per-row per-step definition, on random (B, T) with ragged,
    holed masks (including a full and an empty row), for several (gamma, lam)."""
    gen = torch.Generator().manual_seed(0)
    B, T = 7, 13
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_mask(gen, B, T)
    assert 0 < mask.sum() < B * T
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)]:
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
        ref_adv, ref_ret = gae_reference_loop(rewards, values, mask, gamma=gamma, lam=lam)
        torch.testing.assert_close(adv, ref_adv, **TIGHT)
        torch.testing.assert_close(ret, ref_ret, **TIGHT)


def test_gae_gamma_lam_one_is_reward_to_go():
    """gamma = lam = 1: the deltas telescope, A_t = sum_{k>=t} r_k - V_t and returns = reward-to-go
    (sum of the row's real rewards from t on), whatever V is."""
    gen = torch.Generator().manual_seed(1)
    B, T = 5, 9
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_mask(gen, B, T)
    real_rewards = rewards * mask
    to_go = real_rewards.flip(1).cumsum(1).flip(1) * mask  # (B, T)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, to_go, **TIGHT)
    torch.testing.assert_close(adv, (to_go - values) * mask, **TIGHT)


def test_gae_masked_positions_are_zero_and_never_leak():
    """Padding with NaN/inf rewards and values: advantages and returns are exactly 0 there and
    finite everywhere; the real steps are unaffected by what the padding holds."""
    rewards = t([0.3, -1.0, NAN, float("inf")])
    values = t([0.1, 0.2, float("-inf"), NAN])
    mask = torch.tensor([[True, True, False, False]])
    adv, ret = gae(rewards, values, mask)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert adv[0, 2:].eq(0).all() and ret[0, 2:].eq(0).all()
    clean, _ = gae(t([0.3, -1.0]), t([0.1, 0.2]), torch.ones(1, 2))
    torch.testing.assert_close(adv[:, :2], clean, **EXACT)


def test_gae_rejects_non_binary_mask():
    with pytest.raises(ValueError, match="0 and 1"):
        gae(t([1.0, 2.0]), t([0.0, 0.0]), t([1.0, 0.5]))


# ============================================================================= whiten
def test_whiten_golden_unbiased_and_masked_out_zero():
    """Real entries [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], sum of squares 14, UNBIASED
    variance 14/3 (population variance would be 14/4 and give other numbers). With eps = 0:
    whitened = [-2, -1, 0, 3] * sqrt(3/14); shift_mean=False adds the mean 3 back. Masked-out
    entries (holding NaN here) come out 0."""
    x = t([1.0, 2.0, NAN], [3.0, 100.0, 6.0])
    mask = t([1, 1, 0], [1, 0, 1])
    s = math.sqrt(3 / 14)
    torch.testing.assert_close(whiten(x, mask, eps=0.0), t([-2 * s, -1 * s, 0], [0, 0, 3 * s]), **TIGHT)
    torch.testing.assert_close(whiten(x, mask, shift_mean=False, eps=0.0),
                               t([3 - 2 * s, 3 - s, 0], [3, 0, 3 + 3 * s]), **TIGHT)


def test_whiten_mean_zero_std_one_on_real_entries():
    """Default eps = 1e-8 with variance ~ 4: std = sqrt(var / (var + eps)) = 1 - ~1e-9."""
    gen = torch.Generator().manual_seed(2)
    x = 3.0 + 2.0 * torch.randn(6, 11, generator=gen, dtype=torch.float64)
    mask = ragged_mask(gen, 6, 11).bool()
    out = whiten(x, mask)
    real = out[mask]
    assert abs(real.mean().item()) < 1e-12
    assert abs(real.std().item() - 1.0) < 1e-8
    assert out[~mask].eq(0).all()


def test_whiten_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2"):
        whiten(t([1.0, 2.0]), t([0, 1]))


# ============================================================================= group advantages
def test_group_advantages_grpo_golden():
    """Group 1 = [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], unbiased std sqrt(14/3).
    Group 2 = [0, 1]x2: mean 0.5, deviations +-0.5, unbiased std sqrt(1/3) (population std 0.5
    would give +-1). With eps = 0 the advantages are deviation / std."""
    r = t(1.0, 2.0, 3.0, 6.0, 0.0, 1.0, 0.0, 1.0)
    s1, s2 = math.sqrt(14 / 3), math.sqrt(1 / 3)
    expected = t(-2 / s1, -1 / s1, 0.0, 3 / s1, -0.5 / s2, 0.5 / s2, -0.5 / s2, 0.5 / s2)
    torch.testing.assert_close(group_advantages(r, 4, eps=0.0), expected, **TIGHT)
    # default eps = 1e-4 is added to the std (as TRL's GRPOTrainer)
    expected_eps = t(-2 / (s1 + 1e-4), -1 / (s1 + 1e-4), 0.0, 3 / (s1 + 1e-4),
                     -0.5 / (s2 + 1e-4), 0.5 / (s2 + 1e-4), -0.5 / (s2 + 1e-4), 0.5 / (s2 + 1e-4))
    torch.testing.assert_close(group_advantages(r, 4), expected_eps, **TIGHT)
    # G = 2, [0, 1]: +-0.5 / sqrt(0.5) = +-sqrt(0.5)
    torch.testing.assert_close(group_advantages(t(0.0, 1.0), 2, eps=0.0),
                               t(-math.sqrt(0.5), math.sqrt(0.5)), **TIGHT)


def test_group_advantages_identical_rewards_give_zero():
    torch.testing.assert_close(group_advantages(t(5.0, 5.0, 5.0), 3), t(0.0, 0.0, 0.0), **EXACT)


def test_group_advantages_rloo_golden():
    """[1, 2, 3, 6]: leave-one-out baselines (12 - r_i)/3 = [11/3, 10/3, 3, 2], so
    A = [-8/3, -4/3, 0, 4] = 4/3 * (r - mean): the G/(G-1) identity. scale='none'."""
    r = t(1.0, 2.0, 3.0, 6.0)
    loo = group_advantages(r, 4, baseline="loo", scale="none")
    torch.testing.assert_close(loo, t(-8 / 3, -4 / 3, 0.0, 4.0), **TIGHT)
    mean = group_advantages(r, 4, baseline="mean", scale="none")
    torch.testing.assert_close(mean, t(-2.0, -1.0, 0.0, 3.0), **TIGHT)
    torch.testing.assert_close(loo, 4 / 3 * mean, **TIGHT)


def test_group_advantages_rejects_bad_arguments():
    r = t(1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="divide"):
        group_advantages(r, 2)
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(r, 3, baseline="median")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 3, scale="batch")
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(r, 1, baseline="loo", scale="none")


# ============================================================================= KL estimators
def test_kl_estimators_golden():
    """logp = [-1, -2], ref = [-1.5, -1]: d = logp - ref = [0.5, -1].
    k1 = d = [0.5, -1] (negative on the second token);  k2 = d^2/2 = [0.125, 0.5];
    k3 = exp(-d) - 1 + d = [e^-0.5 - 0.5, e - 2] = [0.1065306597126334, 0.7182818284590451]."""
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), t([0.5, -1.0]), **TIGHT)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), t([0.125, 0.5]), **TIGHT)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"),
                               t([math.exp(-0.5) - 0.5, math.e - 2.0]), **TIGHT)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_expectations_under_the_sampling_policy():
    """Tokens drawn from pi = p: E_p[k1] = E_p[k3] = KL(p || q) exactly (unbiased), while
    E_p[k2] differs (biased). p = [0.5, 0.3, 0.2], q = [0.2, 0.5, 0.3]."""
    p, q = t(0.5, 0.3, 0.2), t(0.2, 0.5, 0.3)
    kl = (p * (p / q).log()).sum()
    expect = {k: (p * kl_penalty(p.log(), q.log(), k)).sum() for k in ("k1", "k2", "k3")}
    torch.testing.assert_close(expect["k1"], kl, **TIGHT)
    torch.testing.assert_close(expect["k3"], kl, **TIGHT)
    assert abs(expect["k2"] - kl) > 1e-2


def test_k3_nonnegative_and_k1_signs():
    gen = torch.Generator().manual_seed(3)
    logp = 5 * torch.randn(4, 50, generator=gen, dtype=torch.float64)
    ref = 5 * torch.randn(4, 50, generator=gen, dtype=torch.float64)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    k1 = kl_penalty(logp, ref, "k1")
    assert (k1 < 0).any() and (k1 > 0).any()  # k1 is signed per token
    assert kl_penalty(ref, ref, "k3").eq(0).all()


# ============================================================================= token rewards
def test_token_rewards_places_score_on_last_real_token():
    """beta = 0.1, kl = log pi - log pi_ref from known log-probs (k1); scores [2, -1, 5, 3].
    Row 0: 3 real tokens then padding -> -0.1*kl on t = 0..2, +2 on t = 2.
    Row 1: 1 real token -> -0.1*kl[1, 0] + (-1) on t = 0.
    Row 2: empty response -> all 0, the score 5 is not placed (documented).
    Row 3: left padded, real t = 1..3 -> +3 on t = 3.
    Padding holds NaN kl and gets exactly 0."""
    logp = t([-0.5, -1.0, -2.0, NAN], [-0.2, NAN, NAN, NAN], [NAN] * 4, [NAN, -1.0, -1.0, -3.0])
    ref = t([-0.7, -0.5, -2.5, NAN], [-0.4, NAN, NAN, NAN], [NAN] * 4, [NAN, -2.0, -0.5, -3.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
    kl = kl_penalty(logp, ref, "k1")  # real entries: [0.2, -0.5, 0.5], [0.2], -, [1.0, -0.5, 0.0]
    out = token_rewards(t(2.0, -1.0, 5.0, 3.0), kl, mask, beta=0.1)
    expected = t([-0.02, 0.05, -0.05 + 2.0, 0.0],
                 [-0.02 - 1.0, 0.0, 0.0, 0.0],
                 [0.0, 0.0, 0.0, 0.0],
                 [0.0, -0.1, 0.05, 0.0 + 3.0])
    torch.testing.assert_close(out, expected, **TIGHT)
    assert out[~mask.bool()].eq(0).all()


# ============================================================================= KL controllers
def test_adaptive_kl_controller_golden():
    """beta0 = 0.1, target 6, horizon 10000.
    1) KL 9, n 256: e = (9-6)/6 = 0.5 -> clipped to 0.2; beta = 0.1 * (1 + 0.0256*0.2) = 0.100512
    2) KL 5.4, n 256: e = -0.1 (inside); beta = 0.100512 * (1 - 0.00256) = 0.10025468928
    3) KL 0, n 1000: e = -1 -> clipped to -0.2; beta *= 1 - 0.1*0.2 = 0.98 -> 0.0982495954944"""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.value == 0.1
    assert math.isclose(ctl.update(9.0, 256), 0.100512, rel_tol=1e-14)
    assert math.isclose(ctl.update(torch.tensor(5.4, dtype=torch.float64), 256), 0.10025468928, rel_tol=1e-14)
    assert math.isclose(ctl.update(0.0, 1000), 0.0982495954944, rel_tol=1e-14)
    assert math.isclose(ctl.value, 0.0982495954944, rel_tol=1e-14)


def test_kl_controllers_state_dict_resume():
    """A controller restored from a state_dict continues exactly like the uninterrupted one."""
    a = AdaptiveKLController(0.2, target=3.0, horizon=500)
    for kl in (4.0, 1.0, 2.5):
        a.update(kl, 64)
    b = AdaptiveKLController(0.2, target=3.0, horizon=500)
    b.load_state_dict(a.state_dict())
    assert b.value == a.value
    assert b.update(7.0, 64) == a.update(7.0, 64)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05 and fixed.value == 0.05
    f2 = FixedKLController(0.3)
    f2.load_state_dict(fixed.state_dict())
    assert f2.value == 0.05
    with pytest.raises(ValueError, match="adaptive"):
        f2.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="finite"):
        a.update(float("nan"), 1)


# ============================================================================= PPO policy loss
def _policy_case():
    """eps = 0.2. Six real tokens (rho, A), per-token loss -min(rho A, clip(rho) A):
        A=+1, rho=1.5 (> 1+eps): min(1.5, 1.2)  = 1.2  -> L = -1.2, clipped term taken, grad 0
        A=+1, rho=0.5 (< 1-eps): min(0.5, 0.8)  = 0.5  -> L = -0.5, dL/dlogp = -A rho = -0.5
        A=+1, rho=1.1 (inside):                     -> L = -1.1, grad -1.1
        A=-1, rho=1.5 (> 1+eps): min(-1.5, -1.2) = -1.5 -> L = 1.5, unclipped, grad +1.5
        A=-1, rho=0.5 (< 1-eps): min(-0.5, -0.8) = -0.8 -> L = 0.8, clipped term taken, grad 0
        A=-1, rho=0.9 (inside):                     -> L = 0.9, grad +0.9
    Mean over 6 tokens = (-1.2 - 0.5 - 1.1 + 1.5 + 0.8 + 0.9)/6 = 0.4/6; clipfrac = 2/6;
    ratio mean = 6.0/6 = 1. A 7th, padded token holds a huge log-ratio and a NaN advantage."""
    rho = t(1.5, 0.5, 1.1, 1.5, 0.5, 0.9)
    old = t(-1.0, -2.0, -0.5, -3.0, -1.5, -0.7)
    logp = torch.cat([old + rho.log(), t(1000.0)]).unsqueeze(0).detach().requires_grad_(True)
    old = torch.cat([old, t(0.0)]).unsqueeze(0)
    adv = t([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, NAN])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    return rho, logp, old, adv, mask


def test_ppo_policy_loss_golden_and_stats():
    rho, logp, old, adv, mask = _policy_case()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.4 / 6, dtype=torch.float64), **TIGHT)
    assert math.isclose(stats["clipfrac"].item(), 2 / 6, rel_tol=1e-15)
    assert math.isclose(stats["ratio_mean"].item(), 1.0, rel_tol=1e-13)
    k3 = sum(r - 1 - math.log(r) for r in rho.tolist()) / 6  # k3 estimate of KL(pi_old || pi)
    assert math.isclose(stats["approx_kl"].item(), k3, rel_tol=1e-12)
    assert not any(v.requires_grad for v in stats.values())
    summed, _ = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, reduction="sum")
    torch.testing.assert_close(summed, torch.tensor(0.4, dtype=torch.float64), **TIGHT)


def test_ppo_policy_loss_gradient_zero_where_clipped_term_is_taken():
    """d(mean loss)/d logp = -A rho / 6 where the unclipped term is taken (or inside the range),
    exactly 0 where the clipped term is taken (tokens 0 and 4) and on the padded token."""
    _, logp, old, adv, mask = _policy_case()
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    expected = t([0.0, -0.5, -1.1, 1.5, 0.0, 0.9, 0.0]) / 6
    torch.testing.assert_close(logp.grad, expected, **TIGHT)
    assert logp.grad[0, 0] == 0 and logp.grad[0, 4] == 0 and logp.grad[0, 6] == 0


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage():
    """rho = 1 (first epoch): L = -mean(A) over real tokens, gradient -A/n, nothing clipped."""
    logp = t([-1.0, -2.0, -3.0], grad=True)
    adv = t([0.5, -2.0, 4.0])
    loss, stats = ppo_policy_loss(logp, logp.detach(), adv, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(loss, torch.tensor(0.75, dtype=torch.float64), **TIGHT)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([-0.25, 1.0, 0.0]), **TIGHT)
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0


# ============================================================================= PPO value loss
def test_ppo_value_loss_golden_with_and_without_clipping():
    """c = 0.2, three real tokens (V, V_old, R) and a padded one:
        (1.0, 0.5, 2.0): V_clip = 0.7; (V-R)^2 = 1, (V_clip-R)^2 = 1.69 -> 1/2 * 1.69 = 0.845,
                         clipped term taken: dL/dV = 0
        (1.0, 0.5, 0.0): V_clip = 0.7; 1 vs 0.49 -> 0.5, dL/dV = V - R = 1
        (0.6, 0.5, 1.0): inside, V_clip = V; 0.16 -> 0.08, dL/dV = -0.4
    Clipped: mean = (0.845 + 0.5 + 0.08)/3 = 0.475, clipfrac 1/3, grad [0, 1, -0.4, 0]/3.
    Unclipped (clip_value=None): (0.5 + 0.5 + 0.08)/3 = 0.36, clipfrac 0, grad [-1, 1, -0.4, 0]/3."""
    old, ret = t([0.5, 0.5, 0.5, NAN]), t([2.0, 0.0, 1.0, NAN])
    mask = torch.tensor([[1, 1, 1, 0]])
    v = t([1.0, 1.0, 0.6, 1e30], grad=True)
    loss, clipfrac = ppo_value_loss(v, old, ret, mask, clip_value=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.475, dtype=torch.float64), **TIGHT)
    assert math.isclose(clipfrac.item(), 1 / 3, rel_tol=1e-15)
    loss.backward()
    torch.testing.assert_close(v.grad, t([0.0, 1.0, -0.4, 0.0]) / 3, **TIGHT)

    v2 = v.detach().clone().requires_grad_(True)
    loss2, clipfrac2 = ppo_value_loss(v2, old, ret, mask, clip_value=None)
    torch.testing.assert_close(loss2, torch.tensor(0.36, dtype=torch.float64), **TIGHT)
    assert clipfrac2 == 0
    loss2.backward()
    torch.testing.assert_close(v2.grad, t([-1.0, 1.0, -0.4, 0.0]) / 3, **TIGHT)


# ============================================================================= reductions
def test_masked_mean_and_entropy():
    x = t([1.0, 2.0, NAN], [4.0, NAN, NAN])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(7 / 3, dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), t(1.5, 4.0), **TIGHT)
    assert masked_mean(x, torch.zeros_like(mask)) == 0  # no tokens: 0, not NaN
    logits = t([0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf])
    # uniform over 4 -> ln 4;  p = [1/4, 3/4, 0, 0] -> -(1/4 ln 1/4 + 3/4 ln 3/4)
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy_from_logits(logits), t(math.log(4.0), h2), **TIGHT)


# ============================================================================= RSO / best-of-n
def exact_first_acceptance(r: list[float], beta: float) -> list[float]:
    """P(candidate i is the first accepted) under Algorithm 1 with a uniformly random visiting
    order: average over orders of p_i * prod_{j before i} (1 - p_j), p = exp((r - max r)/beta).
    (The best has p = 1, so the first pass always accepts; enumeration is exact.)"""
    p = [math.exp((x - max(r)) / beta) for x in r]
    probs = [0.0] * len(r)
    orders = list(itertools.permutations(range(len(r))))
    for order in orders:
        survive = 1.0
        for i in order:
            probs[i] += survive * p[i] / len(orders)
            survive *= 1 - p[i]
    return probs


def frequencies(draws: list[int], n: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(draws), minlength=n).double() / len(draws)


def assert_within_binomial(freq: torch.Tensor, probs: torch.Tensor, trials: int) -> None:
    """Each frequency within 5 binomial standard deviations sqrt(p(1-p)/n) of its probability:
    a chance failure has probability < 6e-7 per entry (and the seed is fixed, so the test is
    deterministic); with n = 6000 that is <= 0.032 absolute, tighter than the gaps the tests
    use to tell the right distribution from the wrong ones."""
    tol = 5 * (probs * (1 - probs) / trials).sqrt()
    assert ((freq - probs).abs() <= tol).all(), (freq, probs, tol)


def test_rso_first_acceptance_matches_algorithm_1_and_softmax_order():
    """Rewards [0, 0.5, 1, 2], beta = 1: acceptance probabilities [e^-2, e^-1.5, e^-1, 1]. The
    frequency each candidate is accepted first matches the exact Algorithm-1 probability and is
    ordered like softmax(r / beta). A sampler that drew from softmax(r/beta) directly would give
    [0.086, 0.141, 0.233, 0.634] vs the exact [0.040, 0.069, 0.135, 0.756] and fail."""
    r = t(0.0, 0.5, 1.0, 2.0)
    gen = torch.Generator().manual_seed(4)
    trials = 6000
    draws = [int(rso_sample(r, 1.0, 1, gen)[0]) for _ in range(trials)]
    freq = frequencies(draws, 4)
    assert_within_binomial(freq, torch.tensor(exact_first_acceptance(r.tolist(), 1.0)), trials)
    assert (freq.diff() > 0).all()  # same order as softmax(r / beta)


def test_rso_accepted_samples_follow_the_optimal_policy():
    """The method's claim: with candidates i.i.d. from pi_sft, the accepted sample follows
    pi_r(y) ∝ pi_sft(y) exp(r(y)/beta). Three responses with pi_sft = [0.4, 0.3, 0.3], rewards
    [0, 1, 2], beta = 1: pi_r = [0.4, 0.3e, 0.3e^2]/Z = [0.1165, 0.2376, 0.6459]. Each trial
    draws 32 candidates; the first pass is then exact rejection sampling with envelope max r = 2
    unless no candidate has reward 2 (probability 0.7^32 ~ 1e-5, negligible)."""
    pi_sft, rew = t(0.4, 0.3, 0.3), t(0.0, 1.0, 2.0)
    target = pi_sft * rew.exp() / (pi_sft * rew.exp()).sum()
    gen = torch.Generator().manual_seed(5)
    trials, n = 6000, 32
    kinds = torch.multinomial(pi_sft, trials * n, replacement=True, generator=gen).view(trials, n)
    draws = [int(row[rso_sample(rew[row], 1.0, 1, gen)[0]]) for row in kinds]
    assert_within_binomial(frequencies(draws, 3), target, trials)


def test_rso_beta_limits_and_exhaustion():
    """beta -> inf: every candidate is accepted on sight, so the first accepted is uniform.
    beta -> 0: only the best is ever accepted first; asking for all N returns each index once,
    best first. num_samples > N stops when candidates run out. Same seed, same draw."""
    r = t(0.0, 0.5, 1.0, 2.0)
    gen = torch.Generator().manual_seed(6)
    trials = 6000
    wide = [int(rso_sample(r, 1e9, 1, gen)[0]) for _ in range(trials)]
    assert_within_binomial(frequencies(wide, 4), torch.full((4,), 0.25, dtype=torch.float64), trials)
    assert {int(rso_sample(r, 1e-9, 1, gen)[0]) for _ in range(200)} == {3}
    everything = rso_sample(r, 1e-9, 10, gen)
    assert everything.dtype == torch.long and everything[0] == 3
    assert sorted(everything.tolist()) == [0, 1, 2, 3]
    assert sorted(rso_sample(r, math.inf, 4, gen).tolist()) == [0, 1, 2, 3]
    a = rso_sample(r, 0.5, 3, torch.Generator().manual_seed(7))
    b = rso_sample(r, 0.5, 3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and len(set(a.tolist())) == 3
    with pytest.raises(ValueError, match="beta"):
        rso_sample(r, 0.0, 1, gen)


def test_best_of_n():
    """Groups of 4: [1, 3, 3, 0] -> flat index 1 (tie with 2: first wins); [-1, -2, -0.5, -3] -> 6."""
    r = t(1.0, 3.0, 3.0, 0.0, -1.0, -2.0, -0.5, -3.0)
    assert best_of_n(r, 4).tolist() == [1, 6]
    assert best_of_n(r, 1).tolist() == list(range(8))
    assert best_of_n(r, 8).tolist() == [1]
    with pytest.raises(ValueError, match="multiple"):
        best_of_n(r, 3)
    with pytest.raises(ValueError, match="NaN"):
        best_of_n(t(1.0, NAN), 2)
