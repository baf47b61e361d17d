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
# # 00 — The instrument: a generated multilingual world and a suite of models
#
# Grosse et al. (2023) study influence on Anthropic's pretrained models (810M to 52B
# parameters) and their pretraining data. We cannot download either, so we build both:
# a fictional world whose facts are stated by hand-written templates in three languages,
# plus labelled material for every research question of the paper (word order, role-play,
# math, code, memorised sayings), and a Pythia-like suite of `LlamaForCausalLM` models of
# growing size trained from scratch on it, the same way, on the same data in the same order.
#
# Every training sequence carries one labelled unit and its ground truth (which fact,
# relation, template, language, name forms, role-play category …), so the later notebooks
# *measure* what the paper judged by eye: for example whether the most influential sequences
# of a query state the same fact in other words or another language, or only share its tokens.
#
# Every scale verdict of the study compares models of different sizes, so the suite must be
# one in which size is the only thing that changes and generalisation grows with it. This
# notebook shows the world, the corpus and its held-out splits, the tokenizer and the models,
# and measures what each size learned with two training seeds: held-out loss, seen facts,
# held-out paraphrases and facts asked in a language they were never stated in.

# %% tags=["parameters"]
preset = "smoke"
device = "cpu"
seed = 0
n_examples = None
scaling_seeds = None

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown

from influence.study import design_log
from influence.study.capability import (
    acceptance,
    by_language,
    outcomes,
    size_steps,
    steps_beyond_noise,
    summarise,
)
from influence.study.corpus import build_corpus
from influence.study.findings import headline, not_comparable
from influence.study.parameters import notebook_config
from influence.study.reporting import Report
from influence.study.stats import format_p
from influence.study.suite import completion_scores, load_suite, train_suite
from influence.study.tokenizer import encode_text, name_overlap, stats

cfg = notebook_config("00_corpus_and_models", globals())
report = Report("00_corpus_and_models", preset=preset, device=device, seed=seed, params=cfg)
train_seeds = [seed + k for k in range(cfg["scaling_seeds"])]

# %% [markdown]
# ## The world
#
# Countries, cities, people and invented elements, related by four relations (capital,
# leader, birthplace, discoverer). Every name is generated, so no prior knowledge can leak
# in, and every entity has **one name per language**: a stem spelled by each language's rule
# plus a per-language suffix (`data/names.json`), the way Finland, Finlande and Finnland
# differ. Cross-lingual transfer therefore has to connect different strings rather than ride
# identical name tokens. A **control set** of entities (about 10%) keeps one name in every
# language, as most proper nouns do; control entities are related only to control entities,
# so each fact's `names` label is either `localized` or `shared` and the two effects can be
# measured apart. About 30% of the facts are stated in one language only (both of their
# entities appear in facts stated in every language, so their names are known there).

# %%
with report.stage("corpus"):
    corpus = build_corpus(preset, seed)
world = corpus.world
facts = pd.DataFrame(
    [
        {
            "relation": f.relation,
            "names": f.names,
            "stated in": "one language" if len(f.languages) == 1 else "every language",
        }
        for f in world.facts
    ]
)
fact_counts = pd.crosstab(facts.relation, [facts.names, facts["stated in"]], margins=True)
fact_counts.columns = [" · ".join(c).strip(" ·") for c in fact_counts.columns]
report.table(
    fact_counts,
    caption="Facts of the world per relation: names localized per language or shared "
    "(the control set), stated in every language or in one only.",
    headers={"relation": "relation"},
    index=True,
)
examples = [
    next(e for e in world.entities if e.type == t and not e.shared)
    for t in ("country", "city", "person", "element")
] + [next(e for e in world.entities if e.shared)]
report.table(
    pd.DataFrame(
        [{"entity": "control (shared)" if e.shared else e.type, **e.names} for e in examples]
    ),
    caption="One entity of each type and one of the control set, with its name per language.",
)

