"""`alignkit sft`: formats and loss masks, packed vs padded, the per-token loss against a naive
computation and across batch x accumulation splits, end-to-end runs, bad input, and learning."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

from alignkit import cli
from alignkit.data.collate_sft import collate_sft, collate_sft_packed
from alignkit.data.sft import SFTExample, encode_sft, load_sft_data, validate_sft_row
from alignkit.errors import InputError
from alignkit.ops.logprobs import CompletionLogProbs, sequence_logprobs, token_logprobs
from alignkit.train.loop import _denominator, accumulate_gradients
from alignkit.train.sft import collate_layout, packing_matches, sft_step

V = 300
W = ("f.jsonl", 3)
SYSTEM = {"role": "system", "content": "Be brief."}


def msg(role, content):
    return {"role": role, "content": content}


def encode(row, tokenizer, **kw):
    kw = {"max_length": None, "max_prompt_length": None, **kw}
    return encode_sft(validate_sft_row(row, W), tokenizer, **kw)


def loss_runs(ex: SFTExample, tokenizer) -> list[str]:
    """The decoded text of each maximal run of loss tokens."""
    runs, cur = [], []
    for tok, on in zip(ex.ids + [None], ex.loss_mask + [False]):
        if on:
            cur.append(tok)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    return runs


def write_jsonl(path, rows) -> str:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------- formats and masks

def test_prompt_completion_mask_and_padding_carry_no_loss(tokenizer):
    ex = encode({"prompt": "What is 2+2?", "completion": " Four."}, tokenizer)
    prompt = tokenizer("What is 2+2?", add_special_tokens=False)["input_ids"]
    completion = tokenizer(" Four.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex.ids == prompt + completion  # tokenized separately, one EOS, no BOS injected
    assert ex.loss_mask == [False] * len(prompt) + [True] * len(completion)
    short = encode({"prompt": "Hi", "completion": "Yo"}, tokenizer)
    batch = collate_sft([ex, short], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ex.ids))
    n = len(short.ids)
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(ex.ids) - n)
    assert not batch["completion_mask"][1, n:].any()  # padding carries no loss
    assert batch["completion_mask"][1, :n].tolist() == short.loss_mask
    assert batch["loss_units"] == len(completion) + sum(short.loss_mask)


def test_messages_mask_only_assistant_turns(tokenizer):
    messages = [SYSTEM, msg("user", "Hi there"), msg("assistant", "Hello! How can I help?"),
                msg("user", "Name a colour."), msg("assistant", "Blue.")]
    ex = encode({"messages": messages}, tokenizer)
    eos = tokenizer.eos_token
    assert loss_runs(ex, tokenizer) == ["Hello! How can I help?" + eos, "Blue." + eos]
    # masked + loss tokens are exactly the full render, cut after the final EOS
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.endswith(eos + "\n")
    assert ex.ids == tokenizer(full[:-1], add_special_tokens=False)["input_ids"]
    assert ex.ids[-1] == tokenizer.eos_token_id


def test_conversational_prompt_completion_masks_assistant_turns_in_the_prompt(tokenizer):
    prompt = [msg("user", "Capital of France?"), msg("assistant", "Paris."), msg("user", "And of Spain?")]
    ex = encode({"prompt": prompt, "completion": [msg("assistant", "Madrid.")]}, tokenizer)
    assert loss_runs(ex, tokenizer) == ["Madrid." + tokenizer.eos_token]
    same = encode({"messages": prompt + [msg("assistant", "Madrid.")]}, tokenizer)
    assert same.ids == ex.ids  # the same conversation, rendered the same way
    assert loss_runs(same, tokenizer) == ["Paris." + tokenizer.eos_token, "Madrid." + tokenizer.eos_token]


def test_text_rows_and_completion_only_loss_off(tokenizer):
    ex = encode({"text": "Once upon a time."}, tokenizer)
    assert ex.ids == tokenizer("Once upon a time.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex.loss_mask == [False] + [True] * (len(ex.ids) - 1)  # nothing predicts the first token
    full = encode({"prompt": "Q?", "completion": "A."}, tokenizer, completion_only_loss=False)
    assert full.loss_mask == [False] + [True] * (len(full.ids) - 1)


def test_plain_prompt_rendered_as_user_turn_when_asked(tokenizer):
    ex = encode({"prompt": "Hi", "completion": "Hello."}, tokenizer, chat_template_for_plain=True)
    rendered = tokenizer.apply_chat_template([msg("user", "Hi")], tokenize=False, add_generation_prompt=True)
    n = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(ex.ids[:n]) == rendered and not any(ex.loss_mask[:n])
    assert loss_runs(ex, tokenizer) == ["Hello." + tokenizer.eos_token]


def test_truncation_keeps_prompt_end_and_leaves_a_loss_token(tokenizer):
    row = {"prompt": "one two three four five six seven eight", "completion": " nine ten eleven twelve"}
    full = encode(row, tokenizer)
    n_prompt = full.loss_mask.index(True)
    cut = encode(row, tokenizer, max_prompt_length=3)
    assert cut.ids == full.ids[n_prompt - 3:] and cut.prompt_truncated and not cut.completion_truncated
    cut = encode(row, tokenizer, max_length=n_prompt + 2)
    assert cut.ids == full.ids[:n_prompt + 2] and cut.completion_truncated and sum(cut.loss_mask) == 2
    cut = encode(row, tokenizer, max_length=4)  # the prompt alone is longer: its end is kept
    assert cut.ids == full.ids[n_prompt - 3:n_prompt + 1] and cut.loss_mask == [False] * 3 + [True]
    assert cut.prompt_truncated and cut.completion_truncated


def test_report_counts_truncations_and_skipped_rows(tmp_path, tokenizer):
    rows = [{"prompt": "a b c d e f g h", "completion": "x"}, "{not json\n", {"prompt": "p"},
            {"prompt": "p", "completion": "  "}, {"prompt": "p", "completion": "a much longer completion than six tokens"},
            {"messages": [msg("assistant", "hi")]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    examples, report = load_sft_data(path, tokenizer, max_length=6, max_prompt_length=4, skip_invalid=True)
    assert report.rows == 6 and report.kept == 2 == len(examples)
    assert report.skipped == {"invalid_json": 1, "missing_field": 1, "empty_completion": 1, "role_order": 1}
    assert report.prompt_truncated == 1 and report.completion_truncated == 1
    assert [ex.index for ex in examples] == [0, 1]
    with pytest.raises(InputError, match="line 2"):
        load_sft_data(path, tokenizer, max_length=6, max_prompt_length=4)


BAD_ROWS = [
    ({"prompt": "p"}, "completion", "missing_field"),
    ({"completion": "c"}, "prompt", "missing_field"),
    ({"prompt": "p", "completion": 3}, "completion", "wrong_type"),
    ({"prompt": "p", "completion": " \n"}, "completion", "empty_completion"),
    ({"prompt": "", "completion": "c"}, "prompt", "missing_field"),
    ({"text": 5}, "text", "wrong_type"),
    ({"prompt": [msg("user", "a")], "completion": [msg("user", "b")]}, "completion[0].role", "role_order"),
    ({"prompt": [msg("user", "a")], "completion": []}, "completion", "empty_completion"),
    ({"prompt": [msg("assistant", "a")], "completion": [msg("assistant", "b")]}, "prompt[0].role", "role_order"),
    ({"messages": [msg("user", "a"), msg("assistant", "b"), msg("assistant", "c")]}, "messages[2].role",
     "role_order"),
    ({"messages": [msg("user", "a"), msg("user", "b"), msg("assistant", "c")]}, "messages[1].role", "role_order"),
    ({"messages": [msg("user", "a"), msg("assistant", "b"), msg("user", "c")]}, "messages[2].role", "role_order"),
    ({"messages": [SYSTEM, msg("assistant", "b")]}, "messages[1].role", "role_order"),
    ({"messages": [msg("user", "a"), msg("assistant", " "), msg("user", "c"), msg("assistant", "d")]},
     "messages[1].content", "empty_completion"),
    ({"messages": [msg("user", "a"), SYSTEM, msg("assistant", "b")]}, "messages[1].role", "role_order"),
    ({"messages": [msg("robot", "a"), msg("assistant", "b")]}, "messages[0].role", "role_order"),
    ({"messages": [{"role": "user", "content": 7}, msg("assistant", "b")]}, "messages[0].content", "wrong_type"),
    ({"messages": "hello"}, "messages", "wrong_type"),
]


@pytest.mark.parametrize("row,field,kind", BAD_ROWS)
def test_bad_rows_raise_with_place(row, field, kind):
    with pytest.raises(InputError) as e:
        validate_sft_row(row, W)
    assert e.value.kind == kind
    assert str(e.value).startswith(f"f.jsonl, line 3, field '{field}': "), str(e.value)


def test_template_that_does_not_render_incrementally_is_refused(tmp_path, tokenizer):
    odd = copy.deepcopy(tokenizer)  # the generation prompt says "bot", assistant turns say "assistant"
    odd.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [msg("user", "a"), msg("assistant", "b")]}])
    with pytest.raises(InputError) as e:  # a property of the whole source: never skipped
        load_sft_data(path, odd, max_length=None, max_prompt_length=None, skip_invalid=True)
    assert e.value.kind == "chat_template"


@pytest.mark.parametrize("name, n", [("sft.jsonl", 150), ("sft_eval.jsonl", 40), ("sft_chat.jsonl", 30)])
def test_sample_data_loads_clean(tokenizer, name, n):
    from importlib.resources import files

    path = str(files("alignkit") / "sample_data" / name)
    examples, report = load_sft_data(path, tokenizer, max_length=512, max_prompt_length=256)
    assert report.rows == report.kept == n and not report.skipped
    assert report.prompt_truncated == report.completion_truncated == 0
    assert all(ex.ids[-1] == tokenizer.eos_token_id and ex.loss_mask[-1] for ex in examples)


# ------------------------------------------------------------------------------- the loss

def _examples(lengths, prompts, seed=0) -> list[SFTExample]:
    """Random token examples of unequal lengths (the last token EOS = 2)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, (n, p) in enumerate(zip(lengths, prompts)):
        ids = torch.randint(3, V, (n - 1,), generator=g).tolist() + [2]
        out.append(SFTExample(ids, [False] * p + [True] * (n - p), index=k))
    return out


