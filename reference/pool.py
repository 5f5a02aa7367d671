"""The ragged per-head KV pool: physical eviction (``compact_kv``) and in-place append (``ragged_append``)."""

from __future__ import annotations

import torch

from kvkernels._validate import check_capacity


def segment_layout(counts: torch.Tensor, slack: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seg_start int64, seg_len int32, seg_cap int32) for per-segment kept counts, segments in flat order."""
    seg_len = counts.to(torch.int32)
    seg_cap = seg_len + slack
    ends = torch.cumsum(seg_cap.flatten().long(), dim=0)
    seg_start = (ends - seg_cap.flatten().long()).view(counts.shape)
    return seg_start, seg_len, seg_cap


def compact_kv(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    keep: torch.Tensor,
    num_kept: int,
    slack: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy the kept rows of every (layer, batch, head) into one pool, in token order, plus slack rows.

    Slack rows are zero-filled (every backend does this, so the op is deterministic).
    """
    L, B, H, N = keep.shape
    D = keys[0].shape[-1]
    seg_start, seg_len, seg_cap = segment_layout(keep.sum(dim=-1), slack)
    P = num_kept + L * B * H * slack
    k_pool = keys[0].new_zeros(P, D)
    v_pool = values[0].new_zeros(P, values[0].shape[-1])
    flat_keep = keep.reshape(L * B * H, N)
    # Destination of kept token n of segment s: its segment start plus the number of kept tokens before it.
    rank_in_segment = torch.cumsum(flat_keep.long(), dim=1) - 1
    dest = (seg_start.reshape(-1, 1) + rank_in_segment)[flat_keep]
    k_pool[dest] = torch.stack(keys).reshape(L * B * H, N, D)[flat_keep]
    v_pool[dest] = torch.stack(values).reshape(L * B * H, N, -1)[flat_keep]
    return k_pool, v_pool, seg_start, seg_len, seg_cap


def ragged_append(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    seg_cap: torch.Tensor,
    layer: int,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
) -> None:
    """Write k_new/v_new [B, Hkv, t, D] after the live rows of each segment of ``layer``; grow seg_len.

    Overflow is checked first (a host read): nothing is written if any segment lacks room.
    """
    t = k_new.shape[2]
    check_capacity(seg_len, seg_cap, layer, t)
    if t == 0:
        return
    starts = seg_start[layer] + seg_len[layer].long()  # [B, Hkv]
    dest = (starts[..., None] + torch.arange(t, device=starts.device)).reshape(-1)
    k_pool[dest] = k_new.reshape(-1, k_new.shape[-1]).to(k_pool.dtype)
    v_pool[dest] = v_new.reshape(-1, v_new.shape[-1]).to(v_pool.dtype)
    seg_len[layer] += t
