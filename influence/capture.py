"""Capture each tracked layer's inputs and output gradients in one forward and one backward.

Per-example and per-token gradients of a linear layer follow from its inputs ā_t and the
gradients g_t of the loss w.r.t. its outputs: ∇_W L = Σ_t g_t ā_tᵀ. During capture every
parameter is frozen and the tracked layers' outputs are made differentiable instead, so the
backward pass computes only input gradients: no weight gradient is ever formed.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerInfo

# (ā, g): inputs with a ones column when the layer has a bias, [B, T, in'], and output
# gradients [B, T, out]. Non-sequence data has T = 1.
LayerTerms = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _as_sequence(x: torch.Tensor) -> torch.Tensor:
    """[B, ..., d] -> [B, T, d] with T the product of the middle dimensions (1 if none)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


class LayerCapture:
    """Context manager: records tracked layers' inputs and differentiable outputs."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], infos: dict[str, LayerInfo]):
        self.model = model
        self.layers = layers
        self.infos = infos
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

    def __enter__(self) -> LayerCapture:
        self._frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(False)
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        self._grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
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
        for n, g in zip(names, grads, strict=True):
            out = self.outputs[n]
            g = torch.zeros_like(out) if g is None else g
            key = (id(self.inputs[n]), self.infos[n].bias)
            if key not in shared:
                a = _as_sequence(self.inputs[n].detach())
                if self.infos[n].bias:
                    a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
                shared[key] = a
            terms[n] = (shared[key], _as_sequence(g.detach()))
        self.inputs.clear()
        self.outputs.clear()
        return terms
