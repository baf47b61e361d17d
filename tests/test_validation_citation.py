"""Notebooks 02–07 cite notebook 01's EK-FAC-vs-CG check for every size they use (issue 24)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from influence.study import rendering
from influence.study import validation_citation as vc


def _row(size, model, low, *, n_queries=8, estimator="ekfac", pearson=None):
    return {
        "size": size,
        "model": model,
        "estimator": estimator,
        "pearson_vs_cg": pearson if pearson is not None else low + 0.05,
        "pearson_ci": [low, low + 0.1],
        "spearman_vs_cg": 0.5,
        "n_queries": n_queries,
        "n_train": 256,
        "cg_converged_share": 1.0,
    }


def _write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"lm_validation": rows}))
    return path


def test_status_per_size_follows_the_interval_and_the_model(tmp_path):
    own = _write(
        tmp_path / "own.json",
        [
            _row("xs", "aaa", 0.84),
            _row("xs", "aaa", 0.5, estimator="kfac"),  # another estimator: not cited
            _row("s", "bbb", 0.79),  # the interval reaches below 0.8
            _row("m", "old", 0.95),  # a retrained model: not this check
            {**_row("l", "", 0.95), "model": None},  # an old report without the model
        ],
    )
    evidence = vc.read_evidence([("report 01 (default preset)", own)])
    check = vc.build_check({"xs": "aaa", "s": "bbb", "m": "ccc", "l": "ddd"}, evidence)
    assert check.sizes == {"xs": vc.TRACKS, "s": vc.FAILS, "m": vc.UNCHECKED, "l": vc.UNCHECKED}
    assert not check.ok
    assert "tracks it at xs (Pearson 0.89 [0.84, 0.94])" in check.sentence
    assert "does not track it at s" in check.sentence
    assert "was not checked at m, l" in check.sentence
    assert "rest on s, m, l rest on an estimator not shown" in check.sentence
    assert "(report 01 (default preset))" in check.sentence
    json.dumps(check.as_dict())  # goes into the report's JSON as it is


def test_the_check_with_more_queries_is_cited_and_all_tracking_is_ok(tmp_path):
    own = _write(tmp_path / "own.json", [_row("xs", "aaa", 0.6, n_queries=4)])
    val = _write(tmp_path / "validation.json", [_row("xs", "aaa", 0.85, n_queries=8)])
    evidence = vc.read_evidence([("own", own), ("validation", val), ("missing", tmp_path / "x")])
    check = vc.build_check({"xs": "aaa"}, evidence)
    assert check.ok and check.sizes == {"xs": vc.TRACKS}
    assert check.table.loc[0, "source"] == "validation" and check.table.loc[0, "n_queries"] == 8
    assert "not shown" not in check.sentence


def test_no_report_means_every_size_is_unchecked():
    check = vc.build_check({"xs": "aaa", "xl": "zzz"}, pd.DataFrame())
    assert check.sizes == {"xs": vc.UNCHECKED, "xl": vc.UNCHECKED} and not check.ok
    assert "was not checked at xs, xl" in check.sentence
    with pytest.raises(ValueError, match="no sizes"):
        vc.build_check({}, pd.DataFrame())


def test_cite_validation_reads_the_reports_of_the_preset_and_the_validation_report(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("INFLUENCE_REPORTS", str(tmp_path / "reports"))
    _write(tmp_path / "reports" / "01_ihvp_accuracy.json", [_row("xs", "k1", 0.9)])
    _write(tmp_path / "reports" / "validation" / "01_ihvp_accuracy.json", [_row("s", "k2", 0.9)])
    suite = SimpleNamespace(
        models={"xs": None, "s": None, "m": None},
        paths={"xs": Path("/c/k1"), "s": Path("/c/k2"), "m": Path("/c/k3")},
    )
    check = vc.cite_validation(suite, ["xs", "s", "m"], "default")
    assert check.sizes == {"xs": vc.TRACKS, "s": vc.TRACKS, "m": vc.UNCHECKED}
    assert list(check.table["source"]) == [
        "report 01 (default preset)",
        "report 01 (validation preset)",
        "none",
    ]
    with pytest.raises(ValueError, match=r"sizes \['xxl'\] have no trained model"):
        vc.cite_validation(suite, ["xxl"], "default")


def test_the_answer_box_carries_the_sentence_and_flags_an_unchecked_size():
    check = vc.build_check({"xs": "aaa"}, pd.DataFrame())
    report = {
        "notebook": "03_x",
        "title": "T",
        "preset": "default",
        "seed": 0,
        "device": "cpu",
        "started_at": "2026-12-05T00:00:00",
        "wall_time_s": {"total": 1.0},
        "parameters": {"preset": "default", "device": "cpu", "seed": 0},
        "summary": {"question": "Q?", "verdict": "agrees", "reason": "r"},
        "validation": check.as_dict(),
    }
    page = rendering.report_header(report, "", ["03_x"])
    assert '<p class="report-validation report-validation-warn"><b>Estimator check.</b>' in page
    assert "was not checked at xs" in page
    ok = vc.build_check({"xs": "aaa"}, pd.DataFrame([{**_row("xs", "aaa", 0.9), "source": "r"}]))
    page = rendering.report_header({**report, "validation": ok.as_dict()}, "", ["03_x"])
    assert '<p class="report-validation"><b>Estimator check.</b>' in page


def test_retraining_rows_of_the_same_model_are_cited_beside_the_check(tmp_path):
    rt = {"slope": 0.4, "pearson_predicted_vs_actual": 0.7, "n_pairs": 24}
    val = tmp_path / "validation.json"
    val.write_text(
        json.dumps(
            {
                "lm_validation": [_row("xs", "aaa", 0.85), _row("s", "bbb", 0.6)],
                "retrain_check": [
                    {"size": "xs", "model": "aaa", **rt},
                    {"size": "s", "model": "old", **rt, "slope": 9.0},  # another model
                ],
            }
        )
    )
    paths = [("validation", val)]
    check = vc.build_check(
        {"xs": "aaa", "s": "bbb"}, vc.read_evidence(paths), vc.read_retrain_evidence(paths)
    )
    row = check.table.set_index("size")
    assert row.loc["xs", "retrain_slope"] == 0.4 and row.loc["xs", "retrain_pairs"] == 24
    assert pd.isna(row.loc["s", "retrain_slope"])
    assert "at xs slope 0.4, Pearson 0.7 over 24 pairs; not retrained at s." in check.sentence
    assert "Retraining with k added copies (validation)" in check.sentence
    plain = vc.build_check({"xs": "aaa"}, vc.read_evidence(paths))
    assert "No size it uses was checked by retraining" in plain.sentence
    json.dumps(check.as_dict())
