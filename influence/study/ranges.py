"""Value ranges of preset parameters, declared next to each preset block and checked by
`presets.resolve` (so by `notebook_config` in a notebook's first cell and by the pipeline's
dry run, before any work).

    RANGES = {"tail_share": share("the top share of the corpus searched for x_min"),
              "min_tail": count(1, "points kept in the fitted tail")}

A list value is checked element by element. A failing value raises ValueError naming the
parameter, its range and what it means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """An interval of allowed values (bounds optional, open or closed), optionally integers."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    meaning: str = ""

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '≥'} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '≤'} {self.high:g}"
        return kind

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not math.isfinite(value) or (self.integer and not float(value).is_integer()):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def check(self, name: str, value: Any) -> None:
        """ValueError naming `name` and the range unless `value` (every element of a list) is
        in it. None is accepted ("not set": the preset's meaning)."""
        if value is None:
            return
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if not self.contains(item):
                what = f" ({self.meaning})" if self.meaning else ""
                each = "every element of " if isinstance(value, list | tuple) else ""
                raise ValueError(f"{each}{name} must be {self}{what}, got {item!r}")


def share(meaning: str = "") -> Range:
    """A share strictly between 0 and 1."""
    return Range(0, 1, low_open=True, high_open=True, meaning=meaning)


def fraction(meaning: str = "") -> Range:
    """A fraction in (0, 1]."""
    return Range(0, 1, low_open=True, meaning=meaning)


def count(minimum: int = 1, meaning: str = "") -> Range:
    """An integer ≥ `minimum`."""
    return Range(minimum, integer=True, meaning=meaning)


def check_ranges(values: dict[str, Any], ranges: dict[str, Range], where: str) -> None:
    """Check every value that has a declared range; a value inside a group of settings (a dict)
    is named with a dotted name (`language_model.n_queries`)."""
    for name, rng in ranges.items():
        node: Any = values
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(
                    f"{where}: a range is declared for {name!r}, which is no parameter"
                )
            node = node[part]
        rng.check(name, node)
