"""``--precision auto``: bf16 autocast only where the hardware computes bf16 natively.

bf16 autocast pays on a CPU with bf16 instructions and costs dearly on one without. Measured with
torch 2.13.0 on 2 cores of each machine:

- A CPU with native bf16 (the machine the earlier benchmarks ran on) multiplied bf16 matrices at
  ~185 GFLOP/s against ~60 for fp32. The demo's LoRA stages ran under bf16 there for that reason.
- An AMD EPYC with AVX2 only (no AVX512-BF16, no AMX) ran a 512x576 @ 576x1536 product at
  28 GFLOP/s in bf16 and 131 in fp32. A 4x256-token forward and backward of SmolLM2-135M took
  219-227 s against 9-11 s. `alignkit dpo --config configs/demo_dpo.yaml` (LoRA) trained at
  9.4 tokens/s against 212-236 tokens/s with fp32. Sampling 2 prompts x 4 x 64 tokens took 6.8-6.9
  against 3.7-3.8 s.

So ``auto`` resolves to ``bf16`` on a CUDA device that supports it, or on a CPU with AVX512-BF16 or
AMX tiles (x86) or the BF16 extension (Arm, Linux). Everywhere else it resolves to ``fp32``. The
resolved value is what the run uses and what its ``config.yaml`` records. An explicit ``bf16`` is
honoured, with a warning where it is emulated (:func:`warn_if_emulated`).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path


@functools.cache
def native_bf16() -> bool:
    """Does this machine compute bf16 products natively: a CUDA device with bf16 support, else the CPU's
    instructions (x86: AVX512-BF16 or AMX tiles, as torch.cpu reports them; Arm on Linux: the ``bf16``
    feature of /proc/cpuinfo)? False where it cannot tell."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is not None and check() for check in checks):
        return True
    return "bf16" in _cpuinfo_flags()


def _cpuinfo_flags() -> set[str]:
    """The CPU feature words of /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def resolve(precision: str) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``fp32``; ``fp32`` and ``bf16`` unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


_warned = False


def warn_if_emulated(precision: str) -> None:
    """Once per process: say on stderr that bf16 autocast was asked for on hardware without native bf16."""
    global _warned
    if precision != "bf16" or _warned or native_bf16():
        return
    _warned = True
    print("alignkit: warning: --precision bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): "
          "autocast emulates it, which ran LoRA DPO on SmolLM2-135M 24x slower than fp32 on such a CPU. "
          "--precision auto picks bf16 only where it is native.", file=sys.stderr)
