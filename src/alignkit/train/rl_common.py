"""What the RL recipes (PPO, GRPO) share: the policy/value forward over a rollout, and its no-grad pass.

Coordinates: a rollout batch is ``[prompt (B, P) left-padded | response (B, T) right-padded]``.
Response token j sits at full position P + j and is predicted by the hidden state at P + j − 1
(the last prompt token for j = 0: left padding keeps it at P − 1). So per-token quantities live
in response coordinates (B, T), aligned with ``response_mask``:

* ``logp[b, j]`` = log π(a_j | s_j) under the TEMPERED policy, softmax(logits / τ) — the
  distribution the tokens were sampled from (TRL and OpenRLHF do the same);
* ``values[b, j]`` = V(s_j), the value of the state before action j.

Logits are never materialised as (B, T, V): the head runs on the response positions only, in
chunks (``ops.logprobs.linear_token_logprobs``).
"""

from __future__ import annotations

import json
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..models import add_lora, frozen_copy, load_causal_lm, reference_context, window_cuts
from ..ops import row_attention
from ..ops.logprobs import _causal_lm, linear_token_logprobs, tied_inputs
from ..ops.row_attention import RowLayout, row_layout
from .loop import (MetricsLog, _check_finite, _set_rng_state, init_adamw_state, list_checkpoints, make_scheduler,
                   save_checkpoint, stream_indices)


def _backbone_and_head(model):
    causal = _causal_lm(model)
    return getattr(causal, causal.base_model_prefix), causal.get_output_embeddings()


