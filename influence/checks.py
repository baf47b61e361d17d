"""Argument and value checks shared by the public functions: every error names the argument
(or the example and layer) and says what to change, instead of failing deep inside torch.

Kept in one module so that the passes (`gradients`, `scores`, estimators) call them with one
line each.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# -- plain arguments ------------------------------------------------------------------------


def positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """`value` as an int ≥ 1 (or None when allowed); bools, floats and strings are refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        valid = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {valid}, got {value!r} ({type(value).__name__})")
    return int(value)


def integer(name: str, value: Any) -> int:
    """`value` as an int (seeds); bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def positive_float(name: str, value: Any) -> float:
    """`value` as a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def check_task(task: Any) -> None:
    from .tasks import Task

    if not isinstance(task, Task):
        hint = ""
        if isinstance(task, str):
            hint = (
                " (a task is an object, not a name: e.g. influence.LanguageModelingTask() or "
                "influence.ClassificationTask())"
            )
        raise TypeError(f"task must be an influence.Task, got {type(task).__name__}{hint}")


def check_not_meta(model: nn.Module, who: str) -> None:
    """Refuse a model whose parameters are on the meta device: they hold no values."""
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            f"{who}: the model's parameters are on the meta device, which holds shapes but no "
            "values: load its weights first (e.g. `model.to_empty(device='cpu')` then "
            "`load_state_dict`, or `from_pretrained` without a meta device). "
            "`influence.memory_plan` is the one function that works on a meta model."
        )


def check_device(device: Any) -> torch.device | None:
    """Parse `device` without touching any model; refuse the meta device (it has no data)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device must be None, 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device; got "
            f"{device!r} ({err})"
        ) from None
    if dev.type == "meta":
        raise ValueError(
            "device='meta' is refused: meta tensors hold no values, so the model's weights "
            "would be lost. Use 'cpu' or 'cuda'."
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use 'cpu'")
    return dev


# -- the caller's model ---------------------------------------------------------------------


@contextmanager
def restore_model_on_error(model: nn.Module) -> Iterator[None]:
    """If the body raises, put the model back as it was: each parameter's and buffer's device,
    every `requires_grad` flag and the train/eval mode of every module."""
    params = [(p, p.device, p.requires_grad) for p in model.parameters()]
    buffers = [
        (m, n, b.device) for m in model.modules() for n, b in m._buffers.items() if b is not None
    ]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for p, dev, rg in params:
                if p.device != dev:
                    p.data = p.data.to(dev)
                p.requires_grad_(rg)
            for m, n, dev in buffers:
                b = m._buffers.get(n)
                if b is not None and b.device != dev:
                    m._buffers[n] = b.to(dev)
        for m, training in modes:
            m.training = training
        raise


# -- batches --------------------------------------------------------------------------------


def _role(measurement: bool) -> str:
    return "query" if measurement else "training example"


def _roles(measurement: bool) -> str:
    return "queries" if measurement else "training examples"


def _config_limit(model: nn.Module, names: tuple[str, ...]) -> int | None:
    cfg = getattr(model, "config", None)
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _examples(rows: torch.Tensor, indices: torch.Tensor) -> list[int]:
    """Positions in `data` of rows of a batch (batches may come in length order)."""
    return indices[rows.cpu()].tolist()


def check_batch_values(
    model: nn.Module, batch: Any, indices: torch.Tensor, measurement: bool
) -> None:
    """Token ids inside the vocabulary and sequences no longer than the model's positions
    (where the model says: its input embedding and its config)."""
    if not isinstance(batch, Mapping) or not torch.is_tensor(batch.get("input_ids")):
        return
    ids = batch["input_ids"]
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get_emb):
        try:
            emb = get_emb()
        except (NotImplementedError, AttributeError):
            emb = None
    vocab = getattr(emb, "num_embeddings", None)
    if isinstance(vocab, int) and ids.numel():
        bad = ((ids < 0) | (ids >= vocab)).reshape(ids.shape[0], -1).any(1)
        if bool(bad.any()):
            rows = _examples(bad.nonzero().squeeze(1), indices)
            raise ValueError(
                f"input_ids of {_roles(measurement)} {rows[:5]} are outside the model's "
                f"vocabulary [0, {vocab}) (max id {int(ids.max())}): tokenize with the model's "
                "tokenizer or resize its embeddings"
            )
    labels = batch.get("labels")
    if (
        isinstance(vocab, int)
        and torch.is_tensor(labels)
        and labels.shape == ids.shape
        and labels.numel()
    ):
        bad = ((labels >= vocab) | ((labels < 0) & (labels != -100))).reshape(ids.shape[0], -1)
        if bool(bad.any()):
            rows = _examples(bad.any(1).nonzero().squeeze(1), indices)
            raise ValueError(
                f"labels of {_roles(measurement)} {rows[:5]} are outside the vocabulary "
                f"[0, {vocab}) and are not −100 (ignored): fix the labels"
            )
    limit = _config_limit(model, ("max_position_embeddings", "n_positions", "n_ctx"))
    if limit is not None and ids.dim() == 2 and ids.shape[1] > limit:
        raise ValueError(
            f"sequences of the {_roles(measurement)} {indices.tolist()[:5]} have {ids.shape[1]} "
            f"tokens, more than the model's {limit} positions: truncate them to at most {limit}"
        )


def check_counted_tokens(task: Any, batch: Any, indices: torch.Tensor, measurement: bool) -> None:
    """Examples whose loss counts nothing (every label −100) have no loss: their gradients
    are zero and their scores meaningless (and data made only of them gives zero curvature
    and damping). Named, with what to do (`task.uncounted`)."""
    per_example = task.counted(batch)
    if per_example is not None and not bool(per_example.all()):
        rows = _examples((~per_example).nonzero().squeeze(1), indices)
        raise ValueError(f"{_roles(measurement)} {rows[:10]} have {task.uncounted}.")


def _first_bad_row(x: torch.Tensor) -> int | None:
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        # Fast path, a reduction without a mask the size of x: a NaN/Inf anywhere makes the
        # sum non-finite (an overflowing sum of finite values only costs the exact check).
        return None
    ok = torch.isfinite(x).reshape(x.shape[0], -1).all(1)
    if bool(ok.all()):
        return None
    return int((~ok).nonzero()[0, 0])


def check_finite_weights(layers: Mapping[str, nn.Module]) -> None:
    """NaN/Inf in a tracked layer's weight or bias: every score would be NaN."""
    for name, module in layers.items():
        for pname, p in module.named_parameters(recurse=False):
            if not bool(torch.isfinite(p.detach()).all()):
                raise FloatingPointError(
                    f"NaN or Inf in the {pname} of layer {name!r}: every curvature and score "
                    "would be NaN. Load finite weights (a diverged training run, or an overflow "
                    "in half precision, are the usual causes)."
                )


