"""Recipe: group-relative policy gradient, GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024).

No value model: per prompt, K = ``--num-generations`` responses are sampled; each response's advantage
is its score minus the group's baseline — the group mean (GRPO, divided by the group's std unless
``--no-scale-rewards``) or the mean of the OTHER K − 1 scores (RLOO, ``--baseline loo``) — and is
given to every token of the response. The loss per token is the clipped surrogate plus β·KL to the
reference, estimated with k3 by default (DeepSeekMath Eq. 3: the KL is in the loss, not in the reward).

With ``--ppo-epochs 1`` (the default) each mini-batch is used once, right after sampling, so the old
policy is the current one: π_old = π_θ.detach(), the ratio is 1 and no extra forward is needed
(TRL's GRPOTrainer does the same for num_iterations = 1).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch

from .. import rl
from ..config import DataConfig, GRPOConfig, ModelConfig, RolloutConfig, TrainConfig
from ..data.prompts import load_prompts
from ..models import load_tokenizer, save_model
from ..ops import advantages as adv_ops
from ..rollout.generate import sample_k
from ..rollout.judges import load_judge
from .rl_common import (Experience, PolicyValue, judge_scores, reference_logp, refuse_multiprocess, require_judge, rl_loop,
                        rollout_stats, setup_policy)
from .run import finish_run, make_accelerator, prepare_output_dir


def grpo_experience(idx: list[int], *, module: PolicyValue, reference, prompts, judge, sample, tokenizer,
                    rollout: RolloutConfig, grpo: GRPOConfig, accelerator) -> Experience:
    """Sample K responses per prompt, score them, group-relative advantages, reference log-probs."""
    k = grpo.num_generations
    t0 = time.perf_counter()
    with accelerator.autocast():
        roll = sample(module.policy, [prompts[i].ids for i in idx], k)
    seconds = time.perf_counter() - t0
    texts = [prompts[i].text for i in idx for _ in range(k)]  # rows i*k .. i*k+k-1 answer prompt i
    scores = judge_scores(judge, texts, roll.texts(tokenizer), roll.ended_with_eos, rollout)
    ids, mask, p, rmask = roll.full_ids(), roll.full_mask(), roll.prompt_ids.shape[1], roll.response_mask.float()
    seq_adv = adv_ops.group_advantages(scores, k, baseline=grpo.baseline, scale="std" if grpo.scale_rewards else "none")
    advantages = seq_adv[:, None] * rmask  # (R, T): the response's advantage on each of its tokens
    module.eval()
    with torch.no_grad(), accelerator.autocast():
        if rollout.ppo_epochs > 1:  # later epochs need π_old as it was at sampling
            old_logp = module(ids, mask, p, rmask)[0].float()
        else:  # on-policy: the sampler's own log-probs (same tempered distribution) serve the KL statistics
            old_logp = roll.logprobs.float() * rmask
        ref_logp = reference_logp(module, reference, ids, mask, p, rmask) if rollout.kl_coef > 0 else old_logp
    kl = rl.kl_penalty(old_logp, ref_logp.float(), kind=rollout.kl_estimator) * rmask
    stats = rollout_stats(scores, kl.sum(1), None, rmask, roll.ended_with_eos)  # entropy: from the update pass
    return Experience(ids, mask, p, rmask, old_logp, advantages, {"ref_logp": ref_logp.float()}, stats, seconds)


def grpo_minibatch_loss(module: PolicyValue, exp: Experience, rows: torch.Tensor, *, rollout: RolloutConfig,
                        on_policy: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Per token: clipped surrogate + β·KL(π‖π_ref) (k3 by default), masked mean over the mini-batch."""
    m = exp.response_mask[rows]
    logp, _, entropy = module(exp.ids[rows], exp.mask[rows], exp.prompt_len, m, with_entropy=True)
    logp = logp.float()
    old = logp.detach() if on_policy else exp.old_logp[rows]
    pg, pstats = rl.ppo_policy_loss(logp, old, exp.advantages[rows], m, clip_eps=rollout.clip_eps)
    loss, stats = pg, {"policy/loss": float(pg.detach()), "entropy": float(rl.masked_mean(entropy, m)),
                       **{f"policy/{k}": float(v) for k, v in pstats.items()}}
    if rollout.kl_coef > 0:
        kl = rl.masked_mean(rl.kl_penalty(logp, exp.extra["ref_logp"][rows], kind=rollout.kl_estimator), m)
        loss = loss + rollout.kl_coef * kl  # DeepSeekMath Eq. 3
        stats["policy/kl_loss"] = float(kl.detach())
    return loss, stats


def run_grpo(model: ModelConfig, data: DataConfig, train_cfg: TrainConfig, rollout: RolloutConfig,
             grpo: GRPOConfig) -> Path:
    """The whole `alignkit grpo` run (GRPO or RLOO). Returns the output folder."""
    accelerator = make_accelerator(model.precision, train_cfg.seed)
    refuse_multiprocess(accelerator, "grpo")
    tokenizer = load_tokenizer(model.model, trust_remote_code=model.trust_remote_code)
    prompts, report = load_prompts(data.data, tokenizer, max_prompt_length=data.max_prompt_length,
                                   chat_template_for_plain=data.chat_template_for_plain, skip_invalid=data.skip_invalid)
    accelerator.print(f"prompts: {report.summary()}")
    judge = load_judge(require_judge(rollout), tokenizer=tokenizer, batch_size=rollout.judge_batch_size,
                       max_length=data.max_length)
    out_dir = prepare_output_dir(accelerator, train_cfg, {"model": model, "data": data, "train": train_cfg,
                                                          "rollout": rollout, "grpo": grpo})
    policy, reference = setup_policy(model)
    if rollout.kl_coef == 0 and reference is not policy:
        reference = None  # never used: no frozen copy in memory
    module = PolicyValue(policy, temperature=rollout.temperature)
    sample = partial(sample_k, max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                     top_p=rollout.top_p, top_k=rollout.top_k, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    make = partial(grpo_experience, module=module, reference=reference, prompts=prompts, judge=judge, sample=sample,
                   tokenizer=tokenizer, rollout=rollout, grpo=grpo, accelerator=accelerator)
    rl_loop(accelerator=accelerator, module=module, num_prompts=len(prompts), cfg=train_cfg, rollout_cfg=rollout,
            out_dir=out_dir, make_experience=make, kl_ctl=rl.FixedKLController(rollout.kl_coef),
            minibatch_loss=partial(grpo_minibatch_loss, rollout=rollout, on_policy=rollout.ppo_epochs == 1),
            responses_per_prompt=grpo.num_generations, desc=grpo.baseline == "loo" and "rloo" or "grpo")
    finish_run(accelerator, policy, lambda m: save_model(m, tokenizer, out_dir, merge_lora=model.merge, consume=True))
    return out_dir
