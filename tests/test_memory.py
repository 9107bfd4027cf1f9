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