def _hidden(backbone, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) final hidden states; positions from the mask so left padding is exact. ``inputs``:
    ``{"input_ids": ids}`` or ``ops.logprobs.tied_inputs``' embeddings."""
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    return backbone(**inputs, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state


@dataclass
class PackedRollout:
    """A rollout batch with each distinct prompt run once: one row per prompt (a "group"), holding the
    prompt's real tokens and then the real tokens of every response to it; rows right-padded to L.

    input_ids, position_ids  (G, L)        G distinct prompts; L = the longest group
    attention_mask           (G, 1, L, L)  bool: a prompt token sees its prompt's earlier tokens; a
                                           response token sees its prompt and its own earlier tokens;
                                           a padding token sees the prompt and the padding up to
                                           itself (it is never read)
    prev                     (N,)          flat index into (G·L) of the state predicting each response
                                           token: the prompt's last token for the first, else the previous
    rows, cols               (N,)          where those N tokens sit in the (B, T) response coordinates
    row_layout               ops.row_attention.RowLayout: the same positions in the padded (B, P+T) rows,
                                           for attention computed there
    over_rows                bool          run attention over those padded rows (else over the packed rows)
    Positions continue the prompt's, so every response sees exactly the context it has alone.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    prev: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    row_layout: RowLayout
    over_rows: bool = False


def pack_rollout(ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                 response_mask: torch.Tensor, pad_token_id: int = 0) -> PackedRollout:
    """Pack ``[prompt (B, P) left-padded | response (B, T) right-padded]`` into a :class:`PackedRollout`.
    Rows whose real prompt tokens are equal share one copy of the prompt."""
    groups: dict[tuple[int, ...], list[int]] = {}  # prompt -> rows answering it, in order of first appearance
    responses = []
    for b, (row, real) in enumerate(zip(ids.tolist(), mask.bool().tolist())):
        groups.setdefault(tuple(t for t, r in zip(row[:prompt_len], real[:prompt_len]) if r), []).append(b)
        responses.append([t for t, r in zip(row[prompt_len:], real[prompt_len:]) if r])
    width = max(len(prompt) + sum(len(responses[b]) for b in members) for prompt, members in groups.items())
    tokens, pos, seg, prev, rows, cols = [], [], [], [], [], []  # seg: -1 prompt, k response k, -2 padding
    where: list[list[int]] = [[] for _ in range(ids.shape[0])]  # per row: flat packed index of its real tokens
    for g, (prompt, members) in enumerate(groups.items()):
        start = g * width
        t, q, s = list(prompt), list(range(len(prompt))), [-1] * len(prompt)
        for k, b in enumerate(members):
            first_token = start + len(t)  # this response's first token, in the flat (G·L) packed positions
            where[b] = list(range(start, start + len(prompt))) + list(range(first_token, first_token + len(responses[b])))
            for j, token in enumerate(responses[b]):
                prev.append(start + (len(prompt) - 1 if j == 0 else len(t) - 1))
                rows.append(b)
                cols.append(j)
                t.append(token)
                q.append(len(prompt) + j)
                s.append(k)
        fill = width - len(t)
        tokens.append(t + [pad_token_id] * fill)
        pos.append(q + list(range(fill)))
        seg.append(s + [-2] * fill)
    seg_t = torch.tensor(seg)  # (G, L)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (L, L) query i, key j <= i
    visible = causal & ((seg_t[:, None, :] == seg_t[:, :, None]) | (seg_t[:, None, :] == -1))  # (G, L, L)
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=ids.device)  # noqa: E731
    real = mask.bool()
    packed_index = torch.zeros(ids.shape, dtype=torch.long, device=ids.device)  # (B, P+T)
    packed_index[real] = as_long([i for row in where for i in row])  # row-major, as real's True entries
    first = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    first[[members[0] for members in groups.values()]] = True
    return PackedRollout(input_ids=as_long(tokens), position_ids=as_long(pos),
                         attention_mask=visible[:, None].to(ids.device), prev=as_long(prev),
                         rows=as_long(rows), cols=as_long(cols),
                         row_layout=row_layout(real, packed_index, len(groups) * width, first))


def pick_layout(packed: PackedRollout, padded_shape: tuple[int, int], hidden_size: int,
                rows_ok: bool = False) -> str:
    """The cheapest of ``"padded"`` (the (B, S) batch), ``"packed"`` (:func:`pack_rollout`'s rows, attention
    over them with the packed mask) and, where ``rows_ok``, ``"rows"`` (packed rows for the linear maps,
    attention over the padded rows: :mod:`alignkit.ops.row_attention`).

    Per layer, the linear maps cost ~24·H² FLOPs per token (4H² attention projections, 2 x 3·H·I for the
    MLP with I ~ 2.7H) and attention ~4·H per (query, key) pair, masked pairs included (the kernels skip
    none): in units of 4H, 6H per token and 1 per pair. Packing drops repeated prompts and padding, but a
    group's packed row is long (K responses attend over K times more pairs); attention over the padded
    rows pays for their padding (a batch of very unequal responses) and for copying each layer's queries,
    keys, values and outputs there and back, forward and backward: ~0.6·H per padded position, fitted to
    benchmarks/bench_update.py (with 8 responses of 32-256 tokens, packed and rows took the same update
    time where the model without that term put rows 14% lower). So padded 6H·B·S + B·S², packed
    6H·G·L + G·L², rows 6H·G·L + B·S² + 0.6H·B·S. Ties go to the padded batch."""
    (g, width), (b, full) = packed.input_ids.shape, padded_shape
    linear_padded, linear_packed = 6 * hidden_size * b * full, 6 * hidden_size * g * width
    costs = {"padded": linear_padded + b * full ** 2, "packed": linear_packed + g * width ** 2}
    if rows_ok:
        costs["rows"] = linear_packed + b * full ** 2 + 3 * hidden_size * b * full // 5
    return min(costs, key=costs.get)  # the first of equal costs: padded


def row_attention_pays(model) -> bool:
    """Can a packed pass's attention run over the padded rows (:mod:`alignkit.ops.row_attention`)? Where
    the model uses transformers' SDPA, and ``ROW_ATTENTION`` is on."""
    return ROW_ATTENTION and row_attention.applies(model)


# False: packed passes attend over the packed rows with their (G, 1, L, L) mask (before ops/row_attention.py)
ROW_ATTENTION = True


def _response_states(backbone, inputs: dict, mask: torch.Tensor, prompt_len: int, packed: PackedRollout | None,
                     rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N, H) the final hidden state before each response token, at (rows, cols) of the (B, T) response
    coordinates: from the padded batch (``mask``), or from ``packed``'s rows (``inputs`` built from its ids)."""
    if packed is None:
        return _hidden(backbone, inputs, mask)[:, prompt_len - 1:-1][rows, cols]
    kw = {"attention_mask": packed.attention_mask, "position_ids": packed.position_ids, "use_cache": False}
    if packed.over_rows:
        row_attention.install()
        kw["alignkit_rows"] = packed.row_layout  # handed to each layer's attention, also when recomputed
    hidden = backbone(**inputs, **kw).last_hidden_state  # (G, L, H)
    return hidden.flatten(0, 1)[packed.prev]


class PolicyValue(nn.Module):
    """forward(ids (B, P+T), mask (B, P+T), prompt_len P, response_mask (B, T)) -> (logp, values).

    ``value_model``: a separate sequence classifier (its backbone + scalar head give V at every
    position); ``value_head``: a Linear(H, 1) on the policy's own hidden states (shared backbone);
    neither: values is None (GRPO/RLOO). The module the optimiser and DDP see.

    ``pack`` (default): the backbones run on :func:`pack_rollout`'s rows (one per distinct prompt)
    instead of the padded batch, when :func:`pick_layout` says they cost less: no padding, and a
    GRPO group's prompt once; their attention runs over the packed rows with the packed mask or, where
    the models use SDPA and it is cheaper, over the padded rows (:mod:`alignkit.ops.row_attention`).
    Before the first packed pass, a few rows run each way under no_grad; a model whose results differ
    (one that ignores a 4D mask or explicit positions) keeps the padded batch (or the packed mask) from
    then on. A sliding window narrower than the batch's rows keeps the padded batch.
    """

    def __init__(self, policy: nn.Module, *, temperature: float = 1.0, value_model: nn.Module | None = None,
                 value_head: nn.Module | None = None, pack: bool = True):
        super().__init__()
        self.policy, self.value_model, self.value_head = policy, value_model, value_head
        self.temperature = temperature
        self.pack = pack

    def forward(self, ids, mask, prompt_len: int, response_mask, with_entropy: bool = False,
                with_values: bool = True):
        """(logp, values) or, ``with_entropy``, (logp, values, entropy): (B, T) each. ``with_values=False``
        skips the value role (values is None): the reference pass needs only log-probs, and a separate
        value model's backbone would cost a second forward."""
        packed = None
        roles = self._roles(with_values)
        # the packed layouts hand the model ready-made masks, without a sliding window
        if self.pack and not any(window_cuts(_causal_lm(m), ids.shape[1]) for m, _ in roles) \
                and self._packing_works(ids, mask, prompt_len, response_mask, with_values):
            packed = pack_rollout(ids, mask, prompt_len, response_mask)
            rows_ok = ROW_ATTENTION and all(_ROWS.get(m, False) for m, _ in roles)  # the switch, then the check
            hidden_size = _backbone_and_head(self.policy)[1].weight.shape[1]  # the head is (V, H)
            layout = pick_layout(packed, tuple(ids.shape), hidden_size, rows_ok)
            packed = None if layout == "padded" else packed
            if packed is not None:
                packed.over_rows = layout == "rows"
        return self._forward(ids, mask, prompt_len, response_mask, packed, with_entropy, with_values)

    def _roles(self, with_values: bool) -> list[tuple[nn.Module, int]]:
        """(model, index of its output in ``_forward``'s result) of the backbones a pass runs."""
        return [(self.policy, 0)] + ([(self.value_model, 1)] if with_values and self.value_model is not None else [])

    def _forward(self, ids, mask, prompt_len: int, response_mask, packed: PackedRollout | None,
                 with_entropy: bool, with_values: bool):
        backbone, head = _backbone_and_head(self.policy)
        # (N,) each: where the response tokens sit in (B, T)
        rows, cols = response_mask.bool().nonzero(as_tuple=True) if packed is None else (packed.rows, packed.cols)
        input_ids = ids if packed is None else packed.input_ids
        embed, slot = tied_inputs(_causal_lm(self.policy), backbone, input_ids)  # a tied table: one gradient buffer
        sel = _response_states(backbone, embed, mask, prompt_len, packed, rows, cols)  # (N, H)
        targets = ids[:, prompt_len:][rows, cols]  # (N,)
        bias = None if head.bias is None else head.bias / self.temperature
        # logits/τ = (h/τ)Wᵀ (+ b/τ); the entropy statistic comes from the softmax the log-prob op
        # computes anyway (no second head pass)
        out = linear_token_logprobs(sel / self.temperature, head.weight, bias, targets,
                                    return_entropy=with_entropy, _weight_grad_slot=slot)
        logps, ent = out if with_entropy else (out, None)  # (N,) each
        per_token = lambda v: torch.zeros(response_mask.shape, dtype=v.dtype, device=ids.device).index_put(  # noqa: E731
            (rows, cols), v)  # (N,) -> (B, T), 0 off the response
        values = None
        if with_values and self.value_head is not None:
            values = per_token(self.value_head(sel).squeeze(-1).float())  # (B, T)
        elif with_values and self.value_model is not None:
            from ..reward_model import _parts

            v_backbone, v_head = _parts(self.value_model)
            v_sel = _response_states(v_backbone, {"input_ids": input_ids}, mask, prompt_len, packed, rows, cols)
            values = per_token(v_head(v_sel).squeeze(-1).float())  # (B, T)
        logp = per_token(logps)
        return (logp, values) if not with_entropy else (logp, values, per_token(ent))

    def _packing_works(self, ids, mask, prompt_len, response_mask, with_values: bool) -> bool:
        """Do up to 3 rows (8 response tokens each) give the same log-probs (and values) packed as
        padded, with the packed mask (``_PACKS``) and, where the model allows it, with attention over the
        padded rows (``_ROWS``)? Checked once per model (DPO's layout_matches does the same for its layouts)."""
        roles = self._roles(with_values)
        if any(model not in _PACKS for model, _ in roles):
            n, t = min(3, ids.shape[0]), min(8, response_mask.shape[1])
            few = (ids[:n, :prompt_len + t], mask[:n, :prompt_len + t], prompt_len, response_mask[:n, :t])
            rows_ok = all(row_attention_pays(_causal_lm(m)) for m, _ in roles)
            was_training = self.training
            self.eval()  # no dropout: the passes must see the same network
            try:  # a check of the layout, not of bf16 rounding: at full precision
                with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
                    padded = self._forward(*few, None, False, with_values)
                    layout = pack_rollout(*few)
                    packed = self._forward(*few, layout, False, with_values)
                    if rows_ok:
                        rows = self._forward(*few, replace(layout, over_rows=True), False, with_values)
            finally:
                self.train(was_training)
            same = lambda a, b: torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-3)  # noqa: E731
            for model, i in roles:
                _PACKS[model] = same(padded[i], packed[i])
                _ROWS[model] = rows_ok and same(padded[i], rows[i])
        return all(_PACKS[model] for model, _ in roles)


