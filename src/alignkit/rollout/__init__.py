"""Rollouts for RLHF: sampling with the KV cache into a typed container, and judges that score it."""

from .generate import Rollout, filter_logits, generate, sample_k
from .judges import FunctionJudge, Judge, RewardModelJudge, eos_penalty, load_judge

__all__ = ["FunctionJudge", "Judge", "RewardModelJudge", "Rollout", "eos_penalty", "filter_logits", "generate",
           "load_judge", "sample_k"]
