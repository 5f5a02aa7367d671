"""KIVI asymmetric low-bit quantization and attention over the quantized cache (ops 6 and 7).

Layout (see the README's op table): F = 32 // bits codes per int32, least significant bits first.
axis="key": per-channel groups of ``group_size`` consecutive tokens, codes packed along tokens.
axis="value": per-token groups of ``group_size`` consecutive channels, codes packed along channels.
"""

from __future__ import annotations

import torch


def codes_per_word(bits: int) -> int:
    return 32 // bits


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same bit pattern (two's complement wrap)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes along ``dim`` (its size a multiple of F) into int32, LSB first."""
    F = codes_per_word(bits)
    c = codes.long().movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // F, F)
    shifts = bits * torch.arange(F, device=codes.device)
    words = (c << shifts).sum(dim=-1)
    return _to_int32_bits(words).movedim(-1, dim).contiguous()


def unpack_codes(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int64 codes, ``dim`` grown F-fold."""
    F = codes_per_word(bits)
    w = words.long().movedim(dim, -1) & 0xFFFFFFFF
    shifts = bits * torch.arange(F, device=words.device)
    c = (w[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*w.shape[:-1], w.shape[-1] * F).movedim(-1, dim)


def _grouped(x: torch.Tensor, group_size: int, axis: str) -> torch.Tensor:
    """View x [B,H,T,D] with the group as the last dim: key [B,H,T/G,D,G], value [B,H,T,D/G,G]."""
    B, H, T, D = x.shape
    if axis == "key":
        return x.reshape(B, H, T // group_size, group_size, D).transpose(-1, -2)
    return x.reshape(B, H, T, D // group_size, group_size)


def _ungrouped(xg: torch.Tensor, axis: str) -> torch.Tensor:
    if axis == "key":
        B, H, Tg, D, G = xg.shape
        return xg.transpose(-1, -2).reshape(B, H, Tg * G, D)
    B, H, T, Dg, G = xg.shape
    return xg.reshape(B, H, T, Dg * G)


def kivi_quantize(
    x: torch.Tensor, bits: int, group_size: int, axis: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int32, scale, zero): zero = group min, scale = (max - min) / (2^bits - 1), in x.dtype.

    Codes are computed in fp32 from the *stored* scale and zero (so dequantization is within half a
    stored scale): code = round_half_even((x - zero) / scale) clamped to [0, 2^bits - 1]; 0 when scale is 0.
    """
    levels = (1 << bits) - 1
    xg = _grouped(x, group_size, axis).float()
    lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)
    zero = lo.to(x.dtype)
    scale = ((hi - lo) / levels).to(x.dtype)
    s32 = scale.float()[..., None]
    ratio = (xg - zero.float()[..., None]) / torch.where(s32 > 0, s32, torch.ones_like(s32))
    codes = torch.where(s32 > 0, torch.round(ratio).clamp(0, levels), torch.zeros_like(ratio))
    pack_dim = 2 if axis == "key" else 3
    return pack_codes(_ungrouped(codes, axis), bits, pack_dim), scale.contiguous(), zero.contiguous()


def kivi_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, axis: str
) -> torch.Tensor:
    """x_hat = code * scale + zero, computed in fp32 and returned in scale.dtype."""
    c = unpack_codes(codes, bits, 2 if axis == "key" else 3).float()
    cg = _grouped(c, group_size, axis)
    xg = cg * scale.float()[..., None] + zero.float()[..., None]
    return _ungrouped(xg, axis).to(scale.dtype)


def kivi_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    bits: int,
    group_size: int,
    sm_scale: float,
    k_lr_u: torch.Tensor | None = None,
    k_lr_w: torch.Tensor | None = None,
    v_lr_u: torch.Tensor | None = None,
    v_lr_w: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bottom-right causal attention over [dequant(K); k_tail] and [dequant(V); v_tail], in fp32.

    With low-rank residuals the quantized keys are dequant + U·Wᵀ (and likewise for values).
    """
    B, Hq, Lq, D = q.shape
    Hkv = k_tail.shape[1]
    G = Hq // Hkv
    k_q = kivi_dequantize(k_codes, k_scale, k_zero, bits, group_size, "key").float()
    v_q = kivi_dequantize(v_codes, v_scale, v_zero, bits, group_size, "value").float()
    if k_lr_u is not None:
        k_q = k_q + k_lr_u.float() @ k_lr_w.float().transpose(-1, -2)
    if v_lr_u is not None:
        v_q = v_q + v_lr_u.float() @ v_lr_w.float().transpose(-1, -2)
    keys = torch.cat([k_q, k_tail.float()], dim=2)
    vals = torch.cat([v_q, v_tail.float()], dim=2)
    T = keys.shape[2]
    logits = torch.einsum("bhgld,bhsd->bhgls", q.float().reshape(B, Hkv, G, Lq, D), keys) * sm_scale
    pos = torch.arange(T, device=q.device)
    visible = pos[None, :] <= (T - Lq + torch.arange(Lq, device=q.device))[:, None]  # [Lq, T]
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - lse).nan_to_num(0.0)  # a row that sees nothing gives 0
    out = torch.einsum("bhgls,bhsd->bhgld", probs, vals)
    return out.reshape(B, Hq, Lq, D).to(q.dtype).contiguous()  # the ops' fake kernels promise contiguous
