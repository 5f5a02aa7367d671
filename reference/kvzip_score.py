"""KVzip's reconstruction score for one chunk (op ``kvzip_score``)."""

from __future__ import annotations

from typing import Optional

import torch


def kvzip_score(
    q: torch.Tensor,
    k: torch.Tensor,
    k_self: torch.Tensor,
    sink_len: int,
    chunk_start: int,
    chunk_end: int,
    sm_scale: float,
    row_lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Max over the G query heads and all Lq rows of the softmax probability each chunk key receives.

    The softmax of query row i runs over [sink keys; chunk keys; the first i+1 self keys]. The whole
    probability matrix is materialised here (fine for a reference; the Triton kernel never does).
    ``row_lse`` fp32 [B, Hq, Lq], when given, is that softmax's normaliser (the log-sum-exp of the row's
    scaled logits over the keys it sees, e.g. from the attention that ran over the same rows): the
    probability is then ``exp(logit - row_lse)`` as given.
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
    logits = logits.masked_fill(~visible, float("-inf"))
    if row_lse is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        probs = torch.exp(logits - row_lse.float().reshape(B, Hkv, G, Lq, 1))
    chunk_probs = probs[..., sink_len : sink_len + m]  # [B, Hkv, G, Lq, m]
    return chunk_probs.amax(dim=(2, 3)).contiguous()
