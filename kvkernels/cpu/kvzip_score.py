"""KVzip's reconstruction score of one chunk on CPU tensors (op ``kvzip_score``), blockwise over keys.

The G query heads of a KV head and their Lq rows are the R = G*Lq rows of one query "head", so every
product below serves a whole GQA group. Two passes, in fp32, never holding an [R x N] matrix:

1. The log-sum-exp of every query row over the keys it sees, from PyTorch's fused CPU flash-attention
   kernel (blockwise and multithreaded inside; it returns the LSE): once over [sink; chunk] (no mask),
   once over the self keys with its own top-left causal mask (row i sees self keys 0..i, as here, since
   the self block has exactly Lq keys), merged with logaddexp. (The kernel also computes an output,
   which is discarded: it is still cheaper than a separate matmul + logsumexp, which take 5 passes.)
   Skipped when the caller passes ``row_lse``: the reconstruction forward's own attention computes it
   (:func:`kvkernels.cpu.ragged_attention.context_then_causal_self`), and this pass costs about as
   much as that attention.
2. Per chunk key, ``max over rows of (logit - lse)``, then ``exp`` once per key (exp is monotonic, so that
   is the max probability). The compiled kernel (``csrc/kvzip_score.cpp``, see :mod:`kvkernels.cpu.native`)
   keeps every logit in a register from its product to the max; without it, one matrix product per block
   of chunk keys and block of rows (keys by rows, so the max runs along contiguous memory), in blocks of
   ``_KEYS_PER_BLOCK x _ROWS_PER_BLOCK`` logits small enough to be reread from cache by the subtraction
   and the max.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import native
from .ragged_attention import causal_self_flash

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
# Pass 2's block: 256 keys x 2048 rows = 2 MiB of fp32 logits per (batch, KV head), small enough for the
# subtraction and the max to reread it from cache; the product's inner dimension is the head dim itself.
_KEYS_PER_BLOCK = 256
_ROWS_PER_BLOCK = 2048


def _context_keys(k: torch.Tensor, sink_len: int, chunk_start: int, chunk_end: int) -> torch.Tensor:
    """fp32 [B*Hkv, 1, sink + m, D] keys [sink; chunk]: a view when they are adjacent, else one copy."""
    B, Hkv, _, D = k.shape
    keys = k[:, :, :chunk_end] if sink_len == chunk_start else torch.cat(
        [k[:, :, :sink_len], k[:, :, chunk_start:chunk_end]], dim=2)
    keys = keys.float().reshape(B * Hkv, 1, -1, D)
    return keys if keys.stride(-1) == 1 else keys.contiguous()  # the fused kernel needs channel stride 1


def _row_lse(q_rows, k, k_self, sink_len, chunk_start, chunk_end, G, sm_scale) -> torch.Tensor:
    """fp32 [B*Hkv, R]: log-sum-exp of each (g, i) row over [sink; chunk] and self keys 0..i."""
    S, _, R, D = q_rows.shape
    Lq = R // G
    keys = _context_keys(k, sink_len, chunk_start, chunk_end)
    _, lse_context = _flash(q_rows, keys, keys, scale=sm_scale)
    self_keys = k_self.float().reshape(S, 1, Lq, D)
    self_keys = self_keys if self_keys.stride(-1) == 1 else self_keys.contiguous()
    _, lse_self = causal_self_flash(q_rows, self_keys, self_keys, G, sm_scale)
    return torch.logaddexp(lse_context.view(S, R), lse_self.reshape(S, R))


def _max_logit_minus_lse(q_rows, sm_scale: float, k, lse, chunk_start: int, chunk_end: int) -> torch.Tensor:
    """fp32 [S, m]: per chunk key, max over the R rows of (sm_scale * q_row . key - lse); q_rows fp32 [S, R, D]."""
    S, R, D = q_rows.shape
    m = chunk_end - chunk_start
    lib = native.library()
    if lib is not None:  # the compiled pass: no logit leaves a register
        best = native.score_max(lib, q_rows, sm_scale, lse, k[:, :, chunk_start:chunk_end].float().reshape(S, m, D))
        if best is not None:
            return best
    q_scaled = q_rows * sm_scale
    out = torch.full((S, m), float("-inf"))
    q_t = q_scaled.transpose(1, 2)  # [S, D, R]: the product comes out [keys, rows]
    for j in range(0, m, _KEYS_PER_BLOCK):
        n = min(_KEYS_PER_BLOCK, m - j)
        keys = k[:, :, chunk_start + j:chunk_start + j + n].float().reshape(S, n, D)
        best = out[:, j:j + n]
        for r in range(0, R, _ROWS_PER_BLOCK):
            logits = torch.matmul(keys, q_t[:, :, r:r + _ROWS_PER_BLOCK])  # [S, n, rows]
            logits.sub_(lse[:, None, r:r + _ROWS_PER_BLOCK])
            torch.maximum(best, logits.amax(dim=2), out=best)
    return out


def kvzip_score(
    q: torch.Tensor,
    k: torch.Tensor,
    k_self: torch.Tensor,
    sink_len: int,
    chunk_start: int,
    chunk_end: int,
    sm_scale: float,
    row_lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """fp32 [B, Hkv, m]: max over the G query heads and Lq rows of the probability each chunk key receives."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    S, G = B * Hkv, Hq // Hkv
    R = G * Lq
    q_rows = q.float().reshape(S, 1, R, D)  # rows (g, i): query head hk*G + g, row i
    if q_rows.stride(-1) != 1:
        q_rows = q_rows.contiguous()
    if row_lse is None:
        lse = _row_lse(q_rows, k, k_self, sink_len, chunk_start, chunk_end, G, sm_scale)
    else:
        lse = row_lse.reshape(S, R)  # [B, Hq, Lq] holds the rows of KV head hk at hk*G*Lq .. in order
    best = _max_logit_minus_lse(q_rows.view(S, R, D), sm_scale, k, lse, chunk_start, chunk_end)
    return best.exp_().reshape(B, Hkv, chunk_end - chunk_start)
