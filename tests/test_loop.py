"""The training loop: data order, gradient accumulation equivalence, resume, non-finite guard."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

from alignkit import cli, losses
from alignkit.data import EncodedPair
from alignkit.ops.logprobs import CompletionLogProbs
from alignkit.train import dpo as dpo_recipe
from alignkit.train.dpo import DPOExample, collate_dpo, dpo_step
from alignkit.train.loop import accumulate_gradients, list_checkpoints, rank_micro_batches, stream_indices


def test_stream_covers_each_epoch_exactly_once():
    n, g = 10, 4
    stream = [i for step in range(5) for i in stream_indices(step, n, g, seed=3)]  # 20 = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new order each epoch
    assert stream_indices(2, n, g, seed=3) == stream_indices(2, n, g, seed=3)
    assert stream_indices(0, n, g, seed=3) != stream_indices(0, n, g, seed=4)


def test_ranks_split_the_same_examples_as_one_process():
    idx = list(range(100, 116))  # G = 16
    one = rank_micro_batches(idx, 8, 0, 1)  # batch 8, accum 2, 1 process
    two = [rank_micro_batches(idx, 4, r, 2) for r in range(2)]  # batch 4, accum 2, 2 processes
    for k in range(2):
        assert sorted(one[k]) == sorted(two[0][k] + two[1][k])
    assert sorted(i for mb in one for i in mb) == idx


def _pairs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, 200, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(3, 200, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist() + [2]
        r = torch.randint(3, 200, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist() + [2]
        pair = EncodedPair(prompt_ids=p, chosen_ids=c, rejected_ids=r, index=i)
        out.append(DPOExample(pair, ref_chosen=-3.0 - i, ref_rejected=-4.0 + 0.5 * i))
    return out


@pytest.mark.parametrize("kind", ["dpo", "simpo"])
def test_batch8_accum1_equals_batch2_accum4(kind):
    """Same gradients for one micro-batch of 8 and four of 2 (and equal to the mean-loss gradient)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = make_tiny_llama(200).double()
    module = CompletionLogProbs(model)
    examples = _pairs()
    spec = losses.get_loss_spec(kind)
    step_fn = partial(dpo_step, spec=spec, beta=spec.default_beta, label_smoothing=0.0, gamma=0.5, lam=50.0,
                      reference=None)
    collate = partial(collate_dpo, pad_token_id=2)

    def grads(batch_size):
        model.zero_grad()
        batches = [collate(examples[s:s + batch_size]) for s in range(0, 8, batch_size)]
        sums, _ = accumulate_gradients(acc, module, batches, step_fn, denominator=8)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, sums["loss"] / 8

    g8, loss8 = grads(8)
    g2, loss2 = grads(2)
    model.zero_grad()
    step_fn(module, collate(examples)).loss_sum.div(8).backward()  # the plain mean loss over 8
    for name, p in model.named_parameters():
        torch.testing.assert_close(g2[name], g8[name], rtol=1e-10, atol=1e-13, msg=name)
        torch.testing.assert_close(g8[name], p.grad, rtol=1e-10, atol=1e-13, msg=name)
    assert float(loss8) == pytest.approx(float(loss2), rel=1e-12)
    assert any(g.abs().sum() > 0 for g in g8.values())


def _run(args, capsys=None):
    code = cli.main(args)
    return code


def _train_args(model_dir, data, out, *extra):
    return ["dpo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--batch-size", "2", "--lr", "1e-3", "--no-progress", "--log-every", "1", *extra]


@pytest.fixture
def small_prefs(sample_prefs):
    return sample_prefs(12)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    # the embedded tokenizer cache stays shared: tests load it once per session from the user cache


@pytest.mark.parametrize("log_every", [1, 3])
def test_resumed_run_ends_with_the_uninterrupted_weights(log_every, tiny_model_dir, small_prefs, tmp_path, monkeypatch):
    """Weights and log equal the uninterrupted run's. With --log-every 3 the step-6 line averages steps 4-6,
    of which step 4 ran before the crash: the checkpoint keeps the open log window too."""
    every = ("--log-every", str(log_every))
    full = tmp_path / "full"
    assert _run(_train_args(tiny_model_dir, small_prefs, full, "--max-steps", "6", *every)) == 0

    calls = {"n": 0}
    real_step = dpo_recipe.dpo_step

    def crashing_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # step 5 of 6 (batch 2, accum 1): after the step-4 checkpoint
            raise KeyboardInterrupt
        return real_step(*a, **k)

    part = tmp_path / "part"
    monkeypatch.setattr(dpo_recipe, "dpo_step", crashing_step)
    assert _run(_train_args(tiny_model_dir, small_prefs, part, "--max-steps", "6", "--save-every", "2", *every)) == 1
    assert [p.name for p in list_checkpoints(part / "checkpoints")] == ["step-2", "step-4"]
    assert not (part / "model.safetensors").exists()
    monkeypatch.setattr(dpo_recipe, "dpo_step", real_step)
    assert _run(_train_args(tiny_model_dir, small_prefs, part, "--max-steps", "6", "--save-every", "2",
                            "--resume", *every)) == 0

    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(log_every, 7, log_every))  # the crashed run's log was cut back to its checkpoint
    keys = ("loss", "rewards/margins", "grad_norm", "num_tokens")
    full_log, part_log = ([[json.loads(x)[k] for k in keys] for x in (out / "metrics.jsonl").read_text().splitlines()]
                          for out in (full, part))
    assert full_log == part_log


def test_non_finite_loss_stops_with_message_and_saves_nothing(tiny_model_dir, small_prefs, tmp_path,
                                                             monkeypatch, capsys):
    real = losses.preference_loss

    def nan_loss(*a, **k):
        loss, c, r = real(*a, **k)
        return loss * float("nan"), c, r

    monkeypatch.setattr(losses, "preference_loss", nan_loss)
    out = tmp_path / "nan"
    assert _run(_train_args(tiny_model_dir, small_prefs, out, "--max-steps", "3", "--save-every", "1")) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 1" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists()
    assert list_checkpoints(out / "checkpoints") == []


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_state_allocated_up_front_steps_like_the_lazy_state(fused):
    """init_adamw_state must create exactly the state AdamW's first step would: same keys, dtypes
    and devices, and the same weights and moments after several steps (bitwise)."""
    from alignkit.train.loop import init_adamw_state

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=fused or None) for m in models]
    init_adamw_state(opts[1])
    assert all(len(opts[1].state[p]) == 3 for p in models[1].parameters())
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for m, opt in zip(models, opts):
            m(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
    lazy, eager = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    assert lazy.keys() == eager.keys()
    for k in lazy:
        assert lazy[k].keys() == eager[k].keys()
        for name in lazy[k]:
            a, b = lazy[k][name], eager[k][name]
            assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape) and torch.equal(a, b), (k, name)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 7), (3, 10), (5, 5), (0, 1), (2, 1)])
def test_lr_schedules_equal_transformers(kind, warmup, total):
    """lr_factor reproduces transformers' get_scheduler (what TRL runs) at every step, past the end too."""
    from transformers import get_scheduler

    from alignkit.train.loop import make_scheduler

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make(opt)
        out = []
        for _ in range(total + 3):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    hf_kind = "constant_with_warmup" if kind == "constant" else kind
    theirs = lrs(lambda o: get_scheduler(hf_kind, o, num_warmup_steps=warmup, num_training_steps=total))
    ours = lrs(lambda o: make_scheduler(o, kind, warmup, total))
    assert ours == theirs
    assert len(set(ours)) > 1 or (kind == "constant" and warmup == 0)  # the schedule moves
