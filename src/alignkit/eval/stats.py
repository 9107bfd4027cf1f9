"""Win-rate statistics: the pairwise comparison of two models' responses, as in InstructGPT's human evaluations.

Each prompt gives one outcome o ∈ [0, 1] for model A against model B: 1 if the judge scored A's response
higher, 0 if lower, 1/2 for a tie (ties counted half); with several responses per prompt, the mean of
that prompt's comparisons. The win rate is p̂ = mean(o) over prompts.

The 95% interval is Wilson's score interval (Wilson 1927) for p̂ with n = the number of prompts:

    (p̂ + z²/2n ± z·sqrt(p̂(1-p̂)/n + z²/4n²)) / (1 + z²/n)

It stays inside [0, 1] and is not degenerate at p̂ = 0 or 1 (a judge that always prefers A over 10
prompts gives [0.72, 1], not [1, 1]). For outcomes in [0, 1] the variance is at most p(1-p), with
equality when there are no ties, so with ties the interval is conservative (wider than needed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(p_hat: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval (low, high) for a proportion p_hat observed over n trials."""
    if n <= 0:
        return 0.0, 1.0
    centre = p_hat + z * z / (2 * n)
    half = z * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n))
    denom = 1 + z * z / n
    return max(0.0, (centre - half) / denom), min(1.0, (centre + half) / denom)


def outcome(score_a: float, score_b: float) -> float:
    """One comparison: 1 = A wins, 0 = B wins, 0.5 = tie."""
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


@dataclass(frozen=True)
class WinRate:
    """A's win rate against B over n prompts; wins/ties/losses count single comparisons."""

    rate: float
    ci_low: float
    ci_high: float
    n: int
    wins: int
    ties: int
    losses: int

    @property
    def significant(self) -> bool:
        """The 95% interval lies above 1/2: A beats B."""
        return self.ci_low > 0.5

    def as_dict(self) -> dict:
        return asdict(self)


def win_rate(scores_a: list[list[float]] | list[float], scores_b: list[list[float]] | list[float],
             z: float = Z95) -> WinRate:
    """A's win rate over B from the judge's scores, per prompt (one number, or one per response; the
    i-th response of A is compared with the i-th of B)."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} prompts scored for A but {len(scores_b)} for B")
    per_prompt, counts = [], [0, 0, 0]
    for a, b in zip(scores_a, scores_b):
        a, b = (list(a), list(b)) if isinstance(a, (list, tuple)) else ([a], [b])
        if len(a) != len(b) or not a:
            raise ValueError(f"a prompt has {len(a)} scores for A but {len(b)} for B")
        outs = [outcome(x, y) for x, y in zip(a, b)]
        for o in outs:
            counts[{1.0: 0, 0.5: 1, 0.0: 2}[o]] += 1
        per_prompt.append(sum(outs) / len(outs))
    n = len(per_prompt)
    rate = sum(per_prompt) / n if n else 0.5
    low, high = wilson_interval(rate, n, z)
    return WinRate(rate, low, high, n, *counts)
