"""The study's presets, defined once. Notebooks and pipeline read them through `resolve`.

`smoke`: every notebook end to end in about two minutes on a 2-core CPU (the tests use it).
`default`: the whole study in at most 45 minutes on a 2-core CPU; its reports are committed.
`large`: bigger corpus and models, for a GPU or a long night.

Each section belongs to one component (corpus, suite) or one notebook (named like the
notebook). A notebook may override single values of its section; unknown names fail at once.
"""

from __future__ import annotations

import copy
from typing import Any

PRESET_NAMES = ("smoke", "default", "large")

# section -> preset -> parameters
SECTIONS: dict[str, dict[str, dict[str, Any]]] = {
    # Owned by influence/study/corpus.py (issue 5).
    "corpus": {
        "smoke": {},
        "default": {},
        "large": {},
    },
    # Owned by influence/study/suite.py (issue 5).
    "suite": {
        "smoke": {},
        "default": {},
        "large": {},
    },
    # Owned by notebooks/00_corpus_and_models.
    "00_corpus_and_models": {
        "smoke": {},
        "default": {},
        "large": {},
    },
    # Owned by notebooks/01_ihvp_accuracy (issue 4).
    "01_ihvp_accuracy": {
        "smoke": {},
        "default": {},
        "large": {},
    },
}


def check_preset(preset: str) -> str:
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESET_NAMES)}")
    return preset


def resolve(section: str, preset: str, **overrides: Any) -> dict[str, Any]:
    """Parameters of `section` at `preset`, with single values overridden.

    Overrides whose value is None are ignored (a notebook's parameters cell uses None for
    "take the preset's value"). Unknown sections, presets or parameter names raise ValueError
    listing the valid ones.
    """
    check_preset(preset)
    if section not in SECTIONS:
        raise ValueError(f"unknown preset section {section!r}; valid: {', '.join(SECTIONS)}")
    params = copy.deepcopy(SECTIONS[section][preset])
    unknown = sorted(k for k in overrides if k not in params)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for {section!r}; valid parameters: "
            f"{', '.join(sorted(params))}"
        )
    params.update({k: v for k, v in overrides.items() if v is not None})
    return params
