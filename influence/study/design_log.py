"""Notebook 00's design log: every world and recipe tried while building the instrument
(issue 23), in order, with what it gave. The design was fixed on capability measures only
(accuracies and losses of `influence.study.capability`, on the corpus of seed 0, one training
seed unless said), never on influence results. Sizes are listed small to large; "seen",
"near", "far", "cross" are the seen-fact, near-paraphrase, far-paraphrase and cross-lingual
accuracies (greedy exact completion), "loss" the held-out loss in nats per token.
"""

from __future__ import annotations

import pandas as pd

ATTEMPTS: list[dict[str, str]] = [
    {
        "attempt": "1",
        "change": (
            "first design: 600 facts (120 countries, 220 people, 140 elements; 10% shared "
            "names; 30% stated in one language), names of 1-2 syllables per word, 9 templates; "
            "5 sizes 36k-3.9M parameters (vocabulary 1024, untied embeddings), 3 epochs, "
            "peak learning rate 2e-3 for every size"
        ),
        "result": (
            "loss 3.34 / 2.10 / 1.25 / 0.71 / 0.60; seen 0% / 0.2% / 6.8% / 72% / 85%; "
            "near 0% / 0.1% / 2.5% / 28% / 55%; far 0-14%; cross 0% / 0% / 0% / 2.2% / 5.8% "
            "(localized names 0-1.2%, shared 0-47%); role-play completions 0% / 0% / 0% / 70% "
            "/ 96%"
        ),
        "decision": (
            "loss falls and the top sizes generalise more, but the three smallest learn "
            "almost no facts (the smallest must complete 30%): make facts learnable for "
            "small models"
        ),
    },
    {
        "attempt": "2",
        "change": (
            "smallest size alone, same world: peak learning rate 1e-2; then 32 wide with "
            "tied embeddings (46k), then 24 wide with 2 layers, tied (39k)"
        ),
        "result": "loss 2.78 / 2.36 / 2.49 (from 3.34); seen 0.1% for each",
        "decision": "a higher learning rate lowers the loss but teaches no facts",
    },
    {
        "attempt": "3",
        "change": (
            "names of one syllable per word (completions were 3-10 tokens); smallest size "
            "(learning rate 1e-2) on worlds of 60 and 150 facts, and 32 wide tied / 2 layers "
            "on 150 facts"
        ),
        "result": "seen 0% (60 facts), 1.9% (150 facts), 1.4% (32 wide), 0.8% (2 layers)",
        "decision": "a smaller world alone does not make the smallest size learn facts",
    },
    {
        "attempt": "4",
        "change": (
            "smallest size 32 wide, 2 layers, tied embeddings (60k), learning rate 1e-2, "
            "150 facts, trained 3, 12 and 24 epochs"
        ),
        "result": (
            "seen 1.9% / 9.4% / 15%; at 24 epochs 11% of facts with localized names and 45% "
            "with shared names"
        ),
        "decision": "more exposures help slowly; localized names cost the small model most",
    },
    {
        "attempt": "5",
        "change": (
            "same size, 150 facts, 6 epochs: names localized by suffix only (stem shared "
            "across languages) against the per-language spelling rule; learning rate 3e-2; "
            "batch 8; people named by one word; every name shared"
        ),
        "result": (
            "seen 8.1% (suffix only) vs 4.7% (spelling rule); 8.1% at learning rate 3e-2; "
            "6.1% with batch 8; 3.9% / 5.8% with one-word people; 4.4% with shared names"
        ),
        "decision": (
            "no recipe or name change lifts the 60k model above about 10% of 150 facts in "
            "a few epochs; kept the spelling rule (the cross-lingual test needs it), "
            "learning rates that grow as the width shrinks, one-word names"
        ),
    },
    {
        "attempt": "6",
        "change": "same size on a world of 40 facts, 12 epochs, learning rate 3e-2",
        "result": "seen 22% (spelling rule) / 33% (suffix only)",
        "decision": (
            "the smallest size holds about 10-25 facts whatever the world: 30% of the seen "
            "facts needs a world of at most about 40 facts or about 12 epochs, while the "
            "budget (the largest size's training and influence passes) allows about 4 epochs "
            "and a largest size of about 4.5M parameters, so the smallest of a 100x span "
            "has about 45k"
        ),
    },
    {
        "attempt": "7",
        "change": (
            "the default suite of attempt 6's recipe, both seeds: 400 facts, 16,039 training "
            "sequences (482k tokens), 5 sizes 43k-4.5M parameters (tied embeddings), "
            "4 epochs, peak learning rate 0.72 / width"
        ),
        "result": (
            "seen 0.7% / 3.1% / 10% / 6.7% / 9.1%; near 0.2% / 1.5% / 5.0% / 3.6% / 3.5%; "
            "cross 0.4% / 1.0% / 1.0% / 0.8% / 1.0%; loss 2.21 / 1.40 / 1.01 / 0.96 / 0.89; "
            "the object names get log-probability about -3.3 nats at l and xl (a guess among "
            "the names of the right type): the models learn the formats, not the facts"
        ),
        "decision": "the held-out loss still falls at the end of training: train longer",
    },
    {
        "attempt": "8",
        "change": (
            "the world of attempt 7; xs, s and m alone (seed 0): 4 or 8 epochs, tied or "
            "untied embeddings, peak learning rate 0.72 / width or 2e-3 for every size "
            "(xs also 1e-2)"
        ),
        "result": (
            "m seen 15% (4 epochs) -> 95% (8 epochs), near 7.5% -> 48%, loss 0.93 -> 0.77; "
            "untied with 2e-3: 33% (4 epochs), 99.8% (8), near 15% / 56%; s at 8 epochs 12% "
            "(tied) / 19% (untied, 2e-3); xs at 8 epochs 1.0-2.5% in every variant"
        ),
        "decision": (
            "8 epochs, tied embeddings and the 0.72 / width rule kept (untying helps a "
            "little but takes the span to 71x): the middle size now learns its facts; the "
            "smallest still learns almost none (attempt 6's limit), so its 30% criterion "
            "stays unmet; training costs twice as much"
        ),
    },
    {
        "attempt": "9",
        "change": (
            "the default suite of attempt 8, probed one model at a time after its reports "
            "(`python -m influence.study.design_probe`): xl at peak learning rates 7.2e-3, "
            "4.5e-3, 1.8e-3 and 1.1e-3 (the suite's 0.72 / width gives 2.8e-3), seed 0; "
            "then every size at 0.46 / width (xl's 1.8e-3), seed 0, and xl at 1.8e-3, seed 1"
        ),
        "result": (
            "xl loss 1.69 / 0.82 / 0.66 / 0.69 (suite 0.70), seen 2% / 10% / 100% / 100%, "
            "near 0.7% / 5.2% / 66% / 65% (suite 60%), cross 1.2% / 0.8% / 12% / 13% (suite "
            "7.5%); its training loss at 2.8e-3 ended above l's (0.54 vs 0.52), at 1.8e-3 "
            "below (0.49). At 0.46 / width (seed 0), xs to xl: loss 1.96 / 1.11 / 0.76 / "
            "0.68 / 0.66 (suite 1.97 / 1.10 / 0.78 / 0.70 / 0.70); seen 0.9% / 11% / 99% / "
            "99.9% / 100%; near 0.4% / 3.5% / 51% / 65% / 66% (suite 0.5% / 3.4% / 42% / 57% "
            "/ 60%); cross 0.4% / 0.4% / 10% / 15% / 12% (suite 0.4% / 0.4% / 4.2% / 10% / "
            "7.5%); xl at 1.8e-3, seed 1: loss 0.66, seen 99.8%, near 69%, cross 12.5% "
            "(suite, seed 1: 0.68 / 98% / 54% / 7.1%)"
        ),
        "decision": (
            "0.72 / width overdrives the three largest sizes: 0.46 / width lowers the held-out "
            "loss and raises near-paraphrase and cross-lingual accuracy at m, l and xl and "
            "leaves xs and s as they were. Applied: the suite of these reports uses 0.46 / "
            "width at every size (the scaling table above is of it, both seeds). The probes "
            "alone did not meet the criteria: from l to xl near paraphrases barely moved "
            "(65% -> 66%) and cross-lingual accuracy fell (15% -> 12%), and xs completed "
            "1% of its seen facts"
        ),
    },
    {
        "attempt": "10",
        "change": (
            "the suite of attempt 9 (0.46 / width); xs alone (seed 0) trained 24 and 48 epochs "
            "instead of 8 (3x and 6x the token budget), to measure what its 30% criterion would "
            "cost"
        ),
        "result": (
            "8 / 24 / 48 epochs: seen 0.9% / 1.7% / 4.4%; near 0.4% / 0.9% / 1.0%; cross 0.4% "
            "/ 0.8% / 0%; loss 1.96 / 1.72 / 1.77 (the 48-epoch held-out curve is lowest, "
            "1.73, at about 42 epochs, then rises); training 106 / 306 / 634 CPU s"
        ),
        "decision": (
            "not applied: six times the budget lifts xs to 4.4% of its seen facts, not 30%, "
            "and its held-out loss stops falling. Every size gets the same budget, so 48 "
            "epochs would cost the suite's training about 6 x 6,701 CPU s (about 5.6 h on two "
            "cores) against the 75 minutes asked for the whole study. On this world of 400 "
            "facts, the smallest size's 30% and the 75 minutes cannot both be met (a world "
            "xs can learn has at most about 40 facts: attempt 6); attempt 9's suite kept"
        ),
    },
]


def table() -> pd.DataFrame:
    """The attempts as a table, one row each (columns attempt, change, result, decision)."""
    return pd.DataFrame(ATTEMPTS, columns=["attempt", "change", "result", "decision"])
