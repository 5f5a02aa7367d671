"""The quantized ragged pool: KVzip's per-head segments held as KIVI codes plus a full-precision tail.

Layout (one pool for all layers; segment s = (l, b, h) in flat (l, b, h) order; F = 32 // bits codes per
int32, LSB first; GS = group_size; R = residual):

* Quantized rows. Segment s owns quantized rows ``q_start[s] .. q_start[s] + q_cap[s]`` (q_start and
  q_cap multiples of GS); its first ``q_len[s]`` (a multiple of GS) are its oldest kept rows in token
  order. The buffers are ``kivi_quantize``'s layouts over the row axis, as if the whole pool were one
  [1, 1, Q, D] tensor: keys per channel over GS consecutive rows, ``k_codes`` int32 [Q/F, D] (packed
  along rows), ``k_scale``/``k_zero`` [Q/GS, D]; values per row over GS channels, ``v_codes`` int32
  [Q, D/F] (packed along channels), ``v_scale``/``v_zero`` [Q, D/GS]. A segment's quantized rows never
  change once written (flushes only write past ``q_len``).
* Tail. ``k_tail``/``v_tail`` [L, B, H, TC, D] hold each segment's newest ``seg_len - q_len`` rows in
  full precision, as a ring: tail row i is ``tail[..., (t_head + i) % TC, :]``. TC = R + GS - 1 + slack.
* ``seg_len`` counts live rows (quantized + tail); ``seg_cap = seg_len at build + slack`` bounds it.

Flush rule: a segment keeps at least R rows in the tail; whenever it holds R + GS or more, its oldest
``floor((tail - R) / GS) * GS`` rows are quantized (keys and values together) into the next quantized
rows. ``quant_pool_append`` flushes *before* writing its new rows by default (``flush_after=False``):
the groups completed by earlier steps are quantized and the new rows are attended in full precision,
which is the official KIVI order (attend, then quantize). ``flush_after=True`` writes first and then
flushes, so a group completed by this call is quantized before the attention that follows reads it.

Rollback: appends only write quantized rows past ``q_len`` and tail slots past the live ring window, and
the ring has room for every row the slack allows, so restoring ``(q_len, t_head, seg_len)`` returns the
pool exactly to its build state (no data copy).

Attention semantics (this reference): the segment is [dequant(its q_len quantized rows); its tail rows],
attended with ``ragged_attention``'s bottom-right causal rule. GEAR low-rank residuals are not supported.
"""

from __future__ import annotations

import torch

from kvkernels._validate import PoolOverflowError

from .kivi import codes_per_word, kivi_dequantize, kivi_quantize
from .ragged_attention import ragged_attention


def tail_capacity(group_size: int, residual: int, slack: int) -> int:
    """Ring slots per segment: the most rows a tail can hold (R + GS - 1 after a flush, + the slack)."""
    return residual + group_size - 1 + slack


def flush_rows(tail_rows: torch.Tensor, group_size: int, residual: int) -> torch.Tensor:
    """Rows a flush quantizes: whole groups of the rows past the residual window, oldest first."""
    return torch.clamp(tail_rows - residual, min=0) // group_size * group_size


def quant_layout(seg_len: torch.Tensor, group_size: int, residual: int, slack: int):
    """(q_start int64, q_cap int32, seg_cap int32) for segments of ``seg_len`` rows at build."""
    seg_cap = (seg_len.long() + slack)
    q_cap = flush_rows(seg_cap, group_size, residual)  # every row past the window, in whole groups
    flat = q_cap.flatten()
    q_start = (torch.cumsum(flat, 0) - flat).view(seg_len.shape)
    return q_start, q_cap.to(torch.int32), seg_cap.to(torch.int32)


def quant_pool_rows(seg_len: torch.Tensor, group_size: int, residual: int, slack: int) -> int:
    """Q, the quantized rows of a pool built from ``seg_len`` (a host read: call it once, at build)."""
    return int(quant_layout(seg_len, group_size, residual, slack)[1].long().sum())


