"""Which layers of a model are tracked, and what shape their weights have.

Every tracked layer is affine, s = W a + b. Internally its gradient is always an
(out × in') matrix, in' = in + 1 when the layer has a bias (the bias is the last column),
whatever the module's own weight layout (Hugging Face's GPT-2 `Conv1D` stores W transposed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import checks

ModuleSelector = None | str | Sequence[str] | Callable[[str, nn.Module], bool]

# Name components that mark a feed-forward (MLP) block in common architectures: Llama-style
# `mlp`, `feed_forward`, DistilBERT `ffn`, T5 `DenseReluDense`, BERT `intermediate`/`output`.
MLP_NAME_PARTS = ("mlp", "feed_forward", "ffn", "densereludense")
# BERT-style blocks: `intermediate.dense` and `output.dense` (a parent component, not the layer).
MLP_PARENT_PARTS = ("intermediate", "output")
# Last name components of MLP layers that sit directly in a block (OPT, BART: fc1, fc2).
MLP_LAYER_NAMES = ("fc1", "fc2")
# Name components that mark attention (never MLP): BERT's attention block also has an `output`.
ATTENTION_NAME_PARTS = ("attn", "attention")


@dataclass(frozen=True)
class LayerInfo:
    """Shape facts of one tracked layer."""

    name: str
    out_features: int
    in_features: int
    bias: bool
    transposed: bool  # True for Hugging Face Conv1D (weight stored as in × out)

    @property
    def in_dim(self) -> int:
        """Columns of the internal gradient matrix: inputs plus one for the bias."""
        return self.in_features + int(self.bias)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_dim)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_dim


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_supported(module: nn.Module) -> bool:
    """A module the library can track: `nn.Linear` or Hugging Face `Conv1D`."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def layer_info(name: str, module: nn.Module) -> LayerInfo:
    if isinstance(module, nn.Linear):
        return LayerInfo(
            name, module.out_features, module.in_features, module.bias is not None, False
        )
    if _is_conv1d(module):
        n_in, n_out = module.weight.shape
        return LayerInfo(name, n_out, n_in, module.bias is not None, True)
    raise TypeError(
        f"module {name!r} is a {type(module).__name__}; only nn.Linear and transformers Conv1D "
        "layers can be tracked"
    )


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except (NotImplementedError, AttributeError):
            return None
    return None


def _is_mlp_name(name: str) -> bool:
    parts = name.lower().split(".")
    if any(a in p for p in parts for a in ATTENTION_NAME_PARTS):
        return False
    if parts[-1] in MLP_LAYER_NAMES:
        return True
    if any(p in MLP_PARENT_PARTS for p in parts[:-1]):
        return True
    return any(p in MLP_NAME_PARTS or p.startswith(MLP_NAME_PARTS[:3]) for p in parts)


def find_layers(model: nn.Module, modules: ModuleSelector = None) -> dict[str, nn.Module]:
    """Return the tracked layers of `model`, by qualified name, in module order.

    `modules`:
      - None: every nn.Linear / Conv1D except the output embedding (`lm_head`);
      - "mlp": the feed-forward layers among the above: names with a component "mlp",
        "feed_forward", "ffn", "DenseReluDense" (T5), "intermediate" or "output" (BERT), or
        ending in "fc1"/"fc2" (OPT, BART), never a name with "attn"/"attention" in it;
      - a list of qualified module names;
      - a predicate `(name, module) -> bool` over the supported layers.
    """
    out_emb = _output_embedding(model)
    candidates = {
        n: m
        for n, m in model.named_modules()
        if is_supported(m) and m is not out_emb and n.split(".")[-1] != "lm_head"
    }
    if modules is None:
        chosen = candidates
    elif isinstance(modules, str):
        if modules != "mlp":
            raise ValueError(
                f"unknown module selector {modules!r}: use None (all linear layers), 'mlp', "
                "a list of module names, or a predicate (name, module) -> bool"
            )
        chosen = {n: m for n, m in candidates.items() if _is_mlp_name(n)}
    elif callable(modules):
        all_supported = {n: m for n, m in model.named_modules() if is_supported(m)}
        chosen = {n: m for n, m in all_supported.items() if modules(n, m)}
    else:
        names = checks.module_names(modules)
        named = dict(model.named_modules())
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(
                f"modules {missing} are not in the model; some valid names: {list(candidates)[:8]}"
            )
        bad = [n for n in names if not is_supported(named[n])]
        if bad:
            raise ValueError(
                f"modules {bad} are not nn.Linear or Conv1D layers and cannot be tracked"
            )
        chosen = {n: named[n] for n in names}
    if not chosen:
        raise ValueError(
            f"no trackable layers in {type(model).__name__} with modules={modules!r}: the library "
            "tracks nn.Linear and transformers Conv1D layers (the output embedding excluded by "
            "default). Pass modules=None, a list of layer names, or a predicate."
        )
    return chosen


