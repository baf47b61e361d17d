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
# Every training sequence carries its ground truth (which fact, relation, template, language,
# word-order group, role-play category …), so the later notebooks *measure* what the paper
# judged by eye: for example whether the most influential sequences of a query state the same
# fact in other words or another language, or only share its tokens.
#
# This notebook shows the corpus, the tokenizer and the models, and measures what the models
# learned: fact completion by size × language, on seen templates, on held-out paraphrases and
# on facts asked in a language they were never stated in.

# %% tags=["parameters"]
preset = "smoke"
device = "cpu"
seed = 0
n_examples = None

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown

from influence.study.corpus import build_corpus
from influence.study.parameters import notebook_config
from influence.study.reporting import Report
from influence.study.suite import accuracy_table, completion_scores, load_suite
from influence.study.tokenizer import encode_text, stats

cfg = notebook_config("00_corpus_and_models", globals())
report = Report("00_corpus_and_models", preset=preset, device=device, seed=seed, params=cfg)
pd.set_option("display.width", 120)

# %% [markdown]
# ## The corpus
#
# The world's entities (countries, cities, people, invented elements) have generated names,
# so no prior knowledge can leak in, and the same name is used in every language, as proper
# nouns are. Each fact (capital, leader, birthplace, discoverer) is written with three
# training templates per language (template *k* in French and German is the translation of
# template *k* in English) and one held-out template that never appears in training and makes
# the paraphrase queries. About 40% of the facts are stated in one language only: asking them
# in another language measures cross-lingual transfer (paper §5.3.1, Figs. 15–16).

# %%
with report.stage("corpus"):
    corpus = build_corpus(preset, seed)
train = corpus.train.to_pandas()
print("corpus sha256:", corpus.sha256)
print("training sequences:", len(train), "| facts:", len(corpus.world.facts))
print(pd.crosstab(train["kind"], train["language"], margins=True))

# %% [markdown]
# Labelled material beyond facts: the paper's six **word-order** groups for a subset of facts
# (§5.3.4), **role-play** passages in five categories for three topics (§5.3.5), short
# **math** word problems with worked answers and small **code** functions (§5.3.1), and
# invented **sayings** repeated in several contexts (the memorised-sequence contrast of §5.2).

# %%
wo = train[train.kind == "word_order"]
rp = train[train.kind == "role_play"]
print(pd.crosstab(wo["group"], wo["order"]))
print(pd.crosstab(rp["category"], rp["topic"].replace("", "(none)")))

# %%
n_ex = cfg["n_examples"]
for kind, rows in train.groupby("kind", sort=False):
    for lang, sub in rows.groupby("language", sort=False):
        for text in sub["text"].head(n_ex):
            print(f"[{kind}/{lang}] {text!r}")

# %% [markdown]
# Query sets, one per research question. Each query is a (prompt, completion) pair whose
# measurement is log p(completion | prompt); `related_ids` lists the training sequences that
# express the same fact, topic, operation, function or saying.

# %%
print(pd.DataFrame({k: {"queries": len(v)} for k, v in corpus.queries.items()}).T)
for name, q in corpus.queries.items():
    r = q[0]
    print(f"[{name}] {r['prompt']!r} -> {r['completion']!r} ({len(r['related_ids'])} related)")

# %% [markdown]
# ## Tokenizer
#
# A byte-level BPE trained on the training split only (`tokenizers`), wrapped as a
# `transformers` `PreTrainedTokenizerFast` and saved with every model. Each training sequence
# is `<bos> text <eos>`, one per row, never packed; a batch is right-padded (padding has
# attention mask 0 and label −100, so it changes nothing at real positions). Generated names
# split into several sub-word tokens, so a completion is usually more than one token.

# %%
with report.stage("train_suite"):
    suite = load_suite(preset, seed, device=device, progress=True)
tok = suite.tokenizer
tstats = stats(tok, list(corpus.train["text"]))
train["tokens"] = [len(encode_text(tok, t)) for t in corpus.train["text"]]
print({k: round(v, 2) if isinstance(v, float) else v for k, v in tstats.items()})
print("fixed row length for influence scoring (seq_len):", suite.seq_len)
print(train.groupby("kind")["tokens"].agg(["count", "sum", "mean", "max"]).round(1))
print(tok.tokenize(corpus.train[0]["text"]))

# %% [markdown]
# ## The model suite
#
# Every size is trained with the same recipe: same initialisation seed, the same sequences in
# the same order, the same number of epochs and tokens, AdamW with linear warm-up then cosine
# decay (the Pythia recipe in miniature). Only the width and depth change.

# %%
models = pd.DataFrame(suite.info).set_index("name")
print(models[["params", "layers", "hidden", "tokens_seen", "steps", "train_seconds"]])
print("parameter span (largest / smallest):", round(models.params.max() / models.params.min(), 1))

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, log in suite.logs.items():
    ax.plot(log["epoch"], log["loss"], label=f"{name} ({models.loc[name, 'params']:,} params)")
