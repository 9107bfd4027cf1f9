"""Progress and agreement between labelers.

Two labelers agree on a pair of responses (i, j) of a task they both labelled when they give the
same relation: both prefer i, both prefer j, or both tie them. ``agreement`` is the fraction of such
pairs over all shared tasks (InstructGPT reports this inter-labeler agreement, about 73%).
Kendall's tau-b compares two labelers' whole rankings of one task and is averaged over tasks where
it is defined (neither ranking all tied). Labels given as rubric only are ranked by the rubric rule.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from itertools import combinations

from .export import effective_ranks
from .store import DONE, PENDING, SKIPPED, Store


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b (ties in either ranking allowed); None when one ranking is all tied.

    tau_b = (n_c - n_d) / sqrt((n_0 - n_x) (n_0 - n_y)), with n_0 = n(n-1)/2 pairs, n_c / n_d the
    concordant / discordant pairs and n_x / n_y the pairs tied in x / in y (Kendall 1945).
    """
    if len(x) != len(y):
        raise ValueError("rankings of different lengths")
    n0 = len(x) * (len(x) - 1) // 2
    concordant = discordant = tied_x = tied_y = 0
    for i, j in combinations(range(len(x)), 2):
        sx, sy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
        tied_x += sx == 0
        tied_y += sy == 0
        if sx and sy:
            concordant += sx == sy
            discordant += sx != sy
    denominator = math.sqrt((n0 - tied_x) * (n0 - tied_y))
    return None if denominator == 0 else (concordant - discordant) / denominator


def pair_agreement(x: list[float], y: list[float]) -> tuple[int, int]:
    """(pairs of responses with the same relation in both rankings, pairs compared)."""
    same = sum(_sign(x[i] - x[j]) == _sign(y[i] - y[j]) for i, j in combinations(range(len(x)), 2))
    return same, len(x) * (len(x) - 1) // 2


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compute_stats(store: Store, weights: dict[str, float]) -> dict:
    """Everything ``alignkit label stats`` prints, as one JSON-able dict."""
    labels = store.current_labels()
    by_task: dict[int, dict[str, list[int]]] = defaultdict(dict)
    for label in labels:
        by_task[label["task_id"]][label["labeler"]] = effective_ranks(label, weights)[0]
    n_tasks = store.task_count()
    per_count = Counter(len(v) for v in by_task.values())
    per_count[0] = n_tasks - len(by_task)
    pairs: dict[tuple[str, str], dict] = {}
    for ranked in by_task.values():
        for a, b in combinations(sorted(ranked), 2):
            entry = pairs.setdefault((a, b), {"a": a, "b": b, "shared_tasks": 0, "same": 0, "compared": 0, "taus": []})
            same, compared = pair_agreement(ranked[a], ranked[b])
            tau = kendall_tau_b(ranked[a], ranked[b])
            entry["shared_tasks"] += 1
            entry["same"] += same
            entry["compared"] += compared
            if tau is not None:
                entry["taus"].append(tau)
    pair_rows = [{"a": e["a"], "b": e["b"], "shared_tasks": e["shared_tasks"], "response_pairs": e["compared"],
                  "agreement": e["same"] / e["compared"] if e["compared"] else None,
                  "kendall_tau_b": _mean(e["taus"])} for e in pairs.values()]
    same, compared = sum(e["same"] for e in pairs.values()), sum(e["compared"] for e in pairs.values())
    return {
        "tasks": n_tasks,
        "labels": len(labels),
        "tasks_by_number_of_labels": {str(n): per_count[n] for n in sorted(per_count)},
        "labelers": {name: {"labelled": c[DONE], "skipped": c[SKIPPED], "pending": c[PENDING]}
                     for name, c in store.assignment_counts().items()},
        "pairs": sorted(pair_rows, key=lambda r: (r["a"], r["b"])),
        "overall": {"agreement": same / compared if compared else None,
                    "kendall_tau_b": _mean([t for e in pairs.values() for t in e["taus"]])},
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_stats(s: dict) -> str:
    """The stats as a few plain-text tables."""
    counts = ", ".join(f"{n} label(s): {c}" for n, c in s["tasks_by_number_of_labels"].items())
    lines = [f"tasks: {s['tasks']}   current labels: {s['labels']}", f"tasks by number of labels: {counts}", ""]
    lines.append(f"{'labeler':<20} {'labelled':>8} {'skipped':>8} {'pending':>8}")
    for name, c in s["labelers"].items():
        lines.append(f"{name:<20} {c['labelled']:>8} {c['skipped']:>8} {c['pending']:>8}")
    lines.append("")
    if not s["pairs"]:
        lines.append("agreement: no task has been labelled by two labelers yet")
        return "\n".join(lines)
    lines.append(f"{'labeler A':<16} {'labeler B':<16} {'tasks':>6} {'pairs':>6} {'agreement':>10} {'tau-b':>7}")
    for p in s["pairs"]:
        lines.append(f"{p['a']:<16} {p['b']:<16} {p['shared_tasks']:>6} {p['response_pairs']:>6} "
                     f"{_fmt(p['agreement']):>10} {_fmt(p['kendall_tau_b']):>7}")
    o = s["overall"]
    lines.append(f"overall: agreement {_fmt(o['agreement'])}, Kendall's tau-b {_fmt(o['kendall_tau_b'])}")
    return "\n".join(lines)
