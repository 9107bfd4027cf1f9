"""Recipe: direct preference optimisation (DPO and its family) on (prompt, chosen, rejected) pairs.

Builds the batches, picks the loss from ``losses.LOSSES``, provides reference log-probs
(cached on disk, or on the fly), and hands everything to the one loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .. import losses
from ..config import DataConfig, DPOConfig, ModelConfig, TrainConfig
from ..data import collate_pairs, collate_pairs_packed, collate_pairs_shared, fingerprint, load_preference_data
from ..errors import InputError
from ..models import (TokenizerFiles, add_lora, frozen_copy, load_causal_lm, load_tokenizer, reference_context,
                      save_model, store_frozen_linears_in)
from ..ops.logprobs import CompletionLogProbs, batch_sequence_logprobs
from . import fsdp
from . import reference as refs
from .loop import StepOutput, train
from .run import finish_run, make_accelerator, prepare_output_dir


@dataclass
class DPOExample:
    pair: object                     # data.EncodedPair
    ref_chosen: float | None = None  # cached log π_ref(y_w | x), summed
    ref_rejected: float | None = None


# A prefix-shared row needs an (L, L) mask; longer rows are packed instead.
MAX_SHARED_ROW = 4096


def collate_layout(pairs: list, *, layout: str, pad_token_id: int, pad_to_multiple: int = 1) -> dict:
    """Collate pairs in the chosen layout (see DPOConfig.layout)."""
    if layout == "shared" and sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                  for p in pairs) <= MAX_SHARED_ROW:
        return collate_pairs_shared(pairs, pad_token_id, pad_to_multiple)
    if layout in ("shared", "packed"):
        return collate_pairs_packed(pairs, pad_token_id, pad_to_multiple)
    return collate_pairs(pairs, pad_token_id)


def collate_dpo(items: list[DPOExample], *, layout: str = "padded", pad_token_id: int,
                pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Chosen and rejected sequences of B pairs for one forward, plus cached reference log-probs (B,)."""
    batch = collate_layout([it.pair for it in items], layout=layout, pad_token_id=pad_token_id,
                           pad_to_multiple=pad_to_multiple)
    if items and items[0].ref_chosen is not None:
        batch["ref_chosen"] = torch.tensor([it.ref_chosen for it in items], dtype=torch.float64)
        batch["ref_rejected"] = torch.tensor([it.ref_rejected for it in items], dtype=torch.float64)
    return batch


def dpo_step(module, batch: dict, *, spec: losses.LossSpec, beta: float, label_smoothing: float,
             gamma: float, lam: float, reference: Callable[[dict], tuple] | None) -> StepOutput:
    """One micro-batch: policy log-probs in one concatenated forward, then the pure loss."""
    total, _, lengths = batch_sequence_logprobs(module, batch)  # (2B,) each
    b = total.shape[0] // 2
    kwargs = dict(policy_chosen_logps=total[:b], policy_rejected_logps=total[b:],
                  beta=beta, label_smoothing=label_smoothing, gamma=gamma, lam=lam)
    if spec.needs_reference:
        if "ref_chosen" in batch:
            ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
        else:
            ref_c, ref_r = reference(module, batch)
        kwargs.update(reference_chosen_logps=ref_c.to(total.dtype), reference_rejected_logps=ref_r.to(total.dtype))
    if spec.length_normalised:
        kwargs.update(chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])
    loss, chosen_r, rejected_r = losses.preference_loss(spec.kind, **kwargs)  # (B,) each
    metrics = {
        "rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
        "rewards/margins": (chosen_r - rejected_r).sum(),
        "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
        "logps/chosen": total[:b].detach().sum(), "logps/rejected": total[b:].detach().sum(),
    }
    # tokens of the 2B sequences as a padded batch holds them (prefix sharing runs fewer)
    tokens = batch["num_tokens"] if "num_tokens" in batch else int(batch["attention_mask"].sum())
    return StepOutput(loss_sum=loss.sum(), count=b, metrics=metrics, tokens=tokens)


