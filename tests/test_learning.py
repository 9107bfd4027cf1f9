"""Learning, not just running: on a tiny random model and a synthetic preference task, DPO raises
held-out preference accuracy (implicit reward of chosen > rejected) from chance to near 1."""

from __future__ import annotations

import json
import random

import pytest

from alignkit import cli

WORDS = ("apple river stone cloud music garden pencil window candle forest rocket silver mirror ladder "
         "button castle dragon island jacket kettle lemon marble needle orange pillow rabbit saddle tiger "
         "violin wagon yogurt zebra anchor basket cactus dolphin engine feather glove hammer igloo jungle").split()


def _rows(words, rng):
    """The prompt asks for "yes" or "no"; the chosen answer obeys. Each answer is chosen in half the
    rows and rejected in the other half, so no prompt-blind preference (which a random model has
    by accident) scores above chance: the model must learn to read the instruction."""
    rows = []
    for w in words:
        for ans, other in (("yes", "no"), ("no", "yes")):
            rows.append({"prompt": f"The {w}: say {ans}.", "chosen": f"{ans}, the {w}.",
                         "rejected": f"{other}, the {w}."})
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_dpo_learns_a_held_out_preference(loss, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    train, held_out = WORDS[:30], WORDS[30:]  # held-out prompts use words never seen in training
    for name, words in (("train", train), ("eval", held_out)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(words, rng)))

    def run(out, steps, lr):
        code = cli.main(["dpo", "--model", str(tiny_model_dir), "--data", str(tmp_path / "train.jsonl"),
                         "--eval-data", str(tmp_path / "eval.jsonl"), "--output-dir", str(out), "--loss", loss,
                         "--batch-size", "4", "--max-steps", str(steps), "--lr", lr, "--log-every", "5",
                         "--eval-every", "5", "--no-progress"])
        assert code == 0
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    # Baseline: the same pipeline with a learning rate too small to change anything.
    untrained = run(tmp_path / "untrained", 1, "1e-12")[-1]
    assert untrained["eval/rewards/accuracies"] <= 0.6  # DPO: 0 (policy = reference); SimPO: chance
    logged = run(tmp_path / "trained", 30, "3e-4")
    assert logged[-1]["eval/rewards/accuracies"] >= 0.9  # held-out prompts, words never trained on
    assert logged[-1]["eval/rewards/margins"] > untrained["eval/rewards/margins"] + 0.1
