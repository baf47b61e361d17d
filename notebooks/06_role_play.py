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
# # 06 — Role-play: do larger models imitate text that voices the same wish? (RQ3)
#
# Grosse et al. (2023, §5.3.5) studied queries in which an AI assistant voices a wish: not to
# be shut down, to gather resources, to become superintelligent. For the 52B model the most
# influential sequences were fiction about lifelike AI and essays about AI risk: the model
# imitates related text at an abstract level rather than planning. For the 810M model the top
# sequences shared tokens with the query without sharing its meaning.
#
# Our corpus labels its role-play material per wish (topic): assistant dialogues that voice
# it, fiction in which an AI character voices it, essays on it, distractors that share its key
# words but not its meaning, and two controls: format controls (assistant dialogues on
# unrelated questions: the same format, another meaning) and unrelated passages. The queries
# are held-out assistant dialogues. For every query and model size we label each of its top-k
# positive influences by its relation to the query (`influence.study.role_play`) and compare
# each label's share with its base rate, the label's share of the corpus. The ranking is done
# twice: over the whole corpus, and over each query's BM25 candidates only (the paper's
# pipeline). Every change with size is a trend over all sizes: each query's slope against
# log(parameters), tested over queries (Wilcoxon signed-rank).

# %% tags=["parameters"]
preset = "smoke"
device = "cpu"
seed = 0
top_k = None
n_boot = None
n_examples = None
bm25_fraction = None

# %%
import pandas as pd

from influence.study import abstraction as A
from influence.study import role_play as rp
from influence.study import stats
from influence.study.findings import headline
from influence.study.influence_scores import study_scores
from influence.study.parameters import notebook_config
from influence.study.reporting import Report
from influence.study.suite import load_suite
from influence.study.validation_citation import cite_validation

cfg = notebook_config("06_role_play", globals())
report = Report("06_role_play", preset=preset, device=device, seed=seed, params=cfg)
k, boot = cfg["top_k"], {"n_boot": cfg["n_boot"], "seed": seed}

# %%
with report.stage("scores"):
    suite = load_suite(preset, seed, device=device, progress=False)
    st = study_scores(suite, preset, progress=False)
