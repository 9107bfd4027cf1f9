"""Shared fixtures: the embedded tokenizer (loaded once per session) and tiny random models."""

from __future__ import annotations

import os

import pytest
import torch

# Never reach for a hub during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (-n 2 on 2 cores) each worker gets one intra-op thread: two workers with two
# OpenMP threads each oversubscribe the cores, and spinning OpenMP threads then slow both several-fold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the alignkit processes that tests start


@pytest.fixture(scope="session")
def tokenizer():
    from alignkit.embedded import load_embedded_tokenizer

    return load_embedded_tokenizer()


def make_tiny_llama(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                    seed: int = 0, tie: bool = False, kv_heads: int | None = None):
    """A tiny random Llama causal LM (a few layers, hidden <= 256) for fast tests; ``kv_heads`` < ``heads``: GQA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=512, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_llama(len(tokenizer))


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """A tiny random model saved with the embedded tokenizer, as a user's local folder would be."""
    model = make_tiny_llama(len(tokenizer))
    path = tmp_path / "tiny-model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def sample_prefs(tmp_path):
    """Factory: a JSONL file with the first n rows of the shipped preference data."""
    from importlib.resources import files

    def make(n: int):
        rows = (files("alignkit") / "sample_data" / "prefs.jsonl").read_text().splitlines()[:n]
        path = tmp_path / f"prefs-{n}.jsonl"
        path.write_text("\n".join(rows) + "\n")
        return path

    return make
