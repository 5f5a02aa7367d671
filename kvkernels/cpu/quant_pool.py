"""CPU kernels of ``quant_pool_attention`` and ``quant_pool_append``: few tensor ops, bookkeeping on the host.

The decode step's common case runs the compiled kernels of :mod:`kvkernels.cpu.native` when they are
available: fp32 attention with one query row (every segment of the layer in one call, quantized rows
dequantized as they are read) and appends (the new rows go into their ring slots; with fp32 rings in KIVI's
order the groups that leave the full-precision window are quantized in the same call, bit for bit as
``kivi_quantize``; otherwise only calls that flush nothing). What follows is the PyTorch path, for every
other case and for machines without a C++ compiler.

On CPU a decode step's cost at a few thousand tokens is mostly the fixed cost of each tensor op, so both
kernels read the small per-layer tables (``q_start``, ``q_len``, ``t_head``, ``seg_len``, capacities) on
the host (free for CPU tensors) and do the bookkeeping in Python ints; the rows go through as few tensor
ops as possible, and never through index gathers.

Attention. The segments of a layer are taken in blocks of up to ``_BLOCK`` (SmolLM2's 3 KV heads at B = 1:
one block), each attended by one call of PyTorch's fused CPU flash kernel over a scratch buffer of
columns [the block's quantized rows ; a window of its rings]. The quantized rows of consecutive segments
are one slice of the codes (segment starts are multiples of the group size), so they are dequantized in
one pass set per K and V (shift, mask, int -> float, scale and zero) in the storage dtype, as
``kivi_dequantize`` rounds. The ring window is the slot range holding every segment's live tail (appends
from a build never wrap a ring), whole rings if one wraps. The query rows of all the block's segments
are one [b*G*Lq, D] matrix; an additive mask, built run-length from the host-read lengths in one
``repeat_interleave``, keeps each row to its own segment's rows, bottom-right causal for Lq > 1. Nothing
is padded to the longest segment; what is computed beyond a segment's own rows is the products with the
other segments of the block (at most ``_BLOCK`` times the needed ones), the unused quantized capacity
between them and the ring slots outside live tails, all at probability exactly 0. Those masked rows hold
zeros or rows of rolled-back appends: finite unless non-finite rows were appended. Scratch buffers are
reused from call to call (per thread, up to ``_SCRATCH_MAX`` bytes each): one block's rows for the
duration of a call, not a copy of the cache.

Append. Lengths are read with one ``stack`` + ``tolist``; the flush rule and the capacity check run on
host ints (an overflow calls the reference's check, which raises its ``PoolOverflowError`` before
anything is written); the t new rows of every segment go into their ring slots with one ``index_copy_``
per K and V. A segment that flushes (one step in group_size) quantizes its oldest ring rows with the
reference's writer (``write_quantized`` + ``kivi_quantize``), before the write by default (KIVI's order)
or after it with ``flush_after``. ``quant_pool_build`` falls through to the reference (once per
compression).
"""

from __future__ import annotations

import functools
import math
import threading

import torch

from kvkernels.cpu import native
from kvkernels.reference.kivi import kivi_quantize
from kvkernels.reference.quant_pool import check_quant_capacity, write_quantized

_NEG_INF = float("-inf")
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


