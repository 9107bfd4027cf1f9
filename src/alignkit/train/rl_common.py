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

import torch
from torch import nn

from ..ops.logprobs import _causal_lm, _chunk_rows, linear_token_logprobs


def _backbone_and_head(model):
    causal = _causal_lm(model)
    return getattr(causal, causal.base_model_prefix), causal.get_output_embeddings()


def _hidden(backbone, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) final hidden states; positions from the mask so left padding is exact."""
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    return backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state


class PolicyValue(nn.Module):
    """forward(ids (B, P+T), mask (B, P+T), prompt_len P, response_mask (B, T)) -> (logp, values).

    ``value_model``: a separate sequence classifier (its backbone + scalar head give V at every
    position); ``value_head``: a Linear(H, 1) on the policy's own hidden states (shared backbone);
    neither: values is None (GRPO/RLOO). The module the optimiser and DDP see.
    """

    def __init__(self, policy: nn.Module, *, temperature: float = 1.0, value_model: nn.Module | None = None,
                 value_head: nn.Module | None = None):
        super().__init__()
        self.policy, self.value_model, self.value_head = policy, value_model, value_head
        self.temperature = temperature

    def forward(self, ids, mask, prompt_len: int, response_mask, with_entropy: bool = False):
        backbone, head = _backbone_and_head(self.policy)
        hidden = _hidden(backbone, ids, mask)  # (B, L, H)
        states = hidden[:, prompt_len - 1:-1]  # (B, T, H): the state before each response token
        targets = ids[:, prompt_len:]  # (B, T)
        rows, cols = response_mask.bool().nonzero(as_tuple=True)  # (N,)
        sel = states[rows, cols] / self.temperature  # (N, H): logits/τ = (h/τ)Wᵀ (+ b/τ)
        bias = None if head.bias is None else head.bias / self.temperature
        logps = linear_token_logprobs(sel, head.weight, bias, targets[rows, cols])  # (N,)
        logp = torch.zeros(response_mask.shape, dtype=logps.dtype, device=ids.device).index_put((rows, cols), logps)
        values = None
        if self.value_head is not None:
            values = self.value_head(states).squeeze(-1).float()  # (B, T)
        elif self.value_model is not None:
            from ..reward_model import _parts

            v_backbone, v_head = _parts(self.value_model)
            values = v_head(_hidden(v_backbone, ids, mask)[:, prompt_len - 1:-1]).squeeze(-1).float()  # (B, T)
        if values is not None:
            values = values * response_mask
        if not with_entropy:
            return logp, values
        with torch.no_grad():
            ent = _entropy(sel.detach(), head.weight, bias)  # (N,)
        entropy = torch.zeros(response_mask.shape, dtype=ent.dtype, device=ids.device).index_put((rows, cols), ent)
        return logp, values, entropy


@torch.no_grad()
def _entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """H(softmax(hidden Wᵀ + b)) per row (N,), in chunks of rows so no (N, V) block is alive whole."""
    out = []
    for s in range(0, hidden.shape[0], _chunk_rows(weight.shape[0])):
        z = nn.functional.linear(hidden[s:s + _chunk_rows(weight.shape[0])].to(weight.dtype), weight, bias).float()
        logp = torch.log_softmax(z, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else hidden.new_zeros(0)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