# policy or value model -> whether its packed pass gives the padded results, with the packed mask (_PACKS)
# and with attention over the padded rows (_ROWS) (PolicyValue._packing_works)
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# ----------------------------------------------------------------------------- the RL loop

@dataclass
class Experience:
    """One rollout batch, ready for the policy-gradient epochs. Per-token tensors are (R, T) in response
    coordinates (see the module docstring); R = responses in the batch."""

    ids: torch.Tensor                 # (R, P+T) prompt (left-padded) + response (right-padded)
    mask: torch.Tensor                # (R, P+T)
    prompt_len: int                   # P
    response_mask: torch.Tensor       # (R, T) float, 1 on response tokens (EOS included)
    old_logp: torch.Tensor | None     # (R, T) log π_old of the sampled tokens; None: the loss pass computes
    advantages: torch.Tensor | None   # (R, T)   them from its own forward (PPO, one epoch of one mini-batch)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # recipe-specific: returns, old values, ref log-probs
    stats: dict[str, float] = field(default_factory=dict)         # logged once per step
    rollout_seconds: float = 0.0


def judge_scores(judge, prompts: list[str], responses: list[str], ended: torch.Tensor, cfg) -> torch.Tensor:
    """(R,) float: the judge's scores, plus the missing-EOS penalty, clipped if asked."""
    from ..rollout.judges import eos_penalty

    scores = judge(prompts, responses).float()
    scores = eos_penalty(scores, ended, cfg.missing_eos_penalty)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    return scores


