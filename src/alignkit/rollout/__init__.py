"""Rollouts for RLHF: sampling with the KV cache into a typed container."""

from .generate import Rollout, filter_logits, generate, sample_k

__all__ = ["Rollout", "filter_logits", "generate", "sample_k"]
