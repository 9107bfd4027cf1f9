"""`alignkit demo` / `alignkit pipeline`: the whole method on one model, end to end, with a report.

Stages (each writes into its own folder of ``--output-dir`` and a ``stage_done.json`` marker, so a
rerun skips what is finished; ``--overwrite`` recomputes everything):

0. ``sft/``      optional: SFT on ``--sft-data`` (the embedded model is instruction-tuned already: it
                 IS the SFT model, so the demo starts from it).
1. ``sample/``   K responses per training prompt from the SFT model (temperature ``--temperature``).
2. ``data/``     the gold judge (the rubric labeler by default) labels and ranks them: K-wise rows with
                 the labeler's table (``ranked_train.jsonl``, 10% held out as ``ranked_heldout.jsonl``)
                 and preference pairs for DPO (``pairs.jsonl``: best vs worst, or ``--pairs all``).
3. ``rm/``       the reward model learns to imitate the labeler (Bradley-Terry over the C(K,2) pairs);
                 its held-out pairwise accuracy is reported.
4. ``ppo/`` (``grpo/``)  RLHF against the reward model with the KL penalty to the SFT model.
5. ``dpo/`` ``cdpo/`` ``ipo/`` ``simpo/`` ...  the DPO family on the same preference pairs.
6. ``eval/``     every model against the SFT start on held-out prompts, judged by the gold judge
                 (``alignkit.eval``): win rate with its 95% interval, constraint-satisfaction rate, mean
                 rubric score, KL to the SFT model, response length.
7. ``report.md`` plus PNG plots (``demo.report``); the table is printed at the end.

Every trained model is a LoRA adapter (``--lora-r``). ``--precision auto`` (the default) trains and
samples under bf16 autocast where the CPU has native bf16 (on a 2-core CPU with it, that is what makes
the full demo fit in minutes) and in fp32 where bf16 would be emulated (24x slower there:
alignkit.precision). ``stage_seconds`` in ``summary.json`` says where the time went.
"""

from __future__ import annotations

import gc
import json
import random
import time
from importlib.resources import files
from pathlib import Path
from typing import Callable

from ..config import PipelineConfig, SamplingConfig, build_config
from ..data.prompts import PromptItem, load_prompts
from ..errors import InputError
from ..eval.run import Responses, generate, judge_responses, judge_spec, model_summary, rubric_tables, \
    sequence_log_ratio
from ..eval.stats import win_rate
from ..losses import LossKind
from ..models import load_causal_lm, load_tokenizer
from ..rollout.judges import load_judge
from ..train.online import make_pairs, write_jsonl

RL_METHODS = ("ppo", "grpo")
DPO_METHODS = tuple(k.value for k in LossKind)
# (full, quick) defaults of the size settings left unset
SIZES = {"methods": (["ppo", "dpo", "cdpo", "ipo", "simpo"], ["ppo", "dpo"]), "num_train_prompts": (160, 48),
         "num_eval_prompts": (200, 40), "max_new_tokens": (40, 40),
         "rm_steps": (36, 12), "rl_steps": (16, 4), "dpo_steps": (26, 12)}
MAX_PROMPT_LENGTH = 128
KL_PROMPTS = 40  # the KL to the SFT model is estimated on the first 40 held-out responses
HELDOUT_FRACTION = 0.1


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """Fill the size settings the user left unset from the full or the --quick defaults; check methods."""
    fill = {k: v[1] if cfg.quick else v[0] for k, v in SIZES.items() if getattr(cfg, k) is None}
    cfg = cfg.model_copy(update=fill)
    for m in cfg.methods:
        if m not in RL_METHODS + DPO_METHODS:
            raise InputError(f"unknown method {m!r}; known: {', '.join(RL_METHODS + DPO_METHODS)}", field="methods")
    if not cfg.methods or len(set(cfg.methods)) != len(cfg.methods):
        raise InputError("name each method once, at least one", field="methods")
    return cfg


def _shipped(name: str) -> str:
    return str(files("alignkit") / "sample_data" / name)


class Stages:
    """Runs stages once: a stage whose folder holds ``stage_done.json`` is skipped (its record reused)."""

    def __init__(self, out: Path, overwrite: bool):
        self.out, self.overwrite, self.seconds = out, overwrite, {}

    def run(self, name: str, fn: Callable[[Path], dict]) -> dict:
        folder = self.out / name
        marker = folder / "stage_done.json"
        if marker.exists() and not self.overwrite:
            record = json.loads(marker.read_text())
            self.seconds[name] = record.get("seconds", 0.0)
            print(f"[{name}] done earlier ({folder}), skipped")
            return record
        print(f"[{name}] ...")
        start = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        record = fn(folder)
        gc.collect()  # the stage's models (and their accelerator's references) go before the next stage loads
        record["seconds"] = round(time.perf_counter() - start, 1)
        self.seconds[name] = record["seconds"]
        marker.write_text(json.dumps(record, indent=2))
        print(f"[{name}] done in {record['seconds']:.0f} s")
        return record


