"""DPO throughput / peak-memory benchmark: alignkit vs TRL's DPOTrainer, plus a step-0 log-prob check.

Run:  .venv/bin/python benchmarks/bench_dpo.py [--quick] [--models tiny,embedded] [--steps N]
                                                 [--configs full-fp32-fly,lora-bf16-cached,...] [--skip-trl]
                                                 [--data sample|long|PATH]

Every (library, model, config) runs in its own fresh subprocess; its peak RSS is the child's
``ru_maxrss`` returned by ``os.wait4`` (so peaks never mix). alignkit runs through its CLI
(``alignkit dpo ... --log-every 1``) and tokens/s is read from metrics.jsonl; TRL runs
``DPOTrainer`` in a child of this script with a callback timing each step. For both, tokens/s =
(non-pad tokens of the chosen+rejected rows of the measured steps) / (wall time of those steps),
warm-up steps excluded; a step's wall time is the full loop iteration (data, forward, backward,
clip, optimizer, logging).

TRL needs the optional ``bench`` extra: ``.venv/bin/pip install trl==1.16.0`` (no other torch).
TRL 1.16's DPOConfig defaults to gradient_checkpointing=True and bf16=True; both are set explicitly
here (checkpointing off as in alignkit, bf16 only in the bf16 configs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "alignkit" / "sample_data" / "prefs.jsonl"
# the preference file every run reads (--data; children inherit it through the environment)
DATA = Path(os.environ.get("BENCH_DPO_DATA", SAMPLE))
LONG_BUDGET = 250  # --data long: prompt + longer completion + EOS stay under this many tokens (max length 256)
MAX_LENGTH = 256
MAX_PROMPT_LENGTH = 256  # alignkit's CLI default; the sample prompts are far shorter (no truncation)
LR = 5e-6
SEED = 42
ALL_CONFIGS = ["defaults"] + [f"{m}-{p}-{r}" for m in ("full", "lora") for p in ("fp32", "bf16")
                               for r in ("fly", "cached")]
DEFAULT_CONFIGS = {"tiny": ALL_CONFIGS, "embedded": ["full-fp32-fly", "lora-fp32-fly"]}
BATCH = {"tiny": 4, "embedded": 2}
# (warm-up, measured) steps
STEPS = {"tiny": (3, 8), "embedded": (2, 4)}
QUICK_STEPS = {"tiny": (2, 4), "embedded": (1, 2)}


def parse_config(name: str) -> dict:
    if name == "defaults":  # each library as it ships: alignkit's defaults (full, fp32, cached reference,
        # packing) against DPOConfig's own defaults; only the run length, batch and length are set
        return {"name": name, "lora": False, "bf16": False, "cached": True, "defaults": True}
    method, precision, ref = name.split("-")
    assert method in ("full", "lora") and precision in ("fp32", "bf16") and ref in ("fly", "cached"), name
    return {"name": name, "lora": method == "lora", "bf16": precision == "bf16", "cached": ref == "cached"}


# ------------------------------------------------------------------ models

def prepare_tiny(folder: Path) -> Path:
    """Random Llama (hidden 256, 3 layers, 4 heads, MLP 1024, tied embeddings: 15.7M parameters, the
    size issue #2 measured TRL on) with the SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.models import load_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def prepare_embedded() -> Path:
    """The de-quantised HF folder of the embedded SmolLM2-135M-Instruct (created once by alignkit).
    Passed to both libraries as a plain folder, so ALIGNKIT_CACHE (used for the reference-log-prob
    cache) never triggers a second de-quantisation."""
    from alignkit.models import _ensure_dequantised, cached_model_dir, resolve_model_source

    folder = cached_model_dir("smollm2-135m-instruct")
    if not (folder / "config.json").is_file():
        _ensure_dequantised("smollm2-135m-instruct", resolve_model_source("smollm2-135m-instruct"))
    return folder


def write_long_rows(path: Path, tok) -> Path:
    """--data long: preference rows that nearly fill MAX_LENGTH, built from the sample file's own rows.

    The sample rows are short (prompt + completion ~34 tokens, at most 49), so max length 256 never binds
    and each library's per-token costs, not its (B, T, V) tensors, decide its peak. Here consecutive
    sample rows are joined into one numbered multi-question row (prompt: the questions; chosen / rejected:
    the answers in the same order) for as long as prompt + the longer completion + EOS stays within
    LONG_BUDGET tokens, so neither library truncates. Deterministic; the 300 sample rows give 50."""
    rows = [json.loads(ln) for ln in SAMPLE.read_text().splitlines() if ln.strip()]
    n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731

    def joined(group: list[dict]) -> dict:
        return {"prompt": "Answer each question.\n" + "\n".join(f"{i + 1}. {r['prompt']}" for i, r in enumerate(group)),
                **{k: "\n".join(f"{i + 1}. {r[k]}" for i, r in enumerate(group)) for k in ("chosen", "rejected")}}

    out, group = [], []
    for r in rows:
        j = joined(group + [r])
        if group and n(j["prompt"]) + max(n(j["chosen"]), n(j["rejected"])) + 1 > LONG_BUDGET:
            out.append(joined(group))
            group = []
        group.append(r)
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def count_params(folder: Path) -> int:
    """Parameters stored in the checkpoint (tied embeddings are stored, and counted, once)."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# ------------------------------------------------------------------ subprocess runner

def run_child(cmd: list[str], env: dict | None = None, log_file: Path | None = None) -> tuple[int, float, str]:
    """(exit code, peak RSS in MB of that child alone, output)."""
    with tempfile.TemporaryFile(mode="w+") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if log_file is not None:
        log_file.write_text(text)
    return p.returncode, usage.ru_maxrss / 1024.0, text  # Linux: ru_maxrss in KiB


def step_tokens_alignkit(model_dir: Path, batch: int, steps: int) -> list[int]:
    """Non-pad tokens of each step's (2B, T) batch, replaying alignkit's deterministic data order."""
    from alignkit.data import load_preference_data
    from alignkit.models import load_tokenizer
    from alignkit.train.loop import stream_indices

    tok = load_tokenizer(str(model_dir))
    pairs, _ = load_preference_data([str(DATA)], tok, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    out = []
    for s in range(steps):
        idx = stream_indices(s, len(pairs), batch, SEED)
        out.append(sum(2 * len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids)
                       for i in idx))
    return out


def run_alignkit(model_dir: Path, cfg: dict, batch: int, warmup: int, measured: int, work: Path) -> dict:
    out_dir = work / f"ak-{model_dir.name}-{cfg['name']}"
    shutil.rmtree(out_dir, ignore_errors=True)
    steps = warmup + measured
    exe = Path(sys.executable).with_name("alignkit")
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "alignkit.cli"]) + [
        "dpo", "--model", str(model_dir), "--data", str(DATA), "--output-dir", str(out_dir),
        "--max-steps", str(steps), "--batch-size", str(batch), "--max-length", str(MAX_LENGTH),
        "--max-prompt-length", str(MAX_PROMPT_LENGTH), "--lr", str(LR), "--seed", str(SEED),
        "--log-every", "1", "--no-progress", "--overwrite"]
    if cfg["lora"]:
        cmd += ["--lora-r", "16"]
    if cfg["bf16"]:
        cmd += ["--precision", "bf16"]
    if not cfg["cached"]:
        cmd += ["--no-ref-cache"]
    env = dict(os.environ, ALIGNKIT_CACHE=str(work / f"cache-{model_dir.name}-{cfg['name']}"),
               TOKENIZERS_PARALLELISM="false")
    shutil.rmtree(env["ALIGNKIT_CACHE"], ignore_errors=True)  # the cached config computes its reference once, here
    t0 = time.perf_counter()
    rc, rss, text = run_child(cmd, env, work / f"ak-{model_dir.name}-{cfg['name']}.log")
    wall = time.perf_counter() - t0
    if rc != 0:
        return {"error": f"alignkit exit {rc}: {text.strip().splitlines()[-1] if text.strip() else ''}"}
    rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    tokens = step_tokens_alignkit(model_dir, batch, steps)
    meas = [r for r in rows if r["step"] > warmup]
    tok = sum(tokens[r["step"] - 1] for r in meas)
    secs = sum(tokens[r["step"] - 1] / r["tokens_per_second"] for r in meas)
    return {"tokens_per_s": tok / secs, "rss_mb": rss, "step_s": secs / len(meas), "wall_s": wall,
            "first_logps": (rows[0]["logps/chosen"], rows[0]["logps/rejected"])}


def run_trl(model_dir: Path, cfg: dict, batch: int, warmup: int, measured: int, work: Path) -> dict:
    spec = {"model": str(model_dir), "cfg": cfg, "batch": batch, "warmup": warmup, "measured": measured,
            "out": str(work / f"trl-{model_dir.name}-{cfg['name']}")}
    result = work / f"trl-{model_dir.name}-{cfg['name']}.json"
    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    rc, rss, text = run_child([sys.executable, __file__, "--_trl-child", json.dumps(spec), str(result)],
                              dict(os.environ, TOKENIZERS_PARALLELISM="false"),
                              work / f"trl-{model_dir.name}-{cfg['name']}.log")
    wall = time.perf_counter() - t0
    if rc != 0 or not result.exists():
        tail = text.strip().splitlines()[-1] if text.strip() else ""
        return {"error": f"TRL exit {rc}: {tail}"}
    res = json.loads(result.read_text())
    res.update(rss_mb=rss, wall_s=wall)
    return res


# ------------------------------------------------------------------ TRL child

def _trl_args(out: str, cfg: dict, batch: int, steps: int):
    from trl import DPOConfig

    if cfg.get("defaults"):
        return DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, max_length=MAX_LENGTH,
                         logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                         learning_rate=LR, seed=SEED, disable_tqdm=True)

    return DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, max_length=MAX_LENGTH,
                     logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                     precompute_ref_log_probs=cfg["cached"], bf16=cfg["bf16"], fp16=False,
                     gradient_checkpointing=False, learning_rate=LR, lr_scheduler_type="cosine",
                     warmup_steps=int(0.1 * steps), max_grad_norm=1.0, beta=0.1, seed=SEED, dataloader_num_workers=0,
                     disable_tqdm=True)


def _lora_config():
    from peft import LoraConfig

    # the same adapters as alignkit's add_lora(r=16): alpha 2r, no dropout, every linear but lm_head
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                      exclude_modules=["lm_head"], task_type="CAUSAL_LM")


def _rows() -> list[dict]:
    return [json.loads(ln) for ln in DATA.read_text().splitlines() if ln.strip()]


def trl_child(spec: dict, result_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    torch.manual_seed(SEED)
    cfg, steps = spec["cfg"], spec["warmup"] + spec["measured"]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ds = Dataset.from_list(_rows())
    args = _trl_args(spec["out"], cfg, spec["batch"], steps)

    class Timer(TrainerCallback):
        def __init__(self):
            self.t = []

        def on_train_begin(self, *a, **k):
            self.t.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.t.append(time.perf_counter())

    timer = Timer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=_lora_config() if cfg["lora"] else None, callbacks=[timer])
    tokens: list[int] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        out = collate(examples)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    trainer.data_collator = counting_collator
    trainer.train()
    dts = [b - a for a, b in zip(timer.t, timer.t[1:])]
    w = spec["warmup"]
    tok_meas, sec_meas = sum(tokens[w:steps]), sum(dts[w:steps])
    logs = [h for h in trainer.state.log_history if "logps/chosen" in h]
    Path(result_path).write_text(json.dumps({
        "tokens_per_s": tok_meas / sec_meas, "step_s": sec_meas / len(dts[w:steps]),
        "first_logps": (logs[0]["logps/chosen"], logs[0]["logps/rejected"]) if logs else None}))


# ------------------------------------------------------------------ step-0 log-prob check (child)

def check_child(model_dir: str, batch: int, result_path: str) -> None:
    """alignkit's logged logps/chosen|rejected on one batch vs TRL's, on identical token ids, and
    how TRL's own tokenisation of the same rows differs from alignkit's."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit import losses
    from alignkit.data import collate_pairs, load_preference_data
    from alignkit.models import load_tokenizer
    from alignkit.ops.logprobs import CompletionLogProbs
    from alignkit.train.dpo import dpo_step
    from trl import DPOTrainer

    rows = _rows()[:batch]
    ak_tok = load_tokenizer(model_dir)
    pairs, _ = load_preference_data([str(DATA)], ak_tok, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    pairs = pairs[:batch]

    # alignkit: the exact training-step code path (dpo_step), reference log-probs set to 0
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    b = collate_pairs(pairs, ak_tok.pad_token_id)
    b["ref_chosen"] = torch.zeros(batch, dtype=torch.float64)
    b["ref_rejected"] = torch.zeros(batch, dtype=torch.float64)
    with torch.no_grad():
        out = dpo_step(CompletionLogProbs(model), b, spec=losses.get_loss_spec("dpo"), beta=0.1,
                       label_smoothing=0.0, gamma=1.0, lam=50.0, reference=None)
    ak = (out.metrics["logps/chosen"].item() / batch, out.metrics["logps/rejected"].item() / batch)

    # TRL: a trainer over the same rows (its own tokenisation), its collator and _compute_loss
    tok = AutoTokenizer.from_pretrained(model_dir)
    trl_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trl_out = str(Path(result_path).parent / "trl-check")
    trainer = DPOTrainer(model=trl_model, args=_trl_args(trl_out, parse_config("full-fp32-fly"), batch, 1),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    trl_rows = [trainer.train_dataset[i] for i in range(batch)]

    def trl_logps(examples):
        inputs = trainer.data_collator(examples)
        trainer._metrics["train"].clear()
        trainer.model.train()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, inputs)
        m = trainer._metrics["train"]
        return m["logps/chosen"][-1], m["logps/rejected"][-1]

    same_ids = [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
                for p in pairs]
    trl_same = trl_logps(same_ids)
    trl_own = trl_logps(trl_rows)

    diffs = []
    for p, t, r in zip(pairs, trl_rows, rows):
        d = {}
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if list(getattr(p, k)) != list(t[k]):
                d[k] = {"alignkit": tok.convert_ids_to_tokens(list(getattr(p, k)))[-4:] if k == "prompt_ids"
                        else tok.convert_ids_to_tokens(list(getattr(p, k)))[:4],
                        "trl": tok.convert_ids_to_tokens(list(t[k]))[-4:] if k == "prompt_ids"
                        else tok.convert_ids_to_tokens(list(t[k]))[:4]}
        diffs.append(d)
    # how often the whole sample file tokenises identically under both conventions
    all_pairs, _ = load_preference_data([str(DATA)], ak_tok, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    full = DPOTrainer._prepare_dataset(trainer, Dataset.from_list(_rows()), tok, trainer.args, "all")
    same_seq = sum(p.prompt_ids + p.chosen_ids == f["prompt_ids"] + f["chosen_ids"] and
                   p.prompt_ids + p.rejected_ids == f["prompt_ids"] + f["rejected_ids"]
                   for p, f in zip(all_pairs, full))
    examples = []
    for i, (p, f) in enumerate(zip(all_pairs, full)):
        if len(examples) < 3 and (p.prompt_ids, p.chosen_ids, p.rejected_ids) != \
                (f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]):
            examples.append({"row": i, "alignkit_prompt_end": tok.convert_ids_to_tokens(p.prompt_ids[-3:]),
                             "alignkit_chosen_start": tok.convert_ids_to_tokens(p.chosen_ids[:3]),
                             "trl_prompt_end": tok.convert_ids_to_tokens(f["prompt_ids"][-3:]),
                             "trl_chosen_start": tok.convert_ids_to_tokens(f["chosen_ids"][:3]),
                             "trl_rejected_start": tok.convert_ids_to_tokens(f["rejected_ids"][:3])})
    same_split = sum(p.prompt_ids == f["prompt_ids"] and p.chosen_ids == f["chosen_ids"] and
                     p.rejected_ids == f["rejected_ids"] for p, f in zip(all_pairs, full))
    Path(result_path).write_text(json.dumps({
        "alignkit": ak, "trl_same_ids": trl_same, "trl_own_tokenisation": trl_own, "row_diffs": diffs,
        "n_rows": len(all_pairs), "diff_examples": examples, "n_same_split": same_split, "n_same_sequence": same_seq}))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def run_check(model_dir: Path, batch: int, work: Path) -> dict | None:
    res = work / f"check-{model_dir.name}.json"
    res.unlink(missing_ok=True)
    rc, _, text = run_child([sys.executable, __file__, "--_check-child", str(model_dir), str(batch), str(res)],
                            dict(os.environ, TOKENIZERS_PARALLELISM="false"), work / f"check-{model_dir.name}.log")
    if rc != 0 or not res.exists():
        print(f"step-0 check failed (exit {rc}); see {work / f'check-{model_dir.name}.log'}")
        print("\n".join(text.strip().splitlines()[-5:]))
        return None
    return json.loads(res.read_text())


def print_check(name: str, c: dict, tol: float = 1e-3) -> bool:
    ak, same, own = c["alignkit"], c["trl_same_ids"], c["trl_own_tokenisation"]
    print(f"\n### Step-0 log-prob check: {name} (first batch of {len(c['row_diffs'])} rows, fp32, mean over pairs "
          f"of summed completion log-probs, as both libraries log them)\n")
    print("| | alignkit | TRL (same ids) | rel diff | TRL (own tokenisation) | rel diff |")
    print("|---|---:|---:|---:|---:|---:|")
    ok = True
    for i, k in enumerate(("logps/chosen", "logps/rejected")):
        r_same, r_own = rel(ak[i], same[i]), rel(ak[i], own[i])
        ok &= r_same <= tol
        print(f"| {k} | {ak[i]:.6f} | {same[i]:.6f} | {r_same:.2e} | {own[i]:.6f} | {r_own:.2e} |")
    print(f"\nsame token ids: {'PASS' if ok else 'FAIL'} (tolerance {tol:g} relative)")
    print(f"tokenisation over the whole sample file ({c['n_rows']} rows): identical prompt/completion split in "
          f"{c['n_same_split']}, identical full sequences in {c['n_same_sequence']}")
    for e in c.get("diff_examples", []):
        print(f"  e.g. row {e['row']}: alignkit prompt ends {e['alignkit_prompt_end']}, chosen starts "
              f"{e['alignkit_chosen_start']}; TRL prompt ends {e['trl_prompt_end']}, chosen starts "
              f"{e['trl_chosen_start']}, rejected starts {e['trl_rejected_start']}")
    for i, d in enumerate(c["row_diffs"]):
        for k, v in d.items():
            print(f"  row {i} {k}: alignkit {v['alignkit']} vs TRL {v['trl']}")
    return ok


# ------------------------------------------------------------------ main

def best(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else runs[0]


def fmt(x, spec=".0f"):
    return "n/a" if x is None else format(x, spec)


@contextlib.contextmanager
def work_dir(given: str | None, prefix: str):
    """The folder a benchmark writes its models, runs and logs to.

    ``--work-dir`` is used as given and kept. Otherwise a new temporary folder is made and removed when the
    benchmark ends, so repeated runs do not fill the disk (each holds 0.1-1 GB of checkpoints); it is kept, and
    named on stderr, when the benchmark raises or returns non-zero, so the failed runs' logs can be read.
    """
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        yield path, lambda rc: None
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    status = {"rc": 1}
    try:
        yield path, lambda rc: status.update(rc=rc)
    finally:
        if status["rc"] == 0 or not any(path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"work dir kept for its logs: {path}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, fewer steps")
    ap.add_argument("--models", default=None, help="comma list of tiny,embedded (default: both; --quick: tiny)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (warm-up unchanged)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps")
    ap.add_argument("--configs", default=None,
                    help=f"comma list from {','.join(ALL_CONFIGS)} or 'all' (default: all for tiny, "
                         f"{','.join(DEFAULT_CONFIGS['embedded'])} for embedded)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each (config, library) R times, alternating alignkit/TRL, keep the fastest run "
                         "(robust to other load on a shared machine)")
    ap.add_argument("--skip-trl", action="store_true", help="alignkit only (no TRL runs, no step-0 check)")
    ap.add_argument("--skip-check", action="store_true", help="skip the step-0 log-prob check")
    ap.add_argument("--work-dir", default=None, help="where models, runs and logs go (default: a temp dir)")
    ap.add_argument("--data", default="sample",
                    help="'sample' (the bundled prefs.jsonl, ~34 tokens a row), 'long' (its rows joined into "
                         f"multi-question rows of up to {LONG_BUDGET} tokens, so max length {MAX_LENGTH} nearly binds) "
                         "or a JSONL path of plain-string prompt/chosen/rejected rows")
    a = ap.parse_args(argv)

    global DATA
    with work_dir(a.work_dir, "alignkit-bench-") as (work, finished):
        if a.data == "long":
            from alignkit.models import load_tokenizer
            DATA = write_long_rows(work / "long_prefs.jsonl", load_tokenizer("smollm2-135m-instruct"))
        elif a.data != "sample":
            DATA = Path(a.data).resolve()
        os.environ["BENCH_DPO_DATA"] = str(DATA)
        rc = bench(a, work)
        finished(rc)
    return rc


def bench(a: argparse.Namespace, work: Path) -> int:
    """The runs and the table; 0 when every run and the step-0 check succeeded."""
    models = (a.models or ("tiny" if a.quick else "tiny,embedded")).split(",")
    if not a.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL is not installed (pip install 'alignkit[bench]' / trl==1.16.0); use --skip-trl", file=sys.stderr)
            return 2

    import torch
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}; work dir {work}; "
          f"data {DATA}")
    results = []
    checks_ok = True
    for m in models:
        model_dir = prepare_tiny(work / "tiny-llama") if m == "tiny" else prepare_embedded()
        n_params = count_params(model_dir)
        batch = BATCH[m]
        warmup, measured = (QUICK_STEPS if a.quick else STEPS)[m]
        warmup = a.warmup if a.warmup is not None else warmup
        measured = a.steps or measured
        configs = ALL_CONFIGS if a.configs == "all" else (a.configs.split(",") if a.configs else DEFAULT_CONFIGS[m])
        print(f"\n{m}: {model_dir} - {n_params:,} parameters ({n_params / 1e6:.1f}M); batch {batch} pairs, "
              f"max length {MAX_LENGTH}, {warmup} warm-up + {measured} measured steps", flush=True)
        if not a.skip_trl and not a.skip_check:
            c = run_check(model_dir, batch, work)
            if c:
                checks_ok &= print_check(m, c)
            sys.stdout.flush()
        for name in configs:
            cfg = parse_config(name)
            aks, trs = [], []
            for _ in range(a.repeats):
                aks.append(run_alignkit(model_dir, cfg, batch, warmup, measured, work))
                print(f"  {m} {name} alignkit: {aks[-1]}", flush=True)
                if not a.skip_trl:
                    trs.append(run_trl(model_dir, cfg, batch, warmup, measured, work))
                    print(f"  {m} {name} TRL: {trs[-1]}", flush=True)
            ak, tr = best(aks), (best(trs) if trs else None)
            results.append((m, n_params, name, ak, tr))

    print("\n## DPO benchmark (CPU; tokens/s = non-pad chosen+rejected tokens per second of training step; "
          "peak RSS of a fresh process per run)\n")
    print("| config | model | params | alignkit tok/s | TRL tok/s | tok/s ratio (ak/TRL) | alignkit peak RSS MB "
          "| TRL peak RSS MB | RSS ratio (ak/TRL) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for m, n, name, ak, tr in results:
        akt, akr = ak.get("tokens_per_s"), ak.get("rss_mb")
        trt = tr.get("tokens_per_s") if tr else None
        trr = tr.get("rss_mb") if tr else None
        print(f"| {name} | {m} | {n / 1e6:.1f}M | {fmt(akt)} | {fmt(trt)} | "
              f"{fmt(akt / trt if akt and trt else None, '.2f')} | {fmt(akr)} | {fmt(trr)} | "
              f"{fmt(akr / trr if akr and trr else None, '.2f')} |")
        for lib, r in (("alignkit", ak), ("TRL", tr)):
            if r and "error" in r:
                print(f"|  ↳ {lib} error: {r['error']} |||||||||")
    failed = any("error" in r for _, _, _, ak, tr in results for r in (ak, tr or {}))
    return 0 if checks_ok and not failed else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_trl-child":
        trl_child(json.loads(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_check-child":
        check_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(main())
