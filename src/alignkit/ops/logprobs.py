"""Per-token log-probabilities of completion tokens, lean on time and memory.

The usual way (TRL's) is ``model(...).logits`` — a (B, T, V) float tensor over every
position, prompt and padding included — then ``log_softmax`` (a second (B, T, V) tensor)
and a gather. With a 49k vocabulary that is most of the step's time and memory.

Here the backbone runs once to give hidden states (B, T, H); only the N positions that
predict a completion token go through the LM head, in row chunks, and the custom autograd
function below keeps just the log-sum-exp per row: its backward recomputes each chunk's
softmax instead of storing (N, V) activations. Neither a (B, T, V) nor an (N, V) float tensor
is ever alive whole. On request it also says, per token, whether the target was the model's
top prediction (SFT's token accuracy): the log-sum-exp pass has each row's max logit already.
"""

from __future__ import annotations

import torch
from torch import nn

from .grad_in_place import accumulates_in_place, add_to_grad, is_plain

# Rows per chunk so a chunk's (rows, V) float32 logits stay near 64 MiB.
_CHUNK_BYTES = 64 * 2**20


def _chunk_rows(vocab: int) -> int:
    return max(16, _CHUNK_BYTES // (4 * vocab))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for the LM head (bf16 under bf16 autocast)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, acc: torch.dtype,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """z = h W^T + b in ``acc`` precision, written into ``out`` (n, V) when given."""
    h = h.to(w.dtype)
    if out is not None and out.dtype == w.dtype:  # straight into the buffer: no temporary
        torch.mm(h, w.T, out=out)
        return out if b is None else out.add_(b)
    z = nn.functional.linear(h, w, b)
    return z.to(acc) if out is None else out.copy_(z)


def _softmax_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn logits z (n, V) into softmax(z) IN PLACE; return (logsumexp(z), max(z)), (n,) each.

    torch.logsumexp and torch.softmax each allocate another (n, V) block; this allocates none."""
    m = z.amax(dim=-1, keepdim=True)  # (n, 1)
    total = z.sub_(m).exp_().sum(dim=-1, keepdim=True)  # (n, 1)
    z.div_(total)
    return (m + total.log()).squeeze(1), m.squeeze(1)


# Rows per pass of _entropy_rows: a (32, V) temporary (6 MB at 49k) is reused, not a fresh (n, V) block.
_ENTROPY_ROWS = 32


def _entropy_rows(p: torch.Tensor, out: torch.Tensor) -> None:
    """out (n,) = −Σ_v p log p per row of the softmax p (n, V) (entr(0) = 0), a block of rows at a time.

    ``entr(p).sum(-1)`` over a whole chunk allocates an (n, V) temporary (67 MB for 341 rows of a 49k
    vocabulary), faulted in page by page; one (32, V) buffer reused: 25 against 42 ms for those rows."""
    buf = p.new_empty((min(_ENTROPY_ROWS, p.shape[0]), p.shape[1]))  # (rows, V)
    for s in range(0, p.shape[0], _ENTROPY_ROWS):
        block = p[s:s + _ENTROPY_ROWS]
        torch.sum(torch.special.entr(block, out=buf[:block.shape[0]]), dim=-1, out=out[s:s + block.shape[0]])


class _LinearTokenLogProbs(torch.autograd.Function):
    """log p(target | hidden) = (h W^T + b)[target] − logsumexp(h W^T + b), chunked over rows.

    A second output (N,) bool, without gradient, says whether the target's logit is the row's
    maximum (the target is the argmax; a tie counts as a hit). A third, (N,) without gradient,
    is the entropy of each row's softmax when ``with_entropy`` (else empty): −Σ p log p of the
    softmax the forward computes anyway, one more elementwise pass instead of a second head.

    Backward: d logp_i / d z_ij = 1[j = target_i] − softmax(z_i)_j, with z = h W^T + b.
    When the (N, V) softmax fits in ``keep_bytes`` it is kept from the forward (backward: two
    matmuls); otherwise backward recomputes it chunk by chunk (three matmuls, no (N, V) tensor).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype, keep_bytes: int,
                with_entropy: bool = False, weight_grad_slot: _TiedWeightGrad | None = None):
        # hidden (N, H); weight (V, H); bias (V,) or None; targets (N,) long
        acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 models
        n_rows, vocab = targets.shape[0], weight.shape[0]
        keep = n_rows * vocab * torch.finfo(acc).bits // 8 <= keep_bytes
        out = hidden.new_empty(n_rows, dtype=acc)  # (N,)
        is_max = torch.empty(n_rows, dtype=torch.bool, device=hidden.device)  # (N,)
        lse = torch.empty_like(out)  # (N,)
        entropy = torch.empty_like(out) if with_entropy else out.new_empty(0)  # (N,) or (0,)
        probs = hidden.new_empty((n_rows, vocab), dtype=acc) if keep else None  # (N, V) softmax
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        for s in range(0, n_rows, chunk):
            z = _logits(hidden[s:s + chunk], w, b, acc, None if probs is None else probs[s:s + chunk])  # (n, V)
            picked = z.gather(1, targets[s:s + chunk, None]).squeeze(1)  # (n,) logit of the target
            lse[s:s + chunk], top = _softmax_(z)
            out[s:s + chunk] = picked - lse[s:s + chunk]
            is_max[s:s + chunk] = picked >= top
            if with_entropy:  # z now holds softmax(z)
                _entropy_rows(z, entropy[s:s + chunk])
        ctx.save_for_backward(hidden, weight, bias, targets, lse, probs)
        ctx.chunk, ctx.dtype, ctx.slot, ctx.param = chunk, dtype, weight_grad_slot, weight
        ctx.mark_non_differentiable(is_max, entropy)
        return out, is_max, entropy

    @staticmethod
    def backward(ctx, grad_out, _grad_is_max, _grad_entropy):
        hidden, weight, bias, targets, lse, probs = ctx.saved_tensors
        chunk, dtype, acc = ctx.chunk, ctx.dtype, lse.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if probs is not None and getattr(ctx, "consumed", False):
            raise RuntimeError("linear_token_logprobs keeps its softmax for ONE backward; call it with "
                               "keep_bytes=0 to backpropagate through it twice")
        ctx.consumed = True
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grads_h, grad_w, grad_b = [], None, None
        # the weight's gradient straight into weight.grad (ops/grad_in_place.py); not under autocast
        in_place = need_w and dtype == weight.dtype and accumulates_in_place(ctx.param)
        for s in range(0, targets.shape[0], chunk):
            h = hidden[s:s + chunk].to(dtype)  # (n, H)
            g_out = grad_out[s:s + chunk].to(acc)  # (n,)
            if probs is not None:
                p = probs[s:s + chunk]  # (n, V), kept from the forward; used once, so overwritten here
            else:
                p = _logits(h, w, b, acc).sub_(lse[s:s + chunk, None]).exp_()  # (n, V) softmax, recomputed
            g = p.mul_(-g_out[:, None])  # d/dz of g_out * logp, without the one-hot part
            g.scatter_add_(1, targets[s:s + chunk, None], g_out[:, None])  # + g_out at the target
            g_c = g.to(dtype)
            if need_h:
                grads_h.append((g_c @ w).to(hidden.dtype))  # (n, H)
            if need_w and in_place:
                add_to_grad(ctx.param, g_c.T, h)
            elif need_w:  # the first chunk allocates, later ones accumulate in place: no zero fill
                grad_w = (g_c.T @ h).to(acc) if grad_w is None else grad_w.addmm_(g_c.T.to(acc), h.to(acc))
            if need_b:
                grad_b = g.sum(0) if grad_b is None else grad_b.add_(g.sum(0))
        grad_h = torch.cat(grads_h) if need_h else None
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        if ctx.slot is not None:  # tied to the input embedding: its backward adds to this and returns the sum
            ctx.slot.grad, grad_w = grad_w, None
            ctx.slot.in_place = in_place
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


