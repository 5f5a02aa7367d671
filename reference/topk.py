"""Exact per-row top-k selection as a boolean mask (op ``topk_mask``)."""

from __future__ import annotations

import torch

# The order-preserving integer image of fp32 used by the references and the kernels alike:
# non-negative floats keep their bits, negative floats get their magnitude bits flipped, so integer
# order equals float order. NaN (either sign) maps below the image of -inf, and -0.0 is folded onto
# +0.0 first, so that the two zeros tie, as float comparison says they do.
NAN_KEY = -(2**31)


def sortable_key(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys whose order is the float order of ``scores`` (NaN lowest, -0.0 == +0.0)."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return torch.where(torch.isnan(scores), torch.full_like(keys, NAN_KEY), keys)


def trivial_mask(scores: torch.Tensor, k: int) -> torch.Tensor | None:
    """The mask when no selection is needed (nothing or everything kept, or no rows), else None.

    Shared by the kernels, which skip their launches in these cases.
    """
    R, M = scores.shape
    kk = min(k, M)
    if R == 0 or kk == 0:
        return torch.zeros((R, M), dtype=torch.bool, device=scores.device)
    if kk == M:
        return torch.ones((R, M), dtype=torch.bool, device=scores.device)
    return None


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the min(k, M) largest entries of each row; ties go to the lower column index."""
    R, M = scores.shape
    kk = min(k, M)
    mask = torch.zeros(R, M, dtype=torch.bool, device=scores.device)
    if kk == 0 or R == 0:
        return mask
    # A stable descending sort keeps equal keys in index order, which is exactly the tie rule.
    order = torch.sort(sortable_key(scores).long(), dim=1, descending=True, stable=True).indices
    mask.scatter_(1, order[:, :kk], True)
    return mask
