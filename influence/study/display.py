"""Tables and HTML for the report pages: the one display helper of the study.

    display(table(df, caption="Table 1. ...", percent=["share"]))   # in a notebook
    html = table(df).html                                            # in the pipeline

A table is rendered to HTML by pandas' Styler: headers in words (`HEADERS`, then "_" as
spaces), numbers with three significant figures (`stats.format_number`), integers as integers,
shares as percentages where asked, p-values as "< 1e-4" or two significant figures, no index
column, text that wraps. A table longer than `collapse_after` rows is folded into a
`<details>` element whose summary is the caption. `html_columns` hold raw HTML (e.g. a token
heatmap) and are not escaped; `raw_html` shows any HTML as it is.
"""

from __future__ import annotations

import hashlib
import html as _html
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .stats import format_number, format_p, format_share

# identifier -> words, for every table of the study (a table may add its own)
HEADERS: dict[str, str] = {
    "query_set": "query set",
    "query_type": "query type",
    "n": "n",
    "n_queries": "queries",
    "queries": "queries",
    "share": "share",
    "low": "95% CI low",
    "high": "95% CI high",
    "p": "p",
    "base_rate": "corpus base rate",
    "params": "parameters",
    "max_per_copy": "largest per-copy influence (nats)",
    "per_copy": "per-copy influence (nats)",
    "train_id": "training sequence",
    "text": "text",
    "relation": "relation to the query",
    "rank": "rank",
}
COLLAPSE_AFTER = 15


def header(name: Any, headers: Mapping[str, str] | None = None) -> str:
    """The words for a column identifier (a tuple of a MultiIndex is joined with " · ")."""
    if isinstance(name, tuple):
        return " · ".join(header(n, headers) for n in name if str(n))
    key = str(name)
    for mapping in (headers or {}, HEADERS):
        if key in mapping:
            return mapping[key]
    return key.replace("_", " ")


def is_p_column(name: Any) -> bool:
    key = str(name[-1] if isinstance(name, tuple) else name).lower()
    return key == "p" or key.endswith("_p") or key.startswith("p_") or key.endswith(" p")


def cell_formatter(
    name: Any, digits: int, percent: Iterable[Any], formats: Mapping[Any, Callable]
) -> Callable[[Any], str]:
    """How one column's values become text."""
    if name in formats:
        return formats[name]
    if name in set(percent):
        return format_share
    if is_p_column(name):
        return format_p
    return lambda x: format_number(x, digits) if not isinstance(x, str) else x


@dataclass
class Table:
    """A rendered table: `html` for the page, `text` for plain outputs (nbval, consoles)."""

    html: str
    text: str

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text


def table(
    frame: pd.DataFrame,
    *,
    caption: str = "",
    headers: Mapping[str, str] | None = None,
    digits: int = 3,
    percent: Iterable[Any] = (),
    formats: Mapping[Any, Callable[[Any], str]] | None = None,
    html_columns: Iterable[Any] = (),
    index: bool = False,
    collapse_after: int = COLLAPSE_AFTER,
    stacked: bool = False,
) -> Table:
    """`frame` as an HTML table (see the module docstring). `index=True` shows the index as
    leading columns (e.g. a pivot's row labels); `formats` overrides a column's formatter;
    `stacked=True` shows each row as a block of labelled cells on narrow screens (each cell
    carries its header as `data-label`)."""
    df = frame.reset_index() if index else frame.reset_index(drop=True)
    percent, formats = list(percent), dict(formats or {})
    raw = set(html_columns)
    fmts = {c: cell_formatter(c, digits, percent, formats) for c in df.columns}
    shown = pd.DataFrame(
        {i: [_safe(fmts[c], v) for v in df[c]] for i, c in enumerate(df.columns)},
        index=range(len(df)),
    )
    escaped = shown.copy()
    for i, c in enumerate(df.columns):
        if c not in raw:
            escaped[i] = escaped[i].map(_html.escape)
    names: list[str] = []
    for c in df.columns:  # two identifiers with the same words stay two columns
        name = _html.escape(header(c, headers))
        names.append(name if name not in names else f"{name} ({names.count(name) + 1})")
    escaped.columns = names
    numeric = [
        h for h, c in zip(escaped.columns, df.columns, strict=True)
        if c not in raw and pd.api.types.is_numeric_dtype(df[c])
        and not pd.api.types.is_bool_dtype(df[c])
    ]  # fmt: skip
    # element ids must differ between the tables of a page: derive them from the content
    uid = hashlib.sha1(shown.to_json().encode() + caption.encode()).hexdigest()[:10]
    styler = escaped.style.hide(axis="index").set_table_attributes('class="study-table"')
    styler = styler.set_uuid(uid).set_td_classes(
        pd.DataFrame(
            [["num" if h in numeric else "txt" for h in escaped.columns]] * len(escaped),
            columns=escaped.columns,
        )
    )
    body = re.sub(r'<style type="text/css">\s*</style>\s*', "", styler.to_html())
    if stacked:
        labels = list(escaped.columns)
        body = re.sub(
            r'<td id="(T_\w+?_row\d+_col(\d+))"',
            lambda m: f'<td data-label="{labels[int(m.group(2))]}" id="{m.group(1)}"',
            body,
        ).replace('class="study-table"', 'class="study-table stacked"', 1)
    cap = f'<p class="table-caption">{_html.escape(caption)}</p>' if caption else ""
    if len(df) > collapse_after:
        summary = _html.escape(caption or "Table") + f" ({len(df)} rows: click to show)"
        page = (
            f'<details class="study-table-details"><summary>{summary}</summary>'
            f'<div class="table-wrap">{body}</div></details>'
        )
    else:
        page = (
            f'<figure class="study-table-figure">{cap}<div class="table-wrap">{body}</div></figure>'
        )
    text_frame = shown.copy()
    text_frame.columns = [header(c, headers) for c in df.columns]
    text = (caption + "\n" if caption else "") + text_frame.to_string(index=False)
    return Table(page, text)


def _safe(fmt: Callable[[Any], str], value: Any) -> str:
    try:
        return fmt(value)
    except (TypeError, ValueError):
        return str(value)


@dataclass
class RawHTML:
    """HTML shown as it is (a token heatmap, a legend)."""

    html: str

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return "[HTML]"


def raw_html(markup: str) -> RawHTML:
    return RawHTML(markup)
