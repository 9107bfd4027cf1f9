"""Errors the CLI turns into exit codes (DESIGN.md: 2 = bad input or config, 1 = anything else)."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: a data row, a config value, a model path.

    The message always names the place: ``file``, ``line`` (a 1-based line or row
    number where the format has one) and ``field``. The CLI prints ``str(err)`` and
    exits with code 2, never a traceback.
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
            place.append(f"line {self.line}")
        if self.field is not None:
            place.append(f"field '{self.field}'")
        return (", ".join(place) + ": " if place else "") + self.message


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient; nothing is saved past the last good step."""
