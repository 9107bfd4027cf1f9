"""RLHF math as pure torch functions: KL estimators, per-token rewards, KL controllers, the PPO
clipped losses, and the sampling rules of the online methods (RSO rejection sampling, best-of-n).

Shapes: ``B`` rows (one sampled response each), ``T`` response tokens. All ``(B, T)`` inputs
are aligned on the RESPONSE tokens: ``logp[b, t] = log pi(a_t | s_t)`` of the t-th response token.
``mask`` ``(B, T)`` is 0/1 (bool, int or float): 1 on a real response token (one the policy
generated, EOS included), 0 on padding (and on prompt tokens, if they are in the tensor).
Values at masked positions are ignored, even NaN or inf.

Sign conventions: losses are to be MINIMISED; advantages are "higher is better"; ``kl`` is
``log pi - log pi_ref`` per token (positive when the policy puts more mass than the reference).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKLController", "FixedKLController", "best_of_n", "entropy_from_logits",
    "kl_penalty", "masked_mean", "ppo_policy_loss", "ppo_value_loss", "rso_sample",
    "token_rewards",
]

KL_KINDS = ("k1", "k2", "k3")


def _bool_mask(mask: Tensor, like: Tensor) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask must have shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"inputs must all have the same shape, got {shapes}")


def _reduce(x: Tensor, m: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return masked_mean(x, m)
    if reduction == "sum":
        return torch.where(m, x, torch.zeros_like(x)).sum()
    raise ValueError(f"unknown reduction {reduction!r}; valid: 'mean', 'sum'")


# ----------------------------------------------------------------------------- reductions
def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (over all of them, or along ``dim``).

    ``x``, ``mask``: same shape. An all-zero mask (or row, with ``dim``) gives 0, not NaN: no
    tokens contribute nothing. Masked entries never leak in, even if NaN.
    """
    m = _bool_mask(mask, x)
    total = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / m.sum().clamp_min(1).to(x.dtype)
    return total.sum(dim) / m.sum(dim).clamp_min(1).to(x.dtype)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last axis: ``(..., V) -> (...)``.

    ``H = -sum_v p_v log p_v``; entries with ``p_v = 0`` (logit ``-inf``, a banned token)
    contribute 0 rather than ``0 * -inf = NaN``.
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)


# ----------------------------------------------------------------------------- KL and rewards
def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: Literal["k1", "k2", "k3"] = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    ``logp``, ``ref_logp``: ``(B, T)`` log-probs of the sampled tokens under the policy and the
    reference. Returns ``(B, T)``. From Schulman, "Approximating KL Divergence" (2020), with
    ``d = logp - ref_logp`` and ``r = pi_ref / pi = exp(-d)``:

    - ``k1 = d``: unbiased, but negative on some tokens (InstructGPT's per-token penalty).
    - ``k2 = d**2 / 2``: always >= 0, biased (low bias when pi is close to pi_ref).
    - ``k3 = (r - 1) - log r``: unbiased and always >= 0 (GRPO's KL, DeepSeekMath Eq. 4).
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    d = logp - ref_logp  # log(pi / pi_ref)
    if kind == "k1":
        return d  # k1 = -log r, Schulman 2020
    if kind == "k2":
        return 0.5 * d**2  # k2 = (log r)^2 / 2, Schulman 2020
    if kind == "k3":
        return torch.expm1(-d) + d  # k3 = (r - 1) - log r, Schulman 2020; expm1 keeps small d exact
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_KINDS)}")