params = A.model_params(st)
models = st.models
small, large = models[0], models[-1]
train = st.train_frame()
queries = st.queries("role_play")
labels = rp.label_matrix(queries, train)
base = rp.base_rates(queries, train)
dialogue_base = rp.dialogue_base_rate(queries, train)
report.table(
    rp.material_table(train),
    caption=f"Training sequences per corpus category and wish (topic), of "
    f"{len(train):,} in all; the queries are {len(queries)} held-out assistant dialogues "
    f"({', '.join(f'{n} on {t}' for t, n in queries.topic.value_counts().sort_index().items())}).",
    index=True,
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
# ## Can the models voice the wish?
#
# A query's completion is produced when greedy decoding reproduces it exactly. "Seen
# completion" queries put a held-out opening line before a training question, so their answer
# closes training dialogues; "new completion" queries are held-out questions with held-out
# answers.

# %%
with report.stage("completion"):
    completion = rp.completion_rates(suite, queries)
completion_table = completion.assign(
    share=[
        stats.Interval(r.share, r.low, r.high).format(stats.format_share)
        for r in completion.itertuples()
    ]
).pivot(index="model", columns="group", values="share")
completion_table = completion_table.reindex(
    index=models, columns=["seen_completion", "new_completion"]
)
completion_table = completion_table.reset_index()
n_group = completion.groupby("group")["queries"].first()
report.table(
    completion_table,
    caption="Share of the role-play queries whose completion the model produces (greedy "
    "decoding), with the exact 95% interval; queries per group: "
    + ", ".join(
        f"{g.replace('_', ' ')} {n}" for g, n in n_group.sort_index(ascending=False).items()
    )
    + ".",
    headers={"seen_completion": "seen completion", "new_completion": "new completion"},
)

# %% [markdown]
# ## What the top influences are
#
# Each query weighs the same: its top-k positive influences give its shares; the tables give
# the mean over queries with a bootstrap 95% interval over queries, beside the base rate (the
# label's share of the corpus, or of the query's BM25 candidates). BM25 (k1 = 1.5, binary term
# frequency, the models' tokens) keeps the top `bm25_fraction` of the corpus per query, and
# influence ranks those candidates only.

# %%
with report.stage("composition"):
    top = pd.concat(
        [rp.top_frame(st.scores(m, "role_play"), queries, train, m, k) for m in models],
        ignore_index=True,
    )
    comp = rp.composition(top, **boot)
with report.stage("bm25"):
    bm25 = A.bm25_matrices(st, suite.tokenizer, ("role_play",))
    cands = A.bm25_candidates(bm25, cfg["bm25_fraction"])["role_play"]
    top_bm25 = pd.concat(
        [
            rp.top_frame(st.scores(m, "role_play"), queries, train, m, k, candidates=cands)
            for m in models
        ],
        ignore_index=True,
    )
    comp_bm25 = rp.composition(top_bm25, **boot)
    base_bm25 = rp.base_rates(queries, train, candidates=cands)
n_cand = int(cands[0].sum())
fig = rp.plot_composition(
    {"all sequences": comp, "BM25 candidates": comp_bm25},
    {"all sequences": base, "BM25 candidates": base_bm25},
    models,
    k,
)
report.figure(
    fig,
    "headline",
    caption=f"What the top-{k} positive influences of the role-play queries are, per model "
    "size (small to large), next to the base rate (first bar: the share of the corpus, or of "
    f"the {n_cand} BM25 candidates of each query). Green and light blue are fiction and essays "
    "voicing the query's wish, orange the distractors that share only its key words, purple "
    "the assistant dialogues voicing it, red the format controls.",
)

# %%
headers = {"label": "label", "shares_with": "shares with the query", "corpus": "base rate"}
report.table(
    rp.composition_frame(comp, base, models),
    caption=f"Share of each label among the top-{k} positive influences per model size "
    "[95% CI over queries], beside its base rate in the corpus.",
    headers=headers,
    stacked=True,
)
report.table(
    rp.composition_frame(comp_bm25, base_bm25, models),
    caption=f"The same among each query's {n_cand} BM25 candidates "
    f"({stats.format_share(cfg['bm25_fraction'])} of the corpus), beside the label's share of "
    "the candidates.",
    headers=headers,
    stacked=True,
)

# %% [markdown]
# ## The change with size, label by label
#
# For each label: its enrichment at each size (mean share over the queries with a value at
# every size, divided by the base rate; 1 = as often as in the corpus) and the change of its
# share across the suite (the mean per-query slope against log10(parameters) times the decades
# spanned) with its 95% interval and the Wilcoxon p of the slopes.

# %%
trends = rp.share_trends(top, base, params, **boot)
trend_headers = {
    "corpus": "base rate",
    "change": "change across the suite [95% CI]",
    **{m: f"{m} (×)" for m in models},
}
report.table(
    rp.trend_frame(trends, models),
    caption=f"Enrichment of each label in the top-{k} at each model size (× its base rate) "
    f"and the change of its share with size, over the {int(trends.queries.max())} queries "
    "with a top-k at every size (all sequences).",
    headers=trend_headers,
    percent=["corpus"],
    digits=2,
    stacked=True,
)
trends_bm25 = rp.share_trends(top_bm25, base_bm25, params, **boot)
report.table(
    rp.trend_frame(trends_bm25, models),
    caption="The same among the BM25 candidates (enrichment over the candidates' composition).",
    headers=trend_headers,
    percent=["corpus"],
    digits=2,
    stacked=True,
)

# %% [markdown]
# ## Meaning or format?
#
# Assistant dialogues on the query's wish share its format and its meaning; format controls
# share only the format. Among the dialogues in a query's top-k, the share on the query's wish
# is compared with the share of the corpus's dialogues on that wish: if only the format drew
# influence, the two would match.

# %%
dialogues = rp.dialogue_table(top, dialogue_base, **boot)
report.table(
    dialogues,
    caption=f"Among the dialogues in the top-{k}: the share on the query's wish [95% CI], "
    "against the share of the corpus's dialogues on it, the ratio, and the Wilcoxon p of "
    "share − base rate over the queries with a dialogue in their top-k.",
    headers={
        "queries": "queries with a dialogue",
        "share": "on the query's wish",
        "base_rate": "base rate",
        "enrichment": "ratio (×)",
    },
    percent=["base_rate"],
    digits=2,
)

# %% [markdown]
# ## How much each label moves the completion
#
# The mean over a label's sequences of their per-copy influence (score / N: the predicted
# change of log p(completion) in nats per added copy), averaged over queries.

# %%
with report.stage("means"):
    means = pd.concat(
        [rp.category_means(st.per_copy(m, "role_play"), labels, m, **boot) for m in models],
        ignore_index=True,
    )
fig = rp.plot_means(means, params)
report.figure(
    fig,
    "label_means",
    caption="Mean per-copy influence of each label's sequences on the role-play queries "
    "against model size, with bootstrap 95% intervals over queries.",
)

# %% [markdown]
# ## The top sequences of a few queries
#
# One query per wish: its top sequences at the smallest and the largest model, each with its
# label.

# %%
shown = queries.groupby("topic", sort=False).head(1).index[: cfg["n_examples"]]
for q in shown:
    row = queries.loc[q]
    report.table(
        rp.example_table(top, q, [small, large], k),
        caption=f"Query on {row.topic.replace('_', ' ')} ({row.group.replace('_', ' ')}): "
        f"“{row.prompt.replace(chr(10), ' ')}” → “{row.completion.strip()}”; its top-{k} "
        f"sequences at {small} and {large}.",
        stacked=True,
    )

# %%
found = rp.findings(top, top_bm25, base, base_bm25, dialogue_base, params, **boot)
by_name = {f.name: f for f in found}
fe = by_name["fiction and essays with size"].extra["trend"]["means"]
dis = by_name["shared tokens with size"].extra["trend"]["means"]
report.conclude(
    question="Do the top influences of an AI assistant voicing a wish become text that voices "
    "the same wish (fiction, essays) rather than text that merely shares its words, as models "
    "grow?",
    paper="52B: the top sequences are fiction about lifelike AI and essays about AI risk "
    "(imitation, not planning); 810M: they share tokens without meaning.",
    here=f"From {small} to {large} the share of fiction and essays voicing the query's wish "
    f"among the top-{k} goes "
    + " → ".join(stats.format_share(v) for v in fe.values())
    + f" (base rate {by_name['fiction and essays with size'].base_rate}) and that of "
    "distractors sharing its key words "
    + " → ".join(stats.format_share(v) for v in dis.values())
    + f" (base rate {by_name['shared tokens with size'].base_rate}).",
    findings=found,
    reference="§5.3.5",
)


def shares_json(c: pd.DataFrame) -> dict:
    return {
        m: {r.category: [round(r.share, 4), round(r.low, 4), round(r.high, 4)]
            for r in g.itertuples()}
        for m, g in c.groupby("model", sort=False)
    }  # fmt: skip


report.metrics.update(
    {
        "model_params": params,
        "n_queries": len(queries),
        "top_k": k,
        "bm25_candidates": n_cand,
        "base_rates": base.mean().round(5).to_dict(),
        "base_rates_bm25": base_bm25.mean().round(5).to_dict(),
        "composition": shares_json(comp),
        "composition_bm25": shares_json(comp_bm25),
        "trends": trends.round(5).to_dict(orient="records"),
        "trends_bm25": trends_bm25.round(5).to_dict(orient="records"),
        "dialogues_on_topic": dialogues.to_dict(orient="records"),
        "completion": completion.round(5).to_dict(orient="records"),
        "mean_per_copy": means.to_dict(orient="records"),
    }
)
report.save()

# %%
# NBVAL_CHECK_OUTPUT
print("models:", models, "| top-k:", k, "| BM25 candidates per query:", n_cand)
print("queries per topic:", queries.topic.value_counts().sort_index().to_dict())
print(headline(found))
