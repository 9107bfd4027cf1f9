"""Reward-model training throughput: one forward per response (alignkit) vs independent pairs.

Run:  .venv/bin/python benchmarks/bench_rm.py [--models tiny,embedded] [--ks 2,4,9] [--steps N]
                                                [--warmup N] [--repeats R] [--b-micro all|match|N] [--threads N]

For each K, the same seeded synthetic prompts (P per optimizer step, default 2; prompt 25-35
tokens, K responses of 40-60 tokens each ending with EOS, a random full ranking, so C(K,2)
comparisons per prompt, margin 0) are trained two ways, with the same model, fp32, fused AdamW
(as alignkit's loop), grad-norm clip 1.0:

  (a) alignkit's batching: one batch element = one prompt with all K responses; each response goes
      through the model once (P·K sequences per step), ``collate_rankings`` + ``rm_step``;
  (b) independent pairs, as a pair-based trainer (TRL's RewardTrainer) feeds them: every one of the
      C(K,2) comparisons is its own (chosen, rejected) example, i.e. an ``EncodedRanking`` with K = 2
      and one comparison, so P·2·C(K,2) = P·K·(K-1) sequences per step, through the SAME
      ``collate_rankings`` + ``rm_step``; only the batching differs.

Both losses are normalised like alignkit's loop (``loss_sum / examples in the step``); since every
prompt has the same C(K,2), (a)'s mean over prompts of per-prompt means equals (b)'s mean over
pairs, so both runs compute the same loss and gradient (their step-0 losses are printed as a check).

A step's wall time covers collation, forward, backward (all micro-batches), clip, AdamW step and
zero_grad; comparisons/s = P·C(K,2) x measured steps / their total time (warm-up steps excluded).
"ratio a/b, fastest steps" is the ratio of the single fastest measured step of each over all its
runs, the estimate least touched by other load; the load average is printed at start and end.
(a) and (b) run alternately (a,b then b,a, ...) ``--repeats`` times, each run from a fresh copy of
the same initial weights and a fresh optimizer; the faster run of each is kept (the machine is
shared and noisy). Before the first K, one unrecorded 2-step (a) run warms the process up.
Peak RSS per run: /proc/self/status VmHWM, reset through /proc/self/clear_refs before each run
(n/a where that is not allowed); it includes the base model kept in memory. glibc's mmap
threshold is fixed as the alignkit CLI does (``alignkit.memory``), so one run's freed blocks do
not inflate the next run's peak. (The reset also lowers what getrusage's ru_maxrss reports.)
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import random
import sys
import time
from pathlib import Path

SEED = 42
LR = 1e-5
PROMPT_LEN = (25, 35)        # inclusive ranges, in tokens
RESPONSE_LEN = (40, 60)      # EOS included
# (warm-up, measured) steps
STEPS = {"tiny": (2, 5), "embedded": (1, 2)}


# ------------------------------------------------------------------ models

def build_tiny():
    """Random LlamaForSequenceClassification, num_labels=1 (hidden 256, 3 layers, 4 heads, MLP 1024,
    the SmolLM2 tokenizer's 49 152 vocab; bench_dpo.py's tiny backbone), seed 0, and its pad id."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignkit.models import load_tokenizer
    from alignkit.reward_model import set_reward_pad_token

    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      num_labels=1)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).float()
    pad = set_reward_pad_token(model, tok)
    return model, pad, tok.eos_token_id, len(tok)


def build_embedded():
    """SmolLM2-135M-Instruct's backbone + a fresh scalar head, as ``alignkit rm`` builds it."""
    import torch

    from alignkit.models import load_tokenizer
    from alignkit.reward_model import load_reward_model, set_reward_pad_token

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    model = load_reward_model("smollm2-135m-instruct").float()
    pad = set_reward_pad_token(model, tok)
    return model, pad, tok.eos_token_id, len(tok)


# ------------------------------------------------------------------ data

def make_prompts(k: int, n: int, eos: int, vocab: int, seed: int):
    """n synthetic prompts with k ranked responses: [(prompt_ids, [response_ids] * k, comparisons)]."""
    rng = random.Random(seed * 1000 + k)
    lo = 200  # clear of the tokenizer's special tokens
    out = []
    for _ in range(n):
        prompt = [rng.randrange(lo, vocab) for _ in range(rng.randint(*PROMPT_LEN))]
        responses = [[rng.randrange(lo, vocab) for _ in range(rng.randint(*RESPONSE_LEN) - 1)] + [eos]
                     for _ in range(k)]
        place = list(range(k))
        rng.shuffle(place)  # place[i]: rank of response i, 0 = best, no ties
        comparisons = [(i, j, 0.0) for i in range(k) for j in range(k) if place[i] < place[j]]
        out.append((prompt, responses, comparisons))
    return out