@functools.lru_cache(maxsize=None)
def _shifts(bits: int, dim: int) -> torch.Tensor:
    """The bit offset of each of the F codes of an int32 word (LSB first), shaped to broadcast against words
    with the new code axis after ``dim`` (cached: a constant, never written)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return shifts.view(-1, 1) if dim == 0 else shifts


# Scratch buffers reused from call to call (per thread): a fresh tensor of a few hundred KB is a fresh
# mmap, and its page faults cost more than the unpacking itself. They hold one block of segments' rows
# for the duration of a call (never a copy of the cache that outlives it); above _SCRATCH_MAX bytes they
# are allocated per call instead of kept.
_SCRATCH_MAX = 32 << 20
_local = threading.local()


def _scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    numel = math.prod(shape)
    if numel * dtype.itemsize > _SCRATCH_MAX:
        return torch.empty(shape, dtype=dtype)
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get((tag, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(tag, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def _codes_into(out: torch.Tensor, words: torch.Tensor, bits: int, dim: int) -> None:
    """Write the codes of int32 ``words`` into the float tensor ``out``, which has a new axis of the F codes
    of each word after ``dim`` (0: codes packed along rows, keys; 1: along channels, values)."""
    codes = _scratch("codes", out.shape, torch.int32)
    # Arithmetic shift (int32 is signed); the mask keeps the field only, so the sign bits do not matter.
    torch.bitwise_right_shift(words.unsqueeze(dim + 1), _shifts(bits, dim), out=codes).bitwise_and_((1 << bits) - 1)
    out.copy_(codes)


def _dequantize_rows(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, start, n, keys, values, bits, gs):
    """Write the dequantized keys/values of quantized rows ``start .. start + n`` (start, n multiples of gs)
    into ``keys``/``values`` [n, D] (storage dtype): code * scale + zero, as ``kivi_dequantize`` computes it."""
    F = 32 // bits
    D = keys.shape[1]
    _codes_into(keys.view(n // F, F, D), k_codes[start // F:(start + n) // F], bits, 0)
    groups = slice(start // gs, (start + n) // gs)
    k = keys.view(n // gs, gs, D)  # keys: one (scale, zero) per channel and group of gs rows
    torch.addcmul(k_zero[groups, None], k, k_scale[groups, None], out=k)
    rows = slice(start, start + n)
    _codes_into(values.view(n, D // F, F), v_codes[rows], bits, 1)
    v = values.view(n, D // gs, gs)  # values: one (scale, zero) per row and group of gs channels
    if v.dtype == torch.float32:  # mul_ + add_ vectorize along the group (addcmul broadcasting there does not)
        v.mul_(v_scale[rows, :, None]).add_(v_zero[rows, :, None])
    else:  # one rounding to fp16/bf16, from fp32 math, like kivi_dequantize
        torch.addcmul(v_zero[rows, :, None], v, v_scale[rows, :, None], out=v)


def _ring_slices(head: int, count: int, cap: int) -> list[tuple[int, int]]:
    """(first ring slot, rows) runs of ``count`` ring rows starting at slot ``head`` (the ring wraps once)."""
    first = min(count, cap - head)
    return [run for run in ((head, first), (0, count - first)) if run[1]]


def _mask_runs(starts, nqs, heads, lens, first, rows, TC, window, G, Lq):
    """Run-length form (values, lengths) of the additive mask [b*G*Lq, W] of one block of b segments over the
    block's columns W = [quantized rows first .. first + rows ; ring slots lo .. hi of every segment]
    (``window`` = (lo, hi)), and the query rows that see nothing. Query row i of segment s sees segment rows
    0 .. n - Lq + i (bottom-right causal): the first of them are its quantized rows, the others its ring's
    live slots."""
    lo, hi = window
    W = rows + len(lens) * (hi - lo)
    values, lengths, blind = [], [], []
    for s, (start, nq, head, n) in enumerate(zip(starts, nqs, heads, lens)):
        per_i = []
        for i in range(Lq):
            seen = max(n - Lq + i + 1, 0)  # segment rows query row i sees
            spans = [(start - first, min(nq, seen))] if min(nq, seen) else []
            if seen > nq:
                spans += sorted((rows + s * (hi - lo) + slot - lo, count)
                                for slot, count in _ring_slices(head, seen - nq, TC))
            runs, at = [], 0
            for col, count in spans:  # hidden gap, then visible span
                runs += [(_NEG_INF, col - at), (0.0, count)]
                at = col + count
            runs.append((_NEG_INF, W - at))
            per_i.append(([v for v, c in runs if c], [c for v, c in runs if c], seen == 0))
        for g in range(G):
            for i, (v, c, nothing) in enumerate(per_i):
                if nothing:
                    blind.append((s * G + g) * Lq + i)
                values += v
                lengths += c
    return values, lengths, blind


# Segments attended together by one fused flash call: every query row of the block is multiplied by every
# column (the others masked), so a block of b segments costs up to b times the products a segment needs;
# blocks bound that, while SmolLM2's 3 KV heads (B = 1) are one block, i.e. one call per layer.
_BLOCK = 4


def _attend_block(q_rows, quant, k_ring, v_ring, starts, nqs, heads, lens, G, Lq, bits, gs, sm_scale):
    """(o [1, 1, b*G*Lq, D], lse fp32 [1, 1, b*G*Lq]) of b segments' query rows [1, 1, b*G*Lq, D]."""
    b, TC, D = k_ring.shape
    if not any(lens):  # nothing to attend: o = 0, lse = -inf (the fused kernel needs at least one key)
        return q_rows.new_zeros(q_rows.shape), torch.full(q_rows.shape[:3], _NEG_INF)
    live = [s for s in range(b) if nqs[s]]
    first = min((starts[s] for s in live), default=0)
    rows = max((starts[s] + nqs[s] for s in live), default=first) - first
    # The ring slots to copy: one window lo .. hi holding every segment's live tail (appends from a build
    # never wrap a ring, and the heads of one layer stay close), else whole rings.
    tails = [n - nq for n, nq in zip(lens, nqs)]
    in_use = [(h, h + t) for h, t in zip(heads, tails) if t]
    if all(end <= TC for _, end in in_use):
        window = (min((h for h, _ in in_use), default=0), max((end for _, end in in_use), default=0))
    else:
        window = (0, TC)
    lo, hi = window
    W = rows + b * (hi - lo)
    keys, values = _scratch("keys", (W, D), k_ring.dtype), _scratch("values", (W, D), k_ring.dtype)
    if rows:  # rows of the range past a segment's q_len (unused capacity) are dequantized but masked
        _dequantize_rows(*quant, first, rows, keys[:rows], values[:rows], bits, gs)
    keys[rows:].view(b, hi - lo, D).copy_(k_ring[:, lo:hi])
    values[rows:].view(b, hi - lo, D).copy_(v_ring[:, lo:hi])
    runs, lengths, blind = _mask_runs(starts, nqs, heads, lens, first, rows, TC, window, G, Lq)
    mask = torch.tensor(runs, dtype=q_rows.dtype).repeat_interleave(torch.tensor(lengths)).view(-1, W)
    o, lse = _flash(q_rows, keys[None, None], values[None, None], attn_mask=mask, scale=sm_scale)
    if blind:  # the fused kernel gives a row that sees nothing o = 0 but lse = 0
        lse[0, 0, blind] = _NEG_INF
    return o, lse


