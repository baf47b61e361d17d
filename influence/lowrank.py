"""Low-rank query gradients: a seeded randomized truncated SVD of each query's matrix.

The paper's query batching: each layer's preconditioned query gradient is stored as a rank-r
factorisation U diag(σ) Vᵀ, so that scores are cheap to form token by token and many queries
fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """A layer's preconditioned query gradients as U diag(σ) Vᵀ, U [Q, out, r], V [Q, in', r]."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    _dense: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """The [Q, out, in'] matrices, built once and kept (the dense path reuses them)."""
        if self._dense is None:
            self._dense = (self.u * self.s.unsqueeze(-2)) @ self.v.transpose(-1, -2)
        return self._dense


def _cholesky_factor(y: torch.Tensor) -> torch.Tensor:
    """Upper R with RᵀR = yᵀy + δI (float64): y R⁻¹ is a well-conditioned basis of y's columns.

    The shift δ, of the order of rounding in yᵀy, keeps the factorisation defined when y is
    (numerically) rank-deficient (shifted Cholesky QR, Fukaya et al. 2020); it only perturbs
    directions far below the kept ones. Cholesky QR replaces Householder QR because batched
    Householder of many tall-thin matrices is several times slower on a CPU.
    """
    gram = (y.transpose(-1, -2) @ y).double()
    rows, width = y.shape[-2:]
    scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    shift = 11 * (rows * width + width * (width + 1)) * torch.finfo(torch.float64).eps * scale
    eye = torch.eye(width, dtype=torch.float64, device=y.device)
    return torch.linalg.cholesky(gram + shift[..., None, None] * eye, upper=True)


def low_rank(
    p: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 1, seed: int = 0
) -> LowRank | torch.Tensor:
    """Rank-`rank` truncated SVD of each query's [out, in'] matrix.

    A randomized range finder (Halko, Martinsson & Tropp 2011) with `oversample` extra columns
    and `power_iters` power iterations, seeded, so it is deterministic; it is near the exact
    truncation when the spectrum decays (tested). The SVD within the range Y comes from the
    small generalized eigenproblem (zᵀz) x = σ² (YᵀY) x with z = pᵀY, so the only
    factorisations are of width × width matrices. When `rank` covers the matrix nothing is
    truncated and the matrices are returned as they are.
    """
    q, o, i = p.shape
    k = min(rank, o, i)
    if k == min(o, i):
        return p
    out_dtype = p.dtype
    # The range finder runs in float64 whatever p's dtype: the Cholesky shift is sized for
    # float64 rounding, and float32 products of a rank-deficient p (a query with few completion
    # tokens) leave yᵀy indefinite at float32 rounding, far above that shift.
    p = p.double()
    width = min(k + oversample, o, i)
    gen = torch.Generator().manual_seed(seed)
    y = p @ torch.randn(i, width, generator=gen, dtype=torch.float64).to(p)
    eye = torch.eye(width, dtype=torch.float64, device=p.device)

    def transposed_product(y: torch.Tensor) -> torch.Tensor:  # pᵀy without copying p
        return (y.transpose(-1, -2) @ p).transpose(-1, -2)

    for _ in range(power_iters):
        r_inv = torch.linalg.solve_triangular(_cholesky_factor(y), eye, upper=True)
        y = p @ transposed_product(y @ r_inv.to(p.dtype))
    z = transposed_product(y).double()  # [Q, in', width]
    y = y.double()
    r = _cholesky_factor(y)
    # C = R⁻ᵀ zᵀz R⁻¹ is b bᵀ for b = (Y R⁻¹)ᵀ p, the projection of p onto the range.
    c = torch.linalg.solve_triangular(r, z.transpose(-1, -2) @ z, upper=True, left=False)
    c = torch.linalg.solve_triangular(r.transpose(-1, -2), c, upper=False)
    evals, evecs = torch.linalg.eigh((c + c.transpose(-1, -2)) / 2)
    s = evals[..., -k:].flip(-1).clamp_min(0).sqrt()
    t = torch.linalg.solve_triangular(r, evecs[..., -k:].flip(-1), upper=True)  # R⁻¹ W_k
    u = y @ t
    # A zero singular value (rank-deficient p) gets a zero column of V, not z/tiny, which
    # overflows once cast to float32 and turns U diag(σ) Vᵀ into NaN.
    pos = s > 0
    v = (z @ t) / torch.where(pos, s, torch.ones_like(s)).unsqueeze(-2) * pos.unsqueeze(-2)
    return LowRank(u.to(out_dtype), s.to(out_dtype), v.to(out_dtype))


def cat_queries(parts: list[LowRank | torch.Tensor]) -> LowRank | torch.Tensor:
    """Concatenate query chunks (all dense or all factorised) along the query dimension."""
    if isinstance(parts[0], LowRank):
        return LowRank(*(torch.cat([getattr(p, f) for p in parts]) for f in ("u", "s", "v")))
    return torch.cat(parts)
