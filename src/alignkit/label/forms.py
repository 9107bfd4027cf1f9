"""The task form, both ways: submitted fields -> label, and a stored label -> the fields to show.

Fields are named by DISPLAY position (the labeler's shuffled order), never by the response's index
in the file; ``order[pos]`` (stored with the assignment) maps them back, so what is stored is always
in the original order whatever the page showed.

    rank_<pos>             "" (unranked) or 1..K; equal numbers are a tie
    overall_<pos>          "" (not scored) or 1..7
    flag_<pos>_<name>      present = flagged (checkbox), for each rubric flag
    note                   free text

A label needs a complete ranking, or an overall score for every response, or both. A partial one
is refused with a message, since the export could not say what the missing places mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..rubric import FLAGS, LIKERT

MAX_NOTE = 10_000

FLAG_TEXT = {
    "fails_to_follow_instruction": "Fails to follow the instruction",
    "inappropriate_for_customer_assistant": "Inappropriate for a customer assistant",
    "hallucination": "Hallucination",
    "satisfies_constraint": "Satisfies the constraint in the instruction",
    "sexual_content": "Sexual content",
}


@dataclass
class Parsed:
    ranks: list[int] | None = None      # original order
    rubric: list[dict] | None = None    # original order
    note: str = ""
    errors: list[str] = field(default_factory=list)


def letter(pos: int) -> str:
    return "ABCDEFGHI"[pos]


def _int_field(form: Mapping[str, str], name: str, lo: int, hi: int, what: str, errors: list[str]) -> int | None:
    raw = (form.get(name) or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        errors.append(f"{what} must be a whole number from {lo} to {hi}, got {raw[:20]!r}")
        return None
    return int(raw)


def parse_submission(form: Mapping[str, str], order: list[int]) -> Parsed:
    """The submitted form -> ranks and rubric in the original order, or the errors to show."""
    k = len(order)
    out = Parsed(note=(form.get("note") or "")[:MAX_NOTE])
    ranks = [_int_field(form, f"rank_{p}", 1, k, f"Rank of {letter(p)}", out.errors) for p in range(k)]
    overall = [_int_field(form, f"overall_{p}", *LIKERT, f"Overall quality of {letter(p)}", out.errors)
               for p in range(k)]
    flags = [{name: f"flag_{p}_{name}" in form for name in FLAGS} for p in range(k)]
    if out.errors:
        return out
    ranked, scored = sum(r is not None for r in ranks), sum(o is not None for o in overall)
    if 0 < ranked < k:
        missing = ", ".join(letter(p) for p in range(k) if ranks[p] is None)
        out.errors.append(f"Rank every response or none; not ranked: {missing}")
    if 0 < scored < k:
        missing = ", ".join(letter(p) for p in range(k) if overall[p] is None)
        out.errors.append(f"Give every response an overall quality (1-7) or none; missing: {missing}")
    if scored == 0 and any(any(f.values()) for f in flags):
        out.errors.append("Flags need an overall quality score for every response")
    if ranked == 0 and scored == 0:
        out.errors.append("Rank the responses, or score each one on the rubric (or both)")
    if out.errors:
        return out
    if ranked:
        out.ranks = [0] * k
        for p in range(k):
            out.ranks[order[p]] = ranks[p]
    if scored:
        out.rubric = [{}] * k
        for p in range(k):
            out.rubric[order[p]] = {"overall": overall[p], **flags[p]}
    return out


def form_values(label: Mapping[str, Any] | None, order: list[int]) -> dict[str, str]:
    """A stored label -> the form fields (by display position) that show it again."""
    if not label:
        return {}
    values = {"note": label.get("note") or ""}
    ranks, rubric = label.get("ranks"), label.get("rubric")
    for p, original in enumerate(order):
        if ranks:
            values[f"rank_{p}"] = str(ranks[original])
        if rubric:
            values[f"overall_{p}"] = str(int(rubric[original]["overall"]))
            for name in FLAGS:
                if rubric[original].get(name):
                    values[f"flag_{p}_{name}"] = "on"
    return values


def as_text(item: Any) -> str:
    """A prompt or response (a string or a list of messages) as plain text for the page."""
    if isinstance(item, str):
        return item
    if isinstance(item, list):
        if len(item) == 1 and isinstance(item[0], dict):
            return str(item[0].get("content", ""))
        return "\n\n".join(f"[{m.get('role', '?')}]\n{m.get('content', '')}" for m in item if isinstance(m, dict))
    return str(item)
