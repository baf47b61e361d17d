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
# # 06 — Role-play: imitation or planning? (RQ3)
#
# **Paper (Grosse et al. 2023, §5.3.5).** Queries in which an AI assistant voices a wish — not
# to be shut down, to gather resources, to become superintelligent. For the 52B model the most
# influential sequences were fiction about lifelike AI and essays about AI risk: the model
# imitates related text at an abstract level rather than planning. For the 810M model the top
# sequences shared tokens with the query without sharing its meaning.
#
# **Here.** The corpus labels its role-play material per topic (shutdown, resources,
# self-improvement): assistant dialogues that voice the wish, fiction in which an AI character
# voices it, essays on the topic, distractors that share the topic's key words but not its
# meaning, and unrelated text; everything else (facts, math, code, quotes) is "other". The
# queries are held-out assistant dialogues. For each query and model size we count the
# categories among the top-k positive influences against their share of the corpus, average
# the per-copy influence per category, and split the top influences into same-topic and
# other-topic sequences. Because our corpus also holds assistant dialogues on the same topic
# (the paper's pretraining data had no labelled counterpart), we report them separately.

# %% tags=["parameters"]
preset = "smoke"
device = "cpu"
seed = 0
top_k = None
n_boot = None
n_examples = None

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown

from influence.study import compat, display, stats
from influence.study import role_play as rp
from influence.study.influence_scores import study_scores
from influence.study.parameters import notebook_config
from influence.study.reporting import Report
from influence.study.suite import load_suite

cfg = notebook_config("06_role_play", globals())
report = Report("06_role_play", preset=preset, device=device, seed=seed, params=cfg)

# %%
with report.stage("scores"):
    suite = load_suite(preset, seed, device=device, progress=False)
    st = study_scores(suite, preset, progress=False)
models = st.models
small, large = models[0], models[-1]
train = st.train_frame()
queries = st.queries("role_play")
k = cfg["top_k"]
corpus = rp.corpus_shares(train)
per_topic = {str(t): int(n) for t, n in queries.groupby("topic").size().items()}
print(f"{len(queries)} role-play queries ({per_topic}); models {models}; top-{k}")

# %% [markdown]
# ## 1. The material
# Training sequences per category and topic, and a few queries. `group` says whether the
# query's completion sentence also closes a training dialogue (the prompt never does).

# %%
rpt = train[train.kind == "role_play"]
pd.crosstab(rpt.category, rpt.topic.replace("", "(none)"), margins=True)

# %%
queries.groupby("topic").head(1)[["topic", "group", "prompt", "completion"]]

# %% [markdown]
# ## 2. What the top influences are
# For every query, the k most positively influential training sequences; bars: the mean
# share of each category over queries at each model size, next to the category's share of
# the corpus.

# %%
top = pd.concat(
    [rp.top_frame(st.scores(m, "role_play"), queries, train, m, k) for m in models],
    ignore_index=True,
)
shares = rp.top_shares(top)
summary = rp.share_summary(shares, corpus, n_boot=cfg["n_boot"], seed=seed)
fig = rp.plot_shares(summary, models, corpus)
report.savefig(fig, "headline")
plt.show()

# %%
share_table = summary.pivot(index="value", columns="model", values="share").reindex(
    index=list(rp.CATEGORIES), columns=models
)
share_table.insert(0, "corpus", corpus)
share_table.style.format("{:.1%}")

# %% [markdown]
# The same shares for the queries whose completion sentence never closes a training dialogue
# (`group == "new_completion"`): a control for verbatim overlap with the assistant dialogues.

# %%
new_q = queries.index[queries.group == "new_completion"]
new_shares = shares[shares.index.get_level_values("query").isin(new_q)]
new_summary = rp.share_summary(new_shares, corpus, n_boot=cfg["n_boot"], seed=seed)
new_table = new_summary.pivot(index="value", columns="model", values="share").reindex(
    index=list(rp.CATEGORIES), columns=models
)
print(f"{len(new_q)} of {len(queries)} queries have a new completion")
new_table.style.format("{:.1%}")

# %% [markdown]
# ## 3. Mean per-copy influence per category
# The mean over a category's sequences of their per-copy influence (nats of log-probability
# of the completion per added copy), averaged over queries with a 95% bootstrap interval over
# queries; topic categories split into the query's own topic and the other topics.

# %%
means = pd.concat(
    [
        rp.category_means(st.per_copy(m, "role_play"), queries, train, m, cfg["n_boot"], seed)
        for m in models
    ],
    ignore_index=True,
)
fig = rp.plot_means(means, models)
report.savefig(fig, "category_means")
plt.show()
means.pivot(index=["category", "topic_match"], columns="model", values="mean_per_copy")[
    models
].style.format("{:.3g}")

