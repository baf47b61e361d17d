"""Notebook 00's design log: every world and recipe tried while building the instrument
(issue 23), in order, with what it gave. The design was fixed on capability measures only
(accuracies and losses of `influence.study.capability`, on the default corpus, seed 0 unless
said), never on influence results. Sizes are named small to large; "seen", "near", "cross" are
the seen-fact, near-paraphrase and cross-lingual accuracies, "loss" the held-out loss.
"""

from __future__ import annotations

import pandas as pd

ATTEMPTS: list[dict[str, str]] = []


def table() -> pd.DataFrame:
    """The attempts as a table, one row each (columns attempt, change, result, decision)."""
    return pd.DataFrame(ATTEMPTS, columns=["attempt", "change", "result", "decision"])
