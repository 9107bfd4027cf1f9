"""Pad a batch of :class:`EncodedPair` into one chosen-then-rejected forward batch."""

from __future__ import annotations

import torch

from .tokenize import EncodedPair


def collate_pairs(pairs: list[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenate chosen and rejected sequences for ONE forward pass (B = ``len(pairs)``).

    Returns (right padding, T = the longest ``prompt + completion`` in THIS batch; never
    padded to ``max_length``):

    * ``input_ids`` (2B, T) long: rows ``0..B-1`` are ``prompt + chosen``, rows ``B..2B-1``
      are ``prompt + rejected`` of the same pairs in the same order; padding is
      ``pad_token_id``.
    * ``attention_mask`` (2B, T) long: 1 on real tokens, 0 on padding.
    * ``completion_mask`` (2B, T) bool: True exactly at positions holding a completion token
      (not shifted; the log-prob code shifts by one itself).
    * ``index`` (B,) long: each pair's dataset index (``-1`` when unset).
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + \
           [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, completion) in enumerate(rows):
        n_prompt, n = len(prompt), len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, n_prompt:n] = True
    index = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion_mask, "index": index}
