"""Tests for alignkit.losses: golden values, closed-form gradients, limits, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.losses import (
    LOSSES,
    LossKind,
    bradley_terry_loss,
    dpo_loss,
    dpop_loss,
    get_loss_spec,
    hinge_loss,
    ipo_loss,
    preference_loss,
    robust_dpo_loss,
    simpo_loss,
)

TIGHT = {"rtol": 1e-6, "atol": 1e-7}
EXACT = {"rtol": 0.0, "atol": 0.0}
REF_LOSSES = [dpo_loss, ipo_loss, dpop_loss, hinge_loss, robust_dpo_loss]


def t(*xs, grad: bool = False) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


@pytest.fixture
def batch():
    """Two pairs. Log-ratios: chosen cw = [1.0, -0.5], rejected cl = [-0.5, 0.2], so h = [1.5, -0.7]."""
    return (t(-10.0, -5.0), t(-12.0, -4.0), t(-11.0, -4.5), t(-11.5, -4.2))


def leaf_batch(pc=(-10.0, -5.0), pr=(-12.0, -4.0), rc=(-11.0, -4.5), rr=(-11.5, -4.2)):
    return t(*pc, grad=True), t(*pr, grad=True), t(*rc), t(*rr)


def grads(fn, pc, pr, rc, rr, **kw):
    losses, *_ = fn(pc, pr, rc, rr, **kw)
    losses.sum().backward()
    return pc.grad, pr.grad


# --------------------------------------------------------------------------- golden values
def test_dpo_golden(batch):
    """beta=0.1, h=[1.5, -0.7] -> beta*h = [0.15, -0.07].
    loss = -log sigma(beta h) = log(1 + exp(-beta h)):
      log(1 + e^-0.15) = log(1 + 0.860707976) = 0.6209570477895321
      log(1 + e^0.07)  = log(1 + 1.072508181) = 0.7287595555486972
    rewards: chosen = 0.1*[1.0, -0.5] = [0.1, -0.05]; rejected = 0.1*[-0.5, 0.2] = [-0.05, 0.02].
    """
    losses, cr, rr = dpo_loss(*batch, beta=0.1)
    torch.testing.assert_close(losses, t(0.6209570477895321, 0.7287595555486972), **TIGHT)
    torch.testing.assert_close(cr, t(0.1, -0.05), **TIGHT)
    torch.testing.assert_close(rr, t(-0.05, 0.02), **TIGHT)


def test_cdpo_golden(batch):
    """eps=0.2, beta*h = [0.15, -0.07].
    -log sigma(-z) = log(1 + e^z): log(1 + e^0.15) = 0.770957047789532, log(1 + e^-0.07) = 0.6587595555486971.
    loss = 0.8 * DPO + 0.2 * flipped:
      0.8*0.6209570477895321 + 0.2*0.770957047789532  = 0.6509570477895321
      0.8*0.7287595555486972 + 0.2*0.6587595555486971 = 0.7147595555486972
    """
    losses, _, _ = dpo_loss(*batch, beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(losses, t(0.6509570477895321, 0.7147595555486972), **TIGHT)


def test_robust_golden(batch):
    """eps=0.2: loss = (0.8*l(h) - 0.2*l(-h)) / (1 - 0.4), with the values of test_cdpo_golden:
      (0.8*0.6209570477895321 - 0.2*0.770957047789532)  / 0.6 = 0.3425742... / 0.6 = 0.570957047789532
      (0.8*0.7287595555486972 - 0.2*0.6587595555486971) / 0.6 = 0.4512557... / 0.6 = 0.7520928888820306
    """
    losses, cr, _ = robust_dpo_loss(*batch, beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(losses, t(0.570957047789532, 0.7520928888820306), **TIGHT)
    torch.testing.assert_close(cr, t(0.1, -0.05), **TIGHT)


def test_ipo_golden(batch):
    """tau=beta=0.1 -> 1/(2 tau) = 5. loss = (h - 5)^2 = (1.5-5)^2 = 12.25, (-0.7-5)^2 = 32.49."""
    losses, cr, rr = ipo_loss(*batch, beta=0.1)
    torch.testing.assert_close(losses, t(12.25, 32.49), **TIGHT)
    torch.testing.assert_close(cr, t(0.1, -0.05), **TIGHT)
    torch.testing.assert_close(rr, t(-0.05, 0.02), **TIGHT)


def test_dpop_golden(batch):
    """beta=0.1, lam=50. penalty = max(0, -cw) = max(0, [-1.0, 0.5]) = [0, 0.5].
    pair 1: penalty 0 -> DPO value 0.6209570477895321.
    pair 2: beta*(h - 50*0.5) = 0.1*(-0.7 - 25) = -2.57; loss = log(1 + e^2.57)
            = log(1 + 13.0658...) = 2.643748056714134.
    """
    losses, cr, _ = dpop_loss(*batch, beta=0.1, lam=50.0)
    torch.testing.assert_close(losses, t(0.6209570477895321, 2.643748056714134), **TIGHT)
    torch.testing.assert_close(cr, t(0.1, -0.05), **TIGHT)


def test_hinge_golden(batch):
    """beta=0.1: loss = max(0, 1 - beta h) = max(0, 1 - 0.15) = 0.85, max(0, 1 + 0.07) = 1.07.
    beta=1: h=[1.5, -0.7] -> max(0, -0.5) = 0, max(0, 1.7) = 1.7.
    """
    losses, _, _ = hinge_loss(*batch, beta=0.1)
    torch.testing.assert_close(losses, t(0.85, 1.07), **TIGHT)
    losses, _, _ = hinge_loss(*batch, beta=1.0)
    torch.testing.assert_close(losses, t(0.0, 1.7), **TIGHT)


def test_simpo_golden():
    """beta=2, gamma=1. chosen logps [-10, -5], lengths [5, 2]; rejected [-12, -4], lengths [4, 4].
    r_w = 2*[-10/5, -5/2] = [-4, -5]; r_l = 2*[-12/4, -4/4] = [-6, -2].
    z = r_w - r_l - gamma = [1, -4].
    loss = log(1 + e^-z) = log(1 + e^-1) = 0.31326168751822286; log(1 + e^4) = 4.0181499279178094.
    """
    losses, cr, rr = simpo_loss(t(-10.0, -5.0), t(-12.0, -4.0), torch.tensor([5, 2]),
                                torch.tensor([4, 4]), beta=2.0, gamma=1.0)
    torch.testing.assert_close(losses, t(0.31326168751822286, 4.0181499279178094), **TIGHT)
    torch.testing.assert_close(cr, t(-4.0, -5.0), **TIGHT)
    torch.testing.assert_close(rr, t(-6.0, -2.0), **TIGHT)


def test_bradley_terry_golden():
    """s_c=[2.0, 0.3], s_r=[0.5, 1.2].
    margin 0: d = [1.5, -0.9]; log(1+e^-1.5) = 0.2014132779827524, log(1+e^0.9) = 1.2411538747320878.
    margin tensor [1.0, 0.5]: d = [0.5, -1.4]; log(1+e^-0.5) = 0.4740769841801067,
    log(1+e^1.4) = 1.620417409918451.
    """
    sc, sr = t(2.0, 0.3), t(0.5, 1.2)
    torch.testing.assert_close(bradley_terry_loss(sc, sr),
                               t(0.2014132779827524, 1.2411538747320878), **TIGHT)
    torch.testing.assert_close(bradley_terry_loss(sc, sr, margin=t(1.0, 0.5)),
                               t(0.4740769841801067, 1.620417409918451), **TIGHT)
    torch.testing.assert_close(bradley_terry_loss(sc, sr, margin=0.5),
                               -F.logsigmoid(sc - sr - 0.5), **EXACT)


# --------------------------------------------------------------------------- gradients
def test_dpo_gradient_closed_form():
    beta = 0.1
    pc, pr, rc, rr = leaf_batch()
    g_w, g_l = grads(dpo_loss, pc, pr, rc, rr, beta=beta)
    r_w, r_l = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    torch.testing.assert_close(g_w, -beta * torch.sigmoid(r_l - r_w), **TIGHT)
    torch.testing.assert_close(g_l, beta * torch.sigmoid(r_l - r_w), **TIGHT)


def test_cdpo_gradient_closed_form():
    beta, eps = 0.1, 0.2
    pc, pr, rc, rr = leaf_batch()
    g_w, g_l = grads(dpo_loss, pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    p_hat = torch.sigmoid(beta * ((pc - rc) - (pr - rr))).detach()
    torch.testing.assert_close(g_w, beta * (p_hat - (1 - eps)), **TIGHT)
    torch.testing.assert_close(g_l, -beta * (p_hat - (1 - eps)), **TIGHT)


def test_ipo_gradient_closed_form():
    tau = 0.1
    pc, pr, rc, rr = leaf_batch()
    g_w, g_l = grads(ipo_loss, pc, pr, rc, rr, beta=tau)
    h = ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(g_w, 2 * (h - 1 / (2 * tau)), **TIGHT)
    torch.testing.assert_close(g_l, -2 * (h - 1 / (2 * tau)), **TIGHT)


def test_simpo_gradient_closed_form():
    beta, gamma = 2.0, 1.0
    pc, pr = t(-10.0, -5.0, grad=True), t(-12.0, -4.0, grad=True)
    lw, ll = t(5.0, 2.0), t(4.0, 4.0)
    losses, r_w, r_l = simpo_loss(pc, pr, lw, ll, beta=beta, gamma=gamma)
    losses.sum().backward()
    s = torch.sigmoid(-(r_w - r_l - gamma))
    torch.testing.assert_close(pc.grad, -(beta / lw) * s, **TIGHT)
    torch.testing.assert_close(pr.grad, (beta / ll) * s, **TIGHT)


def test_hinge_gradient_closed_form():
    """beta=1, h=[1.5, -0.7]: pair 1 inactive (1 - 1.5 < 0) -> 0; pair 2 active -> -beta."""
    pc, pr, rc, rr = leaf_batch()
    g_w, g_l = grads(hinge_loss, pc, pr, rc, rr, beta=1.0)
    torch.testing.assert_close(g_w, t(0.0, -1.0), **EXACT)
    torch.testing.assert_close(g_l, t(0.0, 1.0), **EXACT)


# --------------------------------------------------------------------------- limits
def test_cdpo_eps_zero_is_dpo(batch):
    a, _, _ = dpo_loss(*batch, beta=0.3, label_smoothing=0.0)
    b = -F.logsigmoid(0.3 * ((batch[0] - batch[2]) - (batch[1] - batch[3])))
    torch.testing.assert_close(a, b, **EXACT)


def test_robust_eps_zero_is_dpo(batch):
    a = robust_dpo_loss(*batch, beta=0.3, label_smoothing=0.0)
    b = dpo_loss(*batch, beta=0.3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **EXACT)


def test_simpo_gamma_zero_is_reference_free_dpo():
    pc, pr = t(-10.0, -6.0, -3.0), t(-12.0, -4.0, -3.5)
    n = t(4.0, 4.0, 4.0)
    zero = torch.zeros(3, dtype=torch.float64)
    a = simpo_loss(pc, pr, n, n, beta=2.0, gamma=0.0)
    b = dpo_loss(pc / n, pr / n, zero, zero, beta=2.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TIGHT)


def test_dpop_lambda_zero_is_dpo(batch):
    a = dpop_loss(*batch, beta=0.1, lam=0.0)
    b = dpo_loss(*batch, beta=0.1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TIGHT)


def test_dpop_equals_dpo_when_chosen_not_below_reference():
    batch = (t(-3.0, -5.0), t(-9.0, -4.0), t(-4.0, -5.0), t(-8.0, -6.0))  # pc >= rc everywhere
    a = dpop_loss(*batch, beta=0.1, lam=50.0)
    b = dpo_loss(*batch, beta=0.1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TIGHT)


def test_bt_margin_zero():
    sc, sr = t(1.0, -2.0, 30.0), t(0.0, 3.0, -30.0)
    torch.testing.assert_close(bradley_terry_loss(sc, sr, margin=0.0), -F.logsigmoid(sc - sr), **EXACT)


def test_cdpo_symmetry(batch):
    """cDPO(eps)(w, l) == (1 - eps) * DPO(w, l) + eps * DPO(l, w)."""
    pc, pr, rc, rr = batch
    eps = 0.3
    c, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps)
    fwd, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    swp, _, _ = dpo_loss(pr, pc, rr, rc, beta=0.1)
    torch.testing.assert_close(c, (1 - eps) * fwd + eps * swp, **TIGHT)


# --------------------------------------------------------------------------- detached / shapes
@pytest.mark.parametrize("fn", REF_LOSSES)
def test_rewards_detached_and_shaped(fn):
    pc, pr, rc, rr = leaf_batch()
    losses, cr, rj = fn(pc, pr, rc, rr)
    assert losses.shape == cr.shape == rj.shape == (2,)
    assert losses.requires_grad and not cr.requires_grad and not rj.requires_grad


def test_simpo_rewards_detached_and_shaped():
    pc, pr = t(-10.0, -5.0, grad=True), t(-12.0, -4.0, grad=True)
    losses, cr, rj = simpo_loss(pc, pr, torch.tensor([5, 2]), torch.tensor([4, 4]))
    assert losses.shape == cr.shape == rj.shape == (2,)
    assert losses.requires_grad and not cr.requires_grad and not rj.requires_grad


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(t(1.0, 2.0), t(1.0), t(1.0, 2.0), t(1.0, 2.0))


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7, math.nan])
@pytest.mark.parametrize("fn", [dpo_loss, robust_dpo_loss])
def test_invalid_label_smoothing_raises(fn, eps, batch):
    with pytest.raises(ValueError, match=r"label_smoothing.*\[0, 0.5\)"):
        fn(*batch, label_smoothing=eps)


@pytest.mark.parametrize("fn", REF_LOSSES)
@pytest.mark.parametrize("beta", [0.0, -1.0, math.inf])
def test_invalid_beta_raises(fn, beta, batch):
    with pytest.raises(ValueError, match="beta"):
        fn(*batch, beta=beta)


def test_invalid_lam_raises(batch):
    with pytest.raises(ValueError, match="lam"):
        dpop_loss(*batch, lam=-1.0)


# --------------------------------------------------------------------------- registry
def test_every_kind_has_spec():
    assert set(LOSSES) == set(LossKind)
    for kind, spec in LOSSES.items():
        assert spec.kind is kind
        assert callable(spec.fn)


def test_only_simpo_reference_free_and_length_normalised():
    assert [k for k, s in LOSSES.items() if not s.needs_reference] == [LossKind.SIMPO]
    assert [k for k, s in LOSSES.items() if s.length_normalised] == [LossKind.SIMPO]


def test_default_betas():
    expected = {"dpo": 0.1, "cdpo": 0.1, "ipo": 0.1, "simpo": 2.0, "dpop": 0.1, "hinge": 0.1,
                "robust": 0.1}
    assert {k.value: s.default_beta for k, s in LOSSES.items()} == expected


def test_get_loss_spec():
    assert get_loss_spec("dpo") is LOSSES[LossKind.DPO]
    assert get_loss_spec(LossKind.SIMPO) is LOSSES[LossKind.SIMPO]
    with pytest.raises(ValueError) as info:
        get_loss_spec("kto")
    for kind in LossKind:
        assert kind.value in str(info.value)


@pytest.mark.parametrize("kind", ["dpo", "ipo", "dpop", "hinge"])
def test_preference_loss_dispatch(kind, batch):
    spec = get_loss_spec(kind)
    got = preference_loss(kind, policy_chosen_logps=batch[0], policy_rejected_logps=batch[1],
                          reference_chosen_logps=batch[2], reference_rejected_logps=batch[3])
    want = spec.fn(*batch, beta=spec.default_beta)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **EXACT)


@pytest.mark.parametrize("kind,fn", [("cdpo", dpo_loss), ("robust", robust_dpo_loss)])
def test_preference_loss_noise_kinds(kind, fn, batch):
    kw = dict(policy_chosen_logps=batch[0], policy_rejected_logps=batch[1],
              reference_chosen_logps=batch[2], reference_rejected_logps=batch[3])
    default = preference_loss(kind, **kw)[0]  # label_smoothing=0 -> documented default 0.1
    torch.testing.assert_close(default, fn(*batch, beta=0.1, label_smoothing=0.1)[0], **EXACT)
    explicit = preference_loss(kind, label_smoothing=0.25, beta=0.5, **kw)[0]
    torch.testing.assert_close(explicit, fn(*batch, beta=0.5, label_smoothing=0.25)[0], **EXACT)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(kind, label_smoothing=0.5, **kw)


def test_preference_loss_simpo():
    pc, pr, lw, ll = t(-10.0, -5.0), t(-12.0, -4.0), t(5.0, 2.0), t(4.0, 4.0)
    got = preference_loss("simpo", policy_chosen_logps=pc, policy_rejected_logps=pr,
                          chosen_lengths=lw, rejected_lengths=ll, gamma=0.5)
    want = simpo_loss(pc, pr, lw, ll, beta=2.0, gamma=0.5)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **EXACT)
    with pytest.raises(ValueError, match="lengths"):
        preference_loss("simpo", policy_chosen_logps=pc, policy_rejected_logps=pr)


@pytest.mark.parametrize("kind", [k for k in LossKind if k is not LossKind.SIMPO])
def test_preference_loss_missing_reference_raises(kind, batch):
    with pytest.raises(ValueError, match="reference"):
        preference_loss(kind, policy_chosen_logps=batch[0], policy_rejected_logps=batch[1],
                        reference_chosen_logps=batch[2])


def test_preference_loss_unknown_kind(batch):
    with pytest.raises(ValueError, match="valid losses"):
        preference_loss("nope", policy_chosen_logps=batch[0], policy_rejected_logps=batch[1])


# --------------------------------------------------------------------------- properties
finite = st.floats(-50.0, 50.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(h=finite, delta=st.floats(1e-3, 10.0), beta=st.floats(0.01, 5.0))
def test_dpo_nonnegative_and_decreasing_in_h(h, delta, beta):
    zero = torch.zeros(1, dtype=torch.float64)

    def loss_at(x):
        return dpo_loss(t(x), zero, zero, zero, beta=beta)[0].item()

    lo, hi = loss_at(h), loss_at(h + delta)
    assert lo >= 0.0 and hi >= 0.0
    assert hi <= lo


@settings(max_examples=100, deadline=None)
@given(eps=st.floats(0.01, 0.49), beta=st.floats(0.05, 2.0), delta=st.floats(0.05, 5.0))
def test_cdpo_minimum_at_one_minus_eps(eps, beta, delta):
    """The cDPO loss is minimised where p_hat = sigma(beta h) = 1 - eps, i.e. h* = logit(1-eps)/beta."""
    h_star = math.log((1 - eps) / eps) / beta
    zero = torch.zeros(1, dtype=torch.float64)
    x = t(h_star, grad=True)
    loss, _, _ = dpo_loss(x, zero, zero, zero, beta=beta, label_smoothing=eps)
    loss.backward()
    assert abs(x.grad.item()) < 1e-12
    for h in (h_star - delta, h_star + delta):
        other = dpo_loss(t(h), zero, zero, zero, beta=beta, label_smoothing=eps)[0].item()
        assert other > loss.item()


# --------------------------------------------------------------------------- stability
@pytest.mark.parametrize("fn", REF_LOSSES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_h_is_finite(fn, sign, dtype):
    pc = torch.tensor([sign * 1e4], dtype=dtype, requires_grad=True)
    pr = torch.tensor([0.0], dtype=dtype, requires_grad=True)
    zero = torch.zeros(1, dtype=dtype)
    losses, cr, rj = fn(pc, pr, zero, zero, beta=1.0)
    losses.sum().backward()
    for x in (losses, cr, rj, pc.grad, pr.grad):
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_large_margin_simpo_and_bt_finite(sign):
    pc = torch.tensor([sign * 1e4], requires_grad=True)
    pr = torch.tensor([0.0], requires_grad=True)
    n = torch.tensor([1])
    losses, _, _ = simpo_loss(pc, pr, n, n, beta=1.0)
    bt = bradley_terry_loss(pc, pr)
    (losses.sum() + bt.sum()).backward()
    for x in (losses, bt, pc.grad, pr.grad):
        assert torch.isfinite(x).all()
    if sign > 0:
        assert losses.item() == 0.0 and bt.item() == 0.0
    else:
        torch.testing.assert_close(bt, torch.tensor([1e4]))
