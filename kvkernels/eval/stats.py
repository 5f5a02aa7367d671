"""Small-sample statistics for accuracies: Wilson intervals and exact paired tests (no SciPy needed).

Accuracies here rest on tens to a few hundred yes/no answers, so every reported number carries a 95 %
Wilson score interval (it stays inside [0, 1] and is honest at 0 and 1, unlike the normal interval).
Two methods answered on the SAME questions are compared paired: only the discordant questions (one
right, the other wrong) carry information, and McNemar's exact test is a two-sided binomial test of
those against a fair coin.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Sequence, Tuple

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """(low, high) Wilson score interval of ``correct`` successes in ``n`` trials; (nan, nan) when n == 0."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must lie in [0, n={n}], got {correct}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair-coin trials (1.0 when n == 0)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> Dict[str, float]:
    """Paired comparison of two methods on the same questions (``a[i]``, ``b[i]`` = question i correct).

    Returns the discordant counts (``a_only``: a right and b wrong; ``b_only``), the accuracy difference
    a - b, and McNemar's exact two-sided p-value.
    """
    if len(a) != len(b):
        raise ValueError(f"paired answers need the same questions: {len(a)} vs {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = len(a)
    return {"n": n, "a_only": a_only, "b_only": b_only,
            "diff": (a_only - b_only) / n if n else float("nan"),
            "p_value": binomial_two_sided_p(min(a_only, b_only), a_only + b_only)}


def ratio_interval(correct: int, n: int, full_correct: int, full_n: int) -> Tuple[float, float, float]:
    """(ratio, low, high) of a method's accuracy to the full cache's, from the two Wilson intervals.

    Conservative: the low end divides the method's low bound by the full cache's high bound and vice
    versa (a paired interval would be tighter; the McNemar test is the paired check).
    """
    if not n or not full_n or not full_correct:
        return float("nan"), float("nan"), float("nan")
    acc, full = correct / n, full_correct / full_n
    lo, hi = wilson_interval(correct, n)
    flo, fhi = wilson_interval(full_correct, full_n)
    return acc / full, lo / fhi, (hi / flo if flo > 0 else float("inf"))


def fmt_interval(correct: int, n: int) -> str:
    """'0.83 [0.74, 0.89]' for a table."""
    lo, hi = wilson_interval(correct, n)
    return f"{correct / n:.2f} [{lo:.2f}, {hi:.2f}]" if n else "n/a"


def keyed(rows: Iterable[Dict], keys=("task", "context", "question")) -> Dict[tuple, bool]:
    """{question identity: correct} of one setting's rows (for pairing two settings)."""
    return {tuple(r[k] for k in keys): bool(r["correct"]) for r in rows}