def token_rewards(score: Tensor, kl: Tensor, mask: Tensor, *, beta: float) -> Tensor:
    """Per-token PPO rewards: ``-beta * kl`` on every real response token, plus the sequence
    ``score`` on each row's LAST real token (InstructGPT, Ouyang et al. 2022, Eq. 2: the RM
    score minus ``beta * log(pi_RL / pi_SFT)``, spread per token as in Ziegler et al. 2019).

    ``score`` ``(B,)``; ``kl``, ``mask`` ``(B, T)``. Returns ``(B, T)``, exactly 0 on masked
    positions: the score is never placed on padding (trl#3750). The last real token is the
    last 1 of the row's mask, for either padding side. A row whose mask is all 0 (an empty
    response) gets no score and all-zero rewards.
    """
    m = _bool_mask(mask, kl)
    if score.shape != (kl.shape[0],):
        raise ValueError(f"score must have shape ({kl.shape[0]},), got {tuple(score.shape)}")
    rewards = torch.where(m, -beta * kl, torch.zeros_like(kl))  # (B, T), Eq. 2 InstructGPT (KL term)
    T = kl.shape[1]
    pos = torch.arange(1, T + 1, device=kl.device)  # 1-based so an empty row gives 0
    last = (m.long() * pos).amax(dim=1) - 1  # (B,): index of the last real token, -1 if none
    at_last = pos.unsqueeze(0) - 1 == last.unsqueeze(1)  # (B, T) one-hot (all False if empty)
    return rewards + torch.where(at_last, score.to(kl.dtype).unsqueeze(1), torch.zeros_like(kl))


# ----------------------------------------------------------------------------- KL controllers
class FixedKLController:
    """A constant KL coefficient ``beta`` (``.value``); ``update`` does nothing."""

    kind = "fixed"

    def __init__(self, beta: float):
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"state is for a {state.get('kind')!r} KL controller, not {self.kind!r}")
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", Eq. 2), steering the observed KL toward ``target``:

    ``e = clip((KL - target) / target, -0.2, 0.2)``; ``beta <- beta * (1 + K_beta * e)`` with
    ``K_beta = n_steps / horizon`` (as TRL/OpenAI's ``lm-human-preferences``: ``n_steps`` is the
    number of samples the KL was measured on). ``state_dict`` holds ``beta`` only; ``target``
    and ``horizon`` are configuration and stay as constructed on resume.
    """

    kind = "adaptive"

    def __init__(self, init_beta: float, target: float, horizon: float):
        super().__init__(init_beta)
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"target must be a finite number > 0, got {target!r}")
        if not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be a finite number > 0, got {horizon!r}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        kl = float(current_kl)
        if not math.isfinite(kl):
            raise ValueError(f"current_kl must be finite, got {kl!r}")
        e = min(max((kl - self.target) / self.target, -0.2), 0.2)  # e_t, Eq. 2, Ziegler et al. 2019
        self.value *= 1 + (n_steps / self.horizon) * e  # beta_{t+1} = beta_t (1 + K_beta e_t), Eq. 2
        return self.value


# ----------------------------------------------------------------------------- PPO losses
def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                    clip_eps: float = 0.2, reduction: Literal["mean", "sum"] = "mean",
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, per token (Schulman et al. 2017, Eq. 7), negated for minimising:
    ``L_t = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)``, ``rho_t = exp(logp - old_logp)``.

    ``logp`` (with grad), ``old_logp`` (rollout policy, no grad), ``advantages``, ``mask``:
    ``(B, T)``. Returns ``(loss, stats)``: ``loss`` the masked token MEAN (``reduction="sum"``:
    the masked SUM, for a caller that divides by the step's global token count). ``stats``
    (detached 0-d tensors, masked token means): ``clipfrac`` (share of tokens where the clipped
    term is strictly the one taken, so its gradient is 0), ``approx_kl`` (the k3 estimate of
    ``KL(pi_old || pi)``: ``(rho - 1) - log rho``, >= 0), ``ratio_mean``.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages)
    m = _bool_mask(mask, logp)
    zero = torch.zeros_like(logp)
    log_ratio = torch.where(m, logp - old_logp, zero)  # 0 on padding: no inf * 0 in backward
    adv = torch.where(m, advantages, zero)
    ratio = torch.exp(log_ratio)  # rho_t, (B, T)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)  # -min(rho A, clip(rho) A), Eq. 7, PPO paper
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), m),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, m),  # k3, Schulman 2020
            "ratio_mean": masked_mean(ratio, m),
        }
    return _reduce(per_token, m, reduction), stats


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
                   clip_value: float | None = 0.2, reduction: Literal["mean", "sum"] = "mean",
                   ) -> tuple[Tensor, Tensor]:
    """Clipped value loss (OpenAI baselines ``ppo2``; TRL/OpenRLHF PPO), per token:
    ``1/2 * max((V - R)^2, (V_clip - R)^2)``, ``V_clip = V_old + clip(V - V_old, -c, c)``.

    ``values`` (with grad), ``old_values`` (rollout), ``returns`` (GAE targets), ``mask``:
    ``(B, T)``. ``clip_value=None`` gives the plain ``1/2 (V - R)^2``. Returns ``(loss,
    clipfrac)``: the masked token mean (or sum, as in :func:`ppo_policy_loss`) and the detached
    share of tokens where the clipped error is strictly larger (its gradient is then 0).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns)
    m = _bool_mask(mask, values)
    zero = torch.zeros_like(values)
    v = torch.where(m, values, zero)
    ret = torch.where(m, returns, zero)
    err = (v - ret) ** 2
    if clip_value is None:
        per_token, worse = 0.5 * err, torch.zeros_like(err, dtype=torch.bool)
    else:
        old = torch.where(m, old_values, zero)
        v_clip = old + torch.clamp(v - old, -clip_value, clip_value)  # V_clip, as in baselines ppo2
        err_clip = (v_clip - ret) ** 2
        per_token = 0.5 * torch.maximum(err, err_clip)  # pessimistic (larger) error
        worse = err_clip > err
    clipfrac = masked_mean(worse.to(values.dtype), m).detach()
    return _reduce(per_token, m, reduction), clipfrac


