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
# keep the names; the fact flipped (completion before prompt phrase); flipped with the prompt
# phrase removed. Influence was high only when the prompt phrase came before the completion
# phrase; flipped sequences kept only about the influence that the shared names alone carry;
# a translation test showed at least ten times less influence when flipped.
#
# **Here.** The corpus generates the same six groups (two sentences each) for many facts, as
# hypothetical sequences that are never trained on (as in the paper), and each fact's query is
# its first English training template. For every model size we read the per-copy influence
# (score / N, N the training-set size, in nats of log-probability of the completion per added
# copy) of each group's sequences on the fact's query, which the shared scores stage computes
# with the EK-FAC fitted on the training set as if they were training sequences, average them per
# group with bootstrap intervals over facts, form the rewording-to-flipped ratio, compare
# flipped sequences with irrelevant sentences that keep the names, and decompose a few
# sequences over their tokens.

# %% tags=["parameters"]
preset = "smoke"
device = "cpu"
seed = 0
n_boot = None
token_facts = None
token_groups = None

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import HTML, Markdown

from influence.study import compat, display, stats
from influence.study import word_order as wo
from influence.study.influence_scores import study_scores
from influence.study.parameters import notebook_config
from influence.study.reporting import Report
from influence.study.suite import load_suite

cfg = notebook_config("05_word_order", globals())
report = Report("05_word_order", preset=preset, device=device, seed=seed, params=cfg)
unknown = sorted(set(cfg["token_groups"]) - set(wo.GROUPS))
if unknown:
    raise ValueError(f"token_groups {unknown} unknown; valid groups: {', '.join(wo.GROUPS)}")

# %%
with report.stage("scores"):
    suite = load_suite(preset, seed, device=device, progress=False)
    st = study_scores(suite, preset, progress=False)
models = st.models
small, large = models[0], models[-1]
cands = st.candidate_frame("word_order")  # hypothetical sequences, never trained on
queries = st.queries("word_order")
print(f"{len(queries)} word-order facts; models {models}; {st.n_train} training sequences")

# %% [markdown]
# ## 1. The six groups
# One fact's query and its twelve word-order sequences (two templates per group). Prompt
# first: rewording, semantic change; no completion: completion removed; names only:
# irrelevant with names; completion first: flipped, flipped without the prompt phrase.

# %%
frame = pd.concat(
    [wo.group_frame(st.candidate_per_copy(m, "word_order"), queries, cands, m) for m in models],
    ignore_index=True,
)
q0 = queries.iloc[0]
print(f"query: {q0.prompt!r} -> {q0.completion!r}")
frame[(frame.model == small) & (frame["query"] == 0)][["group", "template_id", "text"]]

# %% [markdown]
# ## 2. Influence per group and model size
# Bars: the mean over facts of each fact's group mean (per copy), with a 95% bootstrap
# interval over facts; dots: every sequence. Compare with the paper's Figs. 24–26.

# %%
summary = wo.group_summary(frame, n_boot=cfg["n_boot"], seed=seed)
fig = wo.plot_groups(frame, summary, models)
report.savefig(fig, "headline")
plt.show()

# %%
table = summary.pivot(index="group", columns="model", values="mean").reindex(
    index=list(wo.GROUPS), columns=models
)
table.style.format("{:.3g}")

# %% [markdown]
# ## 3. Rewordings against flipped sequences
# The ratio of the mean influence of prompt-first rewordings to that of flipped sequences
# (a ratio of means over facts, with a bootstrap interval over facts), the share of facts
# whose rewordings beat their flipped sequences (sign test), and the same gap on a scale-free
# footing per fact, (rewording − flipped) / (|rewording| + |flipped|), compared between the
# smallest and the largest model (paired Wilcoxon over facts).

# %%
ratio = wo.flipped_ratio(frame, n_boot=cfg["n_boot"], seed=seed).set_index("model")
names = wo.flipped_vs_names(frame).set_index("model")
gap = wo.normalised_gap(frame)[models]
trend = wo.size_trend(gap, small, large)
n_facts = len(queries)
thin = n_facts < 10


def fmt(x, digits=3):
    return "n/a" if not np.isfinite(x) else f"{x:.{digits}g}"


def ratio_text(m):
    r = ratio.loc[m]
    if r.denominator <= 0:
        return f"undefined (flipped mean {fmt(r.denominator)} ≤ 0)"
    return f"{fmt(r.ratio)}× [{fmt(r.lo)}, {fmt(r.hi)}]"


ratio.round(4)

# %%
names.round(4)

