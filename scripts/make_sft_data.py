#!/usr/bin/env python
"""Generate alignkit's shipped sample SFT demonstrations (deterministic: ``random.Random(SEED)``).

The rows come from the same hand-written fact tables and verifiable instructions as the
preference data (``scripts/make_sample_data.py``): each prompt asks a simple question plus one
instruction, and the demonstration is the answer that is accurate AND follows it (the
preference data's ``chosen``; the same checker functions verify every row).

Files (in ``src/alignkit/sample_data/``):

* ``sft.jsonl``       150 prompt/completion rows (strings), train split.
* ``sft_eval.jsonl``   40 rows about facts/topics never used in training.
* ``sft_chat.jsonl``   30 conversations (``messages``): some with a system turn, some with an
                       earlier exchange, so every assistant turn is a demonstration.

Run: ``python scripts/make_sft_data.py`` (rewrites the three files; the preference files are untouched).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_sample_data as prefs  # noqa: E402

SEED = 20240612


def demonstrations(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]


def conversations(rng: random.Random, facts, n: int) -> list[dict]:
    """A system turn in a third of the rows, an earlier question and answer in another third."""
    rows = []
    for i, fact in enumerate(rng.sample(facts, n)):
        row = prefs.fact_row(rng, fact, rng.choice(prefs.MAKERS))
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["chosen"]}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a careful assistant who follows "
                                "formatting instructions exactly."})
        elif i % 3 == 1:
            q2, short2, _ = rng.choice([f for f in facts if f is not fact])
            messages = [{"role": "user", "content": q2}, {"role": "assistant", "content": short2}, *messages]
        rows.append({"messages": messages})
    return rows


def write(name: str, rows: list[dict]) -> None:
    with open(prefs.OUT / name, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):4d} rows to {prefs.OUT / name}")


def main() -> None:
    rng = random.Random(SEED)
    train_facts, eval_facts = prefs.FACTS[:-prefs.N_EVAL_FACTS], prefs.FACTS[-prefs.N_EVAL_FACTS:]
    train_lists, eval_lists = prefs.LISTS[:-prefs.N_EVAL_LISTS], prefs.LISTS[-prefs.N_EVAL_LISTS:]
    train = prefs.standard_rows(rng, train_facts, train_lists, 150)
    evals = prefs.standard_rows(rng, eval_facts, eval_lists, 40)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    write("sft.jsonl", demonstrations(train))
    write("sft_eval.jsonl", demonstrations(evals))
    write("sft_chat.jsonl", conversations(rng, train_facts, 30))


if __name__ == "__main__":
    main()
