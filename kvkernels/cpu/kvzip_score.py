"""KVzip's reconstruction score of one chunk on CPU tensors (op ``kvzip_score``), blockwise over keys.

Two passes over bounded key blocks, logits by batched matmul in fp32 (the G query heads of a KV head and
their Lq rows are the G*Lq rows of one matrix product; keys are read as views of ``k``, never copied):

1. the log-sum-exp of every query row over [sink; chunk; causal self keys], accumulated block by block;
2. for each block of chunk keys, ``exp(max over rows of (logit - lse))``: exp is monotonic, so that is
   the max probability without exponentiating the block.

No [Lq x N] matrix beyond one block of ``_BLOCK_ELEMENTS`` logits per (batch, KV head) is allocated.
"""

from __future__ import annotations

import torch

_BLOCK_ELEMENTS = 1 << 22  # logits per (batch, KV head) in one block (16 MiB of fp32)


def _block_len(rows: int) -> int:
    return max(64, _BLOCK_ELEMENTS // max(rows, 1))


def _logits(q_rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """fp32 [B, Hkv, R, n] = q_rows [B, Hkv, R, D] (already scaled) times keys [B, Hkv, n, D] transposed."""
    return torch.matmul(q_rows, keys.float().transpose(-1, -2))


def _self_logits(q_rows: torch.Tensor, k_self: torch.Tensor, j0: int, j1: int, Lq: int) -> torch.Tensor:
    """Logits over self keys j0 .. j1, -inf where key j is after query row i (causal inside the self block)."""
    logits = _logits(q_rows, k_self[:, :, j0:j1])
    rows = torch.arange(Lq).repeat(logits.shape[2] // Lq)  # row index i of each (g, i) row
    hidden = torch.arange(j0, j1)[None, :] > rows[:, None]
    return logits.masked_fill_(hidden, float("-inf"))


def _row_lse(q_rows, k, k_self, sink_len, chunk_start, chunk_end, Lq, block) -> torch.Tensor:
    """fp32 [B, Hkv, R, 1]: log-sum-exp of each query row over every key it sees."""
    parts = []
    for lo, hi in ((0, sink_len), (chunk_start, chunk_end)):
        for j in range(lo, hi, block):
            parts.append(torch.logsumexp(_logits(q_rows, k[:, :, j:min(j + block, hi)]), dim=-1, keepdim=True))
    for j in range(0, Lq, block):
        parts.append(torch.logsumexp(_self_logits(q_rows, k_self, j, min(j + block, Lq), Lq), dim=-1, keepdim=True))
    return torch.logsumexp(torch.cat(parts, dim=-1), dim=-1, keepdim=True)


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
    rows = Hq // Hkv * Lq
    q_rows = (q.float() * sm_scale).reshape(B, Hkv, rows, D)  # rows (g, i): head hk*G + g, row i
    block = _block_len(rows)
    lse = _row_lse(q_rows, k, k_self, sink_len, chunk_start, chunk_end, Lq, block)
    out = torch.empty(B, Hkv, chunk_end - chunk_start, dtype=torch.float32)
    for j in range(chunk_start, chunk_end, block):
        hi = min(j + block, chunk_end)
        logits = _logits(q_rows, k[:, :, j:hi]).sub_(lse)
        out[:, :, j - chunk_start:hi - chunk_start] = logits.amax(dim=2).exp_()
    return out
