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
3. no-grad pass: log π_old, V_old, entropy, and log π_ref (with ``--ppo-epochs 1`` and one mini-batch,
   π_old and V_old are the update's own forward, detached, and steps 4-5 run there: no extra pass);
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

import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import rl
from ..config import DataConfig, ModelConfig, PPOConfig, RolloutConfig, TrainConfig
from ..data.prompts import load_prompts
from ..errors import InputError
from ..models import load_tokenizer, save_model
from ..ops import advantages as adv_ops
from ..rollout.generate import generate
from ..rollout.judges import load_judge
from .loop import stream_indices
from .rl_common import (Experience, PolicyValue, judge_scores, reference_logp, refuse_multiprocess, require_judge, rl_loop,
                        rollout_stats, setup_policy)
from .run import finish_run, make_accelerator, prepare_output_dir


def ptx_batches(data: list[str] | None, tokenizer, max_length: int, batch_size: int, seed: int):
    """An endless stream of (ids, mask) batches of pretraining text for PPO-ptx ({"text"} rows, or
    prompt/completion rows whose concatenation is the text). Reads and checks every row first."""
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
            texts.append(tokenizer(text, add_special_tokens=False)["input_ids"][:max_length - 1] + [tokenizer.eos_token_id])
    if not texts:
        raise InputError("no pretraining text", file=", ".join(data or []), field="ptx_data")

    def stream():
        step = 0
        while True:
            rows = [texts[i] for i in stream_indices(step, len(texts), batch_size, seed)]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for n, r in enumerate(rows):
                ids[n, :len(r)] = torch.tensor(r)
                mask[n, :len(r)] = 1
            yield ids, mask
            step += 1
    return stream()


def ptx_loss(policy, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the real tokens of pretraining text: PPO-ptx's −E[log π(x)] (InstructGPT Eq. 2)."""
    from ..ops.logprobs import token_logprobs

    logp = token_logprobs(policy, ids, mask, mask.bool())  # (B, L), 0 at position 0 and padding
    scored = mask.bool().clone()
    scored[:, 0] = False
    return -(logp * scored).sum() / scored.sum().clamp(min=1)


def _build_value(model_cfg: ModelConfig, ppo: PPOConfig, rollout: RolloutConfig, policy):
    """(value_model, value_head) for the configured value role."""
    if ppo.value_model == "shared":
        head = nn.Linear(policy.config.get_text_config().hidden_size, 1, bias=False)
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


def reuses_update_forward(rollout: RolloutConfig, responses: int) -> bool:
    """True when each rollout batch is used for ONE optimizer step (``--ppo-epochs 1``, one mini-batch):
    then π_old and V_old are the current policy and values, so the update's own forward, detached,
    gives them (ratio 1, value clip around itself) and the no-grad pass before it is skipped."""
    return rollout.ppo_epochs == 1 and rollout.mini_batch_size >= responses


def ppo_advantages(old_logp, values, ref_logp, scores, rmask, *, beta: float, rollout: RolloutConfig, ppo: PPOConfig):
    """Steps 4-5 of the module docstring: (kl (B, T), advantages (B, T), returns (B, T)), all without gradient."""
    kl = rl.kl_penalty(old_logp, ref_logp, kind=rollout.kl_estimator) * rmask  # (B, T)
    rewards = rl.token_rewards(scores, kl, rmask, beta=beta)  # −β·KL_t + r at the last token
    advantages, returns = adv_ops.gae(rewards, values, rmask, gamma=ppo.gamma, lam=ppo.lam)
    if ppo.whiten_advantages:
        advantages = adv_ops.whiten(advantages, rmask)
    return kl, advantages, returns


def ppo_experience(idx: list[int], *, module: PolicyValue, reference, prompts, judge, gen, tokenizer, kl_ctl,
                   rollout: RolloutConfig, ppo: PPOConfig, accelerator, reuse_forward: bool | None = None) -> Experience:
    """Steps 1-5 of the module docstring for the prompts ``idx``. With ``reuse_forward`` (default:
    :func:`reuses_update_forward`) steps 3-5 but the reference pass are left to the update's forward
    (:func:`ppo_minibatch_loss`): ``old_logp`` and ``advantages`` are None until then."""
    t0 = time.perf_counter()
    with accelerator.autocast():
        roll = gen(module.policy, [prompts[i].ids for i in idx])
    seconds = time.perf_counter() - t0
    scores = judge_scores(judge, [prompts[i].text for i in idx], roll.texts(tokenizer), roll.ended_with_eos, rollout)
    ids, mask, p, rmask = roll.full_ids(), roll.full_mask(), roll.prompt_ids.shape[1], roll.response_mask.float()
    reuse = reuses_update_forward(rollout, len(idx)) if reuse_forward is None else reuse_forward
    module.eval()
    with torch.no_grad(), accelerator.autocast():
        ref_logp = reference_logp(module, reference, ids, mask, p, rmask).float()
        if reuse:
            return Experience(ids, mask, p, rmask, None, None, {"ref_logp": ref_logp, "scores": scores,
                                                                "ended": roll.ended_with_eos}, {}, seconds)
        old_logp, values, entropy = module(ids, mask, p, rmask, with_entropy=True)
    old_logp, values = old_logp.float(), values.float()
    kl, advantages, returns = ppo_advantages(old_logp, values, ref_logp, scores, rmask, beta=kl_ctl.value,
                                             rollout=rollout, ppo=ppo)
    stats = rollout_stats(scores, kl.sum(1), entropy.float(), rmask, roll.ended_with_eos)
    return Experience(ids, mask, p, rmask, old_logp, advantages, {"returns": returns, "values": values}, stats, seconds)


def ppo_minibatch_loss(module: PolicyValue, exp: Experience, rows: torch.Tensor, *, rollout: RolloutConfig,
                       ppo: PPOConfig, ptx=None, kl_ctl=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate + vf_coef × clipped value loss (+ ptx_coef × LM loss) on mini-batch ``rows``.

    An experience whose ``old_logp`` is None (``reuse_forward``; ``rows`` is then the whole batch):
    this forward, detached, is π_old and V_old; the KL penalty (β from ``kl_ctl``), GAE advantages,
    returns and the rollout statistics are computed here, as ``ppo_experience`` would have."""
    m = exp.response_mask[rows]
    if exp.old_logp is None:
        logp, values, entropy = module(exp.ids[rows], exp.mask[rows], exp.prompt_len, m, with_entropy=True)
        logp, values = logp.float(), values.float()
        old_logp, old_values = logp.detach(), values.detach()
        kl, advantages, returns = ppo_advantages(old_logp, old_values, exp.extra["ref_logp"][rows],
                                                 exp.extra["scores"][rows], m, beta=kl_ctl.value, rollout=rollout,
                                                 ppo=ppo)
        exp.stats.update(rollout_stats(exp.extra["scores"][rows], kl.sum(1), entropy.float(), m,
                                       exp.extra["ended"][rows]))
    else:
        logp, values = module(exp.ids[rows], exp.mask[rows], exp.prompt_len, m)
        logp, values = logp.float(), values.float()
        old_logp, old_values = exp.old_logp[rows], exp.extra["values"][rows]
        advantages, returns = exp.advantages[rows], exp.extra["returns"][rows]
    pg, pstats = rl.ppo_policy_loss(logp, old_logp, advantages, m, clip_eps=rollout.clip_eps)
    vf, vclip = rl.ppo_value_loss(values, old_values, returns, m, clip_value=ppo.clip_value)
    loss = pg + ppo.vf_coef * vf
    stats = {"policy/loss": float(pg.detach()), "value/loss": float(vf.detach()), "value/clipfrac": float(vclip),
             **{f"policy/{k}": float(v) for k, v in pstats.items()}}
    if ptx is not None:
        lm = ptx_loss(module.policy, *next(ptx))
        loss = loss + ppo.ptx_coef * lm
        stats["ptx/loss"] = float(lm.detach())
    return loss, stats


def run_ppo(model: ModelConfig, data: DataConfig, train_cfg: TrainConfig, rollout: RolloutConfig,
            ppo: PPOConfig) -> Path:
    """The whole `alignkit ppo` run. Returns the output folder."""
    accelerator = make_accelerator(model.precision, train_cfg.seed)
    refuse_multiprocess(accelerator, "ppo")
    tokenizer = load_tokenizer(model.model, trust_remote_code=model.trust_remote_code)
    prompts, report = load_prompts(data.data, tokenizer, max_prompt_length=data.max_prompt_length,
                                   chat_template_for_plain=data.chat_template_for_plain, skip_invalid=data.skip_invalid)
    accelerator.print(f"prompts: {report.summary()}")
    judge = load_judge(require_judge(rollout), tokenizer=tokenizer, batch_size=rollout.judge_batch_size,
                       max_length=data.max_length)
    if ppo.ptx_coef > 0 and not ppo.ptx_data:
        raise InputError("--ptx-coef > 0 needs --ptx-data", field="ptx_data")
    ptx = ptx_batches(ppo.ptx_data, tokenizer, data.max_length, rollout.mini_batch_size, train_cfg.seed) \
        if ppo.ptx_coef > 0 else None  # every ptx row is checked here, before anything is written
    out_dir = prepare_output_dir(accelerator, train_cfg, {"model": model, "data": data, "train": train_cfg,
                                                          "rollout": rollout, "ppo": ppo})
    policy, reference = setup_policy(model)
    value_model, value_head = _build_value(model, ppo, rollout, policy)
    module = PolicyValue(policy, temperature=rollout.temperature, value_model=value_model, value_head=value_head)
    kl_ctl = rl.AdaptiveKLController(rollout.kl_coef, ppo.target_kl, ppo.kl_horizon) if ppo.target_kl \
        else rl.FixedKLController(rollout.kl_coef)
    gen = partial(generate, max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                  top_p=rollout.top_p, top_k=rollout.top_k, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    make = partial(ppo_experience, module=module, reference=reference, prompts=prompts, judge=judge, gen=gen,
                   tokenizer=tokenizer, kl_ctl=kl_ctl, rollout=rollout, ppo=ppo, accelerator=accelerator)
    rl_loop(accelerator=accelerator, module=module, num_prompts=len(prompts), cfg=train_cfg, rollout_cfg=rollout,
            out_dir=out_dir, make_experience=make, kl_ctl=kl_ctl, desc="ppo",
            minibatch_loss=partial(ppo_minibatch_loss, rollout=rollout, ppo=ppo, ptx=ptx, kl_ctl=kl_ctl))

    def save(_):
        save_model(policy, tokenizer, out_dir, merge_lora=model.merge, consume=True)
        if value_model is not None:  # the trained value model, loadable like a reward model
            save_model(value_model, tokenizer, out_dir / "value", merge_lora=True, consume=True)
        else:
            from safetensors.torch import save_file

            save_file({"weight": value_head.weight.detach().contiguous()}, str(out_dir / "value_head.safetensors"))

    finish_run(accelerator, policy, save)
    return out_dir
