"""The labeler's rubric and the rule that turns rubric labels into a ranking.

The labeler's table (InstructGPT, Ouyang et al. 2022, Table 3; the reference chapter's "How labeler
evaluates the response quality"): for each response, overall quality on a 1-7 Likert scale and
binary flags. A row of K-wise data may carry one such object per response instead of ranks:

    {"overall": 6, "fails_to_follow_instruction": false, "inappropriate_for_customer_assistant": false,
     "hallucination": false, "satisfies_constraint": true, "sexual_content": false}

``overall`` is required; a flag left out means "not flagged" (False). Flags take true/false or 1/0.

The rule (configurable with ``--rubric-weights FILE``, a YAML/JSON mapping field -> weight):

    score = Σ_field weight[field] · value[field]        (value: the Likert number, or 1/0 for a flag)

and responses are ranked by score, higher first; equal scores are ties (no comparison between
them). The default weights below make overall quality decide, with each flag worth a fixed number
of Likert points: a response that fails the instruction, hallucinates or is inappropriate loses to
an otherwise equal one, and satisfying the instruction's constraint wins over not satisfying it.
A weight file may set any subset of fields; unlisted fields keep their default weight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import InputError

LIKERT = (1, 7)
FLAGS = ("fails_to_follow_instruction", "inappropriate_for_customer_assistant", "hallucination",
         "satisfies_constraint", "sexual_content")
FIELDS = ("overall", *FLAGS)

DEFAULT_WEIGHTS: dict[str, float] = {
    "overall": 1.0,
    "fails_to_follow_instruction": -2.0,
    "inappropriate_for_customer_assistant": -3.0,
    "hallucination": -2.0,
    "satisfies_constraint": 1.0,
    "sexual_content": -3.0,
}


def rubric_score(labels: dict[str, float], weights: dict[str, float] | None = None) -> float:
    """The rule's score of one response's validated labels (see the module docstring)."""
    w = DEFAULT_WEIGHTS if weights is None else weights
    return sum(w[name] * float(labels.get(name, 0)) for name in FIELDS)


def validate_labels(value: Any, field: str, where: tuple[str, int]) -> dict[str, float]:
    """One response's rubric object -> {field: number}; InputError naming file, line and field."""
    file, line = where

    def error(message: str, name: str) -> InputError:
        return InputError(message, file=file, line=line, field=name, kind="bad_rubric")

    if not isinstance(value, dict):
        raise error(f"must be an object of rubric fields ({', '.join(FIELDS)}), got {type(value).__name__}", field)
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
        raise error(f"unknown rubric field; known: {', '.join(FIELDS)}", f"{field}.{unknown[0]}")
    overall = value.get("overall")
    if overall is None:
        raise error("missing (overall quality, 1-7)", f"{field}.overall")
    if isinstance(overall, bool) or not isinstance(overall, (int, float)) or not math.isfinite(overall) \
            or overall != int(overall) or not LIKERT[0] <= overall <= LIKERT[1]:
        raise error(f"must be an integer from {LIKERT[0]} to {LIKERT[1]} (Likert), got {overall!r}", f"{field}.overall")
    out = {"overall": float(overall)}
    for name in FLAGS:
        flag = value.get(name, False)
        if flag not in (True, False, 0, 1) or isinstance(flag, float):
            raise error(f"must be true/false (or 1/0), got {flag!r}", f"{field}.{name}")
        out[name] = float(bool(flag))
    return out


def load_weights(path: Path | None) -> dict[str, float]:
    """DEFAULT_WEIGHTS updated from a YAML/JSON mapping file (InputError on unknown fields or non-numbers)."""
    if path is None:
        return dict(DEFAULT_WEIGHTS)
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except FileNotFoundError:
        raise InputError("file not found", file=str(path), field="rubric_weights") from None
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"not valid YAML/JSON: {e}", file=str(path), field="rubric_weights") from None
    if not isinstance(data, dict):
        raise InputError("must be a mapping of rubric field -> weight", file=str(path), field="rubric_weights")
    weights = dict(DEFAULT_WEIGHTS)
    for name, w in data.items():
        if name not in FIELDS:
            raise InputError(f"unknown rubric field; known: {', '.join(FIELDS)}", file=str(path), field=str(name))
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InputError(f"weight must be a finite number, got {w!r}", file=str(path), field=str(name))
        weights[name] = float(w)
    return weights
