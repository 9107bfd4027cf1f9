"""RL benchmark: alignkit GRPO and PPO step time, rollout tokens/s and peak memory vs TRL's GRPOTrainer.

Run:  .venv/bin/python benchmarks/bench_rl.py [--models tiny,embedded] [--steps N] [--warmup N]
                                                [--configs grpo,trl-grpo,ppo-sep,...] [--skip-trl] [--repeats R]
      .venv/bin/python benchmarks/bench_rl.py --profile [--profile-config grpo]   # torch.profiler of alignkit

Settings, the same for every run: 8 rollouts per step (GRPO: 2 prompts x 4 generations; PPO: 8
prompts x 1 response), at most 64 new tokens, temperature 1.0, top-p 1, top-k 0, lr 1e-6, KL to a
reference with beta 0.04 (k3 estimator), one optimisation pass per rollout batch (one mini-batch of
8), fp32, no gradient checkpointing, the prompts of ``sample_data/prefs.jsonl`` as plain strings,
and the same programmatic reward, :func:`reward` below (fraction of lowercase ASCII letters).
``--lengths fixed`` (the default) makes every response exactly 64 tokens in both libraries (TRL:
``generation_kwargs={"min_new_tokens": 64}``; alignkit: the harness hands the sampler an EOS id that
no token has, so a sampled EOS does not end the row), so both do the same decode and update work;
``--lengths natural`` lets rows end at EOS (then lengths differ by library and by step, and a batch
decodes until its longest row ends, which dominates the embedded model's step times).

Every (library, model, config) runs in its own fresh subprocess; its peak RSS is that child's
``ru_maxrss`` from ``os.wait4``. alignkit runs its CLI entry point (``alignkit.cli.main`` with the
``alignkit grpo|ppo`` arguments) inside that child, after wrapping two names in the recipe modules
with timers -- nothing in alignkit is changed: ``rl_loop``'s ``make_experience`` callback (a step
starts when it is called; the step ends when the next one is called, or when ``rl_loop`` returns)
and ``reference_logp``. So a step's time is the whole loop iteration (rollout, judge, reference and
old-log-prob passes, advantages, the update, logging), and it splits into generation (alignkit's own
``Experience.rollout_seconds``, the same figure behind ``rollout_tokens_per_second`` in
metrics.jsonl), the reference pass, the rest of the experience (judge, PPO's no-grad policy/value
pass, advantages) and the update (the rest of the iteration: forward, backward, clip, AdamW).
TRL runs ``GRPOTrainer`` in a child with a callback timing consecutive ``on_step_end``s (generation
happens inside TRL's training step), ``model.generate`` wrapped with a timer and forward hooks
timing the reference model; completion tokens per step = 8 x the step's logged
``completions/mean_length`` (both libraries count the EOS as a completion token).
tokens/s = completion tokens of the measured steps / their wall time; warm-up steps excluded.

TRL 1.16's GRPOConfig defaults to beta=0 (no reference), gradient_checkpointing=True and bf16=True:
all three are set here (beta 0.04, checkpointing off, bf16 off).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "alignkit" / "sample_data" / "prefs.jsonl"
ROLLOUTS = 8          # per step, both libraries
GENERATIONS = 4       # GRPO group size (2 prompts x 4)
MAX_NEW_TOKENS = 64
TEMPERATURE = 1.0
LR = 1e-6
BETA = 0.04
LORA_R = 16
SEED = 42

# name: (library, recipe, lora, value model)
CONFIGS = {
    "trl-grpo": ("trl", "grpo", False, None),
    "grpo": ("alignkit", "grpo", False, None),
    "ppo-sep": ("alignkit", "ppo", False, "separate"),
    "ppo-shared": ("alignkit", "ppo", False, "shared"),
    "trl-grpo-lora": ("trl", "grpo", True, None),
    "grpo-lora": ("alignkit", "grpo", True, None),
    "ppo-lora-sep": ("alignkit", "ppo", True, "separate"),
    "ppo-lora-shared": ("alignkit", "ppo", True, "shared"),
}
DESCRIBE = {
    "trl-grpo": "TRL GRPOTrainer, full",
    "grpo": "alignkit grpo, full",
    "ppo-sep": "alignkit ppo, full, separate value model",
    "ppo-shared": "alignkit ppo, full, shared value head",
    "trl-grpo-lora": "TRL GRPOTrainer, LoRA r=16",
    "grpo-lora": "alignkit grpo, LoRA r=16",
    "ppo-lora-sep": "alignkit ppo, LoRA r=16, separate value model (own LoRA)",
    "ppo-lora-shared": "alignkit ppo, LoRA r=16, shared value head",
}
# (warm-up, measured) steps per model
STEPS = {"tiny": (2, 5), "embedded": (1, 2)}


def reward(prompt, response) -> float:
    """The judge of both libraries: the fraction of the response's characters that are lowercase ASCII
    letters (alignkit calls it as ``benchmarks/bench_rl.py:reward``; TRL through :func:`trl_reward`)."""
    return sum("a" <= c <= "z" for c in response) / max(len(response), 1)


def trl_reward(completions, **kwargs) -> list[float]:
    return [reward(None, c) for c in completions]


# ------------------------------------------------------------------ models (as bench_dpo.py builds them)

def prepare_model(name: str, work: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_dpo

    return bench_dpo.prepare_tiny(work / "tiny-llama") if name == "tiny" else bench_dpo.prepare_embedded()


# ------------------------------------------------------------------ subprocess runner

def _cpu_stat() -> list[int]:
    """The machine's cumulative CPU time counters (user nice system idle iowait irq softirq steal ...)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return []


