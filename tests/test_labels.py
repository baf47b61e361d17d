"""Labels: ignored ones (−100) and wrong shapes are named, `label` columns are accepted.

An example whose loss counts nothing (a classification label −100, a sequence with every label
−100) has no loss and no gradient: it is refused by name, for every task, at fit and at
scoring (a classification −100 used to give an all-zero row or column of scores, while a
language model raised). A one-class head (`num_labels=1`) with cross-entropy has a loss of 0
and gave all-zero scores; labels of the wrong shape gave torch's shape errors.
"""

from __future__ import annotations

import pytest
import torch
from brute_force import classification_data, lm_data, tiny_llama, tiny_mlp

import influence as inf
from tests.test_padding_invariance import bert_regressor
from tests.test_tasks_hf import classifier, cls_batch, s2s_batch, seq2seq

datasets = pytest.importorskip("datasets")


def _ignored(labels: torch.Tensor, rows) -> torch.Tensor:
    labels = labels.clone()
    labels[list(rows)] = -100
    return labels


def test_classification_label_minus_100_is_refused_by_name():
    model, task = tiny_mlp(), inf.ClassificationTask()
    x, y = classification_data(10)
    bad = (x, _ignored(y, [3, 7]))
    est = inf.Identity().fit(model, task, (x, y), progress=False)
    match = r"training examples \[3, 7\] have label −100, which cross-entropy ignores"
    with pytest.raises(ValueError, match=match):
        inf.EKFAC().fit(model, task, bad, progress=False)
    with pytest.raises(ValueError, match=match):
        inf.pairwise_scores(model, task, est, (x, y), bad, progress=False)
    with pytest.raises(ValueError, match=r"queries \[3, 7\] have label −100"):
        inf.pairwise_scores(model, task, est, bad, (x, y), progress=False)
    # The same for a sequence classifier's dict batches, and for seq2seq targets.
    bert, seq_task = classifier("bert"), inf.SequenceClassificationTask()
    batch = cls_batch()
    batch["labels"] = _ignored(batch["labels"], [1])
    with pytest.raises(ValueError, match=r"training examples \[1\] have label −100"):
        inf.KFAC().fit(bert, seq_task, batch, progress=False)
    s2s = s2s_batch()
    s2s["labels"][2] = -100
    with pytest.raises(ValueError, match=r"training examples \[2\] have no counted target"):
        inf.KFAC().fit(seq2seq("t5"), inf.Seq2SeqLMTask(), s2s, progress=False)


def test_one_class_head_with_cross_entropy_is_refused():
    model = bert_regressor()  # num_labels=1
    batch = cls_batch(token_types=False)
    batch["labels"] = torch.zeros(len(batch["labels"]), dtype=torch.long)
    with pytest.raises(ValueError, match=r"num_labels=1: cross-entropy over one class.*Regressi"):
        inf.EKFAC().fit(model, inf.SequenceClassificationTask(), batch, progress=False)
    # The regression reading of the same head works, with float labels.
    batch["labels"] = torch.randn(len(batch["labels"]), dtype=torch.float64)
    inf.EKFAC().fit(model, inf.RegressionTask(), batch, progress=False)


@pytest.mark.parametrize(
    ("task", "labels", "match"),
    [
        (inf.ClassificationTask(), lambda y: y[:, None], r"integer class labels.*\[10, 1\]"),
        (inf.ClassificationTask(), lambda y: y.double(), r"integer class labels.*float64"),
        (inf.ClassificationTask(), lambda y: y[:5], r"tuple data.*lengths \[10, 5\]"),
        (inf.ClassificationTask(), lambda y: y + 3, r"labels \[3, 4, 5\] are outside .*\[0, 3\)"),
        (inf.RegressionTask(), lambda y: torch.zeros(10, 2), r"targets' shape \[10, 2\] does not"),
    ],
)
def test_labels_of_the_wrong_shape_or_range_are_named(task, labels, match):
    model, (x, y) = tiny_mlp(), classification_data(10)
    est = inf.Identity().fit(model, task, (x, y.double() if "Regr" in str(task) else y))
    data = (x, labels(y))
    with pytest.raises(ValueError, match=match):
        inf.pairwise_scores(model, task, est, data, data, progress=False)


def test_language_model_labels_must_follow_the_tokens():
    model, task, data = tiny_llama(), inf.LanguageModelingTask(), lm_data(6)
    bad = {**data, "labels": data["labels"][:, :3]}
    with pytest.raises(ValueError, match=r"labels of shape \[6, 3\] do not match input_ids"):
        inf.EKFAC().fit(model, task, bad, progress=False)


def test_a_label_column_is_read_as_labels():
    """Hugging Face datasets call the class column `label`: the same scores as `labels`."""
    model, task = classifier("distilbert"), inf.SequenceClassificationTask()
    batch = cls_batch(token_types=False)
    rows = {k: v.tolist() for k, v in batch.items()}
    as_labels = datasets.Dataset.from_dict(rows)
    rows["label"] = rows.pop("labels")
    as_label = datasets.Dataset.from_dict(rows)
    got = []
    for data in (as_labels, as_label):
        est = inf.EKFAC().fit(model, task, data, progress=False)
        got.append(inf.pairwise_scores(model, task, est, data, data, progress=False))
    assert torch.equal(got[0], got[1])
