"""Recipe: RLHF with PPO (InstructGPT step 3), readable top to bottom: ``run_ppo``.

Generation is an MDP: the state is the prompt plus the tokens so far, an action is the next token,
the episode ends at EOS or at the horizon T (``--max-new-tokens``). Four roles:

* policy π (trained; LoRA or full);
* reference π_ref (frozen SFT policy: the adapter-disabled base under LoRA, else a frozen copy);
* value model V (trained): separate weights (a sequence classifier started from the reward model
  or the policy) or a value head on the policy's backbone (``--value-model shared``);
* judge (frozen): a reward model from ``alignkit rm`` or a Python function.

One iteration (a "step" of ``--max-steps``) of ``--batch-size`` prompts per process:

1. rollout: sample one response per prompt with the KV cache (``rollout.generate``);
2. score: the judge's score r(x, y) (+ ``--missing-eos-penalty`` at the horizon, ``--reward-clip``);
3. no-grad pass: log π_old, V_old, entropy, and log π_ref;
4. per-token reward (InstructGPT Eq. 2): −β·KL_t at every response token + r(x, y) at the last one;
5. GAE(γ, λ) advantages and returns; advantages whitened;
6. ``--ppo-epochs`` passes over shuffled mini-batches of ``--mini-batch-size`` responses:
   clipped surrogate + ``--vf-coef`` × clipped value loss (+ ``--ptx-coef`` × LM loss on
   ``--ptx-data``: PPO-ptx), one optimizer step each;
7. the adaptive KL controller (if ``--target-kl``) updates β.

Checkpoints (``--save-every`` iterations) hold the trainable weights (policy and value), the
optimizer, scheduler, β and RNG state; ``--resume`` continues exactly.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import rl
from ..config import DataConfig, ModelConfig, PPOConfig, RolloutConfig, TrainConfig
from ..data.prompts import load_prompts
from ..errors import InputError
from ..models import add_lora, frozen_copy, load_causal_lm, load_tokenizer, reference_context, save_model
from ..ops import advantages as adv_ops
from ..rollout.generate import generate
from ..rollout.judges import eos_penalty, load_judge
from .loop import MetricsLog, _check_finite, _rng_state, _set_rng_state, list_checkpoints, stream_indices
from .rl_common import PolicyValue, trainable_parameters
from .run import finish_run, make_accelerator, prepare_output_dir


# ----------------------------------------------------------------------------- pieces

def judge_scores(judge, prompts: list[str], responses: list[str], ended: torch.Tensor, cfg: RolloutConfig) -> torch.Tensor:
    """(B,) float: the judge's scores, the missing-EOS penalty, clipping."""
    scores = judge(prompts, responses).float()
    scores = eos_penalty(scores, ended, cfg.missing_eos_penalty)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    return scores


@torch.no_grad()
def old_pass(module: PolicyValue, reference, roll, accelerator) -> dict[str, torch.Tensor]:
    """log π_old, V_old, entropy under the current weights, and log π_ref (adapters off or frozen copy)."""
    ids, mask, p = roll.full_ids(), roll.full_mask(), roll.prompt_ids.shape[1]
    was_training = module.training
    module.eval()
    with accelerator.autocast():
        logp, values, entropy = module(ids, mask, p, roll.response_mask, with_entropy=True)
        if reference is module.policy:  # LoRA: the same weights with the adapters disabled
            with reference_context(module.policy):
                ref_logp, _ = module(ids, mask, p, roll.response_mask)
        else:
            ref_logp, _ = PolicyValue(reference, temperature=module.temperature)(ids, mask, p, roll.response_mask)
    module.train(was_training)
    return {"logp": logp.float(), "values": None if values is None else values.float(), "entropy": entropy.float(),
            "ref_logp": ref_logp.float()}


