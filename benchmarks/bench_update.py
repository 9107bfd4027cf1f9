"""The policy-gradient passes over a GRPO rollout batch in each layout: padded rows, packed rows with the
packed mask, packed rows with attention over the padded rows (``ops/row_attention.py``).

``train/rl_common.PolicyValue`` runs the update (forward, backward, fused AdamW) and the no-grad reference
pass over a batch of prompts x K responses. Packing puts each prompt once in a row with its K responses, so
the linear maps see P + K·T tokens instead of K·(P + T); with the packed mask, attention then spans the
whole group row (L² pairs per group), with row attention it runs over the padded rows as the padded pass
does. This script builds a random Llama at SmolLM2-135M's sizes (bench_decode.py's), a batch of random
prompts and responses of fixed lengths, and times each layout, alternating, in fp32; the packed-mask layout
is forced (alignkit itself only packs where its cost model says it pays). Nothing is downloaded.

    .venv/bin/python benchmarks/bench_update.py                                   # 2 prompts x 4 x 64 tokens (bench_rl's GRPO)
    .venv/bin/python benchmarks/bench_update.py --prompts 1 --k 8 --prompt-length 100 --new-tokens 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

LAYOUTS = ("padded", "packed mask", "row attention")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="responses per prompt")
    ap.add_argument("--prompt-length", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each layout (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_decode import build

    from alignkit.train import rl_common
    from alignkit.train.rl_common import PolicyValue

    model = build("llama").train()  # dropout is 0: train mode changes nothing but the flag
    g = torch.Generator().manual_seed(0)
    rows, p, t = a.prompts * a.k, a.prompt_length, a.new_tokens
    prompts = torch.randint(10, model.config.vocab_size, (a.prompts, p), generator=g)
    ids = torch.cat([prompts.repeat_interleave(a.k, 0), torch.randint(10, model.config.vocab_size, (rows, t), generator=g)], 1)
    mask, response_mask = torch.ones_like(ids), torch.ones(rows, t)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    real_pays = rl_common.packing_pays

    def configure(layout: str) -> PolicyValue:
        rl_common.ROW_ATTENTION = layout == "row attention"
        rl_common.packing_pays = (lambda *args, **kw: True) if layout == "packed mask" else real_pays
        return PolicyValue(model, pack=layout != "padded")

    def update(module: PolicyValue) -> float:
        t0 = time.perf_counter()
        logp, _ = module(ids, mask, p, response_mask, with_values=False)
        (-(logp * response_mask).sum() / response_mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    @torch.no_grad()
    def reference(module: PolicyValue) -> float:
        t0 = time.perf_counter()
        module(ids, mask, p, response_mask, with_values=False)
        return time.perf_counter() - t0

    rl_common.ROW_ATTENTION = True
    auto = rl_common.pack_rollout(ids, mask, p, response_mask)
    hidden = model.config.hidden_size
    chosen = "row attention" if real_pays(auto, tuple(ids.shape), hidden, True) else "padded"
    times = {layout: {"update": [], "reference": []} for layout in LAYOUTS}
    for layout in LAYOUTS:  # warm-up
        module = configure(layout)
        update(module)
        reference(module)
    for _ in range(a.repeats):
        for layout in LAYOUTS:
            module = configure(layout)
            times[layout]["update"].append(update(module))
            times[layout]["reference"].append(reference(module))
    rl_common.packing_pays, rl_common.ROW_ATTENTION = real_pays, True

    packed_tokens = auto.input_ids.numel()
    print(f"{a.prompts} prompts x {a.k} responses, {p}-token prompts, {t}-token responses; SmolLM2-135M sizes, fp32, "
          f"{torch.get_num_threads()} threads; token positions: padded {rows * (p + t)}, packed {packed_tokens}; "
          f"alignkit picks: {chosen}. Seconds, best (all runs)\n")
    print("| layout | update s | reference pass s | update vs padded |")
    print("|---|---:|---:|---:|")
    base = min(times["padded"]["update"])
    for layout in LAYOUTS:
        u, r = times[layout]["update"], times[layout]["reference"]
        fmt = lambda v: f"{min(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})"  # noqa: E731
        print(f"| {layout} | {fmt(u)} | {fmt(r)} | {base / min(u):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
