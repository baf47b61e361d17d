"""Hub check: are the top influences of many queries the same few training sequences, and are
those the sequences with the largest self-influence?

A sequence whose gradient is large under the fitted curvature (large self-influence
∇L(z)ᵀ(G + λI)⁻¹∇L(z)) can top the list of many queries for that reason alone. Notebooks 02
and 03 show, per model: how many queries share each top sequence, and how much of the top-k is
taken by the `top_share` of sequences with the largest self-influence, against the base rate
`top_share` (`stats.enrichment`), with the Spearman correlation over all sequences between
the number of queries a sequence is a top-k member of and its self-influence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sstats

from . import stats


def top_ids(scores: torch.Tensor, k: int) -> list[np.ndarray]:
    """Per query: the training indices of its k largest positive scores (ties to the lower
    index), fewer when fewer are positive."""
    s = scores.double()
    k = min(k, s.shape[1])
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    vals = torch.gather(s, 1, order)
    return [o[v > 0].numpy() for o, v in zip(order, vals, strict=True)]


@dataclass(frozen=True)
class HubCheck:
    model: str
    k: int
    queries: int
    counts: np.ndarray  # [N] queries whose top-k holds each sequence
    enrichment: stats.Enrichment  # top-k share of the top self-influence sequences
    top_share: float
    spearman: float
    spearman_p: float

    def describe(self) -> str:
        most = int(self.counts.max()) if self.counts.size else 0
        pct = stats.format_share(self.top_share)
        return (
            f"at {self.model}, the {pct} of sequences with the largest self-influence take "
            f"{self.enrichment.describe()} of the top-{self.k} slots; the most shared sequence "
            f"is in the top-{self.k} of {most} of {self.queries} queries; Spearman correlation "
            f"of a sequence's queries with its self-influence "
            f"{stats.format_number(self.spearman, 2)} ({stats.p_clause(self.spearman_p)})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "k": self.k,
            "queries": self.queries,
            "max_shared": int(self.counts.max()) if self.counts.size else 0,
            "sequences_in_any_top_k": int((self.counts > 0).sum()),
            "enrichment": self.enrichment.as_dict(),
            "top_share": self.top_share,
            "spearman": self.spearman,
            "spearman_p": self.spearman_p,
        }


def hub_check(
    scores: Sequence[torch.Tensor],
    self_influence: torch.Tensor,
    *,
    model: str,
    k: int,
    top_share: float = 0.01,
    n_boot: int = 1000,
    seed: int = 0,
) -> HubCheck:
    """The hub check of one model: `scores` are its [Q, N] score tensors (one per query set),
    `self_influence` its [N] self-influences."""
    si = self_influence.double().numpy()
    n = si.shape[0]
    ids = [row for s in scores for row in top_ids(s, k)]
    counts = np.zeros(n, dtype=np.int64)
    for row in ids:
        counts[row] += 1
    n_top = max(1, math.ceil(top_share * n))
    top = np.zeros(n, dtype=bool)
    top[np.argsort(-si, kind="stable")[:n_top]] = True
    shares = [top[row].mean() for row in ids if len(row)]
    e = stats.enrichment(shares, n_top / n, n_boot=n_boot, seed=seed)
    rho, p = sstats.spearmanr(counts, si)
    return HubCheck(model, k, len(ids), counts, e, n_top / n, float(rho), float(p))


def hub_table(check: HubCheck, self_influence: torch.Tensor, train: pd.DataFrame, n: int = 5):
    """The `n` sequences in the most queries' top-k: how many queries, the sequence's
    self-influence percentile among all sequences, its kind and text (cut at 80 characters)."""
    si = self_influence.double().numpy()
    pct = sstats.rankdata(si) / si.shape[0]
    order = np.argsort(-check.counts, kind="stable")[:n]
    order = order[check.counts[order] > 0]
    return pd.DataFrame(
        {
            "train_id": order,
            "queries": check.counts[order],
            "self_influence_percentile": pct[order],
            "kind": train["kind"].to_numpy()[order],
            "text": [t[:80] for t in train["text"].to_numpy()[order]],
        }
    )
