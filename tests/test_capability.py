"""Notebook 00's acceptance rules (issue 23) and the noise check of each size step, on
synthetic per-query outcomes whose answers are known."""

import numpy as np
import pandas as pd
import pytest

from influence.study import capability as C

SIZES = ["a", "b", "c"]


def _items(acc: dict[tuple[str, int], float], n: int = 400, loss=None, seed=0):
    """Outcomes with a given share of right answers per (size, seed) model: each model gets
    its own random queries right, so models differ query by query."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, share in acc.items():
        ok = np.zeros(n)
        ok[rng.permutation(n)[: round(share * n)]] = 1.0
        tokens = np.full(50, 10.0)
        per_token = (loss or {}).get(key, 1.0)
        out[key] = {
            "near_paraphrase_accuracy": ok,
            "cross_lingual_accuracy": ok,
            "heldout_loss": np.stack([per_token * tokens + rng.normal(0, 0.01, 50), tokens], 1),
        }
    return out


def _steps(acc, loss=None):
    return C.size_steps(_items(acc, loss=loss), SIZES, n_boot=300).set_index(["measure", "step"])


def test_clear_steps_rise_and_fall_beyond_noise():
    acc = {("a", 0): 0.1, ("a", 1): 0.12, ("b", 0): 0.5, ("b", 1): 0.52}
    acc |= {("c", 0): 0.9, ("c", 1): 0.88}
    loss = {("a", 0): 2.0, ("a", 1): 2.1, ("b", 0): 1.0, ("b", 1): 1.1}
    loss |= {("c", 0): 0.5, ("c", 1): 0.55}
    steps = _steps(acc, loss)
    near = steps.loc["near_paraphrase_accuracy"]
    assert list(near.index) == ["a → b", "b → c"]
    assert near.loc["a → b", "change"] == pytest.approx(0.51 - 0.11)
    assert (near["verdict"] == "rises").all() and (near["seed_pairs"] == 4).all()
    assert (near["low"] > 0).all() and (near["p"] < 1e-6).all()
    held = steps.loc["heldout_loss"]
    assert held.loc["a → b", "change"] == pytest.approx(1.05 - 2.05, abs=1e-3)
    assert (held["verdict"] == "falls").all() and (held["high"] < 0).all()
    assert C.steps_beyond_noise(steps.reset_index(), "heldout_loss") == "2 of 2 steps beyond noise"


def test_a_step_inside_the_seed_spread_is_within_noise():
    # b's mean is above a's, but one seed of a beats one seed of b: 3 of 4 pairings
    acc = {("a", 0): 0.5, ("a", 1): 0.62, ("b", 0): 0.6, ("b", 1): 0.66}
    acc |= {("c", 0): 0.2, ("c", 1): 0.22}
    steps = _steps(acc)
    row = steps.loc[("near_paraphrase_accuracy", "a → b")]
    assert row["change"] > 0 and row["seed_pairs"] == 3 and row["verdict"] == "within noise"
    assert steps.loc[("near_paraphrase_accuracy", "b → c"), "verdict"] == "reverses"
    text = C.steps_beyond_noise(steps.reset_index(), "near_paraphrase_accuracy")
    assert text == "0 of 2 steps beyond noise; within noise: a → b; reverses: b → c"


def test_a_step_too_small_for_the_queries_is_within_noise():
    # every pairing rises, but by 1 query in 400: the interval over queries spans zero
    acc = {("a", 0): 0.5, ("a", 1): 0.5, ("b", 0): 0.5025, ("b", 1): 0.5025}
    acc |= {("c", 0): 0.9, ("c", 1): 0.9}
    row = _steps(acc).loc[("near_paraphrase_accuracy", "a → b")]
    assert row["seed_pairs"] == 4 and row["low"] < 0 < row["high"]
    assert row["verdict"] == "within noise"


def test_size_steps_refuses_unknown_sizes_and_mismatched_queries():
    items = _items({("a", 0): 0.1, ("b", 0): 0.5, ("z", 0): 0.9})
    with pytest.raises(ValueError, match="'z'"):
        C.size_steps(items, ["a", "b"])
    with pytest.raises(ValueError, match=r"no scored model of sizes \['c'\]"):
        C.size_steps(_items({("a", 0): 0.1, ("b", 0): 0.5}), SIZES)
    items = _items({("a", 0): 0.1, ("b", 0): 0.5})
    items[("b", 0)]["near_paraphrase_accuracy"] = np.ones(7)
    with pytest.raises(ValueError, match="different queries for near_paraphrase_accuracy"):
        C.size_steps(items, ["a", "b"])


def _table(near, cross, loss, seen):
    rows = []
    for i, size in enumerate(SIZES):
        for seed in (0, 1):
            rows.append(
                {
                    "size": size,
                    "seed": seed,
                    "params": 10**i,
                    "near_paraphrase_accuracy": near[i],
                    "cross_lingual_accuracy": cross[i],
                    "heldout_loss": loss[i],
                    "seen_fact_accuracy": seen[i],
                }
            )
    return pd.DataFrame(rows)


def test_acceptance_checks_each_criterion_on_seed_means():
    ok = C.acceptance(_table([0.1, 0.4, 0.6], [0.0, 0.1, 0.2], [2.0, 1.0, 0.9], [0.3, 0.9, 1]))
    assert all(c["ok"] for c in ok.values())
    assert ok["near_paraphrase_accuracy rises with every size"]["values"] == {
        "a": 0.1,
        "b": 0.4,
        "c": 0.6,
    }
    bad = C.acceptance(_table([0.1, 0.6, 0.6], [0.0, 0.1, 0.2], [2.0, 0.8, 0.9], [0.29, 0.9, 1]))
    assert not bad["near_paraphrase_accuracy rises with every size"]["ok"]  # a tie is no rise
    assert bad["cross_lingual_accuracy rises with every size"]["ok"]
    assert not bad["heldout_loss falls with every size"]["ok"]
    assert not bad["smallest model completes >= 30% of seen facts"]["ok"]
    lowest = bad["largest model has the lowest held-out loss"]
    assert not lowest["ok"] and lowest["values"]["lowest"] == "b"
