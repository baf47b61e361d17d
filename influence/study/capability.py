"""What a model of the suite learned, from accuracies and losses only (no influence scores).

    items = outcomes(model, tokenizer, corpus)        # per-query outcomes of one model
    row = summarise(items)                            # one row of notebook 00's scaling table
    checks = acceptance(pd.DataFrame(rows))           # issue 23's criteria, on seed means
    steps = size_steps({(size, seed): items}, order)  # is each step beyond the noise?

A fact query is right when greedy decoding reproduces the whole object name
(`suite.completion_scores`). The measures:

    seen_fact_accuracy         facts asked with their first training template, in every
                               language they are stated in (the text the model saw)
    near_paraphrase_accuracy   held-out light rewordings of a training template
    far_paraphrase_accuracy    held-out different sentences
    cross_lingual_accuracy     facts stated in one language only, asked in another (with that
                               language's names); split by name forms (localized / shared)
    role_play_completion       held-out assistant prompts whose answer closes training
                               dialogues: share completed exactly (`role_play_completion`
                               gives it per query group)
    heldout_loss               mean token loss on the held-out loss set (`corpus.heldout`)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from . import stats
from .suite import completion_scores, heldout_token_losses
from .tokenizer import encode_text
from .world import LOCALIZED, SHARED

# the measures that must rise (or, for the loss, fall) from each size to the next
RISING = ("near_paraphrase_accuracy", "cross_lingual_accuracy")
FALLING = ("heldout_loss",)
MIN_SEEN_SMALLEST = 0.30


def _mean(ok: np.ndarray) -> float:
    return float(ok.mean()) if len(ok) else float("nan")


def role_play_completion(model, tokenizer, queries) -> dict[str, tuple[int, int]]:
    """Per role-play query group ("seen_completion": the answer closes training dialogues;
    "new_completion": a held-out answer): (queries completed exactly by greedy decoding,
    queries). `queries`: role-play query rows (`corpus.queries["role_play"]` or
    `StudyScores.queries("role_play")`)."""
    ok = completion_scores(model, tokenizer, queries)["correct"]
    group = np.asarray(queries["group"])
    return {g: (int(ok[group == g].sum()), int((group == g).sum())) for g in sorted(set(group))}


def outcomes(model, tokenizer, corpus) -> dict[str, np.ndarray]:
    """The per-query outcomes behind the capability measures (module doc; `summarise` turns
    them into the measures): for each accuracy measure, 1.0 or 0.0 per query (query-set order,
    so the same query has the same position for every model); for `heldout_loss`, [summed
    token loss, predicted tokens] per held-out sequence ([n, 2])."""
    q = corpus.queries
    ok = {
        qs: completion_scores(model, tokenizer, q[qs])["correct"].astype(float)
        for qs in ("facts", "paraphrase", "cross_lingual", "role_play")
    }
    para = np.asarray(q["paraphrase"]["group"])
    names = np.asarray(q["cross_lingual"]["names"])
    role = np.asarray(q["role_play"]["group"])
    held = [encode_text(tokenizer, t) for t in corpus.heldout["text"]]
    return {
        "heldout_loss": heldout_token_losses(model, held, tokenizer.pad_token_id),
        "seen_fact_accuracy": ok["facts"],
        "near_paraphrase_accuracy": ok["paraphrase"][para == "near"],
        "far_paraphrase_accuracy": ok["paraphrase"][para == "far"],
        "cross_lingual_accuracy": ok["cross_lingual"],
        "cross_lingual_localized": ok["cross_lingual"][names == LOCALIZED],
        "cross_lingual_shared": ok["cross_lingual"][names == SHARED],
        "role_play_completion": ok["role_play"][role == "seen_completion"],
    }


def summarise(items: dict[str, np.ndarray]) -> dict[str, float]:
    """The capability measures from their `outcomes`: shares for the accuracies (NaN for an
    empty set), tokens-weighted mean loss for `heldout_loss`."""
    out = {}
    for name, v in items.items():
        if name == "heldout_loss":
            out[name] = float(v[:, 0].sum() / v[:, 1].sum())
        else:
            out[name] = _mean(v)
    return out


def by_language(model, tokenizer, corpus, sets: Sequence[str]) -> dict[str, dict[str, float]]:
    """{query set (paraphrase split into near / far): {language: accuracy}}."""
    out = {}
    for qs in sets:
        q = corpus.queries[qs]
        ok = completion_scores(model, tokenizer, q)["correct"]
        df = pd.DataFrame({"ok": ok, "language": q["language"], "group": q["group"]})
        for group, sub in df.groupby("group", sort=True):
            name = f"{qs}/{group}" if group else qs
            out[name] = sub.groupby("language")["ok"].mean().round(3).to_dict()
    return out


def acceptance(table: pd.DataFrame) -> dict[str, dict]:
    """Issue 23's criteria on the mean over training seeds of each size (rows: size, seed,
    params and the measures; sizes in suite order): every RISING measure rises and every
    FALLING one falls from each size to the next; the smallest size completes at least 30% of
    seen facts; the largest has the lowest held-out loss. {criterion: {"ok", "values"}}."""
    order = list(dict.fromkeys(table["size"]))
    mean = table.groupby("size", sort=False).mean(numeric_only=True).loc[order]
    out = {}
    for col, sign in [(c, 1) for c in RISING] + [(c, -1) for c in FALLING]:
        v = mean[col].to_numpy()
        word = "rises" if sign > 0 else "falls"
        out[f"{col} {word} with every size"] = {
            "ok": bool(np.all(sign * np.diff(v) > 0)),
            "values": dict(zip(order, np.round(v, 4).tolist(), strict=True)),
        }
    seen = float(mean["seen_fact_accuracy"].iloc[0])
    out[f"smallest model completes >= {MIN_SEEN_SMALLEST:.0%} of seen facts"] = {
        "ok": seen >= MIN_SEEN_SMALLEST,
        "values": {order[0]: round(seen, 4)},
    }
    loss = mean["heldout_loss"]
    out["largest model has the lowest held-out loss"] = {
        "ok": bool(loss.idxmin() == order[-1]),
        "values": {order[-1]: round(float(loss.iloc[-1]), 4), "lowest": str(loss.idxmin())},
    }
    return out


def _per_query(items: list[np.ndarray], loss: bool) -> tuple[np.ndarray, ...]:
    """The outcomes of one size averaged over its seeds, query by query: (share,) for an
    accuracy, (summed loss, tokens) for the loss."""
    mean = np.mean(np.stack(items), axis=0)
    return (mean[:, 0], mean[:, 1]) if loss else (mean,)


def size_steps(
    items: dict[tuple[str, int], dict[str, np.ndarray]],
    order: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Whether each step of the acceptance (every RISING measure rises, every FALLING one
    falls, from one size to the next) is beyond the noise of the measurement.

    `items`: {(size, training seed): `outcomes(...)`}; `order`: the sizes, small to large.
    One row per measure and step: `change` (larger size minus smaller, means over seeds);
    `low`, `high`, the 95% percentile bootstrap interval of the change over queries (held-out
    sequences for the loss), each query's outcome averaged over the seeds of each size first;
    `p`, a Wilcoxon signed-rank test of the per-query differences (per-token for the loss);
    `seed_pairs` of `pairings`, the (smaller-size seed, larger-size seed) pairings whose
    values move the required way. The interval measures query noise, the pairings training
    noise (two seeds give four pairings; a step that holds in only some of them could flip
    with the next seed, or on another host). `verdict`: "rises" / "falls" as required when
    the interval excludes zero on the required side and every pairing moves that way,
    "reverses" when both point the other way, otherwise "within noise"."""
    unknown = sorted({s for s, _ in items} - set(order))
    if unknown:
        raise ValueError(f"sizes {unknown} are not in the order {list(order)}")
    missing = [size for size in order if not any(s == size for s, _ in items)]
    if missing:
        raise ValueError(f"no scored model of sizes {missing}")
    rows = []
    for measure, sign in [(c, 1) for c in RISING] + [(c, -1) for c in FALLING]:
        loss = measure == "heldout_loss"
        lengths = {key: len(v[measure]) for key, v in sorted(items.items())}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"models were scored on different queries for {measure}: {lengths}")
        by_size = {
            size: [v[measure] for (s, _), v in sorted(items.items()) if s == size] for size in order
        }
        for small, large in zip(order, order[1:], strict=False):
            a, b = _per_query(by_size[small], loss), _per_query(by_size[large], loss)
            if loss:
                diff, tokens = b[0] - a[0], a[1]
                ci = stats.bootstrap(
                    (diff, tokens),
                    lambda d, t, axis: d.sum(axis) / t.sum(axis),
                    n_boot=n_boot,
                    seed=seed,
                )
                test = stats.wilcoxon(diff / tokens, over="held-out sequences")
            else:
                diff = b[0] - a[0]
                ci = stats.bootstrap(diff, n_boot=n_boot, seed=seed)
                test = stats.wilcoxon(diff, over="queries")
            values = {
                size: [summarise({measure: v})[measure] for v in by_size[size]]
                for size in (small, large)
            }
            pairs = [sign * (vb - va) > 0 for va in values[small] for vb in values[large]]
            if sign * ci.low > 0 and all(pairs):
                verdict = "rises" if sign > 0 else "falls"
            elif sign * ci.high < 0 and not any(pairs):
                verdict = "reverses"
            else:
                verdict = "within noise"
            rows.append(
                {
                    "measure": measure,
                    "step": f"{small} → {large}",
                    "change": ci.estimate,
                    "low": ci.low,
                    "high": ci.high,
                    "p": test.p,
                    "seed_pairs": int(sum(pairs)),
                    "pairings": len(pairs),
                    "verdict": verdict,
                }
            )
    return pd.DataFrame(rows)


def steps_beyond_noise(steps: pd.DataFrame, measure: str) -> str:
    """ "3 of 4 steps beyond noise; within noise: l → xl" for one measure of `size_steps`."""
    sub = steps[steps["measure"] == measure]
    good = sub["verdict"].isin(["rises", "falls"])
    text = f"{int(good.sum())} of {len(sub)} steps beyond noise"
    for verdict in ("within noise", "reverses"):
        which = sub.loc[sub["verdict"] == verdict, "step"].tolist()
        if which:
            text += f"; {verdict}: {', '.join(which)}"
    return text
