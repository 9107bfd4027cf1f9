"""Read raw rows from JSONL, JSON, Parquet, CSV, a ``save_to_disk`` folder or a hub dataset.

Every reader yields ``Record = (where, row_or_error)`` pairs, one per row:

* ``where`` is ``(file name, n)``: ``n`` is the 1-based *line* of the file for JSONL and CSV
  (for CSV the line the record starts on, the header being line 1: what an editor shows), and
  a 1-based :class:`~alignkit.errors.RowNumber` for JSON arrays, Parquet and ``datasets``
  folders / hub datasets, which messages print as "row n".
* ``row_or_error`` is the row (a ``dict``) or the :class:`InputError` that row raised
  (undecodable bytes, invalid JSON, not an object). Bad rows are errors *per row*, so the
  caller can skip one and go on (``--skip-invalid``).

A failure of the whole source (missing file, unreadable Parquet, a JSON file that is not
an array) is raised, not yielded.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from typing import Any, Union

from ..errors import InputError, RowNumber

Where = tuple[str, int]
Record = tuple[Where, Union[dict, InputError]]

_FILE_EXTS = (".jsonl", ".json", ".parquet", ".csv")
_BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark


def read_records(source: str, *, split: str = "train") -> Iterator[Record]:
    """Yield ``(where, row_or_error)`` for every row of ``source`` (see the module docstring).

    The format comes from the extension (.jsonl/.json/.parquet/.csv); a folder is read with
    ``datasets.load_from_disk``; anything else is taken as a hub dataset name (online only).
    """
    source = str(source)
    lower = source.lower()
    if os.path.isdir(source):
        yield from _read_saved_dataset(source, split)
    elif lower.endswith(_FILE_EXTS):
        if not os.path.isfile(source):
            raise InputError(f"data file not found: {source}", field="data")
        if lower.endswith(".jsonl"):
            yield from _read_jsonl(source)
        elif lower.endswith(".json"):
            yield from _read_json(source)
        elif lower.endswith(".parquet"):
            yield from _read_parquet(source)
        else:
            yield from _read_csv(source)
    elif os.path.exists(source):
        raise InputError(f"unsupported data format: {source} (use .jsonl, .json, .parquet, "
                         ".csv or a datasets folder)", field="data")
    else:
        yield from _read_hub(source, split)


def _parse_line(raw: bytes, where: Where) -> dict | InputError:
    """One JSONL line → its object, or the InputError describing why it is not one."""
    name, line = where
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return InputError(f"bytes are not valid UTF-8 (byte {e.start + 1} of the line)",
                          file=name, line=line, kind="undecodable")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return InputError(f"invalid JSON: {e.msg} (column {e.colno})",
                          file=name, line=line, kind="invalid_json")
    if not isinstance(row, dict):
        return InputError(f"expected a JSON object, got {type(row).__name__}",
                          file=name, line=line, kind="wrong_type")
    return row


def _read_jsonl(path: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(_BOM):  # the byte-order mark Windows editors write first
                raw = raw[len(_BOM):]
            if raw.strip():  # blank lines are skipped, not counted as rows
                where = (path, n)
                yield where, _parse_line(raw.rstrip(b"\r\n"), where)


def _read_json(path: str) -> Iterator[Record]:
    """A JSON array of objects. A file of one object per line (what ``Dataset.to_json``
    writes) is read as JSONL."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        parsed: Any = json.loads(data.decode("utf-8-sig"))  # a leading byte-order mark is dropped
    except UnicodeDecodeError:
        parsed = None  # let the line reader name the bad line
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise InputError(f"invalid JSON: {e.msg} (column {e.colno})", file=path,
                             line=e.lineno, kind="invalid_json") from None
        parsed = None
    if parsed is None:
        yield from _read_jsonl(path)
        return
    if not isinstance(parsed, list):
        raise InputError(f"a .json data file must hold an array of objects, got "
                         f"{type(parsed).__name__}", file=path, kind="wrong_type")
    for n, row in enumerate(parsed, start=1):
        yield (path, RowNumber(n)), row if isinstance(row, dict) else InputError(
            f"expected a JSON object, got {type(row).__name__}", file=path, line=RowNumber(n),
            kind="wrong_type")


def _read_parquet(path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any pyarrow failure means an unreadable file
        raise InputError(f"cannot read Parquet file: {e}", file=path, field="data") from None
    for n, row in enumerate(table.to_pylist(), start=1):
        yield (path, RowNumber(n)), row


def _read_csv(path: str) -> Iterator[Record]:
    """CSV with a header row. All values stay strings (standard format only). Each row is named
    by the file line it starts on (a quoted cell may span lines); blank lines are skipped, as
    ``csv.DictReader`` skips them; a short row's missing cells are None, a long row's extra cells dropped."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"file is not valid UTF-8 (byte offset {e.start})", file=path,
                         kind="undecodable") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)  # None: an empty file, no rows
        start = reader.line_num + 1  # the line the next record starts on
        for cells in reader if header is not None else ():
            line, start = start, reader.line_num + 1
            if cells:
                yield (path, line), {name: cells[i] if i < len(cells) else None for i, name in enumerate(header)}
    except csv.Error as e:
        raise InputError(f"cannot parse CSV: {e}", file=path, line=reader.line_num) from None


def _iter_dataset(ds: Any, name: str) -> Iterator[Record]:
    for n, row in enumerate(ds, start=1):
        yield (name, RowNumber(n)), dict(row)


def _pick_split(ds: Any, split: str, name: str) -> Any:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise InputError(f"split '{split}' not found (available: {', '.join(ds)})",
                             file=name, field="split")
        return ds[split]
    return ds


def _read_saved_dataset(path: str, split: str) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read the folder as a saved dataset: {e}", file=path,
                         field="data") from None
    yield from _iter_dataset(_pick_split(ds, split, path), path)


def _read_hub(name: str, split: str) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot find data '{name}': not a local file or folder, and loading "
                         f"it as a hub dataset failed ({type(e).__name__}: {e})",
                         field="data") from None
    yield from _iter_dataset(ds, name)
