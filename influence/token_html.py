"""Per-token influence as HTML: a sequence's tokens on a diverging background.

`render_token_html(tokens, values)` draws the tokens of one training sequence with the
per-token terms of its score (a row of `pairwise_scores(..., by_token=True)`): white at 0,
blue for positive (helpful: the term raises the query's log-probability), red for negative,
saturated at ±`scale`. The fragment is self-contained (inline styles only, no scripts,
fonts or images), wraps like text, and escapes every token.

Position convention (docs/MATH.md): a causal language model's output at position t predicts
token t + 1, so the term at position t belongs to token t + 1 (`offset=1`, the default); the
first token, predicted by nothing in the row, is drawn uncoloured, and a last position's term
(predicting past the row) on an end mark. A seq2seq decoder's term at position t belongs to
its target token t (`offset=0`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import torch

POSITIVE = (33, 102, 172)  # blue: helpful
NEGATIVE = (178, 24, 43)  # red: harmful
# What whitespace and the end of the row look like (every token stays visible).
# Glyphs that DejaVu Sans (the fallback of most systems) has; the end of the sequence is a
# boxed word rather than a symbol, since symbols such as U+23F9 render as an empty box where
# no installed font has them.
GLYPHS = {" ": "·", "\t": "⇥", "\n": "⏎", "\r": "\\r"}
END = "EOS"
END_STYLE = "border:1px solid #666;font-size:75%;padding:0 2px;margin:0 1px"


def _colour(value: float, scale: float) -> str:
    """White at 0, POSITIVE at +scale, NEGATIVE at −scale, linear in between, clamped."""
    a = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    end = POSITIVE if a >= 0 else NEGATIVE
    rgb = (round(255 + abs(a) * (c - 255)) for c in end)
    return "rgb({},{},{})".format(*rgb)


def _visible(token: str) -> tuple[str, bool]:
    """The token's escaped text with whitespace drawn as glyphs, and whether it ends a line."""
    text = "".join(GLYPHS.get(ch, ch) for ch in token) or "∅"
    return html.escape(text, quote=True), "\n" in token


def render_token_html(
    tokens: Sequence[str],
    values: Sequence[float] | torch.Tensor,
    *,
    offset: int = 1,
    scale: float | None = None,
    eos_tokens: Sequence[str] = (),
    legend: bool = True,
) -> str:
    """One sequence's tokens as an HTML fragment coloured by their per-token terms.

    `tokens`: the sequence's tokens as text, every one of them (decode each id on its own,
    special tokens included). `values`: the per-position terms of its score, e.g.
    `scores[q, m, :len(tokens)]` from `pairwise_scores(..., by_token=True)`. The term at
    position t is drawn on token t + `offset` (1 for causal language models, 0 for a seq2seq
    decoder's targets or other per-token scores). `scale`: the |value| drawn at full colour
    (default: the largest |value|; give one scale to compare several sequences). Tokens in
    `eos_tokens` (e.g. `[tokenizer.eos_token]`) are drawn as a boxed "EOS", whitespace as "·",
    "⇥" and "⏎" (a line break follows), each span's tooltip giving the token and its value.
    """
    vals = torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist()
    tokens = [str(t) for t in tokens]
    if offset not in (0, 1):
        raise ValueError(f"offset must be 1 (causal language models) or 0, got {offset!r}")
    if not len(tokens) - offset <= len(vals) <= len(tokens):
        raise ValueError(
            f"{len(tokens)} tokens but {len(vals)} values: give one value per position of the "
            "sequence (a row of by_token scores cut to the sequence's length)"
        )
    if any(math.isnan(v) for v in vals):
        raise ValueError("values hold NaN: per-token terms of a finite score are finite")
    if scale is None:
        scale = max((abs(v) for v in vals), default=0.0) or 1.0
    elif not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    # Token i carries the value of position i − offset; a value past the last token marks the
    # end of the row.
    cells = [
        (t, vals[i - offset] if 0 <= i - offset < len(vals) else None) for i, t in enumerate(tokens)
    ]
    if len(vals) > len(tokens) - offset:
        cells.append((None, vals[len(tokens) - offset]))
    spans = []
    for token, value in cells:
        end = token is None or token in eos_tokens
        if end:
            text, breaks = END, False
            raw = "end of sequence" if token is None else token
        else:
            (text, breaks), raw = _visible(token), token
        label = repr(raw) if value is None else f"{raw!r}: {value:+.4g}"
        background = "transparent" if value is None else _colour(value, scale)
        spans.append(
            f'<span title="{html.escape(label, quote=True)}" style="background:{background};'
            f'border-radius:2px;padding:1px 0{";" + END_STYLE if end else ""}">{text}</span>'
            + ("<br>" if breaks else "")
        )
    body = (
        '<div style="font-family:monospace;line-height:1.9;white-space:pre-wrap;'
        'overflow-wrap:anywhere">' + "".join(spans) + "</div>"
    )
    if not legend:
        return body
    stops = "".join(
        f'<span style="background:{_colour(s * scale, scale)};padding:0 4px">{s * scale:+.3g}'
        "</span>"
        for s in (-1.0, -0.5, 0.0, 0.5, 1.0)
    )
    note = "red: lowers, blue: raises the query's log-probability"
    return f'<div style="font-family:monospace;font-size:smaller">{stops} ({note})</div>' + body