def _extent(p: torch.Tensor) -> tuple[int, int]:
    """The bytes [start, end) of its storage that tensor `p` covers."""
    size = p.element_size()
    start = p.storage_offset() * size
    span = sum((n - 1) * st for n, st in zip(p.shape, p.stride(), strict=True)) + 1
    return start, start + (span if p.numel() else 0) * size


def check_unshared(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Refuse tracked layers whose weight or bias is held by another module too (tied weights:
    the same Parameter, or overlapping memory of one storage).

    A shared parameter's gradient sums every use of it, while the library sees only the
    tracked layers' inputs and output gradients: its scores would be those of a part of the
    gradient (GPT-2's `lm_head` is tied to the input embedding)."""
    # Every (name, holding module) of each parameter: one module registered under two names
    # is not sharing, another module holding the same parameter (or its memory) is.
    holders: dict[int, list[tuple[str, int]]] = {}
    by_storage: dict[int, list[tuple[str, int, torch.Tensor]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            holders.setdefault(id(p), []).append((name, id(m)))
            # Meta tensors have no memory to share; FSDP's flat parameter holds every
            # original parameter's memory by design.
            if not p.is_meta and type(p).__name__ != "FlatParameter":
                ptr = p.untyped_storage().data_ptr()
                by_storage.setdefault(ptr, []).append((name, id(m), p))
    problems = []
    for layer, module in layers.items():
        for pname, p in module.named_parameters(recurse=False):
            others = [h for h, owner in holders[id(p)] if owner != id(module)]
            if not p.is_meta:
                lo, hi = _extent(p)
                for name, owner, q in by_storage.get(p.untyped_storage().data_ptr(), []):
                    q_lo, q_hi = _extent(q)
                    overlap = q is not p and lo < q_hi and q_lo < hi
                    if overlap and owner != id(module) and name not in others:
                        others.append(name)
            if not others:
                continue
            other_layers = [
                h.rsplit(".", 1)[0] for h in others if h.rsplit(".", 1)[0] in layers.keys()
            ]
            if other_layers:
                pair = sorted({layer, *other_layers})
                problems.append(f"{' and '.join(map(repr, pair))} share their {pname}")
            else:
                problems.append(f"{layer!r} shares its {pname} with {others[0]!r}")
    if problems:
        unique = list(dict.fromkeys(problems))
        raise ValueError(
            "tracked layers hold tied (shared) parameters: "
            + "; ".join(unique[:5])
            + ". A shared parameter's gradient sums all its uses, but only the tracked layers' "
            "inputs and output gradients are seen, so its scores would be those of a part of "
            "its gradient. Leave these layers out with the task's `modules=` argument (the "
            "default already leaves out the output embedding), or untie the weights (e.g. "
            "`tie_word_embeddings=False` in a Hugging Face config)."
        )


def layer_infos(layers: dict[str, nn.Module]) -> dict[str, LayerInfo]:
    return {n: layer_info(n, m) for n, m in layers.items()}


def weight_gradient(info: LayerInfo, module: nn.Module) -> torch.Tensor:
    """The module's current .grad in the internal (out × in') layout (for tests and brute force)."""
    w = module.weight.grad
    if w is None:
        raise ValueError(f"layer {info.name!r} has no gradient")
    w = w.T if info.transposed else w
    if info.bias:
        w = torch.cat([w, module.bias.grad.unsqueeze(1)], dim=1)
    return w


def check_layers_match(expected: dict[str, LayerInfo], model_layers: dict[str, LayerInfo]) -> None:
    """Raise a clear error when fitted factors do not belong to the model's tracked layers."""
    missing = [n for n in expected if n not in model_layers]
    extra = [n for n in model_layers if n not in expected]
    if missing or extra:
        raise ValueError(
            "the estimator was fitted on other layers than the model/task now tracks: "
            f"missing in model {missing[:5]}, not fitted {extra[:5]}. Fit the estimator on this "
            "model, or pass the same `modules=` to the task."
        )
    wrong = [
        f"{n}: fitted {expected[n].shape}, model {model_layers[n].shape}"
        for n in expected
        if expected[n].shape != model_layers[n].shape
    ]
    if wrong:
        raise ValueError(
            "the estimator was fitted for a model with other layer shapes: "
            + "; ".join(wrong[:5])
            + ". Fit it again on this model."
        )