# ----------------------------------------------------------------------------- online sampling
def rso_sample(rewards: Tensor, beta: float, num_samples: int,
               generator: torch.Generator | None) -> Tensor:
    """Statistical rejection sampling (Liu et al. 2023, "Statistical Rejection Sampling Improves
    Preference Optimization", Algorithm 1, Appendix A.1) for ONE prompt.

    ``rewards`` ``(N,)``: rewards of N candidates sampled i.i.d. from pi_sft. Accepted
    candidates follow ``pi_r(y) ∝ pi_sft(y) exp(r(y) / beta)``: in passes over the remaining
    candidates, each is accepted with probability ``exp((r - max_r) / beta)``, ``max_r`` over
    the REMAINING candidates (recomputed each pass, so every pass accepts at least its best);
    accepted ones are removed; stop at ``num_samples`` accepted or when none remain. Each pass
    visits the candidates in a random order (the paper uses their given order, which is the
    same in distribution for i.i.d. candidates but not if the caller sorted them).

    Returns the accepted indices into ``rewards`` (int64, in acceptance order, at most
    ``min(num_samples, N)``). Deterministic given ``generator`` (a CPU ``torch.Generator``;
    ``None`` uses the global RNG). ``beta`` in ``(0, inf]``: ``inf`` accepts everything
    (uniform order), ``beta -> 0`` accepts only the best (ties: whichever comes first).
    """
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor (N,), got {tuple(rewards.shape)}")
    if not (beta > 0):
        raise ValueError(f"beta must be > 0 (inf allowed), got {beta!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    r = rewards.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards must be finite")
    remaining = torch.arange(r.numel())  # (n,) candidate ids still in the pool
    accepted: list[int] = []
    while len(accepted) < num_samples and remaining.numel() > 0:
        rr = r[remaining]
        accept_p = torch.exp((rr - rr.max()) / beta)  # u < exp((r - max_r)/beta), Algorithm 1, RSO
        order = torch.randperm(remaining.numel(), generator=generator)
        u = torch.rand(remaining.numel(), generator=generator, dtype=torch.float64)
        hits = order[u < accept_p[order]][: num_samples - len(accepted)]  # in visiting order
        accepted.extend(remaining[hits].tolist())
        keep = torch.ones(remaining.numel(), dtype=torch.bool)
        keep[hits] = False
        remaining = remaining[keep]
    return torch.tensor(accepted, dtype=torch.long)


def best_of_n(rewards: Tensor, group_size: int) -> Tensor:
    """Best-of-n selection: for each contiguous group of ``group_size`` completions in
    ``rewards`` ``(N,)``, the FLAT index (into ``rewards``) of its highest reward; ties go to
    the first. Returns ``(N // group_size,)`` int64. NaN rewards are refused."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    if bool(torch.isnan(rewards).any()):
        raise ValueError("rewards must not contain NaN")
    grouped = rewards.view(-1, group_size)  # (P, G)
    within = grouped.argmax(dim=1)  # torch.argmax returns the first maximal index
    return within + torch.arange(grouped.shape[0], device=rewards.device) * group_size
