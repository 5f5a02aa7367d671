"""Triton kernels of the quantized ragged pool: build, graph-safe append with flush, fused split-K decode.

Layout and semantics: :mod:`kvkernels.reference.quant_pool` (KIVI groups in one [Q, ...] row space,
segment starts multiples of group_size; a full-precision ring tail per segment).

Attention (``quant_pool_attention``)
------------------------------------
Scheduled exactly like ``ragged_attention``: each segment's live rows (quantized + tail, ``seg_len``)
are cut into CHUNK-row work items, found on the device by ``_locate`` (the same jit function), a fixed
persistent grid sized from shapes only runs them (bound = B*Hkv + cdiv(P, CHUNK) with P = Q + B*Hkv*TC,
the most rows one layer can hold), and ``ragged_attention``'s ``_merge_kernel`` combines the partials by
log-sum-exp. So skewed segments keep every program busy, there is no host sync, and a decode step can be
captured in a CUDA graph. Per BLOCK_N tile a program loads the packed key words [BLOCK_N/F, D] once
(the tile is F-aligned because q_start, CHUNK and BLOCK_N are multiples of F), unpacks them in
registers, applies the per-(group, channel) scale/zero, and takes the tail rows (ring slots) for
positions >= q_len with a masked select, so a tile may straddle the quantized/tail boundary. Values:
words [BLOCK_N, D/F], per-row channel-group scales. GQA: the G*Lq query rows of a KV head are the M
side of both ``tl.dot``s, so each K/V tile is read once per KV head. Dequantized rows are rounded to
q.dtype before the dot (as ``kivi_dequantize`` + ``ragged_attention`` do). GEAR low rank: not supported.

Append (``quant_pool_append``)
------------------------------
Two launches, grids from shapes only: ``_qp_overflow_kernel`` (one program) checks every segment of the
layer exactly as the reference does and sets the status flag of ``kvkernels.triton.pool`` (so
``deferred_overflow_checks()``/``check_overflow()`` cover these appends too); ``_qp_append_kernel``
(one program per segment) reads the flag and, unless set, quantizes its flushed groups (read straight
from the ring and, with ``flush_after``, from the new rows), writes the new rows into free ring slots
and updates q_len/t_head/seg_len. A barrier separates the flush's reads from the ring writes, which may
reuse the slots just flushed. Codes are bit-exact with the reference (the KIVI kernels' helpers).
Default mode syncs once per call to raise ``PoolOverflowError``; the deferred mode never syncs.

Build (``quant_pool_build``): the reference's gather + one ``kivi_quantize`` per axis, with the Triton
quantize kernels (a one-time step; it reads the lengths on the host like ``compact_kv``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvkernels._validate import PoolOverflowError
from kvkernels.reference import quant_pool as _ref

from .kivi import (_group_codes, _pack_first_axis, _pack_last_axis, _stored_scale_zero, _unpack_cols, _unpack_rows,
                   kivi_quantize)
from .pool import _deferred, status_buffer
from .ragged_attention import _LOG2E, _chunk_rows, _dynamic_loops, _locate, _merge_kernel, _num_programs

# Unpacking keeps several [BLOCK_N, D] tiles live (codes, scale, zero, tail): 32-row tiles and 8 warps keep
# the sm_90 build at 200 registers without spills (bf16, D = 128, 2-bit; 64-row tiles at 4 warps used all 255
# and a 1.5 KiB spill stack, see bench/results/quant_pool/sm90_compile.txt). At ~200 registers x 256
# threads one program fills an SM's register file, so one persistent program per SM.
_GPU_DEFAULT = {"CHUNK": 256, "BLOCK_N": 32, "BLOCK_M": 64, "programs_per_sm": 1, "num_warps": 8, "num_stages": 2}
_INTERPRETER_DEFAULT = {"CHUNK": 64, "BLOCK_N": 32, "BLOCK_M": 32, "programs_per_sm": 1, "num_warps": 4,
                        "num_stages": 1}


# ---------------------------------------------------------------------------------------------------
# Attention


@triton.jit
def _attend_quant_chunk(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kt_ptr, vt_ptr,
    q_start_ptr, q_len_ptr, t_head_ptr, seg_len_ptr, ws_o_ptr, ws_lse_ptr,
    item, seg, chunk, mblk, Hkv, G, Lq, D, TC, qk_scale,
    sq_b, sq_h, sq_l, sq_d, st_s, st_t, st_d,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BITS: tl.constexpr, F: tl.constexpr, GROUP: tl.constexpr, IS_FP32: tl.constexpr, DYNAMIC: tl.constexpr,
):
    """Online softmax of one M block of query rows over one chunk of a segment; writes the partial."""
    b = seg // Hkv
    h = seg % Hkv
    q0 = tl.load(q_start_ptr + seg)  # int64 quantized row of the segment's row 0
    nq = tl.load(q_len_ptr + seg)
    head = tl.load(t_head_ptr + seg)
    seg_rows = tl.load(seg_len_ptr + seg)
    row0 = chunk * CHUNK
    row_end = tl.minimum(row0 + CHUNK, seg_rows)

    r = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < G * Lq
    g = r // Lq
    i = r % Lq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_offs = b.to(tl.int64) * sq_b + (h * G + g).to(tl.int64)[:, None] * sq_h + i[:, None] * sq_l + d[None, :] * sq_d
    qt = tl.load(q_ptr + q_offs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    DT = qt.dtype
    last_visible = seg_rows - Lq + i

    WN: tl.constexpr = BLOCK_N // F
    WD: tl.constexpr = BLOCK_D // F
    wcols = tl.arange(0, WD)
    tail_base = seg.to(tl.int64) * st_s
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DYNAMIC:
        n_tiles = tl.cdiv(row_end - row0, BLOCK_N)
    else:
        n_tiles = CHUNK // BLOCK_N
    for t in range(0, n_tiles):
        n0 = row0 + t * BLOCK_N
        pos = n0 + tl.arange(0, BLOCK_N)
        kv_ok = pos < row_end
        quant = kv_ok & (pos < nq)
        tail = kv_ok & (pos >= nq)
        qrow = q0 + pos  # int64
        # ---- keys: F-aligned words of this tile, unpacked in registers; tail rows from the ring
        wrow = (q0 + n0) // F + tl.arange(0, WN)
        w_ok = (n0 + tl.arange(0, WN) * F) < nq
        kwords = tl.load(kc_ptr + wrow[:, None] * D + d[None, :], mask=w_ok[:, None] & d_ok[None, :], other=0)
        kcodes = _unpack_rows(kwords, WN, BLOCK_D, BITS, F)
        kq_mask = quant[:, None] & d_ok[None, :]
        kg = (qrow // GROUP)[:, None] * D + d[None, :]
        ksc = tl.load(ks_ptr + kg, mask=kq_mask, other=0.0).to(tl.float32)
        kze = tl.load(kz_ptr + kg, mask=kq_mask, other=0.0).to(tl.float32)
        k_deq = (kcodes.to(tl.float32) * ksc + kze).to(DT)
        slot = (head + tl.where(tail, pos - nq, 0)) % TC
        t_offs = tail_base + slot.to(tl.int64)[:, None] * st_t + d[None, :] * st_d
        t_mask = tail[:, None] & d_ok[None, :]
        k = tl.where(quant[:, None], k_deq, tl.load(kt_ptr + t_offs, mask=t_mask, other=0.0))
        if IS_FP32:
            s = tl.dot(qt, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(qt, tl.trans(k))
        visible = kv_ok[None, :] & (pos[None, :] <= last_visible[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m - m_ref)
        l = l * alpha + tl.sum(p, 1)
        # ---- values: per-row words over channels
        vwords = tl.load(vc_ptr + qrow[:, None] * (D // F) + wcols[None, :],
                         mask=quant[:, None] & (wcols < D // F)[None, :], other=0)
        vcodes = _unpack_cols(vwords, BLOCK_N, WD, BITS, F)
        vg = qrow[:, None] * (D // GROUP) + (d // GROUP)[None, :]
        vsc = tl.load(vs_ptr + vg, mask=kq_mask, other=0.0).to(tl.float32)
        vze = tl.load(vz_ptr + vg, mask=kq_mask, other=0.0).to(tl.float32)
        v_deq = (vcodes.to(tl.float32) * vsc + vze).to(DT)
        v = tl.where(quant[:, None], v_deq, tl.load(vt_ptr + t_offs, mask=t_mask, other=0.0))
        if IS_FP32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(DT), v)
        acc = acc * alpha[:, None] + pv
        m = m_new

    seen = l > 0
    o = acc / tl.where(seen, l, 1.0)[:, None]
    lse2 = tl.where(seen, m + tl.log2(tl.where(seen, l, 1.0)), float("-inf"))
    rows = item.to(tl.int64) * (G * Lq) + r
    tl.store(ws_o_ptr + rows[:, None] * D + d[None, :], o, mask=r_ok[:, None] & d_ok[None, :])
    tl.store(ws_lse_ptr + rows, lse2, mask=r_ok)


@triton.jit
def _quant_chunks_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kt_ptr, vt_ptr,
    q_start_ptr, q_len_ptr, t_head_ptr, seg_len_ptr, ws_o_ptr, ws_lse_ptr, item_off_ptr,
    S, Hkv, G, Lq, D, TC, qk_scale, num_programs, iters, bound,
    sq_b, sq_h, sq_l, sq_d, st_s, st_t, st_d,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, NUM_S_BLOCKS: tl.constexpr, BITS: tl.constexpr, F: tl.constexpr, GROUP: tl.constexpr,
    IS_FP32: tl.constexpr, DYNAMIC: tl.constexpr,
):
    """Persistent programs over the (segment, chunk) work list (see ragged_attention's kernel)."""
    pid = tl.program_id(0)
    mblk = tl.program_id(1)
    _, _, total = _locate(0, seg_len_ptr, S, CHUNK, BLOCK_S, NUM_S_BLOCKS)
    if DYNAMIC:
        my_items = tl.cdiv(tl.maximum(total - pid, 0), num_programs)
    else:
        my_items = iters
    for it in range(0, my_items):
        item = pid + it * num_programs
        if item < total:
            seg, chunk, _ = _locate(item, seg_len_ptr, S, CHUNK, BLOCK_S, NUM_S_BLOCKS)
            if item < bound:
                _attend_quant_chunk(
                    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kt_ptr, vt_ptr,
                    q_start_ptr, q_len_ptr, t_head_ptr, seg_len_ptr, ws_o_ptr, ws_lse_ptr,
                    item, seg, chunk, mblk, Hkv, G, Lq, D, TC, qk_scale,
                    sq_b, sq_h, sq_l, sq_d, st_s, st_t, st_d,
                    CHUNK, BLOCK_N, BLOCK_M, BLOCK_D, BITS, F, GROUP, IS_FP32, DYNAMIC,
                )
            tl.store(item_off_ptr + seg, item, mask=(chunk == 0) & (mblk == 0))


def default_config(q, *args) -> dict:
    """256-row chunks of 32-row tiles on the GPU (see _GPU_DEFAULT); small chunks under the interpreter."""
    if q.device.type != "cuda":
        return dict(_INTERPRETER_DEFAULT)
    cfg = dict(_GPU_DEFAULT)
    if q.shape[-1] > 128:
        cfg.update(BLOCK_M=32)
    return cfg


def quant_pool_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                         t_head, seg_len, bits, group_size, sm_scale, return_lse, *, config=None):
    """Triton ``quant_pool_attention``: two launches (chunks, merge); reads no device data on the host."""
    B, Hq, Lq, D = q.shape
    _, Hkv, TC, _ = k_tail.shape
    G, S, F = Hq // Hkv, B * Hkv, 32 // bits
    o = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq) if return_lse else (0,), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    cfg = {**default_config(q), **(config or {})}
    block_n = max(cfg["BLOCK_N"], 16, 2 * F)  # tl.dot needs >= 16 rows; >= 2 key words per tile
    if cfg["CHUNK"] % block_n:
        raise ValueError(f"quant_pool_attention config {cfg}: CHUNK must be a multiple of BLOCK_N = {block_n}")
    rows = G * Lq
    P = v_codes.shape[0] + S * TC  # the most rows this layer's segments can hold
    chunk = _chunk_rows(cfg, S, P, rows, D)
    bound = S + triton.cdiv(P, chunk)
    block_m = max(16, min(cfg["BLOCK_M"], triton.next_power_of_2(rows)))
    block_d = triton.next_power_of_2(D)
    block_s = min(1024, triton.next_power_of_2(S))
    dynamic = _dynamic_loops()

    ws_o = torch.empty((bound, rows, D), dtype=torch.float32, device=q.device)
    ws_lse = torch.empty((bound, rows), dtype=torch.float32, device=q.device)
    item_off = torch.empty((S,), dtype=torch.int32, device=q.device)
    q_start, q_len, t_head, seg_len = (t.contiguous() for t in (q_start, q_len, t_head, seg_len))
    if k_codes.numel() == 0:  # Q = 0: a null pointer is rejected by the launcher; every load is masked
        k_codes = v_codes = torch.zeros(1, dtype=torch.int32, device=q.device)
        k_scale = k_zero = v_scale = v_zero = q.new_zeros(1)
    kt = k_tail.reshape(S, TC, D) if k_tail.is_contiguous() else k_tail.contiguous().view(S, TC, D)
    vt = v_tail.reshape(S, TC, D) if v_tail.is_contiguous() else v_tail.contiguous().view(S, TC, D)
    if vt.stride() != kt.stride():
        vt = vt.contiguous()
        kt = kt.contiguous()

    nprog = _num_programs(q.device, cfg, bound)
    m_blocks = triton.cdiv(rows, block_m)
    _quant_chunks_kernel[(nprog, m_blocks)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, kt, vt,
        q_start, q_len, t_head, seg_len, ws_o, ws_lse, item_off,
        S, Hkv, G, Lq, D, TC, float(sm_scale) * _LOG2E, nprog, triton.cdiv(bound, nprog), bound,
        *q.stride(), *kt.stride(),
        CHUNK=chunk, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_S=block_s,
        NUM_S_BLOCKS=triton.cdiv(S, block_s), BITS=bits, F=F, GROUP=group_size,
        IS_FP32=q.dtype == torch.float32, DYNAMIC=dynamic, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _merge_kernel[(S, m_blocks)](
        ws_o, ws_lse, item_off, seg_len, o, lse if return_lse else ws_lse,
        Hkv, G, Lq, D, bound, triton.cdiv(P, chunk),
        CHUNK=chunk, BLOCK_M=block_m, BLOCK_D=block_d, RETURN_LSE=return_lse, DYNAMIC=dynamic, num_warps=4,
    )
    return o, lse


# ---------------------------------------------------------------------------------------------------
# Append


@triton.jit
def _flush_rows(nq, n, t, GROUP: tl.constexpr, residual, FLUSH_AFTER: tl.constexpr):
    """(tail rows, rows to flush) of segments with q_len nq and seg_len n (the reference's ``append_plan``)."""
    tail = n - nq
    if FLUSH_AFTER:
        pending = tail + t
    else:
        pending = tail
    return tail, tl.maximum(pending - residual, 0) // GROUP * GROUP


@triton.jit
def _qp_overflow_kernel(q_len_ptr, q_cap_ptr, seg_len_ptr, seg_cap_ptr, status_ptr, S, t, TC, residual, layer,
                        GROUP: tl.constexpr, FLUSH_AFTER: tl.constexpr, ACCUMULATE: tl.constexpr,
                        BLOCK_S: tl.constexpr):
    """status[0] = 1 if some segment of the layer lacks room (the reference's check_quant_capacity)."""
    over = tl.zeros([BLOCK_S], tl.int32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        live = s < S
        nq = tl.load(q_len_ptr + s, mask=live, other=0)
        n = tl.load(seg_len_ptr + s, mask=live, other=0)
        tail, nf = _flush_rows(nq, n, t, GROUP, residual, FLUSH_AFTER)
        if FLUSH_AFTER:
            ring = tail + t
        else:
            ring = tail - nf + t
        bad = (n + t > tl.load(seg_cap_ptr + s, mask=live, other=0)) | (nq + nf > tl.load(q_cap_ptr + s, mask=live,
                                                                                          other=0)) | (ring > TC)
        over = tl.maximum(over, (live & bad).to(tl.int32))
    flag = tl.max(over, 0)
    tl.store(status_ptr, flag)
    if ACCUMULATE:  # the deferred-mode record of kvkernels.triton.pool (one program: no race)
        count = tl.load(status_ptr + 1)
        first = (count == 0) & (flag != 0)
        tl.store(status_ptr + 1, count + flag)
        tl.store(status_ptr + 2, tl.where(first, layer, tl.load(status_ptr + 2)))
        tl.store(status_ptr + 3, tl.where(first, t, tl.load(status_ptr + 3)))


@triton.jit
def _pending_tile(tail_ptr, new_ptr, r, n_rows, d, head, tail, TC, st_t, sn_t, sn_d, D):
    """Rows r (< n_rows) of [ring rows head .. head + tail ; new rows] of one segment, in storage dtype."""
    d_ok = d < D
    from_ring = r < tail
    r_ok = r < n_rows
    slot = (head + tl.where(from_ring, r, 0)) % TC
    x_ring = tl.load(tail_ptr + slot.to(tl.int64)[:, None] * st_t + d[None, :], mask=(from_ring & r_ok)[:, None] & d_ok[None, :],
                     other=0.0)
    j = tl.where(from_ring, 0, r - tail)
    x_new = tl.load(new_ptr + j.to(tl.int64)[:, None] * sn_t + d[None, :] * sn_d,
                    mask=(~from_ring & r_ok)[:, None] & d_ok[None, :], other=0.0)
    return tl.where(from_ring[:, None], x_ring, x_new)


@triton.jit
def _qp_append_kernel(
    kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kt_ptr, vt_ptr, q_start_ptr, q_len_ptr, t_head_ptr, seg_len_ptr,
    kn_ptr, vn_ptr, status_ptr,
    H, t, TC, D, residual, max_groups,
    st_s, st_t, skn_b, skn_h, skn_t, skn_d, svn_b, svn_h, svn_t, svn_d,
    GROUP: tl.constexpr, BITS: tl.constexpr, F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    FLUSH_AFTER: tl.constexpr, DYNAMIC: tl.constexpr,
):
    s = tl.program_id(0)  # segment of this layer (pointers are offset to the layer)
    b = s // H
    h = s % H
    ok = tl.load(status_ptr) == 0
    nq = tl.load(q_len_ptr + s)
    tail, nf = _flush_rows(nq, tl.load(seg_len_ptr + s), t, GROUP, residual, FLUSH_AFTER)
    nf = tl.where(ok, nf, 0)
    head = tl.load(t_head_ptr + s)
    qrow0 = tl.load(q_start_ptr + s) + nq  # int64: first quantized row to write
    kt_base = kt_ptr + s.to(tl.int64) * st_s
    vt_base = vt_ptr + s.to(tl.int64) * st_s
    kn_base = kn_ptr + b.to(tl.int64) * skn_b + h.to(tl.int64) * skn_h
    vn_base = vn_ptr + b.to(tl.int64) * svn_b + h.to(tl.int64) * svn_h
    LEVELS: tl.constexpr = (1 << BITS) - 1
    NGP: tl.constexpr = BLOCK_D // GROUP
    WPG: tl.constexpr = GROUP // F
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    gidx = tl.arange(0, NGP)
    widx = tl.arange(0, BLOCK_D // F)

    # ---- flush: quantize groups of the pending rows into quantized rows qrow0, qrow0 + 1, ...
    if DYNAMIC:
        n_groups = nf // GROUP
    else:
        n_groups = max_groups
    for gi in range(0, n_groups):
        if gi * GROUP < nf:  # always true on the GPU path; skips dead groups under the interpreter
            # "group gi is flushed" folded into the masks' bounds (the interpreter mishandles vector & scalar masks)
            live_d = tl.where(gi * GROUP < nf, D, 0)
            r = gi * GROUP + tl.arange(0, GROUP)
            row = qrow0 + r  # int64
            # keys: per channel over the group's rows
            x = _pending_tile(kt_base, kn_base, r, nf, d, head, tail, TC, st_t, skn_t, skn_d, D)
            xf = x.to(tl.float32)
            scale, zero = _stored_scale_zero(tl.min(xf, axis=0), tl.max(xf, axis=0), LEVELS, x.dtype)
            codes = _group_codes(xf, scale[None, :], zero[None, :], LEVELS)
            g_row = (qrow0 // GROUP) + gi
            tl.store(ks_ptr + g_row * D + d, scale.to(x.dtype), mask=d < live_d)
            tl.store(kz_ptr + g_row * D + d, zero.to(x.dtype), mask=d < live_d)
            words = _pack_first_axis(codes, GROUP, BLOCK_D, BITS, F)
            w_row = (qrow0 + gi * GROUP) // F + tl.arange(0, WPG)
            tl.store(kc_ptr + w_row[:, None] * D + d[None, :], words, mask=(d < live_d)[None, :])
            # values: per row over channel groups
            y = _pending_tile(vt_base, vn_base, r, nf, d, head, tail, TC, st_t, svn_t, svn_d, D)
            y3 = tl.reshape(y.to(tl.float32), (GROUP, NGP, GROUP))
            vscale, vzero = _stored_scale_zero(tl.min(y3, axis=2), tl.max(y3, axis=2), LEVELS, y.dtype)
            vcodes = _group_codes(y3, vscale[:, :, None], vzero[:, :, None], LEVELS)
            g_mask = (gidx < live_d // GROUP)[None, :] & (r < nf)[:, None]
            g_off = row[:, None] * (D // GROUP) + gidx[None, :]
            tl.store(vs_ptr + g_off, vscale.to(y.dtype), mask=g_mask)
            tl.store(vz_ptr + g_off, vzero.to(y.dtype), mask=g_mask)
            vwords = _pack_last_axis(tl.reshape(vcodes, (GROUP, BLOCK_D)), GROUP, BLOCK_D, BITS, F)
            tl.store(vc_ptr + row[:, None] * (D // F) + widx[None, :], vwords, mask=(widx < live_d // F)[None, :] & (r < nf)[:, None])

    # The flush read ring slots that the writes below may reuse (flush before write): finish reads first.
    tl.debug_barrier()
    n_write = tl.where(ok, t, 0)
    for t0 in range(0, t, BLOCK_T):
        j = t0 + tl.arange(0, BLOCK_T)
        mask = (j < n_write)[:, None] & d_ok[None, :]
        slot = ((head + tail + j) % TC).to(tl.int64)
        kx = tl.load(kn_base + j.to(tl.int64)[:, None] * skn_t + d[None, :] * skn_d, mask=mask, other=0.0)
        vx = tl.load(vn_base + j.to(tl.int64)[:, None] * svn_t + d[None, :] * svn_d, mask=mask, other=0.0)
        tl.store(kt_base + slot[:, None] * st_t + d[None, :], kx, mask=mask)
        tl.store(vt_base + slot[:, None] * st_t + d[None, :], vx, mask=mask)
    # This program alone reads and writes its segment's lengths: no race.
    tl.store(q_len_ptr + s, nq + nf, mask=ok)
    tl.store(t_head_ptr + s, (head + nf) % TC, mask=ok)
    tl.store(seg_len_ptr + s, nq + tail + t, mask=ok)


def quant_pool_append(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap,
                      t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual, flush_after):
    """Triton ``quant_pool_append`` (see the module docstring); same contract as the reference."""
    B, H, t, D = k_new.shape
    L, _, _, TC, _ = k_tail.shape
    S = B * H
    deferred = _deferred()
    status = status_buffer(k_tail.device)
    # Per-layer [B, H] tables are contiguous slices of the contiguous [L, B, H] tables.
    tables = [x if x.is_contiguous() else None for x in (q_start, q_len, q_cap, t_head, seg_len, seg_cap)]
    if any(x is None for x in tables) or not (k_tail.is_contiguous() and v_tail.is_contiguous()):
        raise ValueError("kvkernels.quant_pool_append (triton): the segment tables and tails must be contiguous "
                         "(as quant_pool_build returns them)")
    qs, ql, qc, th, sl, sc = (x[layer] for x in tables)
    block_s = min(1024, triton.next_power_of_2(max(S, 1)))
    _qp_overflow_kernel[(1,)](ql, qc, sl, sc, status, S, t, TC, residual, layer, GROUP=group_size,
                              FLUSH_AFTER=bool(flush_after), ACCUMULATE=deferred, BLOCK_S=block_s)
    kt, vt = k_tail[layer].view(S, TC, D), v_tail[layer].view(S, TC, D)
    F = 32 // bits
    empty_q = k_codes.numel() == 0
    codes = (torch.zeros(1, dtype=torch.int32, device=k_tail.device),) * 2 if empty_q else (k_codes, v_codes)
    scales = (k_tail.new_zeros(1),) * 4 if empty_q else (k_scale, k_zero, v_scale, v_zero)
    _qp_append_kernel[(S,)](
        codes[0], scales[0], scales[1], codes[1], scales[2], scales[3], kt, vt, qs, ql, th, sl,
        k_new, v_new, status,
        H, t, TC, D, residual, triton.cdiv(TC + t, group_size),
        kt.stride(0), kt.stride(1), *k_new.stride(), *v_new.stride(),
        GROUP=group_size, BITS=bits, F=F, BLOCK_D=triton.next_power_of_2(D),
        BLOCK_T=min(32, max(2, triton.next_power_of_2(max(t, 1)))), FLUSH_AFTER=bool(flush_after),
        DYNAMIC=_dynamic_loops(), num_warps=4,
    )
    if not deferred and status[0].item():  # the one host sync of the default mode
        _ref.check_quant_capacity(q_len, q_cap, t_head, seg_len, seg_cap, layer, t, TC, group_size, residual,
                                  flush_after)  # raises the reference's message
        raise PoolOverflowError(f"kvkernels.quant_pool_append: appending t = {t} rows to layer {layer} overflowed "
                                f"a segment; nothing was written")


# ---------------------------------------------------------------------------------------------------
# Build


def quant_pool_build(k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack, q_rows):
    """The reference's gather, with the Triton quantize kernels (bit-exact codes)."""
    return _ref.build_with(kivi_quantize, k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack,
                           q_rows)


__all__ = ["quant_pool_append", "quant_pool_attention", "quant_pool_build"]
