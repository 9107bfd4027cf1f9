"""Batched sampling with the KV cache, written out by hand, into a typed :class:`Rollout`.

The rollout is the first stage of the RLHF pipeline (generate -> cut at EOS -> score -> reference
log-probs -> values -> advantages; torchtune's ``generate_trajectory``, OpenRLHF's ``Experience``).
One call of :func:`generate`:

1. left-pads the prompts into one (B, P) batch; positions come from the mask (``cumsum - 1``), so
   a padded prompt sees exactly the positions it would see alone;
2. runs the prompt once (prefill) into a KV cache, then feeds one new token per step. The cache is
   a ``StaticCache`` of P + ``max_new_tokens`` positions, allocated once and written in place, with
   one (B, P + max_new_tokens) mask whose future columns are 0 (models that cannot use a static
   cache get a ``DynamicCache``, grown by concatenation: 7 800 ``cat`` calls, 0.43 s, per 64-token
   step of the embedded model, plus a growing mask). A plain fp32 Llama (the embedded model among
   them) takes the steps after the prefill through :mod:`.llama_decode` instead: one flat loop over
   fused, prepacked weights and its own key/value buffers, with log-probs equal to rounding;
3. per step: logits / temperature -> top-k -> top-p (HF's warper order) -> sample (or argmax);
4. a row that samples EOS is finished: the EOS is kept as its last real token, every later
   position is ``pad_token_id`` with mask 0 and log-prob 0; the loop ends when all rows are
   finished or after ``max_new_tokens`` steps (the horizon).

Log-prob convention: ``logprobs[b, t] = log_softmax(logits / temperature)[token]`` -- the
temperature-scaled distribution, *before* top-k/top-p filtering. Sampling at temperature τ means
the policy being trained is softmax(z/τ), so log π(a|s) must be taken from z/τ; TRL (PPO/GRPO
``logits /= temperature``) and OpenRLHF compute their training log-probs the same way, and a
fresh forward pass over ``full_ids()`` reproduces these values (the rollout tests check it).
Filtering is left out because a trainer's forward pass cannot reproduce it cheaply, and the
filtered distribution puts zero mass on tokens the policy still assigns probability to. With
``greedy=True`` the argmax is taken and the log-probs follow the same formula.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from ..errors import InputError
from .llama_decode import llama_decoder
from .onednn import decode_dtype, prepacked_linear
from .onednn import prepack as _prepack


@dataclass
class Rollout:
    """B sampled responses to B prompts. P = the longest prompt, T = the steps run (<= max_new_tokens).

    prompt_ids        (B, P) long   prompts, LEFT-padded with ``pad_token_id``
    prompt_mask       (B, P) long   1 on prompt tokens, 0 on padding
    response_ids      (B, T) long   responses, RIGHT-padded with ``pad_token_id``
    response_mask     (B, T) long   1 on real response tokens, including a generated EOS
    logprobs          (B, T) float  log_softmax(logits / temperature) of each sampled token, 0 on padding
    ended_with_eos    (B,)   bool   the row sampled EOS (False: it reached the horizon)
    response_lengths  (B,)   long   real response tokens per row (= response_mask.sum(1))
    prompt_index      (B,)   long   which input prompt each row answers (``sample_k``: i // k)
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ended_with_eos: torch.Tensor
    response_lengths: torch.Tensor
    prompt_index: torch.Tensor

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def full_ids(self) -> torch.Tensor:
        """(B, P+T) prompt then response; padding on both sides."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def full_mask(self) -> torch.Tensor:
        """(B, P+T) 1 on real prompt and response tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def position_ids(self) -> torch.Tensor:
        """(B, P+T) the positions generation used: 0 at each row's first real token. Pass them with
        ``full_ids``/``full_mask`` to reproduce ``logprobs`` exactly in a later forward pass."""
        return _positions(self.full_mask())

    def texts(self, tokenizer) -> list[str]:
        """The B responses as text, special tokens (the EOS) left out."""
        return [tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True)
                for ids, n in zip(self.response_ids, self.response_lengths.tolist())]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids from a left-padded mask: real tokens count 0, 1, ...; padding gets 0."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p filtering of (B, V) logits, as HF's ``TopKLogitsWarper``/``TopPLogitsWarper``.

    Removed tokens get -inf. top_k: keep the k largest (ties with the k-th kept too); 0 = off.
    top_p: keep the smallest set of most likely tokens whose probability sums to >= top_p (a token
    goes when the mass of the tokens less likely than or as likely as it is <= 1 - top_p), always
    at least one; 1.0 = off. Returns a new tensor.
    """
    out = logits.clone()
    if top_k > 0 and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=False)  # (B, V) ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)  # (B, V) mass of this token and all less likely
        drop = cum <= (1.0 - top_p)
        drop[..., -1] = False  # the most likely token always stays
        out = out.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return out


def _sample(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(logits) (B, V) by inverting the CDF: a uniform draw scaled to the
    row's total, located in the cumulative sums (right=True: a zero-probability token, whose sum equals
    its predecessor's, can never be hit). Distributed exactly as ``torch.multinomial``, whose CPU kernel
    was ~60x slower on a (8, 49152) batch here (46 ms against 0.7 ms)."""
    return _sample_weights((logits - logits.amax(-1, keepdim=True)).exp_(), generator)


