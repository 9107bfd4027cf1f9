"""Batch :class:`~alignkit.data.sft.SFTExample` s: padded rows, or packed end to end in one row.

Both layouts carry ``loss_units``, the number of scored tokens, so the loop divides the step's
summed loss by the step's total (a per-token mean, whatever the batch x accumulation split).
"""

from __future__ import annotations

import torch

from .sft import SFTExample


def collate_sft(examples: list[SFTExample], pad_token_id: int, pad_to_multiple: int = 1) -> dict:
    """One right-padded row per example (T = the longest example in THIS batch, rounded up to
    ``pad_to_multiple``: few distinct shapes for bf16 on CPU, see ``collate_pairs_packed``).

    ``input_ids``, ``attention_mask`` (B, T) long; ``completion_mask`` (B, T) bool, True on
    tokens that carry loss (never padding); ``loss_units`` int; ``index`` (B,) long.
    """
    if not examples:
        raise ValueError("collate_sft needs at least one example")
    longest = max(len(ex.ids) for ex in examples)
    width = longest + (-longest % pad_to_multiple)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    completion_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, ex in enumerate(examples):
        n = len(ex.ids)
        input_ids[i, :n] = torch.tensor(ex.ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, :n] = torch.tensor(ex.loss_mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "loss_units": _loss_units(examples), "index": torch.tensor([ex.index for ex in examples])}


def collate_sft_packed(examples: list[SFTExample], pad_token_id: int, pad_to_multiple: int = 1) -> dict:
    """The same examples end to end in ONE row (1, L), as ``collate_pairs_packed`` does for pairs.

    ``position_ids`` restart at 0 for each example; transformers turns the restarts into a
    block-diagonal causal mask when no 2D mask is given, so no token attends across examples.
    No example's first token carries loss (see data/sft.py), so none is scored from the previous
    example's last state. ``seq_ids`` (1, L) names each token's example (-1 for the filler that
    ``pad_to_multiple`` adds: its own positions, attention 0, no loss; few distinct shapes keep
    bf16 on CPU from growing memory, see ``collate_pairs_packed``). ``attention_mask`` (1, L) is
    1 on real tokens.
    """
    if not examples:
        raise ValueError("collate_sft_packed needs at least one example")
    ids, pos, loss, seq = [], [], [], []
    for k, ex in enumerate(examples):
        ids += ex.ids
        pos += range(len(ex.ids))
        loss += ex.loss_mask
        seq += [k] * len(ex.ids)
    real = len(ids)
    filler = -real % pad_to_multiple
    ids += [pad_token_id] * filler
    pos += range(filler)
    loss += [False] * filler
    seq += [-1] * filler
    attention = torch.zeros(1, len(ids), dtype=torch.long)
    attention[0, :real] = 1
    row = lambda values, dtype=torch.long: torch.tensor(values, dtype=dtype)[None]  # noqa: E731
    return {"input_ids": row(ids), "attention_mask": attention, "position_ids": row(pos),
            "completion_mask": row(loss, torch.bool), "seq_ids": row(seq), "loss_units": _loss_units(examples),
            "index": torch.tensor([ex.index for ex in examples])}


def _loss_units(examples: list[SFTExample]) -> int:
    """Scored tokens: the loss mask without position 0 (token_logprobs never scores it)."""
    return sum(sum(ex.loss_mask[1:]) for ex in examples)
