"""How a gradient index stores each training example's per-layer gradient DW_n [out, in']:
in full, as its coefficients in the top eigen-subspace of K-FAC/EK-FAC's Kronecker factors,
or through a seeded random Kronecker projection (LoGra-style).

Both compressions store P_Sᵀ DW_n P_A [k_s, k_a] with P_S [out, k_s] and P_A [in', k_a], formed
from the captured tokens as Σ_t (P_Sᵀ g_t)(P_Aᵀ ā_t)ᵀ when that costs fewer multiply-adds than
forming DW_n first (always, for small k): no full per-example gradient of a large layer.

- `EigenCompression`: P_S, P_A are the kept columns of the eigenvectors Q_S, Q_A. EK-FAC's
  preconditioner is diagonal in that basis, so a query is stored as its own coefficients
  divided by Λ + λ on the kept block, and a score is one inner product. At full size (every
  eigenvector kept) the index is exact.
- `RandomCompression`: P_S, P_A Gaussian with variance 1/k (E[P Pᵀ] = I), seeded per layer.
  The query is preconditioned by the index's estimator in the full space, exactly as
  `pairwise_scores` does, and then projected, so the projection is the only approximation:
  each score is an unbiased estimate of the exact one. With `Identity` this is the field's
  projected-gradient baseline (TRAK/LoGra without curvature).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import boolean, integer, positive_int
from ..layers import LayerInfo

Sizes = int | Mapping[str, int]

# The kept eigenvectors are ranked by what they add to a score (see `_ranking`).
SELECTIONS = ("lambda", "eigenvalue")
# Above this many bytes a batch's per-example gradients of one layer are not formed just to be
# projected (the token-first order is used instead, whatever its flop count).
_GRADIENT_BYTES = 64 * 2**20


def _check_sizes(name: str, value: Any) -> Sizes:
    if isinstance(value, Mapping):
        return {str(k): positive_int(f"{name}[{k!r}]", v) for k, v in value.items()}
    return positive_int(name, value)


@dataclass(frozen=True)
class EigenCompression:
    """Per layer, the coefficients of each gradient on the top `k_s` eigenvectors of S (output
    side) and the top `k_a` of A (input side): k_s × k_a numbers instead of out × in'.

    `k_s`, `k_a`: an int for every layer, or a dict {layer: int} covering every layer.
    `select`: how eigenvectors are ranked. "lambda" (default): by the share of a score they
    carry, Σ_j Λ_ij / (Λ_ij + λ) over their row (S) or column (A) of the fitted eigenvalues Λ
    (a coordinate's term in a score is g_q,ij g_n,ij / (Λ_ij + λ), whose size is about
    Λ_ij / (Λ_ij + λ) when both gradients have the fitted second moments); "eigenvalue": by
    the eigenvalues of S and A themselves. For K-FAC, whose Λ is λ_S λ_Aᵀ, the two differ
    only through the damping. Needs K-FAC or EK-FAC (their eigenbases)."""

    k_s: Sizes
    k_a: Sizes
    select: str = "lambda"

    kind = "eigen"

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_s", _check_sizes("k_s", self.k_s))
        object.__setattr__(self, "k_a", _check_sizes("k_a", self.k_a))
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {list(SELECTIONS)}, got {self.select!r}")

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "k_s": self.k_s, "k_a": self.k_a, "select": self.select}


@dataclass(frozen=True)
class RandomCompression:
    """Per layer, a seeded Gaussian Kronecker projection P_Sᵀ DW_n P_A (P_S [out, k_s], P_A
    [in', k_a], entries of variance 1/k): LoGra's compression. Queries are preconditioned in
    full by the index's estimator, exactly, and projected with matrices U_S, U_A such that
    E[U_S P_Sᵀ] = I and E[U_A P_Aᵀ] = I, so every score is an unbiased estimate of the exact
    one. Works with every estimator the index accepts.

    `whiten=False`: U = P, the field's projection of raw gradients. `whiten=True` splits the
    preconditioner between the two sides: in the estimator's basis (Kronecker eigenbases,
    or the coordinates for `Diagonal`) Λ + λ is fitted by a separable d_S,i·d_A,j (least
    squares in log space), P_S = Q_S diag(d_S)^-½ G_S and U_S = Q_S diag(d_S)^½ G_S (G
    Gaussian), and likewise for A; both sides are then about whitened, and a projection's
    error, about ‖query side‖·‖training side‖/√k, is much smaller for the same k than
    projecting the preconditioned query against raw gradients. Still a Kronecker projection
    (projected from the tokens); with `Identity` it changes nothing."""

    k_s: Sizes
    k_a: Sizes
    seed: int = 0
    whiten: bool = False

    kind = "random"

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_s", _check_sizes("k_s", self.k_s))
        object.__setattr__(self, "k_a", _check_sizes("k_a", self.k_a))
        object.__setattr__(self, "seed", integer("seed", self.seed))
        object.__setattr__(self, "whiten", boolean("whiten", self.whiten))

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "k_s": self.k_s,
            "k_a": self.k_a,
            "seed": self.seed,
            "whiten": self.whiten,
        }


Compression = EigenCompression | RandomCompression | None


def check_compression(compression: Any) -> Compression:
    if compression is None or isinstance(compression, EigenCompression | RandomCompression):
        return compression
    raise TypeError(
        "compression must be None (every gradient stored in full), "
        "influence.EigenCompression(k_s, k_a) or influence.RandomCompression(k_s, k_a); got "
        f"{compression!r}"
    )


def compression_config(compression: Compression) -> dict[str, Any]:
    return {"kind": "none"} if compression is None else compression.config()


def compression_from_config(config: Mapping[str, Any]) -> Compression:
    kind = config["kind"]
    if kind == "none":
        return None
    args = {k: v for k, v in config.items() if k != "kind"}
    return EigenCompression(**args) if kind == "eigen" else RandomCompression(**args)


def _size(sizes: Sizes, layer: str, what: str) -> int:
    if isinstance(sizes, Mapping):
        if layer not in sizes:
            raise ValueError(
                f"{what} has no entry for layer {layer!r}: give a size for every tracked layer "
                f"(or one int for all); it has {sorted(sizes)[:5]}"
            )
        return sizes[layer]
    return sizes


def stored_shapes(
    compression: Compression, infos: Mapping[str, LayerInfo]
) -> dict[str, tuple[int, int]]:
    """{layer: (rows, columns)} each example's gradient is stored as. Raises, naming the
    layer, when a compression is larger than the layer it compresses."""
    out = {}
    for n, info in infos.items():
        if compression is None:
            out[n] = info.shape
            continue
        ks = _size(compression.k_s, n, "k_s")
        ka = _size(compression.k_a, n, "k_a")
        if ks > info.out_features or ka > info.in_dim:
            raise ValueError(
                f"{type(compression).__name__}(k_s={ks}, k_a={ka}) is larger than layer {n!r}: "
                f"its gradient is {info.out_features} × {info.in_dim} (outputs × inputs"
                f"{' + bias' if info.bias else ''}), so k_s ≤ {info.out_features} and "
                f"k_a ≤ {info.in_dim}. Lower them, or give a dict of sizes per layer."
            )
        out[n] = (ks, ka)
    if compression is not None:
        given = [k for k in (compression.k_s, compression.k_a) if isinstance(k, Mapping)]
        unknown = sorted({k for d in given for k in d} - set(infos))
        if unknown:
            raise ValueError(
                f"sizes given for layers the task does not track: {unknown[:5]}; tracked: "
                f"{list(infos)[:5]}"
            )
    return out


@dataclass
class LayerProjection:
    """One layer's projections of the training gradients, P_S [out, k_s] and P_A [in', k_a]
    (both None: stored in full); the query's, U_S and U_A (None: the same); and, for the
    eigen compression, the query's scale 1 / (Λ + λ) on the kept block."""

    p_s: torch.Tensor | None
    p_a: torch.Tensor | None
    scale: torch.Tensor | None = None
    u_s: torch.Tensor | None = None
    u_a: torch.Tensor | None = None

    def to(self, like: torch.Tensor) -> LayerProjection:
        fields = (self.p_s, self.p_a, self.scale, self.u_s, self.u_a)
        return LayerProjection(*(None if t is None else t.to(like) for t in fields))

    def query_side(self) -> LayerProjection:
        """The projections a (preconditioned) query gradient is projected with."""
        if self.u_s is None:
            return self
        return LayerProjection(self.u_s, self.u_a, self.scale)


