"""KIVI attention on CPU tensors (op ``kivi_attention``), blockwise over tokens.

The cache is [dequant(K codes) (+ U·Wᵀ); k_tail] and likewise for values. Tokens are visited in blocks of
``_BLOCK_TOKENS`` (whole key groups): each block is dequantized from its slice of the
codes (the whole fp cache is never materialised), attended with PyTorch's fused CPU flash kernel in fp32
(which returns the block's log-sum-exp), and merged into the running output by log-sum-exp weights.
Bottom-right causality only touches the last Lq tokens, so only a block that holds some of them gets a mask.

``kivi_quantize`` / ``kivi_dequantize`` have no cpu kernel: they fall through to the (vectorised)
references; see the README's backend table for their measured cost.
"""

from __future__ import annotations

import math

import torch

from kvkernels.reference.kivi import kivi_dequantize

from .ragged_attention import causal_flash

_BLOCK_TOKENS = 4096  # tokens per block, rounded down to whole key groups (at least one)


def _key_rows(j0, j1, k_codes, k_scale, k_zero, k_tail, bits, group_size, Tk, U, W) -> torch.Tensor:
    """fp32 keys of tokens j0 .. j1: dequantized codes (j0 and min(j1, Tk) are group boundaries), then tail."""
    parts = []
    if j0 < Tk:
        hi = min(j1, Tk)
        F = 32 // bits
        part = kivi_dequantize(k_codes[:, :, j0 // F:hi // F], k_scale[:, :, j0 // group_size:hi // group_size],
                               k_zero[:, :, j0 // group_size:hi // group_size], bits, group_size, "key").float()
        if U is not None:
            part = part + U[:, :, j0:hi].float() @ W.float().transpose(-1, -2)
        parts.append(part)
    if j1 > Tk:
        parts.append(k_tail[:, :, max(j0 - Tk, 0):j1 - Tk].float())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _value_rows(j0, j1, v_codes, v_scale, v_zero, v_tail, bits, group_size, Tv, U, W) -> torch.Tensor:
    """fp32 values of tokens j0 .. j1 (quantized per token, so any token range slices the codes)."""
    parts = []
    if j0 < Tv:
        hi = min(j1, Tv)
        part = kivi_dequantize(v_codes[:, :, j0:hi], v_scale[:, :, j0:hi], v_zero[:, :, j0:hi], bits, group_size,
                               "value").float()
        if U is not None:
            part = part + U[:, :, j0:hi].float() @ W.float().transpose(-1, -2)
        parts.append(part)
    if j1 > Tv:
        parts.append(v_tail[:, :, max(j0 - Tv, 0):j1 - Tv].float())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _block_attention(q_rows, keys, values, j0: int, T: int, Lq: int, G: int, sm_scale: float):
    """(o, lse) [S, 1, R, *] of q_rows over one block of tokens j0 .. j0 + n, bottom-right causal over T."""
    S, n, D = q_rows.shape[0], keys.shape[2], keys.shape[3]
    # Row-major blocks: dequantized keys come out channel-major, and the fused kernel assumes a channel
    # stride of 1 (measured: any other stride gives wrong output, not an error).
    keys, values = keys.reshape(S, 1, n, D).contiguous(), values.reshape(S, 1, n, D).contiguous()
    return causal_flash(q_rows, keys, values, j0, T, Lq, G, sm_scale)


def _merge(o, lse, o_b, lse_b):
    """Combine two partial softmax results by their log-sum-exps (rows with -inf on both stay 0 / -inf)."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isneginf(new), 0.0, new)
    return o * torch.exp(lse - safe)[..., None] + o_b * torch.exp(lse_b - safe)[..., None], new


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
    """Bottom-right causal attention over [dequant(K); k_tail] and [dequant(V); v_tail], fp32 inside."""
    B, Hq, Lq, D = q.shape
    Hkv = k_tail.shape[1]
    S, G = B * Hkv, Hq // Hkv
    Tk, Tv = k_codes.shape[2] * (32 // bits), v_codes.shape[2]
    T = Tk + k_tail.shape[2]
    q_rows = q.float().reshape(S, 1, G * Lq, D)
    o = torch.zeros(S, 1, G * Lq, D)
    lse = torch.full((S, 1, G * Lq), -math.inf)
    block = max(_BLOCK_TOKENS // group_size, 1) * group_size  # blocks start on key-group boundaries
    for j0 in range(0, T, block):
        j1 = min(j0 + block, T)
        keys = _key_rows(j0, j1, k_codes, k_scale, k_zero, k_tail, bits, group_size, Tk, k_lr_u, k_lr_w)
        values = _value_rows(j0, j1, v_codes, v_scale, v_zero, v_tail, bits, group_size, Tv, v_lr_u, v_lr_w)
        o_b, lse_b = _block_attention(q_rows, keys, values, j0, T, Lq, G, sm_scale)
        o, lse = (o_b, lse_b) if j0 == 0 else _merge(o, lse, o_b, lse_b)
    return o.reshape(B, Hq, Lq, D).to(q.dtype).contiguous()
