"""Online preference methods: sample from the policy, judge, and turn the judgements into training data.

* ``alignkit generate``: N responses per prompt -> ``{"prompt", "responses": [N]}`` rows (what labelers,
  ``alignkit score`` and ``alignkit rm`` read).
* ``alignkit best-of-n`` (rejection sampling): N responses per prompt, keep the judge's best ->
  ``{"prompt", "completion", "score"}`` rows, an SFT dataset (``alignkit sft --data``).
* ``alignkit rso`` (Liu et al. 2023, statistical rejection sampling): N responses from π_sft, accept
  ``--num-accept`` of them so they follow π_r ∝ π_sft·exp(r/β) (``rl.rso_sample``), and pair the
  accepted ones by their reward (all pairs, higher = chosen) -> ``{"prompt", "chosen", "rejected"}``
  rows for ``alignkit dpo --loss hinge`` (RSO's loss) or any DPO loss.
* ``alignkit online-dpo`` (iterative / online DPO): per round, K responses per prompt from the
  current policy, ranked by the judge, paired (best vs worst, or every untied pair), and a DPO run
  (any loss of the family) on the round's pairs; the reference is the round's starting policy or the
  initial model. Each round lives in ``rounds/round-N/``; the final policy is copied to the root.

Sampling uses the rollout layer (``rollout.sample``, KV cache); prompts are any rows with a
``prompt``. Outputs are written to a temporary file and renamed, so they are never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .. import rl
from ..config import DataConfig, DPOConfig, GenerateConfig, ModelConfig, OnlineDPOConfig, SamplingConfig, TrainConfig
from ..data.prompts import PromptItem, load_prompts
from ..errors import InputError
from ..models import load_causal_lm, load_tokenizer
from ..rollout.judges import load_judge
from ..rollout.sample import sample_prompts


# ----------------------------------------------------------------------------- sampling and judging

def judge_all(judge, prompts: list[PromptItem], responses: list[list[str]]) -> list[list[float]]:
    flat_p = [p.text for p, rs in zip(prompts, responses) for _ in rs]
    flat_r = [r for rs in responses for r in rs]
    scores = judge(flat_p, flat_r).tolist() if flat_r else []
    out, i = [], 0
    for rs in responses:
        out.append(scores[i:i + len(rs)])
        i += len(rs)
    return out


def make_pairs(prompt: str, responses: list[str], scores: list[float], how: str) -> list[dict]:
    """Preference pairs from one prompt's judged responses: best vs worst, or every untied pair (higher = chosen).
    Identical responses and ties give no pair."""
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    candidates = [(order[0], order[-1])] if how == "best-worst" else \
        [(i, j) for a, i in enumerate(order) for j in order[a + 1:]]
    return [{"prompt": prompt, "chosen": responses[i], "rejected": responses[j], "score_chosen": scores[i],
             "score_rejected": scores[j]}
            for i, j in candidates if scores[i] > scores[j] and responses[i] != responses[j]]


def write_jsonl(path: Path, rows: list[dict], overwrite: bool = True) -> Path:
    """Atomically: a temporary file in the same folder, then one rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError("exists; pass --overwrite to replace it", file=str(path), field="output")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- generate / best-of-n / rso

def _prepare(cfg: GenerateConfig, needs_judge: bool):
    if cfg.output.exists() and not cfg.overwrite:
        raise InputError("exists; pass --overwrite to replace it", file=str(cfg.output), field="output")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prompts, report = load_prompts(cfg.data, tokenizer, max_prompt_length=cfg.max_prompt_length,
                                   chat_template_for_plain=cfg.chat_template_for_plain, skip_invalid=cfg.skip_invalid)
    print(f"prompts: {report.summary()}")
    judge = None
    if needs_judge:
        if not cfg.reward_model:
            raise InputError("required: a reward-model folder or 'module:function'", file="command line",
                             field="reward_model")
        judge = load_judge(cfg.reward_model, tokenizer=tokenizer)
    model = load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code).eval()
    torch.manual_seed(cfg.seed)
    return tokenizer, prompts, judge, model


def run_generate(cfg: GenerateConfig, sampling: SamplingConfig, mode: str = "generate") -> Path:
    """`alignkit generate`, `alignkit best-of-n` and `alignkit rso` (``mode``). Returns the output path."""
    tokenizer, prompts, judge, model = _prepare(cfg, needs_judge=mode != "generate")
    if mode == "rso" and sampling.num_responses < cfg.num_accept:
        raise InputError(f"rso samples --num-responses {sampling.num_responses} per prompt but is asked to accept "
                         f"--num-accept {cfg.num_accept}", field="num_responses")
    responses = sample_prompts(model, tokenizer, prompts, sampling, precision=cfg.precision,
                               progress=cfg.progress).texts
    if mode == "generate":
        rows = [{"prompt": p.text, "responses": rs} for p, rs in zip(prompts, responses)]
        return write_jsonl(cfg.output, rows)
    scores = judge_all(judge, prompts, responses)
    rows = []
    gen = torch.Generator().manual_seed(cfg.seed)
    for p, rs, sc in zip(prompts, responses, scores):
        if mode == "best-of-n":
            best = int(rl.best_of_n(torch.tensor(sc), len(sc))[0])
            rows.append({"prompt": p.text, "completion": rs[best], "score": sc[best], "num_candidates": len(rs)})
        else:  # rso: accepted samples follow π_sft·exp(r/β); pair them by reward
            keep = rl.rso_sample(torch.tensor(sc), cfg.rso_beta, cfg.num_accept, gen).tolist()
            rows += make_pairs(p.text, [rs[i] for i in keep], [sc[i] for i in keep], "all")
    if not rows:
        raise InputError("the judge scored every sample the same, so no pairs could be made", field="reward_model")
    return write_jsonl(cfg.output, rows)


