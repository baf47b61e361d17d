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
# # 05 — Word order: does influence need the prompt phrase first? (RQ3)
#
# **Paper (Grosse et al. 2023, §5.3.4, Figs. 24–27).** For one query ("The first President of
# the Republic of Astrobia was Zorald Pfaff") the authors wrote synthetic training sequences in
# six groups: rewordings; the completion removed; semantic changes; irrelevant sentences that
# keep the names; the fact flipped (completion before the prompt phrase); flipped with the
# prompt phrase removed. Influence was high only when the prompt phrase came before the
# completion phrase; flipped sequences kept only about the influence that the shared names
# alone carry; a translation test showed at least ten times less influence when flipped.
#
# **Here.** The corpus writes the same six groups (two sentences each) for many facts, as
# hypothetical sequences that are never trained on (as in the paper); each fact's query is its
# first English training template. The scores stage scores every candidate against its fact's
# query with the EK-FAC fitted on the training set, as if it were one more training sequence;
# we read the per-copy influence (score / N, in nats of log-probability of the completion per
# added copy). Each claim is a contrast between groups, fact by fact: the ratio of the fact's
# mean influence over one set of groups to another's, its median over facts with a bootstrap
# interval over facts and a sign test over facts, at the largest model (the paper's were made
# at 52B); how each contrast changes with size is a trend over every size.

# %% tags=["parameters"]
preset = "smoke"
device = "cpu"
seed = 0
n_boot = None
token_facts = None
token_groups = None

# %%
import numpy as np
import pandas as pd
from IPython.display import Markdown

from influence.study import abstraction as A
from influence.study import stats
from influence.study import word_order as wo
from influence.study.findings import headline
from influence.study.influence_scores import study_scores
from influence.study.parameters import notebook_config
from influence.study.reporting import Report
from influence.study.suite import load_suite
from influence.study.validation_citation import cite_validation

cfg = notebook_config("05_word_order", globals())
wo.check_groups(cfg["token_groups"])
report = Report("05_word_order", preset=preset, device=device, seed=seed, params=cfg)
boot = {"n_boot": cfg["n_boot"], "seed": seed}

# %%
with report.stage("scores"):
    suite = load_suite(preset, seed, device=device, progress=False)
    st = study_scores(suite, preset, progress=False)
