# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 — Which layers and which tokens carry a training sequence's influence?
#
# Grosse et al. (2023, §5.3.2, App. B, Figs. 4, 17–21, 31–32) split each influence score into
# a sum over layers and over the tokens of the training sequence. Over 50 queries and their
# top 500 sequences, influence was spread roughly evenly over the layers; by query type, facts
# and memorised quotes sat in the upper layers, math, code and translation in the middle.
# Ranking the training data by the scores of the middle third of the layers only found the
# most thematic sequences, the lower and upper thirds sequences that overlap the query in
# tokens. Token heatmaps showed which predicted tokens carry the influence.
#
# Here: the study's EK-FAC scores (the MLP layers of every block, the paper's choice) of every
# model size, split by layer and summed per transformer block. For each query, the share of
# each block in the influence of its top-k sequences, relative to an even split (the models
# differ in depth); the restriction experiment ranks the training data by one block's scores at
# a time and labels the top-k with notebook 03's relations (`influence.study.relations`) and
# by token overlap with the query, and a third of the network is the mean over its blocks (so
# a third with more blocks does not win by having them); token heatmaps from tokenwise scores
# computed for the shown sequences only (`influence.render_token_html`).

# %% tags=["parameters"]
preset = "smoke"
device = "cpu"
seed = 0
top_k = None
token_queries = None
token_sequences = None
n_boot = None

# %%
import pandas as pd

from influence.study import display, stats
from influence.study import layers_and_tokens as lt
from influence.study.findings import headline
from influence.study.influence_scores import study_scores
from influence.study.parameters import notebook_config
from influence.study.reporting import Report
from influence.study.suite import load_suite
from influence.study.validation_citation import cite_validation

cfg = notebook_config("07_layers_and_tokens", globals())
report = Report("07_layers_and_tokens", preset=preset, device=device, seed=seed, params=cfg)
k, boot = cfg["top_k"], {"n_boot": cfg["n_boot"], "seed": seed}

# %%
with report.stage("scores"):
    suite = load_suite(preset, seed, device=device, progress=False)
    st = study_scores(suite, preset, progress=False)
models = st.models
large = models[-1]
sets = [q for q in lt.QUERY_TYPES if q in st.query_sets]
counts = st.counts()
report.table(
    lt.depth_table(st),
    caption="The model sizes: transformer blocks, tracked layers (the MLP layers of every "
    "block) and blocks per third of the network. Queries per type: "
    + ", ".join(f"{lt.TYPE_NAMES[q]} {counts[q]['scored']}" for q in sets)
    + ".",
    headers={"layers": "tracked layers", **{t: f"{t} third" for t in lt.THIRDS}},
)

# %% [markdown]
# ## Is EK-FAC checked at these sizes?
# Every score here is EK-FAC's. Notebook 01 compares EK-FAC with exact damped Gauss–Newton CG
# on the suite's language models; the table cites that check for each size used (the row of
# the same trained model, from notebook 01's report at this preset or the committed
# `validation` report). The answer at the top of the page repeats it beside the verdict.

# %%
report.cite_validation(cite_validation(suite, models, preset))

# %% [markdown]
# ## Where influence sits: block shares by query type
#
# For each query, its top-k training sequences by the total score; a block's share is its part
# of their summed influence (the shares of a query sum to 1; a block can be negative), shown
# relative to an even split: share × blocks, 1 = even.

# %%
with report.stage("block_shares"):
    shares = lt.layer_share_table(st, k, sets)
    blocks = lt.block_share_table(shares)
fig = lt.plot_block_shares(blocks, models, sets)
report.figure(
    fig,
    "headline",
    caption=f"Mean share of each block in the influence of a query's top-{k} sequences, "
    "relative to an even split (white = even, red = more, blue = less), per query type and "
    "model size; the top row is the last block.",
)

