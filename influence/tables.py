"""Scores as tables, and (prompt, completion) queries built from a tokenizer.

`top_influences` turns a [Q, N] score matrix into a pandas DataFrame of the k most (or least)
influential training examples per query, with the datasets' text and label columns beside
them; `prompt_completion_queries` tokenizes (prompt, completion) pairs into query batches whose
measurement is −log p(completion | prompt) (the prompt's labels are −100).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import checks
from .tasks import IGNORE_INDEX

# Columns shown by default: those whose values are text or a single label.
DEFAULT_COLUMNS = ("text", "prompt", "completion", "label", "labels", "source", "target")


def _column(data: Any, name: str, index: int) -> Any:
    """Value of column `name` of example `index` of `data`, or a KeyError."""
    if hasattr(data, "column_names") and hasattr(data, "select"):  # Hugging Face datasets
        if name not in data.column_names:
            raise KeyError(name)
        value = data.with_format(None)[int(index)][name]
    elif hasattr(data, "iloc") and hasattr(data, "columns"):  # pandas
        value = data.iloc[int(index)][name]
    elif isinstance(data, Mapping):
        value = data[name][int(index)]
    elif isinstance(data, Sequence) and not isinstance(data, str):
        row = data[int(index)]
        value = row[name] if isinstance(row, Mapping) else row
    else:
        raise KeyError(name)
    if torch.is_tensor(value):
        value = value.item() if value.numel() == 1 else value.tolist()
    return value


def _is_cell(value: Any) -> bool:
    """Whether a value reads as one table cell: a string or a single number (not token ids)."""
    if torch.is_tensor(value) or hasattr(value, "shape"):
        return getattr(value, "size", 2) == 1 or getattr(value, "ndim", 1) == 0
    return not isinstance(value, list | tuple | dict)


def _columns_of(data: Any, wanted: Sequence[str] | None) -> list[str]:
    if data is None:
        return []
    if wanted is not None:
        return list(wanted)
    if hasattr(data, "column_names"):
        names = list(data.column_names)
    elif hasattr(data, "columns"):
        names = list(data.columns)
    elif isinstance(data, Mapping):
        names = list(data)
    elif isinstance(data, Sequence) and data and isinstance(data[0], Mapping):
        names = list(data[0])
    elif isinstance(data, Sequence) and data and isinstance(data[0], str):
        return [""]  # a plain list of texts
    else:
        names = []
    # A language model's `labels` are token ids, one per position: not shown by default.
    return [n for n in names if n in DEFAULT_COLUMNS and _first_is_cell(data, n)]


def _first_is_cell(data: Any, name: str) -> bool:
    try:
        return _is_cell(_column(data, name, 0))
    except (KeyError, IndexError):
        return False


def top_influences(
    scores: torch.Tensor,
    k: int = 10,
    *,
    train_data: Any = None,
    query_data: Any = None,
    columns: Sequence[str] | None = None,
    query_columns: Sequence[str] | None = None,
    largest: bool = True,
    num_train: int | None = None,
):
    """The top-`k` training examples per query as a pandas DataFrame, one row per pair.

    Columns: `query` (query index), `rank` (1 = most influential), `train` (training index),
    `score`, `per_copy_linear_estimate` (score / N: the influence function's first-order,
    linear estimate of the change in the query's log-probability from one more copy of the
    training example, not a measured change; see docs/MATH.md), then `train_<col>` for each of
    `columns` of `train_data` and `query_<col>` for each of `query_columns` of `query_data`
    (default: those of the columns named text, prompt, completion, label(s), source, target
    whose values are text or single numbers, so a language model's token-id `labels` are left
    out; a plain list of texts gives `train_text` / `query_text`). `largest=False` lists the
    most negative (most harmful) scores instead. `num_train` is N when `scores` covers a
    subset of the data. NaN scores are left out of the ranking: a query with fewer than `k`
    other scores gets fewer rows.

    Data may be a Hugging Face `datasets.Dataset`, a pandas DataFrame, a dict of columns, a
    list of dicts, or a list of texts.
    """
    s = torch.as_tensor(scores).detach().double().cpu()
    if s.dim() != 2:
        raise ValueError(f"scores must be a [queries, train] matrix, got shape {list(s.shape)}")
    k = checks.positive_int("k", k)
    num_train = checks.positive_int("num_train", num_train, allow_none=True)
    n = s.shape[1] if num_train is None else num_train
    if n < s.shape[1]:
        raise ValueError(f"num_train={num_train} is below the {s.shape[1]} scored examples")
    # NaN last whichever way the ranking goes, then dropped (topk_table stops at the first).
    _, idx = s.nan_to_num(nan=-math.inf if largest else math.inf).topk(
        min(k, s.shape[1]), largest=largest
    )
    return topk_table(
        s.gather(1, idx),
        idx,
        num_train=n,
        train_data=train_data,
        query_data=query_data,
        columns=columns,
        query_columns=query_columns,
    )


def topk_table(
    values: torch.Tensor,
    idx: torch.Tensor,
    *,
    num_train: int,
    train_data: Any = None,
    query_data: Any = None,
    columns: Sequence[str] | None = None,
    query_columns: Sequence[str] | None = None,
):
    """The DataFrame of `top_influences` from each query's top scores `values` [Q, k] and
    their training indices `idx` [Q, k], best first (also what `GradientIndex.top_k` returns);
    a query's rows stop at its first NaN score."""
    import pandas as pd

    values, idx, n = values.detach().double().cpu(), idx.cpu(), int(num_train)
    train_cols = _columns_of(train_data, columns)
    query_cols = _columns_of(query_data, query_columns)
    rows = []
    for q in range(values.shape[0]):
        for r in range(values.shape[1]):
            m = int(idx[q, r])
            if math.isnan(float(values[q, r])):
                break
            row = {
                "query": q,
                "rank": r + 1,
                "train": m,
                "score": float(values[q, r]),
                "per_copy_linear_estimate": float(values[q, r]) / n,
            }
            for prefix, data, cols, i in (
                ("train", train_data, train_cols, m),
                ("query", query_data, query_cols, q),
            ):
                for c in cols:
                    try:
                        row[f"{prefix}_{c or 'text'}"] = _column(data, c, i)
                    except (KeyError, IndexError) as e:
                        arg = "columns" if prefix == "train" else "query_columns"
                        raise KeyError(
                            f"{prefix}_data has no column {c!r} (or no example {i}): pass the "
                            f"names of existing columns as `{arg}=`"
                        ) from e
            rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["query", "rank", "train", "score"])