# Keep the (N, V) softmax for backward when it is at most this large (~650 rows of a 49k vocabulary).
KEEP_SOFTMAX_BYTES = 128 * 2**20


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, *, chunk: int | None = None,
                          keep_bytes: int = KEEP_SOFTMAX_BYTES, return_is_argmax: bool = False,
                          return_entropy: bool = False, _weight_grad_slot: _TiedWeightGrad | None = None):
    """log-probs (N,) float32 of ``targets`` (N,) under logits ``hidden @ weight.T + bias``.

    hidden: (N, H); weight: (V, H). Memory beyond the inputs: one (chunk, V) block at a time, plus
    the (N, V) softmax when it is at most ``keep_bytes`` (0: always recompute in backward) and a
    backward will follow (not under no_grad, nor when no input needs a gradient).
    ``return_is_argmax``: also return (N,) bool, True where the target has the largest logit.
    ``return_entropy``: also return (N,) the entropy of each row's softmax, without gradient.
    Extra outputs come in that order: ``(logps, is_argmax, entropy)`` with both flags.
    """
    chunk = chunk or _chunk_rows(weight.shape[0])
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    out, is_max, entropy = _LinearTokenLogProbs.apply(hidden, weight, bias, targets, chunk, _compute_dtype(hidden),
                                                      keep_bytes if grads else 0, return_entropy, _weight_grad_slot)
    extra = ([is_max] if return_is_argmax else []) + ([entropy] if return_entropy else [])
    return (out, *extra) if extra else out


