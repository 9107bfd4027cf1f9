"""Attention of a packed rollout computed over its padded rows: prompt sharing without the long rows' cost.

``train/rl_common.pack_rollout`` packs a GRPO group (one prompt, K responses) into ONE row, the
prompt once, so the linear maps (nearly all of a step's products) run on P + ΣT tokens instead of
K·(P + T). With the packed (G, 1, L, L) mask, though, attention costs L² per group row: a response
"attends" to the other responses' positions, only to mask them out (the kernels skip nothing). With
K long responses that outweighed the saving and the packed pass was not taken.

Here each layer's queries, keys and values are copied from the packed positions into the padded
rollout's layout (B, S) = (responses, prompt + response) — the shared prompt's keys once per row —
attention runs there exactly as in the padded pass (B·S² pairs, transformers' SDPA path, causal over
each row's real tokens), and the outputs are copied back. The copies are index_select, whose backward
adds: a prompt key's gradient is the sum over the K rows that read it, as in the packed graph.

Dispatch: transformers hands every keyword of a model's forward to each layer's attention function.
:func:`install` registers, in transformers' ``AttentionInterface``, an ``"sdpa"`` that runs
:func:`rows_attention` when the call carries the layout (``alignkit_rows=``) and transformers' own SDPA
otherwise, so nothing changes for a call without it. The layout travels with the keywords, so gradient
checkpointing's recomputation in the backward takes the same path as the forward (a switch of the
model's attention implementation for the duration of the forward would not reach it). Only models whose
config selects ``"sdpa"`` (the default on CPU and GPU) are given the layout: :func:`applies`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowLayout:
    """Where the packed positions sit in the padded rows.

    gather   (B·S,)          flat packed index (into G·L) of each padded position; padding: any (0)
    scatter  (G·L,)          flat padded index (into B·S) whose attention output each packed position takes
                             (a shared prompt token: its first row's copy); packed fill: any (0)
    mask     (B, 1, S, S)    bool: a real query sees the real keys at or before it in its row; a padding
                             query sees only itself (its output is never read, but must be finite)
    rows, width              B, S
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    mask: torch.Tensor
    rows: int
    width: int


def row_layout(real: torch.Tensor, packed_index: torch.Tensor, packed_size: int, first_row: torch.Tensor) -> RowLayout:
    """The layout for padded rows ``real`` (B, S) bool (True on real tokens), with ``packed_index`` (B, S)
    the flat packed position of each real token (ignored elsewhere) and ``first_row`` (B,) bool, True for
    the row whose copy of the prompt's outputs the packed prompt takes (the first of each group)."""
    rows, width = real.shape
    gather = torch.where(real, packed_index, 0).reshape(-1)  # (B·S,)
    scatter = torch.zeros(packed_size, dtype=torch.long, device=real.device)
    flat = torch.arange(rows * width, device=real.device).view(rows, width)
    # response tokens belong to one row; prompt tokens to K rows, of which the first writes last
    order = torch.argsort(first_row.to(torch.int8), stable=True)  # rows not first, then first rows
    for b in order.tolist():
        scatter[packed_index[b][real[b]]] = flat[b][real[b]]
    causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()  # (S, S) key <= query
    query_real, key_real = real[:, :, None], real[:, None, :]
    mask = (causal & key_real & query_real) | (~query_real & torch.eye(width, dtype=torch.bool, device=real.device))
    return RowLayout(gather=gather, scatter=scatter, mask=mask[:, None], rows=rows, width=width)


def rows_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   *, alignkit_rows: RowLayout, **kwargs):
    """transformers' attention signature. query (G, heads, L, d); key, value (G, kv heads, L, d) at the
    packed positions. Returns ((G, L, heads, d), None), as ``sdpa_attention_forward`` does. The packed
    ``attention_mask`` is not used: ``alignkit_rows.mask`` takes its place."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lay = alignkit_rows
    groups, length = query.shape[0], query.shape[2]

    def to_rows(x):  # (G, h, L, d) -> (B, h, S, d)
        flat = x.transpose(1, 2).reshape(groups * length, x.shape[1], x.shape[3])  # (G·L, h, d)
        return flat.index_select(0, lay.gather).view(lay.rows, lay.width, x.shape[1], x.shape[3]).transpose(1, 2)

    out, _ = sdpa_attention_forward(module, to_rows(query), to_rows(key), to_rows(value), lay.mask,
                                    dropout=dropout, scaling=scaling, **kwargs)  # (B, S, heads, d)
    heads, dim = out.shape[2], out.shape[3]
    packed = out.reshape(lay.rows * lay.width, heads, dim).index_select(0, lay.scatter)  # (G·L, heads, d)
    return packed.view(groups, length, heads, dim), None


def _sdpa_or_rows(module, query, key, value, attention_mask, *args, **kwargs):
    """The ``"sdpa"`` :func:`install` registers: :func:`rows_attention` for calls carrying ``alignkit_rows``,
    else the function registered before."""
    if kwargs.get("alignkit_rows") is not None:
        return rows_attention(module, query, key, value, attention_mask, *args, **kwargs)
    kwargs.pop("alignkit_rows", None)
    return _previous["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)


_previous: dict = {}  # "sdpa" -> the function registered before install()


def install() -> None:
    """Register :func:`_sdpa_or_rows` as transformers' ``"sdpa"`` attention (once; calls without the
    layout keyword go to the function it replaces)."""
    from transformers import AttentionInterface

    current = AttentionInterface._global_mapping["sdpa"]
    if current is not _sdpa_or_rows:
        _previous["sdpa"] = current
        AttentionInterface.register("sdpa", _sdpa_or_rows)


def applies(model) -> bool:
    """Does the model's config select transformers' SDPA (the implementation :func:`rows_attention` reproduces)?"""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"
