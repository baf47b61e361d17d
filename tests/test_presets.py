"""Presets are defined once; unknown presets and parameters fail at once, listing valid ones."""

from __future__ import annotations

import pytest

from influence.study import presets


@pytest.fixture
def section(monkeypatch):
    monkeypatch.setitem(
        presets.SECTIONS,
        "_test",
        {
            "smoke": {"n": 1, "lr": 0.1, "name": "a"},
            "default": {"n": 10, "lr": 0.1, "name": "a"},
            "large": {"n": 100, "lr": 0.1, "name": "a"},
        },
    )
    return "_test"


def test_resolve_returns_the_preset_values(section):
    assert presets.resolve(section, "smoke") == {"n": 1, "lr": 0.1, "name": "a"}
    assert presets.resolve(section, "default")["n"] == 10


def test_override_single_value(section):
    assert presets.resolve(section, "smoke", n=5) == {"n": 5, "lr": 0.1, "name": "a"}


def test_none_overrides_are_ignored(section):
    assert presets.resolve(section, "default", n=None, lr=None) == presets.resolve(
        section, "default"
    )


def test_resolve_does_not_mutate_the_presets(section):
    presets.resolve(section, "smoke", n=7)["lr"] = 99
    assert presets.SECTIONS[section]["smoke"] == {"n": 1, "lr": 0.1, "name": "a"}


def test_unknown_preset_lists_valid_presets(section):
    with pytest.raises(ValueError, match="unknown preset") as err:
        presets.resolve(section, "tiny")
    for name in presets.PRESET_NAMES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="smoke, default, large"):
        presets.check_preset("huge")


def test_unknown_parameter_lists_valid_parameters(section):
    with pytest.raises(ValueError, match="unknown parameter") as err:
        presets.resolve(section, "smoke", n_layers=3)
    message = str(err.value)
    assert "n_layers" in message
    for name in ("n", "lr", "name"):
        assert name in message


def test_unknown_section_lists_valid_sections(section):
    with pytest.raises(ValueError, match="unknown preset section") as err:
        presets.resolve("nope", "smoke")
    assert section in str(err.value)


@pytest.mark.parametrize("name", sorted(presets.SECTIONS))
def test_every_section_defines_every_preset_or_falls_back_with_the_same_names(name):
    by_preset = presets.SECTIONS[name]
    assert set(by_preset) <= set(presets.PRESET_NAMES)
    for preset in presets.PRESET_NAMES:
        assert preset in by_preset or presets.FALLBACK.get(preset) in by_preset, (
            f"section {name!r} has no {preset!r} block and no fallback for it"
        )
    keys = {p: set(presets.preset_block(name, p)) for p in presets.PRESET_NAMES}
    assert all(k == keys["default"] for k in keys.values()), (
        f"section {name!r}: a parameter valid at one preset must be valid at all: {keys}"
    )


def test_validation_is_default_everywhere_but_notebook_01s_language_model():
    from influence.study import ihvp_accuracy

    for name in presets.SECTIONS:
        validation = presets.resolve(name, "validation")
        default = presets.resolve(name, "default")
        if name != "01_ihvp_accuracy":
            assert validation == default, name
            continue
        assert validation["language_model"] == ihvp_accuracy.VALIDATION_LANGUAGE_MODEL
        assert validation["language_model"] != default["language_model"]
        rest = {k: v for k, v in validation.items() if k != "language_model"}
        assert rest == {k: v for k, v in default.items() if k != "language_model"}


def test_the_fallback_leaves_question_modules_presets_alone():
    from influence.study import abstraction, tails

    for module in (*presets.QUESTION_MODULES, tails, abstraction):
        if module.SECTION == "01_ihvp_accuracy":  # the one section with its own block
            assert set(module.PRESETS) == set(presets.PRESET_NAMES)
            continue
        assert set(module.PRESETS) == {"smoke", "default", "large"}, module.SECTION


def test_a_section_without_the_preset_or_a_fallback_fails_naming_both(monkeypatch):
    monkeypatch.setitem(presets.SECTIONS, "_partial", {"default": {"n": 1}})
    assert presets.resolve("_partial", "validation") == {"n": 1}
    with pytest.raises(ValueError, match="defines no 'smoke' block.*defined: default"):
        presets.resolve("_partial", "smoke")


def test_validation_overrides_apply_to_the_fallback_block_without_mutating_it(section):
    assert presets.resolve(section, "validation", n=3)["n"] == 3
    assert presets.resolve(section, "validation") == presets.resolve(section, "default")
    assert "validation" not in presets.SECTIONS[section]


@pytest.mark.parametrize("name", sorted(presets.SECTIONS))
def test_every_preset_value_is_in_its_declared_range(name):
    for preset in presets.PRESET_NAMES:
        presets.resolve(name, preset)  # a range naming no parameter, or a bad value, raises


def test_question_modules_own_their_blocks_and_ranges_fail_naming_the_parameter():
    from influence.study import abstraction, tails

    assert presets.SECTIONS["02_sparsity_and_tails"] is tails.PRESETS
    assert presets.SECTIONS["03_abstraction_with_scale"] is abstraction.PRESETS
    with pytest.raises(ValueError, match=r"tail_share must be a number in \(0, 1\)"):
        presets.resolve("02_sparsity_and_tails", "smoke", tail_share=0)
    with pytest.raises(ValueError, match="bootstrap must be an integer ≥ 1"):
        presets.resolve("02_sparsity_and_tails", "smoke", bootstrap=0)
    with pytest.raises(ValueError, match="min_tail must be a whole number.*got 2.5"):
        presets.resolve("02_sparsity_and_tails", "smoke", min_tail=2.5)
    with pytest.raises(ValueError, match="bm25_fraction must be a number in \\(0, 1\\]"):
        presets.resolve("03_abstraction_with_scale", "smoke", bm25_fraction=1.5)


def test_notebook_01_owns_its_block_and_checks_nested_ranges():
    from influence.study import ihvp_accuracy

    assert presets.SECTIONS["01_ihvp_accuracy"] is ihvp_accuracy.PRESETS
    with pytest.raises(ValueError, match="mlp_regression.n_queries must be an integer ≥ 1"):
        presets.resolve("01_ihvp_accuracy", "smoke", mlp_regression={"n_queries": 0})
    with pytest.raises(ValueError, match="language_model.lissa.depth must be an integer ≥ 1"):
        presets.resolve("01_ihvp_accuracy", "validation", language_model={"lissa": {"depth": 0}})
    with pytest.raises(ValueError, match="lds_alpha must be a number in \\(0, 1\\)"):
        presets.resolve("01_ihvp_accuracy", "default", mlp_classification={"lds_alpha": 1.0})