def _segment_rows(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment, rank inside the segment) of every row of segments holding ``counts`` [S] rows."""
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return seg, torch.arange(seg.numel(), device=counts.device) - first[seg]


def build_with(quantize, k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack, q_rows):
    """``quant_pool_build`` with the given ``kivi_quantize`` implementation (the reference's or a kernel's).

    The rows to quantize are gathered into one [Q, D] tensor in the pool's row order (unused capacity
    zero: it quantizes to scale 0, zero 0, code 0), so one key and one value quantization of that tensor
    produce the pool's buffers directly: segment starts are multiples of GS, so groups never straddle.
    """
    L, B, H = seg_start.shape
    S, D = L * B * H, k_pool.shape[1]
    q_start, q_cap, seg_cap = quant_layout(seg_len, group_size, residual, slack)
    n0 = seg_len.long().flatten()
    nq = flush_rows(n0, group_size, residual)
    starts = seg_start.flatten()

    seg, rank = _segment_rows(nq)
    src, dst = starts[seg] + rank, q_start.flatten()[seg] + rank
    x_k, x_v = k_pool.new_zeros(q_rows, D), v_pool.new_zeros(q_rows, D)
    x_k[dst], x_v[dst] = k_pool[src], v_pool[src]
    k_codes, k_scale, k_zero = (t[0, 0] for t in quantize(x_k[None, None], bits, group_size, "key"))
    v_codes, v_scale, v_zero = (t[0, 0] for t in quantize(x_v[None, None], bits, group_size, "value"))

    TC = tail_capacity(group_size, residual, slack)
    k_tail, v_tail = k_pool.new_zeros(L, B, H, TC, D), v_pool.new_zeros(L, B, H, TC, D)
    seg, rank = _segment_rows(n0 - nq)
    src = starts[seg] + nq[seg] + rank
    k_tail.view(S, TC, D)[seg, rank] = k_pool[src]
    v_tail.view(S, TC, D)[seg, rank] = v_pool[src]
    q_len = nq.to(torch.int32).view(L, B, H)
    t_head = torch.zeros_like(q_len)
    return (k_codes.contiguous(), k_scale.contiguous(), k_zero.contiguous(), v_codes.contiguous(),
            v_scale.contiguous(), v_zero.contiguous(), k_tail, v_tail, q_start, q_len, q_cap, t_head,
            seg_len.to(torch.int32).clone(), seg_cap)


def quant_pool_build(k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack, q_rows):
    """Quantize a ragged fp pool (``compact_kv``'s output, every layer) into a quantized ragged pool.

    Returns (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap,
    t_head, seg_len, seg_cap); ``q_rows`` must be :func:`quant_pool_rows` of ``seg_len``.
    """
    return build_with(kivi_quantize, k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack,
                      q_rows)


def append_plan(q_len, t_head, seg_len, t, group_size, residual, flush_after):
    """Per segment of one layer: (tail rows now, rows this append flushes) as int64 [B, H]."""
    tail = (seg_len - q_len).long()
    pending = tail + t if flush_after else tail
    return tail, flush_rows(pending, group_size, residual)


def check_quant_capacity(q_len, q_cap, t_head, seg_len, seg_cap, layer, t, tail_cap, group_size, residual,
                         flush_after) -> None:
    """Raise PoolOverflowError unless appending t rows to every segment of ``layer`` fits (a host read).

    Fits = seg_len + t <= seg_cap, the flushed rows fit the quantized capacity, and the ring never holds
    more than TC rows (with ``flush_after`` the new rows are in the ring before the flush frees slots).
    """
    tail, n_flush = append_plan(q_len[layer], t_head[layer], seg_len[layer], t, group_size, residual, flush_after)
    ring = tail + t if flush_after else tail - n_flush + t
    short = ((seg_len[layer].long() + t > seg_cap[layer].long()) | (q_len[layer].long() + n_flush > q_cap[layer].long())
             | (ring > tail_cap))
    if bool(short.any()):
        b, h = (int(i) for i in short.nonzero()[0])
        raise PoolOverflowError(
            f"kvkernels.quant_pool_append: appending t = {t} rows to layer {layer} would overflow segment "
            f"(batch {b}, head {h}): seg_len = {int(seg_len[layer, b, h])}, seg_cap = {int(seg_cap[layer, b, h])}, "
            f"q_len = {int(q_len[layer, b, h])}, q_cap = {int(q_cap[layer, b, h])}, tail capacity {tail_cap}; "
            f"{int(short.sum())} segment(s) lack room. Nothing was written. Build with more slack (and the "
            f"same residual), or roll back."
        )


def _pending_rows(tail_buf, head, tail, new, count):
    """The first ``count`` rows of [ring rows head .. head + tail ; new rows] of one segment."""
    TC = tail_buf.shape[0]
    i = torch.arange(count, device=new.device)
    from_ring = tail_buf[(head + i.clamp(max=max(tail - 1, 0))) % TC]
    from_new = new[(i - tail).clamp(min=0, max=max(new.shape[0] - 1, 0))] if new.shape[0] else from_ring
    return torch.where((i < tail)[:, None], from_ring, from_new)


def write_quantized(quantize, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, row, k_rows, v_rows, bits,
                    group_size) -> None:
    """Quantize k_rows/v_rows [f, D] (f whole groups, oldest first) into quantized rows row .. row + f."""
    F, f = codes_per_word(bits), k_rows.shape[0]
    c, s, z = (u[0, 0] for u in quantize(k_rows[None, None], bits, group_size, "key"))
    groups = slice(row // group_size, (row + f) // group_size)
    k_codes[row // F:(row + f) // F], k_scale[groups], k_zero[groups] = c, s, z
    c, s, z = (u[0, 0] for u in quantize(v_rows[None, None], bits, group_size, "value"))
    v_codes[row:row + f], v_scale[row:row + f], v_zero[row:row + f] = c, s, z


def append_with(quantize, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                q_cap, t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual, flush_after):
    """``quant_pool_append`` with the given quantize implementation: new rows are written for all segments
    at once; the (rare) flushes loop over the segments that flush."""
    B, H, t, D = k_new.shape
    TC = k_tail.shape[3]
    check_quant_capacity(q_len, q_cap, t_head, seg_len, seg_cap, layer, t, TC, group_size, residual, flush_after)
    tail, n_flush = append_plan(q_len[layer], t_head[layer], seg_len[layer], t, group_size, residual, flush_after)
    head = t_head[layer].long()
    for b, h in n_flush.nonzero().tolist():
        f, tl_, hd = int(n_flush[b, h]), int(tail[b, h]), int(head[b, h])
        k_rows = _pending_rows(k_tail[layer, b, h], hd, tl_, k_new[b, h], f)
        v_rows = _pending_rows(v_tail[layer, b, h], hd, tl_, v_new[b, h], f)
        row = int(q_start[layer, b, h]) + int(q_len[layer, b, h])  # first quantized row to write
        write_quantized(quantize, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, row, k_rows, v_rows, bits,
                        group_size)
    if t:
        slots = (head + tail)[..., None] + torch.arange(t, device=k_new.device)  # [B, H, t]
        seg_idx = torch.arange(B * H, device=k_new.device)[:, None].expand(B * H, t)
        k_tail[layer].view(B * H, TC, D)[seg_idx, slots.view(B * H, t) % TC] = k_new.reshape(B * H, t, D).to(k_tail.dtype)
        v_tail[layer].view(B * H, TC, D)[seg_idx, slots.view(B * H, t) % TC] = v_new.reshape(B * H, t, D).to(v_tail.dtype)
    t_head[layer] = ((head + n_flush) % TC).to(torch.int32)
    q_len[layer] += n_flush.to(torch.int32)
    seg_len[layer] += t


def quant_pool_append(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap,
                      t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual, flush_after):
    """Append k_new/v_new [B, H, t, D] to every segment of ``layer`` in place, flushing whole groups.

    Overflow is checked first (a host read); nothing is written if any segment lacks room.
    """
    append_with(kivi_quantize, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                q_cap, t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual, flush_after)


def dequantized_segments(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                         t_head, seg_len, bits, group_size):
    """One layer's segments as a padded fp pool: (k [S*N, D], v, seg_start [B, H], seg_len) with N the
    longest segment; row r of a segment is its dequantized row r (r < q_len) or tail row r - q_len."""
    B, H, TC, D = k_tail.shape
    S = B * H
    k_deq = kivi_dequantize(k_codes[None, None], k_scale[None, None], k_zero[None, None], bits, group_size, "key")[0, 0]
    v_deq = kivi_dequantize(v_codes[None, None], v_scale[None, None], v_zero[None, None], bits, group_size,
                            "value")[0, 0]
    n = int(seg_len.max()) if S else 0
    pos = torch.arange(n, device=k_tail.device)
    nq, start, head = q_len.long().flatten()[:, None], q_start.flatten()[:, None], t_head.long().flatten()[:, None]
    quantized = pos < nq  # [S, n]
    q_row = (start + pos).clamp(max=max(k_deq.shape[0] - 1, 0))
    slot = (head + pos - nq).clamp(min=0) % TC
    seg = torch.arange(S, device=k_tail.device)[:, None]
    empty = k_deq.shape[0] == 0
    k_q = k_tail.new_zeros(S, n, D) if empty else k_deq[q_row]
    v_q = v_tail.new_zeros(S, n, D) if empty else v_deq[q_row]
    k = torch.where(quantized[..., None], k_q, k_tail.reshape(S, TC, D)[seg, slot])
    v = torch.where(quantized[..., None], v_q, v_tail.reshape(S, TC, D)[seg, slot])
    seg_start = (torch.arange(S, device=k_tail.device) * n).view(B, H)
    return k.reshape(S * n, D), v.reshape(S * n, D), seg_start, seg_len


def quant_pool_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                         t_head, seg_len, bits, group_size, sm_scale, return_lse):
    """Attention of q [B, Hq, Lq, D] over one layer's segments: dequantize, then ``ragged_attention``.

    Per-layer arguments: k_tail/v_tail [B, H, TC, D], q_start/q_len/t_head/seg_len [B, H].
    """
    k, v, seg_start, lens = dequantized_segments(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail,
                                                 q_start, q_len, t_head, seg_len, bits, group_size)
    return ragged_attention(q, k, v, seg_start, lens, sm_scale, return_lse)