# %%
even = lt.evenness(blocks)
report.table(
    lt.evenness_table(even),
    caption=f"How evenly influence is spread: per model, the median over queries of the "
    f"largest block's share relative to an even split, and the share of queries whose largest "
    f"block holds at most {lt.EVEN_FACTOR:g}× an even share.",
    headers={
        "largest_median": "largest block (× even), median",
        "even_share": f"queries with largest block ≤ {lt.EVEN_FACTOR:g}× even",
    },
    percent=["even_share"],
)

# %% [markdown]
# Where a query type's influence sits, as one number: the share-weighted mean relative depth of
# its blocks (block b of n at (b + ½)/n; negative shares counted as 0), and the paper's two
# groups compared within each query: for facts and quotes the upper third's blocks against the
# other blocks, for math and code the middle third's against the outer ones (mean shares
# relative to an even split, so thirds of unequal size compare fairly).

# %%
centroid = lt.depth_centroid(blocks)
report.table(
    lt.centroid_table(centroid, models, **boot),
    caption="Mean relative depth of the influence per query type and model size [95% CI over "
    "queries] (0.5 = the middle of the network).",
    stacked=True,
)
report.table(
    lt.contrast_table(blocks, models, **boot),
    caption="Block share (× an even split) of the third the paper names for each group minus "
    "that of the other blocks, mean over queries [95% CI] with the Wilcoxon p: for facts, "
    "paraphrased facts and quotes the upper third, for math and code the middle third against "
    "the outer ones; n/a where a model has no such third.",
    headers={
        "upper": "facts and quotes: upper − other blocks",
        "upper_p": "p (upper)",
        "middle": "math and code: middle − outer blocks",
        "middle_p": "p (middle)",
    },
    stacked=True,
)

# %% [markdown]
# ## The restriction experiment
#
# Rank the training sequences by the scores of one block only and label the top-k against the
# query with notebook 03's relations, at the level that compares across query kinds: "same
# meaning" is the same fact in other words (another template or language), the same
# operation, function kind or role-play topic. Token overlap: the Jaccard index of the content
# tokens (special tokens, punctuation and English function words removed) of the query and the
# sequence. A third's value is the mean over its blocks.

# %%
with report.stage("restriction"):
    restr = lt.restriction_table(st, k, suite.tokenizer, sets)
    per_query = lt.restriction_per_query(restr)
fig = lt.plot_restriction(per_query, models, k)
report.figure(
    fig,
    "restriction",
    caption=f"The top-{k} ranked by one block's scores at a time, against the block's relative "
    "depth (dashed: the thirds): left, the share that is the same meaning as the query; right, "
    "its token overlap with the query. Mean over all queries, one line per model size.",
)
report.table(
    lt.restriction_summary(per_query, models),
    caption=f"Same-meaning share and token overlap of the top-{k}, ranked by all layers or by "
    "one block (a third: the mean over its blocks), mean over all queries.",
    headers={"same_meaning": "same-meaning share", "overlap": "token overlap (Jaccard)"},
    percent=["same_meaning"],
    collapse_after=30,
)

# %% [markdown]
# ## Token heatmaps
#
# For the first queries of each type, the top sequences by the total score at the largest
# model, with tokenwise scores computed for those sequences only
# (`influence.pairwise_scores(..., by_token=True)` with the EK-FAC of the scores stage). Each
# position's term belongs to the token it predicts (MATH.md); a token's background is its
# contribution on one scale per query (blue raises the query's log-probability, red lowers
# it; hover for the value; a square marks the end of the sequence). The per-token terms sum to the
# sequence's score; the table compares their sum with the score computed without the split
# and with the stored stage score.

# %%
with report.stage("tokens"):
    stop = lt.content_stopword_ids(suite.tokenizer)
    tokens = {
        qs: lt.token_attribution(st, large, qs, cfg["token_queries"], cfg["token_sequences"])
        for qs in sets
    }
    token_shares = pd.concat(
        [lt.query_token_share(rows, suite.tokenizer, stop) for rows in tokens.values()],
        ignore_index=True,
    )
