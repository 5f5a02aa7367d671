"""KVzip reconstruction score in Triton (op ``kvzip_score``): two passes, O(1) extra memory, fp32 math.

The score of chunk key j is ``max over the G query heads of its KV head and over all Lq rows of
softmax(row)[j]``, where row i of query head h attends to [sink keys; chunk keys; self keys 0..i].
The official KVzip code materialises the whole probability matrix; here nothing of size
``rows x keys`` ever exists, only an fp32 log-sum-exp per query row (``[B, Hq, Lq]``, a few KB).

Pass 1 - ``_lse_kernel``, grid ``(cdiv(G*Lq, BLOCK_M), B*Hkv)``:
    One program takes BLOCK_M query rows of one KV head. The G query heads of a KV head are packed
    into the row dimension (row r = g*Lq + i), so each key tile is loaded once for all G heads and
    ``tl.dot`` gets a tall tile even when Lq is 1 (decode-like) or tiny. FlashAttention-style online
    max/sum over three key ranges read in place from their tensors (no concatenation): the chunk
    ``k[chunk_start:chunk_end]`` first (never empty, so every row's running max is finite before
    the possibly all-masked causal tiles), then the sink ``k[:sink_len]``, then ``k_self`` with the
    causal mask ``j <= i``. It stores the base-2 LSE of every row. Skipped when the caller passes
    ``row_lse`` (the LSE its own attention over these rows computed).

Pass 2 - ``_colmax_kernel``, grid ``(cdiv(m, BLOCK_N), B*Hkv)``:
    One program owns BLOCK_N chunk keys of one KV head, keeps them in registers, and loops over all
    G*Lq query rows of that head in tiles of BLOCK_M: ``p = exp2(scale*log2(e)*q.k - lse)``, running
    column max. Because each output element belongs to exactly one program, there are no atomics
    and no cross-program reduction; the result is deterministic.

Both passes compute ``q.k`` the same way (``tl.dot`` on the input dtype - fp16/bf16 on tensor cores,
fp32 in IEEE precision, never TF32 - with fp32 accumulation), so pass 2's logits are consistent with
the LSE of pass 1. Cost: pass 2 recomputes the logits of the chunk columns, so about 2x the QK^T
FLOPs of one attention pass over the chunk, and no PV product at all.

Head dims 64/80/96/128/256 are padded to a power of two with masked loads. Arbitrary strides are
accepted for q, k and k_self (k is typically a view into a larger KV cache). Batch >= 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvkernels import tuning

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------
# Launch configuration (tuning contract of kvkernels.tuning / issue 6)
def _shape_key(q, k, k_self, sink_len, chunk_start, chunk_end, sm_scale) -> str:
    B, Hq, Lq, D = q.shape
    G = Hq // k.shape[1]
    rows = tuning.length_bucket(G * Lq)
    keys = tuning.length_bucket(chunk_end - chunk_start)
    dtype = str(q.dtype).replace("torch.", "")
    return f"D{D}-G{G}-R{rows}-M{keys}-{dtype}"


def _default_config(q, k, k_self, sink_len, chunk_start, chunk_end, sm_scale) -> dict:
    """Heuristic: 64x64 logit tiles (32 keys at D=256 to bound registers), smaller M for few rows."""
    B, Hq, Lq, D = q.shape
    rows = (Hq // k.shape[1]) * Lq
    block_m = min(64, max(16, triton.next_power_of_2(rows)))  # tl.dot needs M >= 16
    block_n = 32 if D > 128 else 64
    if q.dtype == torch.float32:
        # IEEE fp32 dots run on FMA units with both operands held in registers: 64 x 64 tiles at D = 128
        # spilled ~89 KB per thread in the LSE pass (static check, sm_90a). Quarter-size tiles fit.
        block_m, block_n = min(block_m, 32), 32 if D <= 128 else 16
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8 if D > 128 else 4, "num_stages": 2}


TUNABLE = {
    "kvzip_score": {
        # One config drives both passes: both work on [BLOCK_M, BLOCK_N] logit tiles.
        "space": [
            {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
            {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
            {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
            {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
            {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
            {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
            {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
            {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
        ],
        "key": _shape_key,
        "default": _default_config,
    },
}


# ---------------------------------------------------------------------------------------------------
# Kernels
@triton.jit
def _load_q_rows(q_ptr, b, hk, rows, offs_d, G, Lq, D, stride_qb, stride_qh, stride_ql, stride_qd):
    """Rows r = g*Lq + i of the G query heads of KV head hk, as one [BLOCK_M, BLOCK_D] tile."""
    g = rows // Lq
    i = rows % Lq
    row_off = b * stride_qb + (hk * G + g).to(tl.int64) * stride_qh + i.to(tl.int64) * stride_ql
    ptrs = q_ptr + row_off[:, None] + offs_d[None, :] * stride_qd
    return tl.load(ptrs, mask=(rows[:, None] < G * Lq) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _load_k_tile_t(k_base, offs_n, hi, offs_d, D, stride_kn, stride_kd):
    """Keys offs_n (< hi) transposed to [BLOCK_D, BLOCK_N], ready to be the right operand of tl.dot."""
    ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd
    return tl.load(ptrs, mask=(offs_n[None, :] < hi) & (offs_d[:, None] < D), other=0.0)


@triton.jit
def _online_lse(m_i, l_i, q, k_base, lo, hi, row_i, offs_d, D, stride_kn, stride_kd, scale_log2,
                CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Fold keys [lo, hi) of one tensor into the running base-2 (max, sum) of every row."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kt = _load_k_tile_t(k_base, offs_n, hi, offs_d, D, stride_kn, stride_kd)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        visible = offs_n[None, :] < hi
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= row_i[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    return m_i, l_i


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, ks_ptr, lse_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_sb, stride_sh, stride_sn, stride_sd,
    Hkv, G, Lq, D, sink_len, chunk_start, chunk_end, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = bh % Hkv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_q_rows(q_ptr, b, hk, rows, offs_d, G, Lq, D, stride_qb, stride_qh, stride_ql, stride_qd)
    row_i = rows % Lq  # position of the row inside its head's reconstruction block (causal self mask)

    k_base = k_ptr + b * stride_kb + hk.to(tl.int64) * stride_kh
    ks_base = ks_ptr + b * stride_sb + hk.to(tl.int64) * stride_sh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # Chunk first: it is never empty, so m_i is finite before any tile whose row is fully masked.
    m_i, l_i = _online_lse(m_i, l_i, q, k_base, chunk_start, chunk_end, row_i, offs_d, D, stride_kn,
                           stride_kd, scale_log2, False, BLOCK_N, PRECISION)
    m_i, l_i = _online_lse(m_i, l_i, q, k_base, 0, sink_len, row_i, offs_d, D, stride_kn, stride_kd,
                           scale_log2, False, BLOCK_N, PRECISION)
    m_i, l_i = _online_lse(m_i, l_i, q, ks_base, 0, Lq, row_i, offs_d, D, stride_sn, stride_sd,
                           scale_log2, True, BLOCK_N, PRECISION)
    # lse is [B, Hq, Lq] contiguous, so the G*Lq rows of one KV head are contiguous from bh*G*Lq.
    tl.store(lse_ptr + bh.to(tl.int64) * G * Lq + rows, m_i + tl.log2(l_i), mask=rows < G * Lq)


@triton.jit
def _colmax_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    Hkv, G, Lq, D, chunk_start, chunk_end, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    local_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # index inside the chunk = output column
    k_base = k_ptr + b * stride_kb + hk.to(tl.int64) * stride_kh
    kt = _load_k_tile_t(k_base, chunk_start + local_n, chunk_end, offs_d, D, stride_kn, stride_kd)

    n_rows = G * Lq
    lse_base = lse_ptr + bh.to(tl.int64) * n_rows
    col_max = tl.zeros([BLOCK_N], tl.float32)  # probabilities are >= 0
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        q = _load_q_rows(q_ptr, b, hk, rows, offs_d, G, Lq, D, stride_qb, stride_qh, stride_ql, stride_qd)
        # Padding rows get lse = +inf, hence probability 0, so they never win the max.
        lse = tl.load(lse_base + rows, mask=rows < n_rows, other=float("inf"))
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        p = tl.exp2(s - lse[:, None])
        col_max = tl.maximum(col_max, tl.max(p, 0))
    m = chunk_end - chunk_start
    tl.store(out_ptr + bh.to(tl.int64) * m + local_n, col_max, mask=local_n < m)


# ---------------------------------------------------------------------------------------------------
# Host side
def _empty(*shape, dtype, device):
    """Allocation of outputs and workspaces (one place, so tests can poison it with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def kvzip_score(q, k, k_self, sink_len, chunk_start, chunk_end, sm_scale, row_lse=None, *, config=None):
    """Same contract as :func:`kvkernels.reference.kvzip_score.kvzip_score`; fp32 [B, Hkv, m].

    With ``row_lse`` (natural log) given, pass 1 is skipped: pass 2 reads it converted to base 2."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    m = chunk_end - chunk_start
    if config is None:
        args = (q, k, k_self, sink_len, chunk_start, chunk_end, sm_scale)
        config = tuning.lookup(__name__, "kvzip_score", _shape_key(*args), q.device) or _default_config(*args)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    launch = {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 2)}
    block_d = triton.next_power_of_2(D)
    # fp32 inputs: full IEEE products (TF32 would cost ~1e-3 relative error in the logits).
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    scale_log2 = float(sm_scale) * LOG2E

    out = _empty(B, Hkv, m, dtype=torch.float32, device=q.device)
    if row_lse is not None:
        lse = (row_lse * LOG2E).contiguous()  # a new [B, Hq, Lq] tensor: the layout pass 2 reads
    else:
        lse = _empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
        _lse_kernel[(triton.cdiv(G * Lq, block_m), B * Hkv)](
            q, k, k_self, lse, *q.stride(), *k.stride(), *k_self.stride(),
            Hkv, G, Lq, D, sink_len, chunk_start, chunk_end, scale_log2,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, **launch,
        )
    _colmax_kernel[(triton.cdiv(m, block_n), B * Hkv)](
        q, k, lse, out, *q.stride(), *k.stride(),
        Hkv, G, Lq, D, chunk_start, chunk_end, scale_log2,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, **launch,
    )
    return out


__all__ = ["TUNABLE", "kvzip_score"]
