"""Tiny float64 models and brute-force references, independent of the library's hooks.

Everything here is computed the slow, obvious way: one backward pass per example for
gradients, `torch.func.jacrev` for Jacobians, explicit output Hessians, dense inverses.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev

from influence.layers import layer_infos, weight_gradient

VOCAB = 13
SEQ = 6


def tiny_mlp(n_in=4, hidden=6, n_out=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).double()


def classification_data(n=40, n_in=4, n_out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_out, (n,), generator=g)
    return x, y


def tiny_llama(seed=0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).double().eval()


def tiny_gpt2(seed=0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=32,
        attn_implementation="eager",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).double().eval()


def lm_data(n=24, seq=SEQ, seed=1, prompt=0, min_len=None):
    """Dict of tensors; sequences of varying real length (right padding) when `min_len`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    if min_len is not None:
        lengths = torch.randint(min_len, seq + 1, (n,), generator=g)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def rows(data, i):
    """Example i of tuple or dict data, as a batch of one."""
    if isinstance(data, dict):
        return {k: v[i : i + 1] for k, v in data.items()}
    return tuple(t[i : i + 1] for t in data)


def size(data) -> int:
    return len(data["input_ids"]) if isinstance(data, dict) else len(data[0])


def brute_gradients(model, task, data, *, measurement=False, sample=False, seed=0):
    """{layer: [N, out, in']} by one backward pass per example."""
    layers = task.tracked_modules(model)
    infos = layer_infos(layers)
    out = {n: [] for n in layers}
    for i in range(size(data)):
        model.zero_grad()
        batch = rows(data, i)
        if measurement:
            loss = task.measurement(model, batch)
        else:
            loss = task.loss(model, batch, sample=sample, seed=seed, indices=[i])
        loss.backward()
        for n, m in layers.items():
            out[n].append(weight_gradient(infos[n], m).clone())
    model.zero_grad()
    return {n: torch.stack(v) for n, v in out.items()}


def flat(grads, infos):
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in infos], dim=1)


def _params_from_flat(theta, infos):
    params, start = {}, 0
    for n, info in infos.items():
        w = theta[start : start + info.numel].reshape(info.shape)
        start += info.numel
        weight = w[:, : info.in_features]
        params[f"{n}.weight"] = weight.T if info.transposed else weight
        if info.bias:
            params[f"{n}.bias"] = w[:, -1]
    return params


def exact_gauss_newton(model, task, data) -> torch.Tensor:
    """G = (1/N) Σ_n J_nᵀ H_n J_n over the tracked parameters (internal layout, layer order)."""
    layers = task.tracked_modules(model)
    infos = layer_infos(layers)
    theta = torch.cat([weight_like(infos[n], m).reshape(-1) for n, m in layers.items()]).detach()
    n_ex = size(data)
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for i in range(n_ex):
        batch = rows(data, i)

        def outputs(t, batch=batch):
            return task.outputs(_Call(model, _params_from_flat(t, infos)), batch)

        h = task.outputs(model, batch).detach()
        jac = jacrev(outputs)(theta).reshape(h.numel(), -1)
        hess = output_hessian(task, h, batch)
        total += jac.T @ hess @ jac
    return total / n_ex


class _Call(nn.Module):
    """Calls `model` with some parameters replaced (for torch.func)."""

    def __init__(self, model, params):
        super().__init__()
        self.model, self.params = model, params

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs, strict=False)


def weight_like(info, module):
    w = module.weight.T if info.transposed else module.weight
    if info.bias:
        w = torch.cat([w, module.bias.unsqueeze(1)], dim=1)
    return w


def output_hessian(task, h, batch) -> torch.Tensor:
    """Dense Hessian of the summed loss w.r.t. the outputs h (flattened)."""
    eye = torch.eye(h.numel(), dtype=h.dtype)
    cols = [
        task.output_hvp(h, batch, eye[k].reshape(h.shape)).reshape(-1) for k in range(h.numel())
    ]
    return torch.stack(cols, dim=1)


def block_slices(infos):
    out, start = {}, 0
    for n, info in infos.items():
        out[n] = slice(start, start + info.numel)
        start += info.numel
    return out


def fitted(est_cls, model, task, data, **kw):
    return est_cls(**kw).fit(model, task, data, batch_size=5, progress=False, seed=3)
