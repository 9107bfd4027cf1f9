"""Reward modelling: the K-wise loss, one forward per response, the rubric rule, data validation,
`alignkit rm` / `alignkit score` end to end, plain-transformers compatibility, and learning."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from alignkit import cli, rubric
from alignkit.data.ranking import encode_ranking, validate_ranking_row
from alignkit.errors import InputError
from alignkit.losses import bradley_terry_loss, kwise_ranking_loss

W = ("f.jsonl", 3)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- the loss

def test_kwise_loss_golden_values():
    """K = 3, scores (2, 0, -1), order 0 > 1 > 2: comparisons (0,1) gap 2, (0,2) gap 3, (1,2) gap 1.
    loss = (softplus(-2) + softplus(-3) + softplus(-1)) / 3 = (0.126928 + 0.048587 + 0.313262) / 3 = 0.162926.
    A second prompt, K = 2, scores (0.5, 1.5), 0 > 1: softplus(1) = 1.313262."""
    scores = torch.tensor([2.0, 0.0, -1.0, 0.5, 1.5], dtype=torch.float64)
    better, worse, group = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4]), torch.tensor([0, 0, 0, 1])
    got = kwise_ranking_loss(scores, better, worse, group, 2)
    torch.testing.assert_close(got, torch.tensor([0.16292560, 1.31326169], dtype=torch.float64), rtol=0, atol=1e-7)


@pytest.mark.parametrize("k", [2, 4, 9])
def test_kwise_loss_is_mean_of_pairwise_bt_over_all_pairs(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randn(k, dtype=torch.float64, generator=g, requires_grad=True)
    pairs = list(itertools.combinations(range(k), 2))  # i better than j, a total order
    assert len(pairs) == math.comb(k, 2)
    better, worse = torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])
    got = kwise_ranking_loss(scores, better, worse, torch.zeros(len(pairs), dtype=torch.long), 1)
    want = sum(-F.logsigmoid(scores[i] - scores[j]) for i, j in pairs) / math.comb(k, 2)  # InstructGPT Eq. 1
    torch.testing.assert_close(got[0], want, rtol=1e-12, atol=0)
    # gradient: d/ds_i = -(1/C) Σ_{j worse} σ(s_j - s_i) + (1/C) Σ_{j better} σ(s_i - s_j)
    (grad,) = torch.autograd.grad(got.sum(), scores)
    s = scores.detach()
    closed = torch.tensor([(-sum(torch.sigmoid(s[j] - s[i]) for j in range(i + 1, k))
                            + sum(torch.sigmoid(s[i] - s[j]) for j in range(i))) / math.comb(k, 2) for i in range(k)],
                          dtype=torch.float64)
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-12)


def test_kwise_loss_margin_matches_bradley_terry():
    scores = torch.tensor([1.0, 0.2, -0.3])
    margin = torch.tensor([0.5, 1.0])
    got = kwise_ranking_loss(scores, torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 0]), 1, margin=margin)
    want = bradley_terry_loss(torch.tensor([1.0, 0.2]), torch.tensor([0.2, -0.3]), margin=margin).mean()
    torch.testing.assert_close(got[0], want)
    assert got[0] > kwise_ranking_loss(scores, torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 0]), 1)[0]


# ----------------------------------------------------------------------------- rankings, ties, rubric

def test_ranks_give_all_untied_comparisons():
    ex = validate_ranking_row({"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [2, 1, 2, 4]}, W)
    assert sorted((i, j) for i, j, _ in ex.comparisons) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]  # 0~2 tied
    assert all(m == 0 for *_, m in ex.comparisons)


def test_scores_give_margins_from_gaps():
    ex = validate_ranking_row({"prompt": "p", "responses": ["a", "b", "c"], "scores": [0.5, 2, 0.5]}, W,
                              margin_scale=0.5)
    assert sorted(ex.comparisons) == [(1, 0, 0.75), (1, 2, 0.75)]


def test_pairs_are_k2_rankings_with_their_margin():
    ex = validate_ranking_row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5}, W)
    assert ex.responses == ["a", "b"] and ex.comparisons == [(0, 1, 1.5)]


def test_rubric_rule_ranks_by_weighted_score():
    labels = [{"overall": 5}, {"overall": 5, "hallucination": True}, {"overall": 4, "satisfies_constraint": True},
              {"overall": 6, "fails_to_follow_instruction": 1}]
    ex = validate_ranking_row({"prompt": "p", "responses": ["a", "b", "c", "d"], "rubric": labels}, W)
    # default rule: 5, 5 - 2 = 3, 4 + 1 = 5, 6 - 2 = 4 -> a ~ c > d > b
    assert [rubric.rubric_score(rubric.validate_labels(v, "r", W)) for v in labels] == [5, 3, 5, 4]
    assert sorted((i, j) for i, j, _ in ex.comparisons) == [(0, 1), (0, 3), (2, 1), (2, 3), (3, 1)]
    # a custom rule where hallucination does not matter: b ties a and c
    weights = {**rubric.DEFAULT_WEIGHTS, "hallucination": 0.0}
    ex2 = validate_ranking_row({"prompt": "p", "responses": ["a", "b", "c", "d"], "rubric": labels}, W, weights=weights)
    assert sorted((i, j) for i, j, _ in ex2.comparisons) == [(0, 3), (1, 3), (2, 3)]


def test_rubric_weights_file(tmp_path):
    (tmp_path / "w.yaml").write_text("hallucination: -5\noverall: 2\n")
    w = rubric.load_weights(tmp_path / "w.yaml")
    assert w["hallucination"] == -5 and w["overall"] == 2 and w["sexual_content"] == rubric.DEFAULT_WEIGHTS["sexual_content"]
    (tmp_path / "bad.yaml").write_text("verbosity: 1\n")
    with pytest.raises(InputError, match="bad.yaml.*field 'verbosity'"):
        rubric.load_weights(tmp_path / "bad.yaml")


BAD_ROWS = {
    "K = 1": ({"prompt": "p", "responses": ["a"], "ranks": [1]}, "responses", "2 to 9"),
    "K > 9": ({"prompt": "p", "responses": [f"r{i}" for i in range(10)], "ranks": list(range(1, 11))}, "responses", "2 to 9"),
    "rank not a place": ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2, 4]}, "ranks[2]", "1 to 3"),
    "rank zero": ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}, "ranks[0]", "1 to 2"),
    "rank fractional": ({"prompt": "p", "responses": ["a", "b"], "ranks": [1.5, 1]}, "ranks[0]", "1 to 2"),
    "ranks wrong length": ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2]}, "ranks", "3 responses"),
    "scores wrong length": ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 2, 3]}, "scores", "2 responses"),
    "score not a number": ({"prompt": "p", "responses": ["a", "b"], "scores": [1, "high"]}, "scores[1]", "number"),
    "score NaN": ({"prompt": "p", "responses": ["a", "b"], "scores": [1, float("nan")]}, "scores[1]", "number"),
    "Likert too high": ({"prompt": "p", "responses": ["a", "b"], "rubric": [{"overall": 8}, {"overall": 2}]},
                        "rubric[0].overall", "1 to 7"),
    "Likert zero": ({"prompt": "p", "responses": ["a", "b"], "rubric": [{"overall": 3}, {"overall": 0}]},
                    "rubric[1].overall", "1 to 7"),
    "flag not boolean": ({"prompt": "p", "responses": ["a", "b"],
                          "rubric": [{"overall": 3, "hallucination": "maybe"}, {"overall": 2}]},
                         "rubric[0].hallucination", "true/false"),
    "all tied": ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]}, "scores", "tied"),
    "no order": ({"prompt": "p", "responses": ["a", "b"]}, "ranks", "ranks"),
    "duplicate response": ({"prompt": "p", "responses": ["a", "a"], "ranks": [1, 2]}, "responses[1]", "identical"),
    "empty response": ({"prompt": "p", "responses": ["a", " "], "ranks": [1, 2]}, "responses[1]", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_ranking_rows_exit_2_naming_file_line_field(case, tiny_model_dir, tmp_path, capsys):
    row, field, words = BAD_ROWS[case]
    data = tmp_path / "ranked.jsonl"
    good = {"prompt": "q", "responses": ["x", "y"], "ranks": [1, 2]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    out = tmp_path / "out"
    code = cli.main(["rm", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                     "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"ranked.jsonl, line 2, field '{field}'" in err and words in err, err
    assert "Traceback" not in err and not out.exists()


# ----------------------------------------------------------------------------- the model

def _items(tokenizer, rows):
    return [encode_ranking(validate_ranking_row(r, W), tokenizer, max_length=64, max_prompt_length=32) for r in rows]


def test_each_response_goes_through_the_model_once(tokenizer, tiny_model_dir):
    """B prompts with K_b responses: one backbone forward of Σ K_b rows per micro-batch."""
    from alignkit.reward_model import RewardScores, load_reward_model
    from alignkit.train.reward import collate_rankings, rm_step

    model = load_reward_model(str(tiny_model_dir))
    rows = [{"prompt": "p1", "responses": [f"answer {i}" for i in range(4)], "ranks": [1, 2, 3, 4]},
            {"prompt": "p2", "responses": [f"reply {i}" for i in range(9)], "scores": list(range(9))}]
    seen = []
    model.model.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)
    batch = collate_rankings(_items(tokenizer, rows), pad_token_id=0)
    out = rm_step(RewardScores(model), batch)
    assert seen == [4 + 9]  # K forward rows, not 2·C(K,2) = 12 + 72
    assert len(batch["better"]) == math.comb(4, 2) + math.comb(9, 2) and out.count == 2


def test_scores_read_at_the_last_real_token_whatever_the_padding(tokenizer, tiny_model_dir):
    from alignkit.reward_model import load_reward_model, reward_scores, set_reward_pad_token

    model = load_reward_model(str(tiny_model_dir)).eval()
    pad = set_reward_pad_token(model, tokenizer)
    assert pad != tokenizer.eos_token_id
    seqs = [[5, 6, 7, 2], [8, 9, 2], [10, 11, 12, 13, 14, 2]]
    n, t = len(seqs), max(map(len, seqs))
    lengths = torch.tensor([len(s) for s in seqs])
    right_mask = (torch.arange(t)[None] < lengths[:, None]).long()
    right = torch.tensor([s + [pad] * (t - len(s)) for s in seqs])
    left = torch.tensor([[pad] * (t - len(s)) + s for s in seqs])
    with torch.no_grad():
        alone = torch.stack([reward_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in seqs])
        torch.testing.assert_close(reward_scores(model, right, right_mask), alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reward_scores(model, left, right_mask.flip(1)), alone, rtol=1e-5, atol=1e-6)
        # the score of the EOS position, not of the token before it (which a pad id equal to EOS would give)
        hidden = model.model(input_ids=torch.tensor([seqs[0]])).last_hidden_state
        torch.testing.assert_close(alone[0], model.score(hidden[0, -1]).squeeze(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(alone[0], model.score(hidden[0, -2]).squeeze())
    assert n == 3


def _ranked_file(path, n=12, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(2, 5)
        ranks = list(range(1, k + 1))
        rng.shuffle(ranks)
        rows.append({"prompt": f"question {i}?", "responses": [f"answer {i}.{j} " + "word " * rng.randint(1, 6)
                                                               for j in range(k)], "ranks": ranks})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rm_args(model_dir, data, out, *extra):
    return ["rm", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--max-steps", "3", "--lr", "5e-3", "--no-progress", "--log-every", "1", "--warmup-ratio", "0", *extra]


@pytest.mark.parametrize("kind", ["kwise", "pairs"])
def test_rm_end_to_end_and_plain_transformers_scores_identically(kind, tiny_model_dir, sample_prefs, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.reward_model import load_reward_model, reward_scores

    data = _ranked_file(tmp_path / "ranked.jsonl") if kind == "kwise" else sample_prefs(8)
    out = tmp_path / "rm"
    assert cli.main(rm_args(tiny_model_dir, data, out, "--eval-data", str(data))) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/mean",
                "rewards/std", "eval/loss", "eval/accuracy"):
        assert key in rows[-1] and math.isfinite(rows[-1][key]), key
    start, trained = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(start[k], trained[k]) for k in start if k in trained)

    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert plain.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    texts = ["question 1? answer one", "hi", "a somewhat longer response to score here"]
    enc = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in enc])
    mask = (ids != tok.pad_token_id).long()
    ours = load_reward_model(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits.squeeze(-1),
                                   reward_scores(ours, ids, mask), rtol=1e-5, atol=1e-6)


def test_rm_lora_saves_a_merged_sequence_classifier(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    assert cli.main(rm_args(tiny_model_dir, _ranked_file(tmp_path / "r.jsonl"), out, "--lora-r", "4")) == 0
    assert (out / "config.json").exists() and (out / "adapter" / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_score_command_writes_every_row(tiny_model_dir, tmp_path):
    out = tmp_path / "rm"
    assert cli.main(rm_args(tiny_model_dir, _ranked_file(tmp_path / "r.jsonl"), out)) == 0
    rows = [{"prompt": "q1", "response": "hello there"},
            {"prompt": "q2", "responses": ["a b", "c", "d e f"]},
            {"prompt": [{"role": "user", "content": "q3"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]}]
    data = tmp_path / "to_score.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = tmp_path / "scored.jsonl"
    assert cli.main(["score", "--reward-model", str(out), "--data", str(data), "--output", str(scored),
                     "--batch-size", "2", "--no-progress"]) == 0
    got = [json.loads(x) for x in scored.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if "score" not in k} for g in got] == rows
    assert isinstance(got[0]["score"], float) and len(got[1]["reward_scores"]) == 3
    assert {"chosen_score", "rejected_score"} <= set(got[2])
    # the same response scores the same in any batch: row 2's "c" alone
    data2 = tmp_path / "one.jsonl"
    data2.write_text(json.dumps({"prompt": "q2", "response": "c"}) + "\n")
    assert cli.main(["score", "--reward-model", str(out), "--data", str(data2), "--output", str(tmp_path / "s2.jsonl"),
                     "--no-progress"]) == 0
    alone = json.loads((tmp_path / "s2.jsonl").read_text())["score"]
    assert alone == pytest.approx(got[1]["reward_scores"][1], rel=1e-5, abs=1e-6)
    # bad input: exit 2, and the existing output is neither replaced nor touched
    data.write_text(json.dumps({"prompt": "q", "response": 5}) + "\n")
    before = scored.read_text()
    assert cli.main(["score", "--reward-model", str(out), "--data", str(data), "--output", str(scored),
                     "--overwrite", "--no-progress"]) == 2
    assert scored.read_text() == before


# ----------------------------------------------------------------------------- learning

WORDS = ("apple river stone cloud music garden pencil window candle forest rocket silver mirror ladder "
         "button castle dragon island jacket kettle lemon marble needle orange pillow rabbit saddle tiger").split()


def _synthetic(n, rng):
    """Each prompt has 4 responses of 4 words; a response's quality is how many of its words are
    "good" (3 fixed marker words); ranks follow quality, ties allowed. A reward model must learn to
    count markers; a random one ranks at chance."""
    good = ["yes", "great", "correct"]
    rows = []
    for i in range(n):
        counts = rng.sample([0, 1, 2, 3, rng.randint(0, 3)], 4)
        responses = []
        for c in counts:
            words = [rng.choice(good) for _ in range(c)] + rng.sample(WORDS, 4 - c)
            rng.shuffle(words)
            responses.append(" ".join(words))
        if len(set(responses)) < 4 or len(set(counts)) < 2:
            continue
        rows.append({"prompt": f"Item {rng.choice(WORDS)}:", "responses": responses, "scores": counts})
    return rows


@pytest.mark.slow
def test_reward_model_learns_a_held_out_ranking(tiny_model_dir, tmp_path):
    rng = random.Random(0)
    for name, n in (("train", 160), ("eval", 40)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _synthetic(n, rng)))

    def run(out, steps, lr):
        assert cli.main(["rm", "--model", str(tiny_model_dir), "--data", str(tmp_path / "train.jsonl"),
                         "--eval-data", str(tmp_path / "eval.jsonl"), "--output-dir", str(out),
                         "--batch-size", "8", "--max-steps", str(steps), "--lr", lr, "--log-every", "10",
                         "--no-progress"]) == 0
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]

    untrained = run(tmp_path / "untrained", 1, "1e-12")
    assert untrained["eval/accuracy"] < 0.7
    trained = run(tmp_path / "trained", 60, "2e-3")
    assert trained["eval/accuracy"] >= 0.9
    assert trained["eval/loss"] < untrained["eval/loss"] - 0.2


def test_shipped_ranked_sample_loads(tokenizer):
    from importlib.resources import files

    from alignkit.data.ranking import load_ranking_data

    path = str(files("alignkit") / "sample_data" / "ranked.jsonl")
    items, report = load_ranking_data(path, tokenizer, max_length=512, max_prompt_length=256)
    assert report.rows == report.kept == 60 and not report.skipped
    # K = 3, a total order: C(3, 2) = 3 comparisons each, the evasive answer always last
    assert all(len(it.response_ids) == 3 and len(it.comparisons) == 3 for it in items)


def test_rm_starts_from_a_lora_adapter_folder(tiny_model_dir, sample_prefs, tmp_path):
    """The SFT/DPO output of a LoRA run is an adapter folder: the reward model takes its merged weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    adapter = tmp_path / "policy"
    assert cli.main(["dpo", "--model", str(tiny_model_dir), "--data", str(sample_prefs(4)), "--output-dir",
                     str(adapter), "--lora-r", "4", "--max-steps", "2", "--lr", "1e-2", "--batch-size", "2",
                     "--no-progress"]) == 0
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    out = tmp_path / "rm"
    assert cli.main(rm_args(tiny_model_dir, _ranked_file(tmp_path / "r.jsonl"), out, "--model", str(adapter),
                            "--lr", "1e-12")) == 0
    from alignkit.models import load_causal_lm

    merged = load_causal_lm(str(adapter))
    rm = AutoModelForSequenceClassification.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    q = "layers.0.self_attn.q_proj.weight"
    # lr 1e-12: the backbone is the merged adapter's, not the base's
    torch.testing.assert_close(rm.model.get_parameter(q), merged.model.get_parameter(q), rtol=0, atol=1e-9)
    assert not torch.allclose(rm.model.get_parameter(q), base.model.get_parameter(q))
