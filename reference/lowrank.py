"""GEAR-style low-rank approximation of the quantization error (op ``lowrank_residual``)."""

from __future__ import annotations

import torch

_START_SEED = 0x6EA2


def subspace_start(D: int, rank: int, device: torch.device) -> torch.Tensor:
    """The fixed random [D, rank] start of the iteration, the same for every backend and every call."""
    gen = torch.Generator(device="cpu").manual_seed(_START_SEED)
    return torch.randn(D, rank, generator=gen, dtype=torch.float32).to(device)


def lowrank_residual(err: torch.Tensor, rank: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [B,H,T,r], W [B,H,D,r]) with U orthonormal and U·Wᵀ ≈ err, by ``iters`` subspace iterations.

    Each iteration maps the right basis through err (U = orth(err·W)) and back (W = errᵀ·U); the last
    W = errᵀ·U makes U·Wᵀ the projection of err on span(U), the best rank-r fit for that basis.
    """
    e = err.float()
    W = subspace_start(e.shape[-1], rank, e.device).expand(*e.shape[:2], -1, -1)
    U = None
    for _ in range(iters):
        U = torch.linalg.qr(e @ W).Q
        W = e.transpose(-1, -2) @ U
    return U.to(err.dtype).contiguous(), W.to(err.dtype).contiguous()