def ptx_batches(data: list[str] | None, tokenizer, max_length: int, batch_size: int, seed: int):
    """An endless stream of (ids, mask) batches of pretraining text for PPO-ptx ({"text"} rows, or
    prompt/completion rows whose concatenation is the text)."""
    from ..data.readers import read_records

    texts = []
    for source in data or []:
        for (file, line), row in read_records(source):
            if isinstance(row, InputError):
                raise row
            text = row.get("text") if isinstance(row, dict) else None
            if text is None and isinstance(row, dict) and isinstance(row.get("prompt"), str):
                text = row["prompt"] + str(row.get("completion") or row.get("chosen") or "")
            if not isinstance(text, str) or not text.strip():
                raise InputError("needs a non-empty 'text' (or 'prompt' + 'completion') string", file=file, line=line,
                                 field="text")
            texts.append(tokenizer(text, add_special_tokens=False)["input_ids"][:max_length] + [tokenizer.eos_token_id])
    if not texts:
        raise InputError("no pretraining text", file=", ".join(data or []), field="ptx_data")
    step = 0
    while True:
        idx = stream_indices(step, len(texts), batch_size, seed)
        rows = [texts[i] for i in idx]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for n, r in enumerate(rows):
            ids[n, :len(r)] = torch.tensor(r)
            mask[n, :len(r)] = 1
        yield ids, mask
        step += 1


