"""`alignkit eval`: model A's responses against model B's on a prompt set, judged; the win rate with its interval.

Steps: sample ``num_responses`` responses per prompt from A and from B (same prompts, same sampling
settings, each model with its own seeded generator) -> judge every response -> per prompt, A's i-th
response against B's i-th (``stats.win_rate``) -> the table, ``judgements.jsonl`` (one row per prompt)
and ``summary.json`` in ``--output-dir``.

Besides the win rate, per model: the judge's mean score, the mean response length (tokens), the rate of
responses that ended with EOS, and the mean sequence log-ratio Σ_t [log π(y_t) − log π_ref(y_t)] of its
own responses against ``--reference`` (default: B). That log-ratio is the usual Monte-Carlo estimate of
KL(π ‖ π_ref) when responses are sampled at temperature 1; at other temperatures it is the same quantity
on the tempered samples. With the rubric labeler as the judge (``--judge rubric``), each response's
table of labels is kept too and the constraint-satisfaction rate is reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import EvalConfig, SamplingConfig
from ..data.prompts import PromptItem, load_prompts
from ..errors import InputError
from ..models import load_causal_lm, load_tokenizer
from ..ops.logprobs import token_logprobs
from ..rollout.judges import load_judge
from ..rollout.sample import Responses, sample_prompts
from .stats import win_rate

RUBRIC = "alignkit.labeler:reward"


def judge_spec(spec: str) -> str:
    """``rubric`` is the rubric labeler (``alignkit.labeler``); anything else is a judge as for ppo."""
    return RUBRIC if spec == "rubric" else spec


def generate(model, tokenizer, prompts: list[PromptItem], sampling: SamplingConfig, *, seed: int,
             precision: str = "fp32", progress: bool = True, desc: str = "sample") -> Responses:
    """``sampling.num_responses`` responses per prompt from a generator seeded with ``seed`` (each model
    compared gets its own, so A's and B's draws do not depend on each other)."""
    from ..memory import for_precision

    for_precision(precision)  # autocast casts every weight each forward: reuse freed blocks (alignkit.memory)
    return sample_prompts(model, tokenizer, prompts, sampling, generator=torch.Generator().manual_seed(seed),
                          precision=precision, progress=progress, desc=desc)


@torch.no_grad()
def sequence_log_ratio(policy, reference, prompts: list[PromptItem], responses: Responses, pad_token_id: int,
                       batch_size: int = 16) -> list[list[float]]:
    """Σ_t [log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)] of each response (temperature 1), per prompt."""
    flat = [(p.ids, r) for p, rs in zip(prompts, responses.ids) for r in rs]
    out: list[float] = []
    for s in range(0, len(flat), batch_size):
        chunk = flat[s:s + batch_size]
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)   # (b, L) right-padded
        mask = torch.zeros_like(ids)
        resp = torch.zeros_like(ids, dtype=torch.bool)                            # True on response tokens
        for row, (p, r) in enumerate(chunk):
            ids[row, :len(p) + len(r)] = torch.tensor(p + r)
            mask[row, :len(p) + len(r)] = 1
            resp[row, len(p):len(p) + len(r)] = True
        diff = token_logprobs(policy, ids, mask, resp) - token_logprobs(reference, ids, mask, resp)  # (b, L)
        out += diff.sum(-1).tolist()
    per_prompt, i = [], 0
    for rs in responses.ids:
        per_prompt.append(out[i:i + len(rs)])
        i += len(rs)
    return per_prompt


def judge_responses(judge, prompts: list[PromptItem], responses: Responses) -> list[list[float]]:
    """The judge's score of every response, per prompt (``train.online.judge_all`` on the texts)."""
    from ..train.online import judge_all

    return judge_all(judge, prompts, responses.texts)


def rubric_tables(prompts: list[PromptItem], responses: Responses) -> list[list[dict]]:
    from .. import labeler

    return [[labeler.label(p.text, r) for r in rs] for p, rs in zip(prompts, responses.texts)]


