"""CPU kernels of ``quant_pool_attention`` and ``quant_pool_append``: segment by segment, from the host.

The tensors are CPU tensors, so the small per-layer tables (``q_start``, ``q_len``, ``t_head``,
``seg_len``, capacities) are read on the host once per call and all bookkeeping is Python arithmetic over
a few ints per segment; only the rows themselves go through tensor ops.

Attention. Each segment's quantized rows are a contiguous slice of the codes (segment starts are
multiples of the group size), so they are unpacked from a view (no index gathers) and dequantized by one
``addcmul`` per K and V straight into a per-call workspace of the segment's length, in the storage dtype
(as ``kivi_dequantize`` rounds); its tail rows are copied after them from the ring (one slice, two when
the ring wraps). PyTorch's fused CPU flash kernel then attends that [quantized; tail] segment, with the
same bottom-right causal rule as ``ragged_attention`` (``causal_flash``). Work is proportional to each
segment's own rows: nothing is padded to the longest segment, and the workspace lives only for the call
(no full-precision shadow of the cache).

Append. The plan (rows each segment flushes), the overflow check and the ring slots of the new rows are
computed on the host; the new rows are written with one ``index_copy_`` per K and V; the segments that
flush (one in group_size steps) quantize their oldest ring rows with the reference's writer.
``quant_pool_build`` falls through to the reference (once per compression).
"""

from __future__ import annotations

import torch

from kvkernels.reference.kivi import kivi_quantize
from kvkernels.reference.quant_pool import check_quant_capacity, write_quantized

from .ragged_attention import causal_flash

_NEG_INF = float("-inf")


def _shifts(bits: int) -> torch.Tensor:
    """The bit offset of each of the F codes of an int32 word (LSB first)."""
    return torch.arange(0, 32, bits, dtype=torch.int32)