def finite_terms(
    terms: Mapping[str, tuple],
    masks: Mapping[str, torch.Tensor | None],
    indices: torch.Tensor,
    measurement: bool,
) -> dict[str, tuple]:
    """`terms`, checked for NaN/Inf in each layer's inputs and output gradients.

    A non-finite value at a padded position (mask 0: e.g. a row of attention over padding
    only) is no error, since no real token reads it: it is set to 0, so that it cannot turn a
    per-example gradient into NaN. One at a real position raises, naming example and layer."""
    out = dict(terms)
    cleaned: dict[int, torch.Tensor] = {}  # layers that share an input share its cleaned copy
    seen: set[int] = set()
    for name, (a, g) in terms.items():
        mask = masks.get(name)
        fixed = []
        for what, x in (("inputs", a), ("output gradients", g)):
            if id(x) in cleaned:
                fixed.append(cleaned[id(x)])
                continue
            if id(x) in seen or _first_bad_row(x) is None:
                seen.add(id(x))
                fixed.append(x)
                continue
            bad = ~torch.isfinite(x).reshape(*x.shape[:2], -1).all(-1)  # [B, T]
            if mask is not None and not bool((bad & mask).any()):
                cleaned[id(x)] = torch.where(mask.unsqueeze(-1), x, x.new_zeros(()))
                fixed.append(cleaned[id(x)])
                continue
            real_bad = bad if mask is None else bad & mask
            row = int(real_bad.any(1).nonzero()[0, 0])
            raise FloatingPointError(
                f"NaN or Inf in the {what} of layer {name!r} for {_role(measurement)} "
                f"{int(indices[row])}: its curvature terms and scores would be NaN. Check that "
                "example's inputs, and the model's weights and loss (half precision or a "
                "diverged model are the usual causes)."
            )
        out[name] = (fixed[0], fixed[1])
    return out


