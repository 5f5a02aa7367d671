"""KVzip's reconstruction score for one chunk (op ``kvzip_score``)."""

from __future__ import annotations

import torch


def kvzip_score(
    q: torch.Tensor,
    k: torch.Tensor,
    k_self: torch.Tensor,
    sink_len: int,
    chunk_start: int,
    chunk_end: int,
    sm_scale: float,
) -> torch.Tensor:
    """Max over the G query heads and all Lq rows of the softmax probability each chunk key receives.

    The softmax of query row i runs over [sink keys; chunk keys; the first i+1 self keys]. The whole
    probability matrix is materialised here (fine for a reference; the Triton kernel never does).
    """
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    m = chunk_end - chunk_start
    # Query head h reads KV head h // G, so heads hk*G .. hk*G+G-1 share KV head hk.
    qf = q.float().reshape(B, Hkv, G, Lq, D)
    keys = torch.cat([k[:, :, :sink_len], k[:, :, chunk_start:chunk_end], k_self], dim=2).float()
    logits = torch.einsum("bhgld,bhsd->bhgls", qf, keys) * sm_scale
    rows = torch.arange(Lq, device=q.device)
    self_visible = rows[None, :] <= rows[:, None]  # [Lq rows, Lq self keys]: causal inside the self block
    visible = torch.cat([torch.ones(Lq, sink_len + m, dtype=torch.bool, device=q.device), self_visible], dim=1)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    chunk_probs = probs[..., sink_len : sink_len + m]  # [B, Hkv, G, Lq, m]
    return chunk_probs.amax(dim=(2, 3)).contiguous()
