"""oneDNN's products on pre-blocked weights, for decoding on the CPU (generate.py, llama_decode.py).

A weight is blocked once per generation for B-row inputs, then every product reuses the copy. These
are the ops inductor's CPU backend uses for frozen linears, and they are private torch API:
:func:`prepack` returns None where a build lacks them, and the callers fall back.
"""

from __future__ import annotations

import torch


def decode_dtype() -> torch.dtype:
    """The products' dtype: autocast's on the CPU when it is on (bf16 for ``--precision bf16``), else fp32."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32


def prepack(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """oneDNN's blocked copy of a (V, H) weight, laid out for products with ``rows`` rows; None where
    the build lacks the op."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x (rows, H) -> (rows, V) in ``dtype`` from ``packed`` = :func:`prepack` (W in ``dtype``); x is cast to
    ``dtype`` first, as autocast casts a linear's input. 2-D only: the decoding hot path, no reshapes."""
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")


def prepacked_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for x (..., H): :func:`linear` over x's rows; returns (..., V) in ``dtype``."""
    y = linear(x.reshape(-1, x.shape[-1]), packed, bias, dtype)  # (rows, V)
    return y.reshape(*x.shape[:-1], y.shape[-1])
