"""Advantage estimation for RLHF as pure torch functions: GAE, masked whitening, group baselines.

Shapes: ``B`` rows (episodes), ``T`` response steps; ``N = prompts * group_size`` completions.
Masks are 0/1 (bool, int or float) of the data's shape: 1 marks a real response step (an
action the policy took), 0 marks padding or prompt. Nothing here detaches: pass rewards and
values computed under ``torch.no_grad()`` (the rollout does), as advantages are constants
to the PPO loss.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["gae", "gae_reference_loop", "group_advantages", "whiten"]

GRPO_EPS = 1e-4  # added to the group std, as TRL's GRPOTrainer does (trl 1.16, grpo_trainer.py)


def _as_bool_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must hold only 0 and 1")
        mask = mask != 0
    return mask


# ----------------------------------------------------------------------------- GAE
def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", Eq. 16: ``A_t = sum_l (gamma lam)^l
    delta_{t+l}``, computed backwards as ``A_t = delta_t + gamma lam A_{t+1}``), per row, over
    the steps where ``mask`` is 1.

    ``rewards``, ``values``, ``mask``: ``(B, T)``. Masked steps are SKIPPED: for a row's real
    steps ``t_1 < ... < t_k``, the successor of ``t_i`` is ``t_{i+1}`` (not ``t_i + 1``), and
    the value after ``t_k`` is 0 (the episode ends there). So for the usual right-padded
    response, ``delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t``. Rewards and values at
    masked steps are ignored (they may be anything, even NaN).

    Returns ``(advantages, returns)``, both ``(B, T)``, with ``returns = advantages + values``
    on real steps; both are exactly 0 on masked steps.
    """
    if rewards.dim() != 2 or values.shape != rewards.shape:
        raise ValueError(f"rewards and values must both be (B, T), got {tuple(rewards.shape)} "
                         f"and {tuple(values.shape)}")
    m = _as_bool_mask(mask, rewards)  # (B, T)
    B, T = rewards.shape
    zero = rewards.new_zeros(B)
    next_value, next_adv = zero, zero  # (B,): V and A of the next REAL step; 0 past the last
    advantages = []
    for t in reversed(range(T)):
        real = m[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD residual delta_t, GAE paper Sec. 3
        adv = delta + gamma * lam * next_adv  # Eq. 16, GAE paper, as a backward recursion
        advantages.append(torch.where(real, adv, zero))
        next_value = torch.where(real, values[:, t], next_value)  # skip masked steps
        next_adv = torch.where(real, adv, next_adv)
    adv = torch.stack(advantages[::-1], dim=1)  # (B, T)
    returns = torch.where(m, adv + values, torch.zeros_like(adv))  # lambda-return target for V
    return adv, returns


def gae_reference_loop(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
                       lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Plain per-row, per-step Python version of :func:`gae` (same contract), written from the
    definition ``A_t = sum_l (gamma lam)^l delta_{t+l}`` over a row's real steps. For tests."""
    adv = torch.zeros_like(rewards)
    ret = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t] != 0]
        r = [float(rewards[b, t]) for t in steps]
        v = [float(values[b, t]) for t in steps] + [0.0]  # V = 0 after the episode ends
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(steps))]
        for i, t in enumerate(steps):
            a = sum((gamma * lam) ** k * deltas[i + k] for k in range(len(steps) - i))
            adv[b, t] = a
            ret[b, t] = a + v[i]
    return adv, ret


# ----------------------------------------------------------------------------- whitening
def whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening over ALL real entries of ``x`` (any shape; ``mask`` the same shape),
    as TRL/OpenRLHF's ``masked_whiten``: ``(x - mean) / sqrt(var + eps)``.

    ``var`` is the UNBIASED (Bessel-corrected) masked variance, as in TRL's ``masked_var``, so
    the real entries come out with mean 0 and ``torch.std`` (unbiased) 1, up to ``eps``.
    ``shift_mean=False`` adds the mean back (scale only; keeps the advantages' sign balance
    as collected). Masked-out entries are set to 0 (so padded advantages stay 0). Statistics
    are local to this tensor: with data parallelism each rank whitens its own batch.
    Raises ValueError for fewer than 2 real entries (the unbiased variance is undefined).
    """
    m = _as_bool_mask(mask, x)
    n = int(m.sum())
    if n < 2:
        raise ValueError(f"whiten needs at least 2 real entries, mask has {n}")
    zero = torch.zeros_like(x)
    mean = torch.where(m, x, zero).sum() / n
    var = torch.where(m, (x - mean) ** 2, zero).sum() / (n - 1)  # Bessel-corrected, as TRL
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, zero)


# ----------------------------------------------------------------------------- group baselines
def group_advantages(rewards: Tensor, group_size: int, *,
                     baseline: Literal["mean", "loo"] = "mean",
                     scale: Literal["std", "none"] = "std", eps: float = GRPO_EPS) -> Tensor:
    """Outcome advantages from a group of ``group_size`` completions per prompt.

    ``rewards`` ``(N,)``, ``N = prompts * group_size``, each prompt's completions contiguous.
    Returns advantages ``(N,)``, one per completion (broadcast it over its tokens).

    - ``baseline="mean"``: ``r_i - mean_group(r)`` (GRPO, Shao et al. 2024, DeepSeekMath
      Sec. 4.1.2: ``A_i = (r_i - mean(r)) / std(r)``, the advantage of its Eq. 3 objective).
    - ``baseline="loo"``: ``r_i - mean_{j != i} r_j`` (RLOO, Ahmadian et al. 2024, "Back to
      Basics"); equals ``G/(G-1) * (r_i - mean_group)``. Needs ``group_size >= 2``.
    - ``scale="std"``: divide by ``std_group + eps``, with the UNBIASED (Bessel, ``G - 1``)
      group std, as TRL's GRPOTrainer (``nanstd``; ``scale_rewards="group"``) and its eps
      1e-4: a group of identical rewards gets advantage 0. ``scale="none"``: no division
      (Dr. GRPO; plain RLOO).
    """
    if baseline not in ("mean", "loo"):
        raise ValueError(f"unknown baseline {baseline!r}; valid: 'mean', 'loo'")
    if scale not in ("std", "none"):
        raise ValueError(f"unknown scale {scale!r}; valid: 'std', 'none'")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    min_size = 2 if (baseline == "loo" or scale == "std") else 1
    if group_size < min_size or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size must be >= {min_size} and divide N={rewards.numel()}, "
                         f"got {group_size}")
    G = group_size
    r = rewards.view(-1, G)  # (P, G)
    mean = r.mean(dim=1, keepdim=True)  # (P, 1)
    if baseline == "mean":
        adv = r - mean  # Sec. 4.1.2, DeepSeekMath (numerator)
    else:
        adv = r - (r.sum(dim=1, keepdim=True) - r) / (G - 1)  # leave-one-out baseline, RLOO (Ahmadian et al.)
    if scale == "std":
        adv = adv / (r.std(dim=1, keepdim=True, correction=1) + eps)  # Sec. 4.1.2, DeepSeekMath; std as TRL
    return adv.reshape(-1)
