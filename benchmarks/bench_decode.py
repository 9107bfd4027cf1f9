"""Sampling speed of each Llama-family architecture: alignkit's flat decoding step against transformers' forward.

``alignkit.rollout.generate`` decodes Llama, Mistral, Qwen2 and Qwen3 models through the flat step of
``rollout/llama_decode.py`` (fused, prepacked products, its own key/value buffers) and every other model
through transformers' forward. This script builds one random model per architecture at SmolLM2-135M's
sizes (hidden 576, 30 layers, 9 query / 3 key-value heads, MLP 1536, 49 152 vocabulary; Qwen2 with its
q/k/v biases, Qwen3 with its q/k norms), then times ``sample_k`` (GRPO's layout: prompts x k samples,
a fixed number of new tokens) with the step on and off, alternating, and prints the table.
Random weights cost what trained ones do; nothing is downloaded.

    .venv/bin/python benchmarks/bench_decode.py                        # 4 architectures, 2 x 4 x 64 tokens, 3 repeats
    .venv/bin/python benchmarks/bench_decode.py --archs qwen2 --repeats 5 --new-tokens 128
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

ARCHS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
# SmolLM2-135M's sizes
SIZES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)


def build(arch: str):
    import transformers

    name = ARCHS[arch]
    extra = {"head_dim": 64} if arch == "qwen3" else {}
    cfg = getattr(transformers, f"{name}Config")(**SIZES, **extra)
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()


def time_once(model, prompts, k: int, new_tokens: int, fast: bool) -> float:
    from alignkit.rollout import llama_decode
    from alignkit.rollout.generate import sample_k

    llama_decode.ENABLED = fast
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    # an EOS id no token has: every row runs to new_tokens, the same work on both paths
    out = sample_k(model, prompts, k, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0, generator=g)
    secs = time.perf_counter() - t0
    assert out.response_ids.shape[1] == new_tokens
    return secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma list of " + ",".join(ARCHS))
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-length", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, SIZES["vocab_size"], (a.prompt_length,), generator=gen).tolist()
               for _ in range(a.prompts)]
    print(f"sample_k: {a.prompts} prompts x {a.k} samples, {a.prompt_length}-token prompts, {a.new_tokens} new tokens, "
          f"fp32, {torch.get_num_threads()} threads; seconds per generation, best (all runs)\n")
    print("| architecture | flat step s | transformers' forward s | speed-up (best) |")
    print("|---|---:|---:|---:|")
    for arch in a.archs.split(","):
        model = build(arch)
        runs = {True: [], False: []}
        for fast in (True, False):  # warm-up
            time_once(model, prompts, a.k, a.new_tokens, fast)
        for _ in range(a.repeats):
            for fast in (True, False):
                runs[fast].append(time_once(model, prompts, a.k, a.new_tokens, fast))
        f, s = min(runs[True]), min(runs[False])
        print(f"| {arch} | {f:.2f} ({', '.join(f'{x:.2f}' for x in runs[True])}) | "
              f"{s:.2f} ({', '.join(f'{x:.2f}' for x in runs[False])}) | {s / f:.2f}x |", flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
