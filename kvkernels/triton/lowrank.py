"""GEAR-style low-rank residual of the quantization error (op ``lowrank_residual``), Triton backend.

Algorithm (identical to ``kvkernels.reference.lowrank``): subspace iteration from the fixed start basis
``subspace_start(D, rank)``; each iteration maps the right basis through the error (U = orth(err.W)) and back
(W = errᵀ.U). The last W = errᵀ.U makes U.Wᵀ the projection of err on span(U), the best rank-r fit for that
basis. Returned U is orthonormal, both factors in err.dtype.

Why no custom kernel here: the work is r-wide skinny products over [T, D] plus a QR of a [T, r] panel per
(batch, head). Batched ``torch.matmul`` (cuBLAS) and ``torch.linalg.qr`` are the right tools for both, and
their batched forms run every (batch, head) at once. The part worth fusing is the step that *produces* the
error: ``kvkernels.triton.kivi.quantization_error`` quantizes, dequantizes and subtracts in one pass, so the
error tensor is written exactly once (the KIVI cache uses it when ``lowrank_rank > 0``).

Numerics: the iteration runs in fp32 whatever err's dtype (a fp16 QR loses orthogonality); the fp32 copy of
err is made once and reused by every iteration.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (the backend module imports Triton like its siblings; the dispatcher loads it lazily)

from kvkernels import tuning
from kvkernels.reference.lowrank import subspace_start


def _key(err, rank, iters):
    B, H, T, D = err.shape
    return f"D{D}-r{rank}-i{iters}-BH{tuning.length_bucket(B * H)}-N{tuning.length_bucket(T)}"


def _default(err, rank, iters):
    return {}


def _orthonormal_left(e32: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """orth(err.W): the reduced QR's Q of the [B, H, T, r] panel."""
    return torch.linalg.qr(torch.matmul(e32, W), mode="reduced").Q


def lowrank_residual(err: torch.Tensor, rank: int, iters: int, *, config=None):
    """(U [B,H,T,r] orthonormal, W [B,H,D,r]) with U.Wᵀ ≈ err, by ``iters`` subspace iterations."""
    # config is accepted for the tuning contract; there is no launch parameter to tune in this op.
    e32 = err if err.dtype == torch.float32 else err.float()
    B, H, T, D = err.shape
    W = subspace_start(D, rank, err.device).expand(B, H, D, rank)
    U = None
    for _ in range(iters):
        U = _orthonormal_left(e32, W)
        W = torch.matmul(e32.transpose(-1, -2), U)
    return U.to(err.dtype).contiguous(), W.to(err.dtype).contiguous()


TUNABLE = {
    "lowrank_residual": {
        "space": [{}],
        "key": _key,
        "default": _default,
    },
}
