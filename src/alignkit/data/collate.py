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


def collate_pairs_packed(pairs: list[EncodedPair], pad_token_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """The same 2B sequences as :func:`collate_pairs`, packed end to end into ONE row: no padding.

    * ``input_ids``, ``completion_mask`` (1, L) with L = total real tokens;
    * ``position_ids`` (1, L): 0, 1, ... restarting at each sequence. transformers (5.x) builds a
      block-diagonal causal mask from these restarts when ``attention_mask`` is None, so no token
      attends across sequences (checked against the padded layout before training).
    * ``seq_ids`` (1, L): which of the 2B sequences each token belongs to (chosen 0..B-1, then rejected);
    * ``attention_mask`` (1, L) ones, ``index`` (B,).
    Every sequence starts with a prompt token, so no completion token is ever "predicted" by the
    last token of the previous sequence.

    ``pad_to_multiple`` > 1 rounds L up with a filler segment (its own positions, attention 0,
    ``seq_ids`` -1, never scored). Few distinct shapes matter for bf16 on CPU, where oneDNN keeps
    per-shape state: with a new length every step, memory grew ~12 MB per step in our runs.
    """
    if not pairs:
        raise ValueError("collate_pairs_packed needs at least one pair")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    ids, pos, comp, seq = [], [], [], []
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        ids += prompt + completion
        pos += range(n)
        comp += [False] * len(prompt) + [True] * len(completion)
        seq += [i] * n
    real = len(ids)
    filler = -real % pad_to_multiple
    ids += [pad_token_id] * filler
    pos += range(filler)
    comp += [False] * filler
    seq += [-1] * filler
    attention = torch.zeros(1, len(ids), dtype=torch.long)
    attention[0, :real] = 1
    as_row = lambda values, dtype: torch.tensor(values, dtype=dtype)[None]  # noqa: E731
    return {"input_ids": as_row(ids, torch.long), "attention_mask": attention,
            "position_ids": as_row(pos, torch.long), "completion_mask": as_row(comp, torch.bool),
            "seq_ids": as_row(seq, torch.long), "index": torch.tensor([p.index for p in pairs], dtype=torch.long)}


def collate_pairs_shared(pairs: list[EncodedPair], pad_token_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Prefix sharing: each pair as ``prompt + chosen + rejected`` in ONE row, the prompt run once.

    The rejected tokens attend to the prompt and to themselves, never to the chosen tokens, and
    continue the prompt's positions, so each completion sees exactly the context it would see
    alone; the first rejected token is predicted from the prompt's last state (``prev_index``).
    A pair costs P + C + R tokens instead of 2P + C + R.

    Returns ``input_ids``, ``position_ids``, ``completion_mask``, ``seq_ids`` (chosen of pair k: k,
    rejected: B + k, others -1), ``prev_index`` (1, L); ``attention_mask`` (1, 1, L, L) bool;
    ``num_tokens``: the tokens of the 2B sequences as if unshared (for tokens/s); ``index`` (B,).
    """
    if not pairs:
        raise ValueError("collate_pairs_shared needs at least one pair")
    b = len(pairs)
    ids, pos, comp, seq, prev, block, part = [], [], [], [], [], [], []
    for k, p in enumerate(pairs):
        start, n_p, n_c = len(ids), len(p.prompt_ids), len(p.chosen_ids)
        ids += p.prompt_ids + p.chosen_ids + p.rejected_ids
        pos += list(range(n_p + n_c)) + list(range(n_p, n_p + len(p.rejected_ids)))
        comp += [False] * n_p + [True] * (n_c + len(p.rejected_ids))
        seq += [-1] * n_p + [k] * n_c + [b + k] * len(p.rejected_ids)
        prev += list(range(start - 1, start + n_p + n_c - 1)) + [start + n_p - 1] + \
            list(range(start + n_p + n_c, start + n_p + n_c + len(p.rejected_ids) - 1))
        block += [k] * (n_p + n_c + len(p.rejected_ids))
        part += [0] * n_p + [1] * n_c + [2] * len(p.rejected_ids)  # 0 prompt, 1 chosen, 2 rejected
    real = len(ids)
    filler = -real % pad_to_multiple  # its own block, so each of its rows attends to something
    ids += [pad_token_id] * filler
    pos += range(filler)
    comp += [False] * filler
    seq += [-1] * filler
    prev += range(real - 1, real + filler - 1)
    block += [b] * filler
    part += [0] * filler
    blk, prt = torch.tensor(block), torch.tensor(part)
    same_pair = blk[:, None] == blk[None, :]  # (L, L)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    rejected_sees_chosen = (prt[:, None] == 2) & (prt[None, :] == 1)
    mask = same_pair & causal & ~rejected_sees_chosen  # (L, L): query i may attend key j
    row = lambda values: torch.tensor(values, dtype=torch.long)[None]  # noqa: E731
    return {"input_ids": row(ids), "position_ids": row(pos), "completion_mask": row(comp).bool(),
            "seq_ids": row(seq), "prev_index": row(prev), "attention_mask": mask[None, None],
            "num_tokens": sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
            "index": torch.tensor([p.index for p in pairs], dtype=torch.long)}