# ----------------------------------------------------------------------------- online / iterative DPO

_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "adapter_config.json",
                "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "special_tokens_map.json", "README.md")


def promote(src: Path, dst: Path) -> None:
    """Copy a round's final model files to the run's root (the adapter folder too, if any)."""
    for name in _MODEL_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    if (src / "adapter").is_dir():
        shutil.copytree(src / "adapter", dst / "adapter", dirs_exist_ok=True)


def run_online_dpo(model: ModelConfig, data: DataConfig, train_cfg: TrainConfig, dpo: DPOConfig,
                   sampling: SamplingConfig, online: OnlineDPOConfig) -> Path:
    """`alignkit online-dpo`: ``online.rounds`` of sample -> rank with the judge -> DPO. Returns the output folder."""
    from .dpo import resolve_dpo, run_dpo

    dpo = resolve_dpo(dpo)
    out, tokenizer, prompts, judge = _start_rounds(
        model, data, train_cfg, online.reward_model,
        {"model": model, "data": data, "train": train_cfg, "dpo": dpo, "sampling": sampling, "online": online})
    current = model.model
    for r in range(1, online.rounds + 1):
        round_dir = out / "rounds" / f"round-{r}"
        if (round_dir / "round_done.json").exists() and train_cfg.resume:
            current = str(round_dir / "dpo")
            print(f"round {r}: done earlier, skipped")
            continue
        round_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(train_cfg.seed + r)
        policy = load_causal_lm(current, trust_remote_code=model.trust_remote_code).eval()
        responses = sample_prompts(policy, tokenizer, prompts, sampling, precision=model.precision,
                                   progress=train_cfg.progress, desc=f"round {r}: sample").texts
        del policy
        scores = judge_all(judge, prompts, responses)
        write_jsonl(round_dir / "samples.jsonl", [{"prompt": p.text, "responses": rs, "scores": sc}
                                                  for p, rs, sc in zip(prompts, responses, scores)])
        pairs = [row for p, rs, sc in zip(prompts, responses, scores) for row in make_pairs(p.text, rs, sc, online.pairs)]
        if not pairs:
            raise InputError(f"round {r}: the judge scored every prompt's samples the same; no pairs to train on",
                             field="reward_model")
        write_jsonl(round_dir / "pairs.jsonl", pairs)
        mean = sum(sum(sc) for sc in scores) / sum(len(sc) for sc in scores)
        print(f"round {r}: {len(pairs)} pairs from {len(prompts)} prompts; mean judge score of the samples {mean:.4f}")
        round_model = model.model_copy(update={"model": current})
        round_dpo = dpo.model_copy(update={"ref_model": None if online.reference == "round" else model.model})
        round_data = data.model_copy(update={"data": [str(round_dir / "pairs.jsonl")], "eval_data": None})
        round_train = train_cfg.model_copy(update={"output_dir": round_dir / "dpo", "resume": train_cfg.resume,
                                                   "overwrite": True})
        run_dpo(round_model, round_data, round_train, round_dpo)
        _round_done(out, round_dir, {"round": r, "pairs": len(pairs), "reward/mean": mean})
        current = str(round_dir / "dpo")
    promote(Path(current), out)
    return out


