"""KVzip's reconstruction score of one chunk on CPU tensors (op ``kvzip_score``), blockwise over keys.

The G query heads of a KV head and their Lq rows are the R = G*Lq rows of one query "head", so every
product below serves a whole GQA group. Two passes, in fp32, never holding an [R x N] matrix:

1. The log-sum-exp of every query row over the keys it sees, from PyTorch's fused CPU flash-attention
   kernel (blockwise and multithreaded inside; it returns the LSE): once over [sink; chunk] (no mask),
   once over the self keys with its own top-left causal mask (row i sees self keys 0..i, as here, since
   the self block has exactly Lq keys), merged with logaddexp. (The kernel also computes an output,
   which is discarded: it is still cheaper than a separate matmul + logsumexp, which take 5 passes.)
2. For each block of chunk keys, ``exp(max over rows of (logit - lse))`` (exp is monotonic, so that is
   the max probability) as ONE matrix product: the rows are ``[q * scale, -lse]`` and the keys
   ``[k, 1]``, so the product is already ``logit - lse``; then one max over the rows.

No [R x N] matrix beyond one block of ``_BLOCK_ELEMENTS`` logits per (batch, KV head) is allocated.
"""

from __future__ import annotations

import torch

from .ragged_attention import causal_self_flash

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_BLOCK_ELEMENTS = 1 << 22  # logits per (batch, KV head) in one block of pass 2 (16 MiB of fp32)
_MIN_BLOCK = 64  # keys per block at least, however many query rows


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


def kvzip_score(
    q: torch.Tensor,
    k: torch.Tensor,
    k_self: torch.Tensor,
    sink_len: int,
    chunk_start: int,
    chunk_end: int,
    sm_scale: float,
) -> torch.Tensor:
    """fp32 [B, Hkv, m]: max over the G query heads and Lq rows of the probability each chunk key receives."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    S, G = B * Hkv, Hq // Hkv
    R = G * Lq
    q_rows = q.float().reshape(S, 1, R, D)  # rows (g, i): query head hk*G + g, row i
    if q_rows.stride(-1) != 1:
        q_rows = q_rows.contiguous()
    lse = _row_lse(q_rows, k, k_self, sink_len, chunk_start, chunk_end, G, sm_scale)
    # [q * scale, -lse] . [key, 1] = logit - lse, in one product.
    q_aug = torch.cat([q_rows.view(S, R, D) * sm_scale, -lse[..., None]], dim=-1)  # [S, R, D + 1]
    m = chunk_end - chunk_start
    out = torch.empty(S, m, dtype=torch.float32)
    block = max(_MIN_BLOCK, _BLOCK_ELEMENTS // max(R, 1))
    ones = q_aug.new_ones(S, min(block, m), 1)
    for j in range(0, m, block):
        n = min(block, m - j)
        keys = k[:, :, chunk_start + j:chunk_start + j + n].float().reshape(S, n, D)
        k_aug = torch.cat([keys, ones[:, :n]], dim=-1)  # [S, n, D + 1]
        torch.amax(torch.matmul(q_aug, k_aug.transpose(1, 2)), dim=1, out=out[:, j:j + n])
    return out.exp_().view(B, Hkv, m)
