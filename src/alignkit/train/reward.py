"""Recipe: reward modelling from K-wise rankings (and pairs) with the Bradley-Terry loss.

One batch element is one prompt with all its K responses (InstructGPT): the K sequences go through
the model once, in one forward with the rest of the micro-batch, and the loss is the mean over the
prompt's C(K,2) comparisons (``losses.kwise_ranking_loss``). A pair-based trainer would run
2·C(K,2) sequences for the same comparisons.

Optional reward centring (Eisenstein et al. 2023, "Helping or herding?"; TRL's
``center_rewards_coefficient``): adds ``coef · mean_k r_k²`` per prompt, so scores stay near zero
without changing which response wins.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from .. import losses, rubric
from ..config import DataConfig, ModelConfig, RMConfig, TrainConfig
from ..data.ranking import EncodedRanking, load_ranking_data
from ..models import TokenizerFiles, load_tokenizer, save_model
from ..reward_model import RewardScores, load_reward_model, set_reward_pad_token
from .loop import StepOutput, train
from .run import finish_run, make_accelerator, prepare_output_dir


def collate_rankings(items: list[EncodedRanking], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B prompts with K_b responses each -> one right-padded batch of N = Σ K_b sequences.

    * ``input_ids``, ``attention_mask`` (N, T): prompt + response rows, prompt b's responses adjacent;
    * ``row_group`` (N,): the prompt of each row;
    * ``better``, ``worse``, ``group`` (M,), ``margin`` (M,) float: the comparisons, as row indices.
    """
    rows, row_group, better, worse, group, margin = [], [], [], [], [], []
    for b, item in enumerate(items):
        first = len(rows)
        rows += [item.prompt_ids + r for r in item.response_ids]
        row_group += [b] * len(item.response_ids)
        for i, j, m in item.comparisons:
            better.append(first + i)
            worse.append(first + j)
            group.append(b)
            margin.append(m)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, ids in enumerate(rows):
        input_ids[n, :len(ids)] = torch.tensor(ids)
        attention_mask[n, :len(ids)] = 1
    as_long = partial(torch.tensor, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "row_group": as_long(row_group),
            "better": as_long(better), "worse": as_long(worse), "group": as_long(group),
            "margin": torch.tensor(margin, dtype=torch.float32), "num_groups": len(items)}


def rm_step(module, batch: dict, *, center_coef: float = 0.0) -> StepOutput:
    """One micro-batch: every response scored once, then the per-prompt K-wise loss."""
    scores = module(batch["input_ids"], batch["attention_mask"])  # (N,)
    g = batch["num_groups"]
    margin = batch["margin"] if bool(batch["margin"].any()) else 0.0
    loss = losses.kwise_ranking_loss(scores, batch["better"], batch["worse"], batch["group"], g, margin=margin)  # (B,)
    k = torch.bincount(batch["row_group"], minlength=g).float()  # (B,) responses per prompt
    zeros = partial(torch.zeros, g, device=scores.device)
    mean_r = zeros().index_add(0, batch["row_group"], scores) / k  # (B,)
    mean_sq = zeros().index_add(0, batch["row_group"], scores ** 2) / k
    if center_coef:
        loss = loss + center_coef * mean_sq
    s = scores.detach()
    cw, cl, grp = s[batch["better"]], s[batch["worse"]], batch["group"]
    per_prompt = lambda v: zeros().index_add(0, grp, v) / torch.bincount(grp, minlength=g)  # noqa: E731
    metrics = {  # each a sum over prompts of a per-prompt mean over its comparisons / responses
        "accuracy": per_prompt((cw > cl).float()).sum(),
        "rewards/chosen": per_prompt(cw).sum(), "rewards/rejected": per_prompt(cl).sum(),
        "rewards/margins": per_prompt(cw - cl).sum(),
        "rewards/mean": mean_r.detach().sum(),
        "rewards/std": (mean_sq.detach() - mean_r.detach() ** 2).clamp(min=0).sqrt().sum(),
    }
    return StepOutput(loss_sum=loss.sum(), count=g, metrics=metrics, tokens=int(batch["attention_mask"].sum()))


def run_rm(model: ModelConfig, data: DataConfig, train_cfg: TrainConfig, rm: RMConfig) -> Path:
    """The whole `alignkit rm` run. Returns the output folder."""
    accelerator = make_accelerator(model.precision, train_cfg.seed)
    weights = rubric.load_weights(rm.rubric_weights)
    tokenizer = load_tokenizer(model.model, trust_remote_code=model.trust_remote_code)
    load = partial(load_ranking_data, tokenizer=tokenizer, max_length=data.max_length,
                   max_prompt_length=data.max_prompt_length, chat_template_for_plain=data.chat_template_for_plain,
                   skip_invalid=data.skip_invalid, weights=weights, margin_scale=rm.margin_scale)
    items, report = load(data.data)  # every row validated before anything is written
    accelerator.print(f"train data: {report.summary()}; "
                      f"{sum(len(it.comparisons) for it in items)} comparisons over {len(items)} prompts")
    eval_items = None
    if data.eval_data:
        eval_items, eval_report = load(data.eval_data)
        accelerator.print(f"eval data: {eval_report.summary()}")
    out_dir = prepare_output_dir(accelerator, train_cfg, {"model": model, "data": data, "train": train_cfg, "rm": rm})

    rm_model = load_reward_model(model.model, trust_remote_code=model.trust_remote_code)
    pad_id = set_reward_pad_token(rm_model, tokenizer)
    tokenizer = TokenizerFiles.of(tokenizer)  # with its new pad token; the live object is needed no more
    del load
    if model.gradient_checkpointing:
        rm_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    merge = model.merge
    if model.lora_r:
        from peft import LoraConfig, get_peft_model

        # the head is new: it trains in full (modules_to_save); the merged model is what plain
        # transformers loads as a sequence classifier, so LoRA reward models are always merged
        cfg = LoraConfig(r=model.lora_r, lora_alpha=model.lora_alpha or 2 * model.lora_r,
                         lora_dropout=model.lora_dropout, target_modules="all-linear", task_type="SEQ_CLS")
        rm_model = get_peft_model(rm_model, cfg)
        merge = True
    module = RewardScores(rm_model)
    result = train(accelerator=accelerator, module=module, save_target=rm_model, examples=items,
                   collate=partial(collate_rankings, pad_token_id=pad_id),
                   step_fn=partial(rm_step, center_coef=rm.center_rewards_coef), cfg=train_cfg, out_dir=out_dir,
                   eval_examples=eval_items)
    finish_run(accelerator, rm_model, lambda m: save_model(m, tokenizer, out_dir, merge_lora=merge, consume=True),
               sharded=module if result.sharded else None)
    return out_dir
