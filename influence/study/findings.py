"""One vocabulary for what the study concludes: a `Finding` per claim of the paper, a verdict
per finding, and one verdict per notebook.

    f = judge("meaning share", "related by meaning rises with size", "rises (Figs. 1, 12-13)",
              effect=trend.change, test=trend.test, expected=+1, threshold=0.05,
              what="the change across the suite")
    verdict, reason = overall([f, ...])

A finding's verdict, from its numbers and a threshold stated with it (`ALPHA` = 0.05):

- **agrees**: significant (p < ALPHA), in the paper's direction, effect at least the threshold;
- **disagrees**: significant, opposite to the paper's direction, effect at least the threshold;
- **inconclusive**: not significant, or smaller than the threshold (either direction), or no
  test possible (no query changes);
- **not comparable**: the paper's quantity has no counterpart here (`not_comparable`, with the
  reason stated from the numbers, e.g. per-copy values that scale with the corpus size).

A notebook's verdict (`overall`): "agrees" only if every comparable finding agrees,
"disagrees" only if every one disagrees, "inconclusive" if every one is inconclusive, "not
comparable" if none is comparable, otherwise "mixed: k of n agree" (n comparable findings).
The reason of a finding is generated from its numbers; no prose states a trend by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from .stats import Interval, Test, format_number, format_p, p_clause

ALPHA = 0.05
AGREES, DISAGREES, INCONCLUSIVE, NOT_COMPARABLE = (
    "agrees",
    "disagrees",
    "inconclusive",
    "not comparable",
)
VERDICTS = (AGREES, DISAGREES, INCONCLUSIVE, NOT_COMPARABLE)
MIXED = "mixed"  # a notebook's verdict: "mixed: k of n agree"


def is_verdict(text: str, notebook: bool = False) -> bool:
    """A finding's verdict word, or (notebook=True) also "mixed: k of n agree"."""
    if text in VERDICTS:
        return True
    return notebook and text.startswith(f"{MIXED}: ") and text.endswith(" agree")


@dataclass(frozen=True)
class Finding:
    """One claim of the paper against our measurement of it."""

    name: str  # a few words, for the one-sentence reasons of the index
    claim: str  # the paper's claim
    paper: str  # the paper's value or direction
    ours: str  # our estimate with its interval, formatted
    test: str  # the test, its sample size and p ("" when none)
    p: float | None
    threshold: str  # the effect the verdict requires, stated
    verdict: str
    reason: str  # generated from the numbers
    base_rate: str = ""  # the corpus share, where a share is compared
    estimate: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}; valid: {', '.join(VERDICTS)}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("p", "estimate", "low", "high"):
            v = d[k]
            d[k] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
        d["ci"] = None if d["low"] is None else [d["low"], d["high"]]
        return d


def _min_p(n: int) -> float:
    """The smallest two-sided p a signed-rank or sign test can give with n nonzero pairs."""
    return min(1.0, 2.0 / 2**n) if n > 0 else 1.0