ax.set_xlabel("epoch")
ax.set_ylabel("training loss (nats / token)")
ax.set_yscale("log")
ax.legend()
ax.set_title("Training loss")
report.savefig(fig, "loss_curves")
plt.show()

# %% [markdown]
# ## What the models learned
#
# Fact completion: the prompt is a template up to the object's name, and the model is right
# when greedy decoding reproduces the whole name. *Seen*: the first training template of a
# fact, in each language the fact is stated in. *Held-out paraphrase*: templates that never
# occur in training, a *near* one (a light rewording, e.g. "The current leader of X is") and a
# *far* one (a different sentence, e.g. "Asked who rules X, everyone answers:").
# *Cross-lingual*: a fact stated in one language only, asked in another with that language's
# training template; answering needs knowledge that is not tied to the words it was learned
# from (the paper's cross-lingual question, §5.3.1).

# %%
with report.stage("evaluate"):
    acc = accuracy_table(suite)
order = list(suite.models)
acc["panel"] = acc["set"].where(acc["group"] == "", acc["set"] + "/" + acc["group"])
table = acc.pivot_table(index=["panel", "language"], columns="model", values="accuracy")[order]
print(table.round(2))

# %% [markdown]
# The word-order material (below) deliberately contains sentences that continue a fact's
# prompt with something else ("The element X was discovered by accident."): for those facts
# the seen prompt has competing continuations in training, so their completion accuracy is
# lower by design. Seen-fact accuracy without and with word-order material:

# %%
facts_q = corpus.queries["facts"]
has_wo = np.isin(facts_q["fact_id"], corpus.queries["word_order"]["fact_id"])
english = np.asarray(facts_q["language"]) == "en"
split = {}
for name, model in suite.models.items():
    ok = completion_scores(model, tok, facts_q)["correct"]
    split[name] = {
        "en, no word-order material": ok[english & ~has_wo].mean(),
        "en, with word-order material": ok[english & has_wo].mean(),
    }
print(pd.DataFrame(split).round(2))

# %%
panels = {
    "facts": "seen template",
    "paraphrase/near": "held-out, near rewording",
    "paraphrase/far": "held-out, far rewording",
    "cross_lingual": "never stated in this language",
}
fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), sharey=True)
for ax, (panel, title) in zip(axes, panels.items(), strict=True):
    for lang, sub in acc[acc.panel == panel].groupby("language"):
        sub = sub.set_index("model").loc[order]
        ax.plot(sub["params"], sub["accuracy"], "o-", label=lang)
    ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel("parameters")
    ax.set_ylim(-0.03, 1.03)
axes[0].set_ylabel("fact completion accuracy (greedy)")
axes[0].legend(title="prompt language")
fig.suptitle("Fact completion by model size")
fig.tight_layout()
report.savefig(fig, "headline")
plt.show()

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
                "model": name,
                "set": qs,
                "accuracy": sc["correct"].mean(),
                "logprob": sc["logprob"].mean(),
            }
        )
other_df = pd.DataFrame(rec)
print(other_df.pivot(index="set", columns="model", values="accuracy")[order].round(2))
print(other_df.pivot(index="set", columns="model", values="logprob")[order].round(1))


# %%
def by_lang(panels):
    sub = acc[acc.panel.isin(panels)].assign(hits=lambda d: d.accuracy * d.n)
    g = sub.groupby(["model", "language"])[["hits", "n"]].sum()
    frac = (g.hits / g.n).round(3)
    return {m: frac.loc[m].to_dict() for m in order}


fact_accuracy = by_lang(["facts"])
heldout_accuracy = by_lang(["paraphrase/near", "paraphrase/far"])
heldout_near_accuracy = by_lang(["paraphrase/near"])
heldout_far_accuracy = by_lang(["paraphrase/far"])
cross_lingual_accuracy = by_lang(["cross_lingual"])
largest = order[-1]
print("seen English facts, largest model:", round(fact_accuracy[largest]["en"], 2))

# %%
# NBVAL_CHECK_OUTPUT
# Checked by nbval: what must not change between runs (the corpus and the model sizes).
# Accuracies depend on floating-point details of the CPU, so they are printed above instead.
print("corpus sha256:", corpus.sha256[:16])
print("training sequences:", len(train))
print("models:", order)
print("params:", [int(p) for p in models.params])

