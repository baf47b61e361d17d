"""Per-token influence as HTML (`influence.render_token_html`).

Every token is drawn, in order, escaped, with visible glyphs for whitespace and the end of
the sequence; colours diverge from white at 0 (blue positive, red negative) and saturate at
±scale; the term at position t goes to token t + 1 (a causal model's output at t predicts
t + 1); the fragment wraps and loads nothing from outside.
"""

from __future__ import annotations

import re

import pytest
import torch
from brute_force import lm_data, tiny_llama

import influence as inf
from influence.token_html import NEGATIVE, POSITIVE


def _spans(fragment: str) -> list[tuple[str, str, str]]:
    """(title, background, text) of each token span, in order."""
    body = fragment.split('<div style="font-family:monospace;line-height', 1)[1]
    return re.findall(r'<span title="([^"]*)" style="background:([^;]*);[^"]*">(.*?)</span>', body)


def test_every_token_is_drawn_escaped_in_order_with_glyphs():
    tokens = ["<s>", " the", "<script>alert(1)</script>", "\n", "\tx", "</s>"]
    html = inf.render_token_html(tokens, [0.0, 1.0, -1.0, 0.5, 0.0, 0.0], eos_tokens=["</s>"])
    spans = _spans(html)
    assert [text for _, _, text in spans] == [
        "&lt;s&gt;",  # special tokens are drawn, escaped
        "·the",  # a space is visible
        "&lt;script&gt;alert(1)&lt;/script&gt;",
        "⏎",
        "⇥x",
        "EOS",  # the end-of-sequence token
        "EOS",  # the last position's term: it predicts past the row
    ]
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "⏎</span><br>" in html  # a newline token breaks the line
    # Position t's term is drawn on token t + 1; the first token is predicted by nothing.
    titles = [title for title, _, _ in spans]
    assert titles[0] == "&#x27;&lt;s&gt;&#x27;" and spans[0][1] == "transparent"
    assert titles[1] == "&#x27; the&#x27;: +0"
    assert titles[2].endswith(": +1") and titles[3].endswith(": -1")


def test_colours_diverge_from_white_and_saturate_at_the_scale():
    html = inf.render_token_html(["a", "b", "c", "d", "e"], [0.0, 2.0, -2.0, 4.0], scale=2.0)
    colours = [bg for _, bg, _ in _spans(html)]
    assert colours[0] == "transparent"
    assert colours[1] == "rgb(255,255,255)"  # 0: white
    assert colours[2] == "rgb({},{},{})".format(*POSITIVE)  # +scale
    assert colours[3] == "rgb({},{},{})".format(*NEGATIVE)  # −scale
    assert colours[4] == colours[2]  # beyond the scale: clamped
    half = inf.render_token_html(["a", "b"], [1.0, 0.0], offset=0, scale=2.0, legend=False)
    r, g, b = map(int, re.findall(r"rgb\((\d+),(\d+),(\d+)\)", half)[0])
    assert (r, g, b) == tuple(round(255 + 0.5 * (c - 255)) for c in POSITIVE)


def test_the_fragment_wraps_and_loads_nothing_from_outside():
    html = inf.render_token_html([f" word{i}" for i in range(500)], torch.randn(500))
    assert "white-space:pre-wrap" in html and "overflow-wrap:anywhere" in html
    assert "nowrap" not in html
    for external in ("http", "src=", "<link", "<script", "<style", "url(", "@import"):
        assert external not in html


def test_values_must_fit_the_tokens():
    with pytest.raises(ValueError, match="3 tokens but 5 values"):
        inf.render_token_html(["a", "b", "c"], [0.0] * 5)
    with pytest.raises(ValueError, match="NaN"):
        inf.render_token_html(["a", "b"], [float("nan"), 0.0])
    with pytest.raises(ValueError, match="scale must be a positive"):
        inf.render_token_html(["a", "b"], [1.0, 0.0], scale=0)


def test_by_token_scores_of_a_model_render():
    """The renderer takes a row of `by_token` scores as they come."""
    model, task, data = tiny_llama(), inf.LanguageModelingTask(), lm_data(4, min_len=3)
    est = inf.Identity().fit(model, task, data, progress=False)
    tokens = inf.pairwise_scores(model, task, est, data, data, by_token=True, progress=False)
    n = int(data["attention_mask"][1].sum())
    pieces = [f"t{int(i)}" for i in data["input_ids"][1, :n]]
    html = inf.render_token_html(pieces, tokens[0, 1, :n])
    assert len(_spans(html)) == n + 1  # every token and the end mark