def _sample_weights(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """:func:`_sample` from unnormalised probabilities (B, V) >= 0; consumes ``weights``."""
    cdf = weights.cumsum_(-1)  # (B, V) unnormalised
    total = cdf[:, -1:]  # (B, 1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    token = torch.searchsorted(cdf, u * total, right=True).squeeze(1)  # (B,)
    # u * total rounds up to total once in ~1e7 draws; no cumulative sum exceeds the total, so that is
    # exactly when searchsorted answers V. Only then: fall back to the last token with probability > 0
    # (a vocabulary-sized pass, skipped on every other step)
    if bool((token == cdf.shape[-1]).any()):
        last = (cdf < total).sum(-1)  # (B,) index of the first cumulative sum equal to the total
        token = torch.minimum(token, last)
    return token


def _check_args(prompt_ids, max_new_tokens: int, temperature: float, top_p: float, top_k: int, vocab: int) -> None:
    if not prompt_ids:
        raise InputError("no prompts to generate from", field="prompts")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise InputError(f"prompt {i} has no tokens", field="prompts")
        if min(p) < 0 or max(p) >= vocab:
            raise InputError(f"prompt {i} holds a token id outside the vocabulary (0..{vocab - 1})", field="prompts")
    if max_new_tokens < 1:
        raise InputError(f"must be at least 1, got {max_new_tokens}", field="max_new_tokens")
    if not temperature > 0:
        raise InputError(f"must be > 0, got {temperature} (use greedy=True for argmax decoding)", field="temperature")
    if not 0 < top_p <= 1:
        raise InputError(f"must be in (0, 1], got {top_p}", field="top_p")
    if top_k < 0:
        raise InputError(f"must be >= 0 (0 = off), got {top_k}", field="top_k")


def _left_pad(prompt_ids: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _eos_ids(eos_token_id, device) -> torch.Tensor:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(not isinstance(i, int) for i in ids):
        raise InputError(f"must be a token id or a list of them, got {eos_token_id!r}", field="eos_token_id")
    return torch.tensor(ids, dtype=torch.long, device=device)


# Up to this many rows, a CPU linear layer runs as (W @ h^T)^T while decoding; see few_rows_linear.
FEW_ROWS = 32


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x^T)^T`` when x (..., H) has at most
    :data:`FEW_ROWS` rows; weight (V, H), bias (V,); returns (..., V), contiguous.

    Each decoding step puts B rows (8 in a GRPO step) through every linear layer. For so few rows
    CPU ``F.linear`` (x W^T) was slower here than W x^T, which reads W's rows in order: 8 rows
    through a (49152, 576) LM head 17.8 ms against 7.4 ms, through a (49152, 256) head 11.3 ms
    against 3.3 ms, through SmolLM2's 210 layer linears 42.6 against 40.6 ms (35.6 without the
    contiguous copy of the result that this function makes). From ~64 rows on F.linear is the
    faster one, so larger inputs go to it unchanged. Same products, summed in another order.
    """
    rows = x.numel() // x.shape[-1]
    if rows > FEW_ROWS:
        return torch.nn.functional.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1]).T  # (H, rows)
    out = torch.mm(weight, flat) if bias is None else torch.addmm(bias[:, None], weight, flat)  # (V, rows)
    return out.T.contiguous().reshape(*x.shape[:-1], weight.shape[0])


# While decoding on the CPU (fp32, or under bf16 autocast), linear layers run on oneDNN's pre-blocked
# copy of their weights where this torch build has the op. False: fp32 uses (W @ h^T)^T
# (few_rows_linear) instead, and bf16 keeps F.linear.
PREPACK = True


def _decode_linears(model, rows: int) -> Callable[[], None]:
    """Make the model's plain ``nn.Linear`` layers on the CPU, the LM head among them, run a faster
    product while decoding ``rows`` sequences (models :mod:`.llama_decode` does not take); returns the
    function that undoes it. The model's own forward, and anything it does around those layers, is
    unchanged. A layer whose forward is already replaced on the instance (accelerate's offloading hooks
    do that) is left alone. fp32 weights only.

    The product is oneDNN's on a copy of each weight blocked once per generation for ``rows``-row
    inputs (:data:`PREPACK`), else :func:`few_rows_linear`. Under bf16 autocast the copy is bf16 and
    the input is cast to bf16, as autocast does for a linear; there (W h^T)^T was slower (3.85 against
    3.53 s), so without the op bf16 is left as is. On SmolLM2-135M (8 rows, 64 new tokens), per
    generation: fp32 F.linear 5.74 s, (W h^T)^T for the head 5.39 s, for every linear 4.99 s
    (medians); prepacked 3.64-4.15 s against 5.17-5.63 s for (W h^T)^T in the same run, the blocking
    (0.18-0.34 s) included; bf16 autocast 3.48-4.08 s, prepacked bf16 2.77-3.32 s. The copies hold
    the linear weights a second time while decoding (+540 MB there in fp32, +270 MB in bf16)."""
    dtype = decode_dtype()
    if dtype not in (torch.float32, torch.bfloat16):
        return lambda: None
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" not in vars(m)
              and (type(m) is torch.nn.Linear or m is model.get_output_embeddings())
              and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    packed = [_prepack(layer.weight.to(dtype), rows) for layer in layers] if PREPACK else []
    if packed and all(w is not None for w in packed):
        biases = [None if layer.bias is None else layer.bias.detach().to(dtype) for layer in layers]
        forwards = [partial(prepacked_linear, packed=w, bias=b, dtype=dtype) for w, b in zip(packed, biases)]
    elif dtype == torch.float32:
        forwards = [partial(few_rows_linear, weight=layer.weight, bias=layer.bias) for layer in layers]
    else:  # bf16 without the op: F.linear under autocast
        return lambda: None
    for layer, forward in zip(layers, forwards):
        layer.forward = forward

    def restore() -> None:
        for layer in layers:
            del layer.forward

    return restore


def _forward(model, ids, mask, positions, cache, keep_last: bool) -> torch.Tensor:
    """Last-position logits (B, V) float32; the cache grows in place."""
    kwargs = {"logits_to_keep": 1} if keep_last else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, **kwargs)
    return out.logits[:, -1].float()


def _new_cache(model, length: int, dynamic: bool = False):
    """(cache, static): a StaticCache of ``length`` positions where the model supports one, else (or
    ``dynamic``: a prefill whose keys and values are copied out) a DynamicCache."""
    from transformers import DynamicCache, StaticCache

    if dynamic:
        return DynamicCache(), False

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Under autocast the keys' dtype differs between the prefill and the decoding steps (fp32 after
    # RoPE, bf16 otherwise) and a StaticCache, typed by its first write, refuses the second: concatenate.
    autocast = any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available())
    if getattr(inner, "_can_compile_fullgraph", False) and not autocast:  # transformers' static-cache flag
        try:
            return StaticCache(config=inner.config, max_cache_len=length), True
        except (TypeError, ValueError, AttributeError, KeyError):
            pass
    return DynamicCache(), False


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def generate(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_token_id: int | Sequence[int],
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             greedy: bool = False, _repeats: int = 1) -> Rollout:
    """Sample one response per prompt (see the module docstring for the steps and the log-prob rule).

    prompt_ids: B lists of token ids (any lengths >= 1). eos_token_id: one id or several; a row
    ends at the first of them it samples. pad_token_id: fills padding; None takes the model
    config's pad id, else the first EOS id (many causal LMs ship no pad token; padding is masked,
    so any valid id works). generator: a torch.Generator on the model's device; the same seed gives
    the same samples. The model is put in eval mode and its train/eval mode is restored after.
    ``_repeats`` (:func:`sample_k`): each run of that many rows holds one prompt; the Llama decoder
    then runs the prompt once and copies its keys and values to the run's rows.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    _check_args(prompt_ids, max_new_tokens, temperature, top_p, top_k, vocab)
    eos = _eos_ids(eos_token_id, device)  # (E,)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        pad_token_id = int(eos[0]) if pad_token_id is None else int(pad_token_id)
    prompt, prompt_mask = _left_pad(prompt_ids, pad_token_id, device)  # (B, P) each
    batch = prompt.shape[0]
    was_training = model.training
    model.eval()
    width = prompt.shape[1]  # P
    # a plain fp32 Llama decodes through llama_decode's flat step; other models through their forward
    decoder = llama_decoder(model, batch, width + max_new_tokens)
    restore_linears = _decode_linears(model, batch) if decoder is None else (lambda: None)
    try:
        cache, static = _new_cache(model, width + max_new_tokens, dynamic=decoder is not None)
        # (B, P + max_new_tokens): column P + t is filled when the token of step t is fed; later ones stay 0
        mask_buf = torch.zeros((batch, width + max_new_tokens), dtype=torch.long, device=device)
        mask_buf[:, :width] = prompt_mask
        # a static cache attends over all its positions (the unfilled ones masked); a dynamic one over those so far
        mask = mask_buf if static else prompt_mask
        positions = _positions(prompt_mask)  # (B, P)
        if decoder is not None:  # each distinct prompt once: rows 0, k, 2k, ... (sample_k's layout)
            first = slice(None, None, _repeats)
            logits = _forward(model, prompt[first], mask[first], positions[first], cache,
                              _accepts_logits_to_keep(model)).repeat_interleave(_repeats, 0)  # (B, V)
            decoder.load(cache, width, _repeats)
            cache = None
        else:
            logits = _forward(model, prompt, mask, positions, cache, _accepts_logits_to_keep(model))  # (B, V)
        next_pos = positions[:, -1:] + 1  # (B, 1) each row continues from its own prompt length
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        ended = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens, logps, live = [], [], []
        filtering = top_k > 0 or top_p < 1.0
        for step in range(max_new_tokens):
            # (B, V) the policy's distribution at this temperature; every op below is vocabulary-sized,
            # which on a small model costs as much as the forward, so none is done twice
            scaled = logits if temperature == 1.0 else logits / temperature
            top = scaled.amax(-1, keepdim=True)  # (B, 1)
            weights = (scaled - top).exp_()  # (B, V) unnormalised probabilities
            lse = (top.squeeze(1) + weights.sum(-1).log())  # (B,) logsumexp(scaled)
            if greedy:
                token = scaled.argmax(-1)  # (B,)
            elif filtering:
                token = _sample(filter_logits(scaled, top_k=top_k, top_p=top_p), generator)  # (B,)
            else:
                token = _sample_weights(weights, generator)  # (B,)
            logp = scaled.gather(1, token[:, None]).squeeze(1) - lse  # (B,) log_softmax(scaled)[token], unfiltered
            real = ~done  # (B,) rows still answering: this token is part of their response
            token = torch.where(real, token, torch.full_like(token, pad_token_id))
            tokens.append(token)
            logps.append(torch.where(real, logp, torch.zeros_like(logp)))
            live.append(real)
            hit = real & torch.isin(token, eos)
            ended |= hit
            done |= hit
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            # finished rows keep feeding pad tokens (mask 0); their outputs are never read
            mask_buf[:, width + step] = real.long()
            if decoder is not None:
                logits = decoder.step(token, next_pos[:, 0], width + step, mask_buf)
            else:
                mask = mask_buf if static else mask_buf[:, :width + step + 1]  # (B, L+1) so far
                logits = _forward(model, token[:, None], mask, next_pos, cache, False)
            next_pos = next_pos + 1
    finally:
        restore_linears()
        model.train(was_training)
    response_mask = torch.stack(live, dim=1).long()  # (B, T)
    return Rollout(prompt_ids=prompt, prompt_mask=prompt_mask, response_ids=torch.stack(tokens, dim=1),
                   response_mask=response_mask, logprobs=torch.stack(logps, dim=1), ended_with_eos=ended,
                   response_lengths=response_mask.sum(1), prompt_index=torch.arange(batch, device=device))


def sample_k(model, prompt_ids: Sequence[Sequence[int]], k: int, **kwargs) -> Rollout:
    """k samples per prompt in one batch: rows i*k .. i*k+k-1 answer prompt i (``prompt_index`` = i).

    For GRPO groups, best-of-N and online DPO pairs; ``kwargs`` go to :func:`generate`."""
    if k < 1:
        raise InputError(f"must be at least 1, got {k}", field="k")
    repeated = [p for p in prompt_ids for _ in range(k)]
    out = generate(model, repeated, _repeats=k, **kwargs)
    out.prompt_index = torch.arange(len(prompt_ids), device=out.prompt_index.device).repeat_interleave(k)
    return out