def quant_pool_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                         t_head, seg_len, bits, group_size, sm_scale, return_lse):
    """Same contract as :func:`kvkernels.reference.quant_pool.quant_pool_attention`."""
    B, Hq, Lq, D = q.shape
    _, H, TC, _ = k_tail.shape
    S, G = B * H, Hq // H
    M = G * Lq
    quant = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    lib = native.library() if Lq == 1 and q.dtype == torch.float32 else None
    if lib is not None:  # the compiled kernel: the whole layer in one call, reading the tables itself
        o, lse = native.quant_decode(lib, q, *quant, k_tail, v_tail, q_start, q_len, t_head, seg_len, bits,
                                     group_size, sm_scale, return_lse)
        return o, (lse if return_lse else o.new_empty(0))
    k_ring, v_ring = k_tail.reshape(S, TC, D), v_tail.reshape(S, TC, D)
    # Host reads (free on CPU tensors) in as few ops as possible.
    nqs, heads, lens = torch.stack((q_len, t_head, seg_len)).view(3, S).tolist()
    starts = q_start.reshape(S).tolist()
    # Segment s = (b, h) owns query heads h*G .. h*G + G - 1: in q these are G*Lq consecutive rows.
    q_rows = q.reshape(1, 1, S * M, D)
    if q_rows.stride(-1) != 1:
        q_rows = q_rows.contiguous()
    parts = [_attend_block(q_rows[:, :, s * M:(s + _BLOCK) * M], quant, k_ring[s:s + _BLOCK], v_ring[s:s + _BLOCK],
                           starts[s:s + _BLOCK], nqs[s:s + _BLOCK], heads[s:s + _BLOCK], lens[s:s + _BLOCK], G, Lq,
                           bits, group_size, sm_scale) for s in range(0, S, _BLOCK)]
    o, lse = parts[0] if len(parts) == 1 else [torch.cat([p[i] for p in parts], 2) for i in (0, 1)]
    return o.view(B, Hq, Lq, D), (lse.view(B, Hq, Lq) if return_lse else lse.new_empty(0))


def quant_pool_append(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap,
                      t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual, flush_after):
    """Same contract as :func:`kvkernels.reference.quant_pool.quant_pool_append`, O(t) work per segment."""
    B, H, t, D = k_new.shape
    TC = k_tail.shape[3]
    S = B * H
    lib = native.library()
    bufs = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap, t_head,
            seg_len, seg_cap)
    if lib is not None and native.quant_append(lib, bufs, layer, k_new, v_new, bits, residual, group_size,
                                               flush_after):
        return  # done in one compiled call (flushes included, for fp32 rings in KIVI's order)
    # Host reads (free on CPU tensors), as few ops as possible: the step's fixed cost is these calls.
    nqs, lens, heads, seg_caps = torch.stack((q_len[layer], seg_len[layer], t_head[layer], seg_cap[layer])).view(
        4, S).tolist()
    tails = [n - nq for n, nq in zip(lens, nqs)]
    # The reference's flush rule (flush_rows of append_plan's pending rows), on host ints.
    flushes = [max((tail + t if flush_after else tail) - residual, 0) // group_size * group_size for tail in tails]
    flushing = any(flushes)  # one step in group_size per segment; only then the quantized rows are read
    starts, q_caps = (q_start[layer].reshape(S).tolist(), q_cap[layer].reshape(S).tolist()) if flushing else ([], [])
    fits = all(n + t <= cap and (tail + t if flush_after else tail - f + t) <= TC
               for n, cap, f, tail in zip(lens, seg_caps, flushes, tails))
    if not (fits and all(nq + f <= q_cap_ for nq, f, q_cap_ in zip(nqs, flushes, q_caps))):
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
    if flushing:
        q_len[layer] = torch.tensor([nq + f for nq, f in zip(nqs, flushes)], dtype=torch.int32).view(B, H)
        t_head[layer] = torch.tensor([(h + f) % TC for h, f in zip(heads, flushes)], dtype=torch.int32).view(B, H)
    seg_len[layer].add_(t)


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
    pieces = [ring[s, slot:slot + n] for slot, n in _ring_slices(head, count, TC)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