def run_child(cmd: list[str], env: dict, log_file: Path) -> tuple[int, float, str, dict]:
    """(exit code, peak RSS in MB of that child alone, output, what else the child used and the machine did)."""
    stat0, t0 = _cpu_stat(), time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        out.seek(0)
        text = out.read()
    wall, stat1 = time.perf_counter() - t0, _cpu_stat()
    log_file.write_text(text)
    diff = [b - a for a, b in zip(stat0, stat1)]
    usage_d = {"cpu_s": usage.ru_utime + usage.ru_stime, "cpu_per_wall": (usage.ru_utime + usage.ru_stime) / wall,
               "major_faults": usage.ru_majflt, "minor_faults": usage.ru_minflt,
               "involuntary_switches": usage.ru_nivcsw}
    if len(diff) >= 8 and sum(diff):  # share of the machine's CPU time that was stolen / waiting on IO
        usage_d.update(steal=diff[7] / sum(diff), iowait=diff[4] / sum(diff))
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024.0, text, usage_d  # Linux: ru_maxrss in KiB


def run_config(name: str, model_dir: Path, warmup: int, measured: int, work: Path, threads: int | None,
               fixed: bool, glibc_malloc: bool = False, rl_mmap_threshold: int | None = None,
               precision: str = "fp32", rl_allow_mmap: bool = False, no_row_attention: bool = False) -> dict:
    lib = CONFIGS[name][0]
    tag = f"{model_dir.parent.name if model_dir.name == 'hf' else model_dir.name}-{name}"
    spec = {"name": name, "model": str(model_dir), "warmup": warmup, "measured": measured, "fixed": fixed,
            "glibc_malloc": glibc_malloc, "rl_mmap_threshold": rl_mmap_threshold, "precision": precision,
            "rl_allow_mmap": rl_allow_mmap, "no_row_attention": no_row_attention, "out": str(work / f"run-{tag}")}
    result = work / f"{tag}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(spec["out"], ignore_errors=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    rc, rss, text, usage = run_child([sys.executable, __file__, f"--_{lib}-child", json.dumps(spec), str(result)],
                                     env, work / f"{tag}.log")
    wall = time.perf_counter() - t0
    if rc != 0 or not result.exists():
        tail = text.strip().splitlines()[-1] if text.strip() else ""
        return {"error": f"{lib} exit {rc}: {tail}", "rss_mb": rss}
    res = json.loads(result.read_text())
    res.update(rss_mb=rss, wall_s=wall, load=(load0, os.getloadavg()[0]), **usage)
    return res