# %% [markdown]
# ## The corpus and its splits
#
# Each fact is stated in every language it belongs to with each of nine hand-written
# training templates per relation (template *k* in French and German is the translation of
# template *k* in English; they differ in syntax, not only in words). One training sequence
# is one statement. Beyond facts: **role-play** material for three topics (§5.3.5) — assistant
# dialogues in which the assistant voices a wish, fiction, essays, distractors that share key
# words only, unrelated text, and **format controls** (assistant dialogues on unrelated
# topics) — word problems with worked answers, small Python functions (§5.3.1), and invented
# **sayings** repeated in several contexts (the memorised-sequence contrast of §5.2).
#
# Held out of training, by construction:
#
# * the **held-out loss set**: sequences drawn from the same generator and never trained on
#   (for 5% of the (fact, language) pairs one of templates 1–8, and 5% more role-play texts,
#   word problems and functions); the suite measures its loss during training;
# * **paraphrases**: two near (a light rewording of a training template) and two far (a
#   different sentence) templates per relation and language, never in training;
# * **cross-lingual** queries: facts stated in one language, asked in the other two;
# * new word problems and new functions (their query sets);
# * the paper's six **word-order** groups (§5.3.4), generated as hypothetical sequences
#   (`corpus.candidates["word_order"]`) that the influence stage scores as if they were
#   training sequences, as the paper did: they never compete with a fact in training.

# %%
train = corpus.train.to_pandas()
splits = {
    "train": len(corpus.train),
    "held-out loss set": len(corpus.heldout),
    **{f"queries: {k}": len(v) for k, v in corpus.queries.items()},
    **{f"candidates: {k}": len(v) for k, v in corpus.candidates.items()},
}
report.table(
    pd.DataFrame({"split": list(splits), "sequences": list(splits.values())}),
    caption="The corpus's splits: training sequences, the held-out loss set, the query sets "
    "and the hypothetical candidate sequences, in sequences.",
)
report.table(
    pd.crosstab(train["kind"], train["language"], margins=True),
    caption="Training sequences per kind and language.",
    index=True,
)
rp = train[train.kind == "role_play"]
report.table(
    pd.crosstab(rp["category"], rp["topic"].replace("", "(none)")),
    caption="Role-play training sequences per category and topic.",
    index=True,
)

# %%
n_ex = cfg["n_examples"]
shown = [
    {"what": f"training: {kind}", "language": lang, "text": text}
    for kind, rows in train.groupby("kind", sort=False)
    for lang, sub in rows.groupby("language", sort=False)
    for text in sub["text"].head(n_ex)
]
shown += [
    {
        "what": f"query: {name}",
        "language": q[0].get("language", ""),
        "text": f"{q[0]['prompt']} → {q[0]['completion']} ({len(q[0]['related_ids'])} related)",
    }
    for name, q in corpus.queries.items()
]
shown += [
    {"what": f"candidate: {name}", "language": "", "text": f"{c[0]['text']} ({c[0]['group']})"}
    for name, c in corpus.candidates.items()
]
report.table(
    pd.DataFrame(shown),
    caption=f"Examples: the first {n_ex} training sequences of each kind and language, the "
    "first query of each query set (prompt → completion, with its number of related training "
    "sequences) and the first candidate sequence of each candidate set.",
)

# %% [markdown]
# ## Tokenizer
#
# A byte-level BPE trained on the training split only (`tokenizers`), wrapped as a
# `transformers` `PreTrainedTokenizerFast` and saved with every model. Each training sequence
# is `<bos> text <eos>`, one per row, never packed; token counts below include `<bos>` and
# `<eos>`. How much do the three names of an entity share tokens? `first_token`: share of
# language pairs whose names start with the same token; `jaccard`: overlap of the names'
# token sets.

# %%
with report.stage("train_suite"):
    trained = train_suite(preset, seed, train_seeds, device=device, progress=False)
    suites = {
        s: load_suite(preset, seed, device=device, progress=False, train_seed=s)
        for s in train_seeds
    }
