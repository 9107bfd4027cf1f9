"""The one training loop every recipe uses. Read it top to bottom: ``train``.

A recipe gives a module to optimise, a list of examples, a collate function, and a
``step_fn(module, batch) -> StepOutput`` that returns the SUM of per-example losses of
one micro-batch. The loop owns everything else: data order, accumulation, loss
reduction, clipping, the optimizer and schedule, logging, evaluation, checkpoints and
resume.

Loss reduction is explicit: one optimizer step always sees exactly ``G = batch_size x
grad_accum x world_size`` examples (the data is one endless stream of per-epoch
permutations, so the last batch of an epoch is filled from the next), and every
micro-batch's summed loss is divided by ``G``. The gradient is therefore the mean over
the same G examples for batch 8 x accumulation 1, batch 2 x accumulation 4, or two
processes of batch 4 — the bug class of transformers#34191 cannot happen.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import TrainConfig
from .. import memory
from ..errors import NonFiniteError
from ..ops.grad_in_place import InPlaceGrads
from ..ops.grad_in_place import install as install_grads_in_place
from . import fsdp


@dataclass
class StepOutput:
    """What a recipe's step function returns for one micro-batch."""

    loss_sum: torch.Tensor                 # scalar: sum of per-example losses (not the mean)
    count: int                             # examples in this micro-batch
    metrics: dict[str, torch.Tensor]       # name -> SUM over the micro-batch's examples (detached)
    tokens: int                            # real (non-pad) tokens processed


@dataclass
class LoopResult:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    sharded: bool = False                  # the module was sharded with FSDP (save via finish_run)


# ---------------------------------------------------------------- data order

@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch; cached so a step does not redraw a permutation of the whole set."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def stream_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Dataset indices of optimizer step ``step``: positions [step*G, (step+1)*G) of the stream
    perm(seed, epoch 0) ++ perm(seed, epoch 1) ++ ... Depends on nothing but its arguments, so a
    resumed run sees exactly the batches an uninterrupted one would."""
    out: list[int] = []
    pos = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(pos, n)
        perm = _epoch_order(n, seed, epoch)
        take = min(global_batch - len(out), n - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return out


def rank_micro_batches(indices: Sequence[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Split one step's G indices into this rank's micro-batches: micro-batch k of rank r is
    indices[(k*world + r)*B : ...+B], so one process of batch W*B sees the same examples per step."""
    per_micro = batch_size * world
    return [list(indices[k + rank * batch_size: k + (rank + 1) * batch_size])
            for k in range(0, len(indices), per_micro)]


def total_steps(cfg: TrainConfig, n: int, global_batch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n / global_batch))


# ---------------------------------------------------------------- checkpoints

