"""Which sizes a notebook's verdicts rest on, and whether EK-FAC was checked there (issue 24).

    check = cite_validation(suite, sizes, preset)   # reads notebook 01's reports
    report.cite_validation(check)                   # table in the notebook, line in the answer

Notebook 01 compares EK-FAC with exact damped Gauss–Newton CG on each language model of the
suite (`lm_validation.validate_suite`, table `lm_validation`). Notebooks 02–07 compute every
score with EK-FAC on those models, so each cites, for every size it uses, that comparison: the
row of the same trained model (its cache entry, so a retrained or other-seed model is never
credited with an old check), from notebook 01's report at the same preset, or from the
committed report of the `validation` preset (`reports/validation/`), whichever covers the size
with more queries.

A size **tracks CG** when the lower end of the 95% bootstrap interval of EK-FAC's mean
per-query Pearson correlation with CG is at least `TRACKS_CG` (0.8, fixed with the design);
else it **does not track CG**; with no row for that model it is **not validated**. The answer
line of a notebook says which sizes are which, so a verdict that rests on an unchecked or
failing size says so.

Where notebook 01 also retrained a size with k added copies of training sequences
(`retrain_check`), the same row carries the slope and Pearson correlation of the actual change
of log p(completion) against k × the predicted per-copy change, and the sentence states them:
what one "nat per copy" of the study's scores turned out to mean at that size. They are
reported, not turned into a status: no rule for them was fixed before they were measured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .bookkeeping import reports_dir, reports_root
from .stats import format_number

TRACKS_CG = 0.8  # the lowest acceptable lower bound of EK-FAC's Pearson with CG
NOTEBOOK = "01_ihvp_accuracy"
VALIDATION_PRESET = "validation"
TRACKS, FAILS, UNCHECKED = "tracks CG", "does not track CG", "not validated"
COLUMNS = (
    "size",
    "status",
    "pearson_vs_cg",
    "pearson_ci",
    "spearman_vs_cg",
    "n_queries",
    "n_train",
    "cg_converged_share",
    "source",
    "retrain_slope",
    "retrain_pearson",
    "retrain_pairs",
)
RETRAIN = {"slope": "retrain_slope", "pearson_predicted_vs_actual": "retrain_pearson"}


def report_paths(preset: str) -> list[tuple[str, Path]]:
    """(source label, path) of notebook 01's reports a notebook at `preset` may cite: the same
    preset's, then the committed validation report."""
    own = reports_dir(preset) / f"{NOTEBOOK}.json"
    valid = reports_root() / VALIDATION_PRESET / f"{NOTEBOOK}.json"
    out = [(f"report 01 ({preset} preset)", own)]
    if valid.resolve() != own.resolve():
        out.append((f"report 01 ({VALIDATION_PRESET} preset)", valid))
    return out


def _rows(paths: Sequence[tuple[str, Path]], table: str) -> pd.DataFrame:
    """Rows of `table` in the reports that exist, with their source; rows without the model's
    cache entry (reports older than this check) cannot be matched to a model and are left
    out."""
    rows = []
    for label, path in paths:
        if not Path(path).is_file():
            continue
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        rows += [{**r, "source": label} for r in data.get(table) or [] if r.get("model")]
    return pd.DataFrame(rows)


def read_evidence(paths: Sequence[tuple[str, Path]]) -> pd.DataFrame:
    """EK-FAC's `lm_validation` rows of the reports that exist (`_rows`)."""
    rows = _rows(paths, "lm_validation")
    return rows[rows["estimator"] == "ekfac"].reset_index(drop=True) if len(rows) else rows


def read_retrain_evidence(paths: Sequence[tuple[str, Path]]) -> pd.DataFrame:
    """The `retrain_check` rows (one per size) of the reports that exist (`_rows`)."""
    return _rows(paths, "retrain_check")


def status(pearson_ci: Sequence[float] | None) -> str:
    """TRACKS when the interval's lower end is at least `TRACKS_CG`, else FAILS."""
    low = pearson_ci[0] if pearson_ci else float("nan")
    return TRACKS if low is not None and math.isfinite(low) and low >= TRACKS_CG else FAILS


@dataclass
class ValidationCheck:
    """Per size used: the EK-FAC-vs-CG row cited, its status, and one sentence for the answer."""

    table: pd.DataFrame
    sentence: str
    ok: bool  # every size used tracks CG
    sizes: dict[str, str] = field(default_factory=dict)  # size -> status

    def as_dict(self) -> dict[str, Any]:
        return {
            "sentence": self.sentence,
            "ok": self.ok,
            "threshold": TRACKS_CG,
            "sizes": self.sizes,
            "rows": self.table.to_dict(orient="records"),
        }


