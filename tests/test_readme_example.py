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


def _block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README should have one example using {marker}"
    return found[0]


def test_readme_classifier_example_runs(capsys):
    scope: dict = {}
    exec(compile(_block("SequenceClassificationTask"), "README.md", "exec"), scope)  # noqa: S102
    scores, table = scope["scores"], scope["table"]
    assert scores.shape == (2, 32) and torch.isfinite(scores).all()
    # Each query is a training text: its own copy is the most helpful training example.
    assert scores.argmax(dim=1).tolist() == [0, 1]
    assert table["train"].tolist()[::3] == [0, 1] and table["rank"].tolist() == [1, 2, 3] * 2
    assert table["per_copy_linear_estimate"].tolist() == [v / 32 for v in table["score"].tolist()]
    assert table["train_text"].tolist()[0] == "text 0"
    assert "per_copy_linear_estimate" in capsys.readouterr().out


def test_readme_seq2seq_example_runs(capsys):
    scope: dict = {}
    exec(compile(_block("Seq2SeqLMTask"), "README.md", "exec"), scope)  # noqa: S102
    scores = scope["scores"]
    assert scores.shape == (2, 32) and torch.isfinite(scores).all()
    assert scores.argmax(dim=1).tolist() == [0, 1]
    assert "tensor(" in capsys.readouterr().out


def test_readme_index_example_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes its index folder where it runs
    scope: dict = {}
    exec(compile(_block("GradientIndex.build"), "README.md", "exec"), scope)  # noqa: S102
    table, index = scope["table"], scope["index"]
    assert index.num_examples == 256 and index.bytes_per_example == 256 * 2 * 8  # 8 layers
    assert table["rank"].tolist() == [1, 2, 3, 4, 5] * 2
    # Each query is the second half of a training sequence: that sequence is found first.
    assert table.groupby("query")["train"].first().tolist() == [0, 1]
    assert (tmp_path / "corpus.index" / "manifest.json").exists()
    assert "per_copy_linear_estimate" in capsys.readouterr().out