def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().contiguous() for k, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(ckpt_root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler, limit: int | None = None, num_tokens: int = 0, log_window: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically: into a temporary folder, then one rename.
    A crash mid-save leaves the previous checkpoint as the newest complete one. ``log_window``: the
    metrics of the steps since the last log line (:meth:`_Window.state`), for an exact resumed log."""
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if not all(torch.isfinite(t).all() for t in trainable.values()):
        shutil.rmtree(tmp)
        raise NonFiniteError(f"refusing to checkpoint non-finite weights at step {step}")
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": _rng_state()}, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "num_tokens": num_tokens, "log_window": log_window}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if limit:
        for old in list_checkpoints(ckpt_root)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_state(module: nn.Module, save_target: nn.Module, optimizer, sharded: bool) -> tuple[dict, dict]:
    """(trainable weights, optimizer state) to checkpoint. Under FSDP a collective: call it on
    every process; rank 0 receives the full states."""
    if sharded:
        return fsdp.full_state(module, trainable_only=True), fsdp.full_optimizer_state(module, optimizer)
    return trainable_state(save_target), optimizer.state_dict()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not ckpt_root.exists():
        return []
    done = [p for p in ckpt_root.glob("step-*") if (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, module: nn.Module, save_target: nn.Module, optimizer, scheduler,
                    sharded: bool = False) -> tuple[int, int, dict | None]:
    """Restore a checkpoint; returns (step, tokens seen so far, the open log window's state or None)."""
    state = load_file(str(path / "trainable.safetensors"))
    extra = torch.load(path / "trainer_state.pt", weights_only=False)
    if sharded:
        fsdp.load_full_state(module, optimizer, state, extra["optimizer"])
    else:
        params = dict(save_target.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    state = json.loads((path / "state.json").read_text())
    return state["step"], state.get("num_tokens", 0), state.get("log_window")


# ---------------------------------------------------------------- logging

class MetricsLog:
    """metrics.jsonl (one object per logged step) and TensorBoard, written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop what a crashed run logged after its checkpoint
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif not resume_step:
            self.path.write_text("")
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step or None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------- the loop

class _Window:
    """Metrics averaged over the steps since the last log line; tokens/s over training time only
    (evaluation and checkpointing are not counted)."""

    def __init__(self, state: dict | None = None):
        self.sums: dict[str, float] = dict(state["sums"]) if state else {}
        self.steps, self.tokens = (state["steps"], state["tokens"]) if state else (0, 0)
        self.seconds = state["seconds"] if state else 0.0

    def state(self) -> dict:
        """What a checkpoint keeps so a resumed run's next log line averages the same steps."""
        return {"sums": self.sums, "steps": self.steps, "tokens": self.tokens, "seconds": self.seconds}

    def add(self, metrics: dict[str, float], tokens: int, seconds: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds

    def flush(self) -> dict[str, float]:
        out = {k: v / self.steps for k, v in self.sums.items()}
        out["tokens_per_second"] = self.tokens / max(self.seconds, 1e-9)
        self.__init__()
        return out


def accumulate_gradients(accelerator, module: nn.Module, batches: list[dict], step_fn: Callable,
                         denominator: float, sharded: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """Forward and backward over this process's micro-batches of one optimizer step.

    Each micro-batch's summed loss is scaled by world/D (DDP then averages over the world), where
    D is the step's global number of loss units: G examples, or the all-reduced sum of the batches'
    ``loss_units`` (e.g. completion tokens, for a per-token mean). The accumulated gradient is
    d(mean loss over the step's units) whatever the split.
    Gradients are synchronised (DDP all-reduce, FSDP reduce-scatter) on the last micro-batch only.
    Returns this process's metric sums (loss included) and real-token count.
    """
    world = accelerator.num_processes
    sums: dict[str, torch.Tensor] = {"loss": torch.zeros(())}
    tokens = 0
    for k, batch in enumerate(batches):
        last = k == len(batches) - 1
        if sharded:
            fsdp.set_gradient_sync(module, last)
        sync = accelerator.no_sync(module) if not (last or sharded) else contextlib.nullcontext()
        with sync:
            with accelerator.autocast():
                out = step_fn(module, batch)
            accelerator.backward(out.loss_sum * (world / denominator))
        sums["loss"] += out.loss_sum.detach().float()
        for name, v in out.metrics.items():
            sums[name] = sums.get(name, torch.zeros(())) + v.detach().float()
        tokens += out.tokens
    return sums, tokens


def _denominator(accelerator, batches: list[dict], global_batch: int) -> float:
    """The step's global number of loss units: sum of ``loss_units`` over every process's batches
    when they all carry it (at least 1), else the G examples."""
    if not batches or not all("loss_units" in b for b in batches):
        return float(global_batch)
    units = {"u": torch.tensor(float(sum(int(b["loss_units"]) for b in batches)))}
    return max(1.0, float(_reduce(accelerator, units)["u"]))


def _check_finite(step: int, loss: float, grad_norm: float) -> None:
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        raise NonFiniteError(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step + 1} "
            f"(loss={loss}, grad_norm={grad_norm}); stopped without saving these weights. "
            "Try a lower --lr, --precision fp32, or check the data.")


def _reduce(accelerator, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each metric over processes."""
    if accelerator.num_processes == 1:
        return values
    names = sorted(values)
    stacked = accelerator.reduce(torch.stack([values[k].float() for k in names]), reduction="sum")
    return dict(zip(names, stacked))


def evaluate(accelerator, module: nn.Module, examples: Sequence, collate: Callable,
             step_fn: Callable, batch_size: int, sharded: bool = False) -> dict[str, float]:
    """Mean loss and metrics over held-out examples (each process takes a strided share).

    Under FSDP every forward is a collective, so a process whose share is shorter runs the same
    number of forwards, on examples it then leaves out of the sums."""
    module.eval()
    sums: dict[str, torch.Tensor] = {"loss": torch.zeros(())}
    count = torch.zeros(())
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    rounds = math.ceil(math.ceil(len(examples) / accelerator.num_processes) / batch_size) if sharded \
        else math.ceil(len(mine) / batch_size)
    with torch.no_grad():
        for r in range(rounds):
            idx = mine[r * batch_size:(r + 1) * batch_size]
            batch = collate([examples[i] for i in (idx or [0])])
            with accelerator.autocast():
                out = step_fn(module, batch)
            if not idx:  # a padding forward (FSDP only)
                continue
            sums["loss"] += out.loss_sum.detach().float()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, torch.zeros(())) + v.float()
            count += out.count
    sums["_count"] = count
    sums = _reduce(accelerator, sums)
    n = sums.pop("_count").clamp(min=1)
    module.train()
    return {f"eval/{k}": (v / n).item() for k, v in sums.items()}


def grads_in_place(accelerator, module: nn.Module, sharded: bool = False) -> InPlaceGrads | None:
    """With ``ALIGNKIT_GRAD_IN_PLACE=1``: weight gradients accumulated straight into persistent buffers
    (``ops/grad_in_place.py``) where that is safe: one process (no DDP/FSDP hooks to keep), fp32
    (autocast runs stock linears). Off by default: it is ~12% faster on SmolLM2-135M but holds the
    gradients through the forward, +200 MB peak RSS there (+50 MB on the tiny benchmark model)."""
    if sharded or accelerator.num_processes > 1 or accelerator.mixed_precision != "no" \
            or os.environ.get("ALIGNKIT_GRAD_IN_PLACE", "0") != "1":
        return None
    return install_grads_in_place(module)


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """The learning-rate multiplier after ``step`` optimizer steps: a linear warm-up from 0 over
    ``warmup`` steps, then 1 (``constant``), a linear decay to 0 at ``total`` (``linear``) or half a
    cosine down to 0 at ``total`` (``cosine``). These are transformers' warm-up schedules (what TRL
    runs), written out so a run need not import ``transformers.optimization`` (and with it
    ``trainer_utils`` and peft: ~10 MB resident)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown learning-rate schedule {kind!r}")


def make_scheduler(optimizer, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, kind=kind, warmup=warmup,
                                                                          total=total))


def init_adamw_state(optimizer) -> None:
    """Allocate AdamW's state now, in the form its first ``step`` would create (torch/optim/adam.py).

    Lazily created, the moments (2x the trainable parameters) are allocated at the end of the first
    step, above that step's gradients in the heap; once those are freed, the next step's
    activations take the hole below the moments and its gradients no longer fit there, so the heap
    grows by about one gradient (48 MB on the tiny benchmark model, 15.7M parameters). Allocated
    before the first forward pass, the moments sit below everything a step frees and re-allocates.
    A loaded checkpoint replaces this state as it would the lazy one."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    if not isinstance(opt, torch.optim.AdamW):
        return
    for group in opt.param_groups:
        for p in group["params"]:
            if opt.state[p]:
                continue
            state = opt.state[p]
            if group["fused"] or group["capturable"]:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:
                scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                state["step"] = torch.tensor(0.0, dtype=scalar, device="cpu")
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)


def train(*, accelerator, module: nn.Module, save_target: nn.Module, examples: Sequence,
          collate: Callable[[list], dict], step_fn: Callable[[nn.Module, dict], StepOutput],
          cfg: TrainConfig, out_dir: Path, eval_examples: Sequence | None = None,
          derive: Callable[[dict[str, float]], dict[str, float]] | None = None) -> LoopResult:
    """Train ``module`` (whose trainable parameters belong to ``save_target``) and return the last metrics.

    ``save_target`` is the unwrapped model whose trainable parameters are checkpointed. ``derive``
    adds metrics computed from a logged record (e.g. perplexity from the loss) before it is written.
    Loss and metric sums are divided by the step's examples, or by its ``loss_units`` when every
    batch carries them (see :func:`accumulate_gradients`). With
    ``cfg.fsdp`` (or ``accelerate launch --use_fsdp``) ``module`` is sharded in place (train/fsdp.py);
    the recipe then saves through :func:`alignkit.train.run.finish_run` with ``sharded=module``.
    """
    from tqdm.auto import tqdm

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps = total_steps(cfg, len(examples), global_batch)
    sharded = fsdp.requested(cfg.fsdp) and world > 1
    if sharded:
        fsdp.shard(module, save_target)  # before the optimizer: it must hold the sharded parameters
    params = [p for p in module.parameters() if p.requires_grad]
    # The fused kernel exists for CPU and CUDA; on this 2-core CPU it is ~8x faster than the
    # per-tensor loop, which was a quarter of a tiny model's step (benchmarks/README.md).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler, int(cfg.warmup_ratio * steps), steps)
    if not sharded:
        module, optimizer = accelerator.prepare(module, optimizer)
    memory.for_training()  # freed gradient and activation blocks are reused, not faulted in again each step
    init_adamw_state(optimizer)  # after for_training: the moments live in the heap, below every step's blocks
    in_place = grads_in_place(accelerator, module, sharded)

    ckpt_root = out_dir / "checkpoints"
    start = seen_tokens = 0
    window_state = None
    if cfg.resume and (found := list_checkpoints(ckpt_root)):
        start, seen_tokens, window_state = load_checkpoint(found[-1], module, save_target, optimizer, scheduler, sharded)
        accelerator.print(f"resuming from {found[-1]} (step {start} of {steps})")
    log = MetricsLog(out_dir, accelerator.is_main_process, resume_step=start)
    bar = tqdm(total=steps, initial=start, disable=not (cfg.progress and accelerator.is_main_process),
               desc="train", unit="step", dynamic_ncols=True)
    try:
        window = _Window(window_state)
        last: dict[str, float] = {}
        module.train()
        for step in range(start, steps):
            t0 = time.perf_counter()
            micro = rank_micro_batches(stream_indices(step, len(examples), global_batch, cfg.seed),
                                       cfg.batch_size, rank, world)
            batches = [collate([examples[i] for i in idx]) for idx in micro]
            denominator = _denominator(accelerator, batches, global_batch)
            sums, tokens = accumulate_gradients(accelerator, module, batches, step_fn, denominator, sharded)
            sums["_tokens"] = torch.tensor(float(tokens))
            sums = _reduce(accelerator, sums)
            tokens = int(sums.pop("_tokens").item())
            seen_tokens += tokens
            step_metrics = {k: (v / denominator).item() for k, v in sums.items()}
            if in_place:
                in_place.settle()
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            if sharded:
                grad_norm = float(fsdp.full_norm(torch.nn.utils.clip_grad_norm_(params, clip)))
            else:
                grad_norm = float(accelerator.clip_grad_norm_(params, clip))
            _check_finite(step, step_metrics["loss"], grad_norm)
            step_metrics["grad_norm"] = grad_norm
            step_metrics["lr"] = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            in_place.zero_grad(optimizer) if in_place else optimizer.zero_grad(set_to_none=True)
            window.add(step_metrics, tokens, time.perf_counter() - t0)

            done = step + 1
            record: dict[str, float] = {}
            if done % cfg.log_every == 0 or done == steps:
                record = last = window.flush()
                last["epoch"] = done * global_batch / len(examples)
                last["num_tokens"] = seen_tokens
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_second']:.0f}")
            if eval_examples and (done == steps or (cfg.eval_every and done % cfg.eval_every == 0)):
                record.update(evaluate(accelerator, module, eval_examples, collate, step_fn, cfg.batch_size, sharded))
            if record:
                log.log(done, derive(record) if derive else record)
            if cfg.save_every and done % cfg.save_every == 0 and done < steps:
                trainable, optim_state = checkpoint_state(module, save_target, optimizer, sharded)
                if accelerator.is_main_process:
                    save_checkpoint(ckpt_root, done, trainable, optim_state, scheduler, cfg.save_limit,
                                    num_tokens=seen_tokens, log_window=window.state())
                accelerator.wait_for_everyone()
            bar.update(1)
    finally:
        if in_place:
            in_place.restore()
    bar.close()
    log.close()
    # Done with AdamW's moments (2x the trainable weights). accelerate keeps the prepared optimizer
    # referenced, so free them here, before the final save (memory.after_training hands them back).
    getattr(optimizer, "optimizer", optimizer).state.clear()
    return LoopResult(step=steps, metrics=last, sharded=sharded)

