"""Read the rows to label: ``{"prompt", "responses": [K]}`` (what ``alignkit generate`` writes).

Validation is the reward-model loader's own (``data.ranking.validate_ranking_row``), so a task that
can be labelled is a row that ``alignkit rm`` can read once it has ranks: 2 <= K <= 9, no empty or
identical responses, a string prompt or a conversation. Ranks, scores or rubric already in a row
are ignored (the people are about to give their own). Preference pairs (``chosen``/``rejected``)
are tasks with K = 2. Every row is checked before the server starts; the first bad one is an
InputError naming file, line and field.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from .store import Task


def _probe(row: Any) -> Any:
    """The row as a K-wise row with placeholder ranks, so the loader checks everything but the order."""
    if not isinstance(row, dict):
        return row
    from ..data.ranking import ORDER_FIELDS

    probe = {k: v for k, v in row.items() if k not in ORDER_FIELDS}
    responses = probe.get("responses")
    if isinstance(responses, list):
        probe["ranks"] = list(range(1, len(responses) + 1))
    return probe


def load_tasks(source: str) -> list[Task]:
    """Every row of ``source`` as a Task, or the first row's InputError (file, line, field)."""
    # imported here: the data package pulls in torch, which export and stats never need
    from ..data.ranking import validate_ranking_row
    from ..data.readers import read_records

    out = []
    for where, row in read_records(source):
        if isinstance(row, InputError):
            if row.field is None:  # unreadable line: the whole row is the field at fault
                row = InputError(row.message, file=row.file, line=row.line, field="row", kind=row.kind)
            raise row
        ex = validate_ranking_row(_probe(row), where)
        out.append(Task(ex.prompt, list(ex.responses), f"{where[0]}:{where[1]}"))
    if not out:
        raise InputError("no rows to label (the file is empty)", file=str(source), field="data")
    return out