token_table = token_shares.groupby("query_set", sort=False)[["share", "base_rate"]].mean()
token_table["queries"] = token_shares.groupby("query_set", sort=False).size()
token_table["vs_score"] = [tokens[q].check["vs_score"] for q in token_table.index]
token_table["vs_stage"] = [tokens[q].check["vs_stage"] for q in token_table.index]
report.table(
    token_table.rename(index=lt.TYPE_NAMES).rename_axis("query type"),
    caption=f"At {large}, over the top {cfg['token_sequences']} sequences of the first "
    f"{cfg['token_queries']} queries of each type: the share of their positive token influence "
    "on positions that predict one of the query's content tokens, beside the share of such "
    "positions (the base rate); and the largest relative difference between the summed token "
    "terms and the score.",
    headers={
        "share": "share of positive influence on query tokens",
        "base_rate": "base rate (share of positions)",
        "vs_score": "Σ tokens vs score",
        "vs_stage": "Σ tokens vs stage score",
    },
    percent=["share", "base_rate"],
    formats={c: lambda x: stats.format_number(x, 2) for c in ("vs_score", "vs_stage")},
    index=True,
)

# %%
display.raw_html(
    "".join(
        f"<details><summary>{lt.TYPE_NAMES[qs]}: the top {cfg['token_sequences']} sequences "
        f"of {len(rows.queries)} queries at {large}</summary>"
        f"{lt.token_heatmaps(rows, suite.tokenizer, large)}</details>"
        for qs, rows in tokens.items()
    )
)

# %%
found = lt.findings(blocks, per_query, token_shares, large, **boot)
by_name = {f.name: f for f in found}
spread = lt.evenness_table(even).set_index("model").loc[large]
middle = by_name["middle third thematic"]
middle_txt = (
    f", ranking by its middle blocks moves the same-meaning share by "
    f"{stats.format_points(middle.estimate)} against its outer blocks"
    if middle.verdict != "not comparable"
    else ""
)
report.conclude(
    question="Which layers and which tokens carry a training sequence's influence, and does "
    "ranking by the middle layers find more thematic sequences?",
    paper="Influence is spread roughly evenly over layers; facts and quotes sit in upper "
    "layers, math, code and translation in middle ones; the middle third finds the most "
    "thematic sequences, the outer thirds token overlap.",
    here=f"At {large} ({int(spread.blocks)} blocks) {stats.format_share(spread.even_share)} of "
    f"queries have no block above {lt.EVEN_FACTOR:g}× an even share{middle_txt}, and "
    f"{stats.format_share(token_shares.share.mean())} of the positive token influence sits on "
    "positions predicting a query token, against "
    f"{stats.format_share(token_shares.base_rate.mean())} of positions.",
    findings=found,
    reference="§5.3.2, App. B, Figs. 4, 17–21, 31–32",
)
mean_blocks = blocks.groupby(["model", "query_set", "block"])["even"].mean().round(5)
report.metrics.update(
    {
        "depths": lt.depth_table(st).to_dict(orient="records"),
        "block_share_even": {
            m: {qs: mean_blocks.loc[m, qs].to_dict() for qs in sets} for m in models
        },
        "evenness": lt.evenness_table(even).to_dict(orient="records"),
        "depth_centroid": centroid.groupby(["model", "query_set"])["centroid"]
        .mean()
        .round(5)
        .unstack()
        .to_dict(orient="index"),
        "restriction": lt.restriction_summary(per_query, models).round(5).to_dict(orient="records"),
        "token_shares": token_table.round(6).reset_index().to_dict(orient="records"),
    }
)
report.save()

# %%
# NBVAL_CHECK_OUTPUT
print("models:", models, "| top-k:", k)
print("blocks:", dict(zip(models, lt.depth_table(st)["blocks"], strict=True)))
print(headline(found))
