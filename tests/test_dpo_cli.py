"""`alignkit dpo` end to end on tiny random models: every loss kind, LoRA, reference handling,
config files, and bad input (exit 2, file + line + field, nothing half-written)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alignkit import cli, models
from alignkit.losses import LossKind

LOSS_KINDS = [k.value for k in LossKind]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def prefs(sample_prefs):
    return sample_prefs(8)


def args(model_dir, data, out, *extra):
    return ["dpo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--max-steps", "2", "--lr", "5e-3", "--no-progress", "--log-every", "1", "--warmup-ratio", "0", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a, b, keys, rel=1e-4, abs_=2e-5):
    """Two runs logged the same values. float32 sums of ~-150 differ by ~1e-5 between batchings
    (another layout or padding changes the matmul shapes), hence abs 2e-5 by default."""
    rows_a, rows_b = metrics(a), metrics(b)
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        for key in keys:
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=abs_), key


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_every_loss_trains_and_saves_a_loadable_model(kind, tiny_model_dir, prefs, tmp_path):
    from transformers import AutoModelForCausalLM

    before = digest(tiny_model_dir / "model.safetensors")
    out = tmp_path / "out"
    assert cli.main(args(tiny_model_dir, prefs, out, "--loss", kind)) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    assert digest(tiny_model_dir / "model.safetensors") == before  # the starting/reference weights untouched
    AutoModelForCausalLM.from_pretrained(out)
    assert (out / "config.yaml").exists() and (out / "tokenizer_config.json").exists()
    if kind == "simpo":  # reference-free: no reference log-probs were ever computed
        assert not (tmp_path / "cache" / "ref_logps").exists()
    else:
        assert len(list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))) == 1


def test_reference_free_loss_never_loads_a_reference(tiny_model_dir, prefs, tmp_path, monkeypatch):
    loads = []
    real = models.load_causal_lm
    monkeypatch.setattr("alignkit.train.dpo.load_causal_lm", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "out"
    ref_dir = tmp_path / "no-such-reference"  # would fail to load if it were ever touched
    assert cli.main(args(tiny_model_dir, prefs, out, "--loss", "simpo", "--ref-model", str(ref_dir))) == 0
    assert len(loads) == 1


@pytest.mark.parametrize("lora", [False, True])
def test_cached_and_on_the_fly_reference_agree(lora, tiny_model_dir, prefs, tmp_path):
    extra = ["--lora-r", "4"] if lora else []
    a, b = tmp_path / "cached", tmp_path / "fly"
    assert cli.main(args(tiny_model_dir, prefs, a, *extra)) == 0
    assert cli.main(args(tiny_model_dir, prefs, b, "--no-ref-cache", *extra)) == 0
    assert_same_metrics(a, b, ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"),
                        rel=1e-5)
    assert metrics(a)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1


def test_reference_cache_is_reused(tiny_model_dir, prefs, tmp_path, capsys):
    assert cli.main(args(tiny_model_dir, prefs, tmp_path / "one")) == 0
    assert "computed" in capsys.readouterr().out
    assert cli.main(args(tiny_model_dir, prefs, tmp_path / "two")) == 0
    assert "cache hit" in capsys.readouterr().out
    assert metrics(tmp_path / "one") == [
        {**r, "tokens_per_second": metrics(tmp_path / "one")[i]["tokens_per_second"]}
        for i, r in enumerate(metrics(tmp_path / "two"))]


def test_separate_reference_model(tiny_model_dir, prefs, tmp_path):
    """--ref-model: a different reference gives a non-zero implicit reward at step 1, and stays untouched."""
    from conftest import make_tiny_llama

    ref_dir = tmp_path / "ref"
    make_tiny_llama(49152, seed=7).save_pretrained(ref_dir)
    before = digest(ref_dir / "model.safetensors")
    out = tmp_path / "out"
    assert cli.main(args(tiny_model_dir, prefs, out, "--ref-model", str(ref_dir), "--no-ref-cache")) == 0
    assert metrics(out)[0]["loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert digest(ref_dir / "model.safetensors") == before


def test_lora_writes_adapter_and_merge_writes_full_weights(tiny_model_dir, prefs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert cli.main(args(tiny_model_dir, prefs, out, "--lora-r", "4")) == 0
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, out)
    merged_dir = tmp_path / "merged"
    assert cli.main(args(tiny_model_dir, prefs, merged_dir, "--lora-r", "4", "--merge")) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([[5, 17, 300, 9, 44]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits)  # the adapter learned something


def test_config_file_and_flags(tiny_model_dir, prefs, tmp_path):
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "out"
    cfg.write_text(f"model:\n  model: {tiny_model_dir}\ndata:\n  data: {prefs}\ntrain:\n  max-steps: 1\n"
                   f"  output_dir: {out}\n  batch_size: 2\n  progress: false\ndpo:\n  loss: ipo\n  beta: 0.3\n")
    assert cli.main(["dpo", "--config", str(cfg), "--beta", "0.5"]) == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dpo"] == {**saved["dpo"], "loss": "ipo", "beta": 0.5}
    assert saved["train"]["max_steps"] == 1
    # the saved config runs again as it is
    saved["train"]["output_dir"] = str(tmp_path / "again")
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(saved))
    assert cli.main(["dpo", "--config", str(tmp_path / "again.yaml")]) == 0


@pytest.mark.parametrize("loss,beta,label_smoothing", [("cdpo", 0.1, 0.1), ("simpo", 2.0, 0.0)])
def test_saved_config_holds_the_values_the_loss_ran_with(loss, beta, label_smoothing, tiny_model_dir, prefs, tmp_path):
    """Unset beta and cDPO's 0 label smoothing resolve to the loss's defaults; config.yaml records those."""
    import yaml

    out = tmp_path / "out"
    assert cli.main(args(tiny_model_dir, prefs, out, "--loss", loss, "--max-steps", "1")) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())["dpo"]
    assert (saved["beta"], saved["label_smoothing"]) == (beta, label_smoothing)


def test_existing_run_is_not_clobbered(tiny_model_dir, prefs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(args(tiny_model_dir, prefs, out)) == 0
    before = digest(out / "model.safetensors")
    assert cli.main(args(tiny_model_dir, prefs, out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert digest(out / "model.safetensors") == before


# ------------------------------------------------------------------------------- bad input

BAD_ROWS = {
    "invalid json": ('{"prompt": "a", "chosen": "b", ', "line 2"),
    "missing field": ('{"prompt": "a", "chosen": "b"}', "'rejected'"),
    "non-string field": ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "'chosen'"),
    "empty completion": ('{"prompt": "a", "chosen": "  ", "rejected": "c"}', "'chosen'"),
    "identical pair": ('{"prompt": "a", "chosen": "same", "rejected": "same"}', "'rejected'"),
    "role order": ('{"prompt": [{"role": "assistant", "content": "hi"}], '
                   '"chosen": [{"role": "assistant", "content": "x"}], '
                   '"rejected": [{"role": "assistant", "content": "y"}]}', "prompt"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_exit_2_naming_file_line_field(case, tiny_model_dir, tmp_path, capsys):
    bad, field = BAD_ROWS[case]
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok", "chosen": "yes", "rejected": "no"}\n' + bad + "\n")
    out = tmp_path / "out"
    assert cli.main(args(tiny_model_dir, data, out)) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err and field in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # validated before anything was written


def test_undecodable_bytes_exit_2(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bytes.jsonl"
    data.write_bytes(b'{"prompt": "ok", "chosen": "yes", "rejected": "no"}\n{"prompt": "\xff\xfe"}\n')
    assert cli.main(args(tiny_model_dir, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "bytes.jsonl" in err and "line 2" in err and "Traceback" not in err


def test_skip_invalid_reports_counts(tiny_model_dir, prefs, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    data.write_text(prefs.read_text() + BAD_ROWS["invalid json"][0] + "\n" + BAD_ROWS["identical pair"][0] + "\n")
    assert cli.main(args(tiny_model_dir, data, tmp_path / "out", "--skip-invalid")) == 0
    out = capsys.readouterr().out
    assert "10 rows, 8 kept" in out and "invalid_json" in out and "identical_pair" in out


@pytest.mark.parametrize("argv, needle", [
    (["--loss", "nope"], "field 'loss'"),
    (["--beta", "-1"], "field 'beta'"),
    (["--batch-size", "zero"], "--batch-size"),
    (["--label-smoothing", "0.7"], "field 'label_smoothing'"),
])
def test_bad_flags_exit_2(argv, needle, tiny_model_dir, prefs, tmp_path, capsys):
    assert cli.main(args(tiny_model_dir, prefs, tmp_path / "out", *argv)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bad_config_file_names_file_and_line(tiny_model_dir, prefs, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {prefs}\noutput_dir: {tmp_path / 'o'}\nbeta_typo: 3\n")
    assert cli.main(["dpo", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "line 4" in err and "beta_typo" in err
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {prefs}\noutput_dir: {tmp_path / 'o'}\nlr: -3\n")
    assert cli.main(["dpo", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "line 4" in err and "'lr'" in err


def test_unreadable_config_file_exits_2(tiny_model_dir, prefs, tmp_path, capsys):
    """A folder (or a file without read permission) given as --config is bad input, not a crash."""
    assert cli.main(args(tiny_model_dir, prefs, tmp_path / "out", "--config", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}, field 'config': cannot read the config file" in err and "Traceback" not in err


def test_several_data_files_on_the_command_line(tiny_model_dir, prefs, tmp_path, capsys):
    """--data takes several sources, as the YAML's list does: the run reads the rows of each."""
    import yaml

    out = tmp_path / "out"
    assert cli.main(args(tiny_model_dir, prefs, tmp_path / "one")) == 0
    one = capsys.readouterr().out
    assert cli.main(args(tiny_model_dir, prefs, out, "--data", str(prefs), str(prefs))) == 0  # the later --data wins
    two = capsys.readouterr().out
    rows = [int(text.split(" rows,")[0].rsplit(" ", 1)[1]) for text in (one, two)]
    assert rows[1] == 2 * rows[0] > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["data"] == [str(prefs), str(prefs)]


