"""Win-rate statistics (alignkit.eval.stats) and `alignkit eval` end to end on tiny models."""

from __future__ import annotations

import json
import math

import pytest

from alignkit.eval.stats import Z95, outcome, wilson_interval, win_rate


def test_wilson_interval_golden():
    """8 successes of 10: Wilson's 95% interval is [0.4902, 0.9433] (Newcombe 1998, Table I's worked
    case; also Agresti & Coull 1998). 10 of 10: [0.7225, 1]; 0 of 10 mirrors it."""
    low, high = wilson_interval(0.8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = wilson_interval(1.0, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == pytest.approx(1.0, abs=1e-12)
    low, high = wilson_interval(0.0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.7225, abs=1e-4)


def test_wilson_matches_its_formula_and_narrows_with_n():
    p, n, z = 0.62, 137, Z95
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(p, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(0.6, 400)[1] - wilson_interval(0.6, 400)[0] < wilson_interval(0.6, 100)[1] - wilson_interval(0.6, 100)[0]


def test_outcome_and_ties_count_half():
    assert (outcome(2, 1), outcome(1, 2), outcome(3, 3)) == (1.0, 0.0, 0.5)
    wr = win_rate([1.0, 1.0, 2.0, 5.0], [1.0, 0.0, 3.0, 5.0])  # tie, win, loss, tie
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (1, 2, 1, 4)
    assert wr.rate == pytest.approx((1 + 0.5 * 2) / 4)
    assert wr.ci_low < 0.5 < wr.ci_high and not wr.significant


def test_a_judge_that_always_prefers_a():
    wr = win_rate([1.0] * 20, [0.0] * 20)
    assert wr.rate == 1.0 and wr.wins == 20 and wr.ci_high == pytest.approx(1.0)
    assert wr.ci_low == pytest.approx(wilson_interval(1.0, 20)[0]) and wr.ci_low > 0.8 and wr.significant
    lose = win_rate([0.0] * 20, [1.0] * 20)
    assert lose.rate == 0.0 and lose.ci_high < 0.2 and not lose.significant


def test_several_responses_per_prompt_average_within_the_prompt():
    """Two prompts with two responses each: prompt 1 wins 1 of 2 (outcome 0.5), prompt 2 wins both (1.0);
    n counts prompts (the independent units), not comparisons."""
    wr = win_rate([[2, 0], [3, 3]], [[1, 1], [1, 2]])
    assert wr.n == 2 and (wr.wins, wr.ties, wr.losses) == (3, 0, 1)
    assert wr.rate == pytest.approx(0.75)
    assert (wr.ci_low, wr.ci_high) == pytest.approx(wilson_interval(0.75, 2))


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        win_rate([[1.0, 2.0]], [[1.0]])


# ----------------------------------------------------------------------------- alignkit eval end to end

def _judge_file(tmp_path):
    path = tmp_path / "judge.py"
    path.write_text("def reward(prompt, response):\n    return float(len(response))\n")
    return f"{path}:reward"


def test_eval_cli_on_tiny_models(tmp_path, tokenizer, sample_prefs):
    """Two different tiny models: the summary, per-prompt judgements and the table are written, the win
    rate is the one recomputed from the judgements, and a model against itself (same seed) ties everywhere."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from conftest import make_tiny_llama

    from alignkit.cli import main

    dirs = []
    for seed in (0, 1):
        d = tmp_path / f"m{seed}"
        make_tiny_llama(len(tokenizer), seed=seed).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs.append(str(d))
    prompts = sample_prefs(10)
    judge = _judge_file(tmp_path)
    args = ["eval", "--judge", judge, "--data", str(prompts), "--max-new-tokens", "6", "--no-progress",
            "--precision", "fp32"]
    assert main([*args, "--model", dirs[0], "--baseline", dirs[1], "--output-dir", str(tmp_path / "ab")]) == 0
    summary = json.loads((tmp_path / "ab" / "summary.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "ab" / "judgements.jsonl").read_text().splitlines()]
    assert len(rows) == 10 == summary["prompts"]
    again = win_rate([r["scores_model"] for r in rows], [r["scores_baseline"] for r in rows])
    assert summary["win_rate"] == again.as_dict()
    assert all(r["scores_model"] == [float(len(r["responses_model"][0]))] for r in rows)
    assert (tmp_path / "ab" / "table.md").read_text().startswith("| model |")
    assert summary["baseline_stats"]["kl"] == pytest.approx(0.0, abs=1e-5)  # the baseline is the reference

    assert main([*args, "--model", dirs[0], "--baseline", dirs[0], "--output-dir", str(tmp_path / "aa")]) == 0
    same = json.loads((tmp_path / "aa" / "summary.json").read_text())["win_rate"]
    assert same["ties"] == 10 and same["rate"] == 0.5

    # a finished evaluation is not overwritten silently; a bad judge spec is exit 2
    assert main([*args, "--model", dirs[0], "--baseline", dirs[0], "--output-dir", str(tmp_path / "aa")]) == 2
    assert main([*args[:2], "nope:missing", *args[3:], "--model", dirs[0], "--baseline", dirs[1],
                 "--output-dir", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_sequence_log_ratio_matches_full_logits(tokenizer):
    """Σ_t log π(y_t) − log π_ref(y_t) over response tokens only, from the models' full logits."""
    import sys

    import torch

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from conftest import make_tiny_llama

    from alignkit.data.prompts import PromptItem
    from alignkit.eval.run import Responses, sequence_log_ratio

    pi, ref = make_tiny_llama(len(tokenizer), seed=0), make_tiny_llama(len(tokenizer), seed=3)
    prompts = [PromptItem("a", [5, 6, 7]), PromptItem("b", [8, 9])]
    resp = Responses([["x", "y"], ["z", "w"]], [[[10, 11], [12]], [[13, 14, 15], [16, 2]]], [[True] * 2] * 2)
    got = sequence_log_ratio(pi, ref, prompts, resp, pad_token_id=2, batch_size=3)

    def seq_logp(model, p, r):
        ids = torch.tensor([p + r])
        logp = model(ids).logits[0].log_softmax(-1)
        return sum(logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(r))

    with torch.no_grad():
        want = [[seq_logp(pi, p.ids, r) - seq_logp(ref, p.ids, r) for r in rs] for p, rs in zip(prompts, resp.ids)]
    assert got == [pytest.approx(w, abs=1e-4) for w in want]
    assert abs(want[0][0]) > 1e-2  # the models differ: the check can fail


def test_every_help_page_renders(capsys):
    """`alignkit --help` and each command's --help print and exit 0 (argparse formats help with %, so a
    stray '%' in a description would crash it)."""
    from alignkit.cli import COMMANDS, build_parser

    for argv in (["--help"], *[[c, "--help"] for c in COMMANDS]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 0
    assert "win rate" in capsys.readouterr().out
