"""Notebook 07: where influence sits in the network (layers) and in the sequence (tokens).

Paper (Grosse et al. 2023, §5.3.2, App. B, Figs. 4, 17–21, 31–32): over the top sequences of
50 queries, influence is spread roughly evenly over layers; facts and memorised quotes sit
higher, math, code and translation in the middle; scores restricted to the middle third of the
layers find the most thematic sequences, the outer thirds token overlap. Token heatmaps show
which predicted tokens carry a sequence's influence.

    depths = layer_depths(st.layers["l"])                    # block, relative depth, third
    shares = layer_share_table(st, k=10)                     # one row per model/set/query/layer
    comp = restriction_table(st, k=10, classify=..., overlap=...)

Layer share (per query): the query's top-k training sequences by the total score; each
tracked layer's share is the sum of its scores over those k sequences divided by the sum of
the total scores over them, so the shares of a query sum to 1 (a layer can be negative).
Relative depth of a layer in block b of a model with n blocks: (b + ½) / n; thirds cut it at
⅓ and ⅔, so a one-block model has only a middle third and a two-block model no middle.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

THIRDS = ("lower", "middle", "upper")
# The query types the paper compared by layer (notebook order).
QUERY_TYPES = ("facts", "paraphrase", "cross_lingual", "math", "code", "quotes", "role_play")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


# -- layers ----------------------------------------------------------------------------------
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
    """lower / middle / upper third of a relative depth in (0, 1)."""
    if not 0 <= rel_depth <= 1:
        raise ValueError(f"relative depth must be in [0, 1], got {rel_depth}")
    return THIRDS[min(int(rel_depth * 3), 2)]


def layer_depths(layers: Sequence[str]) -> pd.DataFrame:
    """One row per layer (index = name): block, n_blocks, rel_depth = (block + ½)/n_blocks,
    third."""
    if not layers:
        raise ValueError("layers is empty")
    blocks = [block_index(n) for n in layers]
    uniq = sorted(set(blocks))
    pos = {b: i for i, b in enumerate(uniq)}  # blocks without a tracked layer do not count
    n = len(uniq)
    rel = [(pos[b] + 0.5) / n for b in blocks]
    return pd.DataFrame(
        {
            "block": blocks,
            "n_blocks": n,
            "rel_depth": rel,
            "third": [third_of(r) for r in rel],
        },
        index=pd.Index(list(layers), name="layer"),
    )


def depth_thirds(layers: Sequence[str]) -> dict[str, list[str]]:
    """{third: layers in it} (a third may be empty for shallow models)."""
    d = layer_depths(layers)
    return {t: list(d.index[d.third == t]) for t in THIRDS}


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, k] indices of the k largest scores per row (ties to the lower index)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [Q, N], got {tuple(scores.shape)}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be between 1 and {scores.shape[1]}, got {k}")
    return torch.sort(-scores.double(), dim=1, stable=True).indices[:, :k]


def layer_shares(by_layer: dict[str, torch.Tensor], k: int) -> pd.DataFrame:
    """[Q, layers] share of each layer in the influence of the query's top-k sequences (by the
    total score); rows sum to 1. Rows whose top-k total is not positive are NaN."""
    if not by_layer:
        raise ValueError("by_layer is empty")
    names = list(by_layer)
    stack = torch.stack([by_layer[n].double() for n in names])  # [L, Q, N]
    total = stack.sum(0)
    idx = top_k_indices(total, k)
    per_layer = torch.gather(stack, 2, idx.expand(len(names), *idx.shape)).sum(-1)  # [L, Q]
    denom = per_layer.sum(0)
    share = per_layer / denom
    share[:, denom <= 0] = float("nan")
    return pd.DataFrame(share.T.numpy(), columns=names).rename_axis("query")


def layer_share_table(
    st: Any, k: int, query_sets: Sequence[str] | None = None, models: Sequence[str] | None = None
) -> pd.DataFrame:
    """Long table: model, query_set, query, layer, block, rel_depth, third, share."""
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


def third_share_table(shares: pd.DataFrame) -> pd.DataFrame:
    """Per model, query set and query: the summed share of each third (NaN-free rows only)."""
    out = (
        shares.dropna(subset=["share"])
        .groupby(["model", "query_set", "query", "third"], observed=True)["share"]
        .sum()
        .unstack("third")
    )
    for t in THIRDS:
        if t not in out:
            out[t] = np.nan  # a model without that third
    return out[list(THIRDS)].reset_index()


def depth_centroid(shares: pd.DataFrame) -> pd.DataFrame:
    """Per model, query set and query: the share-weighted mean relative depth, with negative
    layer shares set to 0 (so it stays within the model's depth range)."""
    s = shares.dropna(subset=["share"]).copy()
    s["w"] = s["share"].clip(lower=0)
    s["wd"] = s["w"] * s["rel_depth"]
    g = s.groupby(["model", "query_set", "query"])[["w", "wd"]].sum()
    g["centroid"] = g["wd"] / g["w"].where(g["w"] > 0)
    return g[["centroid"]].reset_index()


def evenness(shares: pd.DataFrame) -> pd.DataFrame:
    """Per model: number of layers, uniform share 1/L, the largest mean layer share and the
    ratio of that to 1/L (1 = perfectly even)."""
    rows = []
    for model, g in shares.dropna(subset=["share"]).groupby("model", sort=False):
        mean = g.groupby("layer")["share"].mean()
        n = len(mean)
        rows.append(
            {
                "model": model,
                "layers": n,
                "uniform": 1 / n,
                "max_mean_share": float(mean.max()),
                "max_over_uniform": float(mean.max() * n),
                "min_mean_share": float(mean.min()),
            }
        )
    return pd.DataFrame(rows).set_index("model")


# -- restriction experiment ----------------------------------------------------------------
def content_stopword_ids(tokenizer) -> set[int]:
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


def token_sets(input_ids: torch.Tensor, attention_mask: torch.Tensor, ignore: set[int]):
    """Content-token set of each row (masked positions and `ignore` ids dropped)."""
    ids = input_ids.masked_fill(attention_mask == 0, -1).tolist()
    return [{t for t in r if t >= 0 and t not in ignore} for r in ids]


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def overlap_category(related: bool, shares_tokens: bool) -> str:
    """The fallback composition label: related (expresses the query's fact/topic/...), token
    overlap only, or neither."""
    if related:
        return "related"
    return "token overlap only" if shares_tokens else "other"


def restricted_top_k(by_layer: dict[str, torch.Tensor], layers: Sequence[str], k: int):
    """[Q, k] top-k indices ranking by the scores of `layers` only."""
    if not layers:
        raise ValueError("layers is empty: this model has no layer in that third")
    return top_k_indices(sum(by_layer[n].double() for n in layers), k)


def restriction_table(
    st: Any,
    k: int,
    classify: Callable[[str, str, torch.Tensor], np.ndarray],
    overlap: Callable[[str, torch.Tensor], np.ndarray],
    query_sets: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per model, query set, query, ranking (all layers or one third) and rank: the
    training index, its composition label (`classify(model, query_set, idx [Q, k]) -> [Q, k]
    labels`) and its token overlap with the query (`overlap(query_set, idx) -> [Q, k]`)."""
    sets = [q for q in (query_sets or QUERY_TYPES) if q in st.query_sets]
    frames = []
    for model in models or st.models:
        thirds = depth_thirds(st.layers[model])
        for qs in sets:
            bl = st.by_layer(model, qs)
            rankings = {"all layers": list(st.layers[model])}
            rankings.update({t: v for t, v in thirds.items() if v})
            for name, layers in rankings.items():
                idx = restricted_top_k(bl, layers, k)
                q, r = np.meshgrid(np.arange(idx.shape[0]), np.arange(1, k + 1), indexing="ij")
                frames.append(
                    pd.DataFrame(
                        {
                            "model": model,
                            "query_set": qs,
                            "ranking": name,
                            "query": q.ravel(),
                            "rank": r.ravel(),
                            "train_index": idx.numpy().ravel(),
                            "label": np.asarray(classify(model, qs, idx)).ravel(),
                            "overlap": np.asarray(overlap(qs, idx), dtype=float).ravel(),
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def composition(table: pd.DataFrame, by: Sequence[str] = ("model", "ranking")) -> pd.DataFrame:
    """Share of each label among the top-k rows, per group (rows sum to 1)."""
    return pd.crosstab([table[c] for c in by], table["label"], normalize="index")


def per_query_share(table: pd.DataFrame, label: str) -> pd.DataFrame:
    """Per model, ranking, query set and query: the share of the top-k with `label`."""
    t = table.assign(hit=(table["label"] == label).astype(float))
    return t.groupby(["model", "ranking", "query_set", "query"], sort=False)["hit"].mean()


# -- tokens ------------------------------------------------------------------------------------
def token_check(by_token: torch.Tensor, total: torch.Tensor) -> dict[str, float]:
    """How well per-token contributions [Q, N, T] sum to the scores [Q, N]: the largest
    absolute difference and that difference relative to the largest |score|."""
    diff = (by_token.double().sum(-1) - total.double()).abs().max().item()
    scale = total.double().abs().max().item()
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale > 0 else float("nan")}


def token_pieces(tokenizer, input_ids: Sequence[int], n_positions: int) -> list[str]:
    """The text drawn for each of the first `n_positions` positions of a training row: the
    token predicted there (position t's term belongs to the prediction of token t + 1, MATH.md);
    the last position predicts nothing in the row and is drawn as '⏹'."""
    ids = list(input_ids)
    pieces = []
    for t in range(n_positions):
        pieces.append(tokenizer.decode([ids[t + 1]]) if t + 1 < len(ids) else "⏹")
    return pieces


def _colour(value: float, scale: float) -> str:
    import matplotlib

    cmap = matplotlib.colormaps["RdBu"]  # red = negative (harmful), blue = positive (helpful)
    x = 0.5 + 0.5 * max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.5
    r, g, b, _ = cmap(x)
    return f"rgb({int(255 * r)},{int(255 * g)},{int(255 * b)})"


def token_html(pieces: Sequence[str], values: Sequence[float], scale: float) -> str:
    """Tokens as inline HTML spans on a diverging background (−scale red … +scale blue); the
    value is in each span's tooltip."""
    if len(pieces) != len(values):
        raise ValueError(f"{len(pieces)} pieces but {len(values)} values")
    spans = []
    for p, v in zip(pieces, values, strict=True):
        text = html.escape(p).replace("\n", "⏎")
        spans.append(
            f'<span title="{v:+.4g}" style="background:{_colour(float(v), scale)};'
            f'white-space:pre;font-family:monospace">{text}</span>'
        )
    return "".join(spans)


def colour_legend(scale: float) -> str:
    """A small legend of the diverging scale."""
    stops = [-scale, -scale / 2, 0.0, scale / 2, scale]
    return "scale: " + " ".join(
        f'<span style="background:{_colour(s, scale)};font-family:monospace">'
        f"&nbsp;{s:+.3g}&nbsp;</span>"
        for s in stops
    )
