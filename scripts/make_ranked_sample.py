#!/usr/bin/env python
"""Generate ``src/alignkit/sample_data/ranked.jsonl``: K-wise reward-model data (deterministic).

Derived from the first 60 rows of ``prefs.jsonl`` (see ``make_sample_data.py``): each prompt gets
K = 3 responses, in a shuffled order: its ``chosen`` answer (accurate, follows the instruction), its
``rejected`` answer (breaks the instruction or is unhelpful) and an evasive non-answer. Rows cycle
through the three label forms that ``alignkit rm`` reads, so the file shows each of them:

* ``ranks``  (1 = best): chosen 1, rejected 2, evasive 3;
* ``scores`` (higher = better): 6, 3, 1;
* ``rubric`` (the labeler's table): chosen {overall 6, satisfies_constraint}, rejected {overall 4,
  fails_to_follow_instruction}, evasive {overall 2, fails_to_follow_instruction}; under the default
  rubric rule these score 7, 2 and 0.

Run: ``python scripts/make_ranked_sample.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "src" / "alignkit" / "sample_data"
EVASIVE = ["I am not sure about that.", "That is a good question. It depends on many things.",
           "I would rather not say.", "Please look it up in a book."]
LABELS = {
    "ranks": (1, 2, 3),
    "scores": (6, 3, 1),
    "rubric": ({"overall": 6, "satisfies_constraint": True}, {"overall": 4, "fails_to_follow_instruction": True},
               {"overall": 2, "fails_to_follow_instruction": True}),
}


def main() -> None:
    rng = random.Random(7)
    prefs = [json.loads(x) for x in (DATA / "prefs.jsonl").read_text().splitlines()[:60]]
    out = []
    for n, row in enumerate(prefs):
        kind = ("ranks", "scores", "rubric")[n % 3]
        responses = [row["chosen"], row["rejected"], rng.choice(EVASIVE)]
        order = rng.sample(range(3), 3)
        out.append({"prompt": row["prompt"], "responses": [responses[i] for i in order],
                    kind: [LABELS[kind][i] for i in order]})
    (DATA / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))


if __name__ == "__main__":
    main()
