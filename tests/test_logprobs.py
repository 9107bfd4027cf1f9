"""ops.logprobs: equal to a naive full log-softmax + gather, gradients included; padding and
prompt tokens contribute nothing; no (B, T, V) log-softmax tensor is built."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from alignkit.ops.logprobs import (
    CompletionLogProbs,
    linear_token_logprobs,
    naive_token_logprobs,
    sequence_logprobs,
    token_logprobs,
)

V = 300


def _batch(seed=0, B=4, T=18):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, 12:] = 0
    attn[3, 7:] = 0
    comp = torch.zeros(B, T, dtype=torch.bool)
    comp[:, 5:] = True
    comp[2, :9] = False  # a longer prompt
    comp &= attn.bool()
    return ids, attn, comp


@pytest.mark.parametrize("tie", [False, True])
def test_matches_naive_logsoftmax_gather_float64(tie):
    model = make_tiny_llama(V, tie=tie).double()
    ids, attn, comp = _batch()
    lean = token_logprobs(model, ids, attn, comp)
    naive = naive_token_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids, comp)
    torch.testing.assert_close(lean, naive, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tie", [False, True])
def test_gradients_match_naive_float64(tie):
    """Tied: the input embedding's gradient is taken sparse and added into the LM head's dense one."""
    model = make_tiny_llama(V, tie=tie).double()
    ids, attn, comp = _batch(1)
    ids[0, 2] = ids[3, 9] = model.config.pad_token_id  # padding_idx rows get no embedding gradient
    weights = torch.linspace(-1, 2, ids.shape[0], dtype=torch.float64)  # a non-trivial upstream gradient

    def grads(fn, accumulate=1):
        model.zero_grad()
        for _ in range(accumulate):  # a second backward adds into the existing .grad
            total, _, _ = sequence_logprobs(fn(), comp)
            (total * weights).sum().backward()
        assert all(p.grad.layout == torch.strided for p in model.parameters())
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    lean = grads(lambda: token_logprobs(model, ids, attn, comp))
    naive = grads(lambda: naive_token_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids, comp))
    for name in lean:
        torch.testing.assert_close(lean[name], naive[name], rtol=1e-9, atol=1e-12, msg=name)
    twice = grads(lambda: token_logprobs(model, ids, attn, comp), accumulate=2)
    for name in lean:
        torch.testing.assert_close(twice[name], 2 * naive[name], rtol=1e-9, atol=1e-12, msg=name)


def test_chunking_does_not_change_values_or_grads():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (37,))
    results = []
    for chunk, keep in ((1, 0), (5, 0), (37, 0), (1000, 0), (5, 2**30), (1000, 2**30)):
        out = linear_token_logprobs(h, w, b, t, chunk=chunk, keep_bytes=keep)  # recompute or keep softmax
        gh, gw, gb = torch.autograd.grad((out * torch.arange(37.0, dtype=torch.float64)).sum(), (h, w, b))
        results.append((out.detach(), gh, gw, gb))
    naive = torch.log_softmax(h @ w.T + b, -1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(results[0][0], naive.detach(), rtol=0, atol=1e-12)
    for r in results[1:]:
        for a, e in zip(r, results[0]):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_padding_and_prompt_contribute_nothing():
    """Changing prompt-masked-out or padded tokens' *targets* changes nothing in the sums,
    and changing pad tokens after the sequence changes nothing at all (causal + masked)."""
    model = make_tiny_llama(V).double()
    ids, attn, comp = _batch(2)
    out = token_logprobs(model, ids, attn, comp)
    assert (out[~comp] == 0).all()
    assert (out[:, 0] == 0).all()
    ids2 = ids.clone()
    ids2[attn == 0] = 7  # different padding
    out2 = token_logprobs(model, ids2, attn, comp)
    torch.testing.assert_close(out, out2, rtol=0, atol=1e-12)
    total, mean, lengths = sequence_logprobs(out, comp)
    expected_len = comp.clone()
    expected_len[:, 0] = False
    assert lengths.tolist() == expected_len.sum(-1).tolist()
    torch.testing.assert_close(mean, total / lengths)


def test_sequence_logprobs_sum_is_product_of_token_probs():
    """log π(y|x) = Σ_t log π(y_t | x, y_<t): compare with step-by-step probabilities."""
    model = make_tiny_llama(V).double()
    ids = torch.randint(3, V, (1, 10))
    attn = torch.ones_like(ids)
    comp = torch.zeros_like(ids, dtype=torch.bool)
    comp[0, 4:] = True
    total, _, _ = sequence_logprobs(token_logprobs(model, ids, attn, comp), comp)
    expected = 0.0
    for t in range(4, 10):
        logits = model(input_ids=ids[:, :t]).logits[0, -1]
        expected += torch.log_softmax(logits, -1)[ids[0, t]].item()
    assert total.item() == pytest.approx(expected, abs=1e-10)


def test_bf16_autocast_close_to_fp32():
    model = make_tiny_llama(V)
    ids, attn, comp = _batch(3)
    fp32 = token_logprobs(model, ids, attn, comp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = token_logprobs(model, ids, attn, comp)
    assert bf16.dtype == torch.float32
    # bf16 keeps ~3 significant digits: per-token log-probs of ~-5.7 agree to a few 1e-2
    assert (bf16 - fp32).abs().max() < 0.1
    assert (bf16 - fp32).abs().max() > 0  # it really ran in bf16


def test_module_wrapper_and_peft_model():
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama(V).double()
    ids, attn, comp = _batch(4)
    expected = token_logprobs(model, ids, attn, comp)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    got = CompletionLogProbs(peft_model)(ids, attn, comp)  # LoRA B starts at zero
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_softcapped_models_fall_back_to_their_own_logits():
    model = make_tiny_llama(V).double()
    model.config.final_logit_softcapping = 30.0  # Llama ignores it; our fast path must not assume it
    ids, attn, comp = _batch(5)
    out = token_logprobs(model, ids, attn, comp)
    naive = naive_token_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids, comp)
    torch.testing.assert_close(out, naive, rtol=0, atol=1e-12)


def test_packed_and_shared_rows_equal_padded_rows_values_and_grads():
    """Packing 2B sequences into one row (positions restarting per sequence), and prefix sharing
    (prompt once, rejected masked from chosen), give the same per-sequence log-probs and gradients
    as the padded layout: no attention across sequences, each completion sees only its context."""
    from alignkit.data import EncodedPair, collate_pairs, collate_pairs_packed, collate_pairs_shared
    from alignkit.ops.logprobs import batch_sequence_logprobs

    model = make_tiny_llama(V).double()
    g = torch.Generator().manual_seed(9)
    rand = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    pairs = [EncodedPair(rand(3 + i), rand(2 + 2 * i) + [2], rand(7 - i) + [2], index=i) for i in range(4)]

    def run(collate):
        model.zero_grad()
        total, mean, lengths = batch_sequence_logprobs(model, collate(pairs, 2))
        (total * torch.arange(1.0, 9.0, dtype=torch.float64)).sum().backward()
        return total.detach(), mean.detach(), lengths, {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = run(collate_pairs)
    filled = lambda p, pad: collate_pairs_packed(p, pad, pad_to_multiple=16)  # noqa: E731
    shared = lambda p, pad: collate_pairs_shared(p, pad, pad_to_multiple=16)  # noqa: E731
    for layout, packed in (("packed", run(collate_pairs_packed)), ("packed", run(filled)),
                           ("shared", run(collate_pairs_shared)), ("shared", run(shared))):
        torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(packed[1], padded[1], rtol=0, atol=1e-10)
        assert packed[2].tolist() == padded[2].tolist()
        # Shared prefix: the prompt's K/V gradient from BOTH completions is summed inside the
        # attention kernel, which rounds to float32 internally even for float64 inputs (eager
        # attention takes its softmax in float32 too), where padded rows sum the two copies in
        # float64: ~1e-7 relative. With only chosen or only rejected weighted the two layouts
        # agree to 1e-16. A wrong mask or position gives O(1) differences, far outside this bound.
        tol = dict(rtol=1e-8, atol=1e-11) if layout == "packed" else dict(rtol=1e-5, atol=1e-5)
        for name in padded[3]:
            torch.testing.assert_close(packed[3][name], padded[3][name], **tol, msg=name)
    batch = collate_pairs_packed(pairs, 2)
    assert batch["input_ids"].shape[0] == 1 and (batch["attention_mask"] == 1).all()  # no padding at all
    # tokens/s counts the tokens of the 2B sequences as a padded batch holds them, whatever ran
    assert collate_pairs_shared(pairs, 2)["num_tokens"] == int(collate_pairs(pairs, 2)["attention_mask"].sum())
    assert collate_pairs_shared(pairs, 2)["input_ids"].shape[1] < batch["input_ids"].shape[1]  # prompts once
    rounded = filled(pairs, 2)
    assert rounded["input_ids"].shape[1] % 16 == 0 and rounded["input_ids"].shape[1] > batch["input_ids"].shape[1]
    assert rounded["attention_mask"].sum() == batch["input_ids"].shape[1]  # filler is not counted as tokens


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_layout_check_detects_a_model_that_ignores_positions_and_masks(layout, monkeypatch):
    from alignkit.data import EncodedPair
    from alignkit.train.dpo import layout_matches

    model = make_tiny_llama(V)
    pairs = [EncodedPair([5, 6, 7], [8, 9, 2], [10, 2], index=i) for i in range(2)]
    assert layout_matches(model, pairs, layout, 2)
    # an architecture that drops position_ids (so sees one long causal sequence) must be caught
    backbone = model.model
    real_forward = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda **kw: real_forward(
        input_ids=kw["input_ids"], attention_mask=torch.ones_like(kw["input_ids"])))
    assert not layout_matches(model, pairs, layout, 2)


def test_is_argmax_equals_naive_argmax_and_leaves_logprobs_unchanged():
    """return_is_argmax: True exactly at scored tokens where the full logits' argmax is the token.
    Half the tokens are made the model's greedy choice, so both outcomes occur."""
    model = make_tiny_llama(V).double()
    ids, attn, comp = _batch(6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in range(1, ids.shape[1]):  # causal: token t's prediction depends only on ids[:, :t]
            greedy = model(input_ids=ids[:, :t]).logits[:, -1].argmax(-1)
            take = torch.rand(ids.shape[0], generator=g) < 0.5
            ids[take, t] = greedy[take]
    logps, hits = token_logprobs(model, ids, attn, comp, return_is_argmax=True)
    logits = model(input_ids=ids, attention_mask=attn).logits
    scored = comp & attn.bool()
    scored[:, 0] = False
    expected = torch.zeros_like(scored)
    expected[:, 1:] = logits[:, :-1].argmax(-1) == ids[:, 1:]
    expected &= scored
    assert hits.dtype == torch.bool and not hits.requires_grad
    assert torch.equal(hits, expected)
    assert 0 < int(hits.sum()) < int(scored.sum())
    torch.testing.assert_close(logps, token_logprobs(model, ids, attn, comp), rtol=0, atol=0)
    model.config.final_logit_softcapping = 30.0  # the fallback path (the model's own logits) agrees
    assert torch.equal(token_logprobs(model, ids, attn, comp, return_is_argmax=True)[1], expected)


def test_is_argmax_through_chunks_and_kept_softmax():
    torch.manual_seed(1)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 16, dtype=torch.float64)
    logits = h.detach() @ w.T
    t = torch.randint(0, V, (37,))
    t[::2] = logits[::2].argmax(-1)  # every other target is the argmax
    expected = logits.argmax(-1) == t
    for chunk, keep in ((1, 0), (5, 0), (1000, 2**30)):
        out, hits = linear_token_logprobs(h, w, None, t, chunk=chunk, keep_bytes=keep, return_is_argmax=True)
        assert torch.equal(hits, expected)
        (grad,) = torch.autograd.grad(out.sum(), h)  # the extra output leaves the backward alone
        (plain,) = torch.autograd.grad(linear_token_logprobs(h, w, None, t, chunk=chunk, keep_bytes=keep).sum(), h)
        torch.testing.assert_close(grad, plain, rtol=0, atol=0)