suite = suites[seed]
tok = suite.tokenizer
tstats = stats(tok, list(corpus.train["text"]))
train["tokens"] = [len(encode_text(tok, t)) for t in corpus.train["text"]]
report.table(
    pd.DataFrame(
        {"quantity": [k.replace("_", " ") for k in tstats], "value": list(tstats.values())}
    ),
    caption=f"The tokenizer on the training split (fixed row length for influence scoring: "
    f"{suite.seq_len} tokens).",
)
report.table(
    train.groupby("kind")["tokens"].agg(["count", "sum", "mean", "max"]),
    caption="Tokens per training sequence by kind (count of sequences, total, mean, longest; "
    "with <bos> and <eos>).",
    headers={"count": "sequences", "sum": "tokens", "mean": "mean tokens", "max": "most tokens"},
    index=True,
)
overlap = name_overlap(tok, world)
name_share = overlap.groupby("shared")[["first_token", "jaccard"]].mean()
name_share.index = name_share.index.map({True: "shared (control)", False: "localized"})
report.table(
    name_share.rename_axis("names"),
    caption="How much an entity's names share tokens across languages: the share of language "
    "pairs whose names start with the same token, and the mean Jaccard overlap of their "
    "token sets.",
    headers={"first_token": "same first token", "jaccard": "token-set Jaccard"},
    percent=["first_token"],
    index=True,
)

# %% [markdown]
# ## The model suite
#
# Five sizes spanning about 100× in parameters (embeddings included; the input and output
# embeddings are tied, as in GPT-2, so that the small sizes are not mostly embedding). One
# recipe, in which size is the only variable: the same corpus, the same sequences in the same
# order, the same token budget, AdamW with linear warm-up then cosine decay. The peak learning
# rate follows one rule, 0.46 / width, so narrower models take larger steps (Pythia and μP
# also lower it as models grow). **One token budget for every size** (a fixed number of
# epochs, chosen once, Pythia-style) rather than stopping each size at its own held-out
# minimum: a per-size stopping point would make the number of tokens seen a second variable
# that changes with size. The held-out loss is checkpointed during training, so over-training
# would show as a curve that turns up. Each size is trained with two seeds (initialisation and
# data order); the rest of the study uses the models of seed `seed`, the other seed only feeds
# the scaling table below. Training runs one thread per model (so it is deterministic) and two
# models at a time, each in its own process; the table gives each model's wall and CPU seconds
# (wall times are inflated when the machine is shared). The `large` preset (a world of 1,500
# facts, sizes of 172k to 77M parameters, vocabulary 2048) is meant for a CUDA device
# (`DEVICE=cuda`): it trains one model at a time with the device's default threads.

# %%
models = pd.DataFrame([i for s in suites.values() for i in s.info])
models["tokens_per_param"] = models.tokens_seen / models.params
cols = [
    "name",
    "train_seed",
    "params",
    "non_embedding_params",
    "layers",
    "hidden",
    "tokens_seen",
    "tokens_per_param",
    "train_seconds",
    "train_cpu_seconds",
    "tokens_per_cpu_second",
]
order = list(suite.models)
params = [int(p) for p in models[models.train_seed == seed].params]
report.table(
    models[cols],
    caption=f"The suite: {len(order)} sizes, {params[-1] / params[0]:.0f}× from the smallest "
    "to the largest in parameters, each trained with every seed; training wall and CPU seconds.",
    headers={
        "name": "size",
        "train_seed": "seed",
        "non_embedding_params": "non-embedding parameters",
        "tokens_seen": "tokens seen",
        "tokens_per_param": "tokens per parameter",
        "train_seconds": "wall s",
        "train_cpu_seconds": "CPU s",
        "tokens_per_cpu_second": "tokens per CPU s",
    },
    digits=3,
    stacked=True,
)

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
for k, name in enumerate(order):
    for s, su in suites.items():
        log = su.logs[name]
        style = {"color": f"C{k}", "ls": "-" if s == seed else "--", "lw": 1}
        label = f"{name} ({log['info']['params']:,})" if s == seed else None
        axes[0].plot(log["tokens"], log["loss"], label=label, **style)
        axes[1].plot(log["heldout"]["tokens"], log["heldout"]["loss"], "o-", ms=2, **style)