class _TiedWeightGrad:
    """Hands the LM head's weight gradient to the input embedding's backward (tied weights); ``in_place``:
    the head accumulated it into ``weight.grad`` itself (ops/grad_in_place.py)."""
    grad: torch.Tensor | None = None
    in_place: bool = False


class _TiedEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight)`` for a table tied to the LM head: one dense (V, H) gradient, not three.

    Autograd would give the tied weight two gradients: the LM head's dense (V, H) one and the
    embedding's, which the stock backward builds as a fresh zero (V, H) tensor with a few rows
    scattered in, then adds the two into a third. For SmolLM2's 49k x 576 table those are 113 MB
    fresh allocations, zero-filled or copied page by page: ~13% of an embedded DPO step in the
    profile. Here the LM head's backward (``_LinearTokenLogProbs`` given the same ``slot``) leaves
    its gradient in ``slot`` instead of returning it, and this backward, which autograd runs after
    it (the embedding output feeds the hidden states the head reads), adds the looked-up rows into
    it in place and returns the sum. Rows equal to ``padding_idx`` get no gradient, as in ``nn.Embedding``.
    """

    @staticmethod
    def forward(ctx, ids, weight, padding_idx: int | None, slot: _TiedWeightGrad):
        ctx.save_for_backward(ids)
        ctx.weight_shape, ctx.weight_dtype, ctx.padding_idx, ctx.slot = weight.shape, weight.dtype, padding_idx, slot
        ctx.param = weight
        return nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):  # grad: (*ids.shape, H)
        (ids,) = ctx.saved_tensors
        ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])  # (n,), (n, H)
        if ctx.padding_idx is not None:
            keep = ids != ctx.padding_idx
            ids, grad = ids[keep], grad[keep]
        total, ctx.slot.grad = ctx.slot.grad, None
        if ctx.slot.in_place:  # the head already added its part to weight.grad: add the rows there too
            ctx.param.grad.index_add_(0, ids, grad.to(ctx.param.grad.dtype))
            return None, None, None, None
        if total is None:  # the head's output got no gradient in this backward
            total = grad.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
        return None, total.index_add_(0, ids, grad.to(total.dtype)), None, None


def _tied_embedding(causal: nn.Module, backbone: nn.Module) -> nn.Embedding | None:
    """The input embedding when :class:`_TiedEmbedding` applies: a plain ``nn.Embedding`` whose trainable
    weight is the LM head's (tied), not sharded (FSDP's DTensors unshard in module hooks)."""
    emb = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    head = causal.get_output_embeddings()
    if type(emb) is not nn.Embedding or emb.weight is not head.weight or not emb.weight.requires_grad \
            or not torch.is_grad_enabled() or emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        return None
    return emb if is_plain(emb.weight) else None


def tied_inputs(causal: nn.Module, backbone: nn.Module, input_ids: torch.Tensor) -> tuple[dict, _TiedWeightGrad | None]:
    """Backbone inputs for ``input_ids`` (B, T), and the slot to give ``linear_token_logprobs`` with the same head.

    ``({"inputs_embeds": (B, T, H)}, slot)`` when the embedding table is tied to the LM head and
    trained (:class:`_TiedEmbedding`: one gradient buffer instead of three); else
    ``({"input_ids": input_ids}, None)``. Use the slot in exactly one head call on these states."""
    emb = _tied_embedding(causal, backbone)
    if emb is None:
        return {"input_ids": input_ids}, None
    slot = _TiedWeightGrad()
    return {"inputs_embeds": _TiedEmbedding.apply(input_ids, emb.weight, emb.padding_idx, slot)}, slot


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a PEFT or DDP wrapper."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def _has_plain_head(causal: nn.Module) -> bool:
    """True if logits are exactly ``lm_head(last_hidden_state)`` (no soft-capping or scaling)."""
    cfg = getattr(causal, "config", None)
    if cfg is None or not hasattr(causal, "base_model_prefix"):
        return False
    odd = [getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")]
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    return isinstance(head, nn.Linear) and all(v in (None, 1, 1.0) for v in odd) and \
        hasattr(causal, causal.base_model_prefix)


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                   prev_index: torch.Tensor | None = None, *, return_is_argmax: bool = False):
    """Per-token log-probs of completion tokens, (B, T) float32 (float64 for float64 models), zero off the completion.

    input_ids, attention_mask: (B, T); completion_mask: (B, T) bool, True on completion tokens.
    Position t holds log π(x_t | context); position 0 can never be a scored token.
    Layouts: padded rows (the default); packed rows, marked by ``position_ids`` (B, T) restarting at
    each sequence, with the model called without a 2D mask so transformers masks block-diagonally;
    prefix-shared rows, where ``attention_mask`` is a (B, 1, T, T) bool mask given to the model as is
    and ``prev_index`` (B, T) names the position whose state predicts each token (else t - 1).
    ``return_is_argmax``: return ``(logps, is_argmax)``, the second (B, T) bool without gradient,
    True at scored tokens that are the model's top prediction (ties count), False elsewhere.
    """
    causal = _causal_lm(model)
    shared = attention_mask.dim() == 4
    # use_cache=False: a training forward needs no KV cache (and with one, transformers would
    # not build the packed block-diagonal mask).
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
        if not shared:
            del inputs["attention_mask"]
    scored = completion_mask.bool() & (torch.ones_like(completion_mask, dtype=torch.bool) if shared
                                       else attention_mask.bool())
    scored[:, 0] = False
    rows, cols = scored.nonzero(as_tuple=True)  # (N,) each: the tokens to score
    prev = cols - 1 if prev_index is None else prev_index[rows, cols]  # (N,) the states predicting them
    targets = input_ids[rows, cols]  # (N,)
    if _has_plain_head(causal):
        backbone = getattr(causal, causal.base_model_prefix)
        embed, slot = tied_inputs(causal, backbone, inputs.pop("input_ids"))  # a tied table: one gradient buffer
        hidden = backbone(**inputs, **embed).last_hidden_state  # (B, T, H)
        head = causal.get_output_embeddings()
        logps, is_max = linear_token_logprobs(hidden[rows, prev], head.weight, head.bias, targets,
                                              return_is_argmax=True, _weight_grad_slot=slot)  # (N,) each
    else:  # models with soft-capped or scaled logits: take the logits as the model gives them
        logits = model(**inputs).logits  # (B, T, V)
        sel = logits[rows, prev]  # (N, V)
        sel = sel.to(torch.promote_types(sel.dtype, torch.float32))
        picked = sel.gather(1, targets[:, None]).squeeze(1)  # (N,)
        logps = picked - torch.logsumexp(sel, dim=-1)
        is_max = picked.detach() >= sel.detach().amax(dim=-1)  # (N,)
    out = torch.zeros(input_ids.shape, dtype=logps.dtype, device=input_ids.device)
    out = out.index_put((rows, cols), logps)  # (B, T), differentiable
    if not return_is_argmax:
        return out
    hits = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    return out, hits.index_put((rows, cols), is_max)  # (B, T) each


def sequence_logprobs(token_logps: torch.Tensor, completion_mask: torch.Tensor,
                      seq_ids: torch.Tensor | None = None, num_seqs: int | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, mean, length) per sequence, each (S,), from per-token log-probs (R, T).

    Padded layout (``seq_ids`` None): one sequence per row, S = R. Packed layout: ``seq_ids``
    (R, T) names each token's sequence and S = ``num_seqs``.
    Sum is the sequence log-likelihood log π(y|x); mean divides by the number of scored
    completion tokens (SimPO's length-normalised likelihood).
    """
    scored = completion_mask.clone()
    scored[:, 0] = False  # the first token has no context; it is never scored
    if seq_ids is None:
        lengths = scored.sum(-1)  # (S,)
        total = (token_logps * scored).sum(-1)  # (S,)
    else:
        ids = seq_ids[scored]  # (N,)
        total = token_logps.new_zeros(num_seqs).index_add(0, ids, token_logps[scored])  # (S,)
        lengths = torch.bincount(ids, minlength=num_seqs)  # (S,)
    return total, total / lengths.clamp(min=1), lengths


