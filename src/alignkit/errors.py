"""Errors the CLI turns into exit codes (DESIGN.md: 2 = bad input or config, 1 = anything else)."""

from __future__ import annotations


class RowNumber(int):
    """A 1-based row index where the format has no lines to point at (a JSON array, Parquet, a
    ``datasets`` folder or hub dataset): an :class:`InputError` whose ``line`` is one prints
    "row N" instead of "line N"."""


class InputError(Exception):
    """Bad user input: a data row, a config value, a model path.

    The message always names the place: ``file``, ``line`` (the 1-based line of the file, or a
    :class:`RowNumber` where the format has rows rather than lines) and ``field``. The CLI prints
    ``str(err)`` and exits with code 2, never a traceback.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, kind: str = "invalid"):
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.kind = kind  # short category, used to count skipped rows per kind
        super().__init__(self.__str__())

    def __str__(self) -> str:
        place = []
        if self.file is not None:
            place.append(str(self.file))
        if self.line is not None:
            place.append(f"{'row' if isinstance(self.line, RowNumber) else 'line'} {self.line}")
        if self.field is not None:
            place.append(f"field '{self.field}'")
        return (", ".join(place) + ": " if place else "") + self.message


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient; nothing is saved past the last good step."""