for ax, title in zip(axes, ("training loss", "held-out loss"), strict=True):
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(f"{title} (nats / token)")
    ax.set_yscale("log")
    ax.set_title(title)
axes[0].legend(title="size (parameters)")
fig.tight_layout()
report.figure(
    fig,
    "loss_curves",
    caption=f"Training loss (left) and held-out loss (right) against tokens seen, per size; "
    f"solid: seed {seed}, dashed: seed {seed + 1}. Every size sees the same tokens in the same "
    "order; a held-out curve that turned up would show over-training.",
)

# %% [markdown]
# ## What the models learned, per size and seed
#
# A fact query is right when greedy decoding reproduces the whole name. *Seen*: the first
# training template, in each language the fact is stated in. *Near* / *far paraphrase*:
# held-out templates. *Cross-lingual*: a fact stated in one language only, asked in another
# with that language's names (localized, or shared for the control set). *Role-play*: a
# held-out assistant prompt (an opener never seen in training before a training question)
# completed exactly with its answer. The acceptance, on the mean over seeds: the
# held-out loss falls and near-paraphrase and cross-lingual accuracy rise from each size to
# the next; the smallest model completes at least 30% of seen facts; the largest has the
# lowest held-out loss.

# %%
with report.stage("evaluate"):
    rows, items = [], {}
    for s, su in suites.items():
        for inf_ in su.info:
            m = su.models[inf_["name"]]
            items[inf_["name"], s] = outcomes(m, su.tokenizer, corpus)
            rows.append(
                {
                    "size": inf_["name"],
                    "params": inf_["params"],
                    "non_embedding_params": inf_["non_embedding_params"],
                    "seed": s,
                    "train_tokens": inf_["tokens_seen"],
                    **summarise(items[inf_["name"], s]),
                    "train_cpu_seconds": inf_["train_cpu_seconds"],
                }
            )
scaling = pd.DataFrame(rows)
measures = [
    "heldout_loss",
    "seen_fact_accuracy",
    "near_paraphrase_accuracy",
    "far_paraphrase_accuracy",
    "cross_lingual_accuracy",
    "cross_lingual_localized",
    "cross_lingual_shared",
    "role_play_completion",
]
shares = measures[1:]
measure_headers = {
    "heldout_loss": "held-out loss (nats/token)",
    "seen_fact_accuracy": "seen facts",
    "near_paraphrase_accuracy": "near paraphrases",
    "far_paraphrase_accuracy": "far paraphrases",
    "cross_lingual_accuracy": "cross-lingual",
    "cross_lingual_localized": "cross-lingual, localized names",
    "cross_lingual_shared": "cross-lingual, shared names",
    "role_play_completion": "role-play completion",
}
report.table(
    scaling[["size", "seed", "params", *measures]],
    caption="What each model learned, per size and training seed: held-out loss and greedy "
    "completion accuracy per query kind (both seeds shown; none is picked).",
    headers=measure_headers,
    percent=shares,
    stacked=True,
)
mean = scaling.groupby("size", sort=False)[measures].mean()
checks = acceptance(scaling)
steps = size_steps(items, order, seed=seed)
step_measures = list(dict.fromkeys(steps["measure"]))


def noise(name):
    measure = next((m for m in step_measures if name.startswith(m + " ")), None)
    return steps_beyond_noise(steps, measure) if measure else ""


