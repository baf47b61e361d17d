"""K-FAC: each layer's block of G as T̄ · (A ⊗ S), from token covariances of inputs and
output gradients (sampled labels); inverted through the eigendecompositions of A and S."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from . import distributed
from .capture import LayerTerms
from .estimator import Estimator, Grads
from .gradients import iter_layer_terms, token_outer_sum
from .layers import layer_infos
from .lowrank import LowRank, low_rank


def rotate_tokens_first(tokens: int, out_features: int, in_dim: int) -> bool:
    """Whether rotating every token into the eigenbases, T·(out² + in'²) multiply-adds, is
    cheaper than rotating each example's summed gradient, out·in'·(out + in')."""
    o, i = out_features, in_dim
    return tokens * (o * o + i * i) < o * i * (o + i)


class Workspace:
    """Buffers that a pass reuses from batch to batch for its large temporaries, and the
    batch's rotated inputs ā Q_A shared by layers that read the same input.

    A fresh multi-megabyte tensor per layer and batch is returned to the operating system
    when freed and page-faulted in again on the next batch; on the benchmark's shapes, reusing
    buffers cut the eigenvalue pass's per-batch products by about a third (measured)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._used: set[tuple] = set()
        self.rotated_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def buffer(self, key: tuple, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        self._used.add(key)
        buf = self._buffers.get(key)
        if (
            buf is None
            or buf.shape != shape
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = self._buffers[key] = like.new_empty(shape)
        return buf

    def next_batch(self) -> None:
        """Forget the rotated inputs, and the buffers the last batch did not use: batches
        packed without padding change shape, and a buffer per shape ever seen grew without
        bound over a pass."""
        self.rotated_inputs.clear()
        self._buffers = {k: b for k, b in self._buffers.items() if k in self._used}
        self._used = set()

    def forget(self, buf: torch.Tensor) -> None:
        """Drop cached rotated inputs that live in `buf`, which is about to be overwritten."""
        stale = [k for k, (_, rot) in self.rotated_inputs.items() if rot is buf]
        for k in stale:
            del self.rotated_inputs[k]


def eigenbasis_gradients(a, g, qa, qs, workspace: Workspace, name: str) -> torch.Tensor:
    """Q_Sᵀ (Σ_t g_t ā_tᵀ) Q_A per example, [B, out, in'], by the cheaper of two orders:
    rotate every token then sum (short sequences), or sum then rotate each example.

    Layers that share both their input and their Q_A (q/k/v and gate/up have equal input
    covariances, hence equal eigenbases) rotate that input once per batch. The result lives in
    `workspace` and is overwritten by the next call with the same shape: use it before then."""
    if not rotate_tokens_first(g.shape[1], g.shape[2], a.shape[-1]):
        return qs.T @ token_outer_sum(g, a) @ qa
    cached = workspace.rotated_inputs.get(id(a))
    if cached is not None and torch.equal(cached[0], qa):
        a_rot = cached[1]
    else:
        # Keyed by shape, not layer (a buffer per layer grew with depth: 1 GB on GPT-2 small
        # at batch 32); an earlier input rotated into the same buffer is forgotten.
        buf = workspace.buffer(("input", a.shape), a.shape, a)
        workspace.forget(buf)
        a_rot = torch.matmul(a, qa, out=buf)
        workspace.rotated_inputs[id(a)] = (qa, a_rot)
    # Keyed by shape, not layer: the result is consumed before the next layer's call, so
    # layers of equal shapes share these buffers and memory does not grow with depth.
    g_rot = torch.matmul(g, qs, out=workspace.buffer(("output", g.shape), g.shape, g))
    shape = torch.Size((g.shape[0], g.shape[2], a.shape[2]))
    return torch.bmm(
        g_rot.transpose(1, 2), a_rot, out=workspace.buffer(("gradient", shape), shape, g)
    )


def _rotate_factors(basis: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """basis @ f for every query's [d, r] factor f, as one [d, d] @ [d, Q·r] product."""
    q, d, r = f.shape
    stacked = f.permute(1, 0, 2).reshape(d, q * r)
    return (basis @ stacked).reshape(d, q, r).permute(1, 0, 2).contiguous()


def _masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, d] -> [K, d], keeping the K real-token positions (all of them without a mask)."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    return x[mask]


def fit_covariances(model, task, data, *, seed, batch_size, device, progress):
    """One pass with sampled labels: per layer A = E_tokens[ā āᵀ] and S = E_tokens[g gᵀ]
    (float64) over the real positions the layer reads (padding left out), the number of
    examples, and per layer T̄, the mean number of those positions per example."""
    a_sum: dict[str, torch.Tensor] = {}
    s_sum: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    examples = 0
    for _, batch, terms, masks, _ in iter_layer_terms(
        model,
        task,
        data,
        sample=True,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="covariances",
        shard=True,
    ):
        examples += task.batch_size(batch)
        input_products: dict[int, torch.Tensor] = {}  # layers sharing an input share ā āᵀ
        for n, (a, g) in terms.items():
            if id(a) not in input_products:
                rows = _masked_rows(a, masks[n])
                input_products[id(a)] = rows.T @ rows
            g = _masked_rows(g, masks[n])
            tokens[n] = tokens.get(n, 0) + g.shape[0]
            # Accumulated in place in float64: a float64 copy of each batch's product and a
            # new sum per batch held about a third of the fit's peak memory on large layers.
            _accumulate(a_sum, n, input_products[id(a)])
            _accumulate(s_sum, n, g.T @ g)
        # Released before the next batch's forward, which would otherwise run beside them.
        del terms, input_products
    if distributed.is_distributed():  # every rank ends with the sums over all ranks
        infos = layer_infos(task.tracked_modules(distributed.unwrap_model(model)))
        for n, info in infos.items():
            a_sum.setdefault(n, torch.zeros(info.in_dim, info.in_dim, dtype=torch.float64))
            s_sum.setdefault(n, torch.zeros(info.out_features, info.out_features).double())
        a_sum, s_sum = distributed.all_reduce_sum(a_sum), distributed.all_reduce_sum(s_sum)
        counts = torch.tensor([float(tokens.get(n, 0)) for n in infos], dtype=torch.float64)
        counts = distributed.all_reduce_sum({"tokens": counts})["tokens"]
        tokens = {n: int(c) for n, c in zip(infos, counts.tolist(), strict=True)}
        examples = int(distributed.all_reduce_number(examples))
    if examples == 0:
        raise ValueError("cannot fit on empty data")
    # In place: the float64 covariances of a large model are GBs, and a divided copy held
    # beside the sums doubled them (same values: one division either way).
    return (
        {n: v.div_(max(tokens[n], 1)) for n, v in a_sum.items()},
        {n: v.div_(max(tokens[n], 1)) for n, v in s_sum.items()},
        examples,
        {n: tokens[n] / examples for n in a_sum},
    )


def _accumulate(sums: dict[str, torch.Tensor], name: str, product: torch.Tensor) -> None:
    """sums[name] += product, the sum kept in float64 (each layer its own tensor)."""
    if name in sums:
        sums[name].add_(product)
    else:
        sums[name] = product.to(torch.float64, copy=True)


def state_dtype(layers: Mapping[str, torch.nn.Module]) -> torch.dtype:
    """The dtype eigenvectors (and EK-FAC's eigenvalues) are stored in: float64 for a
    float64 model, else float32. Covariances are summed and decomposed in float64 either way;
    every product with the eigenvectors runs in the gradients' dtype, so storing them in
    float64 for a float32 model only held twice the memory (600 MB instead of 300 on
    bench_large_layers' 17M-parameter model) and a float32 copy beside it while fitting."""
    dtypes = {p.dtype for m in layers.values() for p in m.parameters(recurse=False)}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _eigh(m: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.isfinite(m).all():
        raise FloatingPointError(
            f"NaN or Inf in covariance {what}: check the model's outputs and loss on the fitting "
            "data (half precision or a diverged model are the usual causes)"
        )
    vals, vecs = torch.linalg.eigh(m.double())
    # Row-major like a loaded state, so that saved and loaded estimators run identical products.
    return vals.clamp_(min=0.0), vecs.contiguous()


class KFAC(Estimator):
    """Kronecker-factored curvature: block ≈ T̄ · (A ⊗ S); 'auto' damping is 0.1 × the mean
    eigenvalue T̄ · mean(λ_A) · mean(λ_S) of that block."""

    name = "kfac"

    @classmethod
    def state_shapes(cls, info):
        i, o = info.in_dim, info.out_features
        return {"eigvals_A": (i,), "eigvecs_A": (i, i), "eigvals_S": (o,), "eigvecs_S": (o, o)}

    def _check_meta(self, path):
        tokens = self.meta_.get("mean_tokens")
        ok = isinstance(tokens, int | float) or (
            isinstance(tokens, Mapping)
            and all(isinstance(tokens.get(n), int | float) for n in self.layers_)
        )
        if not ok or not isinstance(self.meta_.get("num_examples"), int):
            raise ValueError(
                f"{path}: its metadata lacks the fit's token counts (meta_['mean_tokens'] per "
                "layer, meta_['num_examples']); fit the estimator and save it again"
            )

    def _fit(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        a_cov, s_cov, examples, mean_tokens = fit_covariances(
            model, task, data, seed=seed, batch_size=batch_size, device=device, progress=progress
        )
        dtype = state_dtype(task.tracked_modules(distributed.unwrap_model(model)))
        self.state_ = {}
        # Each covariance is dropped once decomposed, so that covariances and eigenvectors
        # are not all held at once.
        for n in list(a_cov):
            la, qa = _eigh(a_cov.pop(n), f"A of layer {n!r}")
            ls, qs = _eigh(s_cov.pop(n), f"S of layer {n!r}")
            qa, qs = qa.to(dtype), qs.to(dtype)
            self.state_.update(
                {
                    f"{n}::eigvals_A": la,
                    f"{n}::eigvecs_A": qa,
                    f"{n}::eigvals_S": ls,
                    f"{n}::eigvecs_S": qs,
                }
            )
        self.meta_ = {"num_examples": examples, "mean_tokens": mean_tokens}  # per layer
        self._fit_eigenvalues(
            model, task, data, batch_size=batch_size, device=device, progress=progress, seed=seed
        )

    def _fit_eigenvalues(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        self.damping_ = {n: self.resolve_damping(n, self._mean_eigenvalue(n)) for n in self.layers_}

    def mean_tokens(self, layer: str) -> float:
        """T̄ of `layer`: the mean number of real positions it reads per example (a pooler or a
        classification head reads one; encoder and decoder layers their own sequences)."""
        t = self.meta_["mean_tokens"]
        return float(t[layer] if isinstance(t, Mapping) else t)  # one number in old files

    def _mean_eigenvalue(self, layer: str) -> torch.Tensor:
        la, ls = self.state_[f"{layer}::eigvals_A"], self.state_[f"{layer}::eigvals_S"]
        return self.mean_tokens(layer) * la.mean() * ls.mean()

    @classmethod
    def from_ekfac(cls, ekfac: KFAC, damping=None) -> KFAC:
        """K-FAC from a fitted EK-FAC, without refitting: EK-FAC's first pass is K-FAC's whole
        fit (same covariances, same eigenbases), so only the eigenvalues T̄·λ_S λ_Aᵀ change.
        `damping` defaults to the EK-FAC's setting ('auto' resolves with K-FAC's own rule)."""
        if not isinstance(ekfac, KFAC) or ekfac.layers_ is None:
            raise ValueError(
                f"from_ekfac needs a fitted EKFAC (or KFAC), got {type(ekfac).__name__}"
                + ("" if not isinstance(ekfac, KFAC) else " that is not fitted")
            )
        est = cls(ekfac.damping if damping is None else damping)
        est.layers_ = dict(ekfac.layers_)
        keys = ("eigvals_A", "eigvecs_A", "eigvals_S", "eigvecs_S")
        est.state_ = {f"{n}::{k}": ekfac.state_[f"{n}::{k}"] for n in est.layers_ for k in keys}
        est.meta_ = copy.deepcopy({k: ekfac.meta_[k] for k in ("num_examples", "mean_tokens")})
        est.fingerprint_ = ekfac.fingerprint_
        est.damping_ = {n: est.resolve_damping(n, est._mean_eigenvalue(n)) for n in est.layers_}
        return est

    def eigenvalues(self, layer: str) -> torch.Tensor:
        """The [out, in'] eigenvalues of the layer's block in the Kronecker eigenbasis."""
        la, ls = self.state_[f"{layer}::eigvals_A"], self.state_[f"{layer}::eigvals_S"]
        return self.mean_tokens(layer) * torch.outer(ls, la)

    def _inverse_eigenvalues(self, layer: str, like: torch.Tensor) -> torch.Tensor:
        return (1.0 / (self.eigenvalues(layer) + self.damping_[layer])).to(like)

    def _bases(self, layer: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_A, Q_S) in the dtype and on the device of `like`."""
        qa = self.state_[f"{layer}::eigvecs_A"].to(like)
        return qa, self.state_[f"{layer}::eigvecs_S"].to(like)

    def precondition(self, grads: Grads) -> Grads:
        # The rotations run in the gradients' dtype: orthogonal maps do not amplify rounding
        # error, so float32 gradients lose nothing measurable (relative error ~1e-6) and the
        # products run at twice the float64 speed. The eigendecompositions stay float64.
        out = {}
        for n, v in grads.items():
            qa, qs = self._bases(n, v)
            out[n] = qs @ ((qs.T @ v @ qa) * self._inverse_eigenvalues(n, v)) @ qa.T
        return out

    def precondition_terms(
        self, terms: LayerTerms, rank: int | None = None
    ) -> dict[str, torch.Tensor | LowRank]:
        """As the base method, cheaper: gradients are formed directly in the eigenbasis (tokens
        rotated first when that costs less), and the rank-`rank` truncation is taken there and
        only its thin factors rotated back. The SVD is invariant under the two rotations, so
        this truncates the preconditioned gradient itself."""
        out: dict[str, torch.Tensor | LowRank] = {}
        workspace = Workspace()
        for n, (a, g) in terms.items():
            qa, qs = self._bases(n, a)
            # In place: the eigenbasis gradients are a workspace buffer, used up right here.
            x = eigenbasis_gradients(a, g, qa, qs, workspace, n)
            x.mul_(self._inverse_eigenvalues(n, a))
            lr = x if rank is None else low_rank(x, rank)
            if isinstance(lr, LowRank):
                out[n] = LowRank(_rotate_factors(qs, lr.u), lr.s, _rotate_factors(qa, lr.v))
            else:
                out[n] = qs @ lr @ qa.T
        return out

    def self_products(self, terms: LayerTerms) -> dict[str, torch.Tensor]:
        """As the base method, without rotating back: gᵀ Q D Qᵀ g = Σ_ij (Q_Sᵀ g Q_A)²_ij D_ij,
        so one rotation into the eigenbasis (tokens first where cheaper) is the whole cost."""
        out = {}
        workspace = Workspace()
        for n, (a, g) in terms.items():
            qa, qs = self._bases(n, a)
            x = eigenbasis_gradients(a, g, qa, qs, workspace, n).square_()  # a workspace buffer
            out[n] = x.mul_(self._inverse_eigenvalues(n, a)).flatten(1).sum(1)
        return out

    def implied_matrix(self, layer: str) -> torch.Tensor:
        """The undamped block this estimator stands for, [out·in', out·in'] (row-major vec of
        the out × in' gradient): for tests and small models only."""
        qa = self.state_[f"{layer}::eigvecs_A"]
        qs = self.state_[f"{layer}::eigvecs_S"]
        basis = torch.kron(qs, qa)
        return basis @ torch.diag(self.eigenvalues(layer).reshape(-1)) @ basis.T
