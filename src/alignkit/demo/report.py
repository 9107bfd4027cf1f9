"""The pipeline's report: ``report.md`` (the results table, the reward model's accuracy, where the time
went, sample responses before/after) and PNG plots: win rate per method with its 95% interval, gold
score against KL to the SFT model, and training curves."""

from __future__ import annotations

import json
from pathlib import Path

SAMPLES_SHOWN = 3


def results_table(results: list[dict]) -> str:
    """Markdown: one row per model; the SFT start is the baseline of every win rate."""
    lines = ["| method | win rate vs SFT | 95% CI | W / T / L | beats SFT? | constraint ok | rubric 1-7 | gold score "
             "| KL to SFT | length |", "|" + "---|" * 10]
    for r in results:
        if "rate" in r:
            verdict = "**yes**" if r["ci_low"] > 0.5 else "worse" if r["ci_high"] < 0.5 else "not significant"
            win = (f"{r['rate']:.3f}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
                   f"{r['wins']} / {r['ties']} / {r['losses']}", verdict)
        else:
            win = ("(baseline)", "", "", "")
        opt = lambda key, fmt: format(r[key], fmt) if r.get(key) is not None else "-"  # noqa: E731
        lines.append(f"| {r['name']} | " + " | ".join(win) + f" | {opt('constraint_rate', '.2f')} | "
                     f"{opt('rubric_overall', '.2f')} | {opt('score', '.3f')} | {opt('kl', '.2f')} | "
                     f"{opt('length', '.1f')} |")
    return "\n".join(lines)


def _plots(out: Path, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    methods = [r for r in results if "rate" in r]
    made = []
    if methods:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = range(len(methods))
        rates = [r["rate"] for r in methods]
        err = [[r["rate"] - r["ci_low"] for r in methods], [r["ci_high"] - r["rate"] for r in methods]]
        ax.bar(x, rates, yerr=err, capsize=4, color=["tab:green" if r["ci_low"] > 0.5 else "tab:gray" for r in methods])
        ax.axhline(0.5, color="black", linewidth=1, linestyle="--")
        ax.set_xticks(list(x), [r["name"] for r in methods])
        ax.set_ylim(0, 1)
        ax.set_ylabel("win rate vs SFT (95% CI)")
        ax.set_title("Held-out win rate against the SFT start")
        fig.tight_layout()
        fig.savefig(out / "win_rate.png", dpi=120)
        plt.close(fig)
        made.append("win_rate.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in results:
        ax.scatter(r.get("kl", 0.0), r["score"], s=30)
        ax.annotate(r["name"], (r.get("kl", 0.0), r["score"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KL to the SFT model (nats per response)")
    ax.set_ylabel("gold judge score (mean)")
    ax.set_title("Gold score against KL")
    fig.tight_layout()
    fig.savefig(out / "gold_vs_kl.png", dpi=120)
    plt.close(fig)
    made.append("gold_vs_kl.png")

    curves = _curves(out, summary)
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
        for ax, (title, series) in zip(axes[0], curves.items()):
            for label, (xs, ys) in series.items():
                ax.plot(xs, ys, label=label, linewidth=1.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=120)
        plt.close(fig)
        made.append("curves.png")
    return made


def _series(path: Path, key: str) -> tuple[list, list]:
    xs, ys = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if key in rec and "step" in rec:
                xs.append(rec["step"])
                ys.append(rec[key])
    return xs, ys


def _curves(out: Path, summary: dict) -> dict[str, dict[str, tuple[list, list]]]:
    """{panel title: {line label: (steps, values)}} from each stage's metrics.jsonl."""
    methods = [r["name"] for r in summary["results"] if r["name"] != "sft"]
    panels = {"reward model: loss": {"train": _series(out / "rm" / "metrics.jsonl", "loss")}}
    rl = {m: _series(out / m / "metrics.jsonl", "reward/mean") for m in methods if m in ("ppo", "grpo")}
    if rl:
        panels["RLHF: reward-model score"] = rl
        panels["RLHF: KL to SFT"] = {m: _series(out / m / "metrics.jsonl", "kl") for m in rl}
    dpo = {m: _series(out / m / "metrics.jsonl", "loss") for m in methods if m not in ("ppo", "grpo")}
    if dpo:
        panels["DPO family: loss"] = dpo
    return {t: {k: v for k, v in s.items() if v[0]} for t, s in panels.items() if any(v[0] for v in s.values())}


def _samples(out: Path, summary: dict) -> list[str]:
    names = [r["name"] for r in summary["results"]]
    texts = {}
    for name in names:
        path = out / "eval" / name / "responses.jsonl"
        texts[name] = [json.loads(x) for x in path.read_text().splitlines()[:SAMPLES_SHOWN]] if path.exists() else []
    lines = []
    for i, row in enumerate(texts.get("sft", [])):
        lines += [f"### Prompt {i + 1}", "", "> " + row["prompt"].replace("\n", "\n> "), ""]
        for name in names:
            if i < len(texts[name]):
                r = texts[name][i]
                body = r["texts"][0].replace("```", "'''")
                lines += [f"**{name}** (judge score {r['scores'][0]:.2f}):", "", "```text", body, "```", ""]
    return lines


def write_report(out: Path, summary: dict) -> Path:
    """report.md and the plots in ``out``; prints the results table."""
    table = results_table(summary["results"])
    plots = _plots(out, summary)
    rm, data = summary["rm"], summary["data"]
    acc = rm.get("heldout_accuracy")
    verdicts = []
    for r in summary["results"]:
        if "rate" in r:
            ok = r["ci_low"] > 0.5
            verdicts.append(f"- **{r['name']}** {'beats' if ok else 'does not beat'} the SFT start: win rate "
                            f"{r['rate']:.3f}, 95% CI [{r['ci_low']:.3f}, {r['ci_high']:.3f}] over {r['n']} "
                            f"held-out prompts" + ("" if ok else " (the interval does not lie above 50%)"))
    timing = ["| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in summary["stage_seconds"].items()]
    timing.append(f"| **total** | {sum(summary['stage_seconds'].values()):.0f} |")
    lines = [
        f"# alignkit {'demo --quick' if summary['quick'] else 'demo'}: {summary['model']}", "",
        f"Judge: `{summary['judge']}`. {summary['train_prompts']} training prompts (sampled, labelled), "
        f"{summary['eval_prompts']} held-out prompts. Win rates count ties half; the interval is Wilson's.", "",
        "## Results", "", table, "", *verdicts, "",
        "## Reward model", "",
        f"{data['labelled_prompts']} labelled prompts ({data['skipped_prompts']} skipped: all samples tied), "
        f"{data['pairs']} preference pairs. Held-out pairwise accuracy against the judge's ranking: "
        + (f"**{acc:.3f}**" if acc is not None else "n/a") + f" on {data['heldout_prompts']} prompts.", "",
        "## Plots", "", *[f"![{p}]({p})" for p in plots], "",
        "## Where the time went", "", *timing, "",
        "## Sample responses (held-out prompts)", "", *_samples(out, summary),
    ]
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(table)
    print("\n".join(verdicts))
    print(f"report: {path}")
    return path