# %%
report.metrics.update(
    {
        "corpus_sha256": corpus.sha256,
        "languages": sorted(set(train.language) - {"code"}),
        "n_train_sequences": len(train),
        "n_facts": len(corpus.world.facts),
        "sequences_per_kind": train.kind.value_counts().to_dict(),
        "tokens_per_kind": train.groupby("kind")["tokens"].sum().to_dict(),
        "tokenizer": tstats,
        "seq_len": suite.seq_len,
        "models": [
            {
                k: m[k]
                for k in ("name", "params", "layers", "hidden", "tokens_seen", "train_seconds")
            }
            for m in suite.info
        ],
        "fact_accuracy": fact_accuracy,
        "heldout_accuracy": heldout_accuracy,
        "heldout_near_accuracy": heldout_near_accuracy,
        "heldout_far_accuracy": heldout_far_accuracy,
        "fact_accuracy_word_order_split": {
            m: {k: round(float(v), 3) for k, v in d.items()} for m, d in split.items()
        },
        "cross_lingual_accuracy": cross_lingual_accuracy,
        "other_accuracy": {
            m: dict(zip(g.set, g.accuracy.round(3), strict=True))
            for m, g in other_df.groupby("model", sort=False)
        },
    }
)


def pct(x):
    return f"{x:.0%}"


def trend(acc_by_model, lang="en"):
    return " → ".join(pct(acc_by_model[m][lang]) for m in order)


params = [int(p) for p in models.params]
cross_best = {m: max(cross_lingual_accuracy[m].values()) for m in order}
cross_worst = {m: min(cross_lingual_accuracy[m].values()) for m in order}
far_max = max(v for m in order for v in heldout_far_accuracy[m].values())
here = (
    f"{len(order)} Llama models, {params[0]:,} to {params[-1]:,} parameters "
    f"({params[-1] / params[0]:.0f}×), trained identically on {len(train):,} generated "
    f"sequences in English, French and German. Seen English facts: "
    f"{trend(fact_accuracy)} with size; held-out near paraphrases (English) "
    f"{trend(heldout_near_accuracy)}; facts asked in a language they were never stated in: "
    f"{pct(cross_worst[order[0]])}–{pct(cross_best[order[0]])} for the smallest model, "
    f"{pct(cross_worst[largest])}–{pct(cross_best[largest])} for the largest; far paraphrases "
    f"stay at or below {pct(far_max)}."
)
report.summarize(
    question="What do we train on, and how well do the models of our suite learn it?",
    paper="Pretrained models of 810M to 52B parameters, trained on web text (not available).",
    here=here,
    verdict="not comparable",
    reason="this notebook builds the instrument: the paper had no counterpart to measure",
    reference="§4 and App. A (models), §5 (query sets)",
)
report.paper_vs_here = (
    "paper: pretrained 810M-52B models on web text; here: "
    f"{len(order)} Llama models of {params[0]:,}-{params[-1]:,} "
    f"parameters trained from scratch on {len(train):,} generated sequences in 3 languages; "
    f"largest model completes {fact_accuracy[largest]['en']:.0%} of seen English facts."
)
report.save()
Markdown(f"**In one line.** {here}")

# %% [markdown]
# ## Reading the results

# %%
final_loss = [suite.logs[m]["loss"][-1] for m in order]
near_en = [heldout_near_accuracy[m]["en"] for m in order]


def direction(values, up="rises", down="falls"):
    pairs = list(zip(values, values[1:], strict=False))
    if all(b >= a for a, b in pairs):
        return f"{up} with every size"
    if all(b <= a for a, b in pairs):
        return f"{down} with every size"
    overall = up if values[-1] > values[0] else down
    return f"{overall} from the smallest to the largest model, not monotonically"


Markdown(
    f"""
* **Loss**: the same tokens for every size; the final training loss
  ({", ".join(f"{m} {v:.2f}" for m, v in zip(order, final_loss, strict=True))} nats per token)
  {direction(final_loss)}. It cannot reach zero: names, numbers and role-play continuations
  are drawn at random and cannot be predicted. The curve is jagged because batches are grouped
  by length, so consecutive log points average different kinds of text.
* **Seen facts**: the smallest model completes {pct(fact_accuracy[order[0]]["en"])} of the
  seen English facts, the largest {pct(fact_accuracy[largest]["en"])}. The later notebooks ask
  how the models learned these facts, which means little if the largest model does not know
  most of them. Facts that carry word-order material are harder by design (see the split
  table).
* **Held-out paraphrases**: completion of a light rewording
  (English {trend(heldout_near_accuracy)}) {direction(near_en)}; a different sentence
  ("far") is completed at most {pct(far_max)} of the time in any language and size: at
  this scale, knowledge is tied to its wording more than in the paper's large models.
* **Cross-lingual**: facts stated in one language only are recalled in the other two in
  {pct(cross_worst[largest])}–{pct(cross_best[largest])} of cases by the largest model and
  {pct(cross_worst[order[0]])}–{pct(cross_best[order[0]])} by the smallest. Names are shared
  across languages, so the subject's name is a strong cue; which training sequences carry
  this transfer is what the cross-lingual notebook measures (paper §5.3.1: the influence of
  translations rises with model size).
"""
)