def test_entropy_through_chunks_and_row_blocks():
    """return_entropy equals −Σ p log p of the full float64 softmax, whatever the chunking: 75 rows
    cross the 32-row entropy blocks (32, 32, 11) and chunks of 1, 5 and all rows."""
    from alignkit.ops import logprobs

    torch.manual_seed(2)
    h = torch.randn(75, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 16, dtype=torch.float64)
    w[:, 0] *= 8  # some rows nearly one-hot, so entr(0) terms occur
    t = torch.randint(0, V, (75,))
    p = torch.softmax(h.detach() @ w.T, dim=-1)
    expected = -(p * torch.log(p)).nan_to_num().sum(-1)
    assert logprobs._ENTROPY_ROWS == 32 and float(expected.min()) < 0.5 < float(expected.max())
    for chunk, keep in ((1, 0), (5, 0), (1000, 2**30)):
        out, entropy = linear_token_logprobs(h, w, None, t, chunk=chunk, keep_bytes=keep, return_entropy=True)
        torch.testing.assert_close(entropy, expected, rtol=1e-12, atol=1e-12)
        assert not entropy.requires_grad
        torch.testing.assert_close(out, linear_token_logprobs(h, w, None, t, chunk=chunk, keep_bytes=keep),
                                   rtol=0, atol=0)