def batch_sequence_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, mean, length), each (2B,), for a collated pair batch in either layout.

    ``model`` is a CompletionLogProbs module (possibly DDP-wrapped) or a bare causal LM.
    """
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"], batch.get("position_ids"),
            batch.get("prev_index"))
    tok = model(*args) if _is_completion_module(model) else token_logprobs(model, *args)
    num_seqs = 2 * batch["index"].shape[0]
    return sequence_logprobs(tok, batch["completion_mask"], batch.get("seq_ids"), num_seqs)


def _is_completion_module(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP keeps the wrapped module in .module
    return isinstance(inner, CompletionLogProbs)


class CompletionLogProbs(nn.Module):
    """A module whose forward is :func:`token_logprobs` of the wrapped LM.

    Distributed wrappers (DDP, FSDP via ``accelerate``) hook a module's ``forward``; the
    lean log-prob path calls the backbone and the head separately, so the wrapper must
    sit around this module, not around the bare LM.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, completion_mask, position_ids=None, prev_index=None,
                return_is_argmax: bool = False):
        return token_logprobs(self.model, input_ids, attention_mask, completion_mask, position_ids, prev_index,
                              return_is_argmax=return_is_argmax)


def naive_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Reference implementation for tests: full log-softmax then gather. (B, T, V) -> (B, T)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    out = torch.zeros(input_ids.shape, dtype=logits.dtype)
    out[:, 1:] = logp * completion_mask[:, 1:]
    return out
