"""Verdicts (influence.study.findings), tables (display) and the notebook's Report."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from influence.study import display, findings, style  # noqa: E402
from influence.study.reporting import Report  # noqa: E402
from influence.study.run_context import ENV, RunContext  # noqa: E402
from influence.study.stats import Interval, Test  # noqa: E402


def _judge(estimate, p, expected=+1, threshold=0.05, n=20):
    return findings.judge(
        "x", "claim", "paper", effect=Interval(estimate, estimate - 0.01, estimate + 0.01),
        test=Test("Wilcoxon signed-rank", p, n), expected=expected, threshold=threshold,
        what="the change",
    )  # fmt: skip


def test_a_finding_agrees_only_when_significant_in_direction_and_large_enough():
    assert _judge(0.2, 0.001).verdict == "agrees"
    assert _judge(-0.2, 0.001, expected=-1).verdict == "agrees"
    opposite = _judge(-0.2, 0.001)
    assert opposite.verdict == "disagrees"
    assert opposite.reason == "the change = -0.2: opposite to the paper, at least 0.05, p = 0.001"
    not_significant = _judge(0.2, 0.3)  # in the paper's direction, not significant
    assert not_significant.verdict == "inconclusive" and "not significant" in not_significant.reason
    small = _judge(0.01, 1e-6)  # significant, below the threshold
    assert small.verdict == "inconclusive" and "but smaller than 0.05" in small.reason
    assert _judge(-0.01, 1e-6).verdict == "inconclusive"  # the threshold works both ways
    assert _judge(float("nan"), float("nan")).verdict == "inconclusive"
    few = _judge(0.2, 0.25, n=3)
    assert "with 3 queries no test can reach p < 0.05" in few.reason
    assert "p < 1e-4" in _judge(0.2, 1e-6).reason
    f = _judge(0.2, 0.001)
    assert f.threshold == "|the change| ≥ 0.05 and p < 0.05"
    d = f.as_dict()
    assert {"claim", "verdict", "p", "ci", "reason", "threshold"} <= set(d)
    assert d["ci"] == pytest.approx([0.19, 0.21]) and json.dumps(d)
    with pytest.raises(ValueError, match="expected"):
        _judge(0.2, 0.001, expected=0)
    with pytest.raises(ValueError, match="unknown verdict"):
        findings.Finding("x", "c", "p", "o", "", None, "", "partly", "r")


def test_the_notebook_verdict_rule():
    agree, disagree = _judge(0.2, 0.001), _judge(-0.2, 0.001)
    unsure = _judge(0.2, 0.5)
    nc = findings.not_comparable("scale", "c", "p", ours="o", reason="N differs")
    assert findings.overall([agree, agree, nc])[0] == "agrees"
    assert findings.overall([disagree, disagree])[0] == "disagrees"
    assert findings.overall([unsure, nc])[0] == "inconclusive"
    assert findings.overall([nc]) == ("not comparable", "scale.")
    assert findings.overall([agree, agree]) == ("agrees", "x, x.")  # the verdict is not repeated
    assert findings.overall([agree, nc])[1] == "agree: x; not comparable: scale."
    verdict, reason = findings.overall([agree, disagree, unsure, nc])
    assert verdict == "mixed: 1 of 3 agree"
    assert reason == "agree: x; disagree: x; inconclusive: x; not comparable: scale."
    assert findings.overall([agree, unsure])[0] == "mixed: 1 of 2 agree"
    assert findings.is_verdict("mixed: 1 of 2 agree", notebook=True)
    assert not findings.is_verdict("partly", notebook=True)
    assert findings.headline([agree, nc]).splitlines() == [
        "x: 0.2 [0.19, 0.21] p 0.001 -> agrees",
        "scale: -> not comparable",
    ]
    table = findings.frame([agree, nc])
    assert list(table.columns) == [
        "claim", "paper", "ours", "test", "verdict", "reason", "threshold"
    ]  # fmt: skip


def test_display_table_reads_like_a_table():
    df = pd.DataFrame(
        {
            "query_set": ["facts", "a<b"],
            "p": [3e-6, 0.04234],
            "queries": [199.0, 64.0],
            "share": [0.375, 0.02],
            "mean": [52.963333, -0.0],
            "html": ["<b>x</b>", "<i>y</i>"],
        },
        index=[1080, 1081],
    )
    t = display.table(df, caption="Table 1. A caption.", percent=["share"], html_columns=["html"])
    h = t.html
    assert "Table 1. A caption." in h and "query set" in h and "query_set" not in h
    for text in ("&lt; 1e-4", "0.042", ">199<", ">38%<", ">53<", ">0<", "a&lt;b", "<b>x</b>"):
        assert text in h
    assert "1080" not in h and "199.0" not in h and "-0" not in h  # no index, ints as ints
    assert "<details" not in h
    assert "query set" in repr(t) and "< 1e-4" in repr(t)
    long = display.table(pd.DataFrame({"a": range(40)}), caption="Long.")
    assert long.html.startswith('<details class="study-table-details"><summary>Long. (40 rows')
    two = display.table(df, caption="Other.").html
    ids = [x for x in two.split('"') if x.startswith("T_")]
    assert ids and not set(ids) & {x for x in h.split('"') if x.startswith("T_")}


@pytest.fixture
def manual(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.delenv(ENV, raising=False)
    shown = []
    monkeypatch.setattr("influence.study.reporting._display_object", shown.append)
    return shown


def test_report_figure_numbers_captions_and_refuses_unreadable_figures(manual, tmp_path):
    report = Report("02_toy", preset="smoke", params={})
    assert report.figure_dir == tmp_path / "artifacts" / "figures" / "smoke" / "02_toy"
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    report.figure(fig, "first", caption="A line: look at its slope.")
    html = manual[-1]._repr_html_()
    assert 'alt="Figure 1. A line: look at its slope."' in html
    assert "<b>Figure 1.</b> A line: look at its slope." in html
    width = report.figures["first"]["width"]
    assert width == pytest.approx(4 * style.CSS_PX_PER_INCH, abs=40)  # natural size, tight box
    assert f'width="{width}"' in html
    assert (report.figure_dir / "first.png").is_file()
    assert (report.figure_dir / "first.svg").is_file()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_title("tiny", fontsize=6)
    with pytest.raises(ValueError, match="below 9 pt: 'tiny' at 6 pt"):
        report.figure(fig, "small", caption="x")
    fig = plt.figure(figsize=(14, 3))
    fig.add_subplot().plot([0, 1])
    with pytest.raises(ValueError, match="wide as saved"):
        report.figure(fig, "wide", caption="x")
    fig = plt.figure()
    with pytest.raises(ValueError, match="needs a caption"):
        report.figure(fig, "bare", caption=" ")
    report.table(pd.DataFrame({"a": [1]}), caption="One row.")
    report.table(pd.DataFrame({"a": [2]}), caption="Another.")
    assert "Table 2. Another." in manual[-1].html
    plt.close("all")


def test_report_reads_its_run_context_and_pins_threads(tmp_path, monkeypatch):
    import torch

    ctx = RunContext(
        notebook="02_toy",
        preset="smoke",
        metrics_path=tmp_path / "run" / "02_toy.metrics.json",
        figure_dir=tmp_path / "staged",
        final_figure_dir=tmp_path / "final",
        progress_path=tmp_path / "run" / "progress",
        threads=1,
    )
    monkeypatch.setenv(ENV, str(ctx.write(tmp_path / "run" / "ctx.json")))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = Report("02_toy", preset="smoke")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert report.figure_dir == tmp_path / "staged"
    with report.stage("fit"):
        pass
    assert (tmp_path / "run" / "progress").read_text() == "stage fit\n"
    report.conclude(
        question="q?", paper="p", here="one sentence with 3 numbers",
        findings=[_judge(0.2, 0.001), _judge(0.2, 0.5)],
    )  # fmt: skip
    report.save()
    data = json.loads(ctx.metrics_path.read_text())
    assert data["summary"]["verdict"] == "mixed: 1 of 2 agree" and data["threads"] == 1
    assert [f["verdict"] for f in data["findings"]] == ["agrees", "inconclusive"]
    assert not any(isinstance(v, float) and math.isnan(v) for f in data["findings"] for v in f)
    with pytest.raises(ValueError, match="for notebook 02_toy at preset smoke"):
        Report("03_other", preset="smoke")
    with pytest.raises(ValueError, match="one sentence"):
        report.conclude(question="q", paper="p", here="One. Two sentences.", findings=[])


def test_style_names_every_estimator_once():
    assert style.estimator_name("identity") == "dot product"
    assert len({c for _, c in style.ESTIMATORS.values()}) == len(style.ESTIMATORS)
    with pytest.raises(ValueError, match="unknown estimator"):
        style.estimator_color("exact")
    colours = style.size_colors(["xs", "s", "m", "l"])
    assert list(colours) == ["xs", "s", "m", "l"] and len(set(map(str, colours.values()))) == 4
    assert np.isfinite(style.MIN_FONT_PT)