# %% [markdown]
# ## 4. Where the influence sits: tokenwise
# Each sequence's score is a sum over its tokens (MATH.md, tokenwise attribution): the term
# of position t belongs to the token the model predicts there. Red tokens raise the query's
# log-probability, blue ones lower it; each row is scaled to the largest |value| of its model.
# Shown for the smallest and the largest model; the row's total is the stage's score
# (per copy, ×10⁻³ nats).

# %%
with report.stage("tokenwise"):
    tok = suite.tokenizer
    token_rows, gaps, shares = {}, [], []
    shown = queries.iloc[: cfg["token_facts"]]
    for m in (small, large):
        rows = []
        for qi, q in shown.iterrows():
            seqs = frame[(frame.model == m) & (frame["query"] == qi) & (frame.template_id == 0)]
            seqs = seqs.set_index("group").loc[cfg["token_groups"]]
            bt, sub = wo.tokenwise(
                st, m, shown.loc[[qi]], seqs.train_id.tolist(), candidates="word_order"
            )
            for j, (g, s) in enumerate(seqs.iterrows()):
                contrib = wo.token_contributions(
                    bt[0, j], sub[j]["input_ids"].tolist(), sub[j]["labels"].tolist()
                )
                total = sum(v for _, v in contrib) / st.n_train
                gaps.append((abs(total - s.per_copy), abs(s.per_copy)))
                toks = [(tok.decode([t]), v) for t, v in contrib]
                # share of |influence| on the answer's tokens (the fact's object name)
                obj = wo.span_share(toks, s.text, q.object)
                shares.append({"model": m, "group": g, "fact": qi, "answer_share": obj})
                caption = f"fact {qi} · {wo.GROUP_LABELS[g]} · total {total * 1e3:+.3g}"
                rows.append((caption, toks))
        token_rows[m] = rows
# The token terms must add up to the stage's scores (float32 rounding aside): relative to the
# largest score shown, so that a score near zero does not inflate the check.
max_gap = max(d for d, _ in gaps) / max(max(a for _, a in gaps), 1e-30)
print(f"largest gap between token sums and the stage's scores: {max_gap:.1e} (relative)")
assert max_gap < 1e-3, "tokenwise scores do not add up to the stage's scores"
answer_share = pd.DataFrame(shares).groupby(["model", "group"], sort=False).answer_share.mean()
answer_share.unstack("model").round(2)

# %%
HTML(
    "".join(
        f"<h4>model {m}: query “{q0.prompt}{q0.completion}”</h4>" + wo.token_html(r)
        for m, r in token_rows.items()
    )
)

# %%
# NBVAL_CHECK_OUTPUT
# Deterministic: counts and names only (scores depend on floating-point details).
print("facts:", n_facts)
print("sequences per fact:", int(frame[frame.model == small].groupby("query").size().iloc[0]))
print("groups:", list(wo.GROUPS))
print("models:", models)

# %% [markdown]
# ## Paper vs here

# %%
rw, fl = table.loc["rewording", large], table.loc["flipped", large]
prompt_first_best = {
    m: table[m].idxmax() in ("rewording", "semantic_change") and table.loc["rewording", m] > 0
    for m in models
}
r_large = ratio.loc[large]
drop10 = (r_large.denominator <= 0 < r_large.numerator) or r_large.ratio >= 10
drop_any = (r_large.denominator <= 0 < r_large.numerator) or (r_large.ratio > 1 and r_large.lo > 1)
n_large = names.loc[large]

sizes_ok = [m for m in models if prompt_first_best[m]]
v1 = "agrees" if len(sizes_ok) == len(models) else "inconclusive" if sizes_ok else "disagrees"
r1 = (
    ""
    if v1 == "agrees"
    else (
        "the most influential group is "
        + ", ".join(f"{m}: {wo.GROUP_LABELS[table[m].idxmax()]}" for m in models)
    )
)
v2 = "agrees" if drop10 else "inconclusive" if drop_any else "disagrees"
r2 = "" if v2 == "agrees" else f"largest model: rewording/flipped = {ratio_text(large)}"
if not np.isfinite(n_large.wilcoxon_p) or n_large.wilcoxon_p >= 0.05:
    v3, r3 = "agrees", ""
elif n_large.difference > 0:
    v3 = "disagrees"
    r3 = (
        f"flipped sequences carry more than the names alone (Wilcoxon p = {n_large.wilcoxon_p:.2g})"
    )
else:
    v3 = "inconclusive"
    r3 = f"flipped sequences carry less than the names alone (p = {n_large.wilcoxon_p:.2g})"