def _start_rounds(model: ModelConfig, data: DataConfig, train_cfg: TrainConfig, judge_spec: str, sections: dict):
    """What every round-based run does first: refuse to clobber a finished run, load and check every
    prompt and the judge before writing anything, then write config.yaml. Returns (out, tokenizer, prompts, judge)."""
    from ..config import dump_config

    out = Path(train_cfg.output_dir)
    if (out / "config.yaml").exists() and not (train_cfg.resume or train_cfg.overwrite):
        raise InputError("the output folder already holds a run; pass --resume to continue it, --overwrite to "
                         "replace it, or choose another folder", file=str(out), field="output_dir")
    tokenizer = load_tokenizer(model.model, trust_remote_code=model.trust_remote_code)
    prompts, report = load_prompts(data.data, tokenizer, max_prompt_length=data.max_prompt_length,
                                   chat_template_for_plain=data.chat_template_for_plain, skip_invalid=data.skip_invalid)
    print(f"prompts: {report.summary()}")
    judge = load_judge(judge_spec, tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    _start_round_log(out, resume=train_cfg.resume)
    dump_config(sections, out / "config.yaml")
    return out, tokenizer, prompts, judge


def _start_round_log(out: Path, resume: bool) -> None:
    """The run's metrics.jsonl holds one line per finished round. A new run (or --overwrite) starts it
    empty and drops an earlier run's rounds; --resume keeps the lines of rounds whose marker was
    written (a crash between the line and the marker would otherwise log that round twice)."""
    metrics = out / "metrics.jsonl"
    if not resume:
        shutil.rmtree(out / "rounds", ignore_errors=True)
        metrics.write_text("")
        return
    done = {json.loads(p.read_text())["round"] for p in (out / "rounds").glob("round-*/round_done.json")}
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    kept = {row["round"]: row for row in map(json.loads, filter(str.strip, lines)) if row.get("round") in done}
    metrics.write_text("".join(json.dumps(kept[r]) + "\n" for r in sorted(kept)))


def _round_done(out: Path, round_dir: Path, record: dict) -> None:
    """Mark a round complete (a rerun with --resume skips it) and log it to the run's metrics.jsonl
    (its "step" is the round)."""
    record = {"step": record["round"], **record}
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    (round_dir / "round_done.json").write_text(json.dumps(record))


# ----------------------------------------------------------------------------- iterated RLHF

def run_iterated_rlhf(model: ModelConfig, data: DataConfig, train_cfg: TrainConfig, rollout, ppo, iterate) -> Path:
    """`alignkit iterated-rlhf`: ``iterate.rounds`` of sample K from the current policy -> label with the
    labeler -> retrain the reward model on ALL labels so far (from the initial backbone) -> PPO from the
    current policy against the new reward model (InstructGPT's steps 2 and 3, iterated)."""
    from ..config import RMConfig, SamplingConfig
    from .ppo import run_ppo
    from .reward import run_rm

    out, tokenizer, prompts, labeler = _start_rounds(
        model, data, train_cfg, iterate.labeler,
        {"model": model, "data": data, "train": train_cfg, "rollout": rollout, "ppo": ppo, "iterate": iterate})
    sampling = SamplingConfig(num_responses=iterate.num_responses, max_new_tokens=rollout.max_new_tokens,
                              temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k)
    labels: list[dict] = []
    current = model.model
    for r in range(1, iterate.rounds + 1):
        round_dir = out / "rounds" / f"round-{r}"
        if (round_dir / "round_done.json").exists() and train_cfg.resume:
            labels += [json.loads(x) for x in (round_dir / "labels.jsonl").read_text().splitlines()]
            current = str(round_dir / "ppo")
            print(f"round {r}: done earlier, skipped")
            continue
        round_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(train_cfg.seed + r)
        policy = load_causal_lm(current, trust_remote_code=model.trust_remote_code).eval()
        responses = sample_prompts(policy, tokenizer, prompts, sampling, precision=model.precision,
                                   progress=train_cfg.progress, desc=f"round {r}: sample").texts
        del policy
        scores = judge_all(labeler, prompts, responses)
        new = [{"prompt": p.text, "responses": rs, "scores": sc} for p, rs, sc in zip(prompts, responses, scores)
               if len(set(sc)) > 1 and len(set(rs)) == len(rs)]  # all tied or duplicate responses: nothing to learn
        if not new:
            raise InputError(f"round {r}: the labeler scored every prompt's samples the same", field="labeler")
        write_jsonl(round_dir / "labels.jsonl", new)
        labels += new
        write_jsonl(out / "labels.jsonl", labels)
        mean = sum(sum(sc) for sc in scores) / sum(len(sc) for sc in scores)
        print(f"round {r}: labeler's mean score of the current policy's samples {mean:.4f}; "
              f"{len(labels)} labelled prompts so far")
        rm_model = model.model_copy(update={"lora_r": 0, "merge": False})
        rm_data = data.model_copy(update={"data": [str(out / "labels.jsonl")], "eval_data": None})
        rm_train = train_cfg.model_copy(update={"output_dir": round_dir / "rm", "max_steps": iterate.rm_steps,
                                                "lr": iterate.rm_lr, "batch_size": iterate.rm_batch_size,
                                                "grad_accum": 1, "overwrite": True, "resume": train_cfg.resume,
                                                "save_every": 0})
        run_rm(rm_model, rm_data, rm_train, RMConfig())
        run_ppo(model.model_copy(update={"model": current}), data,
                train_cfg.model_copy(update={"output_dir": round_dir / "ppo", "overwrite": True}),
                rollout.model_copy(update={"reward_model": str(round_dir / "rm")}), ppo)
        _round_done(out, round_dir, {"round": r, "reward/mean": mean, "labelled_prompts": len(labels)})
        current = str(round_dir / "ppo")
    promote(Path(current), out)
    return out
