"""What every recipe does around the loop: the accelerator, the output folder, a clean finish."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..config import TrainConfig, dump_config
from ..errors import InputError
from . import fsdp


def make_accelerator(precision: str, seed: int):
    """An ``accelerate`` Accelerator: one process, or data parallel under torchrun/accelerate launch."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    # accelerate keeps its settings in process-wide singletons: a second run in the same process
    # (a notebook, a test, a pipeline of recipes) with another precision would be refused. Reset
    # them, keeping the process group (PartialState).
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()

    # cpu=True when there is no GPU: accelerate only sets up gloo data parallelism under
    # torchrun when told it runs on the CPU.
    acc = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=not torch.cuda.is_available())
    if acc.distributed_type.name in ("DEEPSPEED", "MEGATRON_LM"):
        raise InputError(f"{acc.distributed_type.name} is not supported; launch data parallel or FSDP "
                         "(torchrun ... --fsdp, or accelerate launch --use_fsdp)", field="launcher")
    set_seed(seed)
    from ..memory import for_precision
    from ..precision import warn_if_emulated

    if acc.is_main_process:
        warn_if_emulated(precision)
    for_precision(precision)  # autocast's per-step weight casts: reuse freed blocks (alignkit.memory)
    return acc


def prepare_output_dir(accelerator, cfg: TrainConfig, sections: dict) -> Path:
    """Create the output folder and write config.yaml (main process only).

    A folder that already holds a run is only reused with --resume or --overwrite, so a
    finished model is never clobbered by accident.
    """
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        if (out / "config.yaml").exists() and not (cfg.resume or cfg.overwrite):
            raise InputError("the output folder already holds a run; pass --resume to continue it, "
                             "--overwrite to replace it, or choose another folder",
                             file=str(out), field="output_dir")
        out.mkdir(parents=True, exist_ok=True)
        dump_config(sections, out / "config.yaml")
    accelerator.wait_for_everyone()
    return out


def finish_run(accelerator, model, save: Callable[[Any], None], sharded=None) -> None:
    """Rank 0 writes the final model (``save(model)``); every process waits for it.

    ``sharded``: the loop's FSDP-sharded module holding ``model``. Its full weights are gathered
    (every process takes part) and rank 0 saves an unsharded copy of the same architecture.
    """
    from ..memory import after_training

    after_training()  # the loop's optimizer state and freed blocks go back to the OS before the save
    if sharded is not None:
        state = fsdp.full_state(sharded, trainable_only=False)
        if accelerator.is_main_process:
            model = fsdp.unsharded_copy(model, state)
        del state
    if accelerator.is_main_process:
        save(model)
    accelerator.wait_for_everyone()


def shutdown() -> None:
    """End a distributed run cleanly (a process exiting without this can abort at exit with gloo)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
