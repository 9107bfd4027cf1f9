"""The policy-gradient passes over a GRPO rollout batch in each layout: padded rows, packed rows with the
packed mask, packed rows with attention over the padded rows (``ops/row_attention.py``).

``train/rl_common.PolicyValue`` runs the update (forward, backward, fused AdamW) and the no-grad reference
pass over a batch of prompts x K responses. Packing puts each prompt once in a row with its K responses, so
the linear maps see P + K·T tokens instead of K·(P + T); with the packed mask, attention then spans the
whole group row (L² pairs per group), with row attention it runs over the padded rows as the padded pass
does. This script builds a random Llama at SmolLM2-135M's sizes (bench_decode.py's), a batch of random
prompts and responses of fixed lengths, and times each layout, alternating, in fp32. Each layout is forced
(alignkit itself picks the cheapest by its cost model, ``rl_common.pick_layout``: printed). Nothing is downloaded.

    .venv/bin/python benchmarks/bench_update.py                                   # 2 prompts x 4 x 64 tokens (bench_rl's GRPO)
    .venv/bin/python benchmarks/bench_update.py --prompts 1 --k 8 --prompt-length 100 --new-tokens 256
    .venv/bin/python benchmarks/bench_update.py --prompts 1 --k 8 --new-tokens 256 --spread     # unequal lengths
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
    ap.add_argument("--spread", action="store_true",
                    help="responses of unequal lengths, evenly spread from new-tokens/8 to new-tokens (as sampled "
                         "responses end at EOS), instead of all new-tokens long")
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
    if a.spread:  # row r: max(1, t/8 + r·(t - t/8)/(rows - 1)) tokens, then right padding
        lengths = torch.linspace(t / 8, t, rows).round().long().clamp(min=1)
        response_mask = (torch.arange(t)[None] < lengths[:, None]).float()  # (B, T)
        mask[:, p:] = response_mask.long()
        ids = ids.masked_fill(mask == 0, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    real_pick = rl_common.pick_layout
    forced = {"padded": "padded", "packed mask": "packed", "row attention": "rows"}

    def configure(layout: str) -> PolicyValue:
        rl_common.pick_layout = lambda *args, **kw: forced[layout]  # noqa: E731
        return PolicyValue(model)

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

    auto = rl_common.pack_rollout(ids, mask, p, response_mask)
    chosen = {v: k for k, v in forced.items()}[real_pick(auto, tuple(ids.shape), model.config.hidden_size, True)]
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
    rl_common.pick_layout = real_pick

    packed_tokens = auto.input_ids.numel()  # G·L, the fill included
    lengths = f"{int(response_mask.sum(1).min())}-{t}-token responses" if a.spread else f"{t}-token responses"
    print(f"{a.prompts} prompts x {a.k} responses, {p}-token prompts, {lengths}; SmolLM2-135M sizes, fp32, "
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
