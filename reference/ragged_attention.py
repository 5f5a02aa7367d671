"""Attention over the ragged per-head pool (op ``ragged_attention``)."""

from __future__ import annotations

import torch


def ragged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    sm_scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bottom-right causal attention of q [B, Hq, Lq, D] over each KV head's segment of the pool.

    The segments are gathered into a padded [B, Hkv, max_len, D] block (a host read of the longest
    length, which a reference may afford) and masked past each segment's own length.
    """
    B, Hq, Lq, D = q.shape
    Hkv = seg_start.shape[1]
    G = Hq // Hkv
    max_len = int(seg_len.max()) if seg_len.numel() else 0
    pos = torch.arange(max_len, device=q.device)
    rows = (seg_start[..., None] + pos).clamp(max=max(k_pool.shape[0] - 1, 0))  # [B, Hkv, max_len]
    # Rows past a segment's length (its slack, or the next segment) are unspecified and may hold NaN/inf:
    # zero them, since a masked probability of 0 times NaN would still be NaN.
    in_segment = (pos < seg_len.long()[..., None])[..., None]  # [B, Hkv, max_len, 1]
    keys = k_pool[rows].float().masked_fill(~in_segment, 0.0)  # [B, Hkv, max_len, D]
    vals = v_pool[rows].float().masked_fill(~in_segment, 0.0)
    logits = torch.einsum("bhgld,bhsd->bhgls", q.float().reshape(B, Hkv, G, Lq, D), keys) * sm_scale
    # Query row i sees segment rows 0 .. len - Lq + i: its own key is the (Lq - i)-th from the end.
    last_visible = seg_len.long()[..., None] - Lq + torch.arange(Lq, device=q.device)  # [B, Hkv, Lq]
    visible = pos[None, None, None, :] <= last_visible[..., None]  # [B, Hkv, Lq, max_len]
    logits = logits.masked_fill(~visible[:, :, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf where nothing is visible
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)  # empty rows: exp(-inf - -inf) = nan -> 0
    out = torch.einsum("bhgls,bhsd->bhgld", probs, vals)
    o = out.reshape(B, Hq, Lq, -1).to(q.dtype).contiguous()  # the op's fake kernel promises contiguous
    lse = lse.reshape(B, Hq, Lq) if return_lse else lse.new_empty(0)
    return o, lse.contiguous()