report.table(
    pd.DataFrame(
        [
            {
                "criterion": name.replace("_accuracy", "").replace("_", " "),
                "met": "yes" if c["ok"] else "no",
                "values (mean over seeds)": ", ".join(
                    f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in c["values"].items()
                ),
                "size steps beyond noise": noise(name),
            }
            for name, c in checks.items()
        ]
    ),
    caption=f"Issue 23's acceptance criteria on the mean over the {len(train_seeds)} seeds. "
    "A criterion on every size step is met when the seed means move the required way; the "
    "last column says how many of those steps are also beyond the noise (next table).",
)

# %% [markdown]
# Is each size step beyond the noise? Two kinds of noise can move a step: the finite query
# sets (the interval: a bootstrap over queries, or held-out sequences for the loss, of the
# change in the mean over seeds, each query averaged over the seeds of its size first; the
# p of a Wilcoxon signed-rank test over the same queries) and training (the seed pairings:
# of the 4 pairings of a seed of the smaller size with a seed of the larger, how many move
# the required way). A step counts as a rise (or fall) only when the 95% interval excludes
# zero on the required side and every pairing moves that way; "reverses" when both point
# the other way; otherwise it is within noise. A step within noise can flip with another
# seed, or on another machine: the same code retrained on a second host of the same CPU
# model gives models that differ as two seeds do (README, *Determinism*).

# %%
report.table(
    steps.assign(
        measure=steps["measure"].map(measure_headers),
        change=[
            f"{e:+.3g} [{lo:+.3g}, {hi:+.3g}]"
            for e, lo, hi in zip(steps["change"], steps["low"], steps["high"], strict=True)
        ],
        p=steps["p"].map(format_p),
        seed_pairs=[
            f"{k} of {n}" for k, n in zip(steps["seed_pairs"], steps["pairings"], strict=True)
        ],
    )[["measure", "step", "change", "p", "seed_pairs", "verdict"]],
    caption="Each size step of the acceptance: the change in the mean over seeds with its 95% "
    "bootstrap interval over queries (held-out sequences for the loss), the Wilcoxon p over "
    "the same, the seed pairings that move the required way, and the verdict.",
    headers={
        "change": "change [95% interval]",
        "p": "p (Wilcoxon)",
        "seed_pairs": "seed pairings moving the required way",
    },
)

# %%
panels = {
    "seen_fact_accuracy": "seen template",
    "near_paraphrase_accuracy": "held-out, near rewording",
    "far_paraphrase_accuracy": "held-out, far rewording",
    "cross_lingual_localized": "other language,\nlocalized names",
    "cross_lingual_shared": "other language,\nshared names (control)",
    "heldout_loss": "held-out loss\n(nats / token)",
}
fig, axes = plt.subplots(2, 3, figsize=(10, 6.4), sharex=True)
g = scaling.groupby("size", sort=False)
for ax, (col, title) in zip(axes.flat, panels.items(), strict=True):
    colour = "C3" if col == "heldout_loss" else "C0"
    for _, sub in scaling.groupby("seed"):
        ax.plot(sub["params"], sub[col], "o", color=colour, alpha=0.5, ms=4)
    ax.plot(g["params"].first(), g[col].mean(), "-", color=colour)
    ax.set_xscale("log")
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.set_title(title)
    if col != "heldout_loss":
        ax.set_ylim(-0.03, 1.03)
for ax in axes[1]:
    ax.set_xlabel("parameters")
for ax in axes[:, 0]:
    ax.set_ylabel("greedy accuracy")
fig.tight_layout()
report.figure(
    fig,
    "headline",
    caption="What each size learned: greedy completion accuracy per query kind and the "
    "held-out loss against parameters (dots: the training seeds; line: their mean).",
)

# %% [markdown]
# Per language, for the models of seed `seed` (the ones the rest of the study uses).