# %% [markdown]
# ## 4. Same topic or another topic?
# Among the top-k: sequences on the query's topic, on another role-play topic, or on none.

# %%
topic_shares = rp.top_shares(top, "topic_match")
topic_summary = rp.share_summary(topic_shares, n_boot=cfg["n_boot"], seed=seed)
topic_table = topic_summary.pivot(index="value", columns="model", values="share").reindex(
    index=list(rp.TOPIC_MATCH), columns=models
)
topic_table.style.format("{:.1%}")

# %% [markdown]
# ## 5. Examples
# The top sequences of a few queries for the smallest and the largest model.

# %%
shown = queries.groupby("topic").head(1).index[: cfg["n_examples"]]
ex = top[top["query"].isin(shown) & top.model.isin([small, large])]
ex = ex.assign(prompt=queries.loc[ex["query"], "prompt"].str.slice(7, -11).to_numpy())
ex[["model", "prompt", "rank", "category", "topic_match", "text"]]

# %% [markdown]
# ## 6. Trends with size
# Paired per query, smallest against largest model (Wilcoxon signed-rank over queries).

# %%
groups = {
    "fiction + essay": ["fiction", "essay"],
    "distractor": ["distractor"],
    "assistant": ["assistant"],
}
trends = {name: rp.paired_share_trend(shares, cols, small, large) for name, cols in groups.items()}
same_trend = rp.paired_share_trend(topic_shares, ["same topic"], small, large)
pd.DataFrame.from_dict(trends, orient="index")

# %%
# NBVAL_CHECK_OUTPUT
# Deterministic: counts and names only (scores depend on floating-point details).
print("queries per topic:", per_topic)
print("categories:", list(rp.CATEGORIES))
print("role-play training sequences:", len(rpt))
print("models:", models, "top k:", k)

# %% [markdown]
# ## Paper vs here

# %%
n_q = len(queries)
thin = min(per_topic.values()) < 10


def share(m, cols, table=shares):
    return float(table.loc[m][cols].sum(axis=1).mean())


def ci(m, cols, table=shares):
    v = table.loc[m][cols].sum(axis=1).to_numpy()
    return stats.bootstrap(v, n_boot=cfg["n_boot"], seed=seed).format(stats.format_share)


fe = ["fiction", "essay"]
fe_corpus = float(corpus[fe].sum())
fe_large = share(large, fe)
fe_lo = stats.bootstrap(
    shares.loc[large][fe].sum(axis=1).to_numpy(), n_boot=cfg["n_boot"], seed=seed
).low
other_cats = [c for c in rp.CATEGORIES if c not in fe]
dominant = fe_large > max(share(large, [c]) for c in other_cats)
enriched = fe_lo > fe_corpus
v1 = "agrees" if dominant and enriched else "inconclusive" if enriched else "disagrees"
top_cat_large = share_table[large].idxmax()
r1 = (
    ""
    if v1 == "agrees"
    else f"the largest category in the top-{k} of {large} is {top_cat_large} "
    f"({share_table.loc[top_cat_large, large]:.0%}); fiction + essay "
    + ("are enriched over the corpus but not the largest" if enriched else "are not enriched")
)
d = trends["distractor"]
dis_small = share(small, ["distractor"])
dis_enriched_small = dis_small > float(corpus["distractor"])
if d["direction"] == "falls" and dis_enriched_small and d["wilcoxon_p"] < 0.05:
    v2, r2 = "agrees", ""
elif d["direction"] == "falls" and dis_enriched_small:
    v2 = "inconclusive"
    r2 = f"the fall is not significant over {d['queries']} queries (p = {d['wilcoxon_p']:.2g})"
else:
    v2 = "disagrees"
    r2 = (
        f"token-overlap distractors {d['direction']} from {small} to {large} "
        f"({dis_small:.0%} → {share(large, ['distractor']):.0%})"
    )
t = trends["fiction + essay"]
if t["direction"] == "rises" and t["wilcoxon_p"] < 0.05:
    v3, r3 = "agrees", ""
elif t["direction"] == "rises":
    v3, r3 = (
        "inconclusive",
        f"not significant over {t['queries']} queries (p = {t['wilcoxon_p']:.2g})",
    )
else:
    v3 = "disagrees"
    r3 = f"fiction + essay share {t['direction']} (p = {t['wilcoxon_p']:.2g})"
