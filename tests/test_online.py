"""The online methods end to end on a tiny model with a programmatic judge: generate, best-of-n, rso,
online-dpo (rounds, resume) and iterated-rlhf; bad input exits 2."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit import cli


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def prompts(tmp_path):
    from importlib.resources import files

    rows = (files("alignkit") / "sample_data" / "prefs.jsonl").read_text().splitlines()[:6]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": json.loads(r)["prompt"]}) + "\n" for r in rows))
    return path


@pytest.fixture
def judge(tmp_path):
    """Dense and deterministic: the share of lowercase ASCII characters in the response."""
    path = tmp_path / "judge.py"
    path.write_text("def reward(prompt, response):\n"
                    "    return sum(c.islower() and c.isascii() for c in response) / max(len(response), 1)\n")
    return f"{path}:reward", path


def _score(path, response):
    import importlib.util

    spec = importlib.util.spec_from_file_location("j", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.reward("", response)


def sample_args(command, model_dir, prompts, out, *extra):
    return [command, "--model", str(model_dir), "--data", str(prompts), "--output", str(out), "--num-responses", "4",
            "--max-new-tokens", "6", "--no-progress", *extra]


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_generate_best_of_n_and_rso(tiny_model_dir, prompts, judge, tmp_path):
    spec, judge_file = judge
    gen = tmp_path / "gen.jsonl"
    assert cli.main(sample_args("generate", tiny_model_dir, prompts, gen)) == 0
    got = rows(gen)
    assert len(got) == 6 and all(len(r["responses"]) == 4 for r in got)

    best = tmp_path / "best.jsonl"
    assert cli.main(sample_args("best-of-n", tiny_model_dir, prompts, best, "--reward-model", spec)) == 0
    for r in rows(best):
        assert r["score"] == pytest.approx(_score(judge_file, r["completion"]), abs=1e-6)
    # the same seed samples the same candidates: best-of-n keeps the maximum of generate's responses
    for g, b in zip(got, rows(best)):
        assert b["completion"] in g["responses"]
        assert b["score"] == pytest.approx(max(_score(judge_file, x) for x in g["responses"]), abs=1e-6)

    rso = tmp_path / "rso.jsonl"
    assert cli.main(sample_args("rso", tiny_model_dir, prompts, rso, "--reward-model", spec, "--num-accept", "3")) == 0
    pairs = rows(rso)
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert max(sum(p["prompt"] == q for p in pairs) for q in {p["prompt"] for p in pairs}) <= 3  # C(3, 2) per prompt
    # the pairs are DPO data as they are
    assert cli.main(["dpo", "--model", str(tiny_model_dir), "--data", str(rso), "--output-dir", str(tmp_path / "dpo"),
                     "--loss", "hinge", "--max-steps", "1", "--no-progress"]) == 0


def test_online_dpo_rounds_and_resume(tiny_model_dir, prompts, judge, tmp_path):
    spec, _ = judge
    out = tmp_path / "odpo"
    args = ["online-dpo", "--model", str(tiny_model_dir), "--data", str(prompts), "--reward-model", spec,
            "--output-dir", str(out), "--rounds", "2", "--num-responses", "3", "--max-new-tokens", "6",
            "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--no-progress", "--pairs", "all"]
    assert cli.main(args) == 0
    log = rows(out / "metrics.jsonl")
    assert [r["round"] for r in log] == [1, 2] and all(r["pairs"] > 0 for r in log)
    final = AutoModelForCausalLM.from_pretrained(out).state_dict()
    round2 = AutoModelForCausalLM.from_pretrained(out / "rounds" / "round-2" / "dpo").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(final[k], round2[k]) for k in final)
    assert any(not torch.equal(final[k], start[k]) for k in final)
    # round 2 started from round 1's policy: its samples differ from round 1's
    s1, s2 = (rows(out / "rounds" / f"round-{r}" / "samples.jsonl") for r in (1, 2))
    assert [x["responses"] for x in s1] != [x["responses"] for x in s2]
    assert [r["step"] for r in log] == [1, 2]  # a round is the run's logged step
    # a rerun with --resume skips finished rounds and leaves the result as it was; its log keeps one line
    # per finished round (here: a duplicate of round 2, and a round 3 that never wrote its marker, dropped)
    before = (out / "model.safetensors").read_bytes()
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(log[1]) + "\n" + json.dumps({**log[1], "step": 3, "round": 3}) + "\n")
    assert cli.main([*args, "--resume"]) == 0
    assert (out / "model.safetensors").read_bytes() == before
    assert rows(out / "metrics.jsonl") == log
    assert cli.main(args) == 2  # an existing run is not clobbered without --resume / --overwrite
    # --overwrite replaces the run: its log and rounds are the new run's only
    assert cli.main([*args, "--overwrite", "--rounds", "1"]) == 0
    assert [r["round"] for r in rows(out / "metrics.jsonl")] == [1]
    assert not (out / "rounds" / "round-2").exists()


def test_iterated_rlhf_retrains_the_reward_model_on_all_labels(tiny_model_dir, prompts, judge, tmp_path):
    spec, _ = judge
    out = tmp_path / "irlhf"
    assert cli.main(["iterated-rlhf", "--model", str(tiny_model_dir), "--data", str(prompts), "--labeler", spec,
                     "--output-dir", str(out), "--rounds", "2", "--num-responses", "3", "--max-new-tokens", "6",
                     "--max-steps", "2", "--batch-size", "3", "--mini-batch-size", "3", "--rm-steps", "2",
                     "--lr", "1e-4", "--value-model", "shared", "--no-progress"]) == 0
    r1, r2 = (rows(out / "rounds" / f"round-{r}" / "labels.jsonl") for r in (1, 2))
    assert len(rows(out / "labels.jsonl")) == len(r1) + len(r2)
    rm2 = (out / "rounds" / "round-2" / "rm" / "config.yaml").read_text()
    assert str(out / "labels.jsonl") in rm2  # round 2's reward model trained on every label so far
    assert "rounds/round-2/rm" in (out / "rounds" / "round-2" / "ppo" / "config.yaml").read_text()
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("case", ["rso accepts more than sampled", "best-of-n without a judge"])
def test_online_bad_input_exits_2(case, tiny_model_dir, prompts, judge, tmp_path, capsys):
    spec, _ = judge
    out = tmp_path / "x.jsonl"
    extra = ["--reward-model", spec, "--num-accept", "5"] if case.startswith("rso") else []
    code = cli.main(sample_args("rso" if case.startswith("rso") else "best-of-n", tiny_model_dir, prompts, out, *extra))
    err = capsys.readouterr().err
    assert code == 2 and ("num_responses" in err or "reward_model" in err) and not out.exists()
