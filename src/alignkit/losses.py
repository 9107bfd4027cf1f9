"""Preference-optimisation objectives as pure torch functions.

Every pairwise objective takes per-sequence log-probabilities of shape ``(B,)`` (token
log-probs SUMMED over the completion) and keyword-only scalars, and returns
``(losses, chosen_rewards, rejected_rewards)``: the UNREDUCED per-example losses ``(B,)``
and the DETACHED implicit rewards ``(B,)``. Reduction (mean, masking) is the caller's job.

Notation: ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``.
``logsigmoid`` is used throughout, never ``log(sigmoid(.))``, so large ``|h|`` stays finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from enum import StrEnum
except ImportError:  # Python 3.10
    from enum import Enum

    class StrEnum(str, Enum):  # type: ignore[no-redef]
        def __str__(self) -> str:
            return str(self.value)

__all__ = [
    "LOSSES", "LossKind", "LossSpec", "bradley_terry_loss", "dpo_loss", "dpop_loss",
    "get_loss_spec", "hinge_loss", "ipo_loss", "preference_loss", "robust_dpo_loss",
    "simpo_loss",
]

Triple = tuple[Tensor, Tensor, Tensor]
DEFAULT_NOISE = 0.1  # label_smoothing used by preference_loss for cdpo/robust when given 0


# ----------------------------------------------------------------------------- validation
def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_smoothing(eps: float) -> None:
    if not (math.isfinite(eps) and 0.0 <= eps < 0.5):
        raise ValueError(f"label_smoothing (the flip rate eps) must be in [0, 0.5), got {eps!r}")


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"inputs must all be 1-D of the same shape (B,), got {shapes}")


def _log_ratios(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    _check_shapes(policy_chosen_logps=pc, policy_rejected_logps=pr,
                  reference_chosen_logps=rc, reference_rejected_logps=rr)
    return pc - rc, pr - rr


def _rewards(beta: float, chosen_ratio: Tensor, rejected_ratio: Tensor) -> tuple[Tensor, Tensor]:
    # Implicit reward r = beta * log(pi / pi_ref), Eq. 5, DPO paper (Rafailov et al. 2023)
    return (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


# ----------------------------------------------------------------------------- objectives
def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *,
             beta: float = 0.1, label_smoothing: float = 0.0) -> Triple:
    """DPO, or conservative DPO (cDPO) when ``label_smoothing = eps > 0``.

    All inputs ``(B,)`` summed log-probs; returns losses ``(B,)``, chosen/rejected rewards
    ``(B,)`` = ``beta * log(pi / pi_ref)``, detached. ``eps`` in ``[0, 0.5)``.
    """
    _check_positive("beta", beta)
    _check_smoothing(label_smoothing)
    cw, cl = _log_ratios(policy_chosen_logps, policy_rejected_logps,
                         reference_chosen_logps, reference_rejected_logps)
    logits = beta * (cw - cl)
    # Eq. 7, DPO paper (Rafailov et al. 2023); cDPO: Mitchell 2023, "A note on DPO with noisy preferences"
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return (losses, *_rewards(beta, cw, cl))


def robust_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *,
                    beta: float = 0.1, label_smoothing: float = 0.1) -> Triple:
    """Robust DPO (unbiased under label-flip rate ``eps``), Chowdhury et al. 2024.

    ``[(1-eps) * l(h) - eps * l(-h)] / (1 - 2 eps)`` with ``l(h) = -log sigma(beta h)``.
    Per-example values may be NEGATIVE (it is an unbiased estimator, not a likelihood).
    Inputs ``(B,)``; returns losses ``(B,)`` and detached rewards ``(B,)``. ``eps < 0.5``.
    """
    _check_positive("beta", beta)
    _check_smoothing(label_smoothing)
    eps = label_smoothing
    cw, cl = _log_ratios(policy_chosen_logps, policy_rejected_logps,
                         reference_chosen_logps, reference_rejected_logps)
    logits = beta * (cw - cl)
    # Eq. 10, "Provably Robust DPO" (Chowdhury et al. 2024)
    losses = ((1 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1 - 2 * eps)
    return (losses, *_rewards(beta, cw, cl))


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *,
             beta: float = 0.1) -> Triple:
    """IPO with ``tau = beta``: ``(h - 1/(2 tau))**2`` on SUMMED log-ratios.

    Note: TRL's ``ipo`` averages log-ratios over tokens; this follows the paper (sums), so
    the same ``beta`` is not interchangeable with TRL's. Inputs ``(B,)``; returns losses
    ``(B,)`` and detached rewards ``(B,)`` = ``beta * log(pi / pi_ref)``.
    """
    _check_positive("beta", beta)
    cw, cl = _log_ratios(policy_chosen_logps, policy_rejected_logps,
                         reference_chosen_logps, reference_rejected_logps)
    losses = ((cw - cl) - 1 / (2 * beta)) ** 2  # Eq. 17, IPO paper (Azar et al. 2023)
    return (losses, *_rewards(beta, cw, cl))


def dpop_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *,
              beta: float = 0.1, lam: float = 50.0) -> Triple:
    """DPO-Positive: DPO with a penalty when the chosen log-prob falls below the reference.

    Inputs ``(B,)``; returns losses ``(B,)`` and detached rewards ``(B,)`` (as DPO). ``lam >= 0``.
    """
    _check_positive("beta", beta)
    _check_finite("lam", lam)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    cw, cl = _log_ratios(policy_chosen_logps, policy_rejected_logps,
                         reference_chosen_logps, reference_rejected_logps)
    penalty = torch.clamp(-cw, min=0.0)  # max(0, log pi_ref(y_w) - log pi(y_w))
    losses = -F.logsigmoid(beta * (cw - cl - lam * penalty))  # Eq. 3, Smaug (Pal et al. 2024)
    return (losses, *_rewards(beta, cw, cl))


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
               reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *,
               beta: float = 0.1) -> Triple:
    """Hinge (SLiC-HF / RSO hinge-norm): ``max(0, 1 - beta h)``.

    Inputs ``(B,)``; returns losses ``(B,)`` and detached rewards ``(B,)`` (as DPO).
    """
    _check_positive("beta", beta)
    cw, cl = _log_ratios(policy_chosen_logps, policy_rejected_logps,
                         reference_chosen_logps, reference_rejected_logps)
    # hinge-norm loss, RSO (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization")
    losses = torch.relu(1 - beta * (cw - cl))
    return (losses, *_rewards(beta, cw, cl))


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
               chosen_lengths: Tensor, rejected_lengths: Tensor, *,
               beta: float = 2.0, gamma: float = 1.0) -> Triple:
    """SimPO (reference-free, length-normalised).

    ``*_logps`` are SUMMED log-probs ``(B,)``; ``*_lengths`` are completion lengths in
    tokens ``(B,)`` (int or float, > 0). ``gamma`` is the margin in REWARD units,
    subtracted directly (SimPO's code takes ``gamma/beta`` instead). Returns losses ``(B,)``
    and detached rewards ``(B,)`` = ``beta * mean token log-prob``.
    """
    _check_positive("beta", beta)
    _check_finite("gamma", gamma)
    _check_shapes(policy_chosen_logps=policy_chosen_logps,
                  policy_rejected_logps=policy_rejected_logps,
                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    dtype = policy_chosen_logps.dtype
    r_w = beta * policy_chosen_logps / chosen_lengths.to(dtype)  # Eq. 4, SimPO (Meng et al. 2024)
    r_l = beta * policy_rejected_logps / rejected_lengths.to(dtype)
    losses = -F.logsigmoid(r_w - r_l - gamma)  # Eq. 6, SimPO (Meng et al. 2024)
    return losses, r_w.detach(), r_l.detach()


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, *,
                       margin: float | Tensor = 0.0) -> Tensor:
    """Reward-model pairwise loss ``-log sigma(s_c - s_r - margin)``.

    Scores ``(B,)``; ``margin`` a float or a ``(B,)`` tensor. Returns losses ``(B,)``.
    """
    _check_shapes(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    if isinstance(margin, Tensor):
        if margin.shape not in (chosen_scores.shape, torch.Size([])):
            raise ValueError(f"margin must be a float or shape {tuple(chosen_scores.shape)}, "
                             f"got {tuple(margin.shape)}")
    else:
        _check_finite("margin", margin)
    return -F.logsigmoid(chosen_scores - rejected_scores - margin)  # Eq. 1, InstructGPT (Ouyang et al. 2022)


def kwise_ranking_loss(scores: Tensor, better: Tensor, worse: Tensor, group: Tensor, num_groups: int, *,
                       margin: float | Tensor = 0.0) -> Tensor:
    """Reward-model loss over K-wise rankings: per prompt, the mean Bradley-Terry loss over its comparisons.

    InstructGPT (Ouyang et al. 2022, Eq. 1): loss(θ) = −1/C(K,2) · E[log σ(r(x, y_w) − r(x, y_l))], all
    C(K,2) comparisons of a prompt forming ONE batch element, so each prompt weighs the same whatever
    its K and each completion is scored once. Tied responses form no comparison; a prompt's mean is
    then over its untied comparisons (= 1/C(K,2) when nothing is tied).

    ``scores`` (N,): one score per completion, the K_g completions of every prompt in the batch;
    ``better``, ``worse`` (M,): indices into ``scores`` of each comparison's winner and loser;
    ``group`` (M,): the prompt (0..num_groups-1) each comparison belongs to (each prompt has >= 1);
    ``margin``: float or (M,). Returns per-prompt losses (num_groups,).
    """
    pair = bradley_terry_loss(scores[better], scores[worse], margin=margin)  # (M,)
    total = torch.zeros(num_groups, dtype=pair.dtype, device=pair.device).index_add(0, group, pair)
    count = torch.bincount(group, minlength=num_groups).to(pair.dtype)  # comparisons per prompt
    return total / count


# ----------------------------------------------------------------------------- registry
class LossKind(StrEnum):
    DPO = "dpo"
    CDPO = "cdpo"
    IPO = "ipo"
    SIMPO = "simpo"
    DPOP = "dpop"
    HINGE = "hinge"
    ROBUST = "robust"


@dataclass(frozen=True)
class LossSpec:
    kind: LossKind
    fn: Callable[..., Triple]
    needs_reference: bool
    length_normalised: bool
    default_beta: float


def _spec(kind: LossKind, fn: Callable[..., Triple], beta: float = 0.1, *, ref: bool = True) -> LossSpec:
    return LossSpec(kind, fn, needs_reference=ref, length_normalised=not ref, default_beta=beta)


LOSSES: dict[LossKind, LossSpec] = {s.kind: s for s in (
    _spec(LossKind.DPO, dpo_loss),
    _spec(LossKind.CDPO, dpo_loss),
    _spec(LossKind.IPO, ipo_loss),
    _spec(LossKind.SIMPO, simpo_loss, 2.0, ref=False),
    _spec(LossKind.DPOP, dpop_loss),
    _spec(LossKind.HINGE, hinge_loss),
    _spec(LossKind.ROBUST, robust_dpo_loss),
)}


def get_loss_spec(name: str | LossKind) -> LossSpec:
    """The spec for a loss name; an unknown name raises ValueError listing the valid ones."""
    try:
        return LOSSES[LossKind(str(name).strip().lower())]
    except ValueError:
        valid = ", ".join(k.value for k in LossKind)
        raise ValueError(f"unknown loss {name!r}; valid losses: {valid}") from None


def effective_label_smoothing(kind: LossKind | str, label_smoothing: float) -> float:
    """The flip probability ``kind`` trains with: cDPO and robust DPO take :data:`DEFAULT_NOISE` when
    given 0 (at 0 both would be plain DPO); every other loss takes the value as given."""
    return DEFAULT_NOISE if LossKind(kind) in (LossKind.CDPO, LossKind.ROBUST) and label_smoothing == 0 else label_smoothing


def preference_loss(kind: str | LossKind, *, policy_chosen_logps: Tensor,
                    policy_rejected_logps: Tensor,
                    reference_chosen_logps: Tensor | None = None,
                    reference_rejected_logps: Tensor | None = None,
                    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                    beta: float | None = None, label_smoothing: float = 0.0,
                    gamma: float = 1.0, lam: float = 50.0) -> Triple:
    """Dispatch to the objective for ``kind``, passing only the arguments it takes.

    ``beta=None`` uses the spec's ``default_beta``. For ``cdpo`` and ``robust``,
    ``label_smoothing == 0`` (the default) means "use 0.1": both exist to model label
    noise, so eps = 0 would silently be plain DPO. Pass an explicit eps in (0, 0.5) to
    override. ``dpo`` passes ``label_smoothing`` through unchanged. Missing references
    (or lengths, for simpo) raise ValueError. Shapes as in the underlying function.
    """
    spec = get_loss_spec(kind)
    beta = spec.default_beta if beta is None else beta
    policy = (policy_chosen_logps, policy_rejected_logps)
    if spec.length_normalised:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss '{spec.kind}' needs chosen_lengths and rejected_lengths")
        return spec.fn(*policy, chosen_lengths, rejected_lengths, beta=beta, gamma=gamma)
    if reference_chosen_logps is None or reference_rejected_logps is None:
        raise ValueError(f"loss '{spec.kind}' needs reference_chosen_logps and "
                         "reference_rejected_logps")
    args = (*policy, reference_chosen_logps, reference_rejected_logps)
    if spec.kind in (LossKind.CDPO, LossKind.ROBUST):
        return spec.fn(*args, beta=beta, label_smoothing=effective_label_smoothing(spec.kind, label_smoothing))
    if spec.kind is LossKind.DPO:
        return spec.fn(*args, beta=beta, label_smoothing=label_smoothing)
    if spec.kind is LossKind.DPOP:
        return spec.fn(*args, beta=beta, lam=lam)
    return spec.fn(*args, beta=beta)