def _naive(model, examples) -> tuple[torch.Tensor, float]:
    """(per-token mean NLL over all loss tokens of ``examples``, token accuracy): each example
    alone (no padding, no packing), full log-softmax, gather."""
    nll, hits, count = 0.0, 0, 0
    for ex in examples:
        ids = torch.tensor([ex.ids])
        logits = model(input_ids=ids).logits[0, :-1]  # (T-1, V): position t-1 predicts token t
        mask = torch.tensor(ex.loss_mask[1:])
        targets = ids[0, 1:]
        logp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
        nll = nll - logp[mask].sum()
        hits += int((logits.argmax(-1) == targets)[mask].sum())
        count += int(mask.sum())
    return nll / count, hits / count


def test_packed_equals_padded_per_example_and_in_loss_and_gradients():
    """Packing several examples into one row (positions restarting) gives each example exactly the
    log-probs it has alone in a padded row: no attention or loss across examples."""
    model = make_tiny_llama(V).double()
    examples = _examples([9, 4, 13, 6], [3, 1, 5, 2])
    # text rows (loss from token 1) are the case where a packed row could score a token from the
    # previous example's last state: check it too
    examples.append(SFTExample([7, 8, 9, 10, 2], [False, True, True, True, True], index=4))
    padded = collate_sft(examples, 0)
    logps = {}
    for name, batch in (("padded", padded), ("packed", collate_sft_packed(examples, 0)),
                        ("filled", collate_sft_packed(examples, 0, pad_to_multiple=64))):
        tok = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                             batch.get("position_ids"))
        total, _, lengths = sequence_logprobs(tok, batch["completion_mask"], batch.get("seq_ids"), len(examples))
        logps[name] = total.detach()
        assert lengths.tolist() == [sum(ex.loss_mask) for ex in examples]
        assert batch["loss_units"] == sum(lengths.tolist())
    for name in ("packed", "filled"):
        torch.testing.assert_close(logps[name], logps["padded"], rtol=0, atol=1e-12)

    module = CompletionLogProbs(model)

    def step(batch):
        model.zero_grad()
        out = sft_step(module, batch)
        out.loss_sum.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    (out_a, g_a), (out_b, g_b) = step(padded), step(collate_sft_packed(examples, 0, pad_to_multiple=64))
    assert out_a.count == out_b.count == padded["loss_units"]
    assert out_a.tokens == out_b.tokens == sum(len(ex.ids) for ex in examples)  # the filler is not counted
    torch.testing.assert_close(out_b.loss_sum, out_a.loss_sum, rtol=1e-12, atol=0)
    assert out_b.metrics["mean_token_accuracy"] == out_a.metrics["mean_token_accuracy"]
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-8, atol=1e-11, msg=name)