def test_help_shows_each_commands_own_defaults(capsys):
    """Where a command overrides a field's default (COMMAND_DEFAULTS), its --help says so."""
    from alignkit.cli import build_parser
    from alignkit.config import COMMAND_DEFAULTS

    for command, overrides in COMMAND_DEFAULTS.items():
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
        for name, value in overrides.items():
            flag = "--" + name.replace("_", "-")
            shown = text.split(f"{flag} {name.upper()} ", 1)[1].split(" --", 1)[0]
            assert shown.endswith(f"(default: {value})"), (command, flag, shown)


def test_missing_model_and_data_exit_2(prefs, tmp_path, capsys):
    assert cli.main(args(tmp_path / "nope", prefs, tmp_path / "out")) == 2
    assert "model" in capsys.readouterr().err
    assert cli.main(["dpo", "--model", "x"]) == 2


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_shared_and_packed_batches_train_like_padded(layout, tiny_model_dir, prefs, tmp_path):
    a, b = tmp_path / layout, tmp_path / "padded"
    assert cli.main(args(tiny_model_dir, prefs, a, "--layout", layout)) == 0
    assert cli.main(args(tiny_model_dir, prefs, b, "--layout", "padded")) == 0
    assert_same_metrics(a, b, ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"))


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_changes_memory_not_results(lora, tiny_model_dir, prefs, tmp_path):
    extra = ["--lora-r", "4"] if lora else []
    a, b = tmp_path / "plain", tmp_path / "ckpt"
    assert cli.main(args(tiny_model_dir, prefs, a, *extra)) == 0
    assert cli.main(args(tiny_model_dir, prefs, b, "--gradient-checkpointing", *extra)) == 0
    assert_same_metrics(a, b, ("loss", "grad_norm", "logps/chosen", "rewards/margins"))
    assert metrics(b)[-1]["grad_norm"] > 0


@pytest.mark.parametrize("merge", [False, True])
def test_lora_bf16_saves_fp32_adapter_and_merge_keeps_fp32_base(merge, tiny_model_dir, prefs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    extra = ["--merge"] if merge else []
    assert cli.main(args(tiny_model_dir, prefs, out, "--lora-r", "4", "--precision", "bf16", *extra)) == 0
    assert all(math.isfinite(r["loss"]) for r in metrics(out))
    adapter = load_file(str((out / "adapter" if merge else out) / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    if merge:  # merged on the untouched fp32 base, not on a bf16-rounded copy
        merged = load_file(str(out / "model.safetensors"))
        assert all(t.dtype == torch.float32 for t in merged.values())
        AutoModelForCausalLM.from_pretrained(out)


def test_runs_with_different_precisions_in_one_process(tiny_model_dir, prefs, tmp_path):
    """accelerate's process-wide state must not leak from one run into the next."""
    for i, precision in enumerate(["fp32", "bf16", "fp32"]):
        assert cli.main(args(tiny_model_dir, prefs, tmp_path / f"run{i}", "--precision", precision)) == 0


def test_no_progress_silences_the_libraries_bars_for_the_run(tiny_model_dir, prefs, tmp_path, capfd):
    """--no-progress: no bar from transformers either ("Writing model shards" at the save), and the
    libraries' own switch is back as it was once the run is over."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_was_off, hf_was_on = are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    enable_progress_bars()
    try:
        _check_quiet_then_loud(tiny_model_dir, prefs, tmp_path, capfd)
    finally:
        if not hf_was_on:
            hf_logging.disable_progress_bar()
        if hub_was_off:
            disable_progress_bars()


def _check_quiet_then_loud(tiny_model_dir, prefs, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    assert cli.main(args(tiny_model_dir, prefs, tmp_path / "quiet")) == 0
    quiet = capfd.readouterr()
    assert "Writing model shards" not in quiet.err + quiet.out and "train:" not in quiet.err
    assert hf_logging.is_progress_bar_enabled()
    loud = [a for a in args(tiny_model_dir, prefs, tmp_path / "loud") if a != "--no-progress"]
    assert cli.main(loud) == 0
    assert "Writing model shards" in capfd.readouterr().err  # the check above can see the bar
