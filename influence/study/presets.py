"""The study's presets, defined once. Notebooks and pipeline read them through `resolve`.

`smoke`: every notebook end to end in about two minutes on a 2-core CPU (the tests use it).
`default`: the whole study in at most 60 minutes on a 2-core CPU; its reports are committed.
`large`: bigger corpus and models, for a GPU or a long night.
`validation`: the default study, with notebook 01's language-model validation at full size
(issue 24: exact references, damping sweep, PBRF and retraining at every size of the suite); its
report is the one the default reports cite. Every other section is `default`'s (copied below).

Each section belongs to one component (corpus, suite) or one notebook (named like the
notebook). A notebook may override single values of its section; unknown names fail at once.
"""

from __future__ import annotations

import copy
from typing import Any

PRESET_NAMES = ("smoke", "default", "large", "validation")

# section -> preset -> parameters
SECTIONS: dict[str, dict[str, dict[str, Any]]] = {
    # Owned by influence/study/corpus.py (issue 5).
    "corpus": {
        "smoke": {
            "n_countries": 6,
            "n_people": 8,
            "n_elements": 4,
            "mono_share": 0.4,
            "n_word_order_facts": 3,
            "n_role_play": 2,
            "n_role_play_queries": 3,
            "n_math": 12,
            "n_math_queries": 3,
            "n_code": 10,
            "n_code_queries": 3,
            "n_quotes": 3,
            "n_quote_contexts": 2,
        },
        "default": {
            "n_countries": 60,
            "n_people": 90,
            "n_elements": 50,
            "mono_share": 0.4,
            "n_word_order_facts": 24,
            "n_role_play": 12,
            "n_role_play_queries": 12,
            "n_math": 120,
            "n_math_queries": 12,
            "n_code": 80,
            "n_code_queries": 15,
            "n_quotes": 8,
            "n_quote_contexts": 5,
        },
        "large": {
            "n_countries": 150,
            "n_people": 250,
            "n_elements": 120,
            "mono_share": 0.4,
            "n_word_order_facts": 60,
            "n_role_play": 30,
            "n_role_play_queries": 12,
            "n_math": 600,
            "n_math_queries": 30,
            "n_code": 95,
            "n_code_queries": 25,
            "n_quotes": 8,
            "n_quote_contexts": 5,
        },
    },
    # Owned by influence/study/suite.py (issue 5).
    "suite": {
        "smoke": {
            "vocab_size": 512,
            "context": 96,
            "sizes": [
                {"name": "xs", "hidden": 16, "layers": 1, "intermediate": 48, "heads": 1},
                {"name": "s", "hidden": 32, "layers": 1, "intermediate": 96, "heads": 1},
                {"name": "m", "hidden": 48, "layers": 2, "intermediate": 128, "heads": 2},
                {"name": "l", "hidden": 64, "layers": 2, "intermediate": 192, "heads": 2},
            ],
            "train": {
                "epochs": 10,
                "batch_size": 32,
                "lr": 1e-2,
                "warmup_frac": 0.05,
                "min_lr_ratio": 0.1,
                "weight_decay": 0.01,
                "log_every": 5,
                "threads": 1,
            },
        },
        "default": {
            "vocab_size": 1024,
            "context": 96,
            "sizes": [
                {"name": "xs", "hidden": 24, "layers": 1, "intermediate": 64, "heads": 1},
                {"name": "s", "hidden": 48, "layers": 2, "intermediate": 128, "heads": 2},
                {"name": "m", "hidden": 128, "layers": 3, "intermediate": 352, "heads": 4},
                {"name": "l", "hidden": 192, "layers": 4, "intermediate": 512, "heads": 6},
            ],
            "train": {
                "epochs": 12,
                "batch_size": 32,
                "lr": 2e-3,
                "warmup_frac": 0.05,
                "min_lr_ratio": 0.1,
                "weight_decay": 0.01,
                "log_every": 20,
                "threads": 1,
            },
        },
        "large": {
            "vocab_size": 2048,
            "context": 128,
            "sizes": [
                {"name": "xs", "hidden": 64, "layers": 2, "intermediate": 192, "heads": 2},
                {"name": "s", "hidden": 128, "layers": 3, "intermediate": 384, "heads": 4},
                {"name": "m", "hidden": 256, "layers": 4, "intermediate": 768, "heads": 8},
                {"name": "l", "hidden": 512, "layers": 6, "intermediate": 1536, "heads": 8},
                {"name": "xl", "hidden": 768, "layers": 8, "intermediate": 2048, "heads": 12},
            ],
            "train": {
                "epochs": 60,
                "batch_size": 64,
                "lr": 1e-3,
                "warmup_frac": 0.05,
                "min_lr_ratio": 0.1,
                "weight_decay": 0.01,
                "log_every": 50,
                "threads": None,
            },
        },
    },
    # Owned by notebooks/00_corpus_and_models.
    "00_corpus_and_models": {
        "smoke": {"n_examples": 1},
        "default": {"n_examples": 2},
        "large": {"n_examples": 2},
    },
    # Owned by notebooks/05_word_order (issue 12). n_boot: bootstrap resamples over facts;
    # token_facts: facts whose sequences of token_groups (first template each) are shown
    # tokenwise for the smallest and the largest model.
    "05_word_order": {
        "smoke": {
            "n_boot": 200,
            "token_facts": 1,
            "token_groups": ["rewording", "flipped", "irrelevant_with_names"],
        },
        "default": {
            "n_boot": 1000,
            "token_facts": 2,
            "token_groups": ["rewording", "flipped", "irrelevant_with_names"],
        },
        "large": {
            "n_boot": 1000,
            "token_facts": 2,
            "token_groups": ["rewording", "flipped", "irrelevant_with_names"],
        },
    },
    # Owned by notebooks/06_role_play (issue 12). top_k: positive influences per query whose
    # categories are counted; n_boot: bootstrap resamples over queries; n_examples: queries
    # whose top sequences are printed for the smallest and the largest model.
    "06_role_play": {
        "smoke": {"top_k": 5, "n_boot": 200, "n_examples": 1},
        "default": {"top_k": 10, "n_boot": 1000, "n_examples": 3},
        "large": {"top_k": 10, "n_boot": 1000, "n_examples": 3},
    },
    # Owned by notebooks/07_layers_and_tokens (issue 13). top_k: sequences per query whose
    # influence is split by layer and ranked in the restriction experiment; token_queries /
    # token_sequences: queries per query set and top sequences per query drawn as token heatmaps
    # (largest model); n_boot: bootstrap resamples over queries.
    "07_layers_and_tokens": {
        "smoke": {"top_k": 5, "token_queries": 3, "token_sequences": 3, "n_boot": 200},
        "default": {"top_k": 10, "token_queries": 3, "token_sequences": 3, "n_boot": 1000},
        "large": {"top_k": 20, "token_queries": 4, "token_sequences": 3, "n_boot": 1000},
    },
    # Owned by notebooks/08_query_batching_and_filtering (issue 13). ranks: query-batching ranks
    # compared with full rank; n_queries: queries drawn (sample_seed) from all scored query sets
    # for the rank sweep, per size (the sweep costs one training pass per size); sweep_sizes: the
    # sizes swept (None = every size of the scores stage); top: the top-k
    # compared; fractions: BM25 candidate-set sizes m / N for the TF-IDF recall curve.
    "08_query_batching_and_filtering": {
        "smoke": {
            "ranks": [1, 2, 4, 8, 16, 32, 64],
            "n_queries": 4,
            "sweep_sizes": None,
            "sample_seed": 0,
            "top": 10,
            "fractions": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
            "n_boot": 200,
        },
        "default": {
            "ranks": [1, 2, 4, 8, 16, 32, 64],
            "n_queries": 8,
            "sweep_sizes": None,
            "sample_seed": 0,
            "top": 10,
            "fractions": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
            "n_boot": 1000,
        },
        "large": {
            "ranks": [1, 2, 4, 8, 16, 32, 64],
            "n_queries": 32,
            "sweep_sizes": None,
            "sample_seed": 0,
            "top": 10,
            "fractions": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
            "n_boot": 1000,
        },
    },
    # Owned by notebooks/01_ihvp_accuracy (issue 4). MLP settings: data split, model and
    # training recipe, queries, LiSSA/CG/PBRF settings and LDS retrains; language_model: the
    # suite's smallest model on a subset of the corpus (MLP layers tracked, the paper's choice).
    "01_ihvp_accuracy": {
        "smoke": {
            "mlp_regression": {
                "test_size": 100,
                "hidden": 16,
                "activation": "tanh",
                "steps": 200,
                "lr": 0.01,
                "weight_decay": 0.1,
                "n_queries": 3,
                "lissa": {"depth": 200, "batch_size": 32},
                "cg_tol": 1e-08,
                "batch_size": 4096,
                "n_pbrf": 8,
                "pbrf_tol": 1e-05,
                "pbrf_steps": 300,
                "lds_subsets": 10,
                "lds_alpha": 0.5,
            },
            "mlp_classification": {
                "test_size": 1297,
                "hidden": 16,
                "activation": "tanh",
                "steps": 200,
                "lr": 0.01,
                "weight_decay": 0.01,
                "n_queries": 3,
                "lissa": {"depth": 200, "batch_size": 32},
                "cg_tol": 1e-08,
                "batch_size": 4096,
                "n_pbrf": 4,
                "pbrf_tol": 1e-05,
                "pbrf_steps": 300,
                "lds_subsets": 10,
                "lds_alpha": 0.5,
            },
            "language_model": {
                "sizes": ["smallest"],
                "query_set": "facts",
                "n_queries": 2,
                "n_train": 24,
                "include_related": True,
                "scales": [0.1, 1.0, 10.0],
                "cg_tol": 1e-06,
                "cg_max_iter": 300,
                "batch_size": 32,
                "n_boot": 200,
                "lissa_sizes": ["smallest", "largest"],
                "lissa": {"depth": 50, "batch_size": 8, "repeats": 1},
                "dense_sizes": ["smallest"],
                "dense_max_params": 6000,
                "dense_n_train": 8,
                "pbrf_sizes": ["smallest"],
                "n_pbrf": 6,
                "pbrf_tol": 1e-05,
                "pbrf_steps": 300,
                "pbrf_preconditioner": "damping",
                "retrain_sizes": ["smallest"],
                "k_values": [1, 2],
                "retrain_top_k": 3,
                "retrain_top_pairs": 2,
                "retrain_max_top": 2,
                "retrain_random": 1,
                "retrain_null": 1,
                "insert_seed": 0,
                "retrain_identity_check": True,
            },
            "damping_scales": [0.1, 1.0, 10.0],
            "threads": 1,
        },
        "default": {
            "mlp_regression": {
                "test_size": 100,
                "hidden": 32,
                "activation": "tanh",
                "steps": 500,
                "lr": 0.01,
                "weight_decay": 0.1,
                "n_queries": 10,
                "lissa": {"depth": 2000, "batch_size": 32},
                "cg_tol": 1e-08,
                "batch_size": 4096,
                "n_pbrf": 300,
                "pbrf_tol": 1e-05,
                "pbrf_steps": 300,
                "lds_subsets": 50,
                "lds_alpha": 0.5,
            },
            "mlp_classification": {
                "test_size": 497,
                "hidden": 32,
                "activation": "tanh",
                "steps": 300,
                "lr": 0.01,
                "weight_decay": 0.01,
                "n_queries": 10,
                "lissa": {"depth": 2000, "batch_size": 32},
                "cg_tol": 1e-08,
                "batch_size": 4096,
                "n_pbrf": 200,
                "pbrf_tol": 1e-05,
                "pbrf_steps": 300,
                "lds_subsets": 50,
                "lds_alpha": 0.5,
            },
            "language_model": {
                "sizes": ["smallest"],
                "query_set": "facts",
                "n_queries": 8,
                "n_train": 256,
                "include_related": True,
                "scales": [1.0],
                "cg_tol": 1e-06,
                "cg_max_iter": 500,
                "batch_size": 32,
                "n_boot": 1000,
                "lissa_sizes": [],
                "lissa": {"depth": 50, "batch_size": 8, "repeats": 1},
                "dense_sizes": [],
                "dense_max_params": 6000,
                "dense_n_train": 8,
                "pbrf_sizes": [],
                "n_pbrf": 6,
                "pbrf_tol": 1e-05,
                "pbrf_steps": 300,
                "pbrf_preconditioner": "damping",
                "retrain_sizes": [],
                "k_values": [1, 2],
                "retrain_top_k": 3,
                "retrain_top_pairs": 2,
                "retrain_max_top": 2,
                "retrain_random": 1,
                "retrain_null": 1,
                "insert_seed": 0,
                "retrain_identity_check": True,
            },
            "damping_scales": [0.1, 1.0, 10.0],
            "threads": 1,
        },
        "large": {
            "mlp_regression": {
                "test_size": 100,
                "hidden": 128,
                "activation": "tanh",
                "steps": 1000,
                "lr": 0.01,
                "weight_decay": 0.1,
                "n_queries": 10,
                "lissa": {"depth": 5000, "batch_size": 32},
                "cg_tol": 1e-08,
                "batch_size": 4096,
                "n_pbrf": 500,
                "pbrf_tol": 1e-05,
                "pbrf_steps": 300,
                "lds_subsets": 100,
                "lds_alpha": 0.5,
            },
            "mlp_classification": {
                "test_size": 497,
                "hidden": 128,
                "activation": "tanh",
                "steps": 500,
                "lr": 0.01,
                "weight_decay": 0.01,
                "n_queries": 10,
                "lissa": {"depth": 5000, "batch_size": 32},
                "cg_tol": 1e-08,
                "batch_size": 4096,
                "n_pbrf": 500,
                "pbrf_tol": 1e-05,
                "pbrf_steps": 300,
                "lds_subsets": 100,
                "lds_alpha": 0.5,
            },
            "language_model": {
                "sizes": None,
                "query_set": "facts",
                "n_queries": 16,
                "n_train": 512,
                "include_related": True,
                "scales": [0.1, 1.0, 10.0],
                "cg_tol": 1e-06,
                "cg_max_iter": 2000,
                "batch_size": 32,
                "n_boot": 1000,
                "lissa_sizes": ["smallest", "largest"],
                "lissa": {"depth": 2000, "batch_size": 8, "repeats": 1},
                "dense_sizes": ["smallest"],
                "dense_max_params": 6000,
                "dense_n_train": 64,
                "pbrf_sizes": ["smallest"],
                "n_pbrf": 32,
                "pbrf_tol": 1e-05,
                "pbrf_steps": 1000,
                "pbrf_preconditioner": "damping",
                "retrain_sizes": ["smallest", "largest"],
                "k_values": [1, 2, 4],
                "retrain_top_k": 10,
                "retrain_top_pairs": 10,
                "retrain_max_top": 6,
                "retrain_random": 2,
                "retrain_null": 2,
                "insert_seed": 0,
                "retrain_identity_check": True,
            },
            "damping_scales": [0.01, 0.1, 1.0, 10.0],
            "threads": None,
        },
    },
    # Owned by notebooks/03_abstraction_with_scale (issue 11): top-k sizes for the composition
    # (the first is the headline), bootstrap resamples, queries shown with their top texts.
    "03_abstraction_with_scale": {
        "smoke": {"k": [10, 50], "n_boot": 500, "n_examples": 3, "n_texts": 5},
        "default": {"k": [10, 50], "n_boot": 1000, "n_examples": 3, "n_texts": 5},
        "large": {"k": [10, 50], "n_boot": 1000, "n_examples": 3, "n_texts": 5},
    },
    # Owned by notebooks/04_cross_lingual (issue 11): k of the top-k share, the paper's top-n
    # sequences in the query's language, how many queries per source language the translation
    # protocol rescores.
    "04_cross_lingual": {
        "smoke": {"k": 10, "n_top": 10, "max_per_language": 4, "n_boot": 500},
        "default": {"k": 10, "n_top": 10, "max_per_language": 12, "n_boot": 1000},
        "large": {"k": 10, "n_top": 10, "max_per_language": 32, "n_boot": 1000},
    },
    # Owned by influence/study/influence_scores.py (issue 10): the scores every notebook from
    # 02 on reads. sizes/query_sets None = all of the suite's / corpus's; max_queries caps the
    # large sets (drawn without replacement with sample_seed).
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
        },
    },
    # Owned by notebooks/02_sparsity_and_tails (issue 10). tail_share: the top share of each
    # query's positive per-copy scores among which powerlaw's KS search picks x_min;
    # bootstrap: synthetic data sets per goodness-of-fit p-value (Clauset et al. 2009).
    "02_sparsity_and_tails": {
        "smoke": {
            "tail_share": 0.2,
            "min_tail": 10,
            "bootstrap": 5,
            "bootstrap_queries": 8,
            "top_k": 5,
            "ccdf_queries": 2,
        },
        "default": {
            "tail_share": 0.1,
            "min_tail": 20,
            "bootstrap": 50,
            "bootstrap_queries": 8,
            "top_k": 10,
            "ccdf_queries": 3,
        },
        "large": {
            "tail_share": 0.1,
            "min_tail": 20,
            "bootstrap": 100,
            "bootstrap_queries": 16,
            "top_k": 10,
            "ccdf_queries": 3,
        },
    },
}