def check_finite_queries(
    pre: Mapping[str, Any], damping: Mapping[str, float] | None = None
) -> None:
    """NaN/Inf in preconditioned query gradients {layer: [Q, ...] or LowRank}. The gradients
    were finite (checked as captured), so the preconditioning overflowed: (G + λI)⁻¹ scales
    them by up to 1/λ, which half precision may not hold."""
    for name, p in pre.items():
        for x in (p.u, p.s, p.v) if hasattr(p, "u") else (p,):
            row = _first_bad_row(x)
            if row is not None:
                lam = (damping or {}).get(name)
                scale = f"up to 1/λ = {1 / lam:.3g} for λ = {lam:.3g}" if lam else "1/λ"
                raise FloatingPointError(
                    f"the preconditioned gradient of query {row} at layer {name!r} overflows "
                    f"{x.dtype} (largest {torch.finfo(x.dtype).max:.5g}): (G + λI)⁻¹ scales the "
                    f"gradient by {scale}. Run the model in float32 or float64, or raise the "
                    "damping."
                )


def check_finite_scores(scores: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
    """NaN/Inf in [Q, N, ...] scores (a dict by layer, or the total): name the pair."""
    items = scores.items() if isinstance(scores, Mapping) else [("total", scores)]
    for name, s in items:
        bad = ~torch.isfinite(s)
        if bool(bad.any()):
            idx = bad.nonzero()[0].tolist()
            pair = (
                f"query {idx[0]} and training example {idx[1]}"
                if s.dim() >= 2
                else f"training example {idx[0]}"
            )
            where = "all layers summed" if name == "total" else f"layer {name!r}"
            raise FloatingPointError(
                f"the score of {pair} is {s[tuple(idx)].item()} ({where}): an overflow in the "
                "product of gradients; rescale the loss or use float64"
            )


def check_finite_rhs(flat: torch.Tensor, infos: Mapping[str, Any], solver: str) -> None:
    """CG and LiSSA right-hand sides [Q, P]: a NaN query is an error, never 'no influence'."""
    row = _first_bad_row(flat)
    if row is None:
        return
    start = 0
    layer = "?"
    bad_cols = ~torch.isfinite(flat[row])
    for n, info in infos.items():
        if bool(bad_cols[start : start + info.numel].any()):
            layer = n
            break
        start += info.numel
    raise FloatingPointError(
        f"{solver}: the gradient of query {row} has NaN or Inf at layer {layer!r}; the solve "
        "needs finite right-hand sides. Check the query's inputs and the model's weights."
    )


def check_damping_values(damping: Mapping[str, float], who: str) -> None:
    """Resolved per-layer damping must be positive and finite."""
    bad = {n: v for n, v in damping.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(
            f"{who}: the resolved damping must be positive and finite for every layer; got "
            f"{bad}. With 'auto' this means the layer has no curvature on the fitting data (no "
            "counted tokens, or a dead layer): pass a positive float or a dict {layer: λ}."
        )


def restores_model(fn):
    """Decorator for public functions whose first argument is the model: validate it, and
    leave it as it was (device, `requires_grad`, mode) when the call raises."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        check_model(model)
        check_not_meta(model, fn.__name__)
        with restore_model_on_error(model):
            return fn(model, *args, **kwargs)

    return wrapper


def check_score_args(
    *,
    batch_size: Any,
    device: Any,
    progress: Any,
    rank: Any = None,
    query_batch_size: Any = None,
    by_layer: Any = False,
    by_token: Any = False,
) -> None:
    """The common keyword arguments of the scoring functions."""
    positive_int("batch_size", batch_size)
    positive_int("rank", rank, allow_none=True)
    positive_int("query_batch_size", query_batch_size, allow_none=True)
    check_device(device)
    boolean("progress", progress)
    boolean("by_layer", by_layer)
    boolean("by_token", by_token)


def module_names(modules: Any) -> list[str]:
    """A `modules=` selector that is neither None, a string nor a predicate: a list of names."""
    valid = (
        "use None (all linear layers), 'mlp', a list of module names, or a predicate "
        "(name, module) -> bool"
    )
    try:
        names = list(modules)
    except TypeError:
        raise TypeError(f"modules={modules!r} is not a valid selector: {valid}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"modules must hold module names (str); got {bad[:3]}: {valid}")
    return names
