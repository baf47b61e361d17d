"""TF-IDF (BM25) filtering of training sequences, as in Grosse et al. 2023 (§3.2).

Scoring every training sequence against a query is the expensive part of influence; the paper
first keeps the top-m training sequences by a BM25 variant (k1 = 1.5, binary term frequency)
over the model's tokens and computes influences on those only. It warns that the filter biases
the results toward sequences that share tokens with the query; `candidate_recall` and
`shares_content_tokens` measure that.

    cand = bm25_candidates(query_rows, train_rows, m=1000, ignore_ids=tok.all_special_ids)
    recall = candidate_recall(true_top10, cand)                        # [Q], per query

The score, with binary term frequency (the default), is Lucene's BM25 on token *sets*:

    score(q, d) = sum over t in set(q) & set(d) of  idf(t) / (1 + k1 (1 - b + b |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

with N training sequences, df(t) the number of them that contain t, |d| the number of
*distinct* counted tokens of d and avgdl its mean over the training sequences. Treating a
sequence as a set makes repetition irrelevant everywhere: repeating a token in a query or a
sequence changes no score (a raw token count as |d| would still let repetition move the
length normalisation). With `binary_tf=False` it is the usual Lucene BM25 on counts, tf(t, d)
/ (tf(t, d) + k1 (1 - b + b |d| / avgdl)) per query occurrence of t, with |d| = token count.
Lucene's form has no (k1 + 1) factor in the numerator; that constant does not change rankings.

The index and scores come from `bm25s` (a maintained, numpy-only BM25 package with a sparse,
precomputed score matrix, so a query costs one sparse column sum rather than a pass over the
corpus in Python as with `rank-bm25`, whose last release was in 2022). bm25s counts term
frequencies itself and has no binary mode, so for binary tf each sequence is indexed as its
sorted set of token ids: every tf is then 1 and |d| is the number of distinct tokens, which is
exactly the formula above. Queries are likewise reduced to their sets (bm25s would add a
repeated query token twice). Scores are computed in float64.

Which tokens count: token ids >= 0, minus `ignore_ids`. Inputs may be lists of token-id lists,
a 2-D integer tensor (negative entries such as -100 are skipped, so padded label tensors work)
or a batch mapping with "input_ids" and optional "attention_mask" (positions with mask 0 are
skipped). For the study's queries pass the `input_ids`/`attention_mask` of `query_dataset`, not
its labels: like the paper, the filter uses the prompt and the completion. Pass the special
token ids (pad, bos, eos) as `ignore_ids`; they occur in every sequence and carry no content.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence

import torch

TokenInput = Sequence[Sequence[int]] | torch.Tensor | Mapping[str, torch.Tensor]

__all__ = ["bm25_candidates", "bm25_scores", "candidate_recall", "shares_content_tokens"]


def _import_bm25s():
    try:
        import bm25s
    except ImportError as e:  # pragma: no cover - bm25s is a core dependency
        raise ImportError(
            "influence.filtering needs the `bm25s` package: `pip install bm25s` "
            "(or reinstall influence, which depends on it)."
        ) from e
    return bm25s


def _ids_of_row(row, label: str) -> list[int]:
    if isinstance(row, torch.Tensor):
        if row.dim() != 1 or row.dtype.is_floating_point or row.dtype == torch.bool:
            raise ValueError(
                f"{label} must be a 1-D integer tensor, got {row.dtype} {tuple(row.shape)}"
            )
        return row.tolist()
    if isinstance(row, str | bytes) or not isinstance(row, Iterable):
        raise TypeError(f"{label} must be a sequence of integer token ids, got {type(row)}")
    ids = []
    for t in row:
        try:
            if isinstance(t, bool):
                raise TypeError
            ids.append(operator.index(t))
        except TypeError:
            raise TypeError(f"{label} contains {t!r}; token ids must be integers") from None
    return ids


def _token_lists(tokens: TokenInput, name: str) -> list[list[int]]:
    """Rows of counted token ids (order and repetitions kept; negative ids and masked-out
    positions dropped)."""
    if isinstance(tokens, Mapping):
        if "input_ids" not in tokens:
            raise ValueError(f"{name} is a mapping without 'input_ids' (keys: {list(tokens)})")
        ids = torch.as_tensor(tokens["input_ids"])
        if ids.dim() != 2:
            raise ValueError(f"{name}['input_ids'] must be 2-D [rows, T], got {tuple(ids.shape)}")
        mask = tokens.get("attention_mask")
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.shape != ids.shape:
                raise ValueError(
                    f"{name}['attention_mask'] has shape {tuple(mask.shape)}, "
                    f"input_ids {tuple(ids.shape)}; they must match"
                )
            ids = ids.masked_fill(mask == 0, -1)
        tokens = ids
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(
                f"{name} as a tensor must be 2-D integer [rows, T], got "
                f"{tokens.dtype} {tuple(tokens.shape)}"
            )
        rows = tokens.tolist()
    elif isinstance(tokens, str | bytes) or not isinstance(tokens, Iterable):
        raise TypeError(
            f"{name} must be a list of token-id lists, a 2-D integer tensor or a mapping with "
            f"'input_ids', got {type(tokens)}"
        )
    else:
        rows = [_ids_of_row(r, f"{name}[{i}]") for i, r in enumerate(tokens)]
    if len(rows) == 0:
        raise ValueError(f"{name} is empty; give at least one sequence")
    return [[t for t in r if t >= 0] for r in rows]


def _content(ids: Iterable[int], ignore: set[int]) -> list[int]:
    return [t for t in ids if t not in ignore]


def _check_bm25_params(k1: float, b: float) -> None:
    if not k1 >= 0:
        raise ValueError(f"k1 must be >= 0, got {k1}")
    if not 0 <= b <= 1:
        raise ValueError(f"b must be in [0, 1], got {b}")


def bm25_scores(
    query_tokens: TokenInput,
    train_tokens: TokenInput,
    *,
    k1: float = 1.5,
    b: float = 0.75,
    binary_tf: bool = True,
    ignore_ids: Iterable[int] = (),
    progress: bool = False,
) -> torch.Tensor:
    """BM25 score of every training sequence for every query: float64 tensor [Q, N].

    See the module docstring for the formula and for which tokens count. Raises ValueError for
    empty inputs, a query with no counted token, or a corpus without any counted token.
    """
    _check_bm25_params(k1, b)
    ignore = {int(t) for t in ignore_ids}
    queries = [_content(r, ignore) for r in _token_lists(query_tokens, "query_tokens")]
    docs = [_content(r, ignore) for r in _token_lists(train_tokens, "train_tokens")]
    for i, q in enumerate(queries):
        if not q:
            raise ValueError(
                f"query_tokens[{i}] has no counted token (ids >= 0, not masked, not in "
                "ignore_ids); drop it or ignore fewer ids"
            )
    if not any(docs):
        raise ValueError(
            "train_tokens has no counted token at all (ids >= 0, not masked, not in ignore_ids)"
        )
    if binary_tf:
        # bm25s counts tf itself: indexing each sequence as its set makes every tf 1 and
        # |d| the number of distinct tokens (see the module docstring).
        docs = [sorted(set(d)) for d in docs]
        queries = [sorted(set(q)) for q in queries]

    bm25s = _import_bm25s()
    # Map token ids to contiguous 0..V-1 ourselves and pass (ids, vocab): bm25s indexes raw
    # integer lists as if their ids were already contiguous.
    vocab = {t: j for j, t in enumerate(sorted({t for d in docs for t in d}))}
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene", dtype="float64", int_dtype="int64")
    retriever.index(
        ([[vocab[t] for t in d] for d in docs], vocab),
        create_empty_token=False,
        show_progress=progress,
    )
    out = torch.empty(len(queries), len(docs), dtype=torch.float64)
    for i, q in enumerate(queries):
        # A query token absent from the corpus matches no sequence: it adds 0 to every score.
        ids = [vocab[t] for t in q if t in vocab]
        out[i] = torch.from_numpy(retriever.get_scores_from_ids(ids).astype("float64"))
    return out


def _top_m(scores: torch.Tensor, m: int) -> torch.Tensor:
    n = scores.shape[1]
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"m must be an integer in [1, {n}] (the number of training sequences)")
    # Stable sort on the negated scores: ties go to the lower training index, deterministically.
    return torch.sort(-scores, dim=1, stable=True).indices[:, :m].contiguous()


def bm25_candidates(
    query_tokens: TokenInput,
    train_tokens: TokenInput,
    m: int,
    *,
    k1: float = 1.5,
    b: float = 0.75,
    binary_tf: bool = True,
    ignore_ids: Iterable[int] = (),
    progress: bool = False,
) -> torch.Tensor:
    """Indices of the top-m training sequences by BM25 for each query: LongTensor [Q, m].

    Rows are sorted by decreasing score; equal scores are ordered by training index (lower
    first). Defaults are the paper's filter (k1 = 1.5, binary term frequency); b = 0.75 is the
    usual BM25 default. See `bm25_scores` for the arguments.
    """
    scores = bm25_scores(
        query_tokens,
        train_tokens,
        k1=k1,
        b=b,
        binary_tf=binary_tf,
        ignore_ids=ignore_ids,
        progress=progress,
    )
    return _top_m(scores, m)


def _index_matrix(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{name} must be a 2-D integer tensor [Q, k], got {tuple(x.shape)}")
    return x.long()


def candidate_recall(
    true_top: torch.Tensor, candidates: torch.Tensor, where: torch.Tensor | None = None
) -> torch.Tensor:
    """Per query, the fraction of the true top influences found among the candidates.

    `true_top` [Q, k] holds each query's most influential training indices (distinct per row),
    `candidates` [Q, m] the filter's indices. With a bool mask `where` [Q, k], only the marked
    true-top entries count (e.g. those that share content tokens with the query); a query with
    none marked gets NaN. Returns float64 [Q].
    """
    true_top = _index_matrix(true_top, "true_top")
    candidates = _index_matrix(candidates, "candidates")
    if true_top.shape[0] != candidates.shape[0]:
        raise ValueError(
            f"true_top has {true_top.shape[0]} queries, candidates {candidates.shape[0]}"
        )
    if where is None:
        where = torch.ones_like(true_top, dtype=torch.bool)
    where = torch.as_tensor(where)
    if where.shape != true_top.shape or where.dtype != torch.bool:
        raise ValueError(
            f"where must be a bool tensor shaped like true_top {tuple(true_top.shape)}, "
            f"got {where.dtype} {tuple(where.shape)}"
        )
    recall = torch.empty(true_top.shape[0], dtype=torch.float64)
    for i, (top, cand, w) in enumerate(zip(true_top, candidates, where, strict=True)):
        if top.unique().numel() != top.numel():
            raise ValueError(f"true_top[{i}] repeats an index; its entries must be distinct")
        hits = torch.isin(top, cand) & w
        recall[i] = hits.sum().double() / w.sum() if w.any() else float("nan")
    return recall


def shares_content_tokens(
    query: Sequence[int] | torch.Tensor,
    sequence: Sequence[int] | torch.Tensor,
    stopwords: Iterable[int] = (),
) -> bool:
    """Whether `query` and `sequence` have a content token in common.

    A content token is any token id >= 0 not in `stopwords` (pass the special tokens and the
    ids of function words and punctuation, e.g. those of `bm25s.stopwords.STOPWORDS_EN`). This
    splits influential sequences into those a token-overlap filter can find and those it cannot.
    """
    stop = {int(t) for t in stopwords}
    q = {t for t in _ids_of_row(query, "query") if t >= 0} - stop
    s = {t for t in _ids_of_row(sequence, "sequence") if t >= 0} - stop
    return not q.isdisjoint(s)