def model_summary(responses: Responses, scores: list[list[float]], log_ratio: list[list[float]] | None,
                  tables: list[list[dict]] | None) -> dict:
    """Means over every response of one model."""
    flat = lambda xs: [x for row in xs for x in row]  # noqa: E731
    n = max(1, len(flat(responses.texts)))
    out = {"score": sum(flat(scores)) / n,
           "length": sum(len(r) for r in flat(responses.ids)) / n,
           "eos_rate": sum(flat(responses.ended)) / n}
    if log_ratio is not None:  # may cover only the first prompts (a cheaper estimate)
        out["kl"] = sum(flat(log_ratio)) / max(1, len(flat(log_ratio)))
    if tables is not None:
        out["constraint_rate"] = sum(t["satisfies_constraint"] for t in flat(tables)) / n
        out["rubric_overall"] = sum(t["overall"] for t in flat(tables)) / n
    return out


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def format_table(rows: list[dict]) -> str:
    """A Markdown table: one row per compared model."""
    head = "| model | win rate vs baseline | 95% CI | W / T / L | judge score | constraint ok | KL | length |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        opt = lambda key, fmt: format(r[key], fmt) if r.get(key) is not None else "–"  # noqa: E731
        win = f"{r['rate']:.3f}" if "rate" in r else "–"
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if "rate" in r else "–"
        wtl = f"{r['wins']} / {r['ties']} / {r['losses']}" if "rate" in r else "–"
        lines.append(f"| {r['name']} | {win} | {ci} | {wtl} | {opt('score', '.3f')} | {opt('constraint_rate', '.2f')} "
                     f"| {opt('kl', '.2f')} | {opt('length', '.1f')} |")
    return "\n".join(lines)


def run_eval(cfg: EvalConfig, sampling: SamplingConfig) -> Path:
    """`alignkit eval`. Returns the output folder."""
    out = Path(cfg.output_dir)
    if (out / "summary.json").exists() and not cfg.overwrite:
        raise InputError("holds an evaluation already; pass --overwrite to replace it", file=str(out),
                         field="output_dir")
    tokenizer = load_tokenizer(cfg.baseline, trust_remote_code=cfg.trust_remote_code)
    prompts, report = load_prompts(cfg.data, tokenizer, max_prompt_length=cfg.max_prompt_length,
                                   chat_template_for_plain=cfg.chat_template_for_plain, skip_invalid=cfg.skip_invalid)
    if cfg.max_prompts:
        prompts = prompts[:cfg.max_prompts]
    print(f"prompts: {report.summary()}")
    spec = judge_spec(cfg.judge)
    judge = load_judge(spec, tokenizer=tokenizer)
    tables_wanted = spec == RUBRIC
    reference = load_causal_lm(cfg.reference or cfg.baseline, trust_remote_code=cfg.trust_remote_code).eval()
    results = {}
    for name, path in (("model", cfg.model), ("baseline", cfg.baseline)):
        model = load_causal_lm(path, trust_remote_code=cfg.trust_remote_code).eval()
        resp = generate(model, tokenizer, prompts, sampling, seed=cfg.seed, precision=cfg.precision,
                        progress=cfg.progress, desc=f"sample {name}")
        ratio = sequence_log_ratio(model, reference, prompts, resp, tokenizer.pad_token_id)
        del model
        scores = judge_responses(judge, prompts, resp)
        tables = rubric_tables(prompts, resp) if tables_wanted else None
        results[name] = (resp, scores, ratio, tables)
    return write_eval(out, cfg, prompts, results)


def write_eval(out: Path, cfg: EvalConfig, prompts: list[PromptItem], results: dict) -> Path:
    (resp_a, sc_a, kl_a, tab_a), (resp_b, sc_b, kl_b, tab_b) = results["model"], results["baseline"]
    wr = win_rate(sc_a, sc_b)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, p in enumerate(prompts):
        row = {"prompt": p.text, "responses_model": resp_a.texts[i], "responses_baseline": resp_b.texts[i],
               "scores_model": sc_a[i], "scores_baseline": sc_b[i]}
        if tab_a is not None:
            row["labels_model"], row["labels_baseline"] = tab_a[i], tab_b[i]
        rows.append(row)
    from ..train.online import write_jsonl

    write_jsonl(out / "judgements.jsonl", rows)
    summary = {"model": cfg.model, "baseline": cfg.baseline, "judge": cfg.judge, "prompts": len(prompts),
               "win_rate": wr.as_dict(), "model_stats": model_summary(resp_a, sc_a, kl_a, tab_a),
               "baseline_stats": model_summary(resp_b, sc_b, kl_b, tab_b)}
    write_json_atomic(out / "summary.json", summary)
    table = format_table([{"name": f"model ({cfg.model})", **wr.as_dict(), **summary["model_stats"]},
                          {"name": f"baseline ({cfg.baseline})", **summary["baseline_stats"]}])
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    verdict = "beats" if wr.significant else "loses to" if wr.ci_high < 0.5 else "is not distinguishable from"
    print(f"model {verdict} baseline: win rate {wr.rate:.3f}, 95% CI [{wr.ci_low:.3f}, {wr.ci_high:.3f}] "
          f"over {wr.n} prompts (ties counted half)")
    return out
