"""The few-row product of ``skinny.c``, built once per machine with the system's C compiler.

Decoding multiplies a handful of rows (one token per sequence) by every weight of the model, so its
speed is how fast the weights stream through the cores. On the 2-core AVX2 EPYC this project runs
on, oneDNN's prepacked product reached 11-17 GB/s at SmolLM2-135M's decoding shapes (8 rows) and
this kernel 17-23 GB/s (``benchmarks/README.md``, the ninth session's section); it also adds the
residual stream in place.

:func:`library` compiles ``skinny.c`` with ``$CC`` (else ``cc``) into
``cache_root()/native/<hash of source and flags>/``, once, through a temporary file renamed into place
(so concurrent processes never load a half-written library), and loads it with ctypes. It is None --
and callers keep oneDNN -- off x86-64 Linux, on a CPU without AVX2 and FMA, without a compiler, when
the build fails, or with ``ALIGNKIT_NATIVE=0``. fp32 only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
LIBS = ["-lm"]
VERSION = 2  # skinny.c's ak_version()
PANEL = 8  # output columns per packed panel (skinny.c's PANEL)
# Up to this many rows the kernel beats oneDNN's prepacked product at SmolLM2's shapes; above, the
# weights stay in cache between row blocks and oneDNN's larger register blocking wins.
MAX_ROWS = 32


def _cpu_ok() -> bool:
    """x86-64 Linux with AVX2 and FMA (the kernel's instructions)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return "avx2" in flags and "fma" in flags


def _build(target: Path, compiler: str) -> bool:
    """Compile the source into ``target`` atomically; False (with the compiler's words logged) on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, *LIBS], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            log.info("alignkit: the native decode kernel did not build (%s); oneDNN instead:\n%s", compiler,
                     done.stderr[-2000:])
            return False
        os.replace(tmp, target)
        return True
    except (OSError, subprocess.SubprocessError) as err:
        log.info("alignkit: the native decode kernel did not build (%s); oneDNN instead", err)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it the first time on this machine; None where it cannot run here."""
    from ..embedded import cache_root

    if os.environ.get("ALIGNKIT_NATIVE", "1") == "0" or not _cpu_ok():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + LIBS).encode()).hexdigest()[:16]
    target = cache_root() / "native" / key / "libalignkit_skinny.so"
    if not target.is_file() and not _build(target, compiler):
        return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        log.info("alignkit: the native decode kernel did not load (%s); oneDNN instead", err)
        return None
    if lib.ak_version() != VERSION:
        return None
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.ak_linear.argtypes = [p, n, n, p, p, p, n, ctypes.c_int]
    lib.ak_linear.restype = ctypes.c_int
    lib.ak_rmsnorm.argtypes = [p, n, n, p, ctypes.c_float, p]
    lib.ak_rmsnorm.restype = None
    lib.ak_attention.argtypes = [p, n, n, n, n, n, p, p, n, p, n, n, ctypes.c_float, p]
    lib.ak_attention.restype = ctypes.c_int
    return lib


def available(rows: int) -> bool:
    """Will :func:`linear` run for ``rows``-row fp32 inputs on this machine?"""
    return 0 < rows <= MAX_ROWS and library() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """W (N, K) fp32 -> (ceil(N / 8), K, 8) panels: panel p's vector k holds W[8p:8p+8, k], zeros past N."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    w = weight.detach().float()
    if panels * PANEL != n:
        w = torch.cat([w, w.new_zeros(panels * PANEL - n, k)])
    return w.view(panels, PANEL, k).transpose(1, 2).contiguous()  # (panels, K, 8)


def linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp32 -> x W^T + b (M, n) from ``packed`` = :func:`pack` (W); with ``out`` (M, n) contiguous
    fp32, adds the product into it in place and returns it (``out + (x W^T + b)``)."""
    x = x.contiguous()
    m, k = x.shape
    if packed.shape[1] != k or x.dtype != torch.float32 or packed.shape[0] * PANEL < n:
        raise ValueError(f"native.linear: x {tuple(x.shape)} {x.dtype} does not fit weight panels {tuple(packed.shape)}")
    if bias is not None and (not bias.is_contiguous() or bias.dtype != torch.float32 or bias.numel() != n):
        raise ValueError(f"native.linear: bias {tuple(bias.shape)} {bias.dtype} is not a contiguous fp32 ({n},)")
    accumulate = out is not None
    if out is None:
        out = torch.empty(m, n)
    elif out.shape != (m, n) or not out.is_contiguous() or out.dtype != torch.float32:
        raise ValueError(f"native.linear: out {tuple(out.shape)} is not a contiguous fp32 ({m}, {n})")
    if library().ak_linear(x.data_ptr(), m, k, packed.data_ptr(), None if bias is None else bias.data_ptr(),
                           out.data_ptr(), n, int(accumulate)):
        raise MemoryError("native.linear: no memory for the transposed inputs")
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm in fp32: x (M, H) -> weight * (x / sqrt(mean(x^2) + eps)), (M, H)."""
    x = x.contiguous()
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != x.shape[-1:] \
            or not weight.is_contiguous():
        raise ValueError(f"native.rmsnorm: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    out = torch.empty_like(x)
    library().ak_rmsnorm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr())
    return out


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, upto: int,
              scale: float) -> torch.Tensor:
    """One query per row over the first ``upto`` columns: q (B, heads, dim) fp32 whose last two dims are
    contiguous (a slice of the fused q/k/v output); keys, values (B, kv, length, dim) contiguous fp32;
    mask (B, >= upto) int64 with contiguous rows, nonzero on allowed columns. Returns
    softmax(scale q K^T) V as (B, heads * dim), query head j on key/value head j // (heads / kv)."""
    rows, heads, dim = q.shape
    kv, length = keys.shape[1], keys.shape[2]
    if q.dtype != torch.float32 or q.stride()[1:] != (dim, 1) or keys.shape != values.shape \
            or keys.shape[0] != rows or keys.shape[3] != dim or heads % kv or not keys.is_contiguous() \
            or not values.is_contiguous() or keys.dtype != torch.float32 or values.dtype != torch.float32 \
            or mask.dtype != torch.long or mask.shape[0] != rows or mask.stride(1) != 1 \
            or not 0 < upto <= min(length, mask.shape[1]):
        raise ValueError(f"native.attention: q {tuple(q.shape)} {q.stride()}, keys {tuple(keys.shape)}, "
                         f"mask {tuple(mask.shape)} {mask.dtype}, upto {upto}")
    out = torch.empty(rows, heads * dim)
    if library().ak_attention(q.data_ptr(), rows, heads, kv, dim, q.stride(0), keys.data_ptr(), values.data_ptr(),
                              length, mask.data_ptr(), mask.stride(0), upto, scale, out.data_ptr()):
        raise MemoryError("native.attention: no memory for the scores")
    return out