def rollout_stats(scores: torch.Tensor, kl_seq: torch.Tensor, entropy: torch.Tensor | None, mask: torch.Tensor,
                  ended: torch.Tensor) -> dict[str, float]:
    """reward/mean, reward/std, kl (mean per-response KL to the reference), entropy (per token; left
    out when None), response_length, eos_rate."""
    n, tokens = len(scores), float(mask.sum())
    out = {"reward/mean": float(scores.mean()), "reward/std": float(scores.std(unbiased=False)) if n > 1 else 0.0,
           "kl": float(kl_seq.mean()), "response_length": tokens / n, "eos_rate": float(ended.float().mean())}
    if entropy is not None:
        out["entropy"] = float((entropy * mask).sum()) / max(tokens, 1.0)
    return out


def setup_policy(model_cfg):
    """(policy, reference): LoRA's reference is the policy with adapters disabled; else a frozen copy."""
    policy = load_causal_lm(model_cfg.model, trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_cfg.lora_r:
        policy = add_lora(policy, r=model_cfg.lora_r, alpha=model_cfg.lora_alpha, dropout=model_cfg.lora_dropout)
        return policy, policy
    return policy, frozen_copy(policy)


@torch.no_grad()
def reference_logp(module: PolicyValue, reference, ids, mask, prompt_len, response_mask) -> torch.Tensor:
    """log π_ref of the sampled tokens (R, T): adapters disabled under LoRA, else the frozen copy."""
    if reference is module.policy:
        with reference_context(module.policy):
            return module(ids, mask, prompt_len, response_mask, with_values=False)[0].float()
    return PolicyValue(reference, temperature=module.temperature)(ids, mask, prompt_len, response_mask)[0].float()


def require_judge(rollout_cfg) -> str:
    if not rollout_cfg.reward_model:
        raise InputError("required: a reward-model folder or 'module:function'", file="command line",
                         field="reward_model")
    return rollout_cfg.reward_model


def refuse_multiprocess(accelerator, command: str) -> None:
    if accelerator.num_processes > 1:
        raise InputError(f"{command} runs in one process for now (each process would need its own rollouts and "
                         "judge); launch it without torchrun", field="launcher")


def _save(root: Path, step: int, module, optimizer, scheduler, kl_ctl, limit) -> None:
    state = {k: p.detach().cpu().contiguous() for k, p in module.named_parameters() if p.requires_grad}
    path = save_checkpoint(root, step, state, optimizer.state_dict(), scheduler, limit)
    (path / "kl_controller.json").write_text(json.dumps(kl_ctl.state_dict()))


def _load(path: Path, module, optimizer, scheduler, kl_ctl) -> int:
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


def rl_loop(*, accelerator, module: PolicyValue, num_prompts: int, cfg, rollout_cfg, out_dir: Path,
            make_experience: Callable[[list[int]], Experience],
            minibatch_loss: Callable[[PolicyValue, Experience, torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
            kl_ctl, responses_per_prompt: int = 1, desc: str = "rl") -> None:
    """The on-policy loop: per step, ``make_experience(prompt indices)`` (rollout, judge, advantages),
    then ``--ppo-epochs`` passes over shuffled mini-batches of ``--mini-batch-size`` responses, one
    optimizer step each on ``minibatch_loss``; the KL controller sees the step's mean KL.
    Checkpoints (weights, optimizer, scheduler, β, RNG) every ``--save-every`` steps; ``--resume``.
    """
    from tqdm.auto import tqdm

    from ..memory import for_training

    for_training()  # RL allocates and frees activation-sized blocks all step long: reuse them (alignkit.memory)
    b = cfg.batch_size
    responses = b * responses_per_prompt
    mb = min(rollout_cfg.mini_batch_size, responses)
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * num_prompts / b))
    updates = steps * rollout_cfg.ppo_epochs * math.ceil(responses / mb)
    params = trainable_parameters(module)
    # the fused kernel, as train/loop.py: the per-tensor loop cost ~0.4 s of an embedded-model step
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    init_adamw_state(optimizer)  # below the blocks every step frees and re-allocates (train/loop.py)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler, int(cfg.warmup_ratio * updates), updates)
    ckpt_root = out_dir / "checkpoints"
    start = 0
    if cfg.resume and (found := list_checkpoints(ckpt_root)):
        start = _load(found[-1], module, optimizer, scheduler, kl_ctl)
        accelerator.print(f"resuming from {found[-1]} (step {start} of {steps})")
    log = MetricsLog(out_dir, accelerator.is_main_process, resume_step=start)
    bar = tqdm(total=steps, initial=start, disable=not (cfg.progress and accelerator.is_main_process),
               desc=desc, unit="step", dynamic_ncols=True)
    clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    for step in range(start, steps):
        exp = make_experience(stream_indices(step, num_prompts, b, cfg.seed))
        t1 = time.perf_counter()
        sums: dict[str, float] = {}
        n_updates = 0
        module.train()
        for _ in range(rollout_cfg.ppo_epochs):
            for chunk in torch.randperm(exp.ids.shape[0]).split(mb):
                with accelerator.autocast():
                    loss, stats = minibatch_loss(module, exp, chunk)
                accelerator.backward(loss)
                grad_norm = float(accelerator.clip_grad_norm_(params, clip))
                _check_finite(step, float(loss.detach()), grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                n_updates += 1
                for k, v in {"loss": float(loss.detach()), "grad_norm": grad_norm, **stats}.items():
                    sums[k] = sums.get(k, 0.0) + v
        t_update = time.perf_counter() - t1
        beta = kl_ctl.value
        kl_ctl.update(exp.stats["kl"], exp.ids.shape[0])
        tokens = float(exp.response_mask.sum())
        record = {k: v / n_updates for k, v in sums.items()}
        record.update(exp.stats, beta=beta, lr=scheduler.get_last_lr()[0],
                      rollout_tokens_per_second=tokens / max(exp.rollout_seconds, 1e-9),
                      update_tokens_per_second=tokens * rollout_cfg.ppo_epochs / max(t_update, 1e-9))
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            log.log(done, record)
            bar.set_postfix(reward=f"{record['reward/mean']:.3f}", kl=f"{record['kl']:.3f}")
        if cfg.save_every and done % cfg.save_every == 0 and done < steps:
            _save(ckpt_root, done, module, optimizer, scheduler, kl_ctl, cfg.save_limit)
        bar.update(1)
    bar.close()
    log.close()
