"""Notebook 07 (paper §5.3.2, App. B): where in the network (blocks) and where in a training
sequence (tokens) does its influence on a query sit? The research question as one unit: its
preset block (`PRESETS`, `RANGES`), its analysis, its findings (`findings`) and its figures.

    shares = layer_share_table(st, k=10)        # one row per model/set/query/layer
    blocks = block_share_table(shares)          # the same per transformer block
    restr = restriction_table(st, 10, tokenizer)    # top-k ranked by one block's scores
    toks = token_attribution(st, "xl", "facts", 3, 3)   # tokenwise scores of the top sequences
    found = findings(blocks, restr, token_shares(toks, ...), "xl")

Block share (per query): the query's top-k training sequences by the total score; a block's
share is the sum of its tracked layers' scores over those k sequences divided by the sum of the
total scores over them, so the shares of a query sum to 1 (a block can be negative). Models
differ in depth, so a block's share is also given relative to an even split, share × blocks
(1 = even). Relative depth of block b of a model with n blocks: (b + ½) / n; its third cuts
that at ⅓ and ⅔. A third holds unequal numbers of blocks in most models (1:2:1 of 4 blocks,
2:1:2 of 5), so every comparison of thirds averages per block: the restriction experiment ranks
the training data by one block's scores at a time, and a third's value is the mean over its
blocks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import relations as R
from . import stats, style
from .abstraction import jaccard, model_params
from .abstraction import token_sets as text_token_sets
from .findings import Finding, judge, not_comparable
from .ranges import count

SECTION = "07_layers_and_tokens"
# top_k: sequences per query whose influence is split by block and ranked in the restriction
# experiment; token_queries / token_sequences: queries per query set and top sequences per
# query split by token (largest model); n_boot: bootstrap resamples over queries.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"top_k": 5, "token_queries": 3, "token_sequences": 3, "n_boot": 200},
    "default": {"top_k": 10, "token_queries": 3, "token_sequences": 3, "n_boot": 1000},
    "large": {"top_k": 20, "token_queries": 4, "token_sequences": 3, "n_boot": 1000},
}
RANGES = {
    "top_k": count(1, "top sequences per query"),
    "token_queries": count(1, "queries per query set split by token"),
    "token_sequences": count(1, "top sequences per query split by token"),
    "n_boot": count(1, "bootstrap resamples"),
}

THIRDS = ("lower", "middle", "upper")
# The query sets compared by block (notebook order) and the names a reader sees: the
# cross-lingual queries ask a fact in a language it was never stated in; they are fact
# queries, not the paper's translation queries.
QUERY_TYPES = ("facts", "paraphrase", "cross_lingual", "math", "code", "quotes", "role_play")
TYPE_NAMES = {
    "facts": "facts",
    "paraphrase": "paraphrased facts",
    "cross_lingual": "cross-lingual facts",
    "math": "math",
    "code": "code",
    "quotes": "quotes",
    "role_play": "role-play",
}
UPPER_TYPES = ("facts", "paraphrase", "quotes")  # the paper: facts and memorised quotes, upper
MIDDLE_TYPES = ("math", "code")  # the paper: math, code (and translation), middle
# Thresholds of the findings, fixed from the paper's claims:
EVEN_FACTOR = 2.0  # "roughly even": no block holds more than twice an even share
MOST, MOST_MARGIN = 0.5, 0.10  # "most queries": a share tested against ½, 10 points above it
DEPTH_THRESHOLD = 0.25  # "sits in the upper / middle blocks": a quarter of an even share more
SHARE_THRESHOLD = 0.05  # 5 points of a share (same-meaning share, share on the query's tokens)
OVERLAP_THRESHOLD = 0.02  # 0.02 of a Jaccard index of content tokens
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


# -- depth -------------------------------------------------------------------------------------
def block_index(name: str) -> int:
    """The transformer block a tracked layer belongs to, from its module name
    (`model.layers.3.mlp.up_proj` -> 3)."""
    m = _BLOCK.search(name)
    if m is None:
        raise ValueError(
            f"layer {name!r} has no block index (expected a name like 'model.layers.3.mlp.up_proj')"
        )
    return int(m.group(1))


def third_of(rel_depth: float) -> str:
    """lower / middle / upper third of a relative depth in [0, 1]."""
    if not 0 <= rel_depth <= 1:
        raise ValueError(f"relative depth must be in [0, 1], got {rel_depth}")
    return THIRDS[min(int(rel_depth * 3), 2)]


def layer_depths(layers: Sequence[str]) -> pd.DataFrame:
    """One row per layer (index = name): block, n_blocks, rel_depth = (block + ½)/n_blocks,
    third. Blocks without a tracked layer do not count."""
    if not layers:
        raise ValueError("layers is empty")
    blocks = [block_index(n) for n in layers]
    pos = {b: i for i, b in enumerate(sorted(set(blocks)))}
    n = len(pos)
    rel = [(pos[b] + 0.5) / n for b in blocks]
    return pd.DataFrame(
        {"block": [pos[b] for b in blocks], "n_blocks": n, "rel_depth": rel,
         "third": [third_of(r) for r in rel]},
        index=pd.Index(list(layers), name="layer"),
    )  # fmt: skip


def depth_table(st: Any) -> pd.DataFrame:
    """Per model: parameters, blocks, tracked layers and blocks per third."""
    params = model_params(st)
    rows = []
    for m in st.models:
        d = layer_depths(st.layers[m]).drop_duplicates("block")
        per = d["third"].value_counts()
        rows.append({"model": m, "params": params[m], "blocks": len(d),
                     "layers": len(st.layers[m]),
                     **{t: int(per.get(t, 0)) for t in THIRDS}})  # fmt: skip
    return pd.DataFrame(rows)


# -- block shares ------------------------------------------------------------------------------
def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, k] indices of the k largest scores per row (ties to the lower index)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [Q, N], got {tuple(scores.shape)}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be between 1 and {scores.shape[1]}, got {k}")
    return torch.sort(-scores.double(), dim=1, stable=True).indices[:, :k]


def layer_shares(by_layer: Mapping[str, torch.Tensor], k: int) -> pd.DataFrame:
    """[Q, layers] share of each layer in the influence of the query's top-k sequences (by the
    total score); rows sum to 1. Rows whose top-k total is not positive are NaN."""
    if not by_layer:
        raise ValueError("by_layer is empty")
    names = list(by_layer)
    stack = torch.stack([by_layer[n].double() for n in names])  # [L, Q, N]
    idx = top_k_indices(stack.sum(0), k)
    per_layer = torch.gather(stack, 2, idx.expand(len(names), *idx.shape)).sum(-1)  # [L, Q]
    denom = per_layer.sum(0)
    share = per_layer / denom
    share[:, denom <= 0] = float("nan")
    return pd.DataFrame(share.T.numpy(), columns=names).rename_axis("query")


def layer_share_table(
    st: Any, k: int, query_sets: Sequence[str] | None = None, models: Sequence[str] | None = None
) -> pd.DataFrame:
    """Long table: model, query_set, query, layer, block, n_blocks, rel_depth, third, share."""
    sets = [q for q in (query_sets or QUERY_TYPES) if q in st.query_sets]
    frames = []
    for model in models or st.models:
        depth = layer_depths(st.layers[model])
        for qs in sets:
            wide = layer_shares(st.by_layer(model, qs), k)
            long = wide.reset_index().melt(id_vars="query", var_name="layer", value_name="share")
            long = long.join(depth, on="layer")
            long.insert(0, "query_set", qs)
            long.insert(0, "model", model)
            frames.append(long)
    return pd.concat(frames, ignore_index=True)


def block_share_table(shares: pd.DataFrame) -> pd.DataFrame:
    """Per model, query set, query and block: its share (the sum of its layers') and `even`,
    the share relative to an even split (share × blocks; 1 = even). Queries without a share
    (top-k total not positive) are left out."""
    keys = ["model", "query_set", "query", "block", "n_blocks", "rel_depth", "third"]
    out = shares.dropna(subset=["share"]).groupby(keys, sort=False, observed=True)["share"].sum()
    out = out.reset_index()
    out["even"] = out["share"] * out["n_blocks"]
    return out


def evenness(blocks: pd.DataFrame) -> pd.DataFrame:
    """Per model and query: the largest block's share relative to an even split, and whether
    it is at most `EVEN_FACTOR` (influence spread roughly evenly)."""
    g = blocks.groupby(["model", "query_set", "query"], sort=False)
    out = g.agg(n_blocks=("n_blocks", "first"), largest=("even", "max")).reset_index()
    out["even_spread"] = out["largest"] <= EVEN_FACTOR
    return out


def evenness_table(even: pd.DataFrame) -> pd.DataFrame:
    """Per model: blocks, the median over queries of the largest block's share (× an even
    split) and the share of queries whose largest block holds at most `EVEN_FACTOR` times."""
    g = even.groupby("model", sort=False)
    return pd.DataFrame(
        {
            "blocks": g["n_blocks"].first(),
            "queries": g.size(),
            "largest_median": g["largest"].median(),
            "even_share": g["even_spread"].mean(),
        }
    ).reset_index()


def depth_centroid(blocks: pd.DataFrame) -> pd.DataFrame:
    """Per model, query set and query: the share-weighted mean relative depth of its blocks,
    negative shares counted as 0 (so it stays within the model's depth range)."""
    b = blocks.assign(w=blocks["share"].clip(lower=0))
    b["wd"] = b["w"] * b["rel_depth"]
    g = b.groupby(["model", "query_set", "query"], sort=False)[["w", "wd"]].sum()
    g["centroid"] = g["wd"] / g["w"].where(g["w"] > 0)
    return g[["centroid"]].reset_index()


def centroid_table(
    centroid: pd.DataFrame, models: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Rows: query type (in words); columns: each model's mean depth centroid [95% CI]."""
    cells = centroid.groupby(["query_set", "model"], sort=False)["centroid"].apply(
        lambda s: stats.bootstrap(s.to_numpy(), n_boot=n_boot, seed=seed).format(_two)
    )
    wide = cells.unstack("model").reindex(columns=list(models))
    wide = wide.reindex([q for q in QUERY_TYPES if q in wide.index])
    return wide.rename(index=TYPE_NAMES).rename_axis(index="query type").reset_index()


def depth_contrast(blocks: pd.DataFrame, where: str) -> pd.DataFrame:
    """Per model, query set and query: the mean share (× an even split) of the blocks in the
    upper third minus that of the other blocks (`where="upper"`), or of the middle third minus
    the lower and upper thirds (`where="middle"`). NaN where a side has no block."""
    if where not in ("upper", "middle"):
        raise ValueError(f"where must be 'upper' or 'middle', got {where!r}")
    inside = blocks["third"] == where
    keys = ["model", "query_set", "query"]
    a = blocks[inside].groupby(keys, sort=False)["even"].mean()
    b = blocks[~inside].groupby(keys, sort=False)["even"].mean()
    return (a - b).rename("contrast").reset_index()  # NaN where a side has no block


def contrast_table(
    blocks: pd.DataFrame, models: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per model: for the paper's upper group (facts, quotes) the upper-third contrast, for its
    middle group (math, code) the middle-third contrast (`depth_contrast`), each the mean over
    queries [95% CI] with the Wilcoxon p."""
    rows = {m: {"model": m} for m in models}
    for where, types in (("upper", UPPER_TYPES), ("middle", MIDDLE_TYPES)):
        c = depth_contrast(blocks[blocks["query_set"].isin(types)], where)
        for m in models:
            v = c[c["model"] == m]["contrast"].to_numpy(dtype=float)
            rows[m][where] = stats.bootstrap(v, n_boot=n_boot, seed=seed).format(_two)
            rows[m][f"{where}_p"] = stats.wilcoxon(v).p
    return pd.DataFrame(list(rows.values()))


# -- restriction experiment --------------------------------------------------------------------
def content_stopword_ids(tokenizer: Any) -> set[int]:
    """Token ids that carry no content: special tokens, tokens without a letter or digit
    (punctuation, whitespace) and English function words (`bm25s.stopwords.STOPWORDS_EN`)."""
    from bm25s.stopwords import STOPWORDS_EN

    stop = set(STOPWORDS_EN)
    out = set(tokenizer.all_special_ids)
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid]).strip().lower()
        if not any(c.isalnum() for c in text) or text in stop:
            out.add(tid)
    return out


def content_sets(tokenizer: Any, texts: Sequence[str], stop: set[int]) -> list[set[int]]:
    """The content-token set of each text (its token ids, `stop` ids removed)."""
    return [s - stop for s in text_token_sets(tokenizer, texts)]


def restriction_table(st: Any, k: int, tokenizer: Any, query_sets: Sequence[str] | None = None):
    """One row per model, query set, query, ranking and rank. Rankings: "all layers", and one
    per block (the sum of that block's tracked layers only), with the block's index, relative
    depth and third. Each of the top-k sequences (by that ranking) gets its level of relation
    to the query (`relations.LEVELS`: seen text, same meaning, surface, unrelated) and its
    token overlap with the query (Jaccard index of content tokens, `content_sets`)."""
    sets = [q for q in (query_sets or QUERY_TYPES) if q in st.query_sets]
    train = st.train_frame()
    stop = content_stopword_ids(tokenizer)
    train_sets = content_sets(tokenizer, train["text"].tolist(), stop)
    frames = []
    for qs in sets:
        q = st.queries(qs)
        qsets = content_sets(tokenizer, (q["prompt"] + q["completion"]).tolist(), stop)
        levels = np.stack([np.vectorize(R.LEVELS.get)(R.relation_labels(r, train))
                           for _, r in q.iterrows()])  # fmt: skip
        for model in st.models:
            depth = layer_depths(st.layers[model])
            by_layer = st.by_layer(model, qs)
            rankings = {("all layers", -1): list(st.layers[model])}
            for b, d in depth.groupby("block"):
                rankings[(f"block {b}", b)] = list(d.index)
            for (name, b), layers in rankings.items():
                idx = top_k_indices(sum(by_layer[n].double() for n in layers), k).numpy()
                rel = depth["rel_depth"][depth["block"] == b].iloc[0] if b >= 0 else np.nan
                frames.append(
                    pd.DataFrame(
                        {
                            "model": model,
                            "query_set": qs,
                            "ranking": name,
                            "block": b,
                            "rel_depth": rel,
                            "third": third_of(rel) if b >= 0 else "",
                            "query": np.repeat(np.arange(len(q)), idx.shape[1]),
                            "rank": np.tile(np.arange(1, idx.shape[1] + 1), len(q)),
                            "train_index": idx.ravel(),
                            "level": np.take_along_axis(levels, idx, axis=1).ravel(),
                            "overlap": [jaccard(qsets[i], train_sets[j])
                                        for i, row in enumerate(idx) for j in row],
                        }
                    )
                )  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def restriction_per_query(table: pd.DataFrame) -> pd.DataFrame:
    """Per model, ranking (block or all layers), query set and query: the share of the top-k
    that is the same meaning (`relations` level) and the mean token overlap."""
    keys = ["model", "ranking", "block", "rel_depth", "third", "query_set", "query"]
    t = table.assign(same_meaning=(table["level"] == "same meaning").astype(float))
    return (
        t.groupby(keys, sort=False, dropna=False)[["same_meaning", "overlap"]].mean().reset_index()
    )


def restriction_by_third(per_query: pd.DataFrame) -> pd.DataFrame:
    """Per model, query set, query and third: the mean over the third's blocks of the per-block
    values (every block weighs the same, however many a third holds)."""
    blocks = per_query[per_query["block"] >= 0]
    keys = ["model", "query_set", "query", "third"]
    return blocks.groupby(keys, sort=False)[["same_meaning", "overlap"]].mean().reset_index()


def middle_contrast(by_third: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per model, query set and query: `value` of the middle third minus the mean of the lower
    and upper thirds' (NaN where the model has no middle third)."""
    wide = by_third.pivot_table(index=["model", "query_set", "query"], columns="third",
                                values=value)  # fmt: skip
    wide = wide.reindex(columns=list(THIRDS))
    return (wide["middle"] - wide[["lower", "upper"]].mean(axis=1)).rename("contrast").reset_index()


def restriction_summary(per_query: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """Per model and ranking (all layers, then each third: the mean over its blocks): the mean
    over queries of the same-meaning share and of the token overlap."""
    allq = per_query[per_query["block"] < 0].assign(third="all layers")
    thirds = restriction_by_third(per_query)
    both = pd.concat([allq[thirds.columns], thirds], ignore_index=True)
    out = both.groupby(["model", "third"], sort=False)[["same_meaning", "overlap"]].mean()
    order = [(m, t) for m in models for t in ("all layers", *THIRDS) if (m, t) in out.index]
    return out.loc[order].reset_index().rename(columns={"third": "ranking"})


# -- tokens ------------------------------------------------------------------------------------
@dataclass
class TokenRows:
    """Tokenwise scores of the top sequences of some queries of one query set at one model."""

    query_set: str
    queries: pd.DataFrame  # the query rows (prompt, completion, labels)
    top: np.ndarray  # [Q, S] training indices, by the total score
    total: np.ndarray  # [Q, S] the stage's total scores of those
    by_token: list[list[np.ndarray]]  # [q][s] per-position terms of the sequence's real tokens
    token_ids: list[list[list[int]]]  # [q][s] its token ids
    check: dict[str, float]  # Σ tokens against the score recomputed and the stage's score


def token_check(by_token: torch.Tensor, total: torch.Tensor) -> dict[str, float]:
    """How well per-token contributions [Q, N, T] sum to the scores [Q, N]: the largest
    absolute difference and that difference relative to the largest |score|."""
    diff = (by_token.double().sum(-1) - total.double()).abs().max().item()
    scale = total.double().abs().max().item()
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale > 0 else float("nan")}


def token_attribution(
    st: Any, model: str, query_set: str, n_queries: int, n_sequences: int
) -> TokenRows:
    """Tokenwise scores (`influence.pairwise_scores(..., by_token=True)` with the stage's
    EK-FAC) of the top `n_sequences` training sequences (by the stage's total score) of the
    first `n_queries` queries of `query_set` at `model`, computed for those sequences only."""
    import influence as inf

    from .suite import query_dataset, train_dataset  # the suite reads the presets, which
    # collect this module: imported when used

    tok = st.suite.tokenizer
    q = st.queries(query_set).iloc[:n_queries]
    total = st.scores(model, query_set)[: len(q)]
    top = top_k_indices(total, n_sequences).numpy()
    cols = sorted(set(top.ravel().tolist()))
    qd = query_dataset(tok, {"prompt": list(q.prompt), "completion": list(q.completion)})
    sub = train_dataset(st.suite, st.suite.corpus).select(cols)
    net, task, est = st.model(model), st.task, st.estimator(model)
    by_tok = inf.pairwise_scores(net, task, est, qd, sub, by_token=True, progress=False)
    plain = inf.pairwise_scores(net, task, est, qd, sub, progress=False)
    stage = total[:, cols]
    check = {
        "vs_score": token_check(by_tok, plain)["max_rel_diff"],
        "vs_stage": token_check(by_tok, stage)["max_rel_diff"],
    }
    pos = {j: i for i, j in enumerate(cols)}
    values, ids = [], []
    for qi in range(len(q)):
        v_row, id_row = [], []
        for j in top[qi]:
            row = sub[pos[int(j)]]
            n_real = int(row["attention_mask"].sum())
            v_row.append(by_tok[qi, pos[int(j)], :n_real].double().numpy())
            id_row.append(row["input_ids"][:n_real].tolist())
        values.append(v_row)
        ids.append(id_row)
    totals = np.take_along_axis(total.double().numpy(), top, axis=1)
    return TokenRows(query_set, q, top, totals, values, ids, check)


def query_token_share(rows: TokenRows, tokenizer: Any, stop: set[int]) -> pd.DataFrame:
    """Per query: the share of its top sequences' positive token influence that sits on
    positions predicting one of the query's content tokens, and the base rate, the share of
    those sequences' positions that predict one (position t's term belongs to token t + 1,
    MATH.md; the last position predicts nothing)."""
    q = rows.queries
    qsets = content_sets(tokenizer, (q["prompt"] + q["completion"]).tolist(), stop)
    recs = []
    for qi in range(len(q)):
        pos_on = pos_all = n_on = n_all = 0.0
        for v, ids in zip(rows.by_token[qi], rows.token_ids[qi], strict=True):
            nxt = np.array(ids[1:])
            on = np.isin(nxt, list(qsets[qi]))
            pv = np.clip(v[: len(nxt)], 0, None)
            pos_on += float(pv[on].sum())
            pos_all += float(pv.sum())
            n_on += float(on.sum())
            n_all += len(nxt)
        recs.append({"query_set": rows.query_set, "query": qi,
                     "share": pos_on / pos_all if pos_all > 0 else np.nan,
                     "base_rate": n_on / n_all if n_all else np.nan})  # fmt: skip
    return pd.DataFrame(recs)


def decode_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Every token of a row as text, each id decoded on its own (never the raw byte-level form
    such as 'Ġthe'; special tokens as their names)."""
    return [tokenizer.decode([int(i)]) for i in ids]


def token_heatmaps(rows: TokenRows, tokenizer: Any, model: str) -> str:
    """HTML: per query, its prompt and completion, then its top sequences drawn by
    `influence.render_token_html` on one colour scale per query."""
    import html

    import influence as inf

    parts = []
    for qi in range(len(rows.queries)):
        r = rows.queries.iloc[qi]
        scale = max(float(np.abs(v).max()) for v in rows.by_token[qi]) or 1.0
        parts.append(
            f"<p><b>Query</b> “{html.escape(r.prompt)}” → “{html.escape(r.completion)}”: "
            f"its top {len(rows.by_token[qi])} sequences at {html.escape(model)}</p><ol>"
        )
        for s, (v, ids) in enumerate(zip(rows.by_token[qi], rows.token_ids[qi], strict=True)):
            body = inf.render_token_html(decode_tokens(tokenizer, ids), v[: len(ids) - 1],
                                         scale=scale, eos_tokens=[tokenizer.eos_token],
                                         legend=s == 0)  # fmt: skip
            parts.append(
                f"<li>score {stats.format_number(float(rows.total[qi, s]))}, Σ tokens "
                f"{stats.format_number(float(v.sum()))}{body}</li>"
            )
        parts.append("</ol>")
    return "".join(parts)


# -- findings ----------------------------------------------------------------------------------
def _two(x: float) -> str:
    return stats.format_number(x, 2)


def _mean_finding(name, claim, paper, values, expected, threshold, fmt, where, *, n_boot, seed):
    """Judge per-query values against 0: their mean with a bootstrap interval, Wilcoxon."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    ci = stats.bootstrap(v, n_boot=n_boot, seed=seed)
    return judge(
        name,
        claim,
        paper,
        effect=ci,
        test=stats.wilcoxon(v),
        expected=expected,
        threshold=threshold,
        what=f"mean {where}",
        fmt=fmt,
        ours=f"{where}: {ci.format(fmt)} over {len(v)} queries",
    )


def findings(
    blocks: pd.DataFrame,
    restriction: pd.DataFrame,
    token_shares: pd.DataFrame,
    model: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[Finding]:
    """The paper's layerwise and tokenwise claims (§5.3.2, App. B) at `model` (the largest):
    `blocks` from `block_share_table`, `restriction` from `restriction_per_query`,
    `token_shares` from `query_token_share`. Verdicts: `influence.study.findings`."""
    boot = {"n_boot": n_boot, "seed": seed}
    b = blocks[blocks["model"] == model]
    if b.empty:
        raise ValueError(f"no block shares of model {model!r}; models: {sorted(set(blocks.model))}")
    n_blocks = int(b["n_blocks"].iloc[0])
    thirds = set(b["third"])
    has_middle = "middle" in thirds and bool({"lower", "upper"} & thirds)
    depth = f"{model} has {n_blocks} block{'s' if n_blocks > 1 else ''}"

    def missing(name: str, claim: str, paper: str, what: str) -> Finding:
        return not_comparable(name, claim, paper, ours=depth, reason=f"{depth}: {what}")

    claims = {
        "spread over layers": "influence is spread roughly evenly over the layers: for most "
        f"queries no block holds more than {EVEN_FACTOR:g}× an even share",
        "facts and quotes upper": "the influence on facts and memorised quotes sits in the "
        "upper layers",
        "math and code middle": "the influence on math and code sits in the middle layers",
        "middle third thematic": "ranking by the middle third of the layers finds the most "
        "thematic sequences (per block: the middle blocks' top-k against the outer blocks')",
        "outer thirds token overlap": "ranking by the lower or upper third finds sequences "
        "that overlap the query in tokens (per block, as above)",
    }
    out = []
    if n_blocks < 2:
        out.append(missing("spread over layers", claims["spread over layers"], "roughly even",
                           "nothing to spread over"))  # fmt: skip
        out.append(missing("facts and quotes upper", claims["facts and quotes upper"],
                           "upper layers", "no upper third beside other blocks"))  # fmt: skip
    else:
        even = evenness(b)
        share, test = stats.proportion(int(even["even_spread"].sum()), len(even), MOST)
        out.append(
            judge(
                "spread over layers",
                claims["spread over layers"],
                "roughly even (Fig. 4)",
                effect=share.scaled(1.0, -MOST),
                test=test,
                expected=+1,
                threshold=MOST_MARGIN,
                what="share − 50%",
                fmt=stats.format_points,
                ours=f"{share.format(stats.format_share)} of {len(even)} queries at {model} "
                f"(median largest block {_two(even['largest'].median())}× even, "
                f"{n_blocks} blocks)",
            )
        )
        upper = depth_contrast(b[b["query_set"].isin(UPPER_TYPES)], "upper")["contrast"]
        out.append(_mean_finding(
            "facts and quotes upper", claims["facts and quotes upper"], "upper layers (App. B)",
            upper, +1, DEPTH_THRESHOLD, _two,
            "share of upper-third blocks − other blocks (× even)", **boot))  # fmt: skip
    if has_middle:
        middle = depth_contrast(b[b["query_set"].isin(MIDDLE_TYPES)], "middle")["contrast"]
        out.append(_mean_finding(
            "math and code middle", claims["math and code middle"], "middle layers (App. B)",
            middle, +1, DEPTH_THRESHOLD, _two,
            "share of middle-third blocks − outer blocks (× even)", **boot))  # fmt: skip
    else:
        out.append(missing("math and code middle", claims["math and code middle"],
                           "middle layers", "no middle third beside outer ones"))  # fmt: skip
    out.append(
        not_comparable(
            "translation middle",
            "the influence on translation sits in the middle layers",
            "middle layers (App. B)",
            ours="no translation queries",
            reason="the corpus has no translation queries; its cross-lingual queries ask a "
            "fact in a language it was never stated in and are shown as cross-lingual facts, "
            "in neither group",
        )
    )
    if has_middle:
        r = restriction_by_third(restriction[restriction["model"] == model])
        out.append(_mean_finding(
            "middle third thematic", claims["middle third thematic"], "yes (§5.3.2)",
            middle_contrast(r, "same_meaning")["contrast"], +1, SHARE_THRESHOLD,
            stats.format_points, "same-meaning share, middle − outer blocks", **boot))  # fmt: skip
        out.append(_mean_finding(
            "outer thirds token overlap", claims["outer thirds token overlap"], "yes (§5.3.2)",
            middle_contrast(r, "overlap")["contrast"], -1, OVERLAP_THRESHOLD, _two,
            "token overlap (Jaccard), middle − outer blocks", **boot))  # fmt: skip
    else:
        for name in ("middle third thematic", "outer thirds token overlap"):
            out.append(missing(name, claims[name], "yes (§5.3.2)",
                               "no middle third beside outer ones"))  # fmt: skip
    t = token_shares.dropna(subset=["share", "base_rate"])
    e = stats.enrichment(t["share"], t["base_rate"], **boot)
    out.append(
        judge(
            "query tokens carry the influence",
            "a top sequence's influence sits on the tokens whose prediction matches the query "
            "(the tokens the heatmaps highlight)",
            "tokens related to the query (Figs. 31–32, qualitative)",
            effect=e.share.scaled(1.0, -e.base_rate),
            test=e.test,
            expected=+1,
            threshold=SHARE_THRESHOLD,
            what="share − base rate",
            fmt=stats.format_points,
            ours=f"{e.share.format(stats.format_share)} of the positive token influence on "
            f"positions predicting a query token, {_two(e.ratio.estimate)}× their share of "
            f"positions ({len(t)} queries at {model})",
            base_rate=stats.format_share(e.base_rate),
        )
    )
    return out


# -- figures -----------------------------------------------------------------------------------
def plot_block_shares(blocks: pd.DataFrame, models: Sequence[str], sets: Sequence[str]):
    """Heatmaps: the mean block share relative to an even split (1 = even) per block (rows,
    the top block first) and query type (columns), one panel per model."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    mean = blocks.groupby(["model", "block", "query_set"])["even"].mean()
    vmax = max(2.0, float(np.nanmax(mean.to_numpy())))
    vmin = min(0.0, float(np.nanmin(mean.to_numpy())))
    norm = TwoSlopeNorm(vcenter=1.0, vmin=vmin, vmax=vmax)
    depth = blocks.groupby("model")["n_blocks"].first()
    fig, axes = plt.subplots(
        1, len(models), figsize=(1.7 * len(models) + 1.4, 4.6), squeeze=False,
        gridspec_kw={"width_ratios": [1] * len(models)},
    )  # fmt: skip
    im = None
    for ax, m in zip(axes[0], models, strict=True):
        piv = mean.loc[m].unstack("query_set").reindex(columns=list(sets)).sort_index()
        im = ax.imshow(piv.to_numpy()[::-1], cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(sets)), [TYPE_NAMES[s] for s in sets], rotation=90)
        ax.set_yticks(range(len(piv)), [str(b) for b in piv.index[::-1]])
        n = int(depth[m])
        ax.set_title(f"{m} ({n} block{'s' if n > 1 else ''})")
    axes[0][0].set_ylabel("block (last on top)")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.04, label="block share × blocks (1 = even)")
    return fig


def plot_restriction(per_query: pd.DataFrame, models: Sequence[str], k: int):
    """The same-meaning share and the token overlap of the top-k ranked by one block's scores,
    against the block's relative depth, one line per model (thirds marked)."""
    import matplotlib.pyplot as plt

    blocks = per_query[per_query["block"] >= 0]
    mean = blocks.groupby(["model", "rel_depth"])[["same_meaning", "overlap"]].mean()
    colours = style.size_colors(list(models))
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.6))
    panels = (("same_meaning", f"same-meaning share of the top-{k}"),
              ("overlap", "token overlap (Jaccard)"))  # fmt: skip
    for ax, (col, label) in zip(axes, panels, strict=True):
        for m in models:
            if m not in mean.index.get_level_values("model"):
                continue
            g = mean.loc[m]
            ax.plot(g.index, g[col], marker="o", color=colours[m], label=m)
        for x in (1 / 3, 2 / 3):
            ax.axvline(x, color=style.GREY, lw=0.8, ls="--")
        ax.set_xlim(0, 1)
        ax.set_xlabel("relative depth of the ranking block")
        ax.set_ylabel(label)
    axes[1].legend(title="model", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig
