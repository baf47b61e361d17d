"""The study's presets, defined once. Notebooks and pipeline read them through `resolve`.

`smoke`: every notebook end to end in about two minutes on a 2-core CPU (the tests use it).
`default`: the committed reports; the whole study from an empty artifacts folder takes about
2 h on a 2-core CPU (the README's preset table gives the measured stages; issue 23 asks for 75 min).
`large`: bigger corpus and models, for a GPU or a long night.
`validation`: the default study, with notebook 01's language-model validation at full size
(issue 24: exact references, damping sweep, PBRF and retraining at every size of the suite); its
report is the one the default reports cite.

A section need not define every preset: `FALLBACK` names the preset whose block stands in for a
missing one (`validation` falls back to `default`), and `preset_block` is the only place that
applies it. Today only notebook 01 (`ihvp_accuracy.PRESETS`) defines a `validation` block; every
other section, including every other question module's `PRESETS`, runs its `default` values at
the validation preset.

Each section belongs to one component (corpus, suite) or one notebook (named like the
notebook). A research question's module owns its section: it defines `SECTION` (the
notebook's name), `PRESETS` (preset -> parameters) and `RANGES` (parameter -> `Range`), and
`QUESTION_MODULES` below collects them. Sections not yet moved to their module live in
`SECTIONS` here, their ranges in `RANGES`. A notebook may override single values of its
section; unknown names, values of the wrong type and values outside their range fail at once.
"""

from __future__ import annotations

import copy
from typing import Any

from . import (
    abstraction,
    cross_lingual,
    ihvp_accuracy,
    layers_and_tokens,
    query_batching,
    role_play,
    tails,
    word_order,
)
from .ranges import Range, check_ranges, count

PRESET_NAMES = ("smoke", "default", "large", "validation")

# section -> preset -> parameters
SECTIONS: dict[str, dict[str, dict[str, Any]]] = {
    # Owned by influence/study/corpus.py (issues 5, 23). World: entity counts, the share of
    # facts stated in one language only and of entities whose names are shared across
    # languages (the control set); n_templates training templates per relation and language;
    # heldout_share of the units held out for the held-out loss set; n_assistant dialogues per
    # topic, n_role_play passages per other role-play category (and per topic), n_format_control
    # assistant dialogues on unrelated topics.
    "corpus": {
        "smoke": {
            "n_countries": 6,
            "n_people": 10,
            "n_elements": 4,
            "mono_share": 0.2,
            "shared_share": 0.2,
            "n_templates": 3,
            "heldout_share": 0.1,
            "n_word_order_facts": 3,
            "n_assistant": 6,
            "n_role_play": 2,
            "n_format_control": 4,
            "n_role_play_queries": 4,
            "n_math": 12,
            "n_math_queries": 3,
            "n_code": 10,
            "n_code_queries": 3,
            "n_quotes": 3,
            "n_quote_contexts": 2,
        },
        "default": {
            "n_countries": 80,
            "n_people": 145,
            "n_elements": 95,
            "mono_share": 0.3,
            "shared_share": 0.1,
            "n_templates": 9,
            "heldout_share": 0.05,
            "n_word_order_facts": 24,
            "n_assistant": 150,
            "n_role_play": 300,
            "n_format_control": 360,
            "n_role_play_queries": 12,
            "n_math": 4000,
            "n_math_queries": 24,
            "n_code": 440,
            "n_code_queries": 24,
            "n_quotes": 8,
            "n_quote_contexts": 5,
        },
        "large": {
            "n_countries": 300,
            "n_people": 550,
            "n_elements": 350,
            "mono_share": 0.3,
            "shared_share": 0.1,
            "n_templates": 9,
            "heldout_share": 0.05,
            "n_word_order_facts": 60,
            "n_assistant": 150,
            "n_role_play": 200,
            "n_format_control": 360,
            "n_role_play_queries": 12,
            "n_math": 4000,
            "n_math_queries": 60,
            "n_code": 450,
            "n_code_queries": 25,
            "n_quotes": 8,
            "n_quote_contexts": 5,
        },
    },
    # Owned by influence/study/suite.py (issues 5, 23). sizes: small to large (each must have
    # more parameters than the one before); train: one recipe and one token budget (epochs of
    # the corpus) for every size; eval_points: held-out loss checkpoints per run; threads: per
    # model; workers: models trained at a time, each in its own process.
    "suite": {
        "smoke": {
            "vocab_size": 512,
            "context": 96,
            "tie_embeddings": True,
            "sizes": [
                {"name": "xs", "hidden": 8, "layers": 1, "intermediate": 24, "heads": 1},
                {"name": "s", "hidden": 16, "layers": 1, "intermediate": 48, "heads": 1},
                {"name": "m", "hidden": 24, "layers": 1, "intermediate": 64, "heads": 1},
                {"name": "l", "hidden": 32, "layers": 2, "intermediate": 96, "heads": 2},
                {"name": "xl", "hidden": 48, "layers": 2, "intermediate": 128, "heads": 2},
            ],
            "train": {
                "epochs": 8,
                "batch_size": 32,
                "lr": 1e-2,
                "warmup_frac": 0.05,
                "min_lr_ratio": 0.1,
                "weight_decay": 0.01,
                "log_every": 5,
                "eval_points": 4,
                "threads": 1,
                "workers": 2,
            },
        },
        "default": {
            "vocab_size": 1024,
            "context": 96,
            "tie_embeddings": True,
            # peak learning rate 0.46 / hidden for every size (larger for narrower models);
            # 0.72 / hidden overdrove m, l and xl (design log, attempt 9)
            "sizes": [
                {
                    "name": "xs",
                    "hidden": 24,
                    "layers": 2,
                    "intermediate": 96,
                    "heads": 2,
                    "lr": 1.92e-2,
                },
                {
                    "name": "s",
                    "hidden": 48,
                    "layers": 2,
                    "intermediate": 144,
                    "heads": 2,
                    "lr": 9.6e-3,
                },
                {
                    "name": "m",
                    "hidden": 96,
                    "layers": 3,
                    "intermediate": 288,
                    "heads": 4,
                    "lr": 4.8e-3,
                },
                {
                    "name": "l",
                    "hidden": 160,
                    "layers": 4,
                    "intermediate": 480,
                    "heads": 4,
                    "lr": 2.88e-3,
                },
                {
                    "name": "xl",
                    "hidden": 256,
                    "layers": 5,
                    "intermediate": 768,
                    "heads": 4,
                    "lr": 1.8e-3,
                },
            ],
            "train": {
                # 8 epochs: at 4 no size learned more than 16% of its seen facts (design log,
                # attempts 7 and 8)
                "epochs": 8,
                "batch_size": 32,
                "lr": 2e-3,
                "warmup_frac": 0.05,
                "min_lr_ratio": 0.1,
                "weight_decay": 0.01,
                "log_every": 20,
                "eval_points": 24,
                "threads": 1,
                "workers": 2,
            },
        },
        "large": {
            "vocab_size": 2048,
            "context": 128,
            "tie_embeddings": True,
            # peak learning rate 0.46 / hidden, as at the default preset (not tuned at this scale)
            "sizes": [
                {
                    "name": "xs",
                    "hidden": 48,
                    "layers": 2,
                    "intermediate": 192,
                    "heads": 2,
                    "lr": 9.6e-3,
                },
                {
                    "name": "s",
                    "hidden": 96,
                    "layers": 3,
                    "intermediate": 384,
                    "heads": 4,
                    "lr": 4.8e-3,
                },
                {
                    "name": "m",
                    "hidden": 192,
                    "layers": 4,
                    "intermediate": 768,
                    "heads": 4,
                    "lr": 2.4e-3,
                },
                {
                    "name": "l",
                    "hidden": 384,
                    "layers": 6,
                    "intermediate": 1536,
                    "heads": 6,
                    "lr": 1.2e-3,
                },
                {
                    "name": "xl",
                    "hidden": 768,
                    "layers": 8,
                    "intermediate": 3072,
                    "heads": 12,
                    "lr": 6e-4,
                },
            ],
            "train": {
                "epochs": 4,
                "batch_size": 64,
                "lr": 1e-3,
                "warmup_frac": 0.05,
                "min_lr_ratio": 0.1,
                "weight_decay": 0.01,
                "log_every": 50,
                "eval_points": 32,
                "threads": None,
                "workers": 1,
            },
        },
    },
    # Owned by notebooks/00_corpus_and_models. n_examples: training texts shown per kind and
    # language; scaling_seeds: training seeds per size for the scaling table (seed, seed + 1,
    # ...; the rest of the study uses the models of `seed` only).
    "00_corpus_and_models": {
        "smoke": {"n_examples": 1, "scaling_seeds": 2},
        "default": {"n_examples": 2, "scaling_seeds": 2},
        "large": {"n_examples": 2, "scaling_seeds": 2},
    },
    # Owned by influence/study/influence_scores.py (issue 10): the scores every notebook from
    # 02 on reads. sizes/query_sets None = all of the suite's / corpus's; max_queries caps the
    # large sets (drawn without replacement with sample_seed). workers: models fitted and
    # scored at a time in spawned processes (the scores do not depend on it; not in the cache
    # key): 2 on the 2-core default machine, 1 for large, which is meant for one GPU.
    "influence_scores": {
        "smoke": {
            "sizes": None,
            "query_sets": None,
            "max_queries": {"facts": 8, "paraphrase": 8, "cross_lingual": 6},
            "sample_seed": 0,
            "modules": "mlp",
            "damping": "auto",
            "fit_seed": 0,
            "batch_size": 32,
            "dtype": "float32",
            "workers": 1,
        },
        "default": {
            "sizes": None,
            "query_sets": None,
            "max_queries": {"facts": 64, "paraphrase": 64, "cross_lingual": 48},
            "sample_seed": 0,
            "modules": "mlp",
            "damping": "auto",
            "fit_seed": 0,
            "batch_size": 32,
            "dtype": "float32",
            "workers": 2,
        },
        "large": {
            "sizes": None,
            "query_sets": None,
            "max_queries": {"facts": 256, "paraphrase": 256, "cross_lingual": 128},
            "sample_seed": 0,
            "modules": "mlp",
            "damping": "auto",
            "fit_seed": 0,
            "batch_size": 32,
            "dtype": "float32",
            "workers": 1,
        },
    },
}

# The research questions that own their preset block (and its ranges) in their module.
QUESTION_MODULES = (
    ihvp_accuracy,
    tails,
    abstraction,
    cross_lingual,
    word_order,
    role_play,
    layers_and_tokens,
    query_batching,
)

# section -> parameter -> allowed values, for the sections defined above; a question module
# declares its own next to its preset block.
RANGES: dict[str, dict[str, Range]] = {
    "influence_scores": {
        "sample_seed": count(0),
        "fit_seed": count(0),
        "batch_size": count(1),
        "workers": count(1),
    },
}
for _module in QUESTION_MODULES:
    if _module.SECTION in SECTIONS:
        raise RuntimeError(f"preset section {_module.SECTION!r} is defined twice")
    SECTIONS[_module.SECTION] = _module.PRESETS
    RANGES[_module.SECTION] = _module.RANGES


# The preset whose block a section uses when it defines none for the asked one. `smoke`,
# `default` and `large` have no fallback: every section defines them.
FALLBACK: dict[str, str] = {"validation": "default"}


def check_preset(preset: str) -> str:
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESET_NAMES)}")
    return preset


def preset_block(section: str, preset: str) -> dict[str, Any]:
    """The parameters `section` defines at `preset`, or at its `FALLBACK` preset where the
    section defines none (the validation preset runs every section but notebook 01's at its
    default values). Not a copy: `resolve` gives one."""
    check_preset(preset)
    if section not in SECTIONS:
        raise ValueError(f"unknown preset section {section!r}; valid: {', '.join(SECTIONS)}")
    blocks = SECTIONS[section]
    if preset in blocks:
        return blocks[preset]
    if preset in FALLBACK and FALLBACK[preset] in blocks:
        return blocks[FALLBACK[preset]]
    raise ValueError(
        f"preset section {section!r} defines no {preset!r} block and has no fallback for it "
        f"(defined: {', '.join(blocks)}; fallbacks: {FALLBACK})"
    )


def resolve(section: str, preset: str, **overrides: Any) -> dict[str, Any]:
    """Parameters of `section` at `preset`, with single values overridden.

    Overrides whose value is None are ignored (a notebook's parameters cell uses None for
    "take the preset's value"). A setting that is a group of values (a dict, such as notebook
    01's `language_model`) is overridden one value at a time: the dict given (or a string that
    parses to one, as papermill's `-p NAME '{"key": 1}'` passes it) is merged into the
    preset's. Unknown sections, presets or names, at any depth, values of the wrong type and
    values outside their declared range raise ValueError listing the valid names, the
    expected type or the range.
    """
    params = merge_settings(preset_block(section, preset), overrides, section)
    check_ranges(params, RANGES.get(section, {}), section)
    return params


def merge_settings(base: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of `base` with `overrides` merged in (recursively for dicts), type-checked."""
    unknown = sorted(k for k in overrides if k not in base)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for {where!r}; valid parameters: "
            f"{', '.join(sorted(base))}"
        )
    params = copy.deepcopy(base)
    for name, value in overrides.items():
        if value is not None:
            params[name] = _checked_value(params[name], value, f"{where}.{name}")
    return params


def _parse_literal(text: str) -> Any:
    import ast
    import json

    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _checked_value(base: Any, value: Any, where: str) -> Any:
    if isinstance(base, dict):
        value = _parse_literal(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            first = next(iter(base), "key")
            raise ValueError(
                f"{where} is a group of settings ({', '.join(base)}): give a dict of the values "
                f"to change, e.g. {where.split('.', 1)[-1]}.{first}=VALUE in the pipeline or "
                f"-p {where.rsplit('.', 1)[-1]} '{{\"{first}\": VALUE}}' with papermill"
            )
        return merge_settings(base, value, where)
    if base is None:
        return value
    if isinstance(base, list | tuple) and isinstance(value, str):
        value = _parse_literal(value)
    expected: tuple[type, ...]
    if isinstance(base, bool):
        expected = (bool,)
    elif isinstance(base, int | float):
        expected = (int, float)
    elif isinstance(base, list | tuple):
        expected = (list, tuple)
    else:
        expected = (type(base),)
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        raise ValueError(
            f"{where} must be {' or '.join(t.__name__ for t in expected)} (the preset's value is "
            f"{base!r}), got {value!r}"
        )
    if isinstance(base, int) and not isinstance(base, bool) and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{where} must be a whole number (preset value {base!r}), got {value}")
        value = int(value)
    return list(value) if isinstance(value, tuple) else value