params = A.model_params(st)
models = st.models
small, large = models[0], models[-1]
cands = st.candidate_frame("word_order")  # hypothetical sequences, never trained on
queries = st.queries("word_order")
n_facts = len(queries)
report.table(
    pd.DataFrame({"model": models, "params": [params[m] for m in models]}),
    caption=f"The model sizes; {n_facts} word-order facts, {len(cands)} candidate sequences, "
    f"N = {st.n_train:,} training sequences.",
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
# ## The six groups
# One fact's query and its candidate sequences (two per group). Prompt first: rewording,
# semantic change; both names in the query's order: names only; no answer: completion
# removed; completion first: flipped, flipped without the prompt phrase.

# %%
frame = pd.concat(
    [wo.group_frame(st.candidate_per_copy(m, "word_order"), queries, cands, m) for m in models],
    ignore_index=True,
)
q0 = queries.iloc[0]
example = frame[(frame.model == large) & (frame["query"] == 0)]
report.table(
    example.assign(group=example.group.map(wo.GROUP_LABELS))[["group", "text", "per_copy"]],
    caption=f"The candidates of the query “{q0.prompt}{q0.completion}” and their per-copy "
    f"influence on it at {large}.",
    headers={"per_copy": f"per-copy influence at {large} (nats)"},
)

# %% [markdown]
# ## Influence per group and model size
# Bars: the mean over facts of each fact's group mean (per copy), with a 95% bootstrap
# interval over facts; dots: every fact's group mean. Compare with the paper's Figs. 24–26.
# "Completion removed" has no answer to be influenced towards and is left to the table.

# %%
summary = wo.group_summary(frame, **boot)
fm = wo.fact_means(frame)
fig = wo.plot_groups(summary, fm, models)
report.figure(
    fig,
    "headline",
    caption="Mean per-copy influence of each group of candidates on its fact's query, per "
    "model size (panels, small to large, each on its own scale), with 95% bootstrap intervals "
    "over facts and every fact's mean as a dot: blue, prompt phrase first; orange, the names "
    "only; red and purple, the completion first.",
)
means = summary.assign(
    group=summary.group.map(wo.GROUP_LABELS),
    cell=[stats.Interval(r.mean, r.low, r.high).format() for r in summary.itertuples()],
).pivot(index="group", columns="model", values="cell")
report.table(
    means.reindex([wo.GROUP_LABELS[g] for g in wo.GROUPS])[models],
    caption="Mean per-copy influence (nats) over facts [95% CI], per group and model size, "
    "completion removed included.",
    index=True,
)

# %% [markdown]
# ## The contrasts, fact by fact
# For each fact: the ratio of its mean influence over prompt-first groups to that over
# completion-first groups, of rewording to flipped, and of flipped to names only (read on a
# log scale; a denominator with no positive influence counts as ≥ 1000×, a numerator with
# none as ≤ 0.001×). The median over facts with a 95% bootstrap interval over facts, the
# share of facts whose ratio is above 1 and the sign test of that share against one half.

# %%
values = wo.contrast_values(frame)
fig = wo.plot_contrasts(values, params, **boot)
report.figure(
    fig,
    "contrasts",
    caption="Median over facts of each contrast's ratio against model size, with 95% "
    "bootstrap intervals over facts; the solid line is 1× (no difference), the dashed line "
    "the paper's 10× for rewording / flipped.",
)
report.table(
    wo.contrast_table(values, models, **boot),
    caption="Each contrast per model size: the median ratio over facts [95% CI], the share of "
    "facts above 1 and the sign test's p.",
    headers={"median": "ratio, median [95% CI]", "above_1": "facts above 1"},
    percent=["above_1"],
    stacked=True,
)
trends = wo.trend_table(values, params, **boot)
report.table(
    trends,
    caption="Each contrast's change with size: the geometric mean of the per-fact ratio at "
    "every size, the change of the log10 ratio across the suite (mean per-fact slope × "
    "decades of parameters) [95% CI] and the Wilcoxon p of the per-fact slopes.",
    headers={"change": "change across the suite (log10)"},
    stacked=True,
)

# %% [markdown]
# ## Where the influence sits: tokenwise
# A sequence's score is a sum over its tokens (MATH.md, tokenwise attribution): the term of
# position t belongs to the token the model predicts there. Blue tokens raise the query's
# log-probability, red ones lower it; each model's rows share one colour scale. Shown for
# representative facts (their rewording / flipped ratio closest to the median at the largest
# size), for the smallest and the largest model.

# %%
shown = wo.representative_facts(values["rewording / flipped"], large, cfg["token_facts"])
with report.stage("tokenwise"):
    parts, gaps = [], []
    for m in (small, large):
        t, gap = wo.token_table(st, m, frame, queries, shown, cfg["token_groups"])
        parts.append(t)
        gaps.append(gap)
max_gap = max(gaps, default=0.0)
# The token terms must add up to the stage's scores (float32 rounding aside).
assert max_gap < 1e-3, f"tokenwise scores differ from the stage's by {max_gap:.1e} (relative)"
if shown:
    tokens = pd.concat(parts, ignore_index=True)
    report.table(
        tokens,
        caption=f"Tokenwise influence of the first candidate of each shown group for "
        f"fact(s) {', '.join(map(str, shown))}; the per-copy total is the stage's score (the "
        f"token terms add up to it within {stats.format_number(max_gap, 1)}, relative), and "
        "the share of the sequence's |influence| that sits on the answer's name, beside the "
        "answer's share of the sequence's tokens.",
        headers={
            "per_copy": "per-copy influence (nats)",
            "answer_share": "on the answer",
            "answer_tokens": "answer's share of tokens",
            "fact_id": "fact",
            "tokens": "tokens",
        },  # fmt: skip
        percent=["answer_share", "answer_tokens"],
        html_columns=["tokens"],
        stacked=True,
    )

# %%
found = wo.findings(values, params, **boot)
by_name = {f.name: f for f in found}
contrast_at = {
    name: stats.bootstrap(v[large].dropna().to_numpy(), np.median, **boot).estimate
    if large in v.columns
    else float("nan")
    for name, v in values.items()
}
report.conclude(
    question="Is a training sequence influential only when the prompt phrase precedes the "
    "completion?",
    paper="Influence is high only with the prompt phrase first; flipped sequences keep only "
    "the names' influence; at least 10× less influence when flipped.",
    here=f"Over {n_facts} facts at {large}, prompt-first candidates carry a median "
    f"{wo.ratio_text(contrast_at['prompt first / completion first'])} the influence of "
    f"completion-first ones, rewordings {wo.ratio_text(contrast_at['rewording / flipped'])} "
    f"that of flipped sequences, and flipped sequences "
    f"{wo.ratio_text(contrast_at['flipped / names only'])} that of the names alone.",
    findings=found,
    reference="§5.3.4, Figs. 24–27",
)
report.metrics["model_params"] = params
report.metrics["n_facts"] = n_facts
report.metrics["group_means"] = summary.round(8).to_dict(orient="records")
report.metrics["contrasts"] = wo.contrast_table(values, models, **boot).to_dict(orient="records")
report.metrics["trends"] = trends.to_dict(orient="records")
report.metrics["token_sum_max_relative_gap"] = max_gap
report.save()

# %%
# NBVAL_CHECK_OUTPUT
print("facts:", n_facts, "| models:", models, "| shown tokenwise:", shown)
print(headline(found))

# %% [markdown]
# ## Reading the results

# %%
group_means = summary.pivot(index="group", columns="model", values="mean")[models]
best = {m: wo.GROUP_LABELS[group_means[m].idxmax()] for m in models}
rewording = group_means.loc["rewording"].tolist()
removed = group_means.loc["completion_removed"].tolist()
Markdown(
    f"""
* **Which group is most influential.** Per size: {", ".join(f"{best[m]} ({m})" for m in models)}.
  The mean rewording influence {stats.direction(rewording)} with model size
  ({" → ".join(stats.format_number(v) for v in rewording)} nats per copy).
* **Prompt first.** {by_name["prompt phrase first"].reason}. **Flipped.**
  {by_name["10× less when flipped"].reason}. **Names only.**
  {by_name["flipped keep only the names"].reason}.
* **Completion removed.** Candidates that keep the prompt phrase but continue it with
  something else average {" → ".join(stats.format_number(v) for v in removed)} nats per copy
  ({small} → {large}).
* **With size.** {
        "; ".join(
            f"{r.contrast}: change {r.change} (log10), {stats.p_clause(r.p)}"
            for r in trends.itertuples()
        )
    }.
* **Uncertainty.** Intervals are bootstrap intervals over facts; the tests are sign tests over
  facts (with n facts the smallest two-sided p is 2 / 2ⁿ, so fewer than 6 facts cannot reach
  p < 0.05); the tokenwise rows illustrate, they do not measure.
"""
)