def summarise(steps: list[dict], warmup: int) -> dict:
    """Aggregate the measured steps: each step dict has step_s, tokens, gen_s, ref_s (None: not timed), update_s."""
    meas = steps[warmup:]
    n, secs, tok = len(meas), sum(s["step_s"] for s in meas), sum(s["tokens"] for s in meas)
    out = {"steps_measured": n, "step_s": secs / n, "tokens_per_step": tok / n, "tokens_per_s": tok / secs,
           "gen_s": sum(s["gen_s"] for s in meas) / n, "gen_tokens_per_s": tok / sum(s["gen_s"] for s in meas),
           "update_s": sum(s["update_s"] for s in meas) / n,
           "ref_s": None if any(s["ref_s"] is None for s in meas) else sum(s["ref_s"] for s in meas) / n,
           "all_step_s": [round(s["step_s"], 3) for s in steps]}
    return out


# ------------------------------------------------------------------ alignkit child

def alignkit_argv(name: str, model: str, out: str, steps: int, precision: str = "fp32") -> list[str]:
    _, recipe, lora, value = CONFIGS[name]
    argv = [recipe, "--model", model, "--data", str(DATA), "--output-dir", out,
            "--reward-model", f"{Path(__file__).resolve()}:reward",
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--temperature", str(TEMPERATURE), "--top-p", "1.0", "--top-k", "0",
            "--lr", str(LR), "--kl-coef", str(BETA), "--kl-estimator", "k3", "--ppo-epochs", "1",
            "--mini-batch-size", str(ROLLOUTS), "--max-steps", str(steps), "--seed", str(SEED),
            "--precision", precision, "--no-gradient-checkpointing", "--log-every", "1", "--no-progress", "--overwrite"]
    if recipe == "grpo":
        argv += ["--batch-size", str(ROLLOUTS // GENERATIONS), "--num-generations", str(GENERATIONS)]
    else:
        argv += ["--batch-size", str(ROLLOUTS), "--value-model", value]
    if lora:
        argv += ["--lora-r", str(LORA_R)]
    return argv


def instrument_alignkit(on_step_start=None, fixed: bool = False):
    """Wrap rl_loop's make_experience and reference_logp in the recipe modules with timers (and, for the
    profiler, record_function labels). Returns the dict the timings land in. ``fixed``: every response
    runs to max_new_tokens (the sampler is given an EOS id no token has, so a sampled EOS does not end
    the row; TRL's counterpart is min_new_tokens) -- the same decode work in both libraries."""
    import torch

    from alignkit.train import grpo, ppo, rl_common

    rec = {"starts": [], "exp_s": [], "gen_s": [], "ref_s": [], "tokens": [], "end": None}
    label = torch.profiler.record_function
    orig_loop, orig_ref, orig_sample_k, orig_generate = rl_common.rl_loop, rl_common.reference_logp, grpo.sample_k, ppo.generate

    def timed_ref(*a, **k):
        t0 = time.perf_counter()
        with label("bench::reference"):
            out = orig_ref(*a, **k)
        rec["ref_s"][-1] += time.perf_counter() - t0
        return out

    def timed_loop(**kw):
        make = kw["make_experience"]

        def timed_make(idx):
            if on_step_start:
                on_step_start()
            t0 = time.perf_counter()
            rec["starts"].append(t0)
            rec["ref_s"].append(0.0)
            with label("bench::experience"):
                exp = make(idx)
            rec["exp_s"].append(time.perf_counter() - t0)
            rec["gen_s"].append(exp.rollout_seconds)
            rec["tokens"].append(float(exp.response_mask.sum()))
            return exp

        kw["make_experience"] = timed_make
        orig_loop(**kw)
        rec["end"] = time.perf_counter()

    def labelled(fn, what):
        def inner(*a, **k):
            if fixed:
                k["pad_token_id"] = k.get("pad_token_id", k["eos_token_id"])
                k["eos_token_id"] = -1
            with label(what):
                return fn(*a, **k)
        return inner

    for mod in (grpo, ppo):
        mod.rl_loop, mod.reference_logp = timed_loop, timed_ref
    grpo.sample_k = labelled(orig_sample_k, "bench::generate")
    ppo.generate = labelled(orig_generate, "bench::generate")
    return rec


def alignkit_child(spec: dict, result_path: str) -> None:
    from alignkit import cli, memory

    if spec.get("glibc_malloc"):  # diagnostic: leave glibc's own (dynamic) mmap threshold in place
        memory.return_freed_memory_to_os = lambda: False
        memory.RL_MMAP_THRESHOLD = 0
    if spec.get("rl_mmap_threshold") is not None:  # diagnostic: the threshold rl_loop sets (0: keep 64 KiB)
        memory.RL_MMAP_THRESHOLD = spec["rl_mmap_threshold"]
    if spec.get("rl_allow_mmap"):  # diagnostic: blocks above the threshold mmapped again, as before
        memory.HEAP_ONLY = False
    if spec.get("no_row_attention"):  # diagnostic: packed passes attend over the packed rows, as before
        from alignkit.train import rl_common
        rl_common.ROW_ATTENTION = False

    steps = spec["warmup"] + spec["measured"]
    rec = instrument_alignkit(fixed=spec["fixed"])
    rc = cli.main(alignkit_argv(spec["name"], spec["model"], spec["out"], steps, spec.get("precision", "fp32")))
    if rc != 0:
        sys.exit(rc)
    ends = rec["starts"][1:] + [rec["end"]]
    per_step = [{"step_s": e - s, "tokens": tok, "gen_s": g, "ref_s": r, "update_s": e - s - x}
                for s, e, tok, g, r, x in zip(rec["starts"], ends, rec["tokens"], rec["gen_s"], rec["ref_s"], rec["exp_s"])]
    rows = [json.loads(ln) for ln in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    res = summarise(per_step, spec["warmup"])
    # cross-check: alignkit's own logged rollout tokens/s over the measured steps
    meas = rows[spec["warmup"]:]
    res["logged_rollout_tokens_per_s"] = (sum(r["response_length"] * ROLLOUTS for r in meas)
                                          / sum(r["response_length"] * ROLLOUTS / r["rollout_tokens_per_second"]
                                                for r in meas))
    res["reward_first_last"] = (rows[0]["reward/mean"], rows[-1]["reward/mean"])
    import torch
    res["threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(res))


# ------------------------------------------------------------------ TRL child

def trl_child(spec: dict, result_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    _, _, lora, _ = CONFIGS[spec["name"]]
    steps = spec["warmup"] + spec["measured"]
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    prompts = [json.loads(ln)["prompt"] for ln in DATA.read_text().splitlines() if ln.strip()]
    args = GRPOConfig(
        output_dir=spec["out"], max_steps=steps, per_device_train_batch_size=ROLLOUTS, num_generations=GENERATIONS,
        max_completion_length=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0, top_k=0, learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=int(0.1 * steps), max_grad_norm=1.0, beta=BETA, num_iterations=1,
        gradient_checkpointing=False, bf16=spec.get("precision") == "bf16", fp16=False, use_cpu=True, logging_steps=1, report_to="none",
        save_strategy="no", seed=SEED, disable_tqdm=True, dataloader_num_workers=0,
        generation_kwargs={"min_new_tokens": MAX_NEW_TOKENS} if spec["fixed"] else None)

    class Timer(TrainerCallback):
        def __init__(self):
            self.t = []

        def on_train_begin(self, *a, **k):
            self.t.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.t.append(time.perf_counter())

    timer = Timer()
    peft_config = None
    if lora:
        from peft import LoraConfig

        # alignkit's add_lora(r=16): alpha 2r, no dropout, every linear but lm_head
        peft_config = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules="all-linear",
                                 exclude_modules=["lm_head"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tok,
                          peft_config=peft_config, callbacks=[timer])
    gen_s, ref_s = [], []
    gen_model = trainer.accelerator.unwrap_model(trainer.model)
    orig_generate = gen_model.generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = orig_generate(*a, **k)
        gen_s.append(time.perf_counter() - t0)
        return out

    gen_model.generate = timed_generate
    if trainer.ref_model is not None:
        t_ref = []
        trainer.ref_model.register_forward_pre_hook(lambda *a: t_ref.append(time.perf_counter()))
        trainer.ref_model.register_forward_hook(lambda *a: ref_s.append((len(gen_s), time.perf_counter() - t_ref[-1])))
    trainer.train()
    dts = [b - a for a, b in zip(timer.t, timer.t[1:])]
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    assert len(dts) == steps and len(logs) == steps and len(gen_s) == steps, (len(dts), len(logs), len(gen_s))
    per_step = []
    for i in range(steps):
        r = sum(dt for g, dt in ref_s if g == i + 1) if trainer.ref_model is not None else None
        per_step.append({"step_s": dts[i], "tokens": logs[i]["completions/mean_length"] * ROLLOUTS, "gen_s": gen_s[i],
                         "ref_s": r, "update_s": None})
    res = summarise([dict(s, update_s=0.0) for s in per_step], spec["warmup"])
    res["update_s"] = None  # TRL's old/ref log-prob passes and its update are not separated here
    res["reward_first_last"] = (logs[0].get("reward"), logs[-1].get("reward"))
    res["threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(res))


# ------------------------------------------------------------------ profiler (alignkit GRPO, in this process)

def profile_alignkit(name: str, model: str, model_dir: Path, work: Path, active: int, top: int, fixed: bool) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from alignkit import cli

    wait, warm = 1, 1
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=wait, warmup=warm, active=active, repeat=1),
                   acc_events=True, record_shapes=True)
    rec = instrument_alignkit(on_step_start=lambda: prof.step() if rec["starts"] else None, fixed=fixed)
    steps = wait + warm + active
    with prof:
        rc = cli.main(alignkit_argv(name, str(model_dir), str(work / f"prof-{name}"), steps))
        prof.step()  # closes the last active step when rl_loop returns
    assert rc == 0, rc
    step_s = [b - a for a, b in zip(rec["starts"], rec["starts"][1:] + [rec["end"]])][wait + warm:]
    gen_s, ref_s = rec["gen_s"][wait + warm:], rec["ref_s"][wait + warm:]
    exp_s = rec["exp_s"][wait + warm:]
    wall = sum(step_s)
    print(f"\n### alignkit `{name}` on {model}: {active} profiled steps (after {wait + warm}), "
          f"torch threads {torch.get_num_threads()}\n")
    print(f"wall per step {wall / active:.2f} s: generation {sum(gen_s) / active:.2f} s, reference forward "
          f"{sum(ref_s) / active:.2f} s, rest of the experience (judge, advantages) "
          f"{(sum(exp_s) - sum(gen_s) - sum(ref_s)) / active:.2f} s, update (forward + backward + clip + AdamW + "
          f"logging) {(wall - sum(exp_s)) / active:.2f} s")

    # attribute each op's self time to the innermost bench:: region above it (else: update)
    events = prof.events()
    phase_of = {}

    def phase(e):
        if id(e) in phase_of:
            return phase_of[id(e)]
        p = e.cpu_parent
        if e.name in ("bench::generate", "bench::reference"):
            out = e.name.split("::")[1]
        elif e.name == "bench::experience":
            out = "experience (other)"
        elif p is None:
            out = "update"
        else:
            out = phase(p)
        phase_of[id(e)] = out
        return out

    by = {}
    for e in events:
        if e.name.startswith("bench::") or e.name.startswith("ProfilerStep"):
            continue
        key = (phase(e), e.name)
        by[key] = by.get(key, 0.0) + e.self_cpu_time_total
    totals = {}
    for (ph, _), v in by.items():
        totals[ph] = totals.get(ph, 0.0) + v
    total = sum(totals.values())
    print("\n| phase | self CPU ms/step | % |\n|---|---:|---:|")
    for ph, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {ph} | {v / 1e3 / active:.0f} | {100 * v / total:.1f} |")
    print("\n| phase | op | self CPU ms/step | % of all | calls/step |\n|---|---|---:|---:|---:|")
    calls = {}
    for e in events:
        if not (e.name.startswith("bench::") or e.name.startswith("ProfilerStep")):
            calls[(phase(e), e.name)] = calls.get((phase(e), e.name), 0) + 1
    for (ph, op), v in sorted(by.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {ph} | {op[:60]} | {v / 1e3 / active:.1f} | {100 * v / total:.1f} | {calls[(ph, op)] / active:.0f} |")
    if top:
        print("\nTop ops by self CPU, with input shapes (all phases):\n")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=top,
                                                                 max_name_column_width=40, max_shapes_column_width=60))


# ------------------------------------------------------------------ main

def fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def best(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    return min(ok, key=lambda r: r["step_s"]) if ok else runs[0]


def print_table(model: str, n_params: int, warmup: int, measured: int, res: dict) -> None:
    print(f"\n### {model} ({n_params / 1e6:.1f}M parameters): {ROLLOUTS} rollouts/step, <= {MAX_NEW_TOKENS} new tokens, "
          f"{warmup} warm-up + {measured} measured steps\n")
    print("| config | step s | completion tokens/step | tokens/s (step) | generation s | generation tokens/s "
          "| reference s | rest of experience s | update s | peak RSS MB | speed vs TRL GRPO | step vs alignkit GRPO | RSS vs TRL GRPO | CPU/wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in res.items():
        if "error" in r:
            print(f"| {DESCRIBE[name]} | error: {r['error'][:120]} | | | | | | | | {fmt(r.get('rss_mb'), '.0f')} | | | | |")
            continue
        lora = CONFIGS[name][2]
        trl = res.get("trl-grpo-lora" if lora else "trl-grpo")
        ours = res.get("grpo-lora" if lora else "grpo")
        trl_ok = trl is not None and "error" not in trl and name != ("trl-grpo-lora" if lora else "trl-grpo")
        speed = r["tokens_per_s"] / trl["tokens_per_s"] if trl_ok else None
        rss = r["rss_mb"] / trl["rss_mb"] if trl_ok else None
        vs_ours = (r["step_s"] / ours["step_s"] if ours is not None and "error" not in ours and CONFIGS[name][1] == "ppo"
                   else None)
        rest = (r["step_s"] - r["gen_s"] - r["ref_s"] - r["update_s"]) if r["update_s"] is not None else None
        print(f"| {DESCRIBE[name]} | {r['step_s']:.2f} | {r['tokens_per_step']:.0f} | {r['tokens_per_s']:.0f} | "
              f"{r['gen_s']:.2f} | {r['gen_tokens_per_s']:.0f} | {fmt(r['ref_s'])} | {fmt(rest)} | {fmt(r['update_s'])} | "
              f"{r['rss_mb']:.0f} | {fmt(speed)} | {fmt(vs_ours)} | {fmt(rss)} | {fmt(r.get('cpu_per_wall'))} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny", help="comma list of tiny,embedded (default: tiny)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default: tiny 5, embedded 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: tiny 2, embedded 1)")
    ap.add_argument("--configs", default=None, help=f"comma list from {','.join(CONFIGS)} (default: all)")
    ap.add_argument("--skip-trl", action="store_true", help="alignkit only")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each config R times, cycling through the configs, keep each one's fastest run")
    ap.add_argument("--lengths", choices=("fixed", "natural"), default="fixed",
                    help="fixed: every response is max-new-tokens long in both libraries (EOS does not end a row; "
                         "equal work); natural: rows end at EOS, lengths differ by library and step")
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="diagnostic: run alignkit with glibc's own dynamic mmap threshold (neither the CLI's "
                         "64 KiB nor rl_loop's alignkit.memory.RL_MMAP_THRESHOLD)")
    ap.add_argument("--rl-mmap-threshold", type=int, default=None,
                    help="diagnostic: the glibc mmap threshold in bytes rl_loop sets (alignkit.memory."
                         "RL_MMAP_THRESHOLD; 0 keeps the CLI's 64 KiB, as before it was added)")
    ap.add_argument("--rl-allow-mmap", action="store_true",
                    help="diagnostic: rl_loop lets glibc mmap the blocks above its threshold (alignkit.memory."
                         "HEAP_ONLY = False), as before the loop served every block from the heap")
    ap.add_argument("--no-row-attention", action="store_true",
                    help="diagnostic: packed passes attend over the packed rows with their mask (alignkit.train."
                         "rl_common.ROW_ATTENTION = False), as before ops/row_attention.py")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: alignkit --precision bf16 and TRL bf16=True (autocast in both, fp32 weights)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: torch's)")
    ap.add_argument("--work-dir", default=None, help="where models, runs and logs go (default: a temp dir)")
    ap.add_argument("--profile", action="store_true", help="profile alignkit in this process instead (tiny model)")
    ap.add_argument("--profile-config", default="grpo", help="the alignkit config --profile runs")
    ap.add_argument("--top", type=int, default=15, help="--profile: ops listed")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_dpo

    with bench_dpo.work_dir(a.work_dir, "alignkit-bench-rl-") as (work, finished):
        rc = bench(a, ap, work)
        finished(rc)
    return rc


def bench(a: argparse.Namespace, ap: argparse.ArgumentParser, work: Path) -> int:
    """The runs and the tables (or --profile); 0 when every run succeeded."""
    import bench_dpo

    models = a.models.split(",")
    if a.profile:
        model_dir = prepare_model(models[0], work)
        from alignkit import memory
        if a.glibc_malloc:
            memory.return_freed_memory_to_os = lambda: False
            memory.RL_MMAP_THRESHOLD = 0
        if a.rl_mmap_threshold is not None:
            memory.RL_MMAP_THRESHOLD = a.rl_mmap_threshold
        memory.HEAP_ONLY = not a.rl_allow_mmap
        if a.no_row_attention:
            from alignkit.train import rl_common
            rl_common.ROW_ATTENTION = False
        profile_alignkit(a.profile_config, models[0], model_dir, work, a.steps or 3, a.top, a.lengths == "fixed")
        return 0
    configs = a.configs.split(",") if a.configs else list(CONFIGS)
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {','.join(CONFIGS)}")
    if a.skip_trl:
        configs = [c for c in configs if CONFIGS[c][0] != "trl"]
    elif any(CONFIGS[c][0] == "trl" for c in configs):
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL is not installed (pip install trl==1.16.0); use --skip-trl", file=sys.stderr)
            return 2

    import torch

    print(f"torch {torch.__version__}, threads {a.threads or torch.get_num_threads()}, cpus {os.cpu_count()}; "
          f"work dir {work}", flush=True)
    tables = []
    for m in models:
        model_dir = prepare_model(m, work)
        n_params = bench_dpo.count_params(model_dir)
        warmup = a.warmup if a.warmup is not None else STEPS[m][0]
        measured = a.steps or STEPS[m][1]
        runs = {c: [] for c in configs}
        for _ in range(a.repeats):
            for c in configs:
                r = run_config(c, model_dir, warmup, measured, work, a.threads, a.lengths == "fixed",
                               a.glibc_malloc, a.rl_mmap_threshold, a.precision, a.rl_allow_mmap,
                               a.no_row_attention)
                runs[c].append(r)
                brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                         if k in ("step_s", "tokens_per_step", "tokens_per_s", "gen_s", "ref_s", "update_s", "rss_mb",
                                  "wall_s", "all_step_s", "load", "logged_rollout_tokens_per_s", "error",
                                  "cpu_per_wall", "major_faults", "minor_faults", "steal", "iowait")}
                print(f"  {m} {c}: {brief}", flush=True)
        res = {c: best(rs) for c, rs in runs.items()}
        tables.append((m, n_params, warmup, measured, res))
        (work / f"results-{m}.json").write_text(json.dumps(res, indent=1))

    print("\n## RL benchmark (CPU): step time = wall time of a whole training step (rollout + reward + reference + "
          "update); tokens/s = completion tokens / step time; generation tokens/s = completion tokens / generation "
          "time; speed vs TRL = tokens/s ratio against TRL GRPO of the same kind (full or LoRA); peak RSS of a fresh "
          "process per run; CPU/wall = the run's CPU seconds per wall second (~1.8-1.9 with 2 threads on 2 idle cores, "
          "lower = the run shared the cores with something else)")
    print(f"\nresponse lengths: {a.lengths}; precision: {a.precision}")
    for t in tables:
        print_table(*t)
    return 1 if any("error" in r for t in tables for r in t[4].values()) else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_alignkit-child":
        alignkit_child(json.loads(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_trl-child":
        trl_child(json.loads(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(main())
