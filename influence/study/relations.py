"""How a training sequence relates to a query, read from the corpus labels (no model involved).

    labels = relation_labels(query_row, train_frame)      # one category per training row
    top = label_top_k(st.top_k("l", "facts", 10), st.queries("facts"))   # adds "relation"
    composition(top)                                       # share of each category, with CIs

Categories, by the query's kind (checked in this order, the first that applies wins):

fact queries (query sets facts, paraphrase, cross_lingual, word_order)
    "same fact, same words"   the fact's training sequence with the query's template and
                              language: the very text the model saw
    "same fact, other words"  the same fact in another template or language, or a word-order
                              "rewording" of it
    "shares a name"           any other sequence carrying the query's subject or object name:
                              another fact about the same entity, or the fact's other
                              word-order material (names without the fact in prompt order)
    "same relation"           another fact of the same relation, stated or in word-order
                              material (shares the relation's words, not the meaning)
    "unrelated"
math:  "same operation" (a worked problem of the same operation) / "other"
code:  "same function kind" / "other"
role-play: the corpus category of same-topic role-play passages ("assistant", "fiction",
       "essay", "distractor") / "unrelated"
quotes: "same saying" (a context quoting the same saying) / "other"

`LEVELS` maps every category to a coarse level comparable across query kinds: "seen text",
"same meaning", "surface" (shares names or template words only) and "unrelated".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .stats import bootstrap

SAME_WORDS = "same fact, same words"
OTHER_WORDS = "same fact, other words"
SHARES_NAME = "shares a name"
SAME_RELATION = "same relation"
UNRELATED = "unrelated"
FACT_CATEGORIES = (SAME_WORDS, OTHER_WORDS, SHARES_NAME, SAME_RELATION, UNRELATED)
MATH_CATEGORIES = ("same operation", "other")
CODE_CATEGORIES = ("same function kind", "other")
ROLE_PLAY_CATEGORIES = ("assistant", "fiction", "essay", "distractor", "unrelated")
QUOTE_CATEGORIES = ("same saying", "other")
CATEGORIES: dict[str, tuple[str, ...]] = {
    "fact": FACT_CATEGORIES,
    "math": MATH_CATEGORIES,
    "code": CODE_CATEGORIES,
    "role_play": ROLE_PLAY_CATEGORIES,
    "quote": QUOTE_CATEGORIES,
}
LEVELS: dict[str, str] = {
    SAME_WORDS: "seen text",
    OTHER_WORDS: "same meaning",
    SHARES_NAME: "surface",
    SAME_RELATION: "surface",
    UNRELATED: "unrelated",
    "same operation": "same meaning",
    "same function kind": "same meaning",
    "assistant": "same meaning",
    "fiction": "same meaning",
    "essay": "same meaning",
    "distractor": "surface",
    "same saying": "seen text",
    "other": "unrelated",
}
LEVEL_ORDER = ("seen text", "same meaning", "surface", "unrelated")
_LABELS = ("kind", "fact_id", "relation", "template_id", "language", "group", "topic")
_NAMES = ("subject", "object")


def categories(kind: str) -> tuple[str, ...]:
    """The categories of a query kind ("fact", "math", "code", "role_play", "quote")."""
    if kind not in CATEGORIES:
        raise ValueError(f"unknown query kind {kind!r}; valid kinds: {', '.join(CATEGORIES)}")
    return CATEGORIES[kind]


def _col(frame: Any, name: str, n: int) -> np.ndarray:
    if name not in frame:
        raise ValueError(f"missing label column {name!r}; the frame needs {_LABELS + _NAMES}")
    v = np.asarray(frame[name])
    return np.broadcast_to(v, (n,)) if v.ndim == 0 else v


def _label(q: Mapping[str, Any] | pd.DataFrame, t: pd.DataFrame) -> np.ndarray:
    """Categories for aligned pairs: row i of `t` against query labels `q` (scalars or row i)."""
    n = len(t)
    qk, tk = _col(q, "kind", n), _col(t, "kind", n)
    kinds = set(np.unique(qk).tolist())
    for k in kinds:
        categories(k)
    out = np.full(n, "", dtype=object)
    same = {c: _col(q, c, n) == _col(t, c, n) for c in ("fact_id", "group", "topic")}
    # math / code / quotes: same kind and same group label
    for kind, (hit, miss) in {
        "math": MATH_CATEGORIES,
        "code": CODE_CATEGORIES,
        "quote": QUOTE_CATEGORIES,
    }.items():
        m = qk == kind
        out[m] = np.where((tk[m] == kind) & same["group"][m], hit, miss)
    # role-play: the training passage's category when it is about the query's topic
    m = qk == "role_play"
    if m.any():
        cat = _col(t, "category", n)
        ok = (tk == "role_play") & same["topic"] & np.isin(cat, ROLE_PLAY_CATEGORIES[:4])
        out[m] = np.where(ok[m], cat[m], UNRELATED)
    # facts
    m = qk == "fact"
    if m.any():
        fact_rows = np.isin(tk, ("fact", "word_order"))
        same_fact = fact_rows & same["fact_id"] & (_col(t, "fact_id", n) >= 0)
        same_words = (
            same_fact
            & (tk == "fact")
            & (_col(q, "template_id", n) == _col(t, "template_id", n))
            & (_col(q, "language", n) == _col(t, "language", n))
        )
        other_words = same_fact & ((tk == "fact") | (_col(t, "group", n) == "rewording"))
        qs, qo = _col(q, "subject", n), _col(q, "object", n)
        ts, to = _col(t, "subject", n), _col(t, "object", n)
        shares = np.zeros(n, dtype=bool)
        for a in (ts, to):
            for b in (qs, qo):
                shares |= (a == b) & (a != "")
        same_rel = fact_rows & (_col(q, "relation", n) == _col(t, "relation", n))
        cat = np.select(
            [same_words, other_words, shares, same_rel],
            [SAME_WORDS, OTHER_WORDS, SHARES_NAME, SAME_RELATION],
            default=UNRELATED,
        )
        out[m] = cat[m]
    return out.astype(str)


def relation_labels(query_row: Mapping[str, Any], train_frame: pd.DataFrame) -> np.ndarray:
    """Category of every training row (`train_frame`, e.g. `st.train_frame()`) for one query
    (a mapping or pandas row with the corpus label columns, e.g. a row of `st.queries(qs)`)."""
    q = {c: query_row[c] for c in _LABELS + _NAMES}
    return _label(q, train_frame)


def label_top_k(top_k: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
    """`top_k` (rows with a `query` column and the training labels, as `st.top_k` returns)
    with two columns added: `relation` (category, see module doc) and `level` (`LEVELS`).
    `queries` is the query frame indexed by `query` (`st.queries(qs)`)."""
    if "query" not in top_k:
        raise ValueError("top_k needs a 'query' column (row of the query frame)")
    missing = sorted(set(top_k["query"]) - set(queries.index))
    if missing:
        raise ValueError(f"top_k refers to queries {missing[:5]} absent from `queries`' index")
    q = queries.loc[top_k["query"].to_numpy(), list(_LABELS + _NAMES)].reset_index(drop=True)
    out = top_k.copy()
    out["relation"] = _label(q, top_k.reset_index(drop=True))
    out["level"] = out["relation"].map(LEVELS)
    return out


def per_query_shares(
    labeled: pd.DataFrame, column: str = "relation", order: Sequence[str] | None = None
) -> pd.DataFrame:
    """Share of each category among each query's rows: index (the frame's grouping columns
    present among model, query_set, query), one column per category, rows summing to 1."""
    keys = [c for c in ("model", "query_set", "query") if c in labeled]
    if "query" not in keys:
        raise ValueError("labeled needs a 'query' column")
    counts = pd.crosstab([labeled[k] for k in keys], labeled[column])
    cols = list(order) if order is not None else sorted(counts.columns)
    extra = sorted(set(counts.columns) - set(cols))
    if extra:
        raise ValueError(f"categories {extra} are not in `order` {cols}")
    counts = counts.reindex(columns=cols, fill_value=0)
    return counts.div(counts.sum(axis=1), axis=0)


def composition(
    labeled: pd.DataFrame,
    by: Sequence[str] = ("model", "query_set"),
    column: str = "relation",
    order: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean share of each category among the queries' top-k rows (`labeled`, from
    `label_top_k`), per group of `by`, with a bootstrap interval over queries
    (`stats.bootstrap`; NaN bounds for a group of one query).

    Long frame: *by, category, share, low, high, n_queries. Every query weighs the same
    (its k rows give its shares), so the shares of a group sum to 1."""
    recs = []
    by = list(by)
    for key, sub in labeled.groupby(by, sort=False) if by else [((), labeled)]:
        key = key if isinstance(key, tuple) else (key,)
        shares = per_query_shares(sub, column, order)
        ci = bootstrap(shares.to_numpy(), n_boot=n_boot, seed=seed)
        for j, cat in enumerate(shares.columns):
            recs.append(
                {
                    **dict(zip(by, key, strict=True)),
                    "category": cat,
                    "share": float(ci.estimate[j]),
                    "low": float(ci.low[j]),
                    "high": float(ci.high[j]),
                    "n_queries": len(shares),
                }
            )
    return pd.DataFrame(recs)
