"""Where an alignkit DPO training step spends its time (tiny or embedded model, CPU), with torch.profiler.

Run:  .venv/bin/python benchmarks/profile_dpo.py [--config full-fp32-fly] [--model tiny|embedded] [--work-dir DIR]

Runs ``alignkit dpo`` in-process (the CLI entry point) on the tiny random Llama of bench_dpo.py and
profiles training steps 3..6 only (loading and the first two steps are skipped by the profiler
schedule, stepped from alignkit's per-step metrics log). Prints the top ops by self CPU time and
a coarse split: forward (policy + reference), backward, optimizer, and the LM-head log-prob op.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="full-fp32-fly")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed blocks < 32 MiB for reuse (as the RL loop does) instead of the 64 KiB mmap threshold")
    ap.add_argument("--shapes", action="store_true", help="also list the top ops grouped by input shapes")
    ap.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    a = ap.parse_args()
    with bench_dpo.work_dir(a.work_dir, "alignkit-prof-") as (work, finished):
        profile_run(a, work)
        finished(0)


def profile_run(a: argparse.Namespace, work: Path) -> None:
    os.environ["ALIGNKIT_CACHE"] = str(work / "prof-cache")
    model_dir = bench_dpo.prepare_tiny(work / "tiny-llama") if a.model == "tiny" else bench_dpo.prepare_embedded()
    batch = "4" if a.model == "tiny" else "2"   # bench_dpo.py's batch per model
    cfg = bench_dpo.parse_config(a.config)

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from alignkit import cli, memory
    if a.keep_freed_memory:
        memory.return_freed_memory_to_os = memory.keep_freed_memory_for_reuse
    from alignkit.train import loop

    active = 4
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=1, active=active, repeat=1), acc_events=True,
                   record_shapes=a.shapes)
    original_log = loop.MetricsLog.log

    def log_and_step(self, step, metrics):
        original_log(self, step, metrics)
        prof.step()

    loop.MetricsLog.log = log_and_step
    argv = ["dpo", "--model", str(model_dir), "--data", str(bench_dpo.DATA), "--output-dir", str(work / "prof-run"),
            "--max-steps", str(2 + active + 1), "--batch-size", batch, "--max-length", "256", "--log-every", "1",
            "--no-progress", "--overwrite"]
    argv += ["--lora-r", "16"] if cfg["lora"] else []
    argv += ["--precision", "bf16"] if cfg["bf16"] else []
    argv += [] if cfg["cached"] else ["--no-ref-cache"]
    with prof:
        rc = cli.main(argv)
    assert rc == 0, rc
    ka = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ka)
    print(f"\nalignkit {a.config}, {a.model} model, {active} profiled steps, torch threads {torch.get_num_threads()}; "
          f"total self CPU {total / 1e3 / active:.0f} ms/step\n")
    print("| op | self CPU ms/step | % |")
    print("|---|---:|---:|")
    for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:a.top]:
        print(f"| {e.key[:70]} | {e.self_cpu_time_total / 1e3 / active:.1f} | {100 * e.self_cpu_time_total / total:.1f} |")

    if a.shapes:
        print("\n| op | input shapes | calls/step | self CPU ms/step |")
        print("|---|---|---:|---:|")
        for e in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:a.top]:
            print(f"| {e.key[:40]} | {str(e.input_shapes)[:90]} | {e.count / active:.1f} | {e.self_cpu_time_total / 1e3 / active:.1f} |")

    def incl(pred):
        return sum(e.cpu_time_total for e in ka if pred(e.key)) / 1e3 / active

    print("\ncoarse split (inclusive CPU ms/step; nested entries overlap):")
    print(f"  backward (autograd engine)          {incl(lambda k: k.startswith('autograd::engine::evaluate_function')):.0f}")
    print(f"    of it, LM-head log-prob backward   {incl(lambda k: 'LinearTokenLogProbsBackward' in k and k.startswith('autograd::engine')):.0f}")
    print(f"  optimizer (AdamW.step)              {incl(lambda k: k.startswith('Optimizer.step#AdamW')):.0f}")
    print(f"  clip_grad_norm                      {incl(lambda k: 'clip_grad' in k or k == 'aten::_foreach_norm'):.0f}")
    print(f"  zero_grad                           {incl(lambda k: k.startswith('Optimizer.zero_grad')):.0f}")


if __name__ == "__main__":
    main()
