"""Where one decoding step of the flat Llama decoder spends its time on this host, and what the host can do.

Run:  .venv/bin/python benchmarks/probe_decode.py [--rows 8] [--model smollm2-135m-instruct]

Prints three tables (fp32, torch's default thread count):

1. the host: a 1 GiB streaming read (GB/s) and large fp32 products (GFLOP/s), the two ceilings a
   decoding step runs against;
2. the 8-row products of the model's weight shapes through each kernel at hand (oneDNN on prepacked
   weights; alignkit's skinny.c, which the decoder uses in fp32 where it builds; ``F.linear``;
   ``W @ x^T``; MKL's packed sgemm), hot in cache (one weight called repeatedly) and streamed (all
   30 layers' weights in turn, as a step reads them);
3. one ``LlamaDecoder.step``, with oneDNN's products and then with skinny.c's: its wall time, the
   time inside its products (perf_counter around each call, grouped by output width) and the step
   with every product replaced by a lookup of its output (what the rest of the step costs alone).

Machines differ: on the AVX2-only EPYC of 2026-11-25 the step was bandwidth-bound (28 GB/s reads,
35 ms of products); on the one of 2026-12-02 reads ran at 72-80 GB/s but the 8-row products no
faster (see benchmarks/README.md, bench_rl section). Run this first on a new machine to know which.
Table 2 uses random weights of the model's shapes; table 3 the model's own weights. Not a timed test.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def per_call_ms(fn, calls: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def host_table() -> None:
    data = torch.randn(256 * 1024 * 1024)  # 1 GiB fp32
    read = per_call_ms(data.sum, 5)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    square = per_call_ms(lambda: a @ b, 5)
    x, w = torch.randn(512, 576), torch.randn(1536, 576)
    update_like = per_call_ms(lambda: F.linear(x, w), 50)
    print("| host | value |\n|---|---:|")
    print(f"| streaming read, GB/s | {1.0737 / read * 1e3:.1f} |")
    print(f"| fp32 2048^3 product, GFLOP/s | {2 * 2048 ** 3 / square / 1e6:.1f} |")
    print(f"| fp32 512 x 576 x 1536 product (an update's shape), GFLOP/s | {2 * 512 * 576 * 1536 / update_like / 1e6:.1f} |")
    print(f"| threads | {torch.get_num_threads()} |\n")


def kernels_table(shapes: list[tuple[int, int]], rows: int, layers: int) -> None:
    from alignkit.rollout import native, onednn

    print(f"| weight (out, in) | kernel | hot ms/call | streamed ms/call | streamed GB/s |\n|---|---|---:|---:|---:|")
    for out_f, in_f in shapes:
        x = torch.randn(rows, in_f)
        # one copy per layer, so the streamed pass reads them out of cache; the LM head is one weight anyway
        weights = [torch.randn(out_f, in_f) for _ in range(layers if out_f * in_f < 10 ** 7 else 1)]
        packed = [onednn.prepack(w, rows) for w in weights]
        kernels = {
            "oneDNN prepacked": [lambda p=p: onednn.linear(x, p, None, torch.float32) for p in packed],
            "F.linear": [lambda w=w: F.linear(x, w) for w in weights],
            "W @ x^T": [lambda w=w: torch.mm(w, x.T) for w in weights],
        }
        if native.available(rows):
            panels = [native.pack(w) for w in weights]
            kernels["skinny.c (native)"] = [lambda p=p: native.linear(x, p, out_f) for p in panels]
        try:
            mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
            kernels["MKL packed sgemm"] = [lambda m=m, w=w: torch.ops.mkl._mkl_linear(x, m, w, None, rows)
                                           for m, w in zip(mkl, weights)]
        except (AttributeError, RuntimeError):
            pass
        for name, calls in kernels.items():
            hot = per_call_ms(calls[0], 30)
            streamed = per_call_ms(lambda: [c() for c in calls], 3) / len(calls)
            gbs = out_f * in_f * 4 / streamed / 1e6
            print(f"| ({out_f}, {in_f}) | {name} | {hot:.3f} | {streamed:.3f} | {gbs:.1f} |")
    print()


def step_table(model, rows: int) -> None:
    from alignkit.rollout.llama_decode import llama_decoder

    length = 128
    decoder = llama_decoder(model, rows, length)
    if decoder is None:
        print("the flat decoder does not take this model; no step table")
        return
    token, position = torch.zeros(rows, dtype=torch.long), torch.full((rows,), 40)
    mask = torch.ones(rows, length, dtype=torch.long)
    step = lambda: decoder.step(token, position, 60, mask)  # noqa: E731
    wall = per_call_ms(step, 20, warmup=3)
    real, inside = decoder._linear, {}

    def timed(x, packed, residual=None):
        start = time.perf_counter()
        y = real(x, packed, residual)
        inside.setdefault(y.shape[1], []).append(time.perf_counter() - start)
        return y

    decoder._linear = timed
    timed_steps = 10
    per_call_ms(step, timed_steps, warmup=0)
    outputs = {}

    def looked_up(x, packed, residual=None):
        if id(packed) not in outputs:
            outputs[id(packed)] = real(x, packed)
        return outputs[id(packed)] if residual is None else residual + outputs[id(packed)]

    decoder._linear = looked_up
    rest = per_call_ms(step, 20, warmup=3)
    decoder._linear = real
    print(f"| one decoding step, {rows} rows, products by {'skinny.c' if decoder.native else 'oneDNN'} | ms |\n|---|---:|")
    print(f"| wall | {wall:.1f} |")
    for width, times in sorted(inside.items()):
        print(f"| inside products of output width {width} ({len(times) // timed_steps} per step) | "
              f"{sum(times) / timed_steps * 1e3:.1f} |")
    print(f"| inside all products | {sum(sum(t) for t in inside.values()) / timed_steps * 1e3:.1f} |")
    print(f"| the step with its products looked up (the rest alone) | {rest:.1f} |\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8, help="decoding rows (bench_rl's GRPO step: 8)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model to probe (default: the embedded one)")
    a = ap.parse_args(argv)
    from alignkit.models import load_causal_lm

    torch.manual_seed(0)
    host_table()
    model = load_causal_lm(a.model).eval()
    cfg = model.config
    h, inter = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads  # as LlamaDecoder reads it
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim
    kernels_table([(qkv, h), (h, h), (2 * inter, h), (h, inter), (cfg.vocab_size, h)], a.rows, cfg.num_hidden_layers)
    from alignkit.rollout import llama_decode

    with torch.no_grad():
        for products in (False, True):  # oneDNN's products, then skinny.c's where it builds here
            llama_decode.NATIVE = products
            step_table(model, a.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