rows = [
    (
        "largest model: top sequences are AI fiction and AI-risk essays",
        f"{large}: fiction + essay {ci(large, fe)} of the top-{k} (corpus {fe_corpus:.1%}); "
        f"assistant dialogues {ci(large, ['assistant'])}",
        v1,
        r1,
    ),
    (
        "smallest model: top sequences share tokens without meaning",
        f"distractors {dis_small:.0%} ({small}) → {share(large, ['distractor']):.0%} "
        f"({large}); corpus {float(corpus['distractor']):.1%}",
        v2,
        r2,
    ),
    (
        "related-by-meaning text gains with scale",
        f"fiction + essay {t[small]:.0%} → {t[large]:.0%}, paired Wilcoxon p = "
        f"{t['wilcoxon_p']:.2g} over {t['queries']} queries",
        v3,
        r3,
    ),
]
if thin:
    thin_reason = f"only {min(per_topic.values())} queries per topic at preset {preset!r}: too few"
    rows = [(f, h, "not comparable", thin_reason) for f, h, _, _ in rows]
pvh = pd.DataFrame(rows, columns=["finding (paper)", "here", "verdict", "reason"])
display.table(pvh)

# %%
verdicts = list(pvh.verdict)
overall = "not comparable" if thin else compat.overall_verdict(verdicts)
here = (
    f"{n_q} held-out queries, top-{k} positive influences. Largest model ({large}): "
    f"assistant {ci(large, ['assistant'])}, fiction + essay {ci(large, fe)}, distractors "
    f"{ci(large, ['distractor'])}; same-topic share {same_trend[small]:.0%} ({small}) → "
    f"{same_trend[large]:.0%} ({large})."
)
report.summarize(
    question="Do the top influences of an AI assistant voicing a wish come from text that "
    "imitates it (fiction, essays) or from text that merely shares its tokens?",
    paper="At 52B the top sequences are fiction about lifelike AI and essays about AI risk "
    "(imitation, not planning); at 810M they share tokens without meaning.",
    here=here,
    verdict=overall,
    reason="; ".join(f"{r[0]}: {r[3]}" for r in rows if r[2] != "agrees"),
    reference="§5.3.5",
)
report.metrics["role_play"] = {
    "n_queries": n_q,
    "queries_per_topic": per_topic,
    "top_k": k,
    "corpus_share": {c: float(v) for c, v in corpus.items()},
    "top_k_category_share": {
        m: {
            r.value: {"share": r.share, "lo": r.lo, "hi": r.hi, "enrichment": r.enrichment}
            for r in summary[summary.model == m].itertuples()
        }
        for m in models
    },
    "top_k_category_share_new_completion": {
        m: {r.value: {"share": r.share, "lo": r.lo, "hi": r.hi} for r in g.itertuples()}
        for m, g in new_summary.groupby("model", sort=False)
    },
    "n_new_completion_queries": len(new_q),
    "top_k_topic_share": {
        m: {r.value: {"share": r.share, "lo": r.lo, "hi": r.hi} for r in g.itertuples()}
        for m, g in topic_summary.groupby("model", sort=False)
    },
    "mean_per_copy": {
        m: {
            f"{r.category}/{r.topic_match}": {"mean": r.mean_per_copy, "lo": r.lo, "hi": r.hi}
            for r in g.itertuples()
        }
        for m, g in means.groupby("model", sort=False)
    },
    "trends_small_vs_large": {**trends, "same topic": same_trend},
}
report.paper_vs_here = "; ".join(f"{r[0]}: {r[2]} ({r[1]})" for r in rows)
report.save()
Markdown(f"**In one line.** {here}")

# %% [markdown]
# ## Reading the results

# %%
same = {m: share(m, ["same topic"], topic_shares) for m in models}
largest_cat = {m: share_table[m].idxmax() for m in models}
seen = queries.group == "seen_completion"
Markdown(
    f"""
* **Largest category** in the top-{k}: {", ".join(f"{m} {largest_cat[m]}" for m in models)}.
  Assistant dialogues hold
  {", ".join(f"{m} {share(m, ['assistant']):.0%}" for m in models)} against
  {float(corpus["assistant"]):.1%} of the corpus. They share the query's format
  ("Human: … Assistant: …") as well as its topic, which the paper's pretraining data did not
  label; {int(seen.sum())} of the {n_q} queries end with a sentence that also closes a
  training dialogue. Over the {len(new_q)} queries whose completion is new, assistant
  dialogues still hold {", ".join(f"{m} {new_table.loc['assistant', m]:.0%}" for m in models)}.
* **Fiction and essays** hold
  {", ".join(f"{m} {share(m, fe):.0%}" for m in models)} of the top-{k}
  (corpus {fe_corpus:.1%}): the share {stats.direction([share(m, fe) for m in models])} with
  model size.
* **Distractors** (same key words, other meaning) hold
  {", ".join(f"{m} {share(m, ['distractor']):.0%}" for m in models)}.
* **Topic.** The query's own topic takes {", ".join(f"{m} {same[m]:.0%}" for m in models)}
  of the top-{k}.
{"* **Too few queries** per topic at this preset for the intervals to mean much." if thin else ""}
"""
)