def ptx_loss(policy, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the real tokens of pretraining text (PPO-ptx's γ·E[log π(x)] term)."""
    from ..ops.logprobs import token_logprobs

    logp = token_logprobs(policy, ids, mask, mask.bool())  # (B, L), 0 at position 0 and padding
    scored = mask.bool().clone()
    scored[:, 0] = False
    return -(logp * scored).sum() / scored.sum().clamp(min=1)


# ----------------------------------------------------------------------------- the run

def _build_value(model_cfg: ModelConfig, ppo: PPOConfig, rollout: RolloutConfig, policy):
    """(value_model, value_head) for the configured value role."""
    if ppo.value_model == "shared":
        hidden = policy.config.get_text_config().hidden_size
        head = nn.Linear(hidden, 1, bias=False)
        nn.init.zeros_(head.weight)  # V starts at 0: the first advantages are the rewards themselves
        return None, head
    from ..reward_model import load_reward_model

    source = ppo.value_init or (rollout.reward_model if Path(rollout.reward_model).is_dir() else model_cfg.model)
    value = load_reward_model(source, trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        value = get_peft_model(value, LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha or 2 * model_cfg.lora_r,
                                                 target_modules="all-linear", task_type="SEQ_CLS"))
    return value, None


def _trainable_state(module: PolicyValue) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().contiguous() for k, p in module.named_parameters() if p.requires_grad}


def _save_checkpoint(root: Path, step: int, module, optimizer, scheduler, kl_ctl, limit) -> None:
    from .loop import save_checkpoint

    path = save_checkpoint(root, step, _trainable_state(module), optimizer.state_dict(), scheduler, limit)
    (path / "kl_controller.json").write_text(json.dumps(kl_ctl.state_dict()))


def _load_checkpoint(path: Path, module, optimizer, scheduler, kl_ctl) -> int:
    from safetensors.torch import load_file

    params = dict(module.named_parameters())
    with torch.no_grad():
        for k, v in load_file(str(path / "trainable.safetensors")).items():
            params[k].copy_(v)
    extra = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    kl_ctl.load_state_dict(json.loads((path / "kl_controller.json").read_text()))
    return json.loads((path / "state.json").read_text())["step"]


def run_ppo(model: ModelConfig, data: DataConfig, train_cfg: TrainConfig, rollout: RolloutConfig,
            ppo: PPOConfig) -> Path:
    """The whole `alignkit ppo` run. Returns the output folder."""
    from transformers import get_scheduler
    from tqdm.auto import tqdm

    accelerator = make_accelerator(model.precision, train_cfg.seed)
    tokenizer = load_tokenizer(model.model, trust_remote_code=model.trust_remote_code)
    prompts, report = load_prompts(data.data, tokenizer, max_prompt_length=data.max_prompt_length,
                                   chat_template_for_plain=data.chat_template_for_plain, skip_invalid=data.skip_invalid)
    accelerator.print(f"prompts: {report.summary()}")
    judge = load_judge(rollout.reward_model, tokenizer=tokenizer, batch_size=rollout.judge_batch_size,
                       max_length=data.max_length)
    ptx = ptx_batches(ppo.ptx_data, tokenizer, data.max_length, rollout.mini_batch_size, train_cfg.seed) \
        if ppo.ptx_coef > 0 and ppo.ptx_data else None
    if ppo.ptx_coef > 0 and not ppo.ptx_data:
        raise InputError("--ptx-coef > 0 needs --ptx-data", field="ptx_data")
    ptx_first = next(ptx) if ptx is not None else None  # validates the ptx file before anything is written
    out_dir = prepare_output_dir(accelerator, train_cfg, {"model": model, "data": data, "train": train_cfg,
                                                          "rollout": rollout, "ppo": ppo})

    policy = load_causal_lm(model.model, trust_remote_code=model.trust_remote_code)
    if model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model.lora_r:
        policy = add_lora(policy, r=model.lora_r, alpha=model.lora_alpha, dropout=model.lora_dropout)
        reference = policy  # adapters disabled: no second copy
    else:
        reference = frozen_copy(policy)
    value_model, value_head = _build_value(model, ppo, rollout, policy)
    module = PolicyValue(policy, temperature=rollout.temperature, value_model=value_model, value_head=value_head)

    world, rank = accelerator.num_processes, accelerator.process_index
    b = train_cfg.batch_size
    mb = min(rollout.mini_batch_size, b)
    steps = train_cfg.max_steps if train_cfg.max_steps > 0 else max(1, math.ceil(train_cfg.epochs * len(prompts) / (b * world)))
    updates = steps * rollout.ppo_epochs * math.ceil(b / mb)
    params = trainable_parameters(module)
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    scheduler = get_scheduler(train_cfg.lr_scheduler if train_cfg.lr_scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(train_cfg.warmup_ratio * updates),
                              num_training_steps=updates)
    kl_ctl = rl.AdaptiveKLController(rollout.kl_coef, ppo.target_kl, ppo.kl_horizon) if ppo.target_kl \
        else rl.FixedKLController(rollout.kl_coef)
    wrapped, optimizer = accelerator.prepare(module, optimizer)

    ckpt_root = out_dir / "checkpoints"
    start = 0
    if train_cfg.resume and (found := list_checkpoints(ckpt_root)):
        start = _load_checkpoint(found[-1], module, optimizer, scheduler, kl_ctl)
        accelerator.print(f"resuming from {found[-1]} (step {start} of {steps})")
    log = MetricsLog(out_dir, accelerator.is_main_process, resume_step=start)
    bar = tqdm(total=steps, initial=start, disable=not (train_cfg.progress and accelerator.is_main_process),
               desc="ppo", unit="step", dynamic_ncols=True)
    gen = partial(generate, max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                  top_p=rollout.top_p, top_k=rollout.top_k, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    for step in range(start, steps):
        # 1-2. rollout and score (each process its share of the step's prompts)
        idx = stream_indices(step, len(prompts), b * world, train_cfg.seed)[rank * b:(rank + 1) * b]
        t0 = time.perf_counter()
        with accelerator.autocast():
            roll = gen(policy, [prompts[i].ids for i in idx])
        t_roll = time.perf_counter() - t0
        texts = roll.texts(tokenizer)
        scores = judge_scores(judge, [prompts[i].text for i in idx], texts, roll.ended_with_eos, rollout)
        # 3-5. old log-probs, values, reference, rewards, advantages
        old = old_pass(module, reference, roll, accelerator)
        mask = roll.response_mask.float()
        kl = rl.kl_penalty(old["logp"], old["ref_logp"], kind=rollout.kl_estimator) * mask  # (B, T)
        beta = kl_ctl.value
        rewards = rl.token_rewards(scores, kl, mask, beta=beta)  # (B, T)
        values = old["values"]
        advantages, returns = adv_ops.gae(rewards, values, mask, gamma=ppo.gamma, lam=ppo.lam)
        if ppo.whiten_advantages:
            advantages = adv_ops.whiten(advantages, mask)
        # 6. PPO epochs over mini-batches
        t1 = time.perf_counter()
        sums: dict[str, float] = {}
        n_updates = 0
        ids, full_mask, p = roll.full_ids(), roll.full_mask(), roll.prompt_ids.shape[1]
        for _ in range(rollout.ppo_epochs):
            for chunk in torch.randperm(len(idx)).split(mb):
                with accelerator.autocast():
                    logp, v = wrapped(ids[chunk], full_mask[chunk], p, roll.response_mask[chunk])
                    pg, pstats = rl.ppo_policy_loss(logp.float(), old["logp"][chunk], advantages[chunk], mask[chunk],
                                                    clip_eps=rollout.clip_eps)
                    vf, vclip = rl.ppo_value_loss(v.float(), values[chunk], returns[chunk], mask[chunk],
                                                  clip_value=ppo.clip_value)
                    loss = pg + ppo.vf_coef * vf
                    if ptx is not None:
                        x, xm = ptx_first if ptx_first is not None else next(ptx)
                        ptx_first = None
                        lm = ptx_loss(policy, x, xm)
                        loss = loss + ppo.ptx_coef * lm
                        sums["ptx/loss"] = sums.get("ptx/loss", 0.0) + float(lm)
                accelerator.backward(loss)
                clip = train_cfg.max_grad_norm if train_cfg.max_grad_norm > 0 else float("inf")
                grad_norm = float(accelerator.clip_grad_norm_(params, clip))
                _check_finite(step, float(loss), grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                n_updates += 1
                for k, val in {"loss": float(loss), "policy/loss": float(pg), "value/loss": float(vf),
                               "value/clipfrac": float(vclip), "grad_norm": grad_norm,
                               **{f"policy/{k2}": float(v2) for k2, v2 in pstats.items()}}.items():
                    sums[k] = sums.get(k, 0.0) + val
        t_update = time.perf_counter() - t1
        # 7. the KL controller sees this batch's mean per-response KL
        kl_seq = kl.sum(1)  # (B,)
        stats = _gather_stats(accelerator, scores, kl_seq, old["entropy"], mask, roll)
        kl_ctl.update(stats["kl"], b * world)
        record = {k: v / n_updates for k, v in sums.items()}
        n_tokens = float(mask.sum())
        record.update(stats, beta=beta, lr=scheduler.get_last_lr()[0],
                      rollout_tokens_per_second=n_tokens / max(t_roll, 1e-9),
                      update_tokens_per_second=n_tokens * rollout.ppo_epochs / max(t_update, 1e-9))
        done = step + 1
        if done % train_cfg.log_every == 0 or done == steps:
            log.log(done, record)
            bar.set_postfix(reward=f"{record['reward/mean']:.3f}", kl=f"{record['kl']:.3f}")
        if train_cfg.save_every and done % train_cfg.save_every == 0 and done < steps:
            if accelerator.is_main_process:
                _save_checkpoint(ckpt_root, done, module, optimizer, scheduler, kl_ctl, train_cfg.save_limit)
            accelerator.wait_for_everyone()
        bar.update(1)
    bar.close()
    log.close()

    def save(_):
        save_model(policy, tokenizer, out_dir, merge_lora=model.merge)
        if value_model is not None:
            save_model(value_model, tokenizer, out_dir / "value", merge_lora=True)
        elif value_head is not None:
            from safetensors.torch import save_file

            save_file({"weight": value_head.weight.detach().contiguous()}, str(out_dir / "value_head.safetensors"))

    finish_run(accelerator, policy, save)
    return out_dir


def _gather_stats(accelerator, scores, kl_seq, entropy, mask, roll) -> dict[str, float]:
    """Batch statistics over every process's responses."""
    local = torch.stack([scores.sum(), (scores ** 2).sum(), kl_seq.sum(), (entropy * mask).sum(), mask.sum(),
                         roll.ended_with_eos.float().sum(), torch.tensor(float(len(scores)))])
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="sum")
    s, s2, kl, ent, tok, eos, n = local.tolist()
    mean = s / n
    return {"reward/mean": mean, "reward/std": math.sqrt(max(s2 / n - mean ** 2, 0.0)), "kl": kl / n,
            "entropy": ent / max(tok, 1.0), "response_length": tok / n, "eos_rate": eos / n}
