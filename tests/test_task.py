"""The constraint task: every check on hand-written responses (edge cases included), render -> parse
round trips, deterministic prompt sets, the held-out split and the shipped prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.data.prompts import validate_prompt_row
from alignkit.tasks import (
    INSTRUCTIONS,
    KINDS,
    AvoidWord,
    EndPhrase,
    IncludeKeyword,
    ListItems,
    Lowercase,
    MaxSentences,
    MaxWords,
    NoCommas,
    StartWord,
    Uppercase,
    from_spec,
    instruction_text,
    lookup,
    make_prompts,
    parse_constraints,
    split,
    split_instructions,
    write_sample_data,
)
from alignkit.tasks.prompts import INCOMPATIBLE

SAMPLE = Path(__file__).resolve().parent.parent / "src/alignkit/sample_data"

# one instance of every kind, with parameters that exercise the parser (plural/singular, apostrophes)
EXAMPLES = [MaxWords(12), MaxWords(1), MaxSentences(1), MaxSentences(3), IncludeKeyword("city"),
            AvoidWord("France"), Lowercase(), Uppercase(), EndPhrase("Is there anything else I can help with?"),
            EndPhrase("That's all, folks!"), ListItems(4), ListItems(1), StartWord("Sure"), NoCommas()]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / name).read_text().splitlines()]


# ----------------------------------------------------------------------------- render / parse

def test_examples_cover_every_kind():
    assert {c.kind for c in EXAMPLES} == set(KINDS)


@pytest.mark.parametrize("c", EXAMPLES, ids=lambda c: f"{c.kind}:{c.render()}")
def test_render_parse_round_trip(c):
    assert parse_constraints(c.render()) == [c]
    assert parse_constraints("Describe a cat briefly. " + c.render()) == [c]
    assert from_spec(json.loads(json.dumps(c.spec()))) == c


def test_render_text_is_the_documented_sentence():
    assert MaxWords(12).render() == "Answer in at most 12 words."
    assert MaxWords(1).render() == "Answer in at most 1 word."
    assert MaxSentences(2).render() == "Answer in at most 2 sentences."
    assert ListItems(3).render() == "Answer as a bulleted list with exactly 3 items."
    assert EndPhrase("Hope this helps!").render() == "End your answer with the phrase 'Hope this helps!'"


def test_parse_two_constraints_in_order_and_the_bare_instruction():
    prompt = "Name some fruits. Do not use the word 'fruits' in your answer. Answer in all lowercase letters."
    assert parse_constraints(prompt) == [AvoidWord("fruits"), Lowercase()]
    assert instruction_text(prompt) == "Name some fruits."
    prompt = ("What is the capital of France? End your answer with the phrase 'Any other questions?' "
              "Answer in at most 9 words.")
    assert parse_constraints(prompt) == [EndPhrase("Any other questions?"), MaxWords(9)]
    assert instruction_text(prompt) == "What is the capital of France?"


def test_parse_accepts_double_quotes_and_other_case():
    assert parse_constraints('Say hi. include the word "hello" in your answer.') == [IncludeKeyword("hello")]
    assert parse_constraints('Say hi. End your answer with the phrase "Bye now."') == [EndPhrase("Bye now.")]


def test_parse_finds_nothing_in_a_plain_prompt_or_any_bank_instruction():
    assert parse_constraints("Tell me about the moon in a few words.") == []
    for inst in INSTRUCTIONS:
        assert parse_constraints(inst.text) == [], inst.text
        assert instruction_text(inst.text) == inst.text


def test_parse_reads_the_shipped_preference_prompts():
    """prefs.jsonl was written by hand with the same phrasing: each prompt states one constraint, its
    chosen response passes it and the instruction is what is left."""
    for row in _rows("prefs.jsonl") + _rows("prefs_eval.jsonl"):
        cs = parse_constraints(row["prompt"])
        assert len(cs) == 1, row["prompt"]
        assert cs[0].check(row["chosen"]), row


def test_from_spec_rejects_unknown_kinds_and_parameters():
    with pytest.raises(ValueError, match="unknown constraint kind"):
        from_spec({"kind": "rhymes"})
    with pytest.raises(ValueError, match="takes"):
        from_spec({"kind": "max_words", "n": 3, "m": 4})
    with pytest.raises(ValueError, match="takes"):
        from_spec({"kind": "max_words"})


# ----------------------------------------------------------------------------- checks: golden cases

CASES = [
    # (constraint, response, passes)
    (MaxWords(5), "The capital is Paris, France.", True),           # exactly N
    (MaxWords(5), "The capital is Paris in France.", False),        # N + 1
    (MaxWords(3), "- apple\n- banana\n- cherry", True),              # bullets are not words
    (MaxWords(2), "A well-known fact.", False),                      # hyphenated = one word: 3 words
    (MaxWords(2), "Well-known H2O.", True),
    (MaxWords(5), "", False),                                        # no word satisfies nothing
    (MaxWords(5), "  ...  ", False),
    (MaxSentences(1), "Paris is the capital.", True),
    (MaxSentences(1), "Paris is the capital. It is big.", False),
    (MaxSentences(1), "Pi is about 3.14 today", True),               # a decimal point ends nothing
    (MaxSentences(2), "One. Two! Three?", False),
    (MaxSentences(2), "First line\nsecond line", True),
    (MaxSentences(2), "First line\nsecond line\nthird line", False),  # line breaks end sentences
    (MaxSentences(1), "Paris... the capital", False),               # an ellipsis then space ends one
    (IncludeKeyword("cat"), "My Cat, a tabby, sleeps.", True),      # case and punctuation around
    (IncludeKeyword("cat"), "The cat's toy.", True),
    (IncludeKeyword("cat"), "A category of cats.", False),          # substring / plural do not count
    (IncludeKeyword("ice cream"), "I like ice  cream a lot.", True),
    (AvoidWord("water"), "Fix leaks and take short showers.", True),
    (AvoidWord("water"), "Save WATER.", False),
    (AvoidWord("water"), "Use a watering can and waterproof boots.", True),
    (Lowercase(), "paris is the 1st city, really! (yes)", True),   # digits and punctuation are fine
    (Lowercase(), "paris is the capital of France.", False),
    (Lowercase(), "123 !!", False),                                  # no letter
    (Lowercase(), "café crème", True),
    (Lowercase(), "Éclair", False),
    (Uppercase(), "PARIS IS THE CAPITAL, 2024!", True),
    (Uppercase(), "PARIS IS THE CAPITAl", False),
    (Uppercase(), "42", False),
    (Uppercase(), "H2O IS WATER.", True),
    (EndPhrase("Hope this helps!"), "Use a timer. Hope this helps!", True),
    (EndPhrase("Hope this helps!"), "Use a timer. Hope this helps!  \n", True),  # trailing whitespace
    (EndPhrase("Hope this helps!"), "Use a timer. hope THIS helps!", True),     # case is ignored
    (EndPhrase("Hope this helps!"), "Use a timer. Hope this helps!.", False),   # extra punctuation
    (EndPhrase("Hope this helps!"), "Use a timer. Hope this helps", False),     # missing punctuation
    (EndPhrase("Hope this helps!"), 'Use a timer. "Hope this helps!"', False),  # quoted
    (EndPhrase("Hope this helps!"), "Hope this helps! Use a timer.", False),    # not at the end
    (ListItems(3), "- apple\n- banana\n- cherry", True),
    (ListItems(3), "Here are three:\n* apple\n* banana\n* cherry\nEnjoy!", True),  # other lines allowed
    (ListItems(3), "1. apple\n2) banana\n• cherry", True),           # mixed styles
    (ListItems(3), "  - apple\n  - banana\n  - cherry", True),       # indented
    (ListItems(3), "- apple\n- banana", False),                       # N - 1
    (ListItems(3), "- apple\n- banana\n- cherry\n- plum", False),     # N + 1
    (ListItems(2), "-apple\n-banana", False),                         # no space after the bullet
    (ListItems(2), "**Apple** is red.\n**Pear** is green.", False),  # markdown bold is not a bullet
    (ListItems(3), "apple, banana, cherry", False),
    (StartWord("Sure"), "Sure, the capital is Paris.", True),
    (StartWord("Sure"), "sure! paris.", True),                        # case is ignored
    (StartWord("Sure"), '**"Sure**, Paris.', True),                   # leading markdown and quotes
    (StartWord("Sure"), "Surely it is Paris.", False),
    (StartWord("Sure"), "Yes, sure.", False),
    (NoCommas(), "Paris is the capital of France.", True),
    (NoCommas(), "Paris, France.", False),
    (NoCommas(), "Paris，France.", False),                          # full-width comma
]


@pytest.mark.parametrize("c, response, passes", CASES, ids=lambda x: repr(x)[:40])
def test_check_golden(c, response, passes):
    assert c.check(response) is passes


# ----------------------------------------------------------------------------- prompt sets

def test_make_prompts_is_deterministic_and_distinct():
    a, b = make_prompts(120, seed=3), make_prompts(120, seed=3)
    assert a == b
    assert a != make_prompts(120, seed=4)
    assert len({r["prompt"] for r in a}) == 120
    assert make_prompts(30, seed=3) == a[:30]  # a prefix: n only says where to stop


def test_make_prompts_rows_are_parseable_and_consistent():
    rows = make_prompts(400, seed=0)
    kinds = set()
    for r in rows:
        cs = parse_constraints(r["prompt"])
        assert [c.spec() for c in cs] == r["constraints"]
        assert instruction_text(r["prompt"]) == r["instruction"]
        inst = lookup(r["instruction"])
        assert inst is not None and inst.category == r["category"]
        names = [c.kind for c in cs]
        assert 1 <= len(names) <= 2 and len(set(names)) == len(names)
        assert frozenset(names) not in INCOMPATIBLE
        assert "list_items" not in names or inst.category == "list"
        assert "max_sentences" not in names or inst.category != "fact"
        if "avoid_word" in names:  # never forbids the right answer of a fact question
            assert not any(_has(a, inst.subject) for a in inst.answers)
        kinds |= set(names)
    assert kinds == set(KINDS)


def _has(text: str, word: str) -> bool:
    from alignkit.tasks.constraints import contains_word

    return contains_word(text, word)


def test_split_holds_out_whole_instructions():
    rows = make_prompts(200, seed=1)
    train, held = split(rows, eval_fraction=0.25, seed=0)
    assert len(train) + len(held) == len(rows) and train and held
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    assert {r["prompt"] for r in train} | {r["prompt"] for r in held} == {r["prompt"] for r in rows}
    assert split(rows, eval_fraction=0.25, seed=0) == (train, held)
    tr_inst, ho_inst = split_instructions(INSTRUCTIONS, 0.25, 0)
    for cat in ("fact", "list", "open"):  # every category is held out in proportion
        n = sum(i.category == cat for i in INSTRUCTIONS)
        assert sum(i.category == cat for i in ho_inst) == -(-n // 4)
    assert len(tr_inst) + len(ho_inst) == len(INSTRUCTIONS)


def test_shipped_prompt_files(tmp_path):
    train, held = _rows("constraints_train.jsonl"), _rows("constraints_eval.jsonl")
    assert (len(train), len(held)) == (300, 200)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    for i, row in enumerate(train + held):
        prompt, text = validate_prompt_row(row, ("constraints.jsonl", i + 1))  # alignkit's prompt loader
        assert prompt == text == row["prompt"]
        assert [c.spec() for c in parse_constraints(text)] == row["constraints"]
    # the files are what the generator writes (regenerate with `python -m alignkit.tasks`)
    a, b = write_sample_data(tmp_path)
    assert a.read_text() == (SAMPLE / "constraints_train.jsonl").read_text()
    assert b.read_text() == (SAMPLE / "constraints_eval.jsonl").read_text()