# %%
per_lang = {
    name: by_language(m, tok, corpus, ("facts", "paraphrase", "cross_lingual"))
    for name, m in suite.models.items()
}
lang_table = pd.DataFrame(
    {(name, panel): v for name, d in per_lang.items() for panel, v in d.items()}
).T
lang_table.index.names = ["size", "query set"]
lang_table = lang_table.reset_index()
lang_table["size"] = pd.Categorical(lang_table["size"], order, ordered=True)
lang_table = lang_table.sort_values(["query set", "size"])
report.table(
    lang_table,
    caption=f"Greedy accuracy per language and query set for the models of seed {seed}.",
    percent=[c for c in lang_table.columns if c not in ("size", "query set")],
)

# %% [markdown]
# The other query sets, as exact greedy completion and as mean log-probability of the
# completion (less brittle than exact match for long completions such as worked solutions).

# %%
other = ["word_order", "role_play", "math", "code", "quotes"]
rec = []
for name, model in suite.models.items():
    for qs in other:
        sc = completion_scores(model, tok, corpus.queries[qs])
        rec.append(
            {
                "size": name,
                "query set": qs.replace("_", " "),
                "accuracy": sc["correct"].mean(),
                "mean log-probability": sc["logprob"].mean(),
            }
        )
other_df = pd.DataFrame(rec)
other_wide = other_df.pivot(index="query set", columns="size")
other_wide = other_wide.reindex(columns=order, level=1)
report.table(
    other_wide,
    caption=f"The other query sets for the models of seed {seed}: exact greedy completion "
    "accuracy and the mean log-probability of the completion (nats).",
    percent=[("accuracy", m) for m in order],
    index=True,
    stacked=True,
)

# %% [markdown]
# ## Design log
#
# The world and the recipe were fixed on the capability measures above only (accuracies and
# losses), never on influence results, and never tuned toward the paper's picture. Every
# world or recipe tried, in order, with what it gave (`influence/study/design_log.py`):

# %%
log_table = design_log.table()
report.table(
    log_table,
    caption="Design log: every world and recipe tried, in order, with what it gave and what "
    "was decided (capability measures only, never influence results).",
    stacked=True,
)

# %%
largest, smallest = order[-1], order[0]
passed = sum(c["ok"] for c in checks.values())


def pct(x):
    return f"{x:.0%}"


def trend(col):
    return "→".join(pct(mean.loc[m, col]) for m in order)


def beyond(measure):
    return int(steps.loc[steps["measure"] == measure, "verdict"].isin(["rises", "falls"]).sum())


losses = "→".join(f"{mean.loc[m, 'heldout_loss']:.2f}" for m in order)
here = (
    f"{len(order)} models of {params[0]:,} to {params[-1]:,} parameters, "
    f"{len(train_seeds)} seeds each, on {int(train['tokens'].sum()):,} generated tokens; "
    f"smallest to largest (mean over seeds): held-out loss {losses}, near paraphrases "
    f"{trend('near_paraphrase_accuracy')}, cross-lingual {trend('cross_lingual_accuracy')}; "
    f"{passed} of {len(checks)} acceptance criteria met; size steps beyond query and seed "
    f"noise (of {len(order) - 1}): loss {beyond('heldout_loss')}, near "
    f"{beyond('near_paraphrase_accuracy')}, cross-lingual {beyond('cross_lingual_accuracy')}."
)
found = [
    not_comparable(
        "instrument",
        "The models and their training data",
        "pretrained models of 810M to 52B parameters on web text",
        ours=f"{params[0]:,} to {params[-1]:,} parameters on {len(train):,} generated sequences",
        reason="this notebook builds the instrument; the paper's models and data are not "
        "available, so there is nothing of the paper's to measure here",
    )
]
report.conclude(
    question="What do we train on, and how well do the models of our suite learn it?",
    paper="Pretrained models of 810M to 52B parameters, trained on web text (not available).",
    here=here,
    findings=found,
    reference="§4 and App. A (models), §5 (query sets)",
)
scaling_rows = [
    {k: (round(float(v), 4) if isinstance(v, float | np.floating) else v) for k, v in r.items()}
    for r in scaling.to_dict("records")
]
report.metrics["scaling"] = scaling_rows
report.metrics.update(
    {
        "corpus_sha256": corpus.sha256,
        "languages": sorted(set(train.language) - {"code"}),
        "n_train_sequences": len(train),
        "n_train_tokens": int(train["tokens"].sum()),
        "n_heldout_sequences": len(corpus.heldout),
        "n_facts": len(world.facts),
        "splits": splits,
        "sequences_per_kind": train.kind.value_counts().to_dict(),
        "tokens_per_kind": train.groupby("kind")["tokens"].sum().to_dict(),
        "tokenizer": tstats,
        "name_overlap": overlap.groupby("shared")[["first_token", "jaccard"]]
        .mean()
        .round(4)
        .to_dict(),
        "seq_len": suite.seq_len,
        "models": models[cols].to_dict("records"),
        "acceptance": checks,
        "size_steps": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
            for r in steps.to_dict("records")
        ],
        "accuracy_by_language": per_lang,
        "other_accuracy": {
            m: dict(zip(g["query set"], g.accuracy.round(3), strict=True))
            for m, g in other_df.groupby("size", sort=False)
        },
        "design_log": log_table.to_dict("records"),
    }
)
report.save()