def train(command: str, values: dict) -> Path:
    """One alignkit command, configured as the CLI would be (same validation, same defaults)."""
    from ..cli import run

    return run(command, build_config(command, values))


def run_pipeline(cfg: PipelineConfig) -> Path:
    """The whole pipeline; returns the output folder (report.md, summary.json and every stage's folder)."""
    cfg = resolve(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, cfg.overwrite)
    tokenizer = load_tokenizer(cfg.model)
    train_prompts = _prompts(cfg.train_prompts or [_shipped("constraints_train.jsonl")], tokenizer,
                             cfg.num_train_prompts)
    eval_prompts = _prompts(cfg.eval_prompts or [_shipped("constraints_eval.jsonl")], tokenizer, cfg.num_eval_prompts)
    judge = load_judge(judge_spec(cfg.judge), tokenizer=tokenizer)
    common = {"lora_r": cfg.lora_r, "precision": cfg.precision, "seed": cfg.seed, "progress": cfg.progress,
              "overwrite": True, "max_prompt_length": MAX_PROMPT_LENGTH, "save_every": 0}

    start = cfg.model
    if cfg.sft_data:
        stages.run("sft", lambda d: {"model": str(train("sft", {
            **common, "model": cfg.model, "data": cfg.sft_data, "output_dir": d, "chat_template_for_plain": True,
            "merge": True}))})
        start = str(out / "sft")
    stages.run("sample", lambda d: _sample(d, start, tokenizer, train_prompts, cfg))
    labelled = stages.run("data", lambda d: _label(d, out / "sample" / "responses.jsonl", judge, cfg.seed, cfg.pairs))
    rm = stages.run("rm", lambda d: _reward_model(d, start, out / "data", cfg, common))
    for method in cfg.methods:
        stages.run(method, lambda d, m=method: _method(d, m, start, out, cfg, common))
    results = [stages.run(f"eval/{name}", lambda d, n=name: _evaluate(d, n, start, out, tokenizer, eval_prompts,
                                                                        judge, cfg))
               for name in ["sft", *cfg.methods]]
    from .report import write_report

    summary = {"model": cfg.model, "quick": cfg.quick, "judge": cfg.judge, "train_prompts": len(train_prompts),
               "eval_prompts": len(eval_prompts), "data": labelled, "rm": rm, "results": results,
               "stage_seconds": stages.seconds}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out, summary)
    return out


def _prompts(sources: list[str], tokenizer, n: int) -> list[PromptItem]:
    prompts, report = load_prompts(sources, tokenizer, max_prompt_length=MAX_PROMPT_LENGTH,
                                   chat_template_for_plain=True)
    print(f"prompts ({', '.join(map(str, sources))}): {report.summary()}")
    return prompts[:n] if n else prompts


