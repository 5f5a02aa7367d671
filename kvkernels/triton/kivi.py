"""Triton kernels of the KIVI family: quantize, dequantize, fused quantized decode attention (ops 6 and 7).

Layout (the contract of ``kvkernels.reference.kivi``): F = 32 // bits codes per int32, least significant
bits first. axis="key" groups ``group_size`` consecutive tokens of one channel and packs along tokens
(codes [B,H,T/F,D], scale/zero [B,H,T/G,D]); axis="value" groups channels of one token and packs along
channels (codes [B,H,T,D/F], scale/zero [B,H,T,D/G]).

Design
------
* Quantize is one pass per tile: the program loads whole groups, reduces min/max in registers, writes
  scale/zero, computes the codes and packs them by reshaping the code tile to [words, F, ...], shifting
  each code to its slot and summing along F (the fields never overlap, so the sum is a bitwise OR).
  No int32 intermediate of the unpacked codes ever reaches memory. The same kernel optionally writes the
  quantization error x - dequant(quant(x)) (``quantization_error``, used by the GEAR residual), so the
  error is produced in the same pass and written once.
* Bit-exact codes: the reference computes ``round_half_even((x - zero) / scale)`` in fp32 with the
  *stored* (rounded to x.dtype) scale. Triton's ``/`` on fp32 compiles to an approximate division on
  NVIDIA, so we use ``tl.math.div_rn`` (IEEE round-to-nearest, present in Triton 3.x). Rounding uses the
  magic-number trick: for 0 <= v < 2^22, v + 1.5*2^23 lands in [2^23, 2^24) where the fp32 spacing is
  exactly 1, so the IEEE addition itself rounds v to an integer, half to even; subtracting 1.5*2^23 back
  is exact. We clamp v to [0, 2^bits - 1] first (clamping and rounding commute for integer bounds),
  which keeps v in the trick's range and maps NaN-free overflow to the top code.
* Attention (split-K flash decoding): grid (B*Hkv, row blocks, splits). One program owns all G query
  heads x Lq rows of one KV head (rows m = g*Lq + i, padded to >= 16 for ``tl.dot``) and a contiguous
  range of tokens. Per BLOCK_N tile it loads the packed key words [BLOCK_N/F, D], unpacks them with a
  broadcast shift + reshape, applies the per-group scale/zero (fp32 FMA, rounded to q.dtype as the
  reference's dequantize does), and takes the full-precision tail for tokens >= T_quant with a masked
  select: keys and values may switch from codes to tail at different tokens (Tk_quant != Tv_quant),
  so the choice is per token, not per tile; masked loads cost no memory traffic. Online softmax in
  exp2; values are unpacked the same way. A merge kernel combines the splits by log-sum-exp; with a
  single split the kernel writes the output directly (one launch).
* GEAR low rank: logits of quantized keys += (q.W_k).U_kᵀ with qW [rows, r] computed once per program;
  p.U_v is accumulated as an [rows, r] side accumulator and multiplied by W_vᵀ once per program before
  the split's partial output is written. Doing that per split instead of in the merge is equivalent
  (the merge is linear in the partial outputs) and keeps the workspace at D columns.
* The grid depends only on shapes and the config (never on tensor values), so launches are CUDA-graph
  safe for fixed shapes. The number of splits comes from the config (keyed by a length bucket); splits
  past the live tokens simply contribute nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvkernels import tuning

def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output and workspace is allocated here (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# Shared jit helpers


@triton.jit
def _round_half_even_clamped(v, LEVELS: tl.constexpr):
    """round_half_even(clamp(v, 0, LEVELS)) in fp32, exact (see the module docstring)."""
    v = tl.minimum(tl.maximum(v, 0.0), LEVELS * 1.0)
    # 12582912 = 1.5 * 2^23: the sum lies in [2^23, 2^24), where fp32 spacing is 1, so the IEEE add rounds
    # v to an integer, ties to even; the subtraction is exact. (No fast-math: nothing reassociates this.)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _stored_scale_zero(lo, hi, LEVELS: tl.constexpr, STORE_DTYPE: tl.constexpr):
    """The group's (scale, zero) rounded to the storage dtype, returned in fp32 (exact upcast)."""
    zero = lo.to(STORE_DTYPE).to(tl.float32)
    levels = tl.full(hi.shape, LEVELS, tl.float32)
    scale = tl.math.div_rn(hi - lo, levels).to(STORE_DTYPE).to(tl.float32)
    return scale, zero


@triton.jit
def _group_codes(x, scale, zero, LEVELS: tl.constexpr):
    """int32 codes of fp32 x from the stored scale/zero (broadcast to x): bit-exact with the reference."""
    safe = tl.where(scale > 0, scale, 1.0)
    ratio = tl.math.div_rn(x - zero, safe)
    return tl.where(scale > 0, _round_half_even_clamped(ratio, LEVELS), 0.0).to(tl.int32)


