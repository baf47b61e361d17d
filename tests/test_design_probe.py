"""The design probe trains exactly the suite's model when no recipe value changes, a changed
learning rate changes the model, and bad input fails naming the value."""

from __future__ import annotations

import pytest
from test_suite import TINY, TRAIN

from influence.study import capability, design_probe
from influence.study import suite as S


def test_probe_reproduces_the_suite_model_and_a_new_lr_changes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path))
    su = S.load_suite("smoke", sizes=TINY, train=TRAIN, progress=False)
    want = capability.summarise(capability.outcomes(su.models["t"], su.tokenizer, su.corpus))
    same = design_probe.probe("t", preset="smoke", sizes=TINY, train=TRAIN)
    assert same["lr"] == TRAIN["lr"] and same["epochs"] == TRAIN["epochs"]
    assert same["heldout_loss"] == round(want["heldout_loss"], 4)
    assert same["heldout_loss"] == round(su.info[0]["heldout_loss"], 4)
    assert len(same["train_loss_per_epoch"]) == 2 and len(same["heldout_curve"]) == 3
    other = design_probe.probe("t", lr=3e-2, epochs=1, preset="smoke", sizes=TINY, train=TRAIN)
    assert other["lr"] == 3e-2 and other["epochs"] == 1
    assert other["heldout_loss"] != same["heldout_loss"]


@pytest.mark.parametrize(
    "kwargs, match", [({"size": "huge"}, "unknown size 'huge'"), ({"epochs": 0}, "epochs")]
)
def test_bad_probe_input_names_the_value(kwargs, match, tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path))
    kwargs = {"size": "t", **kwargs}
    with pytest.raises(ValueError, match=match):
        design_probe.probe(preset="smoke", sizes=TINY, train=TRAIN, **kwargs)
