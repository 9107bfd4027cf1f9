"""What loading the data did: rows read, kept, skipped per kind, truncated."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from .tokenize import EncodedPair

MAX_EXAMPLES = 5  # skipped-row messages kept for the user


@dataclass
class DataReport:
    """Counts for one ``load_preference_data`` call."""

    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # kind -> count
    examples_of_skipped: list[str] = field(default_factory=list)
    prompt_truncated: int = 0
    completion_truncated: int = 0

    def add_skipped(self, err: InputError) -> None:
        self.skipped[err.kind] = self.skipped.get(err.kind, 0) + 1
        if len(self.examples_of_skipped) < MAX_EXAMPLES:
            self.examples_of_skipped.append(str(err))

    def add_kept(self, pair: EncodedPair) -> None:
        self.kept += 1
        self.prompt_truncated += pair.prompt_truncated
        self.completion_truncated += pair.completion_truncated

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line, e.g. ``"300 rows, 298 kept, 2 skipped (invalid_json 1, identical_pair 1);
        prompt truncated in 3, completion truncated in 0"``."""
        text = f"{self.rows} rows, {self.kept} kept"
        if self.skipped:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
            text += f", {self.n_skipped} skipped ({kinds})"
        return (text + f"; prompt truncated in {self.prompt_truncated}, "
                f"completion truncated in {self.completion_truncated}")
