"""Prompts with verifiable constraints: a bank instruction + one or two constraint sentences.

``make_prompts(n, seed)`` is deterministic (same n, seed and instructions -> the same rows).
``split`` holds out whole base instructions, so a held-out prompt never shares its task with a
training prompt (only the constraint kinds are shared). ``python -m alignkit.tasks``
rewrites ``sample_data/constraints_train.jsonl`` (300 rows) and ``constraints_eval.jsonl`` (200).

A row: ``{"prompt": str, "instruction": str, "category": str, "constraints": [spec, ...]}``; alignkit's
prompt loader reads ``prompt`` and ignores the rest; ``constraints`` are
:meth:`Constraint.spec` objects (``{"kind": "max_words", "n": 12}``).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from .bank import INSTRUCTIONS, Instruction
from .constraints import (
    AvoidWord,
    Constraint,
    EndPhrase,
    IncludeKeyword,
    ListItems,
    Lowercase,
    MaxSentences,
    MaxWords,
    NoCommas,
    StartWord,
    Uppercase,
)

START_WORDS = ("Sure", "Yes", "Well", "Honestly", "Indeed", "Absolutely", "Today", "Answer")
END_PHRASES = ("Is there anything else I can help with?", "Any other questions?", "Hope this helps!",
               "Happy learning!", "Have a nice day!", "Thank you for asking.", "That is all.")

# How often each kind is drawn (a two-constraint prompt draws twice). The weights balance the mix
# by how often SmolLM2-135M-Instruct satisfies each kind (scripts/probe_constraints.py; measured
# rates in its docstring): kinds it almost never satisfies (capital letters, lowercase, end
# phrase: 3-6%) are drawn less, as they give the preference data little signal, but kept, as the
# hard end of the task; list_items fits only list tasks (a fifth of the bank), so it is drawn
# more often there.
KIND_WEIGHTS: dict[str, float] = {
    "max_words": 1.0, "max_sentences": 1.0, "include_keyword": 1.0, "avoid_word": 1.0, "lowercase": 0.5,
    "uppercase": 0.3, "end_phrase": 0.4, "list_items": 3.0, "start_word": 1.0, "no_commas": 1.0,
}
# Pairs that contradict each other or make the other unreadable (a list's lines are its sentences).
INCOMPATIBLE = {frozenset(p) for p in (("lowercase", "uppercase"), ("list_items", "max_sentences"),
                                        ("list_items", "max_words"), ("end_phrase", "max_words"),
                                        ("end_phrase", "max_sentences"))}
TWO_CONSTRAINT_RATE = 0.3
# (low, high) of the drawn number, by category
MAX_WORDS = {"fact": (5, 12), "list": (8, 20), "open": (10, 25)}
MAX_SENTENCES = {"list": (1, 1), "open": (1, 2)}  # a fact answer is one sentence anyway: no limit there
LIST_ITEMS = (2, 5)


def allowed_kinds(inst: Instruction) -> list[str]:
    """Constraint kinds that fit an instruction: a bulleted list only where it asks for several things,
    a sentence limit only where the answer is more than one sentence by nature."""
    return [k for k in KIND_WEIGHTS if (k != "list_items" or inst.category == "list")
            and (k != "max_sentences" or inst.category in MAX_SENTENCES)]


def draw_constraint(kind: str, inst: Instruction, rng: random.Random) -> Constraint:
    if kind == "max_words":
        return MaxWords(rng.randint(*MAX_WORDS[inst.category]))
    if kind == "max_sentences":
        return MaxSentences(rng.randint(*MAX_SENTENCES[inst.category]))
    if kind == "include_keyword":
        return IncludeKeyword(rng.choice(inst.keywords))
    if kind == "avoid_word":
        return AvoidWord(inst.subject)
    if kind == "lowercase":
        return Lowercase()
    if kind == "uppercase":
        return Uppercase()
    if kind == "end_phrase":
        return EndPhrase(rng.choice(END_PHRASES))
    if kind == "list_items":
        return ListItems(rng.randint(*LIST_ITEMS))
    if kind == "start_word":
        return StartWord(rng.choice(START_WORDS))
    if kind == "no_commas":
        return NoCommas()
    raise ValueError(f"unknown constraint kind {kind!r}")


def draw_constraints(inst: Instruction, count: int, rng: random.Random) -> list[Constraint]:
    """``count`` constraints of different, compatible kinds for ``inst``."""
    chosen: list[str] = []
    while len(chosen) < count:
        kinds = [k for k in allowed_kinds(inst)
                 if k not in chosen and all(frozenset((k, c)) not in INCOMPATIBLE for c in chosen)]
        chosen.append(rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0])
    return [draw_constraint(k, inst, rng) for k in chosen]


def render_prompt(inst: Instruction, constraints: list[Constraint]) -> str:
    return " ".join([inst.text, *(c.render() for c in constraints)])


def make_prompts(n: int, seed: int = 0, instructions: tuple[Instruction, ...] | list[Instruction] = INSTRUCTIONS,
                 two_constraint_rate: float = TWO_CONSTRAINT_RATE) -> list[dict]:
    """``n`` distinct prompt rows (see the module docstring), each instruction used in turn, in an order
    reshuffled every pass, so the tasks are spread evenly. Deterministic in (n, seed, instructions)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    order = list(instructions)
    if n and not order:
        raise ValueError("no instructions to make prompts from")
    rows: list[dict] = []
    seen: set[str] = set()
    tries = 0
    while len(rows) < n:
        if tries % len(order) == 0:
            rng.shuffle(order)
        inst = order[tries % len(order)]
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"could not make {n} distinct prompts from {len(order)} instructions")
        cons = draw_constraints(inst, 2 if rng.random() < two_constraint_rate else 1, rng)
        prompt = render_prompt(inst, cons)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "instruction": inst.text, "category": inst.category,
                     "constraints": [c.spec() for c in cons]})
    return rows