def items_kwise(prompts):
    from alignkit.data.ranking import EncodedRanking

    return [EncodedRanking(p, [list(r) for r in rs], list(c)) for p, rs, c in prompts]


def items_pairs(prompts):
    """Each comparison its own K = 2 example (chosen first), prompt by prompt."""
    from alignkit.data.ranking import EncodedRanking

    return [EncodedRanking(p, [list(rs[i]), list(rs[j])], [(0, 1, m)]) for p, rs, c in prompts for i, j, m in c]


def micro_batches(items: list, max_seqs: int | None) -> list[list]:
    """Split one step's items into consecutive micro-batches of at most max_seqs sequences."""
    if not max_seqs:
        return [items]
    out, cur, n = [], [], 0
    for it in items:
        k = len(it.response_ids)
        if cur and n + k > max_seqs:
            out.append(cur)
            cur, n = [], 0
        cur.append(it)
        n += k
    return out + [cur] if cur else out


# ------------------------------------------------------------------ memory

def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# ------------------------------------------------------------------ one run

def run_variant(base_model, steps_items: list[list], max_seqs: int | None, pad: int, warmup: int,
                comparisons_per_step: int) -> dict:
    """Train a fresh copy of base_model on steps_items (one list of EncodedRanking per optimizer step)."""
    import torch

    from alignkit.reward_model import RewardScores
    from alignkit.train.reward import collate_rankings, rm_step

    gc.collect()
    can_reset = reset_peak_rss()
    module = RewardScores(copy.deepcopy(base_model))
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    times, fb_times, losses, seqs, real, padded = [], [], [], [], [], []
    for items in steps_items:
        t0 = time.perf_counter()
        batches = [collate_rankings(mb, pad) for mb in micro_batches(items, max_seqs)]
        denominator = sum(b["num_groups"] for b in batches)  # examples in the step, as the loop divides
        loss = 0.0
        for b in batches:
            out = rm_step(module, b)
            (out.loss_sum / denominator).backward()
            loss += out.loss_sum.item() / denominator
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        times.append(t2 - t0)
        fb_times.append(t1 - t0)
        losses.append(loss)
        seqs.append(sum(b["input_ids"].shape[0] for b in batches))
        real.append(sum(int(b["attention_mask"].sum()) for b in batches))
        padded.append(sum(b["input_ids"].numel() for b in batches))
    rss = peak_rss_mb() if can_reset else None
    del module, optimizer, params
    gc.collect()
    m = slice(warmup, None)
    secs = sum(times[m])
    n = len(times[m])
    return {"cmp_per_s": comparisons_per_step * n / secs, "step_s": secs / n, "fb_s": sum(fb_times[m]) / n,
            "min_step_s": min(times[m]),
            "opt_s": (secs - sum(fb_times[m])) / n, "seqs": seqs[0], "micro": len(micro_batches(steps_items[0], max_seqs)),
            "real_tokens": sum(real[m]) / n, "padded_tokens": sum(padded[m]) / n, "loss0": losses[0],
            "rss_mb": rss}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny", help="comma list of tiny,embedded (default: tiny)")
    ap.add_argument("--ks", default="2,4,9", help="responses per prompt, comma list, each 2..9 (default 2,4,9)")
    ap.add_argument("--steps", type=int, default=None, help="measured optimizer steps (default: tiny 5, embedded 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: tiny 2, embedded 1)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating (a)/(b) runs each; the fastest is kept")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per optimizer step (default 2)")
    ap.add_argument("--b-micro", default="all",
                    help="(b)'s micro-batches: 'all' = the step's pairs in one forward (default), 'match' = "
                         "micro-batches of at most (a)'s sequences per step (P·K), or a number of sequences")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    a = ap.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    from alignkit.memory import return_freed_memory_to_os

    return_freed_memory_to_os()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ks = [int(k) for k in a.ks.split(",")]
    assert all(2 <= k <= 9 for k in ks), "K must be in 2..9"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}; "
          f"{a.prompts} prompts per step, (b) micro-batches: {a.b_micro}, repeats {a.repeats}; load average "
          f"{load_average()}", flush=True)
    results = []
    for m in a.models.split(","):
        t = time.perf_counter()
        base, pad, eos, vocab = build_tiny() if m == "tiny" else build_embedded()
        n_params = sum(p.numel() for p in base.parameters())
        warmup, measured = STEPS[m]
        warmup = a.warmup if a.warmup is not None else warmup
        measured = a.steps or measured
        print(f"\n{m}: {type(base).__name__}, {n_params:,} parameters, pad id {pad}, eos id {eos}, built in "
              f"{time.perf_counter() - t:.1f} s; {warmup} warm-up + {measured} measured steps", flush=True)
        # one-off process warm-up (first-call allocator / oneDNN costs), not recorded
        run_variant(base, [items_kwise(make_prompts(ks[0], a.prompts, eos, vocab, SEED + 1))] * 2, None, pad, 1, 1)
        for k in ks:
            n_steps = warmup + measured
            prompts = make_prompts(k, n_steps * a.prompts, eos, vocab, SEED)
            chunks = [prompts[s * a.prompts:(s + 1) * a.prompts] for s in range(n_steps)]
            steps_a = [items_kwise(c) for c in chunks]
            steps_b = [items_pairs(c) for c in chunks]
            max_b = None if a.b_micro == "all" else a.prompts * k if a.b_micro == "match" else int(a.b_micro)
            cps = a.prompts * math.comb(k, 2)
            runs = {"a": [], "b": []}
            for r in range(a.repeats):
                for v in ("a", "b") if r % 2 == 0 else ("b", "a"):
                    res = run_variant(base, steps_a if v == "a" else steps_b, None if v == "a" else max_b, pad,
                                      warmup, cps)
                    runs[v].append(res)
                    print(f"  {m} K={k} ({v}) run {r + 1}: {res['cmp_per_s']:.1f} comparisons/s, step "
                          f"{res['step_s']:.3f} s (fastest {res['min_step_s']:.3f}; fwd+bwd {res['fb_s']:.3f}, clip+AdamW {res['opt_s']:.3f}), "
                          f"{res['seqs']} seqs in {res['micro']} micro-batch(es), step-0 loss {res['loss0']:.6f}, "
                          f"peak RSS {fmt(res['rss_mb'], '.0f')} MB", flush=True)
            best = {v: max(rs, key=lambda x: x["cmp_per_s"]) for v, rs in runs.items()}
            fastest = {v: min(x["min_step_s"] for x in rs) for v, rs in runs.items()}
            results.append((m, n_params, k, best, fastest))
        del base
        gc.collect()

    print(f"\nload average at the end: {load_average()}")
    print(f"\n## Reward-model comparisons/s, one forward per response (a) vs independent pairs (b)\n\n"
          f"CPU, fp32, {a.prompts} prompts per optimizer step; (b) micro-batches: {a.b_micro}; "
          f"best of {a.repeats} alternating runs each\n")
    print("| model | K | C(K,2) | seqs/prompt (a) | seqs/prompt (b) | comparisons/s (a) | comparisons/s (b) "
          "| ratio a/b | ratio a/b, fastest steps | ideal K−1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, n, k, best, fastest in results:
        ca, cb = best["a"]["cmp_per_s"], best["b"]["cmp_per_s"]
        print(f"| {m} ({n / 1e6:.1f}M) | {k} | {math.comb(k, 2)} | {k} | {2 * math.comb(k, 2)} | {ca:.1f} | {cb:.1f} "
              f"| {ca / cb:.2f} | {fastest['b'] / fastest['a']:.2f} | {k - 1} |")
    print("\nPer step (best runs): sequences, non-pad / padded tokens, step time split, step-0 loss, peak RSS\n")
    print("| model | K | run | seqs (micro-batches) | tokens non-pad / padded | step s | fastest step s | fwd+bwd s "
          "| clip+AdamW s | step-0 loss | peak RSS MB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, n, k, best, fastest in results:
        for v in ("a", "b"):
            r = best[v]
            print(f"| {m} | {k} | ({v}) | {r['seqs']} ({r['micro']}) | {r['real_tokens']:.0f} / {r['padded_tokens']:.0f} "
                  f"| {r['step_s']:.3f} | {fastest[v]:.3f} | {r['fb_s']:.3f} | {r['opt_s']:.3f} | {r['loss0']:.6f} "
                  f"| {fmt(r['rss_mb'], '.0f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
