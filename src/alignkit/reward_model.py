"""Reward models: an LM backbone without its LM head, plus a scalar head on the final real token.

Built as transformers' ``AutoModelForSequenceClassification`` with ``num_labels=1`` (for Llama-like
models ``LlamaForSequenceClassification``: ``.model`` the backbone, ``.score`` a bias-free Linear(H, 1)),
so a saved reward model loads in plain transformers and scores there exactly as here.

The final real token: every scored sequence is prompt + response + EOS. transformers' sequence
classifiers pick "the rightmost token that is not ``pad_token_id``", so if the pad token were EOS
(alignkit's default for causal LMs without one, and SmolLM2's own setting) they would skip the EOS
and read the token before it. A reward model therefore gets a pad id that differs from EOS (the
tokenizer's unk/``<|endoftext|>`` token when it has one), saved in its config and tokenizer.
alignkit itself finds the last real token from the attention mask and computes positions from it,
so left and right padding give the same scores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .models import _ensure_dequantised, load_causal_lm, resolve_model_source


def _is_reward_model_folder(path: Path) -> bool:
    import json

    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_reward_model(name_or_path: str, *, trust_remote_code: bool = False):
    """A reward model from a reward-model folder (kept as is), or a new one from any causal LM string
    (folder, hub id, GGUF, the embedded model, an SFT LoRA adapter): its backbone plus a fresh head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    src = resolve_model_source(name_or_path)
    folder = _ensure_dequantised(name_or_path, src) if src.kind in ("embedded", "gguf") else Path(src.path)
    try:
        if src.kind != "hub" and (folder / "config.json").is_file():
            if _is_reward_model_folder(folder):
                model = AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
                if model.config.num_labels != 1:
                    raise InputError(f"a reward model has one output, this one has {model.config.num_labels}",
                                     file=str(name_or_path), field="model")
                return model
            return _new_head(str(folder), trust_remote_code)
        if src.kind == "hub":
            return _new_head(src.path, trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot build a reward model from {name_or_path}: {e}", file=str(name_or_path),
                         field="model") from e
    # a LoRA adapter folder: merge it into its base, then move the backbone into a classifier
    lm = load_causal_lm(name_or_path, trust_remote_code=trust_remote_code)
    cfg = AutoConfig.for_model(**{**lm.config.to_dict(), "num_labels": 1})
    model = AutoModelForSequenceClassification.from_config(cfg, trust_remote_code=trust_remote_code)
    getattr(model, model.base_model_prefix).load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
    return model


def _new_head(path: str, trust_remote_code: bool):
    """A causal LM's backbone with a fresh scalar head. transformers' load report (the LM head unused,
    the head newly initialised) is exactly what is meant here, so it is silenced."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(level)


def set_reward_pad_token(model, tokenizer) -> int:
    """Give the reward model and its tokenizer a pad id that is not EOS (see the module docstring)."""
    pad = tokenizer.pad_token_id
    if pad is None or pad == tokenizer.eos_token_id:
        for candidate in (tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None and tokenizer.convert_tokens_to_ids(candidate) != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:
            raise InputError("the tokenizer has no token other than EOS to pad with", field="tokenizer")
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.pad_token_id


def _parts(model):
    """(backbone, head) of a sequence classifier, through a peft wrapper if there is one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(inner, "score", None) or getattr(inner, "classifier", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no 'score' head")
    return getattr(inner, inner.base_model_prefix), head


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores (N,) of N sequences (N, T), read at each row's last real token, any padding side."""
    backbone, head = _parts(model)
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (N, T): left padding keeps 0.. for real tokens
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      use_cache=False).last_hidden_state  # (N, T, H)
    t = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (t * attention_mask.long()).argmax(1)  # (N,) rightmost real token
    return head(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()  # (N,)


class RewardScores(nn.Module):
    """``forward(input_ids, attention_mask) -> (N,)`` scores; the module the loop (and DDP/FSDP) wraps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return reward_scores(self.model, input_ids, attention_mask)
