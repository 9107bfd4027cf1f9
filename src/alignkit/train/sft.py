"""Recipe: supervised fine-tuning on demonstrations (maximise log π(completion | prompt)).

Builds padded or packed batches of tokenized demonstrations and hands them to the one loop
with a step that returns the summed NLL of the loss tokens. Each batch carries ``loss_units``
(its loss tokens), so the loop's loss is a per-token mean over the whole optimizer step, the
same for any batch x accumulation split or number of processes.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch

from ..config import DataConfig, ModelConfig, SFTConfig, TrainConfig
from ..data.collate_sft import collate_sft, collate_sft_packed
from ..data.sft import SFTExample, load_sft_data
from ..models import (
    TokenizerFiles,
    add_lora,
    load_causal_lm,
    load_tokenizer,
    save_model,
    store_frozen_linears_in,
)
from ..ops.logprobs import CompletionLogProbs, sequence_logprobs, token_logprobs
from . import fsdp
from .loop import StepOutput, train
from .run import finish_run, make_accelerator, prepare_output_dir


def collate_layout(examples: list[SFTExample], *, packed: bool, pad_token_id: int, pad_to_multiple: int = 1) -> dict:
    """One micro-batch: one padded row per example, or all of them packed into one row."""
    if packed:
        return collate_sft_packed(examples, pad_token_id, pad_to_multiple)
    return collate_sft(examples, pad_token_id, pad_to_multiple)


def sft_step(module, batch: dict) -> StepOutput:
    """Summed NLL of the micro-batch's loss tokens; the loop divides by the step's loss tokens.

    ``count`` is the number of loss tokens, so evaluation averages per token too.
    """
    logps, hits = module(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                         batch.get("position_ids"), return_is_argmax=True)  # (R, T) each, zero off loss tokens
    return StepOutput(loss_sum=-logps.sum(), count=int(batch["loss_units"]),
                      metrics={"mean_token_accuracy": hits.sum().float()},
                      tokens=int(batch["attention_mask"].sum()))


def with_perplexity(record: dict[str, float]) -> dict[str, float]:
    """Add eval/perplexity = exp(per-token eval loss) to a logged record that has an eval loss."""
    if "eval/loss" in record:
        loss = record["eval/loss"]
        record["eval/perplexity"] = math.exp(loss) if loss < 700 else float("inf")  # exp overflows past ~709
    return record


@torch.no_grad()
def packing_matches(model, examples: list[SFTExample], pad_token_id: int) -> bool:
    """Do packed rows give this model the same per-example log-likelihoods as padded rows?

    Packing relies on the model turning restarting ``position_ids`` into a block-diagonal mask;
    an architecture that ignored them would let examples attend to each other. One forward per
    layout on a few real examples tells, before any training.
    """
    sample = examples[:4]
    padded = collate_sft(sample, pad_token_id)
    packed = collate_sft_packed(sample, pad_token_id)
    lp_padded = token_logprobs(model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"])
    lp_packed = token_logprobs(model, packed["input_ids"], packed["attention_mask"], packed["completion_mask"],
                               packed["position_ids"])
    a, _, _ = sequence_logprobs(lp_padded, padded["completion_mask"])  # (S,)
    b, _, _ = sequence_logprobs(lp_packed, packed["completion_mask"], packed["seq_ids"], len(sample))  # (S,)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-3)


def run_sft(model: ModelConfig, data: DataConfig, train_cfg: TrainConfig, sft: SFTConfig) -> Path:
    """The whole `alignkit sft` run. Returns the output folder."""
    accelerator = make_accelerator(model.precision, train_cfg.seed)
    tokenizer = load_tokenizer(model.model, trust_remote_code=model.trust_remote_code)
    load = partial(load_sft_data, tokenizer=tokenizer, max_length=data.max_length,
                   max_prompt_length=data.max_prompt_length, chat_template_for_plain=data.chat_template_for_plain,
                   skip_invalid=data.skip_invalid, completion_only_loss=sft.completion_only_loss)
    examples, report = load(data.data)  # every row validated before anything is written
    accelerator.print(f"train data: {report.summary()}")
    eval_examples = None
    if data.eval_data:
        eval_examples, eval_report = load(data.eval_data)
        accelerator.print(f"eval data: {eval_report.summary()}")
    tokenizer = TokenizerFiles.of(tokenizer)  # only its files and pad id are needed from here on
    del load
    out_dir = prepare_output_dir(accelerator, train_cfg, {"model": model, "data": data, "train": train_cfg, "sft": sft})

    policy = load_causal_lm(model.model, trust_remote_code=model.trust_remote_code)
    packed = sft.packing
    if packed and not packing_matches(policy, examples, tokenizer.pad_token_id):
        accelerator.print("note: this model does not support packed rows exactly; using padded batches")
        packed = False
    if model.gradient_checkpointing:
        # non-reentrant: works when the inputs need no grad (LoRA, frozen embeddings)
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    if model.lora_r:
        policy = add_lora(policy, r=model.lora_r, alpha=model.lora_alpha, dropout=model.lora_dropout)
        # --merge needs the fp32 base weights at the end; FSDP shards a unit's weights in one dtype
        if model.precision == "bf16" and not model.merge and not fsdp.requested(train_cfg.fsdp):
            store_frozen_linears_in(policy, torch.bfloat16)
    # bf16 on CPU keeps per-shape kernel state: round row lengths to 64 tokens (see collate_pairs_packed);
    # padded rows too, since padded is the default layout here
    multiple = 64 if model.precision == "bf16" else 1
    collate = partial(collate_layout, packed=packed, pad_token_id=tokenizer.pad_token_id, pad_to_multiple=multiple)
    module = CompletionLogProbs(policy)
    result = train(accelerator=accelerator, module=module, save_target=policy, examples=examples, collate=collate,
                   step_fn=sft_step, cfg=train_cfg, out_dir=out_dir, eval_examples=eval_examples,
                   derive=with_perplexity)
    finish_run(accelerator, policy, lambda m: save_model(m, tokenizer, out_dir, merge_lora=model.merge, consume=True),
               sharded=module if result.sharded else None)
    return out_dir
