"""The study's figure style: one look, readable fonts, one colour and one name per thing.

`apply()` (called by `Report`) sets matplotlib's rcParams. Sizes are chosen for the report
page, which shows a figure at its natural size: `FIGURE_DPI` pixels per inch saved and
`CSS_PX_PER_INCH` CSS pixels per inch shown (the CSS inch), so a 9 pt font in the figure is a
9 pt font on the page at 100% zoom, as long as the figure is at most `MAX_WIDTH_IN` inches wide
(the page's column). `Report.figure` refuses figures that break either rule.

Colours are Okabe & Ito's colour-blind-safe palette. Every estimator has one name and one
colour in every figure and table (`ESTIMATORS`: the gradient dot product is "dot product",
never "identity"), and so has every relation category, role-play category and query set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MIN_FONT_PT = 9.0
FIGURE_DPI = 192  # 2 device pixels per CSS pixel: sharp on high-density screens
CSS_PX_PER_INCH = 96
MAX_WIDTH_IN = 10.4  # the report column (1000 CSS px) in inches

RC = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "figure.titlesize": 11,
    "figure.dpi": 96,
    "savefig.dpi": FIGURE_DPI,
    "figure.constrained_layout.use": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "legend.frameon": False,
    "svg.hashsalt": "influence",
}

# Okabe & Ito (2008)
BLACK, ORANGE, SKY, GREEN, YELLOW, BLUE, VERMILLION, PURPLE, GREY = (
    "#000000",
    "#E69F00",
    "#56B4E9",
    "#009E73",
    "#F0E442",
    "#0072B2",
    "#D55E00",
    "#CC79A7",
    "#999999",
)
LIGHT_GREY = "#CCCCCC"

# key -> (name shown to readers, colour)
ESTIMATORS: dict[str, tuple[str, str]] = {
    "identity": ("dot product", GREY),
    "diagonal": ("diagonal", GREEN),
    "kfac": ("K-FAC", SKY),
    "ekfac": ("EK-FAC", BLUE),
    "lissa": ("LiSSA", ORANGE),
    "cg": ("CG", BLACK),
    "pbrf": ("PBRF", VERMILLION),
}

# Relation categories (influence.study.relations), role-play categories and coarse levels.
CATEGORY_COLORS: dict[str, str] = {
    "same fact, same words": BLUE,
    "same fact, other words": GREEN,
    "shares a name": ORANGE,
    "same relation": YELLOW,
    "unrelated": LIGHT_GREY,
    "same operation": GREEN,
    "same function kind": GREEN,
    "same saying": BLUE,
    "other": LIGHT_GREY,
    "assistant": PURPLE,
    "fiction": GREEN,
    "essay": SKY,
    "distractor": ORANGE,
    "other topic": BLUE,
    "format control": VERMILLION,
    "unrelated passage": GREY,
    "seen text": BLUE,
    "same meaning": GREEN,
    "surface": ORANGE,
}

QUERY_SET_COLORS: dict[str, str] = {
    "facts": BLUE,
    "paraphrase": SKY,
    "cross_lingual": GREEN,
    "math": ORANGE,
    "code": VERMILLION,
    "quotes": PURPLE,
    "role_play": BLACK,
    "word_order": YELLOW,
}


def apply() -> None:
    """Set the study's rcParams (idempotent)."""
    import matplotlib

    matplotlib.rcParams.update(RC)


def estimator_name(key: str) -> str:
    if key not in ESTIMATORS:
        raise ValueError(f"unknown estimator {key!r}; known: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[key][0]


def estimator_color(key: str) -> str:
    if key not in ESTIMATORS:
        raise ValueError(f"unknown estimator {key!r}; known: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[key][1]


def category_color(category: str) -> str:
    if category not in CATEGORY_COLORS:
        raise ValueError(f"no colour for category {category!r}; add it to style.CATEGORY_COLORS")
    return CATEGORY_COLORS[category]


def query_set_color(query_set: str) -> str:
    if query_set not in QUERY_SET_COLORS:
        raise ValueError(f"no colour for query set {query_set!r}; add it to QUERY_SET_COLORS")
    return QUERY_SET_COLORS[query_set]


def size_colors(models: Sequence[str]) -> dict[str, Any]:
    """One colour per model size, light (smallest) to dark (largest), from viridis."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    n = max(len(models) - 1, 1)
    return {m: cmap(0.85 - 0.75 * i / n) for i, m in enumerate(models)}


def small_texts(fig: Any, minimum: float = MIN_FONT_PT) -> list[tuple[str, float]]:
    """(text, size in pt) of every visible, non-empty text of `fig` smaller than `minimum`."""
    from matplotlib.text import Text

    out = []
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip() and t.get_fontsize() < minimum - 1e-9:
            out.append((t.get_text(), float(t.get_fontsize())))
    return out
