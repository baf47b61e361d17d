"""COMPAT(issue 25): bridges for notebooks 04–08 until they are converted to the findings
framework (`findings.py`, `stats.py`, `Report.conclude`; see docs/STUDY.md). Remove this
module, and `Report.summarize` / `Report.savefig`, when no notebook uses them.

The verdicts here already speak the new vocabulary (agrees, disagrees, inconclusive, not
comparable; a notebook: "mixed: k of n agree"), but without the stated effect thresholds a
converted notebook's findings carry.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from . import stats
from .findings import AGREES, DISAGREES, INCONCLUSIVE, MIXED, NOT_COMPARABLE


def overall_verdict(verdicts: Sequence[str]) -> str:
    """The notebook rule of `findings.overall` applied to verdict words."""
    comparable = [v for v in verdicts if v != NOT_COMPARABLE]
    if not comparable:
        return NOT_COMPARABLE
    for word in (AGREES, DISAGREES, INCONCLUSIVE):
        if all(v == word for v in comparable):
            return word
    k = sum(v == AGREES for v in comparable)
    return f"{MIXED}: {k} of {len(comparable)} agree"


def paired_trend(values: pd.DataFrame, small: str, large: str, tol: float = 1e-12) -> dict:
    """Per-query paired comparison of column `large` against column `small`: means, counts of
    rises/falls/ties, the Wilcoxon p (`stats.wilcoxon`) and a word ("rises", "falls", "no clear
    change" for p ≥ 0.05, "too few queries" under 6 untied pairs)."""
    v = values[[small, large]].dropna()
    d = (v[large] - v[small]).to_numpy()
    d = np.where(np.abs(d) <= tol, 0.0, d)
    test = stats.wilcoxon(d)
    up, down = int((d > 0).sum()), int((d < 0).sum())
    res = {
        "n": len(d),
        "mean_small": float(v[small].mean()) if len(v) else float("nan"),
        "mean_large": float(v[large].mean()) if len(v) else float("nan"),
        "mean_diff": float(d.mean()) if len(d) else float("nan"),
        "rises": up,
        "falls": down,
        "ties": len(d) - up - down,
        "p": test.p if up + down >= 6 else float("nan"),
    }
    if up + down < 6:
        res["word"] = "too few queries"
    elif test.p >= 0.05:
        res["word"] = "no clear change"
    else:
        res["word"] = "rises" if res["mean_diff"] > 0 else "falls"
    return res


def verdict(trend: dict, expected: str) -> tuple[str, str]:
    """(verdict, reason) of a `paired_trend` against the paper's direction: agrees when the
    paired test shows it, disagrees when it shows the opposite, inconclusive otherwise."""
    if expected not in ("rises", "falls"):
        raise ValueError(f"expected must be 'rises' or 'falls', got {expected!r}")
    w, d, p = trend["word"], trend["mean_diff"], trend["p"]
    counts = f"{trend['rises']} up, {trend['falls']} down, {trend['ties']} tied"
    if w == expected:
        return AGREES, ""
    if w in ("rises", "falls"):
        return DISAGREES, f"{counts} (mean change {d:+.3g}, Wilcoxon {stats.p_clause(p)})"
    if w == "too few queries":
        return INCONCLUSIVE, f"too few queries with a change to test ({counts})"
    return INCONCLUSIVE, f"not significant ({counts}, Wilcoxon {stats.p_clause(p)})"


def trend_phrase(word: str) -> str:
    """A `paired_trend` word as a verb phrase ("rises", "shows no clear change", ...)."""
    return {
        "no clear change": "shows no clear change",
        "too few queries": "has too few queries that change to test",
    }.get(word, word)
