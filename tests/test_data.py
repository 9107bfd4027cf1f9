"""The data layer: readers, validation, tokenization, collation, the shipped sample data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from alignkit.data import (EncodedPair, collate_pairs, encode_preference, fingerprint,
                           load_preference_data, read_records, validate_preference_row)
from alignkit.errors import InputError, RowNumber

SAMPLE = Path(__file__).resolve().parent.parent / "src" / "alignkit" / "sample_data"
W = ("f.jsonl", 3)

STD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
CONV = {"prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}]}
IMPLICIT = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Go away."}]}


def write_jsonl(path: Path, rows) -> str:
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode())
    return str(path)


def rows_of(source: str) -> list[dict]:
    return [row for _, row in read_records(source)]


# --- formats ------------------------------------------------------------------------------

def test_standard_format():
    ex = validate_preference_row(dict(STD, margin=0.5), W)
    assert (ex.prompt, ex.chosen, ex.rejected, ex.conversational, ex.margin) == \
        ("What is 2+2?", "4", "5", False, 0.5)


def test_conversational_format():
    ex = validate_preference_row(CONV, W)
    assert ex.conversational and ex.prompt == CONV["prompt"]
    assert ex.chosen == CONV["chosen"] and ex.rejected == CONV["rejected"] and ex.margin is None


def test_implicit_prompt_is_common_prefix():
    ex = validate_preference_row(IMPLICIT, W)
    assert ex == validate_preference_row(CONV, W)


def test_implicit_multi_turn():
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    ex = validate_preference_row({"chosen": conv + [{"role": "assistant", "content": "yes"}],
                                  "rejected": conv + [{"role": "assistant", "content": "no"}]}, W)
    assert ex.prompt == conv and ex.chosen[0]["content"] == "yes"


def test_readers_agree(tmp_path):
    import datasets
    import pandas as pd

    rows = [STD, {"prompt": "Name a colour.", "chosen": "blue", "rejected": "dog"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "saved_dict"))
    # where each row is: file lines for JSONL and CSV (header on line 1), row numbers for the others
    places = {"d.jsonl": ([1, 2], False), "d.csv": ([2, 3], False), "d.json": ([1, 2], True),
              "d.parquet": ([1, 2], True), "saved": ([1, 2], True), "saved_dict": ([1, 2], True)}
    for name, (numbers, rows_not_lines) in places.items():
        records = list(read_records(str(tmp_path / name)))
        assert [r for _, r in records] == rows, name
        assert [w[1] for w, _ in records] == numbers, name
        assert all(isinstance(w[1], RowNumber) == rows_not_lines for w, _ in records), name


def test_conversational_parquet_and_json_lines(tmp_path):
    import pandas as pd

    pd.DataFrame([CONV]).to_parquet(tmp_path / "c.parquet")
    ex = validate_preference_row(rows_of(str(tmp_path / "c.parquet"))[0], W)
    assert ex == validate_preference_row(CONV, W)
    write_jsonl(tmp_path / "lines.json", [STD, STD])  # Dataset.to_json writes JSON lines
    assert rows_of(str(tmp_path / "lines.json")) == [STD, STD]


def test_jsonl_line_numbers_skip_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [STD, b"\n", b"   \n", STD])
    assert [w for w, _ in read_records(path)] == [(path, 1), (path, 4)]


def test_missing_sources(tmp_path):
    with pytest.raises(InputError, match="not found") as e:
        list(read_records(str(tmp_path / "nope.jsonl")))
    assert e.value.field == "data"
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported"):
        list(read_records(str(tmp_path / "d.txt")))
    with pytest.raises(InputError, match="cannot find data"):
        list(read_records("no-such-user/no-such-dataset-alignkit"))


def test_unreadable_parquet_raises(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="Parquet"):
        list(read_records(str(tmp_path / "bad.parquet")))


# --- malformed rows -----------------------------------------------------------------------

def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


BAD_ROWS = [
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing_field"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "missing_field"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "wrong_type"),
    ({"prompt": "p", "chosen": 1.5, "rejected": "b"}, "chosen", "wrong_type"),
    ({"prompt": "p", "chosen": "a", "rejected": ["b"]}, "rejected", "wrong_type"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "wrong_type"),
    ({"prompt": "p", "chosen": "  \n", "rejected": "b"}, "chosen", "empty_completion"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen", "identical_pair"),
    (dict(CONV, rejected=CONV["chosen"]), "chosen", "identical_pair"),
    (dict(IMPLICIT, rejected=IMPLICIT["chosen"]), "chosen", "identical_pair"),
    (dict(CONV, chosen=[]), "chosen", "empty_completion"),
    (dict(CONV, prompt=_msgs(("user", "a"), ("assistant", "b"))), "prompt[1].role", "role_order"),
    (dict(CONV, chosen=_msgs(("user", "x"))), "chosen[0].role", "role_order"),
    (dict(CONV, rejected=_msgs(("assistant", "x"), ("assistant", "y"))), "rejected[1].role",
     "role_order"),
    (dict(CONV, prompt=_msgs(("user", "a"), ("system", "s"), ("user", "b"))), "prompt[1].role",
     "role_order"),
    (dict(CONV, prompt=_msgs(("user", "a"), ("user", "b"))), "prompt[1].role", "role_order"),
    (dict(CONV, prompt=_msgs(("robot", "a"))), "prompt[0].role", "role_order"),
    (dict(CONV, prompt=[]), "prompt", "role_order"),
    (dict(CONV, chosen=[{"role": "assistant"}]), "chosen[0].content", "wrong_type"),
    (dict(CONV, chosen=[{"role": "assistant", "content": 7}]), "chosen[0].content", "wrong_type"),
    (dict(CONV, prompt=[{"content": "hi"}]), "prompt[0].role", "wrong_type"),
    (dict(CONV, prompt="Hi"), "prompt", "wrong_type"),
    ({"chosen": _msgs(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
      "rejected": _msgs(("user", "a"), ("assistant", "b"), ("user", "X"), ("assistant", "d"))},
     "chosen[1].role", "role_order"),
]


@pytest.mark.parametrize("row,field,kind", BAD_ROWS)
def test_bad_rows_raise_with_place(tmp_path, tokenizer, row, field, kind):
    path = write_jsonl(tmp_path / "bad.jsonl", [STD, row])
    with pytest.raises(InputError) as e:
        load_preference_data(path, tokenizer, max_length=None, max_prompt_length=None)
    assert e.value.kind == kind
    assert str(e.value).startswith(f"{path}, line 2, field '{field}': ")


@pytest.mark.parametrize("raw,kind", [(b'{"prompt": "p", "chosen": \n', "invalid_json"),
                                      (b'["a", "b"]\n', "wrong_type"),
                                      (b'{"prompt": "\xff\xfe"}\n', "undecodable")])
def test_bad_lines_raise_with_line(tmp_path, tokenizer, raw, kind):
    path = write_jsonl(tmp_path / "bad.jsonl", [STD, STD, raw])
    with pytest.raises(InputError) as e:
        load_preference_data(path, tokenizer, max_length=None, max_prompt_length=None)
    assert e.value.kind == kind and str(e.value).startswith(f"{path}, line 3: ")


def test_csv_rows_are_named_by_the_line_they_start_on(tmp_path):
    """The header is line 1; a blank line is skipped but counted; a quoted cell spanning two lines
    moves the next row down by two: the message names the line an editor shows."""
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        f.write("prompt,chosen,rejected\r\n")
        w = csv.writer(f)
        w.writerows([["p", "a", "b"], []])
        w.writerows([["two\nlines", "a", "b"], ["p", "a"], ["p", "", "b"]])
    records = list(read_records(str(path)))
    assert [w[1] for w, _ in records] == [2, 4, 6, 7]
    assert records[1][1]["prompt"] == "two\nlines" and records[2][1]["rejected"] is None
    for (where, row), expected in zip(records[2:], ["line 6, field 'rejected': missing", "line 7, field 'chosen': is empty"]):
        with pytest.raises(InputError) as e:
            validate_preference_row(row, where)
        assert str(e.value).startswith(f"{path}, {expected}")


def test_rows_without_lines_are_named_rows(tmp_path, tokenizer):
    """JSON arrays, Parquet and datasets have rows, not lines: the message says "row n"."""
    import pandas as pd

    (tmp_path / "d.json").write_text(json.dumps([STD, 5]))
    with pytest.raises(InputError, match=r"d\.json, row 2: expected a JSON object, got int"):
        load_preference_data(str(tmp_path / "d.json"), tokenizer, max_length=None, max_prompt_length=None)
    pd.DataFrame([STD, dict(STD, chosen="")]).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(InputError, match=r"d\.parquet, row 2, field 'chosen': is empty"):
        list(validate_preference_row(r, w) for w, r in read_records(str(tmp_path / "d.parquet")))


def test_byte_order_mark_is_dropped(tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark; JSON itself forbids one."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.jsonl").write_bytes(bom + json.dumps(STD).encode() + b"\r\n" + json.dumps(STD).encode())
    (tmp_path / "d.json").write_bytes(bom + json.dumps([STD]).encode())
    (tmp_path / "d.csv").write_bytes(bom + b"prompt,chosen,rejected\r\nWhat is 2+2?,4,5\r\n")
    assert rows_of(str(tmp_path / "d.jsonl")) == [STD, STD]
    assert rows_of(str(tmp_path / "d.json")) == [STD]
    assert rows_of(str(tmp_path / "d.csv")) == [STD]


def test_skip_invalid_counts_per_kind(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        STD, b"{not json\n", {"prompt": "p", "chosen": "x", "rejected": "x"}, CONV,
        b'{"a": "\xff"}\n', {"prompt": "p", "chosen": "x", "rejected": "y"}, {"chosen": "x"},
        {"prompt": "q", "chosen": "x", "rejected": "y"}, IMPLICIT])
    pairs, report = load_preference_data(path, tokenizer, max_length=None,
                                         max_prompt_length=None, skip_invalid=True)
    assert report.rows == 9 and report.kept == 5 == len(pairs)
    assert report.skipped == {"invalid_json": 1, "identical_pair": 1, "undecodable": 1,
                              "missing_field": 1}
    assert len(report.examples_of_skipped) == 4 and "line 2" in report.examples_of_skipped[0]
    assert [p.index for p in pairs] == list(range(5))
    assert "9 rows, 5 kept, 4 skipped" in report.summary()


def test_no_valid_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [b"{\n"])
    with pytest.raises(InputError, match="no valid rows"):
        load_preference_data(path, tokenizer, max_length=None, max_prompt_length=None,
                             skip_invalid=True)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(InputError, match="no valid rows"):
        load_preference_data(empty, tokenizer, max_length=None, max_prompt_length=None)


def test_several_sources_and_missing_file(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [STD])
    b = write_jsonl(tmp_path / "b.jsonl", [CONV, IMPLICIT])
    pairs, report = load_preference_data([a, b], tokenizer, max_length=None,
                                         max_prompt_length=None)
    assert report.rows == 3 and [p.index for p in pairs] == [0, 1, 2]
    # explicit and implicit prompt encode the same
    assert fingerprint(pairs[1:2]) == fingerprint(pairs[2:3])
    with pytest.raises(InputError, match="not found"):
        load_preference_data([a, str(tmp_path / "missing.jsonl")], tokenizer, max_length=None,
                             max_prompt_length=None, skip_invalid=True)


# --- tokenization -------------------------------------------------------------------------

def test_conversational_tokens_match_full_render(tokenizer):
    ex = validate_preference_row(dict(CONV, prompt=_msgs(("system", "Be kind."), ("user", "a"),
                                                         ("assistant", "b"), ("user", "Hi"))), W)
    pair = encode_preference(ex, tokenizer, max_length=None, max_prompt_length=None)
    eos = tokenizer.eos_token_id
    for completion, ids in ((ex.chosen, pair.chosen_ids), (ex.rejected, pair.rejected_ids)):
        full = tokenizer.apply_chat_template(ex.prompt + completion, tokenize=False)
        assert full.endswith(tokenizer.eos_token + "\n")
        expected = tokenizer(full[:-1], add_special_tokens=False)["input_ids"]
        assert pair.prompt_ids + ids == expected
        assert ids[-1] == eos and ids.count(eos) == 1
    prompt = tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(pair.prompt_ids) == prompt


def test_plain_strings_not_templated_unless_asked(tokenizer):
    ex = validate_preference_row(STD, W)
    plain = encode_preference(ex, tokenizer, max_length=None, max_prompt_length=None)
    assert plain.prompt_ids == tokenizer("What is 2+2?", add_special_tokens=False)["input_ids"]
    assert plain.chosen_ids == tokenizer("4", add_special_tokens=False)["input_ids"] + [2]
    assert tokenizer.bos_token_id not in plain.prompt_ids
    templated = encode_preference(ex, tokenizer, max_length=None, max_prompt_length=None,
                                  chat_template_for_plain=True)
    text = tokenizer.decode(templated.prompt_ids)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert "What is 2+2?" in text and templated.chosen_ids == plain.chosen_ids


def test_eos_not_doubled(tokenizer):
    ex = validate_preference_row(dict(STD, chosen="4<|im_end|>"), W)
    pair = encode_preference(ex, tokenizer, max_length=None, max_prompt_length=None)
    assert pair.chosen_ids[-1] == 2 and pair.chosen_ids.count(2) == 1


def test_truncation_keeps_prompt_end_and_respects_max_length(tmp_path, tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(200)) + " END"
    row = {"prompt": long_prompt, "chosen": "short", "rejected": " ".join(["long"] * 50)}
    path = write_jsonl(tmp_path / "d.jsonl", [row, STD])
    pairs, report = load_preference_data(path, tokenizer, max_length=40, max_prompt_length=16)
    p = pairs[0]
    full = tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    assert p.prompt_ids == full[-16:] and p.prompt_truncated and p.completion_truncated
    assert len(p.prompt_ids) + len(p.rejected_ids) == 40 and p.chosen_ids[-1] == 2
    assert len(p.rejected_ids) == 24 and p.rejected_ids[-1] != 2
    assert not pairs[1].prompt_truncated and not pairs[1].completion_truncated
    assert (report.prompt_truncated, report.completion_truncated) == (1, 1)


def test_prompt_cut_further_to_leave_one_completion_token(tokenizer):
    ex = validate_preference_row({"prompt": "one two three four five six seven eight",
                                  "chosen": "yes indeed", "rejected": "no"}, W)
    p = encode_preference(ex, tokenizer, max_length=4, max_prompt_length=None)
    full = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    assert p.prompt_ids == full[-3:] and len(p.chosen_ids) == len(p.rejected_ids) == 1
    with pytest.raises(InputError, match="max_length"):
        encode_preference(ex, tokenizer, max_length=1, max_prompt_length=None)


def test_fingerprint_changes_with_tokens(tokenizer):
    a = EncodedPair([1, 2], [3, 4], [5])
    b = EncodedPair([1], [2, 3, 4], [5])
    assert fingerprint([a]) == fingerprint([EncodedPair([1, 2], [3, 4], [5])])
    assert len({fingerprint([a]), fingerprint([b]), fingerprint([a, a])}) == 3


# --- collation ----------------------------------------------------------------------------

def test_collate_shapes_padding_and_masks():
    pairs = [EncodedPair([10, 11], [20, 2], [30, 31, 32, 2], index=7),
             EncodedPair([12], [21, 22, 2], [33, 2], index=3)]
    b = collate_pairs(pairs, pad_token_id=0)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["completion_mask"].shape == (4, 6)
    assert b["input_ids"].dtype == torch.long and b["completion_mask"].dtype == torch.bool
    assert b["input_ids"].tolist() == [[10, 11, 20, 2, 0, 0], [12, 21, 22, 2, 0, 0],
                                       [10, 11, 30, 31, 32, 2], [12, 33, 2, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
                                            [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert b["completion_mask"].int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0],
                                                   [0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]]
    assert b["index"].tolist() == [7, 3]
    assert not (b["completion_mask"] & (b["attention_mask"] == 0)).any()


def test_collate_dynamic_padding_on_real_data(tokenizer):
    pairs, _ = load_preference_data(str(SAMPLE / "prefs.jsonl"), tokenizer, max_length=512,
                                    max_prompt_length=256)
    b = collate_pairs(pairs[:4], tokenizer.pad_token_id)
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                  for p in pairs[:4])
    assert b["input_ids"].shape == (8, longest) and longest < 512
    assert b["completion_mask"].sum().item() == sum(len(p.chosen_ids) + len(p.rejected_ids)
                                                   for p in pairs[:4])


# --- shipped sample data ------------------------------------------------------------------

@pytest.mark.parametrize("name,n", [("prefs.jsonl", 300), ("prefs_eval.jsonl", 60),
                                    ("prefs_chat.jsonl", 40), ("prefs_implicit.jsonl", 20)])
def test_sample_data_loads_clean(tokenizer, name, n):
    pairs, report = load_preference_data(str(SAMPLE / name), tokenizer, max_length=512,
                                         max_prompt_length=256, skip_invalid=True)
    assert report.rows == report.kept == n == len(pairs) and not report.skipped
    assert report.prompt_truncated == report.completion_truncated == 0
    assert all(p.chosen_ids[-1] == p.rejected_ids[-1] == tokenizer.eos_token_id for p in pairs)


def test_sample_eval_prompts_disjoint():
    prompts = {name: {json.loads(line)["prompt"] for line in open(SAMPLE / name)}
               for name in ("prefs.jsonl", "prefs_eval.jsonl")}
    assert not prompts["prefs.jsonl"] & prompts["prefs_eval.jsonl"]