@triton.jit
def _pack_last_axis(codes, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr, F: tl.constexpr):
    """[ROWS, COLS] codes -> [ROWS, COLS/F] int32 words, code j of a word in bits [j*BITS, (j+1)*BITS)."""
    c = tl.reshape(codes.to(tl.uint32), (ROWS, COLS // F, F))
    shifts = (tl.arange(0, F) * BITS).to(tl.uint32)
    # Fields never overlap, so the (wrapping) uint32 sum is a bitwise OR.
    return tl.sum(c << shifts[None, None, :], axis=2).to(tl.int32, bitcast=True)


@triton.jit
def _pack_first_axis(codes, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr, F: tl.constexpr):
    """[ROWS, COLS] codes -> [ROWS/F, COLS] int32 words, packing F consecutive rows LSB first."""
    c = tl.reshape(codes.to(tl.uint32), (ROWS // F, F, COLS))
    shifts = (tl.arange(0, F) * BITS).to(tl.uint32)
    return tl.sum(c << shifts[None, :, None], axis=1).to(tl.int32, bitcast=True)


@triton.jit
def _unpack_rows(words, WROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr, F: tl.constexpr):
    """[WROWS, COLS] words packed along rows -> [WROWS*F, COLS] int32 codes."""
    shifts = tl.arange(0, F) * BITS
    c = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(c, (WROWS * F, COLS))


@triton.jit
def _unpack_cols(words, ROWS: tl.constexpr, WCOLS: tl.constexpr, BITS: tl.constexpr, F: tl.constexpr):
    """[ROWS, WCOLS] words packed along columns -> [ROWS, WCOLS*F] int32 codes."""
    shifts = tl.arange(0, F) * BITS
    # Arithmetic shift of a negative word sign-extends, but the mask keeps only the field's own bits.
    c = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(c, (ROWS, WCOLS * F))


@triton.jit
def _rows_to_tokens(rows, NR: tl.constexpr, PER: tl.constexpr, COLS: tl.constexpr):
    """[NR, COLS] per-group rows -> [NR*PER, COLS]: row r repeated for the PER tokens of its group."""
    return tl.reshape(tl.broadcast_to(rows[:, None, :], (NR, PER, COLS)), (NR * PER, COLS))


@triton.jit
def _cols_to_channels(cols, ROWS: tl.constexpr, NC: tl.constexpr, PER: tl.constexpr):
    """[ROWS, NC] per-group columns -> [ROWS, NC*PER]: column c repeated for the PER channels of its group."""
    return tl.reshape(tl.broadcast_to(cols[:, :, None], (ROWS, NC, PER)), (ROWS, NC * PER))


# ---------------------------------------------------------------------------------------------------
# Quantize (and the fused quantize -> dequantize -> error step)


@triton.jit
def _quant_key_kernel(
    x_ptr, c_ptr, s_ptr, z_ptr, e_ptr,
    H, T, D,
    sxb, sxh, sxt, sxd,
    GROUP: tl.constexpr, BITS: tl.constexpr, F: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_ERR: tl.constexpr,
):
    # One program = one group of GROUP tokens x BLOCK_D channels of one (b, h). Outputs are contiguous.
    # int64 (b, h) index: B*H*T*D may pass 2**31 elements (large batches), so every offset built from
    # pid_bh, b or h must be 64-bit; int32 products would wrap and address the wrong memory.
    # Token groups on grid axis 0 (up to 2**31 - 1 programs), (b, h) on axis 1: CUDA caps axes 1 and 2
    # at 65535, which T // GROUP passes for prefills of more than ~2M tokens.
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_g = tl.program_id(0)
    pid_d = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    LEVELS: tl.constexpr = (1 << BITS) - 1
    WPG: tl.constexpr = GROUP // F  # int32 words per group along tokens

    toks = pid_g.to(tl.int64) * GROUP + tl.arange(0, GROUP)  # int64: T * token stride can pass 2^31
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dims < D
    mask = (toks < T)[:, None] & d_ok[None, :]
    x_raw = tl.load(x_ptr + b * sxb + h * sxh + toks[:, None] * sxt + dims[None, :] * sxd, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    lo = tl.min(x, axis=0)
    hi = tl.max(x, axis=0)
    scale, zero = _stored_scale_zero(lo, hi, LEVELS, x_raw.dtype)
    codes = _group_codes(x, scale[None, :], zero[None, :], LEVELS)

    g_off = (pid_bh * (T // GROUP) + pid_g) * D + dims
    tl.store(s_ptr + g_off, scale.to(x_raw.dtype), mask=d_ok)
    tl.store(z_ptr + g_off, zero.to(x_raw.dtype), mask=d_ok)
    words = _pack_first_axis(codes, GROUP, BLOCK_D, BITS, F)
    w_rows = pid_g * WPG + tl.arange(0, WPG)
    tl.store(c_ptr + (pid_bh * (T // F) + w_rows[:, None]) * D + dims[None, :], words, mask=d_ok[None, :])

    if WRITE_ERR:
        deq = (codes.to(tl.float32) * scale[None, :] + zero[None, :]).to(x_raw.dtype).to(tl.float32)
        e_off = (pid_bh * T + toks[:, None]) * D + dims[None, :]
        tl.store(e_ptr + e_off, (x - deq).to(e_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quant_value_kernel(
    x_ptr, c_ptr, s_ptr, z_ptr, e_ptr,
    H, T, D,
    sxb, sxh, sxt, sxd,
    GROUP: tl.constexpr, BITS: tl.constexpr, F: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_ERR: tl.constexpr,
):
    # One program = BLOCK_T tokens x all channels (padded to BLOCK_D; D is a multiple of GROUP, so padded
    # channels form whole padded groups that are never stored). int64 pid_bh: see _quant_key_kernel.
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_t = tl.program_id(0)  # token blocks on axis 0: see _quant_key_kernel (here T > ~1M tokens)
    b = pid_bh // H
    h = pid_bh % H
    LEVELS: tl.constexpr = (1 << BITS) - 1
    NGP: tl.constexpr = BLOCK_D // GROUP

    toks = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: T * token stride can pass 2^31
    t_ok = toks < T
    dims = tl.arange(0, BLOCK_D)
    mask = t_ok[:, None] & (dims < D)[None, :]
    x_raw = tl.load(x_ptr + b * sxb + h * sxh + toks[:, None] * sxt + dims[None, :] * sxd, mask=mask, other=0.0)
    x3 = tl.reshape(x_raw.to(tl.float32), (BLOCK_T, NGP, GROUP))
    lo = tl.min(x3, axis=2)
    hi = tl.max(x3, axis=2)
    scale, zero = _stored_scale_zero(lo, hi, LEVELS, x_raw.dtype)
    codes3 = _group_codes(x3, scale[:, :, None], zero[:, :, None], LEVELS)

    gidx = tl.arange(0, NGP)
    NG = D // GROUP
    g_mask = t_ok[:, None] & (gidx < NG)[None, :]
    g_off = (pid_bh * T + toks[:, None]) * NG + gidx[None, :]
    tl.store(s_ptr + g_off, scale.to(x_raw.dtype), mask=g_mask)
    tl.store(z_ptr + g_off, zero.to(x_raw.dtype), mask=g_mask)

    codes = tl.reshape(codes3, (BLOCK_T, BLOCK_D))
    words = _pack_last_axis(codes, BLOCK_T, BLOCK_D, BITS, F)
    widx = tl.arange(0, BLOCK_D // F)
    NW = D // F
    tl.store(c_ptr + (pid_bh * T + toks[:, None]) * NW + widx[None, :], words,
             mask=t_ok[:, None] & (widx < NW)[None, :])

    if WRITE_ERR:
        deq3 = (codes3.to(tl.float32) * scale[:, :, None] + zero[:, :, None]).to(x_raw.dtype).to(tl.float32)
        err = tl.reshape(x3 - deq3, (BLOCK_T, BLOCK_D))
        e_off = (pid_bh * T + toks[:, None]) * D + dims[None, :]
        tl.store(e_ptr + e_off, err.to(e_ptr.dtype.element_ty), mask=mask)


def _quantize_launch(x, bits, group_size, axis, write_err, config):
    B, H, T, D = x.shape
    F = 32 // bits
    if axis == "key":
        codes = _empty((B, H, T // F, D), torch.int32, x.device)
        scale = _empty((B, H, T // group_size, D), x.dtype, x.device)
    else:
        codes = _empty((B, H, T, D // F), torch.int32, x.device)
        scale = _empty((B, H, T, D // group_size), x.dtype, x.device)
    zero = _empty(scale.shape, scale.dtype, x.device)
    err = _empty(x.shape, x.dtype, x.device) if write_err else codes  # placeholder pointer when unused
    if B * H * T == 0:
        return codes, scale, zero, (err if write_err else None)
    if axis == "key":
        block_d = min(config["BLOCK_D"], _next_pow2(D))
        grid = (T // group_size, B * H, triton.cdiv(D, block_d))
        _quant_key_kernel[grid](
            x, codes, scale, zero, err, H, T, D, *_strides(x),
            GROUP=group_size, BITS=bits, F=F, BLOCK_D=block_d, WRITE_ERR=write_err,
            num_warps=config["num_warps"],
        )
    else:
        block_t = config["BLOCK_T"]
        grid = (triton.cdiv(T, block_t), B * H)
        _quant_value_kernel[grid](
            x, codes, scale, zero, err, H, T, D, *_strides(x),
            GROUP=group_size, BITS=bits, F=F, BLOCK_T=block_t, BLOCK_D=_next_pow2(D), WRITE_ERR=write_err,
            num_warps=config["num_warps"],
        )
    return codes, scale, zero, (err if write_err else None)


def _quant_key(x, bits, group_size, axis):
    B, H, T, D = x.shape
    return f"{axis}-b{bits}-g{group_size}-D{D}-BH{tuning.length_bucket(B * H)}-N{tuning.length_bucket(T)}"


def _quant_default(x, bits, group_size, axis):
    # Key axis: a group of tokens is the natural tile (the min/max reduction needs all of it).
    # Value axis: a token is a row of whole channel groups; 16 tokens per program keep the tile small.
    return {"BLOCK_T": 16, "BLOCK_D": 64, "num_warps": 4}


def _config(op, key_fn, default_fn, args, config):
    if config is not None:
        return config
    return tuning.lookup(__name__, op, key_fn(*args), args[0].device) or default_fn(*args)


def kivi_quantize(x, bits, group_size, axis, *, config=None):
    """Triton backend of ``kvkernels.kivi_quantize`` (bit-exact codes vs the reference)."""
    cfg = _config("kivi_quantize", _quant_key, _quant_default, (x, bits, group_size, axis), config)
    codes, scale, zero, _ = _quantize_launch(x, bits, group_size, axis, False, cfg)
    return codes, scale, zero


def quantization_error(x, bits, group_size, axis, *, config=None):
    """(codes, scale, zero, err) in one pass: err = x - kivi_dequantize(kivi_quantize(x)) in x.dtype.

    The GEAR step needs the quantization error; computing it here means x is read once and the error is
    written once, instead of quantize + dequantize + subtract (three passes, two extra tensors).
    """
    cfg = _config("kivi_quantize", _quant_key, _quant_default, (x, bits, group_size, axis), config)
    return _quantize_launch(x, bits, group_size, axis, True, cfg)


# ---------------------------------------------------------------------------------------------------
# Dequantize


@triton.jit
def _dequant_key_kernel(
    c_ptr, s_ptr, z_ptr, o_ptr,
    H, T, D,
    scb, sch, sct, scd, ssb, ssh, sst, ssd,
    GROUP: tl.constexpr, BITS: tl.constexpr, F: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: outputs may exceed 2**31 elements
    pid_t = tl.program_id(0)  # token blocks on axis 0: see _quant_key_kernel
    pid_d = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    WR: tl.constexpr = BLOCK_T // F
    wrows = pid_t.to(tl.int64) * WR + tl.arange(0, WR)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dims < D
    words = tl.load(c_ptr + b * scb + h * sch + wrows[:, None] * sct + dims[None, :] * scd,
                    mask=(wrows < T // F)[:, None] & d_ok[None, :], other=0)
    codes = _unpack_rows(words, WR, BLOCK_D, BITS, F)
    toks = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: T * token stride can pass 2^31
    mask = (toks < T)[:, None] & d_ok[None, :]
    g_ptr = b * ssb + h * ssh + (toks // GROUP)[:, None] * sst + dims[None, :] * ssd
    scale = tl.load(s_ptr + g_ptr, mask=mask, other=0.0)
    zero = tl.load(z_ptr + g_ptr, mask=mask, other=0.0)
    x = codes.to(tl.float32) * scale.to(tl.float32) + zero.to(tl.float32)
    tl.store(o_ptr + (pid_bh * T + toks[:, None]) * D + dims[None, :], x.to(scale.dtype), mask=mask)


@triton.jit
def _dequant_value_kernel(
    c_ptr, s_ptr, z_ptr, o_ptr,
    H, T, D,
    scb, sch, sct, scd, ssb, ssh, sst, ssd,
    GROUP: tl.constexpr, BITS: tl.constexpr, F: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: outputs may exceed 2**31 elements
    pid_t = tl.program_id(0)  # token blocks on axis 0: see _quant_key_kernel
    b = pid_bh // H
    h = pid_bh % H
    WC: tl.constexpr = BLOCK_D // F
    toks = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: T * token stride can pass 2^31
    t_ok = toks < T
    widx = tl.arange(0, WC)
    words = tl.load(c_ptr + b * scb + h * sch + toks[:, None] * sct + widx[None, :] * scd,
                    mask=t_ok[:, None] & (widx < D // F)[None, :], other=0)
    codes = _unpack_cols(words, BLOCK_T, WC, BITS, F)
    dims = tl.arange(0, BLOCK_D)
    mask = t_ok[:, None] & (dims < D)[None, :]
    g_ptr = b * ssb + h * ssh + toks[:, None] * sst + (dims // GROUP)[None, :] * ssd
    scale = tl.load(s_ptr + g_ptr, mask=mask, other=0.0)
    zero = tl.load(z_ptr + g_ptr, mask=mask, other=0.0)
    x = codes.to(tl.float32) * scale.to(tl.float32) + zero.to(tl.float32)
    tl.store(o_ptr + (pid_bh * T + toks[:, None]) * D + dims[None, :], x.to(scale.dtype), mask=mask)


def _dequant_key(codes, scale, zero, bits, group_size, axis):
    B, H = codes.shape[:2]
    F = 32 // bits
    T, D = (codes.shape[2] * F, codes.shape[3]) if axis == "key" else (codes.shape[2], codes.shape[3] * F)
    return f"{axis}-b{bits}-g{group_size}-D{D}-BH{tuning.length_bucket(B * H)}-N{tuning.length_bucket(T)}"


def _dequant_default(codes, scale, zero, bits, group_size, axis):
    return {"BLOCK_T": 32, "BLOCK_D": 64, "num_warps": 4}


def kivi_dequantize(codes, scale, zero, bits, group_size, axis, *, config=None):
    """Triton backend of ``kvkernels.kivi_dequantize``: code * scale + zero in fp32, cast to scale.dtype."""
    cfg = _config("kivi_dequantize", _dequant_key, _dequant_default,
                  (codes, scale, zero, bits, group_size, axis), config)
    F = 32 // bits
    B, H = codes.shape[:2]
    T, D = (codes.shape[2] * F, codes.shape[3]) if axis == "key" else (codes.shape[2], codes.shape[3] * F)
    out = _empty((B, H, T, D), scale.dtype, codes.device)
    if out.numel() == 0:
        return out
    block_t = max(cfg["BLOCK_T"], 2 * F)  # key tiles hold whole int32 words of tokens (at least two)
    if axis == "key":
        block_d = min(cfg["BLOCK_D"], _next_pow2(D))
        grid = (triton.cdiv(T, block_t), B * H, triton.cdiv(D, block_d))
        kernel = _dequant_key_kernel
    else:
        block_d = _next_pow2(D)
        grid = (triton.cdiv(T, block_t), B * H)
        kernel = _dequant_value_kernel
    kernel[grid](
        codes, scale, zero, out, H, T, D, *_strides(codes), *_strides(scale),
        GROUP=group_size, BITS=bits, F=F, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )
    return out


# ---------------------------------------------------------------------------------------------------
# Fused attention over the quantized cache (split-K flash decoding)

_LOG2E = 1.4426950408889634


@triton.jit
def _kivi_attn_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kt_ptr, vt_ptr,
    ku_ptr, kw_ptr, vu_ptr, vw_ptr,
    o_ptr, po_ptr, plse_ptr,
    sqb, sqh, sql, sqd,
    skcb, skch, skct, skcd, sksb, sksh, skst, sksd,
    svcb, svch, svct, svcd, svsb, svsh, svst, svsd,
    sktb, skth, sktt, sktd, svtb, svth, svtt, svtd,
    skub, skuh, skut, skur, skwb, skwh, skwd, skwr,
    svub, svuh, svut, svur, svwb, svwh, svwd, svwr,
    sob, soh, sol, sod,
    Hkv, G, Lq, M, D, T, Tk, Tv, RANK, qk_scale, tokens_per_split, NUM_SPLITS, M_PAD,
    BITS: tl.constexpr, F: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_KLR: tl.constexpr, HAS_VLR: tl.constexpr, DIRECT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets into caches of > 2**31 elements
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hkv
    h = pid_bh % Hkv

    # Rows m = g * Lq + i: all G query heads of this KV head and all Lq query positions, one tl.dot tile.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    g = rows // Lq
    qi = rows % Lq
    hq = h * G + g
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < D
    q = tl.load(q_ptr + b * sqb + hq[:, None] * sqh + qi[:, None] * sql + dims[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    DT = q.dtype
    last_visible = T - Lq + qi  # bottom-right causal: row i sees tokens 0 .. T - Lq + i

    ranks = tl.arange(0, BLOCK_R)
    r_ok = ranks < RANK
    if HAS_KLR:
        # qW once per program: logits of quantized keys gain (q.W_k).U_kᵀ, never a dense D x T matrix.
        kw = tl.load(kw_ptr + b * skwb + h * skwh + dims[:, None] * skwd + ranks[None, :] * skwr,
                     mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        # In the cache dtype: fp32 operands in these small dots (tf32 for fp16/bf16) pushed the kernel past
        # 255 registers and spilled (static check); fp32 inputs keep IEEE fp32 (DT is fp32 there).
        qw = tl.dot(q, kw.to(DT), input_precision=DOT_PREC).to(DT)
    acc_r = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    WN: tl.constexpr = BLOCK_N // F   # key words per tile (keys pack along tokens)
    WD: tl.constexpr = BLOCK_D // F   # value words per row (values pack along channels)
    KG: tl.constexpr = BLOCK_N // GROUP if BLOCK_N > GROUP else 1  # key groups per tile
    VG: tl.constexpr = BLOCK_D // GROUP if BLOCK_D > GROUP else 1  # value channel groups per row
    wcols = tl.arange(0, WD)
    start = pid_s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, T)
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: T * token stride can pass 2^31
        in_seq = toks < T

        # ---- keys: codes for tokens < Tk, the full-precision tail after
        k_quant = toks < Tk
        wrows = n0 // F + tl.arange(0, WN).to(tl.int64)
        kwords = tl.load(kc_ptr + b * skcb + h * skch + wrows[:, None] * skct + dims[None, :] * skcd,
                         mask=(wrows < Tk // F)[:, None] & d_ok[None, :], other=0)
        kcodes = _unpack_rows(kwords, WN, BLOCK_D, BITS, F)
        # Key scale/zero: one row per group of GROUP tokens, so the tile needs KG rows, loaded once each
        # and broadcast to the group's tokens in registers (tiles start at multiples of min(BLOCK_N,
        # GROUP), so a tile holds whole groups or lies inside one).
        kgrp = n0 // GROUP + tl.arange(0, KG).to(tl.int64)
        kg = b * sksb + h * sksh + kgrp[:, None] * skst + dims[None, :] * sksd
        kg_mask = (kgrp < Tk // GROUP)[:, None] & d_ok[None, :]
        ksc = _rows_to_tokens(tl.load(ks_ptr + kg, mask=kg_mask, other=0.0).to(tl.float32), KG, BLOCK_N // KG,
                              BLOCK_D)
        kze = _rows_to_tokens(tl.load(kz_ptr + kg, mask=kg_mask, other=0.0).to(tl.float32), KG, BLOCK_N // KG,
                              BLOCK_D)
        k_deq = (kcodes.to(tl.float32) * ksc + kze).to(DT)
        ktail = tl.load(kt_ptr + b * sktb + h * skth + (toks - Tk)[:, None] * sktt + dims[None, :] * sktd,
                        mask=(~k_quant & in_seq)[:, None] & d_ok[None, :], other=0.0)
        k = tl.where(k_quant[:, None], k_deq, ktail)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if HAS_KLR:
            ku = tl.load(ku_ptr + b * skub + h * skuh + toks[:, None] * skut + ranks[None, :] * skur,
                         mask=k_quant[:, None] & r_ok[None, :], other=0.0)
            s += tl.dot(qw, tl.trans(ku.to(DT)), input_precision=DOT_PREC)
        visible = (toks[None, :] <= last_visible[:, None]) & in_seq[None, :]
        s = tl.where(visible, s * qk_scale, float("-inf"))

        # ---- online softmax (base 2); a row that has seen nothing yet keeps m = -inf safely
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        # ---- values: codes for tokens < Tv, the tail after
        v_quant = toks < Tv
        vwords = tl.load(vc_ptr + b * svcb + h * svch + toks[:, None] * svct + wcols[None, :] * svcd,
                         mask=v_quant[:, None] & (wcols < D // F)[None, :], other=0)
        vcodes = _unpack_cols(vwords, BLOCK_N, WD, BITS, F)
        # Value scale/zero: VG groups of channels per token, loaded as [BLOCK_N, VG] vectors and broadcast
        # to the group's GROUP channels in registers.
        vgrp = tl.arange(0, VG)
        vg = b * svsb + h * svsh + toks[:, None] * svst + vgrp[None, :] * svsd
        vg_mask = v_quant[:, None] & (vgrp < D // GROUP)[None, :]
        vsc = _cols_to_channels(tl.load(vs_ptr + vg, mask=vg_mask, other=0.0).to(tl.float32), BLOCK_N, VG,
                                BLOCK_D // VG)
        vze = _cols_to_channels(tl.load(vz_ptr + vg, mask=vg_mask, other=0.0).to(tl.float32), BLOCK_N, VG,
                                BLOCK_D // VG)
        v_deq = (vcodes.to(tl.float32) * vsc + vze).to(DT)
        vtail = tl.load(vt_ptr + b * svtb + h * svth + (toks - Tv)[:, None] * svtt + dims[None, :] * svtd,
                        mask=(~v_quant & in_seq)[:, None] & d_ok[None, :], other=0.0)
        v = tl.where(v_quant[:, None], v_deq, vtail)

        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v, input_precision=DOT_PREC)
        if HAS_VLR:
            vu = tl.load(vu_ptr + b * svub + h * svuh + toks[:, None] * svut + ranks[None, :] * svur,
                         mask=v_quant[:, None] & r_ok[None, :], other=0.0)
            acc_r = acc_r * alpha[:, None] + tl.dot(p.to(DT), vu.to(DT), input_precision=DOT_PREC)

    if HAS_VLR:
        # (p.U_v).W_vᵀ once per program; the split merge is linear, so applying it here is exact.
        vw = tl.load(vw_ptr + b * svwb + h * svwh + dims[:, None] * svwd + ranks[None, :] * svwr,
                     mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        acc += tl.dot(acc_r, tl.trans(vw.to(tl.float32)), input_precision=DOT_PREC)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]  # a row that saw nothing has acc = 0 -> output 0, like the reference
    if DIRECT:
        tl.store(o_ptr + b * sob + hq[:, None] * soh + qi[:, None] * sol + dims[None, :] * sod, out.to(DT),
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Workspace: partial outputs [B*Hkv, S, M_PAD, BLOCK_D] fp32 and their log2-sum-exp [B*Hkv, S, M_PAD].
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        base = (pid_bh * NUM_SPLITS + pid_s) * M_PAD + rows
        tl.store(po_ptr + base[:, None] * BLOCK_D + dims[None, :], out)
        tl.store(plse_ptr + base, lse)


@triton.jit
def _kivi_merge_kernel(
    po_ptr, plse_ptr, o_ptr,
    sob, soh, sol, sod,
    Hkv, G, Lq, M, D, NUM_SPLITS, M_PAD,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # same 64-bit workspace offsets as _kivi_attn_kernel
    pid_m = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dims = tl.arange(0, BLOCK_D)
    # Pass 1: the largest split LSE per row. Pass 2: weights 2^(lse_s - max), normalised.
    mx = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for s in range(0, NUM_SPLITS):
        lse = tl.load(plse_ptr + (pid_bh * NUM_SPLITS + s) * M_PAD + rows)
        mx = tl.maximum(mx, lse)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        base = (pid_bh * NUM_SPLITS + s) * M_PAD + rows
        w = tl.exp2(tl.load(plse_ptr + base) - mx_safe)
        part = tl.load(po_ptr + base[:, None] * BLOCK_D + dims[None, :])
        acc += w[:, None] * part
        den += w
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    g = rows // Lq
    qi = rows % Lq
    hq = h * G + g
    tl.store(o_ptr + b * sob + hq[:, None] * soh + qi[:, None] * sol + dims[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (dims < D)[None, :])


def _attn_shape(q, k_tail, k_codes, v_codes, bits):
    B, Hq, Lq, D = q.shape
    Hkv = k_tail.shape[1]
    F = 32 // bits
    Tk = k_codes.shape[2] * F
    Tv = v_codes.shape[2]
    T = Tk + k_tail.shape[2]
    return B, Hq, Hkv, Lq, D, T, Tk, Tv


def _attn_key(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size, sm_scale,
              k_lr_u=None, k_lr_w=None, v_lr_u=None, v_lr_w=None):
    B, Hq, Hkv, Lq, D, T, Tk, Tv = _attn_shape(q, k_tail, k_codes, v_codes, bits)
    lr = 0 if k_lr_u is None and v_lr_u is None else (k_lr_u if k_lr_u is not None else v_lr_u).shape[-1]
    return (f"b{bits}-g{group_size}-D{D}-G{Hq // Hkv}-L{tuning.length_bucket(Lq)}-BH{tuning.length_bucket(B * Hkv)}"
            f"-N{tuning.length_bucket(T)}-r{tuning.length_bucket(lr) if lr else 0}")


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so the merge path is exercised


def _attn_default(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size,
                  sm_scale, k_lr_u=None, k_lr_w=None, v_lr_u=None, v_lr_w=None):
    """Heuristic: 64-token tiles; enough splits to give every SM about two programs, but each split at
    least 4 tiles long (judged on the length bucket, so the choice is stable within a bucket)."""
    B, Hq, Hkv, Lq, D, T, Tk, Tv = _attn_shape(q, k_tail, k_codes, v_codes, bits)
    block_n = 64
    m_blocks = triton.cdiv(max(1, (Hq // Hkv) * Lq), 64)
    want = triton.cdiv(2 * _num_sms(q.device), max(1, B * Hkv * m_blocks))
    most = max(1, tuning.length_bucket(T) // (4 * block_n))
    # fp32 inputs: 2 pipeline stages need more shared memory than an H100 block may have (227 KiB): for
    # sm_90 with Triton 3.9, 245 KiB at D = 128 and 487 KiB at D = 256 (OutOfResources at launch), against
    # 45 / 86 KiB with one stage. fp16/bf16 use 25-51 KiB with two.
    stages = 1 if q.dtype == torch.float32 else 2
    if D > 128 or q.dtype == torch.float32 or k_lr_u is not None or v_lr_u is not None:
        # D = 256 (fp16/bf16): 64-token tiles needed 186 KiB of shared memory (more than an A100 block may
        # have) and spilled on sm_90a; fp32 dots hold both operands in registers. Half-size tiles fit.
        # GEAR low rank (bf16, D = 128, rank 4): 64-token tiles spill 600 B per thread on sm_90a, 32-token
        # tiles 224 B at 2 programs per SM (8 warps: 120 B at 1 program per SM). Still not spill-free:
        # see KNOWN_SPILLS in autotune/static_check.py.
        block_n = 32
    return {"BLOCK_N": block_n, "NUM_SPLITS": max(1, min(want, most, 64)), "num_warps": 4, "num_stages": stages}


def _empty_lowrank(q):
    return q.new_zeros((1, 1, 1, 1))


def kivi_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size,
                   sm_scale, k_lr_u=None, k_lr_w=None, v_lr_u=None, v_lr_w=None, *, config=None):
    """Triton backend of ``kvkernels.kivi_attention`` (see the module docstring for the design)."""
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size, sm_scale,
            k_lr_u, k_lr_w, v_lr_u, v_lr_w)
    cfg = _config("kivi_attention", _attn_key, _attn_default, args, config)
    B, Hq, Hkv, Lq, D, T, Tk, Tv = _attn_shape(q, k_tail, k_codes, v_codes, bits)
    G = Hq // Hkv
    M = G * Lq
    F = 32 // bits
    out = _empty(q.shape, q.dtype, q.device)
    if out.numel() == 0:
        return out
    # The kernel reads scale and zero with one set of strides each side.
    if k_zero.stride() != k_scale.stride():
        k_scale, k_zero = k_scale.contiguous(), k_zero.contiguous()
    if v_zero.stride() != v_scale.stride():
        v_scale, v_zero = v_scale.contiguous(), v_zero.contiguous()

    # tl.dot needs K = BLOCK_N >= 16; two or more int32 words per key tile keeps every arange >= 2 long.
    block_n = max(int(cfg["BLOCK_N"]), 16, 2 * F)
    block_m = max(16, min(64, _next_pow2(M)))
    block_d = _next_pow2(D)
    m_blocks = triton.cdiv(M, block_m)
    splits = max(1, int(cfg["NUM_SPLITS"]))
    tokens_per_split = triton.cdiv(triton.cdiv(max(T, 1), splits), block_n) * block_n
    has_klr, has_vlr = k_lr_u is not None, v_lr_u is not None
    rank = (k_lr_u if has_klr else v_lr_u).shape[-1] if (has_klr or has_vlr) else 1
    block_r = max(16, _next_pow2(rank))
    ku, kw = (k_lr_u, k_lr_w) if has_klr else (_empty_lowrank(q), _empty_lowrank(q))
    vu, vw = (v_lr_u, v_lr_w) if has_vlr else (_empty_lowrank(q), _empty_lowrank(q))

    direct = splits == 1
    m_pad = m_blocks * block_m
    if direct:
        part_o = part_lse = out  # unused pointers
    else:
        part_o = _empty((B * Hkv, splits, m_pad, block_d), torch.float32, q.device)
        part_lse = _empty((B * Hkv, splits, m_pad), torch.float32, q.device)
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (B * Hkv, m_blocks, splits)
    _kivi_attn_kernel[grid](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, ku, kw, vu, vw,
        out, part_o, part_lse,
        *_strides(q), *_strides(k_codes), *_strides(k_scale), *_strides(v_codes), *_strides(v_scale),
        *_strides(k_tail), *_strides(v_tail), *_strides(ku), *_strides(kw), *_strides(vu), *_strides(vw),
        *_strides(out),
        Hkv, G, Lq, M, D, T, Tk, Tv, rank, float(sm_scale) * _LOG2E, tokens_per_split, splits, m_pad,
        BITS=bits, F=F, GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_R=block_r,
        HAS_KLR=has_klr, HAS_VLR=has_vlr, DIRECT=direct, DOT_PREC=dot_prec,
        # A config without num_stages gets the default's stage count (1 for fp32: see _attn_default).
        num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 1 if q.dtype == torch.float32 else 2),
    )
    if not direct:
        _kivi_merge_kernel[(B * Hkv, m_blocks)](
            part_o, part_lse, out, *_strides(out), Hkv, G, Lq, M, D, splits, m_pad,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Tuning contract (issue 6): candidate configs, shape-bucket key, documented default. The first entry of
# each space runs under the interpreter.

TUNABLE = {
    "kivi_quantize": {
        "space": [{"BLOCK_T": 16, "BLOCK_D": 64, "num_warps": 4}]
        + [{"BLOCK_T": bt, "BLOCK_D": bd, "num_warps": w}
           for bt in (8, 32) for bd in (32, 128) for w in (2, 4, 8)],
        "key": _quant_key,
        "default": _quant_default,
    },
    "kivi_dequantize": {
        "space": [{"BLOCK_T": 32, "BLOCK_D": 64, "num_warps": 4}]
        + [{"BLOCK_T": bt, "BLOCK_D": bd, "num_warps": w}
           for bt in (16, 64, 128) for bd in (32, 128) for w in (2, 4, 8)],
        "key": _dequant_key,
        "default": _dequant_default,
    },
    "kivi_attention": {
        "space": [{"BLOCK_N": 64, "NUM_SPLITS": 1, "num_warps": 4, "num_stages": 2}]
        + [{"BLOCK_N": bn, "NUM_SPLITS": s, "num_warps": w, "num_stages": st}
           for bn in (32, 64, 128) for s in (1, 2, 4, 8, 16, 32, 64) for w in (4, 8) for st in (2, 3)],
        "key": _attn_key,
        "default": _attn_default,
    },
}
