"""ops.grad_in_place: weight gradients accumulated straight into .grad equal stock autograd's, through
the lean LM head and a tied embedding, across accumulated backwards; the loop's zero/settle keep
stock semantics; restore puts the modules back; a DPO run with it ends with the stock run's weights."""

from __future__ import annotations

import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file
from test_logprobs import V, _batch  # a padded row, a longer prompt: the log-prob tests' batch
from test_loop import _run, _train_args, small_prefs  # noqa: F401, F811 (a fixture)
from torch import nn

from alignkit.ops import grad_in_place
from alignkit.ops.logprobs import sequence_logprobs, token_logprobs

def _grads(model, micro_batches):
    weights = torch.tensor([1.0, -0.5, 2.0, 0.7], dtype=torch.float64)  # one per row of _batch
    for seed in range(micro_batches):  # accumulated backwards add into .grad
        ids, attn, comp = _batch(seed)
        total, _, _ = sequence_logprobs(token_logprobs(model, ids, attn, comp), comp)
        (total * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_in_place_gradients_equal_stock_autograd_tied_and_untied():
    for tie in (False, True):
        stock_model = make_tiny_llama(V, tie=tie).double()
        model = make_tiny_llama(V, tie=tie).double()
        stock = _grads(stock_model, 2)
        handle = grad_in_place.install(model)
        assert sum(type(m) is grad_in_place.GradInPlaceLinear for m in model.modules()) == 2 * 7 + 1  # + lm_head
        ours = _grads(model, 2)
        for name in stock:
            torch.testing.assert_close(ours[name], stock[name], rtol=1e-10, atol=1e-12, msg=f"tie={tie} {name}")
        # a second step after the loop's zero_grad: the buffers are reused, not reallocated
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        kept = model.model.layers[0].mlp.up_proj.weight.grad
        handle.zero_grad(opt)
        assert model.model.layers[0].mlp.up_proj.weight.grad is kept and not kept.any()
        stock_model.zero_grad(set_to_none=True)
        ours, stock = _grads(model, 1), _grads(stock_model, 1)
        for name in stock:
            torch.testing.assert_close(ours[name], stock[name], rtol=1e-10, atol=1e-12, msg=f"step 2 {name}")
        handle.restore()
        assert not any(type(m) is grad_in_place.GradInPlaceLinear for m in model.modules())
        assert not any(grad_in_place.accumulates_in_place(p) for p in model.parameters())


def test_bias_input_grad_and_settle_drop_an_unused_weight():
    torch.manual_seed(0)
    used, unused = nn.Linear(5, 4).double(), nn.Linear(5, 4).double()
    ref = nn.Linear(5, 4).double()
    ref.load_state_dict(used.state_dict())
    net = nn.ModuleList([used, unused])
    handle = grad_in_place.install(net)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # the second step runs on zeroed, kept buffers
        handle.zero_grad(opt)
        x.grad = x_ref.grad = None
        (used(x) ** 2).sum().backward()
        ref.zero_grad(set_to_none=True)
        (ref(x_ref) ** 2).sum().backward()
        handle.settle()
        for a, b in ((used.weight.grad, ref.weight.grad), (used.bias.grad, ref.bias.grad), (x.grad, x_ref.grad)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert unused.weight.grad is None  # as after zero_grad(set_to_none=True): the optimizer skips it
    # a gradient arriving through autograd's own accumulator (autocast, another op) still counts
    handle.zero_grad(opt)
    (torch.nn.functional.linear(x.detach(), unused.weight).sum()).backward()
    handle.settle()
    assert unused.weight.grad is not None and unused.weight.grad.abs().sum() > 0
    handle.restore()


def test_dpo_run_with_in_place_gradients_ends_with_the_stock_weights(tiny_model_dir, small_prefs, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    stock, ours = tmp_path / "stock", tmp_path / "ours"
    monkeypatch.setenv("ALIGNKIT_GRAD_IN_PLACE", "0")
    assert _run(_train_args(tiny_model_dir, small_prefs, stock, "--max-steps", "3", "--grad-accum", "2")) == 0
    monkeypatch.setenv("ALIGNKIT_GRAD_IN_PLACE", "1")
    assert _run(_train_args(tiny_model_dir, small_prefs, ours, "--max-steps", "3", "--grad-accum", "2")) == 0
    a, b = load_file(str(stock / "model.safetensors")), load_file(str(ours / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    changed = sum(not torch.equal(a[k], start[k]) for k in a if k in start)
    assert changed > 0