def _sampling(cfg: PipelineConfig, k: int, temperature: float) -> SamplingConfig:
    return SamplingConfig(num_responses=k, max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                          gen_batch_size=max(1, 32 // k))


def _sample(folder: Path, model_path: str, tokenizer, prompts: list[PromptItem], cfg: PipelineConfig) -> dict:
    model = load_causal_lm(model_path).eval()
    resp = generate(model, tokenizer, prompts, _sampling(cfg, cfg.num_responses, cfg.temperature), seed=cfg.seed,
                    precision=cfg.precision, progress=cfg.progress, desc="sample K per prompt")
    write_jsonl(folder / "responses.jsonl", [{"prompt": p.text, "responses": rs} for p, rs in zip(prompts, resp.texts)])
    write_jsonl(folder / "prompts.jsonl", [{"prompt": p.text} for p in prompts])
    return {"prompts": len(prompts), "responses": sum(len(r) for r in resp.texts)}


def _label(folder: Path, samples: Path, judge, seed: int, how: str) -> dict:
    """The gold judge labels every sample: K-wise rows (with the labeler's table when it is the rubric)
    for the reward model, split 90/10 for its held-out accuracy, and pairs for DPO (``how``: best vs worst
    of each prompt, or every untied pair)."""
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    rubric = getattr(judge, "spec", None) == judge_spec("rubric")
    if rubric:
        from .. import labeler
    ranked, pairs = [], []
    for row in rows:
        prompt, responses = row["prompt"], row["responses"]
        scores = judge([prompt] * len(responses), responses).tolist()
        if len(set(scores)) < 2 or len(set(responses)) < len(responses):
            continue  # all tied, or duplicate responses: nothing to learn from this prompt
        entry = {"prompt": prompt, "responses": responses, "scores": scores}
        if rubric:
            entry["rubric"] = [labeler.label(prompt, r) for r in responses]
        ranked.append(entry)
        pairs += make_pairs(prompt, responses, scores, how)
    if len(ranked) < 2:
        raise InputError(f"the judge tied every prompt's samples ({len(rows)} prompts); nothing to learn",
                         file=str(samples), field="judge")
    random.Random(seed).shuffle(ranked)
    n_held = max(1, int(len(ranked) * HELDOUT_FRACTION))
    write_jsonl(folder / "ranked_heldout.jsonl", ranked[:n_held])
    write_jsonl(folder / "ranked_train.jsonl", ranked[n_held:])
    write_jsonl(folder / "pairs.jsonl", pairs)
    return {"labelled_prompts": len(ranked), "skipped_prompts": len(rows) - len(ranked), "pairs": len(pairs),
            "heldout_prompts": n_held}


def _last_metrics(folder: Path) -> dict:
    """The last logged record of a training run, and the last one with eval/ keys merged in."""
    merged: dict = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        merged.update(json.loads(line))
    return merged


def _reward_model(folder: Path, start: str, data: Path, cfg: PipelineConfig, common: dict) -> dict:
    # the prompts rendered with the chat template, as the policy sees them (the judge reads this back from
    # the folder's config.yaml): the instruction-tuned backbone reads a templated request better
    train("rm", {**common, "model": start, "data": [str(data / "ranked_train.jsonl")], "chat_template_for_plain": True,
                 "eval_data": [str(data / "ranked_heldout.jsonl")], "output_dir": folder, "max_steps": cfg.rm_steps,
                 "batch_size": 4, "lr": cfg.rm_lr, "max_length": MAX_PROMPT_LENGTH + cfg.max_new_tokens + 8,
                 "log_every": 5, "warmup_ratio": 0.1})
    last = _last_metrics(folder)
    return {"heldout_accuracy": last.get("eval/accuracy"), "heldout_loss": last.get("eval/loss")}


def _method(folder: Path, method: str, start: str, out: Path, cfg: PipelineConfig, common: dict) -> dict:
    base = {**common, "model": start, "output_dir": folder, "chat_template_for_plain": True}
    if method in RL_METHODS:
        values = {**base, "data": [str(out / "sample" / "prompts.jsonl")], "reward_model": str(out / "rm"),
                  "max_steps": cfg.rl_steps, "lr": cfg.rl_lr, "max_new_tokens": cfg.max_new_tokens,
                  "temperature": cfg.temperature, "kl_coef": cfg.kl_coef, "log_every": 1}
        # PPO: 16 rollouts per step in two mini-batches of 8, one epoch, a separate value model. Tried on
        # the demo's data (200 held-out prompts): 20 steps of 8 left PPO under-trained (win rate 0.51; the
        # reward model scored its answers below DPO's); 16 steps of 16 won (0.615); a value head sharing
        # the policy's LoRA backbone (kl 0.05), or two epochs, ran PPO into 11-13-token answers and lost
        values.update({"batch_size": 16, "ppo_epochs": 1, "mini_batch_size": 8} if method == "ppo"
                      else {"batch_size": 2, "num_generations": 4})
    else:
        values = {**base, "data": [str(out / "data" / "pairs.jsonl")], "loss": method, "max_steps": cfg.dpo_steps,
                  "lr": cfg.dpo_lr, "batch_size": 4, "max_length": MAX_PROMPT_LENGTH + cfg.max_new_tokens + 8,
                  "log_every": 2}
        if method != "simpo":
            values["beta"] = cfg.beta
    train(method if method in RL_METHODS else "dpo", values)
    return {"model": str(folder), "last": _last_metrics(folder)}


def _evaluate(folder: Path, name: str, start: str, out: Path, tokenizer, prompts: list[PromptItem], judge,
              cfg: PipelineConfig) -> dict:
    """One model's held-out responses, judged; its win rate against the SFT start (whose responses are the
    ``eval/sft`` stage's). The same seed for every model: common random numbers, less noise in the comparison."""
    model_path = start if name == "sft" else str(out / name)
    model = load_causal_lm(model_path).eval()
    resp = generate(model, tokenizer, prompts, _sampling(cfg, 1, cfg.eval_temperature), seed=cfg.seed + 1,
                    precision=cfg.precision, progress=cfg.progress, desc=f"eval {name}")
    if name == "sft":
        ratio = [[0.0] for _ in prompts]
    else:
        reference = load_causal_lm(start).eval()
        k = min(KL_PROMPTS, len(prompts))  # fp32 forwards of two models: the costly part
        sub = Responses(resp.texts[:k], resp.ids[:k], resp.ended[:k])
        ratio = sequence_log_ratio(model, reference, prompts[:k], sub, tokenizer.pad_token_id, batch_size=20)
        del reference
    del model
    scores = judge_responses(judge, prompts, resp)
    tables = rubric_tables(prompts, resp) if judge_spec(cfg.judge) == judge_spec("rubric") else None
    kls = ratio + [None] * (len(prompts) - len(ratio))
    write_jsonl(folder / "responses.jsonl", [{"prompt": p.text, **row, "scores": s, "kl": k}
                                             for p, row, s, k in zip(prompts, resp.to_rows(), scores, kls)])
    if tables is not None:
        write_jsonl(folder / "labels.jsonl", [{"prompt": p.text, "labels": t} for p, t in zip(prompts, tables)])
    record = {"name": name, "model": model_path, **model_summary(resp, scores, ratio, tables)}
    if name != "sft":
        base = [json.loads(x)["scores"] for x in (out / "eval" / "sft" / "responses.jsonl").read_text().splitlines()]
        record.update(win_rate(scores, base).as_dict())
    return record