def _describe(row: Mapping[str, Any]) -> str:
    low, high = row["pearson_ci"]
    return (
        f"{row['size']} (Pearson {format_number(row['pearson_vs_cg'], 2)} "
        f"[{format_number(low, 2)}, {format_number(high, 2)}])"
    )


def _matching(frame: pd.DataFrame, size: str, model: str) -> pd.DataFrame:
    if not len(frame):
        return frame
    return frame[(frame["size"] == size) & (frame["model"] == model)]


def _retrain_sentence(rows: list[dict], sources: set[str]) -> str:
    done = [r for r in rows if r["retrain_pairs"]]
    if not done:
        return " No size it uses was checked by retraining with added copies."
    said = "; ".join(
        f"at {r['size']} slope {format_number(r['retrain_slope'], 2)}, Pearson "
        f"{format_number(r['retrain_pearson'], 2)} over {r['retrain_pairs']} pairs"
        for r in done
    )
    rest = [r["size"] for r in rows if not r["retrain_pairs"]]
    return (
        f" Retraining with k added copies ({'; '.join(sorted(sources))}): the actual change of "
        f"log p(completion) against k × EK-FAC's predicted per-copy change, {said}"
        + (f"; not retrained at {', '.join(rest)}" if rest else "")
        + "."
    )


def build_check(
    models: Mapping[str, str], evidence: pd.DataFrame, retrained: pd.DataFrame | None = None
) -> ValidationCheck:
    """The check for sizes `models` (size -> the trained model's cache entry, in suite order)
    against `evidence` (`read_evidence`) and, where given, `retrained`
    (`read_retrain_evidence`)."""
    retrained = pd.DataFrame() if retrained is None else retrained
    if not models:
        raise ValueError("no sizes to cite: pass the sizes whose scores the notebook uses")
    rows = []
    retrain_sources: set[str] = set()
    for size, model in models.items():
        found = _matching(evidence, size, model)
        if len(found):
            # the most queries, then the most sequences; a tie keeps the first report listed
            best = found.loc[found[["n_queries", "n_train"]].apply(tuple, axis=1).idxmax()]
            row = {c: best.get(c) for c in COLUMNS if c != "status"}
            row["pearson_ci"] = [float(v) for v in best["pearson_ci"]]
            row["status"] = status(row["pearson_ci"])
        else:
            row = {c: None for c in COLUMNS}
            row.update(size=size, status=UNCHECKED, source="none")
        again = _matching(retrained, size, model)
        if len(again):
            # the most pairs; a tie keeps the first report listed
            best = again.loc[again["n_pairs"].idxmax()]
            row.update({new: float(best[old]) for old, new in RETRAIN.items()})
            row["retrain_pairs"] = int(best["n_pairs"])
            retrain_sources.add(best["source"])
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    by = {s: [r for r in rows if r["status"] == s] for s in (TRACKS, FAILS, UNCHECKED)}
    parts = []
    if by[TRACKS]:
        parts.append("tracks it at " + ", ".join(_describe(r) for r in by[TRACKS]))
    if by[FAILS]:
        parts.append("does not track it at " + ", ".join(_describe(r) for r in by[FAILS]))
    if by[UNCHECKED]:
        parts.append("was not checked at " + ", ".join(r["size"] for r in by[UNCHECKED]))
    sources = sorted({r["source"] for r in rows if r["status"] != UNCHECKED})
    where = f" ({'; '.join(sources)})" if sources else ""
    sentence = (
        f"EK-FAC against exact damped Gauss–Newton CG{where}: " + "; ".join(parts) + "; "
        f"'tracks' means the lower end of the Pearson interval is at least {TRACKS_CG:g}."
    )
    bad = by[FAILS] + by[UNCHECKED]
    if bad:
        sentence += (
            " The verdicts that rest on "
            + ", ".join(r["size"] for r in bad)
            + " rest on an estimator not shown to track the exact influence there."
        )
    sentence += _retrain_sentence(rows, retrain_sources)
    return ValidationCheck(
        table=table,
        sentence=sentence,
        ok=not bad,
        sizes={r["size"]: r["status"] for r in rows},
    )


def cite_validation(suite: Any, sizes: Sequence[str], preset: str) -> ValidationCheck:
    """The check for `sizes` of `suite` (their trained models' cache entries), from notebook
    01's reports (`report_paths(preset)`)."""
    unknown = [s for s in sizes if s not in suite.models]
    if unknown:
        raise ValueError(
            f"sizes {unknown} have no trained model in this suite (sizes: {list(suite.models)})"
        )
    models = {s: (suite.paths[s].name if s in suite.paths else s) for s in sizes}
    paths = report_paths(preset)
    return build_check(models, read_evidence(paths), read_retrain_evidence(paths))