def _ranking(estimator: Any, layer: str, select: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of the eigenvectors of S and of A, most important first."""
    if select == "eigenvalue":
        ls = estimator.state_[f"{layer}::eigvals_S"]
        la = estimator.state_[f"{layer}::eigvals_A"]
        return torch.argsort(ls, descending=True), torch.argsort(la, descending=True)
    lam = estimator.eigenvalues(layer)
    share = lam / (lam + estimator.damping_[layer])
    return torch.argsort(share.sum(1), descending=True), torch.argsort(
        share.sum(0), descending=True
    )


def _gaussian(rows: int, cols: int, seed: int, layer: str, side: str) -> torch.Tensor:
    """Entries N(0, 1/cols), seeded by (seed, layer, side): a layer's projection does not
    depend on which other layers are tracked (Python's hash() is salted, sha256 is not)."""
    digest = hashlib.sha256(f"{seed}/{layer}/{side}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / cols**0.5


def layer_projections(
    compression: Compression, estimator: Any, infos: Mapping[str, LayerInfo]
) -> dict[str, LayerProjection]:
    """The projections of every layer (float64), from the estimator's eigenbases (eigen) or a
    seeded generator (random)."""
    shapes = stored_shapes(compression, infos)
    out = {}
    for n in infos:
        if compression is None:
            out[n] = LayerProjection(None, None)
        elif isinstance(compression, RandomCompression):
            ks, ka = shapes[n]
            g_s = _gaussian(infos[n].out_features, ks, compression.seed, n, "S")
            g_a = _gaussian(infos[n].in_dim, ka, compression.seed, n, "A")
            if compression.whiten and _curvature(estimator, n) is not None:
                out[n] = _whitened(estimator, n, g_s, g_a)
            else:
                out[n] = LayerProjection(g_s, g_a)
        else:
            ks, ka = shapes[n]
            rs, ra = _ranking(estimator, n, compression.select)
            rs, ra = rs[:ks], ra[:ka]
            # float64 like every projection (a float32 model's estimator stores float32).
            qs = estimator.state_[f"{n}::eigvecs_S"][:, rs].double()
            qa = estimator.state_[f"{n}::eigvecs_A"][:, ra].double()
            lam = estimator.eigenvalues(n)[rs][:, ra]
            scale = 1.0 / (lam.double() + estimator.damping_[n])
            out[n] = LayerProjection(qs.contiguous(), qa.contiguous(), scale)
    return out


def _curvature(estimator: Any, layer: str):
    """(basis of S or None, basis of A or None, Λ + λ in that basis), or None without
    curvature (Identity)."""
    damping = estimator.damping_[layer]
    if hasattr(estimator, "eigenvalues"):  # K-FAC, EK-FAC
        qs = estimator.state_[f"{layer}::eigvecs_S"].double()
        qa = estimator.state_[f"{layer}::eigvecs_A"].double()
        return qs, qa, estimator.eigenvalues(layer).double() + damping
    if f"{layer}::diagonal" in estimator.state_:  # Diagonal: the coordinates themselves
        return None, None, estimator.state_[f"{layer}::diagonal"].double() + damping
    return None


def _whitened(estimator: Any, layer: str, g_s: torch.Tensor, g_a: torch.Tensor):
    """P = Q diag(d)^-½ G for the training side, U = Q diag(d)^½ G for the query side, with
    d_S,i·d_A,j the least-squares fit of log(Λ + λ) by a row plus a column term."""
    qs, qa, m = _curvature(estimator, layer)
    log = m.log()
    half = log.mean() / 2
    d_s, d_a = (log.mean(1) - half).exp(), (log.mean(0) - half).exp()

    def side(basis, d, g):
        down, up = g / d.sqrt()[:, None], g * d.sqrt()[:, None]
        return (down, up) if basis is None else (basis @ down, basis @ up)

    p_s, u_s = side(qs, d_s, g_s)
    p_a, u_a = side(qa, d_a, g_a)
    return LayerProjection(p_s, p_a, None, u_s, u_a)


def tokens_first(t: int, o: int, i: int, ks: int, ka: int, rows: int, itemsize: int) -> bool:
    """Whether to project every token, T·(out·k_s + in'·k_a + k_s·k_a) multiply-adds per
    example, rather than form the gradient (T·out·in') and project it (the cheaper of the two
    orders); and always when a batch's gradients of the layer would exceed _GRADIENT_BYTES."""
    if rows * o * i * itemsize > _GRADIENT_BYTES:
        return True
    tokens = t * (o * ks + i * ka + ks * ka)
    summed = t * o * i + min(o * i * ka + o * ka * ks, ks * o * i + ks * i * ka)
    return tokens <= summed


def project(a: torch.Tensor, g: torch.Tensor, proj: LayerProjection) -> torch.Tensor:
    """[B, k_s, k_a] (or [B, out, in'] unprojected) from the per-token terms ā [B, T, in'] and
    g [B, T, out], in their dtype: P_Sᵀ (Σ_t g_t ā_tᵀ) P_A."""
    if proj.p_s is None:
        return torch.bmm(g.transpose(1, 2), a)
    p_s, p_a = proj.p_s, proj.p_a
    b, t, o = g.shape
    i, ks, ka = a.shape[-1], p_s.shape[1], p_a.shape[1]
    if tokens_first(t, o, i, ks, ka, b, g.element_size()):
        return torch.bmm((g @ p_s).transpose(1, 2), a @ p_a)
    grads = torch.bmm(g.transpose(1, 2), a)
    if o * i * ka + o * ka * ks <= ks * o * i + ks * i * ka:
        return p_s.T @ (grads @ p_a)
    return (p_s.T @ grads) @ p_a
