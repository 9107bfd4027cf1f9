"""Reference-model log-probs: computed on the fly, or once before training and cached on disk.

The cache key is a hash of (reference weights, token ids of every pair, precision), so a
later run with the same reference, data and tokenisation settings reuses the file and
never loads the reference model at all; anything that changes the numbers changes the key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..embedded import cache_root
from ..ops.logprobs import batch_sequence_logprobs


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(weights_fp: str, data_fp: str, precision: str) -> str:
    return hashlib.sha256(f"{weights_fp}|{data_fp}|{precision}|v1".encode()).hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_root() / "ref_logps" / f"{key}.safetensors"


@torch.no_grad()
def compute_reference_logps(model: nn.Module, examples: Sequence, collate: Callable, *,
                            batch_size: int, autocast: Callable, progress: bool = True) -> dict[str, torch.Tensor]:
    """Summed reference log-probs of every pair: {'chosen': (N,), 'rejected': (N,)} in dataset order."""
    from tqdm.auto import tqdm

    model.eval()
    chosen = torch.empty(len(examples), dtype=torch.float64)
    rejected = torch.empty(len(examples), dtype=torch.float64)
    for s in tqdm(range(0, len(examples), batch_size), desc="reference log-probs", disable=not progress):
        batch = collate(list(examples[s:s + batch_size]))
        with autocast():
            total, _, _ = batch_sequence_logprobs(model, batch)  # (2b,)
        b = total.shape[0] // 2
        chosen[batch["index"]] = total[:b].double()
        rejected[batch["index"]] = total[b:].double()
    return {"chosen": chosen, "rejected": rejected}


def load_or_compute(key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
    """(log-probs, hit). A miss computes and writes the file atomically (temp name, then rename)."""
    path = cache_path(key)
    if path.exists():
        return load_file(str(path)), True
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in values.items()}, str(tmp))
    os.replace(tmp, path)
    return values, False
