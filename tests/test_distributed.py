"""Two CPU processes (gloo) under torchrun, data parallel or fully sharded (FSDP2), end with the same
weights and the same per-step loss and gradient norm as one process with the same global batch; only
rank 0 writes files; a sharded run resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture
def prefs(sample_prefs):
    return sample_prefs(16)


def _common(model_dir, data, out, batch):
    return ["dpo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--batch-size", str(batch), "--grad-accum", "2", "--max-steps", "3", "--lr", "1e-3",
            "--no-progress", "--log-every", "1", "--save-every", "2"]


def _run(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _env(tmp_path):
    """torchrun's own scratch folders (torchelastic_*) go under tmp_path too, deleted with it."""
    return {**os.environ, "ALIGNKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "alignkit.cli"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(tiny_model_dir, prefs, tmp_path, mode):
    env = _env(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "alignkit.cli", *_common(tiny_model_dir, prefs, one, 4)], env)
    proc = _run([*TORCHRUN, *_common(tiny_model_dir, prefs, two, 2), *(["--fsdp"] if mode == "fsdp" else [])], env)
    assert proc.stdout.count("done:") == 1  # only rank 0 reports
    if mode == "fsdp":  # the checkpoint holds full (gathered) weights, not one rank's shard
        shard_free = load_file(str(two / "checkpoints" / "step-2" / "trainable.safetensors"))
        ref = load_file(str(one / "checkpoints" / "step-2" / "trainable.safetensors"))
        assert {k: v.shape for k, v in shard_free.items()} == {k: v.shape for k, v in ref.items()}

    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    # Float32 gradients summed in another order differ in the last bits. Adam divides by sqrt(v), so on
    # the few lm_head/embedding rows whose gradient is ~1e-10 (tokens absent from the batch) that noise
    # is amplified up to ~lr. Everything else must agree to 1e-5 (lr is 1e-3).
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diffs > 1e-5).float().mean() < 1e-5, (diffs > 1e-5).sum()  # ~10 of 6.3M weights
    assert diffs.max() < 3 * 1e-3
    log_a = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == [1, 2, 3]  # each step logged once, by rank 0
    for ra, rb in zip(log_a, log_b):
        # Adam hides a wrong gradient scale in the weights, so compare the norms and losses too
        for key in ("loss", "grad_norm", "logps/chosen", "rewards/margins"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-2"]
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())


@pytest.mark.slow
def test_fsdp_lora_on_the_fly_reference_resumes_exactly(tiny_model_dir, prefs, tmp_path):
    """LoRA under FSDP: the reference (adapters off) runs through the sharded module; a run that
    crashed after its step-2 checkpoint, resumed, ends with the uninterrupted run's adapter."""
    env = _env(tmp_path)
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--lora-r", "4", "--no-ref-cache", "--fsdp", "--lr", "1e-2"]
    _run([*TORCHRUN, *_common(tiny_model_dir, prefs, full, 2), *args], env)
    shutil.copytree(full, cut)  # the state a crash during step 3 leaves: checkpoint, no final model
    (cut / "adapter_model.safetensors").unlink()
    proc = _run([*TORCHRUN, *_common(tiny_model_dir, prefs, cut, 2), *args, "--resume"], env)
    assert "resuming from" in proc.stdout and "step 2 of 3" in proc.stdout
    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    lora_b = [v for k, v in a.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # every adapter trained (B starts at zero)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), full)
