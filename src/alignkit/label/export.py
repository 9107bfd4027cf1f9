"""Labels -> K-wise rows for ``alignkit rm`` (``data/ranking.py``), one row per (task, labeler).

    {"prompt": P, "responses": [K, the input file's order], "ranks": [K], "rank_source": "labeler",
     "rubric": [K objects] (when scored), "labeler": "ana", "labeled_at": "2025-...Z", "note": "",
     "task_id": 3, "source": "to_label.jsonl:3"}

``ranks`` are the labeler's places (1 = best; equal places are ties, kept as ties). A labeler who
scored without ranking gets ranks from the rubric rule of ``alignkit.rubric`` (``--rubric-weights``;
equal scores tie) and ``"rank_source": "rubric"``, so the file says which order a person gave. Rows
whose responses are all tied carry no comparison and are left out (the loader would refuse them).
The file is written to a temporary name and renamed: a reader never sees half an export.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import InputError
from ..rubric import rubric_score
from .store import Store


def rubric_ranks(rubric: list[dict], weights: dict[str, float]) -> list[int]:
    """Competition ranks from rubric scores: 1 + the number of responses scored strictly higher."""
    scores = [rubric_score(r, weights) for r in rubric]
    return [1 + sum(other > s for other in scores) for s in scores]


def effective_ranks(label: dict, weights: dict[str, float]) -> tuple[list[int], str]:
    """(ranks, where they came from): the labeler's own, else the rubric rule's."""
    if label.get("ranks"):
        return list(label["ranks"]), "labeler"
    return rubric_ranks(label["rubric"], weights), "rubric"


def export_rows(store: Store, weights: dict[str, float]) -> tuple[list[dict], int]:
    """(rows to write, number of labels left out because all their responses tie)."""
    rows, all_tied = [], 0
    for label in store.current_labels():
        ranks, source = effective_ranks(label, weights)
        if len(set(ranks)) == 1:
            all_tied += 1
            continue
        row = {"prompt": label["prompt"], "responses": label["responses"], "ranks": ranks, "rank_source": source}
        if label.get("rubric"):
            row["rubric"] = label["rubric"]
        row.update(labeler=label["labeler"], labeled_at=label["created_at"], note=label["note"],
                   task_id=label["task_id"], source=label["source"])
        rows.append(row)
    return rows, all_tied


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export(store: Store, output: Path, weights: dict[str, float], *, overwrite: bool = False) -> tuple[int, int]:
    """Write the export; returns (rows written, labels left out as all tied)."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise InputError("exists; pass --overwrite to replace it", file=str(output), field="output")
    if output.is_dir():
        raise InputError("is a folder; give a file name", file=str(output), field="output")
    rows, all_tied = export_rows(store, weights)
    write_jsonl_atomic(output, rows)
    return len(rows), all_tied