def test_loss_is_per_token_mean_over_the_step_for_any_split():
    """batch 4 x accumulation 1, 2 x 2, 1 x 4 and packed 2 x 2 give the same loss, accuracy and
    gradient as the naive per-token mean over ALL loss tokens of the step's 4 examples. The
    examples have very unequal lengths, so a per-micro-batch mean (the transformers#34191 bug)
    would differ by far more than the tolerance."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = make_tiny_llama(V).double()
    module = CompletionLogProbs(model)
    examples = _examples([24, 5, 7, 30], [4, 2, 3, 20])

    model.zero_grad()
    naive_loss, naive_acc = _naive(model, examples)
    naive_loss.backward()
    naive_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # the bug this guards against, a mean of per-micro-batch means, moves the gradient by far
    # more than the tolerance below
    model.zero_grad()
    ((_naive(model, examples[:2])[0] + _naive(model, examples[2:])[0]) / 2).backward()
    diff = max(float((p.grad - naive_grads[n]).abs().max() / naive_grads[n].abs().max())
               for n, p in model.named_parameters())
    assert diff > 1e-3

    for batch_size, packed, multiple in ((4, False, 1), (2, False, 1), (1, False, 1), (2, True, 1), (2, False, 64)):
        model.zero_grad()
        batches = [collate_layout(examples[s:s + batch_size], packed=packed, pad_token_id=0, pad_to_multiple=multiple)
                   for s in range(0, 4, batch_size)]
        assert all(b["input_ids"].shape[1] % multiple == 0 for b in batches)
        denominator = _denominator(acc, batches, global_batch=4)
        assert denominator == sum(sum(ex.loss_mask[1:]) for ex in examples)
        sums, tokens = accumulate_gradients(acc, module, batches, sft_step, denominator)
        assert tokens == sum(len(ex.ids) for ex in examples)
        assert float(sums["loss"] / denominator) == pytest.approx(float(naive_loss.detach()), rel=1e-6)  # float32 sums
        assert float(sums["mean_token_accuracy"] / denominator) == pytest.approx(naive_acc, abs=1e-12)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, naive_grads[name], rtol=1e-8, atol=1e-12,
                                       msg=f"{name} batch {batch_size} packed {packed} multiple {multiple}")


def test_packing_check_detects_a_model_that_ignores_positions(monkeypatch):
    model = make_tiny_llama(V)
    examples = _examples([6, 5, 8], [2, 2, 3])
    assert packing_matches(model, examples, 0)
    backbone = model.model  # an architecture that drops position_ids sees one long causal sequence
    real_forward = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda **kw: real_forward(
        input_ids=kw["input_ids"], attention_mask=torch.ones_like(kw["input_ids"])))
    assert not packing_matches(model, examples, 0)


# ------------------------------------------------------------------------------- end to end

@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def sft_data(tmp_path):
    from importlib.resources import files

    def make(name, n):
        rows = (files("alignkit") / "sample_data" / name).read_text().splitlines()[:n]
        path = tmp_path / f"{n}-{name}"
        path.write_text("\n".join(rows) + "\n")
        return path
    return make


def args(model_dir, data, out, *extra):
    return ["sft", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--max-steps", "2", "--lr", "5e-3", "--no-progress", "--log-every", "1", "--warmup-ratio", "0", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True])
def test_sft_trains_saves_a_loadable_model_that_dpo_accepts(lora, tiny_model_dir, sft_data, sample_prefs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    extra = ["--lora-r", "4"] if lora else []
    assert cli.main(args(tiny_model_dir, sft_data("sft.jsonl", 8), out, "--eval-data",
                         str(sft_data("sft_eval.jsonl", 4)), *extra)) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "mean_token_accuracy", "num_tokens", "tokens_per_second", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["loss"] == pytest.approx(math.log(49152), abs=0.3)  # a random model: near uniform
    last = rows[-1]
    assert last["eval/perplexity"] == pytest.approx(math.exp(last["eval/loss"]), rel=1e-9)
    assert 0 <= last["eval/mean_token_accuracy"] <= 1 and last["num_tokens"] > rows[0]["num_tokens"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if lora:
        assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
        trained = PeftModel.from_pretrained(base, out).merge_and_unload()
    else:
        trained = AutoModelForCausalLM.from_pretrained(out)
        start = load_file(str(tiny_model_dir / "model.safetensors"))
        assert any(not torch.equal(start[k], v) for k, v in load_file(str(out / "model.safetensors")).items())
    ids = torch.tensor([[5, 17, 300, 9]])
    with torch.no_grad():
        assert not torch.allclose(trained(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits)
    # the SFT output is a starting point for preference optimisation
    dpo_out = tmp_path / "dpo"
    assert cli.main(["dpo", "--model", str(out), "--data", str(sample_prefs(4)), "--output-dir", str(dpo_out),
                     "--batch-size", "2", "--max-steps", "1", "--no-progress", *extra]) == 0
    assert metrics(dpo_out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1


def test_batch_accumulation_and_packing_log_the_same_run(tiny_model_dir, sft_data, tmp_path, capsys):
    data = sft_data("sft_chat.jsonl", 8)  # conversations of unequal lengths, several assistant turns
    runs = {"b4": ["--batch-size", "4"], "b2a2": ["--batch-size", "2", "--grad-accum", "2"],
            "packed": ["--batch-size", "2", "--grad-accum", "2", "--packing"]}
    for name, extra in runs.items():
        assert cli.main(args(tiny_model_dir, data, tmp_path / name, *extra)) == 0
    assert "note:" not in capsys.readouterr().out  # packing was checked and kept
    base = metrics(tmp_path / "b4")
    for name in ("b2a2", "packed"):
        for ra, rb in zip(metrics(tmp_path / name), base, strict=True):
            for key in ("loss", "grad_norm", "mean_token_accuracy"):
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (name, key)
            assert ra["num_tokens"] == rb["num_tokens"]


def test_packing_falls_back_to_padded_with_a_note(tiny_model_dir, sft_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("alignkit.train.sft.packing_matches", lambda *a: False)
    used = []
    real = collate_layout
    monkeypatch.setattr("alignkit.train.sft.collate_layout", lambda *a, **k: used.append(k["packed"]) or real(*a, **k))
    assert cli.main(args(tiny_model_dir, sft_data("sft.jsonl", 4), tmp_path / "out", "--packing",
                         "--max-steps", "1")) == 0
    assert "does not support packed rows" in capsys.readouterr().out
    assert used and not any(used)


@pytest.mark.parametrize("packing", [False, True])
def test_bf16_lora_run_rounds_rows_and_saves_an_fp32_adapter(packing, tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "out"
    extra = ["--packing"] if packing else []
    assert cli.main(args(tiny_model_dir, sft_data("sft.jsonl", 8), out, "--precision", "bf16", "--lora-r", "4",
                         *extra)) == 0
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in metrics(out))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model_dir, sft_data, tmp_path):
    """Data parallel (gloo, 2 processes of batch 2) logs the per-token loss, accuracy and gradient norm
    of one process of batch 4: the step's loss tokens are summed over processes, not averaged per rank."""
    import os
    import subprocess
    import sys

    data = sft_data("sft_chat.jsonl", 16)
    env = {**os.environ, "ALIGNKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path)}  # torchrun's torchelastic_* scratch folders go with tmp_path

    def run(prefix, out, batch):
        cmd = [sys.executable, "-m", *prefix, "alignkit.cli", *args(tiny_model_dir, data, out, "--grad-accum", "2")]
        cmd[cmd.index("--batch-size") + 1] = str(batch)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run([], tmp_path / "one", 4)
    run(["torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"], tmp_path / "two", 2)
    for ra, rb in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        for key in ("loss", "grad_norm", "mean_token_accuracy", "num_tokens"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), key


BAD_INPUT = {
    "invalid json": ('{"prompt": "a", "completion": ', "line 2", None),
    "missing completion": ('{"prompt": "a"}', "line 2", "'completion'"),
    "empty completion": ('{"prompt": "a", "completion": "   "}', "line 2", "'completion'"),
    "non-string": ('{"prompt": "a", "completion": 3}', "line 2", "'completion'"),
    "role order": (('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
                    '{"role": "assistant", "content": "c"}]}'), "line 2", "'messages[1].role'"),
    "no final assistant": ('{"messages": [{"role": "user", "content": "a"}]}', "line 2", "'messages[0].role'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_naming_file_line_field(case, tiny_model_dir, tmp_path, capsys):
    bad, line, field = BAD_INPUT[case]
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok", "completion": "fine"}\n' + bad + "\n")
    out = tmp_path / "out"
    assert cli.main(args(tiny_model_dir, data, out)) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and line in err and (field is None or f"field {field}" in err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # validated before anything was written


# ------------------------------------------------------------------------------- learning

COLOURS = {"banana": "yellow", "lemon": "yellow", "cherry": "red", "tomato": "red", "lime": "green",
           "cucumber": "green", "carrot": "orange", "plum": "purple"}
PHRASES = ["What colour is a {}?", "Tell me the colour of a {}.", "{}: which colour?", "Name the colour of a {}.",
           "A {} has which colour?", "Colour of a {}, please."]


@pytest.mark.slow
def test_sft_learns_a_held_out_task(tiny_model_dir, tmp_path):
    """A deterministic task: any phrasing of "what colour is a <fruit>" -> " <colour>." Each fruit is
    held out in one phrasing never trained on. From a random model (held-out loss ~log 49152,
    accuracy ~0) a few dozen steps must cut the held-out per-token loss by a large factor."""
    pairs = [(i, fruit) for i in range(len(PHRASES)) for fruit in COLOURS]
    held = {(k % len(PHRASES), fruit) for k, fruit in enumerate(COLOURS)}
    row = lambda i, fruit: {"prompt": PHRASES[i].format(fruit), "completion": f" {COLOURS[fruit]}."}  # noqa: E731
    train = [row(*p) for p in pairs if p not in held]
    random.Random(0).shuffle(train)
    train_path = write_jsonl(tmp_path / "train.jsonl", train)
    held_out = write_jsonl(tmp_path / "eval.jsonl", [row(*p) for p in pairs if p in held])

    def run(out, steps, lr):
        assert cli.main(["sft", "--model", str(tiny_model_dir), "--data", train_path, "--eval-data", held_out,
                         "--output-dir", str(out), "--batch-size", "4", "--max-steps", str(steps), "--lr", lr,
                         "--log-every", "10", "--no-progress"]) == 0
        return metrics(out)[-1]

    untrained = run(tmp_path / "untrained", 1, "1e-12")  # the same pipeline, weights unchanged
    trained = run(tmp_path / "trained", 20, "2e-2")
    # eval/loss is per token (count = loss tokens): a random model is near uniform over the vocabulary
    assert untrained["eval/loss"] == pytest.approx(math.log(49152), abs=0.3)
    assert untrained["eval/mean_token_accuracy"] < 0.1
    assert trained["eval/loss"] < untrained["eval/loss"] / 6  # measured: 10.8 -> 0.72
    assert trained["eval/mean_token_accuracy"] >= 0.6  # measured 0.75: '.', EOS and some colours
