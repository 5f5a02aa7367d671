"""The documented Python API: thin wrappers over ``torch.ops.kvkernels.*`` with shapes in the docstrings.

Notation: B batch, Hq query heads, Hkv KV heads (Hq % Hkv == 0, G = Hq // Hkv, query head h reads KV
head h // G), D head dim (64, 80, 96, 128, 256), L layers. Floating inputs are fp16, bf16 or fp32;
scores and LSE are fp32, lengths int32, pool offsets int64.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import ops as _k  # the ops (torch.ops.kvkernels.*), called without the dispatcher in plain eager mode


def kvzip_score(q, k, k_self, sink_len: int, chunk_start: int, chunk_end: int, sm_scale: Optional[float] = None,
                row_lse: Optional[torch.Tensor] = None):
    """KVzip reconstruction score of the chunk keys ``k[:, :, chunk_start:chunk_end]``.

    q [B, Hq, Lq, D] are the reconstruction queries (post-RoPE), k [B, Hkv, N, D] the cached keys,
    k_self [B, Hkv, Lq, D] the reconstruction input's own keys. Query row i's softmax runs over
    sink keys ``k[..., :sink_len, :]`` ∪ the chunk keys ∪ ``k_self[..., :i+1, :]``.
    Returns fp32 [B, Hkv, chunk_end - chunk_start]: per key, the max over the G query heads of its KV
    head and over all Lq rows of the probability it receives. Requires sink_len <= chunk_start < chunk_end <= N.

    ``row_lse`` fp32 [B, Hq, Lq], optional: the log-sum-exp of each query row's scaled logits over exactly
    those keys, when the caller already has it (an attention over the same rows and keys computes it).
    Every backend then takes the probability as ``exp(logit - row_lse)`` and skips its own LSE pass. It is
    not recomputed or checked against the keys: pass the LSE over the keys above, not over the whole
    context, when the chunk does not cover all of it.
    """
    return _k.kvzip_score(q, k, k_self, sink_len, chunk_start, chunk_end, sm_scale, row_lse)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [R, M]: exactly min(k, M) True per row at the largest fp32 ``scores`` [R, M].

    Ties go to the lower index, NaN ranks below -inf, +inf is allowed (protected tokens), -0.0 == +0.0.
    KVzip's global budget over all layers and heads: ``topk_mask(scores.view(B, L*Hkv*N), k)``;
    a uniform per-head budget: ``topk_mask(scores.view(B*L*Hkv, N), k)``.
    """
    return _k.topk_mask(scores, k)


class Pool(NamedTuple):
    """The ragged KV pool of all layers: segment (l, b, h) is rows seg_start[l,b,h] .. + seg_cap[l,b,h]."""

    k_pool: torch.Tensor  # [P, D]
    v_pool: torch.Tensor  # [P, D]
    seg_start: torch.Tensor  # int64 [L, B, Hkv]
    seg_len: torch.Tensor  # int32 [L, B, Hkv], live rows
    seg_cap: torch.Tensor  # int32 [L, B, Hkv], seg_len at compaction + slack


def compact_kv(keys, values, keep: torch.Tensor, num_kept: Optional[int] = None, slack: int = 0) -> Pool:
    """Evict physically: copy the kept rows of all L layers into one ragged pool.

    keys, values: lists of L tensors [B, Hkv, N, D]; keep: bool [L, B, Hkv, N]. Segment (l, b, h) holds
    that head's kept rows in token order followed by ``slack`` free, zero-filled rows for appends; segments are laid
    out in (l, b, h) order and P = num_kept + L*B*Hkv*slack. ``num_kept`` must equal ``keep.sum()``
    (it makes the pool's shape static under torch.compile); when None it is read here (a host sync).
    """
    if num_kept is None:
        num_kept = int(keep.sum())
    return Pool(*_k.compact_kv(list(keys), list(values), keep, num_kept, slack))


