"""How often does a model satisfy each constraint kind? Samples with `alignkit generate`, judges with the labeler.

    python scripts/probe_constraints.py                       # 40 train prompts x 4 samples, embedded model
    python scripts/probe_constraints.py --responses out.jsonl # re-score an existing `alignkit generate` output

Prints, per constraint kind, the fraction of sampled responses that satisfy it (each constraint of a
prompt counted on its own), then the labeler's flag rates, the mean Likert score, and the fraction
of prompts whose K samples are not all tied under the rubric (the ones a ranking can learn from).
The prompts are picked round-robin over the first constraint's kind, so every kind is probed.

Measured here (SmolLM2-135M-Instruct, chat template, temperature 0.8, K = 4, 2 x 40 train
prompts: one run with --max-new-tokens 64, one with 48; fraction of responses satisfying each kind):

    avoid_word 0.25 (of 40)   end_phrase 0.06 (36)   include_keyword 0.56 (36)   list_items 0.47 (32)
    lowercase 0.04 (48)       max_sentences 0.69 (16, the current ranges)        max_words 0.42 (36)
    no_commas 0.40 (48)       start_word 0.44 (36)   uppercase 0.03 (40)

Labeler over the 640 samples: overall 3.5 of 7, fails_to_follow 0.28, hallucination 0.12,
satisfies_constraint 0.28; 68 of 80 prompts have samples that are not all tied.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from alignkit import labeler
from alignkit.tasks import parse_constraints

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "src/alignkit/sample_data/constraints_train.jsonl"


def pick(rows: list[dict], n: int) -> list[dict]:
    """``n`` rows, round-robin over the kind of each row's first constraint (file order within a kind)."""
    by_kind: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        by_kind[r["constraints"][0]["kind"]].append(r)
    queues = [list(v) for _, v in sorted(by_kind.items())]
    out: list[dict] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def generate(rows: list[dict], args, out: Path) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.writelines(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows)
    cmd = [sys.executable, "-m", "alignkit.cli", "generate", "--model", args.model, "--data", f.name,
           "--output", str(out), "--num-responses", str(args.num_responses), "--max-new-tokens",
           str(args.max_new_tokens), "--temperature", str(args.temperature), "--seed", str(args.seed),
           "--overwrite", "--chat-template-for-plain" if args.chat_template else "--no-chat-template-for-plain"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def report(samples: list[dict]) -> None:
    kind_hits: dict[str, list[bool]] = collections.defaultdict(list)
    flags: dict[str, list[float]] = collections.defaultdict(list)
    untied = 0
    for row in samples:
        prompt, responses = row["prompt"], row["responses"]
        for r in responses:
            for c in parse_constraints(prompt):
                kind_hits[c.kind].append(c.check(r))
            for name, value in labeler.label(prompt, r).items():
                flags[name].append(float(value))
        untied += len(set(labeler.rank(prompt, responses))) > 1
    print(f"\n{'constraint kind':<18}{'satisfied':>10}{'of':>6}")
    for kind, hits in sorted(kind_hits.items()):
        print(f"{kind:<18}{sum(hits) / len(hits):>10.2f}{len(hits):>6}")
    print(f"\n{'labeler field':<38}{'mean':>6}")
    for name, values in flags.items():
        print(f"{name:<38}{sum(values) / len(values):>6.2f}")
    print(f"\nprompts whose samples are not all tied: {untied}/{len(samples)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--n", type=int, default=40, help="prompts to probe")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--num-responses", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="render the prompts as a user turn with the chat template (default: on)")
    p.add_argument("--output", default="probe_samples.jsonl", help="where `alignkit generate` writes")
    p.add_argument("--responses", help="score this existing generate output instead of sampling")
    p.add_argument("--examples", type=int, default=0, help="print this many samples with their labels")
    args = p.parse_args()

    if args.responses:
        path = Path(args.responses)
    else:
        rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
        path = Path(args.output)
        generate(pick(rows, args.n), args, path)
    samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in samples[:args.examples]:
        for r in row["responses"][:2]:
            print(f"\n# {row['prompt']}\n{r}\n-> {labeler.assess(row['prompt'], r)}")
    report(samples)


if __name__ == "__main__":
    main()