rows = [
    (
        "influence high only with the prompt phrase first",
        "most influential group per size: "
        + ", ".join(f"{m} {wo.GROUP_LABELS[table[m].idxmax()]}" for m in models),
        v1,
        r1,
    ),
    (
        "≥10× drop when flipped",
        f"rewording/flipped at {large}: {ratio_text(large)}; rewordings beat flipped for "
        f"{r_large.share_numerator_higher:.0%} of facts (sign test p = "
        f"{r_large.sign_test_p:.2g})",
        v2,
        r2,
    ),
    (
        "flipped keep only the names' influence",
        f"{large}: flipped {fmt(n_large.flipped)} vs irrelevant-with-names "
        f"{fmt(n_large.irrelevant_with_names)} per copy (Wilcoxon p = "
        f"{fmt(n_large.wilcoxon_p, 2)})",
        v3,
        r3,
    ),
]
if thin:
    thin_reason = f"only {n_facts} word-order facts at preset {preset!r}: too few to conclude"
    rows = [(f, h, "not comparable", thin_reason) for f, h, _, _ in rows]
pvh = pd.DataFrame(rows, columns=["finding (paper)", "here", "verdict", "reason"])
display.table(pvh)

# %%
verdicts = list(pvh.verdict)
overall = "not comparable" if thin else compat.overall_verdict(verdicts)
here = (
    f"{n_facts} facts × 6 groups, {len(models)} sizes. Largest model ({large}): rewording "
    f"{fmt(rw)} vs flipped {fmt(fl)} nats per copy, ratio {ratio_text(large)}; the "
    f"scale-free rewording-vs-flipped gap {trend['direction']} from {small} to {large} "
    f"({fmt(trend[small], 2)} → {fmt(trend[large], 2)}, Wilcoxon p = "
    f"{fmt(trend['wilcoxon_p'], 2)})."
)
reason = "; ".join(f"{r[0]}: {r[3]}" for r in rows if r[2] != "agrees")
report.summarize(
    question="Is a training sequence influential only when the prompt phrase precedes the "
    "completion, as the paper found?",
    paper="Influence is high only when the prompt phrase comes before the completion; flipped "
    "sequences keep only the shared names' influence; ≥10× less influence when flipped.",
    here=here,
    verdict=overall,
    reason=reason,
    reference="§5.3.4, Figs. 24–27",
)
report.metrics["word_order"] = {
    "n_facts": n_facts,
    "group_mean_per_copy": {
        m: {
            r.group: {"mean": r.mean, "lo": r.lo, "hi": r.hi, "facts": r.facts}
            for r in summary[summary.model == m].itertuples()
        }
        for m in models
    },
    "flipped_ratio": {m: {k: float(v) for k, v in ratio.loc[m].items()} for m in models},
    "flipped_vs_names": {m: {k: float(v) for k, v in names.loc[m].items()} for m in models},
    "normalised_gap_trend": trend,
    "token_sum_max_relative_gap": max_gap,
}
report.paper_vs_here = "; ".join(f"{r[0]}: {r[2]} ({r[1]})" for r in rows)
report.save()
Markdown(f"**In one line.** {here}")

# %% [markdown]
# ## Reading the results

# %%
token_line = "; ".join(
    f"{m}: "
    + ", ".join(f"{wo.GROUP_LABELS[g]} {answer_share[(m, g)]:.0%}" for g in cfg["token_groups"])
    for m in (small, large)
)
removed = table.loc["completion_removed", models]
removed_note = (
    ": negative at every size, so a sequence that continues the prompt phrase with something "
    "else lowers the probability of the answer."
    if (removed < 0).all()
    else "."
)
best = {m: wo.GROUP_LABELS[table[m].idxmax()] for m in models}
worst = {m: wo.GROUP_LABELS[table[m].idxmin()] for m in models}
Markdown(
    f"""
* **Which groups help.** The most influential group is
  {", ".join(f"{best[m]} ({m})" for m in models)}; the least influential
  {", ".join(f"{worst[m]} ({m})" for m in models)}. The mean rewording influence
  {stats.direction(table.loc["rewording", models].to_numpy())} with model size
  ({", ".join(fmt(table.loc["rewording", m]) for m in models)} nats per copy).
* **Flipped.** Rewording/flipped per size:
  {"; ".join(f"{m} {ratio_text(m)}" for m in models)}.
  {"These intervals rest on too few facts to mean much." if thin else ""}
* **Completion removed.** Sequences that keep the prompt phrase but continue it with
  something else average {", ".join(fmt(table.loc["completion_removed", m]) for m in models)}
  per copy{removed_note}
* **Tokens.** Share of each shown sequence's |influence| on the answer's name:
  {token_line}. With {len(shown)} fact(s) per group this illustrates; it does not measure.
"""
)