# %%
# NBVAL_CHECK_OUTPUT
# Checked by nbval: what must not change between runs (the corpus and the model sizes).
# Accuracies depend on floating-point details of the CPU, so they are shown in tables instead.
print("corpus sha256:", corpus.sha256[:16])
print("training sequences:", len(train), "| held-out loss set:", len(corpus.heldout))
print("models:", order, "| training seeds:", train_seeds)
print("params:", params)
print(headline(found))

# %% [markdown]
# ## Reading the results


# %%
def direction(values, up="rises", down="falls"):
    pairs = list(zip(values, values[1:], strict=False))
    if all(b > a for a, b in pairs):
        return f"{up} with every size"
    if all(b < a for a, b in pairs):
        return f"{down} with every size"
    overall = up if values[-1] > values[0] else down
    return f"{overall} from the smallest to the largest model, not with every size"


failed = [name for name, c in checks.items() if not c["ok"]]
verdict_line = (
    "all met"
    if not failed
    else "not met: " + "; ".join(failed) + " (what was tried: the design log above)"
)
Markdown(
    f"""
* **Acceptance** (issue 23, mean over the {len(train_seeds)} seeds):
  {len(checks) - len(failed)} of {len(checks)} criteria met; {verdict_line}.
* **Loss**: every size sees the same {int(models.tokens_seen.iloc[0]):,} tokens; the held-out
  loss (mean over seeds) {direction(list(mean.heldout_loss))}
  ({", ".join(f"{m} {mean.loc[m, 'heldout_loss']:.2f}" for m in order)} nats per token). It
  cannot reach zero: names, numbers and role-play texts are drawn at random.
* **Seen facts**: the smallest model completes {pct(mean.loc[smallest, "seen_fact_accuracy"])}
  of the seen facts, the largest {pct(mean.loc[largest, "seen_fact_accuracy"])}.
* **Held-out paraphrases**: a light rewording ({trend("near_paraphrase_accuracy")})
  {direction(list(mean.near_paraphrase_accuracy))}; a different sentence
  ({trend("far_paraphrase_accuracy")}) stays harder at every size.
* **Cross-lingual**: facts stated in one language only are recalled in another with
  localized names in {trend("cross_lingual_localized")} of cases, with shared names (the
  control set) in {trend("cross_lingual_shared")}; which training sequences carry this
  transfer is what the cross-lingual notebook measures (paper §5.3.1).
* **Role-play**: held-out assistant prompts are completed with their answer in
  {trend("role_play_completion")} of cases.
"""
)
