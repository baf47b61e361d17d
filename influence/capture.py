"""Capture each tracked layer's inputs and output gradients in one forward and one backward.

Per-example and per-token gradients of a linear layer follow from its inputs ā_t and the
gradients g_t of the loss w.r.t. its outputs: ∇_W L = Σ_t g_t ā_tᵀ. During capture every
parameter is frozen and the tracked layers' outputs are made differentiable instead, so the
backward pass computes only input gradients: no weight gradient is ever formed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .layers import LayerInfo

# (ā, g): inputs with a ones column when the layer has a bias, [B, T, in'], and output
# gradients [B, T, out]. Non-sequence data has T = 1.
LayerTerms = dict[str, tuple[torch.Tensor, torch.Tensor]]


# Name components of token-routed mixture-of-experts sub-modules: their inputs are a
# data-dependent subset of the batch's tokens, which cannot be mapped back to examples.
EXPERT_NAME_PARTS = ("experts", "expert")


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if torch.is_tensor(v):
            return v
    return None


def sequence_lengths(batch: Any, batch_size: int) -> set[int]:
    """Sequence lengths a batch carries: dim 1 of each tensor whose dim 0 is the batch."""
    values = batch.values() if isinstance(batch, Mapping) else batch
    if torch.is_tensor(values):
        values = [values]
    try:
        tensors = [v for v in values if torch.is_tensor(v)]
    except TypeError:
        return set()
    return {int(t.shape[1]) for t in tensors if t.dim() >= 2 and t.shape[0] == batch_size}


def _as_sequence(
    x: torch.Tensor, batch_size: int, lengths: set[int] | None, name: str
) -> torch.Tensor:
    """A layer's input or output gradient as [B, T, d], example-major.

    [B, ..., d] becomes [B, T, d] with T the product of the middle dimensions (1 if none).
    A 2-D input [B·T, d] (OPT flattens its hidden states before the MLP) becomes [B, T, d]
    when B·T rows are exactly the batch's tokens; anything else cannot be attributed to
    examples and raises.
    """
    if x.dim() >= 2 and x.shape[0] == batch_size:
        return x.reshape(batch_size, -1, x.shape[-1])
    rows = x.shape[0] if x.dim() >= 1 else 0
    if (
        x.dim() == 2
        and batch_size > 0
        and rows % batch_size == 0
        and (lengths is None or rows // batch_size in lengths)
    ):
        return x.reshape(batch_size, rows // batch_size, x.shape[-1])
    raise RuntimeError(
        f"cannot map the inputs of layer {name!r} (shape {list(x.shape)}) to the batch's "
        f"{batch_size} examples (sequence lengths {sorted(lengths or [])}): its first dimension "
        "is neither the batch nor the batch's tokens (token-routed mixture-of-experts layers "
        f"see a data-dependent subset). Exclude it with the task's `modules=` argument."
    )


class LayerCapture:
    """Context manager: records tracked layers' inputs and differentiable outputs.

    `batch_size` is the number of examples in the batch (the task's `batch_size(batch)`) and
    `batch` the batch itself (its sequence lengths let flattened [B·T, d] inputs be mapped
    back to examples). Without them, the batch size is dim 0 of the model's first tensor
    argument and any B·T rows are accepted.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        infos: dict[str, LayerInfo],
        *,
        batch_size: int | None = None,
        batch: Any = None,
    ):
        self.model = model
        self.layers = layers
        self.infos = infos
        self.batch_size = batch_size
        self.lengths = (
            None if batch is None or batch_size is None else sequence_lengths(batch, batch_size)
        )
        routed = [n for n in layers if set(n.lower().split(".")) & set(EXPERT_NAME_PARTS)]
        if routed:
            raise ValueError(
                f"layers {routed[:3]} belong to mixture-of-experts experts, whose inputs are a "
                "token-routed subset of the batch and cannot be attributed to examples: exclude "
                "them with the task's `modules=` argument"
            )
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._frozen: list[nn.Parameter] = []

    def _hook(self, name: str):
        def hook(module, args, output):
            if name in self.outputs:
                raise RuntimeError(
                    f"layer {name!r} was called twice in one forward pass (shared weights); "
                    "exclude it with the task's `modules=` argument"
                )
            self.inputs[name] = args[0]
            if not output.requires_grad:
                output.requires_grad_(True)
            self.outputs[name] = output
            return output

        return hook

    def _root_hook(self, module, args, kwargs):
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        x = _first_tensor(args, kwargs) if x is None else x
        if x is not None and x.dim() >= 1:
            self.batch_size = int(x.shape[0])

    def __enter__(self) -> LayerCapture:
        if self.batch_size is None:
            self._handles.append(
                self.model.register_forward_pre_hook(self._root_hook, with_kwargs=True)
            )
        self._frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(False)
        self._handles += [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        self._grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for p in self._frozen:
            p.requires_grad_(True)
        torch.set_grad_enabled(self._grad_mode)
        self.inputs.clear()
        self.outputs.clear()

    def backward(self, loss: torch.Tensor) -> LayerTerms:
        """Differentiate `loss` w.r.t. every tracked output; return (ā, g) per layer."""
        missing = [n for n in self.layers if n not in self.outputs]
        if missing:
            raise RuntimeError(f"tracked layers {missing[:5]} were not called in the forward pass")
        names = list(self.layers)
        grads = torch.autograd.grad(loss, [self.outputs[n] for n in names], allow_unused=True)
        terms: LayerTerms = {}
        # Layers that read the same input (q/k/v, gate/up) share one ā tensor, so that
        # consumers can compute products of ā once (see `shared_inputs`).
        shared: dict[tuple[int, bool], torch.Tensor] = {}
        b, lengths = self.batch_size, self.lengths
        if b is None:
            raise RuntimeError("LayerCapture did not see the model's batch: pass batch_size=")
        for n, g in zip(names, grads, strict=True):
            # Each layer's input is let go of once its terms are formed: with a bias the input
            # is copied (the ones column), and holding every original beside its copy raised
            # the capture's peak memory.
            out, x = self.outputs.pop(n), self.inputs.pop(n)
            g = torch.zeros_like(out) if g is None else g
            key = (id(x), self.infos[n].bias)
            if key not in shared:
                a = _as_sequence(x.detach(), b, lengths, n)
                if self.infos[n].bias:
                    a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
                shared[key] = a
            terms[n] = (shared[key], _as_sequence(g.detach(), b, lengths, n))
            if terms[n][0].shape[1] != terms[n][1].shape[1]:
                raise RuntimeError(
                    f"layer {n!r}: inputs {list(x.shape)} and outputs "
                    f"{list(out.shape)} do not have the same tokens; exclude it with `modules=`"
                )
        self.inputs.clear()
        self.outputs.clear()
        return terms
