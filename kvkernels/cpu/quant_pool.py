"""CPU kernel of ``quant_pool_attention``: one layer, all segments at once, blockwise over segments.

The reference dequantizes the *whole* pool (every layer) and copies each segment into a padded fp pool
before calling ``ragged_attention``. Here one call gathers only this layer's live words (as int32, 1/F
of a row's bytes for keys), unpacks and scales them in a few batched tensor ops, and attends with two
batched matmuls over [segments, query rows, rows]: the quantized rows and the tail rows are separate
blocks of one softmax, so neither is copied next to the other. ``quant_pool_append`` and
``quant_pool_build`` fall through to the reference, which already writes all segments of a layer at once
and loops only over the segments that flush (one in group_size steps).
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> int32 codes, ``dim`` grown F-fold (LSB first), without an int64 copy."""
    F = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    w = words.unsqueeze(dim + 1) if dim >= 0 else words.unsqueeze(dim)
    shape = [1] * w.dim()
    shape[dim + 1 if dim >= 0 else dim] = F
    c = (w >> shifts.view(shape)) & ((1 << bits) - 1)  # arithmetic shift; the mask keeps the field only
    out_shape = list(words.shape)
    out_shape[dim] *= F
    return c.reshape(out_shape)


def _quantized_rows(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, start, n, bits, group_size):
    """Dequantized keys and values [S, n, D] of rows start .. start + n of each segment (n % GS == 0)."""
    F = 32 // bits
    D = k_codes.shape[1]
    # Segments shorter than n read past their own rows (masked by the caller); clamp to stay in the buffers.
    words = ((start // F)[:, None] + torch.arange(n // F)).clamp_(max=k_codes.shape[0] - 1)
    groups = ((start // group_size)[:, None] + torch.arange(n // group_size)).clamp_(max=k_scale.shape[0] - 1)
    S = start.numel()
    k = _unpack(k_codes[words], bits, 1).view(S, n // group_size, group_size, D).float()
    k = (k * k_scale[groups].float()[:, :, None] + k_zero[groups].float()[:, :, None]).view(S, n, D)
    rows = (start[:, None] + torch.arange(n)).clamp_(max=v_codes.shape[0] - 1)
    v = _unpack(v_codes[rows], bits, 2).view(S, n, D // group_size, group_size).float()
    v = (v * v_scale[rows].float()[..., None] + v_zero[rows].float()[..., None]).view(S, n, D)
    # Round to the storage dtype like kivi_dequantize, so results equal the reference's.
    return k.to(k_scale.dtype).float(), v.to(v_scale.dtype).float()


def quant_pool_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                         t_head, seg_len, bits, group_size, sm_scale, return_lse):
    """Same contract as :func:`kvkernels.reference.quant_pool.quant_pool_attention`."""
    B, Hq, Lq, D = q.shape
    _, H, TC, _ = k_tail.shape
    S, G = B * H, Hq // H
    nq = q_len.reshape(S).long()
    n = seg_len.reshape(S).long()
    nt = n - nq
    max_q = int(nq.max()) if S else 0  # host reads: fine on CPU, where there is no graph to capture
    max_t = int(nt.max()) if S else 0
    qf = q.reshape(S, G * Lq, D).float() * sm_scale
    i = torch.arange(Lq).repeat(G)  # query row of each of the G*Lq rows
    last_visible = n[:, None] - Lq + i  # [S, M]: bottom-right causal limit (segment row index)

    blocks = []  # (logits [S, M, r], values [S, r, D])
    if max_q:
        k, v = _quantized_rows(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, q_start.reshape(S), max_q, bits,
                               group_size)
        pos = torch.arange(max_q)
        ok = (pos < nq[:, None])[:, None, :] & (pos[None, None, :] <= last_visible[..., None])
        blocks.append((torch.bmm(qf, k.transpose(1, 2)).masked_fill_(~ok, _NEG_INF), v.masked_fill_(
            ~(pos < nq[:, None])[..., None], 0.0)))
    if max_t:
        j = torch.arange(max_t)
        slots = (t_head.reshape(S).long()[:, None] + j) % TC
        seg = torch.arange(S)[:, None]
        live = j < nt[:, None]
        k = k_tail.reshape(S, TC, D)[seg, slots].float()
        v = v_tail.reshape(S, TC, D)[seg, slots].float().masked_fill_(~live[..., None], 0.0)
        pos = nq[:, None] + j  # segment row index of tail row j
        ok = live[:, None, :] & (pos[:, None, :] <= last_visible[..., None])
        blocks.append((torch.bmm(qf, k.transpose(1, 2)).masked_fill_(~ok, _NEG_INF), v))

    M = G * Lq
    if not blocks:
        o = q.new_zeros(B, Hq, Lq, D)
        lse = torch.full((B, Hq, Lq), _NEG_INF) if return_lse else torch.empty(0)
        return o, lse
    logits = torch.cat([b[0] for b in blocks], 2) if len(blocks) > 1 else blocks[0][0]
    values = torch.cat([b[1] for b in blocks], 1) if len(blocks) > 1 else blocks[0][1]
    lse = torch.logsumexp(logits, dim=2)  # [S, M]; -inf where nothing is visible
    probs = torch.exp(logits - lse.nan_to_num(neginf=0.0)[..., None])  # exp(-inf) = 0 for empty rows
    o = torch.bmm(probs, values).view(B, H, G, Lq, D).reshape(B, Hq, Lq, D).to(q.dtype).contiguous()
    lse = lse.view(B, Hq, Lq).contiguous() if return_lse else lse.new_empty(0)
    return o, lse
