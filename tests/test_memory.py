"""alignkit.memory: bf16 runs and the gradient loop switch glibc to reusing freed blocks; elsewhere fp32 keeps the 64 KiB threshold."""

from __future__ import annotations

import sys

import pytest

from alignkit import memory


def test_for_precision_switches_only_under_bf16(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda *settings: calls.append(settings) or True)
    assert memory.for_precision("fp32") is False and calls == []
    assert memory.for_precision("bf16") is True
    assert calls == [((memory._M_MMAP_THRESHOLD, memory.RL_MMAP_THRESHOLD),
                      (memory._M_TRIM_THRESHOLD, 2 * memory.RL_MMAP_THRESHOLD))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_accepts_both_settings():
    assert memory.keep_freed_memory_for_reuse() is True
    assert memory.return_freed_memory_to_os() is True  # back to the CLI's setting for this process


def test_for_training_reuses_never_trims_and_serves_every_block_from_the_heap(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda *settings: calls.append(settings) or True)
    assert memory.for_training() is True
    assert calls == [((memory._M_MMAP_THRESHOLD, memory.RL_MMAP_THRESHOLD), (memory._M_TRIM_THRESHOLD, memory.NO_TRIM)),
                     ((memory._M_MMAP_MAX, 0),)]
    calls.clear()
    monkeypatch.setattr(memory, "HEAP_ONLY", False)  # bench_rl.py --rl-allow-mmap
    assert memory.for_training() is True and len(calls) == 1 and calls[0][0][0] == memory._M_MMAP_THRESHOLD
    calls.clear()
    monkeypatch.setattr(memory, "RL_MMAP_THRESHOLD", 0)  # the diagnostic "keep the CLI's 64 KiB": nothing changes
    assert memory.for_training() is False and calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_accepts_the_training_setting():
    assert memory.for_training() is True
    assert memory.return_freed_memory_to_os() is True


def test_the_cli_setting_allows_mmap_again(monkeypatch):
    """Every command starts from return_freed_memory_to_os, so an earlier training run in the process
    (a pipeline, the test session) does not leave mmap switched off."""
    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda *settings: calls.append(settings) or True)
    assert memory.return_freed_memory_to_os() is True
    assert calls == [((memory._M_MMAP_THRESHOLD, 64 * 1024), (memory._M_MMAP_MAX, 65536))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_after_training_hands_the_freed_heap_back(tmp_path):
    """The training setting never trims: 200 MB allocated and freed stay resident until after_training.
    In a child process, so this session's heap does not blur the numbers."""
    import subprocess

    code = """
import torch
from alignkit import memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
memory.for_training()
base = rss()
blocks = [torch.ones(1 << 20) for _ in range(50)]  # 50 x 4 MiB, from the heap
del blocks
kept = rss() - base
assert memory.after_training() is True
print(kept, rss() - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    kept, after = float(out[0]), float(out[1])
    assert kept > 150 and after < 50, (kept, after)


def test_train_frees_the_optimizer_state_before_the_final_save(tiny_model_dir, sample_prefs, tmp_path, monkeypatch):
    """accelerate keeps the prepared optimizer referenced; the loop must drop AdamW's moments itself,
    or they stay resident through the final save (and whatever the process runs next)."""
    import torch

    from alignkit import cli
    from alignkit.train import dpo, loop

    made = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    seen = []
    real_finish = dpo.finish_run

    def finish(*a, **k):
        seen.append([len(opt.state) for opt in made])
        return real_finish(*a, **k)

    monkeypatch.setattr(loop.torch.optim, "AdamW", Recorded)
    monkeypatch.setattr(dpo, "finish_run", finish)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    assert cli.main(["dpo", "--model", str(tiny_model_dir), "--data", str(sample_prefs(4)), "--output-dir",
                     str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "1", "--no-progress"]) == 0
    assert len(made) == 1 and seen == [[0]]


def test_for_sampling_reuses_freed_blocks_then_restores_the_cli_setting(monkeypatch):
    """From the CLI's setting: the training setting while sampling, then the CLI's again and a trim, also
    when sampling raises. Where the process already reuses freed blocks (bf16, a loop): no change at all."""
    calls, trims = [], []
    monkeypatch.setattr(memory, "_mallopt", lambda *settings: calls.append(settings) or True)
    monkeypatch.setattr(memory, "_libc", lambda: type("Libc", (), {"malloc_trim": staticmethod(trims.append)})())
    monkeypatch.setattr(memory, "_reusing", False)
    assert memory.return_freed_memory_to_os() is True
    calls.clear()
    with pytest.raises(RuntimeError):
        with memory.for_sampling():
            assert calls == [((memory._M_MMAP_THRESHOLD, memory.RL_MMAP_THRESHOLD),
                              (memory._M_TRIM_THRESHOLD, memory.NO_TRIM)), ((memory._M_MMAP_MAX, 0),)]
            assert memory._reusing is True
            raise RuntimeError("the sampler failed")
    assert calls[-1] == ((memory._M_MMAP_THRESHOLD, 64 * 1024), (memory._M_MMAP_MAX, 65536)) and trims == [0]
    assert memory._reusing is False
    assert memory.for_precision("bf16") is True  # a bf16 run: reuse for the rest of the process
    calls.clear()
    with memory.for_sampling():
        pass
    assert calls == [] and trims == [0] and memory._reusing is True


def test_sampling_commands_run_under_for_sampling(monkeypatch, tiny_model_dir, tmp_path):
    """alignkit generate samples inside for_sampling (the whole batch loop), and leaves it afterwards."""
    import contextlib

    from alignkit import cli

    seen = []

    @contextlib.contextmanager
    def recorded():
        seen.append("enter")
        yield
        seen.append("exit")

    monkeypatch.setattr(memory, "for_sampling", recorded)
    import alignkit.rollout.sample as sample_mod

    real = sample_mod.sample_k
    monkeypatch.setattr(sample_mod, "sample_k", lambda *a, **k: seen.append("sample") or real(*a, **k))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Say hi."}\n{"prompt": "Count to three."}\n{"prompt": "Name a colour."}\n')
    assert cli.main(["generate", "--model", str(tiny_model_dir), "--data", str(prompts), "--output",
                     str(tmp_path / "out.jsonl"), "--num-responses", "2", "--max-new-tokens", "4",
                     "--gen-batch-size", "2", "--no-progress"]) == 0
    assert seen == ["enter", "sample", "sample", "exit"]