def _unpacked(words: torch.Tensor, shifts: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 codes of ``words`` with a new axis of F codes after ``dim`` (the word's rows or channels)."""
    w = words.unsqueeze(dim + 1)
    s = shifts.view(-1, 1) if dim == 0 else shifts
    # Arithmetic shift (int32 is signed); the mask keeps the field only, so the sign bits do not matter.
    return (w >> s).bitwise_and_((1 << bits) - 1)


def _dequantize_rows(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, start, n, keys, values, shifts, bits, gs):
    """Write the dequantized keys/values of quantized rows ``start .. start + n`` (n % gs == 0) into
    ``keys``/``values`` [n, D]: code * scale + zero in fp32, rounded to the storage dtype like
    ``kivi_dequantize``."""
    F = shifts.numel()
    D = keys.shape[1]
    k_groups = slice(start // gs, (start + n) // gs)
    k_codes_ = _unpacked(k_codes[start // F:(start + n) // F], shifts, bits, 0).view(n // gs, gs, D)
    torch.addcmul(k_zero[k_groups, None], k_codes_, k_scale[k_groups, None], out=keys.view(n // gs, gs, D))
    rows = slice(start, start + n)
    v_codes_ = _unpacked(v_codes[rows], shifts, bits, 1).view(n, D // gs, gs)
    torch.addcmul(v_zero[rows, :, None], v_codes_, v_scale[rows, :, None], out=values.view(n, D // gs, gs))


def _ring_slices(head: int, count: int, cap: int) -> list[tuple[int, int, int]]:
    """(ring slot, segment offset, rows) runs of ``count`` ring rows starting at slot ``head`` (wraps once)."""
    first = min(count, cap - head)
    return [run for run in ((head, 0, first), (0, first, count - first)) if run[2]]


def quant_pool_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                         t_head, seg_len, bits, group_size, sm_scale, return_lse):
    """Same contract as :func:`kvkernels.reference.quant_pool.quant_pool_attention`."""
    B, Hq, Lq, D = q.shape
    _, H, TC, _ = k_tail.shape
    S, G = B * H, Hq // H
    rows = G * Lq
    q_rows = q.reshape(S, 1, rows, D)  # segment s = (b, h) owns query heads h*G .. h*G + G - 1
    if q_rows.stride(-1) != 1:
        q_rows = q_rows.contiguous()
    starts, nqs = q_start.reshape(S).tolist(), q_len.reshape(S).tolist()  # host reads: free on CPU tensors
    heads, lens = t_head.reshape(S).tolist(), seg_len.reshape(S).tolist()
    ring_k, ring_v = k_tail.reshape(S, TC, D), v_tail.reshape(S, TC, D)
    longest = max(lens, default=0)
    # One workspace for the call, reused segment after segment: the flash call reads it before the next
    # segment overwrites it (CPU ops run in order).
    work_k = k_tail.new_empty(longest, D)
    work_v = v_tail.new_empty(longest, D)
    shifts = _shifts(bits)
    o = torch.empty(S, 1, rows, D, dtype=q.dtype)
    lse = torch.empty(S, 1, rows, dtype=torch.float32)
    for s in range(S):
        n, nq = lens[s], nqs[s]
        if n == 0:
            o[s].zero_()
            lse[s].fill_(_NEG_INF)
            continue
        keys, values = work_k[:n], work_v[:n]
        if nq:
            _dequantize_rows(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, starts[s], nq, keys[:nq],
                             values[:nq], shifts, bits, group_size)
        for slot, at, count in _ring_slices(heads[s], n - nq, TC):
            keys[nq + at:nq + at + count] = ring_k[s, slot:slot + count]
            values[nq + at:nq + at + count] = ring_v[s, slot:slot + count]
        o_s, lse_s = causal_flash(q_rows[s:s + 1], keys[None, None], values[None, None], 0, n, Lq, G, sm_scale)
        if S == 1:
            o, lse = o_s, lse_s
            break
        o[s] = o_s[0]
        lse[s] = lse_s[0]
    o = o.view(B, Hq, Lq, D)
    return o, (lse.view(B, Hq, Lq) if return_lse else lse.new_empty(0))


def quant_pool_append(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap,
                      t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual, flush_after):
    """Same contract as :func:`kvkernels.reference.quant_pool.quant_pool_append`, O(t) work per segment."""
    B, H, t, D = k_new.shape
    TC = k_tail.shape[3]
    S = B * H
    nqs, lens = q_len[layer].reshape(S).tolist(), seg_len[layer].reshape(S).tolist()
    heads, starts = t_head[layer].reshape(S).tolist(), q_start[layer].reshape(S).tolist()
    q_caps, seg_caps = q_cap[layer].reshape(S).tolist(), seg_cap[layer].reshape(S).tolist()
    tails = [n - nq for n, nq in zip(lens, nqs)]
    # The reference's flush rule (flush_rows of append_plan's pending rows), on host ints.
    flushes = [max((tail + t if flush_after else tail) - residual, 0) // group_size * group_size for tail in tails]
    if not all(n + t <= cap and nq + f <= qcap and (tail + t if flush_after else tail - f + t) <= TC
               for n, cap, nq, f, qcap, tail in zip(lens, seg_caps, nqs, flushes, q_caps, tails)):
        check_quant_capacity(q_len, q_cap, t_head, seg_len, seg_cap, layer, t, TC, group_size, residual, flush_after)
        raise AssertionError("quant_pool_append: the cpu capacity check and the reference's disagree")
    ring_k, ring_v = k_tail[layer].view(S, TC, D), v_tail[layer].view(S, TC, D)
    bufs = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    if not flush_after:  # KIVI's order: quantize the groups completed earlier, then write (ring slots free up)
        _flush(bufs, ring_k, ring_v, starts, nqs, heads, flushes, bits, group_size)
    if t:
        slots = _new_row_slots(heads, tails, t, TC)
        ring_k.view(S * TC, D).index_copy_(0, slots, k_new.reshape(S * t, D))
        ring_v.view(S * TC, D).index_copy_(0, slots, v_new.reshape(S * t, D))
    if flush_after:  # the new rows are in the ring now: a group they complete is quantized from there
        _flush(bufs, ring_k, ring_v, starts, nqs, heads, flushes, bits, group_size)
    if any(flushes):
        q_len[layer] = torch.tensor([nq + f for nq, f in zip(nqs, flushes)], dtype=torch.int32).view(B, H)
        t_head[layer] = torch.tensor([(h + f) % TC for h, f in zip(heads, flushes)], dtype=torch.int32).view(B, H)
    seg_len[layer] += t


def _new_row_slots(heads, tails, t, TC) -> torch.Tensor:
    """Flat indices into a layer's [S * TC] ring rows of the t new rows of every segment, in (segment, row) order:
    the slots after each segment's live tail (the ring's head does not move the live rows)."""
    first = [s * TC + (h + tail) % TC for s, (h, tail) in enumerate(zip(heads, tails))]
    if t == 1:
        return torch.tensor(first)
    first = torch.tensor(first)[:, None]
    base = first - first % TC  # s * TC
    return (base + (first - base + torch.arange(t)) % TC).view(-1)


def _flush(bufs, ring_k, ring_v, starts, nqs, heads, flushes, bits, group_size) -> None:
    """Quantize the oldest ``flushes[s]`` ring rows of each segment s into its next quantized rows."""
    TC = ring_k.shape[1]
    for s, f in enumerate(flushes):
        if f:
            k_rows, v_rows = (_ring_rows(ring, heads[s], f, TC, s) for ring in (ring_k, ring_v))
            write_quantized(kivi_quantize, *bufs, starts[s] + nqs[s], k_rows, v_rows, bits, group_size)


def _ring_rows(ring, head, count, TC, s) -> torch.Tensor:
    """Ring rows head .. head + count of segment s in order: a view, or a copy of two pieces if it wraps."""
    pieces = [ring[s, slot:slot + n] for slot, _, n in _ring_slices(head, count, TC)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