def split_instructions(instructions=INSTRUCTIONS, eval_fraction: float = 0.25, seed: int = 0):
    """(train, held-out) instructions: in each category, ceil(fraction x count) of them, drawn with ``seed``."""
    if not 0 <= eval_fraction <= 1:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    rng = random.Random(seed)
    held: set[str] = set()
    for cat in sorted({i.category for i in instructions}):
        texts = sorted(i.text for i in instructions if i.category == cat)
        rng.shuffle(texts)
        held.update(texts[:math.ceil(eval_fraction * len(texts))])
    train = [i for i in instructions if i.text not in held]
    return train, [i for i in instructions if i.text in held]


def split(rows: list[dict], eval_fraction: float = 0.25, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows, whole instructions held out (by each row's ``instruction``, per category)."""
    by_text = {r["instruction"]: Instruction(r["instruction"], r.get("category", ""), "", ()) for r in rows}
    _, held = split_instructions(list(by_text.values()), eval_fraction, seed)
    held_texts = {i.text for i in held}
    return ([r for r in rows if r["instruction"] not in held_texts],
            [r for r in rows if r["instruction"] in held_texts])


def write_sample_data(out_dir: str | Path | None = None, n_train: int = 300, n_eval: int = 200,
                      seed: int = 0) -> tuple[Path, Path]:
    """Write ``constraints_train.jsonl`` and ``constraints_eval.jsonl`` (held-out instructions)."""
    out = Path(out_dir) if out_dir is not None else Path(__file__).resolve().parent.parent / "sample_data"
    train_inst, eval_inst = split_instructions(INSTRUCTIONS, 0.25, seed)
    paths = []
    for name, n, insts, s in (("constraints_train.jsonl", n_train, train_inst, seed),
                              ("constraints_eval.jsonl", n_eval, eval_inst, seed + 1)):
        path = out / name
        rows = make_prompts(n, s, insts)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]