def ragged_append(pool_or_k_pool, *args, **kwargs) -> None:
    """Append k_new/v_new [B, Hkv, t, D] at the end of each segment of one layer, in place.

    ``ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new)`` or
    ``ragged_append(pool, layer, k_new, v_new)``. Mutates the pools and ``seg_len[layer]``. A segment
    that would pass its ``seg_cap`` raises ``PoolOverflowError`` and nothing is written; checking costs
    one host sync per call, except inside :func:`deferred_overflow_checks` (Triton backend, CUDA-graph
    safe). Roll back (drop a question and its answer) with ``seg_len.copy_(saved)``.
    """
    if isinstance(pool_or_k_pool, Pool):
        pool = pool_or_k_pool
        _k.ragged_append(pool.k_pool, pool.v_pool, pool.seg_start, pool.seg_len, pool.seg_cap, *args, **kwargs)
    else:
        _k.ragged_append(pool_or_k_pool, *args, **kwargs)


def ragged_attention(q, k_pool, v_pool, seg_start, seg_len, sm_scale: Optional[float] = None,
                     return_lse: bool = False):
    """Attention of q [B, Hq, Lq, D] over each KV head's segment of one layer of the pool.

    seg_start int64 [B, Hkv] and seg_len int32 [B, Hkv] are one layer's rows (``pool.seg_start[l]``).
    The last Lq rows of a segment are the queries' own keys (append them first); query i sees rows
    0 .. seg_len - Lq + i (bottom-right causal). Returns o [B, Hq, Lq, D], or (o, lse fp32 [B, Hq, Lq])
    with ``return_lse=True``; a query that sees no row gets o = 0 and lse = -inf. The segments of one
    call must be disjoint slices of the pool, as ``compact_kv`` and ``ragged_append`` build them (the
    Triton kernel sizes its work from the pool's row count; it never writes out of bounds, but
    overlapping segments give wrong output).
    """
    o, lse = _k.ragged_attention(q, k_pool, v_pool, seg_start, seg_len, sm_scale, return_lse)
    return (o, lse) if return_lse else o


def kivi_quantize(x: torch.Tensor, bits: int = 2, group_size: int = 32, axis: str = "key"):
    """KIVI asymmetric quantization of x [B, H, T, D] -> (codes int32, scale, zero).

    axis="key": per channel, groups of ``group_size`` consecutive tokens (T % group_size == 0);
    codes [B, H, T/F, D] with F = 32 // bits codes per int32 packed along tokens, LSB first;
    scale, zero [B, H, T/group_size, D]. axis="value": per token, groups of channels (D % group_size == 0);
    codes [B, H, T, D/F] packed along channels; scale, zero [B, H, T, D/group_size].
    zero = group min, scale = (max - min) / (2^bits - 1), stored in x.dtype; a constant group gets code 0.
    """
    return _k.kivi_quantize(x, bits, group_size, axis)


def kivi_dequantize(codes, scale, zero, bits: int = 2, group_size: int = 32, axis: str = "key"):
    """x_hat [B, H, T, D] = code * scale + zero, in scale.dtype (inverse layout of :func:`kivi_quantize`)."""
    return _k.kivi_dequantize(codes, scale, zero, bits, group_size, axis)


def kivi_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits: int = 2,
                   group_size: int = 32, sm_scale: Optional[float] = None, k_lowrank=None, v_lowrank=None):
    """Attention of q [B, Hq, Lq, D] over a KIVI cache: keys [dequant(K codes); k_tail], values likewise.

    k_tail [B, Hkv, Rk, D], v_tail [B, Hkv, Rv, D] are the full-precision recent tokens; the quantized
    parts must cover the same tokens: Tk_quant + Rk == Tv_quant + Rv. Bottom-right causal for Lq > 1.
    ``k_lowrank=(U [B, Hkv, Tk_quant, r], W [B, Hkv, D, r])`` adds U·Wᵀ to the dequantized keys
    (GEAR's residual); ``v_lowrank`` likewise for values. Returns o [B, Hq, Lq, D].
    """
    ku, kw = k_lowrank if k_lowrank is not None else (None, None)
    vu, vw = v_lowrank if v_lowrank is not None else (None, None)
    return _k.kivi_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits,
                             group_size, sm_scale, ku, kw, vu, vw)


