"""What a model of the suite learned, from accuracies and losses only (no influence scores).

    row = capability(model, tokenizer, corpus)        # one row of notebook 00's scaling table
    checks = acceptance(pd.DataFrame(rows))           # issue 23's criteria, on seed means

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

from .suite import completion_scores, heldout_loss
from .tokenizer import encode_text
from .world import LOCALIZED, SHARED

# the measures that must rise (or, for the loss, fall) from each size to the next
RISING = ("near_paraphrase_accuracy", "cross_lingual_accuracy")
FALLING = ("heldout_loss",)
MIN_SEEN_SMALLEST = 0.30


def _mean(ok: np.ndarray, mask: np.ndarray | None = None) -> float:
    ok = ok if mask is None else ok[mask]
    return float(ok.mean()) if len(ok) else float("nan")


def role_play_completion(model, tokenizer, queries) -> dict[str, tuple[int, int]]:
    """Per role-play query group ("seen_completion": the answer closes training dialogues;
    "new_completion": a held-out answer): (queries completed exactly by greedy decoding,
    queries). `queries`: role-play query rows (`corpus.queries["role_play"]` or
    `StudyScores.queries("role_play")`)."""
    ok = completion_scores(model, tokenizer, queries)["correct"]
    group = np.asarray(queries["group"])
    return {g: (int(ok[group == g].sum()), int((group == g).sum())) for g in sorted(set(group))}


def capability(model, tokenizer, corpus) -> dict[str, float]:
    """The capability measures (module doc) of one model on `corpus`."""
    q = corpus.queries
    ok = {
        qs: completion_scores(model, tokenizer, q[qs])["correct"]
        for qs in ("facts", "paraphrase", "cross_lingual")
    }
    para = np.asarray(q["paraphrase"]["group"])
    names = np.asarray(q["cross_lingual"]["names"])
    done, n = role_play_completion(model, tokenizer, q["role_play"]).get("seen_completion", (0, 0))
    held = [encode_text(tokenizer, t) for t in corpus.heldout["text"]]
    return {
        "heldout_loss": heldout_loss(model, held, tokenizer.pad_token_id),
        "seen_fact_accuracy": _mean(ok["facts"]),
        "near_paraphrase_accuracy": _mean(ok["paraphrase"], para == "near"),
        "far_paraphrase_accuracy": _mean(ok["paraphrase"], para == "far"),
        "cross_lingual_accuracy": _mean(ok["cross_lingual"]),
        "cross_lingual_localized": _mean(ok["cross_lingual"], names == LOCALIZED),
        "cross_lingual_shared": _mean(ok["cross_lingual"], names == SHARED),
        "role_play_completion": done / n if n else float("nan"),
    }


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
