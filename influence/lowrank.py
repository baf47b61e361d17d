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
    _stacked: tuple[torch.Tensor, torch.Tensor] | None = None
    _scaled: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        """The number of queries, as `len` of a dense [Q, out, in'] tensor."""
        return self.u.shape[0]

    def dense(self) -> torch.Tensor:
        """The [Q, out, in'] matrices, built once and kept (the dense path reuses them)."""
        if self._dense is None:
            self._dense = torch.bmm(*self.scaled())
        return self._dense

    def scaled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U diag σ [Q, out, r], Vᵀ [Q, r, in']), built once: any rows of the dense
        matrices are then one batched product."""
        if self._scaled is None:
            us = (self.u * self.s.unsqueeze(-2)).contiguous()
            self._scaled = (us, self.v.transpose(-1, -2).contiguous())
        return self._scaled

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U diag σ, V) of all queries side by side, [out, Q·r] and [in', Q·r], built once:
        a batch's tokens then meet every query's factors in one wide product each."""
        if self._stacked is None:
            q, o, r = self.u.shape
            us = (self.u * self.s.unsqueeze(-2)).permute(1, 0, 2).reshape(o, q * r)
            v = self.v.permute(1, 0, 2).reshape(self.v.shape[1], q * r)
            self._stacked = (us.contiguous(), v.contiguous())
        return self._stacked


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
    truncation when the spectrum decays (tested). The range Y is made a bounded basis
    B = Y R⁻¹ by a shifted Cholesky factor, and the SVD within it comes from the small
    matrix Bᵀp, so the only factorisations are of width × width matrices. When `rank` covers
    the matrix nothing is truncated and the matrices are returned as they are.

    Only the products with p run in p's dtype (they are the whole cost: three reads of p, at
    twice the speed in float32 and with no float64 copy); the Gram matrices, factors and the
    small eigenproblem are float64. Products with the bounded basis lose nothing beyond p's
    own rounding, whereas pᵀY followed by R⁻¹ would amplify float32 rounding in the directions
    a rank-deficient p lacks (a query with few completion tokens).
    """
    q, o, i = p.shape
    k = min(rank, o, i)
    if k == min(o, i):
        return p
    width = min(k + oversample, o, i)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(i, width, generator=gen, dtype=torch.float64).to(p)

    def basis(y: torch.Tensor) -> torch.Tensor:
        # Y R⁻¹ with R from the float64 Gram matrix; the product itself runs in p's dtype.
        r = _cholesky_factor(y.double())
        eye = torch.eye(width, dtype=torch.float64, device=p.device)
        return y @ torch.linalg.solve_triangular(r, eye, upper=True).to(p.dtype)

    y = p @ omega
    for _ in range(power_iters):
        b = basis(y)
        y = p @ (b.transpose(-1, -2) @ p).transpose(-1, -2)
    b = basis(y)
    proj = (b.transpose(-1, -2) @ p).double()  # [Q, width, in']
    evals, evecs = torch.linalg.eigh(proj @ proj.transpose(-1, -2))
    s = evals[..., -k:].flip(-1).clamp_min(0).sqrt()
    w = evecs[..., -k:].flip(-1)
    u = b @ w.to(p.dtype)
    # A zero singular value (rank-deficient p) gets a zero column of V, not 0/0 or z/tiny,
    # which overflows once cast to float32 and turns U diag(σ) Vᵀ into NaN.
    pos = s > 0
    v = (proj.transpose(-1, -2) @ w) / torch.where(pos, s, torch.ones_like(s)).unsqueeze(-2)
    v = v * pos.unsqueeze(-2)
    return LowRank(u.to(p.dtype), s.to(p.dtype), v.to(p.dtype))