def _special_prefix(tokenizer: Any, text: str) -> list[int]:
    """The special tokens the tokenizer puts before any text (a template `[BOS] $A [EOS]`
    gives [BOS]), read off its tokenization of `text` with and without special tokens."""
    with_special = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def prompt_completion_queries(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    add_special_tokens: bool = True,
    pad_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Query batch from (prompt, completion) pairs: the prompt's tokens are labelled −100, so
    the measurement of `LanguageModelingTask` is −log p(completion | prompt).

    The prompt gets the special tokens the tokenizer puts before a text (`add_special_tokens`,
    e.g. BOS; never those it puts after one, such as the EOS of a `[BOS] $A [EOS]` template,
    which would sit between prompt and completion); the completion is tokenized on its own
    without them (so the prompt's tokens are exactly the prompt's; give the completion its
    leading space, e.g. (" Paris")). An empty prompt without such a token starts with the
    tokenizer's BOS (else its EOS), so that the first completion token is predicted and
    counted. Rows are right-padded with `pad_token_id` (default: the tokenizer's pad, else its
    eos, else 0) and masked out. Returns a dict of tensors `input_ids`, `attention_mask`,
    `labels`.
    """
    if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], str):
        pairs = [pairs]
    if isinstance(pairs, str):
        raise TypeError(
            f"pairs is the string {pairs[:40]!r}: give a list of (prompt, completion) pairs"
        )
    if not pairs:
        raise ValueError("pairs is empty: give a list of (prompt, completion) strings")
    rows = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str):
            raise TypeError(
                f"pairs[{i}] is the string {pair[:40]!r}, not a (prompt, completion) pair: give "
                f"[(prompt, completion), ...], e.g. [({pair[:20]!r}, ' completion')]"
            )
        if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise TypeError(f"pairs[{i}] must be a (prompt, completion) pair of strings")
        prompt, completion = pair
        c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        if not c:
            raise ValueError(f"pairs[{i}]: the completion {completion!r} has no tokens")
        p = _special_prefix(tokenizer, completion) if add_special_tokens else []
        p += list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not p:
            start = getattr(tokenizer, "bos_token_id", None)
            start = getattr(tokenizer, "eos_token_id", None) if start is None else start
            if start is None:
                raise ValueError(
                    f"pairs[{i}] has an empty prompt and the tokenizer has no BOS or EOS token "
                    "to start from: the first completion token would have no position that "
                    "predicts it. Give a prompt."
                )
            p = [int(start)]
        rows.append((p + c, [IGNORE_INDEX] * len(p) + c))
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "eos_token_id", None)
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
