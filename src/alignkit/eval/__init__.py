"""Evaluation: win rates of one model's responses against another's (``alignkit eval``)."""

from .stats import WinRate, outcome, wilson_interval, win_rate

__all__ = ["WinRate", "outcome", "wilson_interval", "win_rate"]