def lowrank_residual(err: torch.Tensor, rank: int = 4, iters: int = 3):
    """(U [B, H, T, r], W [B, H, D, r]) with U·Wᵀ ≈ err [B, H, T, D], by subspace (power) iteration.

    U has orthonormal columns; the start basis is fixed, so results are deterministic.
    """
    return _k.lowrank_residual(err, rank, iters)


def deferred_overflow_checks(check_on_exit: bool = True):
    """Context manager: ``ragged_append`` on the Triton backend stops syncing to check for overflow.

    Inside it an append that would overflow writes nothing and is recorded on the device, so appends
    can be captured in a CUDA graph; :func:`check_overflow` (one sync) raises ``PoolOverflowError`` for
    the recorded ones, as does leaving the block unless ``check_on_exit=False``. Do one warm-up append
    before graph capture (it allocates the per-device status buffer). Imports Triton.
    """
    from .triton.pool import deferred_overflow_checks as _deferred

    return _deferred(check_on_exit)


def check_overflow(device=None) -> None:
    """Raise ``PoolOverflowError`` for appends that overflowed inside :func:`deferred_overflow_checks`."""
    from .triton.pool import check_overflow as _check

    _check(device)


# ---------------------------------------------------------------------------------------------------
# The quantized ragged pool (KVzip segments as KIVI codes + full-precision tails; see the README section
# "KVzip x KIVI: the quantized ragged pool" and kvkernels.reference.quant_pool for the layout)
class QuantPool(NamedTuple):
    """A quantized ragged pool of all layers. Q quantized rows, F = 32 // bits, GS = group_size, TC ring slots.

    Segment (l, b, h): quantized rows q_start .. + q_len (of q_cap), then its tail: ring slots
    ``(t_head + i) % TC`` of ``k_tail[l, b, h]`` for i < seg_len - q_len.
    """

    k_codes: torch.Tensor  # int32 [Q/F, D]: keys per channel, groups of GS rows, packed along rows
    k_scale: torch.Tensor  # [Q/GS, D]
    k_zero: torch.Tensor  # [Q/GS, D]
    v_codes: torch.Tensor  # int32 [Q, D/F]: values per row, groups of GS channels, packed along channels
    v_scale: torch.Tensor  # [Q, D/GS]
    v_zero: torch.Tensor  # [Q, D/GS]
    k_tail: torch.Tensor  # [L, B, Hkv, TC, D] full precision, a ring per segment
    v_tail: torch.Tensor  # [L, B, Hkv, TC, D]
    q_start: torch.Tensor  # int64 [L, B, Hkv], a multiple of GS
    q_len: torch.Tensor  # int32 [L, B, Hkv], quantized live rows (a multiple of GS)
    q_cap: torch.Tensor  # int32 [L, B, Hkv], quantized capacity
    t_head: torch.Tensor  # int32 [L, B, Hkv], ring slot of the oldest tail row
    seg_len: torch.Tensor  # int32 [L, B, Hkv], live rows (quantized + tail)
    seg_cap: torch.Tensor  # int32 [L, B, Hkv], seg_len at build + slack
    bits: int
    group_size: int
    residual: int

    def buffers(self) -> tuple:
        """The 14 tensors, in the ops' argument order."""
        return tuple(self)[:14]

    def lengths(self) -> tuple:
        """(q_len, t_head, seg_len): the state an append changes besides data; restore them to roll back."""
        return self.q_len, self.t_head, self.seg_len

    def nbytes(self, include_slack: bool = True) -> int:
        """Bytes of codes, scales, zeros and tails: all allocated, or only the live rows (no segment table)."""
        data = self.buffers()[:8]
        if include_slack:
            return sum(t.numel() * t.element_size() for t in data)
        D, elem = self.k_tail.shape[-1], self.k_tail.element_size()
        F = 32 // self.bits
        per_q_row = 2 * (D // F) * 4 + 2 * 2 * (D // self.group_size) * elem  # codes + scale, zero (K and V)
        q_rows = int(self.q_len.long().sum())
        tail_rows = int((self.seg_len - self.q_len).long().sum())
        return q_rows * per_q_row + tail_rows * 2 * D * elem


def quant_pool_build(k_pool, v_pool, seg_start, seg_len, bits: int = 2, group_size: int = 32, residual: int = 128,
                     slack: int = 0) -> QuantPool:
    """Quantize a ragged fp pool of all layers (``compact_kv``'s k_pool, v_pool, seg_start, seg_len) in one call.

    Every segment keeps its newest rows (at least ``residual``, fewer than residual + group_size) in a
    full-precision tail and its older rows as KIVI ``bits``-bit groups; ``slack`` rows per segment are
    reserved for appends (quantized capacity and ring slots), so appends never reallocate. Reads the
    lengths once on the host (the buffers' sizes depend on them).
    """
    from kvkernels.reference.quant_pool import quant_pool_rows

    q_rows = quant_pool_rows(seg_len, group_size, residual, slack)
    out = _k.quant_pool_build(k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack, q_rows)
    return QuantPool(*out, bits, group_size, residual)


def quant_pool_from_kv(keys, values, keep: torch.Tensor, bits: int = 2, group_size: int = 32, residual: int = 128,
                       slack: int = 0) -> QuantPool:
    """Build from per-layer keys/values [B, Hkv, N, D] and a keep mask [L, B, Hkv, N] (evict, then quantize)."""
    pool = compact_kv(keys, values, keep, slack=0)
    return quant_pool_build(pool.k_pool, pool.v_pool, pool.seg_start, pool.seg_len, bits, group_size, residual,
                            slack)


def quant_pool_append(pool: QuantPool, layer: int, k_new, v_new, flush_after: bool = False) -> None:
    """Append k_new/v_new [B, Hkv, t, D] to every segment of ``layer``, in place (one op call).

    First flushes the groups that earlier appends completed past the residual window (quantizing them),
    then writes the new rows to the full-precision tail, so attention reads them unquantized (KIVI's
    order); ``flush_after=True`` writes first and flushes after. Overflow raises ``PoolOverflowError`` and
    writes nothing (one host sync per call, none inside :func:`deferred_overflow_checks` on Triton).
    Roll back with :func:`quant_pool_rollback` to lengths saved by ``[t.clone() for t in pool.lengths()]``.
    """
    _k.quant_pool_append(*pool.buffers(), layer, k_new, v_new, pool.bits, pool.group_size, pool.residual,
                         flush_after)


def quant_pool_rollback(pool: QuantPool, saved) -> None:
    """Return to the state whose ``pool.lengths()`` were saved (exact: appends never overwrite live data)."""
    for now, then in zip(pool.lengths(), saved):
        now.copy_(then)


def quant_pool_attention(q, pool: QuantPool, layer: int, sm_scale: Optional[float] = None, return_lse: bool = False):
    """Attention of q [B, Hq, Lq, D] over layer ``layer`` of a quantized pool (one launch on Triton).

    Equals dequantize-then-:func:`ragged_attention` (bottom-right causal; the last Lq rows of each
    segment are the queries' own keys). Returns o, or (o, lse fp32 [B, Hq, Lq]) with ``return_lse``.
    """
    o, lse = _k.quant_pool_attention(q, pool.k_codes, pool.k_scale, pool.k_zero, pool.v_codes, pool.v_scale,
                                     pool.v_zero, pool.k_tail[layer], pool.v_tail[layer], pool.q_start[layer],
                                     pool.q_len[layer], pool.t_head[layer], pool.seg_len[layer], pool.bits,
                                     pool.group_size, sm_scale, return_lse)
    return (o, lse) if return_lse else o