@torch.no_grad()
def layout_matches(model, pairs: list, layout: str, pad_token_id: int) -> bool:
    """Does ``layout`` give this model the same sequence log-probs as padded rows?

    Packing relies on the model turning restarting ``position_ids`` into a block-diagonal mask,
    prefix sharing on it taking a 4D mask and explicit positions; an architecture that ignored
    either would let sequences see each other. One forward per layout on a few real pairs tells,
    before any training. "shared" also checks "packed", its fallback for rows over MAX_SHARED_ROW.
    """
    sample = pairs[:4]
    padded, _, _ = batch_sequence_logprobs(model, collate_pairs(sample, pad_token_id))
    collates = {"shared": [collate_pairs_shared, collate_pairs_packed], "packed": [collate_pairs_packed]}[layout]
    for collate in collates:
        other, _, _ = batch_sequence_logprobs(model, collate(sample, pad_token_id))
        if not torch.allclose(padded, other, rtol=1e-4, atol=1e-3):
            return False
    return True


def _on_the_fly_reference(ref_model, is_policy: bool) -> Callable[[object, dict], tuple]:
    """Reference log-probs computed per batch, without gradients. With LoRA (``is_policy``) the
    reference is the policy with adapters disabled, run through the loop's module (under FSDP
    only that module's forward gathers the weights)."""
    @torch.no_grad()
    def reference(module, batch):
        with reference_context(ref_model):
            total, _, _ = batch_sequence_logprobs(module if is_policy else ref_model, batch)
        b = total.shape[0] // 2
        return total[:b], total[b:]
    return reference


