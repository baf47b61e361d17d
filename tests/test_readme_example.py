"""The README's example of scoring a Hugging Face model runs and returns what it says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102
    scores = scope["scores"]
    assert scores.shape == (2, 64) and torch.isfinite(scores).all()
    # The query's completion is the training sequence's own second half: the sequence it was
    # cut from must be among its most helpful.
    top = scores.topk(5, dim=1).indices
    assert 0 in top[0] and 1 in top[1]
    assert "tensor(" in capsys.readouterr().out
