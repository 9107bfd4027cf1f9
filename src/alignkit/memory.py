"""glibc's malloc settings: give freed tensor memory back to the OS, or keep it for reuse (Linux).

glibc serves large allocations with mmap (returned to the OS on free) only above a threshold
that it *raises* each time such a block is freed, up to 32 MiB; after the first training step
most activation- and gradient-sized blocks therefore come from the heap and stay in the
process after they are freed. Measured on the tiny benchmark model (defaults, 14 steps): peak
RSS 748 -> 705 MB; the price is page faults on every large allocation, about 5-10% of tokens/s
in those runs (noisy; an 8 MiB threshold kept the speed but saved only ~20 MB). Fixing the
threshold keeps every block of 64 KiB or more on mmap; every CLI command starts that way.

The RL loop (PPO/GRPO) pays far more for it: each decode step and each training pass allocates
and frees many activation-sized blocks, and each one is a fresh mmap zero-filled page by page.
On the embedded model a GRPO step took 16.5 s with the 64 KiB threshold and 11.6 s with glibc's
own; so ``rl_loop`` called :func:`keep_freed_memory_for_reuse` (a fixed 32 MiB threshold, glibc's
dynamic ceiling, and a trim threshold of twice that), trading a few hundred MB of peak RSS for
speed (benchmarks/README.md, bench_rl section, has the numbers). It now calls :func:`for_training`,
which also keeps the blocks above 32 MiB (softmax, the tied table's gradient, the blocked LM head) off mmap.

bf16 autocast pays for it too: every forward casts each fp32 weight to a fresh bf16 copy (MB-sized
blocks, hundreds per step), and the backward casts the weight gradients back. With the 64 KiB
threshold each one is a new mmap faulted in page by page: `alignkit rm` on the embedded model (LoRA,
bf16) ran 150 tokens/s with 3 min 15 s of system time in a 4 min run, and 330 tokens/s with 7 s
when freed blocks are reused. So every command that runs under bf16 autocast calls
:func:`for_precision`, which switches to reuse (a process stays switched: a pipeline's later fp32
stages keep it).

The gradient loop (``train/loop.py``: SFT, DPO, reward models) pays for it in fp32 too: a step
frees its gradients at ``zero_grad`` and allocates them again in the next backward, and every fresh
block was faulted in while the weight-gradient products wrote it (on SmolLM2-135M those ran at a
third of their rate in isolation). So the loop calls :func:`for_training` at its start.
Sampling pays for it in fp32 as well: every generation blocks a copy of each weight for the decoder,
prefills a batch of prompts and fills key/value buffers, and frees it all again. 64 prompts of the
constraint set on the embedded model (32 per batch, 40 new tokens, AVX2 CPU) took 23.4-27.0 s with the
64 KiB threshold (3.6-4.3 million page faults, 10-12 s of system time) and 18.3-18.7 s reusing freed
blocks (0.35 million, 1.1 s). So ``rollout/sample.sample_prompts`` runs under :func:`for_sampling`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536  # glibc's DEFAULT_MMAP_MAX
_THRESHOLD_BYTES = 64 * 1024
# Blocks below this come from the heap and are reused. 32 MiB is the largest value glibc accepts
# (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), and where its dynamic threshold ends up after warm-up.
# 0: leave the 64 KiB threshold in place for RL too.
RL_MMAP_THRESHOLD = 32 * 2**20
# The training loops serve every block from the heap, those above RL_MMAP_THRESHOLD too (for_training).
HEAP_ONLY = True


def _libc():
    """glibc, or None (not Linux, or a libc without mallopt / malloc_trim such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


# Whether this process currently keeps freed blocks for reuse (set by the functions below)
_reusing = False


def _mallopt(*settings: tuple[int, int]) -> bool:
    libc = _libc()
    return libc is not None and all(bool(libc.mallopt(param, value)) for param, value in settings)


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap threshold at 64 KiB, with mmap allowed (glibc's default maximum count of
    mappings, which :func:`for_training` sets to 0). Returns False where there is no glibc (nothing to do)."""
    global _reusing
    done = _mallopt((_M_MMAP_THRESHOLD, _THRESHOLD_BYTES), (_M_MMAP_MAX, _GLIBC_MMAP_MAX))
    _reusing = _reusing and not done
    return done


def for_precision(precision: str) -> bool:
    """Under ``bf16`` autocast keep freed blocks for reuse (:func:`keep_freed_memory_for_reuse`); fp32 keeps
    the 64 KiB threshold. True if the setting changed."""
    return keep_freed_memory_for_reuse() if precision == "bf16" else False


def keep_freed_memory_for_reuse(threshold: int | None = None, trim: int | None = None) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (default :data:`RL_MMAP_THRESHOLD`) and its trim
    threshold at ``trim`` (default twice that), so freed blocks below it stay in the heap for the next
    allocation instead of going back to the OS (and being page-faulted in again). False where there is
    no glibc, or with threshold 0 (nothing changed)."""
    threshold = RL_MMAP_THRESHOLD if threshold is None else threshold
    if threshold <= 0:
        return False
    global _reusing
    done = _mallopt((_M_MMAP_THRESHOLD, threshold), (_M_TRIM_THRESHOLD, 2 * threshold if trim is None else trim))
    _reusing = _reusing or done
    return done


# The training loop never trims: the gradients it frees at each step's zero_grad (hundreds of MB at
# the top of the heap) would otherwise go back to the OS and be faulted in again next step.
NO_TRIM = 2**31 - 1


def after_training() -> bool:
    """Once a training loop has returned (``train/run.finish_run``, before the final save): the CLI's
    setting again (:func:`return_freed_memory_to_os`) and the heap's free memory handed back to the OS
    (``malloc_trim``). :func:`for_training` never trims, so without this a process that goes on (the
    demo's next stage, a notebook) keeps every block the loop freed: after the demo's PPO stage 4.5 GB
    stayed resident through the stages that followed. False where there is no glibc."""
    libc = _libc()
    if libc is None or not return_freed_memory_to_os():
        return False
    libc.malloc_trim(0)
    return True


def for_training() -> bool:
    """The training loops' setting (train/loop.py: SFT, DPO, reward models; ``rl_loop``: PPO, GRPO):
    freed blocks are reused and the heap is never trimmed. Blocks below 32 MiB: measured side by side
    (bench_dpo.py, ``defaults``, fp32) embedded 88 -> 147 tokens/s for +100-140 MB peak RSS, tiny
    ~1300 -> ~1750 tokens/s for +20 MB.

    With :data:`HEAP_ONLY` glibc serves no block by mmap at all, so the blocks of 32 MiB and up come
    from the heap and are reused too. A GRPO step on the embedded model allocates and frees ~500 MB
    of them (the kept (N, V) softmax 100 MB, the tied table's gradient 113 MB, logit chunks 33-67 MB,
    the decoder's blocked LM head 113 MB), each mmapped, zero-filled page by page and unmapped again:
    ~120 000 page faults per step (strace, getrusage). Heap only: no page fault after the second step,
    the same peak RSS (3.81-3.85 against 3.79-3.84 GB); bench_dpo.py ``defaults`` on the embedded
    model 152-167 against 129-153 tokens/s (three alternating pairs), peak RSS 2.58-2.64 against
    2.63-2.66 GB. False where there is no glibc or with ``RL_MMAP_THRESHOLD = 0`` (nothing changed)."""
    if not keep_freed_memory_for_reuse(RL_MMAP_THRESHOLD, NO_TRIM):
        return False
    return _mallopt((_M_MMAP_MAX, 0)) if HEAP_ONLY else True


@contextmanager
def for_sampling():
    """Sampling (``rollout/sample.sample_prompts``: generate, best-of-n, rso, eval, the demo, online-dpo)
    runs under the training loops' setting (:func:`for_training`), and afterwards the process is back
    on the CLI's with the heap trimmed (:func:`after_training`), so a long process does not keep the
    decoder's freed blocks. Where the process already reuses freed blocks (bf16, inside a loop) nothing
    changes, on entry or exit."""
    switched = not _reusing and for_training()
    try:
        yield
    finally:
        if switched:
            after_training()