def _cached_reference(accelerator, ref_model, pairs_by_split: dict[str, list], collate, cfg, precision: str,
                      progress: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Reference log-probs per split, from the disk cache or computed once (by the main process)."""
    weights_fp = refs.weights_fingerprint(ref_model)
    out = {}
    for split, pairs in pairs_by_split.items():
        key = refs.cache_key(weights_fp, fingerprint(pairs), precision)
        compute = partial(refs.compute_reference_logps, ref_model, pairs, collate,
                          batch_size=cfg.batch_size * 2, autocast=accelerator.autocast, progress=progress)
        if accelerator.is_main_process:
            values, hit = refs.load_or_compute(key, compute)
            accelerator.print(f"reference log-probs ({split}): {'cache hit' if hit else 'computed'} {refs.cache_path(key)}")
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            values, _ = refs.load_or_compute(key, compute)
        out[split] = values
    return out


def resolve_dpo(dpo: DPOConfig) -> DPOConfig:
    """``dpo`` with the values its loss trains with filled in (beta: the loss's default when unset;
    cDPO / robust label smoothing: the default when 0), so config.yaml records what ran."""
    try:
        spec = losses.get_loss_spec(dpo.loss)
    except ValueError as e:
        raise InputError(str(e), field="loss") from None
    return dpo.model_copy(update={"beta": dpo.beta if dpo.beta is not None else spec.default_beta,
                                  "label_smoothing": losses.effective_label_smoothing(spec.kind, dpo.label_smoothing)})


def run_dpo(model: ModelConfig, data: DataConfig, train_cfg: TrainConfig, dpo: DPOConfig) -> Path:
    """The whole `alignkit dpo` run. Returns the output folder."""
    dpo = resolve_dpo(dpo)
    spec, beta = losses.get_loss_spec(dpo.loss), dpo.beta
    accelerator = make_accelerator(model.precision, train_cfg.seed)
    tokenizer = load_tokenizer(model.model, trust_remote_code=model.trust_remote_code)
    load = partial(load_preference_data, tokenizer=tokenizer, max_length=data.max_length,
                   max_prompt_length=data.max_prompt_length,
                   chat_template_for_plain=data.chat_template_for_plain, skip_invalid=data.skip_invalid)
    pairs, report = load(data.data)  # every row validated before anything is written
    accelerator.print(f"train data: {report.summary()}")
    eval_pairs = None
    if data.eval_data:
        eval_pairs, eval_report = load(data.eval_data)
        accelerator.print(f"eval data: {eval_report.summary()}")
    tokenizer = TokenizerFiles.of(tokenizer)  # only its files and pad id are needed from here on: ~40 MB freed
    del load
    out_dir = prepare_output_dir(accelerator, train_cfg, {"model": model, "data": data, "train": train_cfg, "dpo": dpo})

    policy = load_causal_lm(model.model, trust_remote_code=model.trust_remote_code)
    layout = dpo.layout
    if layout != "padded" and not layout_matches(policy, pairs, layout, tokenizer.pad_token_id):
        accelerator.print(f"note: this model does not support the '{layout}' layout exactly; using padded batches")
        layout = "padded"
    # bf16 on CPU keeps per-shape kernel state: round packed rows to 64 tokens (see collate_pairs_packed)
    multiple = 64 if model.precision == "bf16" else 1
    collate_raw = partial(collate_layout, layout=layout, pad_token_id=tokenizer.pad_token_id, pad_to_multiple=multiple)
    splits = {"train": pairs, **({"eval": eval_pairs} if eval_pairs else {})}
    tables, reference = {}, None
    if spec.needs_reference and dpo.ref_cache:
        # Before LoRA is added the policy IS the starting policy: no second copy is needed.
        ref_model = load_causal_lm(dpo.ref_model, trust_remote_code=model.trust_remote_code) \
            if dpo.ref_model else policy
        tables = _cached_reference(accelerator, ref_model, splits, collate_raw, train_cfg,
                                   model.precision, train_cfg.progress)
        del ref_model
    if model.gradient_checkpointing:
        # non-reentrant: works when the inputs need no grad (LoRA, frozen embeddings)
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    if model.lora_r:
        policy = add_lora(policy, r=model.lora_r, alpha=model.lora_alpha, dropout=model.lora_dropout)
        # --merge needs the fp32 base weights at the end; FSDP shards a unit's weights in one dtype
        if model.precision == "bf16" and not model.merge and not fsdp.requested(train_cfg.fsdp):
            store_frozen_linears_in(policy, torch.bfloat16)
    if spec.needs_reference and not dpo.ref_cache:
        if dpo.ref_model:
            ref_model = load_causal_lm(dpo.ref_model, trust_remote_code=model.trust_remote_code)
            ref_model.requires_grad_(False).eval()
        else:  # LoRA: same weights, adapters disabled; full fine-tuning: a frozen copy
            ref_model = policy if model.lora_r else frozen_copy(policy)
        reference = _on_the_fly_reference(ref_model, is_policy=ref_model is policy)

    def wrap(split, items):
        if split not in tables:
            return [DPOExample(p) for p in items]
        t = tables[split]
        return [DPOExample(p, float(t["chosen"][i]), float(t["rejected"][i])) for i, p in enumerate(items)]

    step_fn = partial(dpo_step, spec=spec, beta=beta, label_smoothing=dpo.label_smoothing,
                      gamma=dpo.gamma, lam=dpo.lam, reference=reference)
    module = CompletionLogProbs(policy)
    result = train(accelerator=accelerator, module=module, save_target=policy,
          examples=wrap("train", pairs), collate=partial(collate_dpo, layout=layout, pad_token_id=tokenizer.pad_token_id,
                                                    pad_to_multiple=multiple),
          step_fn=step_fn, cfg=train_cfg, out_dir=out_dir,
          eval_examples=wrap("eval", eval_pairs) if eval_pairs else None)
    finish_run(accelerator, policy, lambda m: save_model(m, tokenizer, out_dir, merge_lora=model.merge, consume=True),
               sharded=module if result.sharded else None)
    return out_dir
