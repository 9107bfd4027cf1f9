"""`alignkit demo` / `alignkit pipeline`: the whole pipeline end to end, on a tiny random model (seconds)
and, once, on the embedded SmolLM2-135M-Instruct with --quick (the README's main job)."""

from __future__ import annotations

import json
import os

import pytest

from alignkit.cli import main
from alignkit.eval.stats import win_rate

TINY = ["--num-train-prompts", "16", "--num-eval-prompts", "8", "--max-new-tokens", "8", "--rm-steps", "2",
        "--rl-steps", "1", "--dpo-steps", "2", "--no-progress", "--precision", "fp32"]


def test_demo_quick_on_a_tiny_model_writes_the_report_and_resumes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--model", str(tiny_model_dir), "--output-dir", str(out), *TINY]) == 0
    for name in ("report.md", "summary.json", "win_rate.png", "gold_vs_kl.png", "curves.png",
                 "data/ranked_train.jsonl", "data/pairs.jsonl", "rm/config.json", "ppo/adapter_config.json",
                 "dpo/adapter_config.json", "eval/sft/responses.jsonl", "eval/ppo/labels.jsonl"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["results"]] == ["sft", "ppo", "dpo"]  # --quick: one RLHF, one DPO method
    assert set(summary["stage_seconds"]) >= {"sample", "data", "rm", "ppo", "dpo", "eval/sft", "eval/dpo"}
    # the reported win rate is the one the judged responses give
    scores = {n: [json.loads(x)["scores"] for x in (out / "eval" / n / "responses.jsonl").read_text().splitlines()]
              for n in ("sft", "dpo")}
    dpo = next(r for r in summary["results"] if r["name"] == "dpo")
    assert dpo["rate"] == win_rate(scores["dpo"], scores["sft"]).rate and dpo["n"] == 8
    report = (out / "report.md").read_text()
    assert "| dpo |" in report and "Held-out pairwise accuracy" in report and "### Prompt 1" in report
    assert "win rate vs SFT" in capsys.readouterr().out  # the table is printed at the end

    # a rerun resumes: every stage is skipped, nothing is retrained
    before = (out / "rm" / "stage_done.json").stat().st_mtime_ns
    assert main(["demo", "--quick", "--model", str(tiny_model_dir), "--output-dir", str(out), *TINY]) == 0
    assert (out / "rm" / "stage_done.json").stat().st_mtime_ns == before
    assert capsys.readouterr().out.count("skipped") == len(summary["stage_seconds"])


def test_pipeline_refuses_an_unknown_method(tiny_model_dir, tmp_path, capsys):
    assert main(["pipeline", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "x"),
                 "--methods", "dpo", "rlhf"]) == 2
    assert "field 'methods'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "sample").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ALIGNKIT_SKIP_EMBEDDED_DEMO") == "1", reason="ALIGNKIT_SKIP_EMBEDDED_DEMO=1")
def test_demo_quick_on_the_embedded_model(tmp_path):
    """The README's main command in its --quick form, on the real model: it must finish and write the report
    (its numbers are reported by the demo itself, not asserted: --quick is too short to promise a win)."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m-instruct" and summary["eval_prompts"] == 40
    assert (out / "report.md").exists() and (out / "win_rate.png").exists()
    assert summary["rm"]["heldout_accuracy"] is not None
