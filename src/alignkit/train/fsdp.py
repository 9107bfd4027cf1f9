"""Fully sharded data parallelism (PyTorch FSDP2, ``fully_shard``) for the one loop.

Each process holds 1/world of every parameter, gradient and AdamW state; a layer's weights are
all-gathered just before its forward (and backward) and freed after. Gradients are
reduce-scattered and averaged over processes exactly as DDP averages them, so the loop's loss
scaling (``world / G``) is unchanged and FSDP ends with the same weights as one process.

Why not ``accelerate``'s FSDP plugin: accelerate only sets up a CPU (gloo) process group when
told ``cpu=True``, and then ignores FSDP and wraps DDP. ``fully_shard`` works on CPU and GPU
alike, so alignkit shards the model itself; ``accelerate launch --use_fsdp`` is honoured by
reading the same environment variable.

Units: every transformer block (the classes a transformers model lists in ``_no_split_modules``)
is one unit; the root unit is the module the loop calls, so the embeddings, the final norm and a
tied LM head are gathered together for the log-prob forward.

Collectives: every process must take part in the same forwards and in each state-dict gather,
so checkpoints and the final model are gathered on all processes and written by rank 0.
"""

from __future__ import annotations

import os

import torch
from torch import nn

_PREFIX = "model."  # the loop's module wraps the model as ``.model`` (ops.logprobs.CompletionLogProbs)


def requested(flag: bool) -> bool:
    """--fsdp, or ``accelerate launch --use_fsdp`` (which sets ACCELERATE_USE_FSDP)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def _block_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def shard(module: nn.Module, model: nn.Module) -> nn.Module:
    """Shard ``module`` (which holds ``model``) in place: one FSDP unit per transformer block, the
    rest in the root unit. Returns the same object."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    blocks = _block_classes(model)
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise ValueError(f"{type(model).__name__} names no transformer block classes (_no_split_modules); "
                         "FSDP needs them to shard layer by layer")
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of an accumulation step."""
    module.set_requires_gradient_sync(sync)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ over sharded gradients returns a replicated DTensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) weights, keyed as the unwrapped model names them. A collective:
    every process calls it; rank 0 receives the tensors (on CPU), the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_options(cpu_offload=True))
    keep = {n for n, p in module.named_parameters() if p.requires_grad} if trainable_only else None
    return {k[len(_PREFIX):]: v for k, v in state.items() if keep is None or k in keep}


def full_optimizer_state(module: nn.Module, optimizer) -> dict:
    """The optimizer's full state keyed by parameter name (collective; rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))


def load_full_state(module: nn.Module, optimizer, trainable: dict[str, torch.Tensor], optim_state: dict) -> None:
    """Load a checkpoint written from full states (every process reads the files)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(module, {_PREFIX + k: v for k, v in trainable.items()}, options=_options(strict=False))
    set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state, options=_options())


def unsharded_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded) model of the same architecture holding ``state``, for saving on rank 0.
    LoRA models get the same adapter configuration, so they save as an adapter as usual."""
    import copy

    from ..models import _is_peft

    base = model.get_base_model() if _is_peft(model) else model
    cfg = copy.deepcopy(base.config)
    if getattr(cfg, "quantization_config", None) is not None:  # GGUF-derived: weights are plain
        del cfg.quantization_config
    fresh = type(base)(cfg)  # the model's own class: only its blocks and the loop's wrapper were sharded
    if getattr(base, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(base.generation_config)
    if _is_peft(model):
        from peft import get_peft_model

        fresh = get_peft_model(fresh, copy.deepcopy(model.peft_config[model.active_adapter]))
    fresh.load_state_dict(state)
    return fresh
