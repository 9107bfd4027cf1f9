"""Weight gradients written straight into persistent ``.grad`` buffers (one process, fp32).

Stock autograd gives every ``nn.Linear`` weight a fresh (out, in) gradient tensor per backward:
with ``zero_grad(set_to_none=True)`` the next backward allocates it again; otherwise it is added
into ``.grad`` and freed. On a CPU with glibc's mmap threshold at 64 KiB (the CLI's setting,
``alignkit.memory``) those fresh blocks are mmaps, zero-filled by the kernel page by page as the
matmul first writes them, and unmapped again at ``zero_grad``: on SmolLM2-135M (424 MB of linear
weights) that made the weight-gradient products of an embedded DPO step run at a third to a half
of their rate in isolation (benchmarks/README.md). Here the product accumulates into ``weight.grad`` with one
``addmm_`` (``.grad += dY^T X``), the buffers live for the whole run, and the loop zeroes them in
place instead of freeing them. Megatron-LM calls this gradient-accumulation fusion.

Opt-in (``ALIGNKIT_GRAD_IN_PLACE=1``, train/loop.py): once glibc reuses freed blocks
(``memory.for_training``) most of the fault cost is gone anyway, and persistent buffers hold the
gradients through the forward. Measured side by side (bench_dpo.py, embedded, ``defaults``):
147 -> 165 tokens/s for +200 MB peak RSS; on the tiny model no faster, +50 MB.

The gradient is the same sum in the same precision; the weight's autograd accumulator never
runs, so hooks on it (DDP's, FSDP's) would never fire: :func:`install` is for single-process
runs only, and a model under ``torch.distributed`` data parallelism keeps stock autograd.
Under autocast (bf16), without grad, or for a frozen weight, the layer runs stock ``F.linear``.
"""

from __future__ import annotations

import torch
from torch import nn

_FLAG = "_alignkit_grad_in_place"
_TOUCHED = "_alignkit_grad_touched"  # set when this step's backward gave the weight a gradient


def accumulates_in_place(weight: torch.Tensor) -> bool:
    """True if ``weight``'s gradient is accumulated into ``weight.grad`` by the op that uses it."""
    return getattr(weight, _FLAG, False) and weight.requires_grad


def add_to_grad(weight: torch.Tensor, rows_t: torch.Tensor, cols: torch.Tensor) -> None:
    """``weight.grad += rows_t @ cols`` in place; allocates ``weight.grad`` the first time.

    rows_t: (out, n), cols: (n, in), both in ``weight``'s dtype."""
    if weight.grad is None:
        weight.grad = rows_t @ cols  # (out, in)
    else:
        weight.grad.addmm_(rows_t, cols)
    setattr(weight, _TOUCHED, True)


class _LinearGradInPlace(torch.autograd.Function):
    """y = x W^T + b; backward: dx = dy W, W.grad += dy^T x (in place), db = Σ dy."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # x (..., in); weight (out, in); bias (out,) or None
        ctx.save_for_backward(x, weight)
        ctx.param, ctx.has_bias = weight, bias is not None
        return nn.functional.linear(x, weight, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad):  # grad (..., out)
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (n, out)
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None  # (..., in)
        add_to_grad(ctx.param, g2.T, x.reshape(-1, x.shape[-1]))
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


class GradInPlaceLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose weight gradient goes straight into ``.grad``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and accumulates_in_place(self.weight)) \
                or torch.is_autocast_enabled(x.device.type) or x.dtype != self.weight.dtype:
            return super().forward(x)
        return _LinearGradInPlace.apply(x, self.weight, self.bias)


def is_plain(t: torch.Tensor) -> bool:
    """False for a sharded FSDP ``DTensor`` (its hooks unshard it; ops that bypass autograd's accumulator
    must leave it alone)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return True
    return not isinstance(t, DTensor)


class InPlaceGrads:
    """The modules :func:`install` changed, and the loop's side of the contract: :meth:`zero_grad` zeroes the
    marked weights' buffers in place (one memset, ~18 ms for SmolLM2-135M, instead of freeing and
    re-faulting them) and :meth:`settle`, between the last backward and the optimizer step, drops the
    buffer of a marked weight that got no gradient this step, so the optimizer skips it as it would
    after ``zero_grad(set_to_none=True)``. :meth:`restore` puts the modules back."""

    def __init__(self, swapped: list[nn.Module], weights: list[torch.Tensor]):
        self._swapped, self.weights = swapped, weights
        # a gradient that still arrives through autograd's accumulator (autocast, another op) counts too
        self._hooks = [w.register_post_accumulate_grad_hook(_touch) for w in weights]

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        kept = [(w, w.grad) for w in self.weights if w.grad is not None]
        optimizer.zero_grad(set_to_none=True)
        if kept:
            torch._foreach_zero_([g for _, g in kept])
        for w, g in kept:
            w.grad = g
        for w in self.weights:
            setattr(w, _TOUCHED, False)

    def settle(self) -> None:
        for w in self.weights:
            if not getattr(w, _TOUCHED, False):
                w.grad = None

    def restore(self) -> None:
        for h in self._hooks:
            h.remove()
        for m in self._swapped:
            m.__class__ = nn.Linear
        for w in self.weights:
            for attr in (_FLAG, _TOUCHED):
                if hasattr(w, attr):
                    delattr(w, attr)


def _touch(weight: torch.Tensor) -> None:
    setattr(weight, _TOUCHED, True)


def install(model: nn.Module) -> InPlaceGrads:
    """Route every trainable ``nn.Linear`` of ``model`` through :class:`GradInPlaceLinear`, and mark their
    weights (``ops.logprobs`` then accumulates the LM head's gradient, and a tied embedding's, in place).

    Only exact ``nn.Linear`` modules change (peft's LoRA layers and quantised layers are left
    alone). Single process only (see the module docstring). The loop then zeroes with
    :meth:`InPlaceGrads.zero_grad`, calls :meth:`InPlaceGrads.settle` before clipping, and
    :meth:`InPlaceGrads.restore` at the end.
    """
    swapped: list[nn.Module] = []
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.requires_grad and is_plain(module.weight) \
                and module.weight.dtype in (torch.float32, torch.float64):
            module.__class__ = GradInPlaceLinear
            swapped.append(module)
    weights: list[torch.Tensor] = []
    for module in swapped:
        if not getattr(module.weight, _FLAG, False):
            setattr(module.weight, _FLAG, True)
            weights.append(module.weight)
    return InPlaceGrads(swapped, weights)
