"""The data layer: read rows, validate preference pairs, tokenize, collate.

Typical use::

    pairs, report = load_preference_data("prefs.jsonl", tokenizer, max_length=512,
                                          max_prompt_length=256)
    batch = collate_pairs(pairs[:8], tokenizer.pad_token_id)
"""

from __future__ import annotations

import hashlib
import sys
from array import array

from ..errors import InputError
from .collate import collate_pairs, collate_pairs_packed, collate_pairs_shared
from .preference import PreferenceExample, validate_preference_row
from .readers import Record, read_records
from .report import DataReport
from .tokenize import EncodedPair, check_lengths, encode_preference

__all__ = ["DataReport", "EncodedPair", "PreferenceExample", "Record", "collate_pairs", "collate_pairs_packed", "collate_pairs_shared",
           "encode_preference", "fingerprint", "load_preference_data", "read_records",
           "validate_preference_row"]


def load_preference_data(sources: list[str] | str, tokenizer, *, max_length: int | None,
                         max_prompt_length: int | None, chat_template_for_plain: bool = False,
                         skip_invalid: bool = False,
                         split: str = "train") -> tuple[list[EncodedPair], DataReport]:
    """Read, validate and tokenize every row of every source before returning.

    Without ``skip_invalid`` the first bad row raises its :class:`InputError`; with it, bad
    rows are skipped and counted per kind in ``DataReport.skipped``. Failures of a whole
    source (missing file, unreadable Parquet, a chat template that cannot split prompt from
    completion) always raise. Each kept pair's ``index`` is its position in the returned list.
    Zero kept rows raise ``InputError("no valid rows")``.
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    if not sources:
        raise InputError("no data sources given", field="data")
    check_lengths(max_length, max_prompt_length)
    pairs: list[EncodedPair] = []
    report = DataReport()
    for source in sources:
        for where, row in read_records(source, split=split):
            report.rows += 1
            try:
                pair = _encode_row(row, where, tokenizer, max_length, max_prompt_length,
                                   chat_template_for_plain)
            except InputError as err:
                if not skip_invalid or err.kind == "chat_template":
                    raise
                report.add_skipped(err)
                continue
            pair.index = len(pairs)
            pairs.append(pair)
            report.add_kept(pair)
    if not pairs:
        detail = f" ({report.summary()})" if report.rows else " (the data are empty)"
        raise InputError("no valid rows" + detail, file=", ".join(map(str, sources)))
    return pairs, report


def _encode_row(row, where, tokenizer, max_length, max_prompt_length,
                chat_template_for_plain) -> EncodedPair:
    if isinstance(row, InputError):
        raise row
    example = validate_preference_row(row, where)
    return encode_preference(example, tokenizer, max_length=max_length,
                             max_prompt_length=max_prompt_length,
                             chat_template_for_plain=chat_template_for_plain)


def fingerprint(pairs: list[EncodedPair]) -> str:
    """sha256 (hex) over every pair's prompt, chosen and rejected ids, in order.

    Lengths are hashed too, so moving a token between prompt and completion changes it.
    Used to key the reference log-prob cache.
    """
    h = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            h.update(_le_bytes([len(ids)]))
            h.update(_le_bytes(ids))
    return h.hexdigest()


def _le_bytes(values: list[int]) -> bytes:
    """int64 little-endian bytes, the same on every machine."""
    arr = array("q", values)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tobytes()