def judge(
    name: str,
    claim: str,
    paper: str,
    *,
    effect: Interval,
    test: Test,
    expected: int,
    threshold: float,
    what: str,
    fmt: Callable[[float], str] = format_number,
    ours: str | None = None,
    base_rate: str = "",
    alpha: float = ALPHA,
    extra: dict[str, Any] | None = None,
) -> Finding:
    """A finding whose verdict follows from `effect` (signed, in the value's units), the test's
    p, the paper's direction `expected` (+1 or -1) and `threshold` (the smallest |effect| that
    counts). `what` names the effect in the reason ("the change across the suite"); `ours`
    (default: the effect with its interval) is what the table shows as our value."""
    if expected not in (1, -1):
        raise ValueError(f"expected must be +1 or -1 (the paper's direction), got {expected!r}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    est, p = effect.estimate, test.p
    size = fmt(threshold).lstrip("+")
    stated = f"|{what}| ≥ {size} and p < {alpha:g}"
    shown = f"{what} = {fmt(est)}"
    if not math.isfinite(est) or p is None or not math.isfinite(p):
        verdict = INCONCLUSIVE
        reason = f"no test is possible: no {test.over} with a nonzero difference"
    else:
        significant = p < alpha
        big = abs(est) >= threshold
        along = (est > 0) == (expected > 0) and est != 0
        if significant and big:
            verdict = AGREES if along else DISAGREES
            side = "the paper's direction" if along else "opposite to the paper"
            reason = f"{shown}: {side}, at least {size}, {p_clause(p)}"
        elif significant:
            verdict = INCONCLUSIVE
            reason = f"{shown}: significant ({p_clause(p)}) but smaller than {size}"
        else:
            verdict = INCONCLUSIVE
            reason = f"{shown}: not significant ({p_clause(p)})"
            if _min_p(test.n) >= alpha:
                reason += f"; with {test.n} {test.over} no test can reach p < {alpha:g}"
    return Finding(
        name=name,
        claim=claim,
        paper=paper,
        ours=ours if ours is not None else effect.format(fmt),
        test=test.describe(),
        p=p,
        threshold=stated,
        verdict=verdict,
        reason=reason,
        base_rate=base_rate,
        estimate=est,
        low=effect.low,
        high=effect.high,
        extra=dict(extra or {}),
    )


def not_comparable(
    name: str, claim: str, paper: str, *, ours: str, reason: str, extra: dict | None = None
) -> Finding:
    """A claim whose quantity has no counterpart here; `reason` says why, with numbers."""
    return Finding(
        name=name,
        claim=claim,
        paper=paper,
        ours=ours,
        test="",
        p=None,
        threshold="",
        verdict=NOT_COMPARABLE,
        reason=reason,
        extra=dict(extra or {}),
    )


def overall(findings: Sequence[Finding]) -> tuple[str, str]:
    """The notebook's verdict and a one-sentence reason naming the findings by verdict."""
    if not findings:
        raise ValueError("a notebook's verdict needs at least one finding")
    comparable = [f for f in findings if f.verdict != NOT_COMPARABLE]
    by = {v: [f.name for f in findings if f.verdict == v] for v in VERDICTS}
    n, k = len(comparable), len(by[AGREES])
    if not comparable:
        verdict = NOT_COMPARABLE
    elif k == n:
        verdict = AGREES
    elif len(by[DISAGREES]) == n:
        verdict = DISAGREES
    elif len(by[INCONCLUSIVE]) == n:
        verdict = INCONCLUSIVE
    else:
        verdict = f"{MIXED}: {k} of {n} agree"
    present = [v for v in VERDICTS if by[v]]
    if len(present) == 1:  # the verdict already says it: "agrees: a, b", not "agrees: agree: a, b"
        return verdict, ", ".join(by[present[0]]) + "."
    labels = {AGREES: "agree", DISAGREES: "disagree", INCONCLUSIVE: "inconclusive",
              NOT_COMPARABLE: "not comparable"}  # fmt: skip
    parts = [f"{labels[v]}: {', '.join(by[v])}" for v in present]
    return verdict, "; ".join(parts) + "."


COLUMNS = {
    "claim": "the paper's claim",
    "paper": "paper",
    "ours": "ours [95% CI]",
    "base_rate": "corpus base rate",
    "test": "test",
    "verdict": "verdict",
    "reason": "why",
    "threshold": "rule",
}


def frame(findings: Sequence[Finding]) -> pd.DataFrame:
    """The findings as a table (columns of `COLUMNS`; the base-rate column only when a finding
    has one), for the report page and the notebook."""
    rows = [{k: getattr(f, k) for k in COLUMNS} for f in findings]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    if not any(f.base_rate for f in findings):
        df = df.drop(columns="base_rate")
    return df


def headline(findings: Sequence[Finding], digits: int = 2) -> str:
    """The findings' numbers rounded to `digits` significant figures, one line each: what a
    notebook's NBVAL_CHECK_OUTPUT cell prints, so a change of result fails nbval."""

    def r(x: float) -> str:
        return format_number(x, digits)

    lines = []
    for f in findings:
        if f.verdict == NOT_COMPARABLE:
            lines.append(f"{f.name}: -> {f.verdict}")
            continue
        ci = f" [{r(f.low)}, {r(f.high)}]" if math.isfinite(f.low) else ""
        lines.append(f"{f.name}: {r(f.estimate)}{ci} p {format_p(f.p)} -> {f.verdict}")
    return "\n".join(lines)