# `validation` is `default` in every section but notebook 01's language-model validation, which
# runs there at full size (issue 24): every size of the suite, three dampings, LiSSA at the
# smallest and largest size, the explicit-matrix check where the tracked parameters are few,
# the PBRF, and retraining at the smallest and largest size.
VALIDATION_LANGUAGE_MODEL: dict[str, Any] = {
    "sizes": None,
    "query_set": "facts",
    "n_queries": 8,
    "n_train": 256,
    "include_related": True,
    "scales": [0.1, 1.0, 10.0],
    "cg_tol": 1e-06,
    "cg_max_iter": 2000,
    "batch_size": 32,
    "n_boot": 1000,
    "lissa_sizes": ["smallest", "largest"],
    "lissa": {"depth": 1000, "batch_size": 8, "repeats": 1},
    "dense_sizes": ["smallest"],
    "dense_max_params": 6000,
    "dense_n_train": 64,
    "pbrf_sizes": ["smallest"],
    "n_pbrf": 32,
    "pbrf_tol": 1e-05,
    "pbrf_steps": 500,
    "pbrf_preconditioner": "damping",
    "retrain_sizes": ["smallest", "largest"],
    "k_values": [1, 2, 4],
    "retrain_top_k": 10,
    "retrain_top_pairs": 10,
    "retrain_max_top": 6,
    "retrain_random": 2,
    "retrain_null": 2,
    "insert_seed": 0,
    "retrain_identity_check": True,
}
for _section in SECTIONS.values():
    _section["validation"] = copy.deepcopy(_section["default"])
SECTIONS["01_ihvp_accuracy"]["validation"]["language_model"] = VALIDATION_LANGUAGE_MODEL


def check_preset(preset: str) -> str:
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESET_NAMES)}")
    return preset


def resolve(section: str, preset: str, **overrides: Any) -> dict[str, Any]:
    """Parameters of `section` at `preset`, with single values overridden.

    Overrides whose value is None are ignored (a notebook's parameters cell uses None for
    "take the preset's value"). A setting that is a group of values (a dict, such as notebook
    01's `language_model`) is overridden one value at a time: the dict given (or a string that
    parses to one, as papermill's `-p NAME '{"key": 1}'` passes it) is merged into the
    preset's. Unknown sections, presets or names, at any depth, and values of the wrong type
    raise ValueError listing the valid names or the expected type.
    """
    check_preset(preset)
    if section not in SECTIONS:
        raise ValueError(f"unknown preset section {section!r}; valid: {', '.join(SECTIONS)}")
    return merge_settings(SECTIONS[section][preset], overrides, section)


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
