"""Attention over the ragged per-head pool on CPU tensors (op ``ragged_attention``).

Decode in fp32 (Lq = 1, the hot path) runs the compiled kernel of :mod:`kvkernels.cpu.native` (one call per
layer) when it is available; everything below is the PyTorch path, which serves every other case and
fp32 decode without a C++ compiler.

Each segment is attended in place: its keys and values are a view of the pool (rows ``start ..
start + len``), never gathered or padded to the longest segment, so the work is proportional to the
live rows. The attention itself is PyTorch's fused CPU flash kernel (fp32 accumulation for fp16/bf16,
and it returns the log-sum-exp). Segments that share a length and sit at evenly spaced starts (every
segment of a per-head or per-layer budget, or an un-evicted cache, as ``compact_kv`` lays them out)
are batched into one call over a strided view of the pool; the others get one call each.

Decode in fp32 (Lq = 1) without the compiled kernel skips the fused kernel: per segment, one matmul of the
group's G query rows with the segment's keys, a softmax over its n rows and one matmul with its values
(PyTorch's flash kernel is built for blocks of query rows; with G = 3 rows its per-call and per-block
setup costs several times the arithmetic). fp16/bf16 keep the fused kernel, which accumulates in fp32.

The G query heads of a KV head and their Lq rows are the G*Lq rows of one query "head", so one call
serves the whole GQA group. Lq > 1 (question prefill) is bottom-right causal per segment through an
additive mask. Reading ``seg_len`` and ``seg_start`` on the host costs nothing here (CPU tensors);
the op stays opaque to torch.compile behind its custom-op registration.
"""

from __future__ import annotations

from typing import Optional

import torch

from kvkernels.cpu import native

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _segment_views(pool: torch.Tensor, start: int, step: int, count: int, n: int) -> torch.Tensor:
    """[count, 1, n, D] view of ``count`` segments of ``n`` rows starting at ``start``, ``step`` rows apart."""
    row, col = pool.stride()
    view = pool.as_strided((count, 1, n, pool.shape[1]), (step * row, 0, row, col), pool.storage_offset() + start * row)
    # The fused kernel assumes a channel stride of 1 (any other gives wrong output, not an error).
    return view if col == 1 else view.contiguous()


def causal_flash(q_rows, keys, values, first: int, total: int, Lq: int, G: int, sm_scale: float):
    """(o, lse) of q_rows [m, 1, G*Lq, D] over keys/values [m, 1, n, D] (n >= 1, channel stride 1): the rows
    ``first .. first + n`` of a sequence of ``total`` rows, bottom-right causal (query row i sees rows
    0 .. total - Lq + i). A query row that sees none of these rows gets o = 0 and lse = -inf.

    Shared by the cpu kernels that attend in blocks or segments (``ragged_attention``, ``kivi_attention``).
    """
    n = keys.shape[2]
    if first + n <= total - Lq + 1:  # every query row sees every row (always so for decode, Lq = 1)
        return _flash(q_rows, keys, values, scale=sm_scale)
    last = total - Lq + torch.arange(Lq)  # the last row query row i sees
    hidden = (torch.arange(first, first + n)[None, :] > last[:, None]).repeat(G, 1)  # [G*Lq, n]
    mask = torch.zeros(hidden.shape, dtype=q_rows.dtype).masked_fill_(hidden, float("-inf"))
    o, lse = _flash(q_rows, keys, values, attn_mask=mask, scale=sm_scale)
    # The fused kernel gives a row that sees nothing o = 0 but lse = 0: make it -inf.
    return o, lse.masked_fill(hidden.all(dim=1), float("-inf"))


def causal_self_flash(q_rows: torch.Tensor, k_self: torch.Tensor, v_self: torch.Tensor, G: int, sm_scale: float):
    """(o [S, G, Lq, D], lse [S, G, Lq]) of q_rows [S, 1, G*Lq, D] over a block's own Lq rows k_self/v_self
    [S, 1, Lq, D] (channel stride 1): query row i sees self rows 0 .. i (one causal fused call; the G heads
    share the rows through a stride-0 expand, not a copy)."""
    S, _, Lq, D = k_self.shape
    return _flash(q_rows.view(S, G, Lq, D), k_self.expand(S, G, Lq, D), v_self.expand(S, G, Lq, D), is_causal=True,
                  scale=sm_scale)


def context_then_causal_self(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_context: int, sm_scale: float,
                             scored: Optional[tuple[int, int, int]] = None):
    """o [B, Hq, Lq, D] of q over k/v [B, Hkv, n_context + Lq, D]: every query row sees all context rows,
    and self row j <= i (bottom-right causal over the whole key sequence).

    This is the shape of KVzip's reconstruction forward (``kvkernels.hf.attention``). fp32 runs the compiled
    kernel (``csrc/attention.cpp``: context and self keys in one online softmax) when it is built; otherwise
    fused PyTorch calls over pieces of the keys (the context unmasked, the self rows causally) merged by
    their log-sum-exps, instead of one call with a dense [Lq, n_context + Lq] mask, which the fused CPU
    kernel runs more slowly (its effect on compression time is in the README's CPU performance table).

    ``scored = (sink_len, chunk_start, chunk_end)``: also return fp32 [B, Hq, Lq], each row's log-sum-exp
    over [sink; chunk; self 0..i], the normaliser of ``kvzip_score`` for that chunk (its ``row_lse``).
    The compiled kernel keeps that sum beside the whole row's; the PyTorch path attends the context in
    pieces split at those bounds. Either way that LSE costs no extra pass.
    """
    if q.dtype == k.dtype == v.dtype == torch.float32 and (lib := native.library()) is not None:
        compiled = native.reconstruction_attention(lib, q, k, v, n_context, sm_scale, scored)
        if compiled is not None:  # None: no kernel for this head dim
            o, row_lse = compiled
            return o if scored is None else (o, row_lse)
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    S, G = B * Hkv, Hq // Hkv
    q_rows = q.reshape(S, 1, G * Lq, D)
    if q_rows.stride(-1) != 1:
        q_rows = q_rows.contiguous()

    def rows(x, lo, hi):  # [S, 1, hi - lo, D] with channel stride 1, a view when possible
        out = x[:, :, lo:hi].reshape(S, 1, hi - lo, D)
        return out if out.stride(-1) == 1 else out.contiguous()

    def attend(lo, hi):  # (o [S, G, Lq, D], lse [S, G, Lq]) over context rows lo .. hi - 1
        o, lse = _flash(q_rows, rows(k, lo, hi), rows(v, lo, hi), scale=sm_scale)
        return o.view(S, G, Lq, D), lse.view(S, G, Lq)

    own = causal_self_flash(q_rows, rows(k, n_context, n_context + Lq), rows(v, n_context, n_context + Lq),
                            G, sm_scale)
    if scored is None:
        o, _ = _merge([attend(0, n_context), own])
        return o.view(B, Hq, Lq, D).to(q.dtype)
    sink_len, chunk_start, chunk_end = scored
    scored_ranges = [(0, chunk_end)] if sink_len == chunk_start else [(0, sink_len), (chunk_start, chunk_end)]
    other_ranges = [(sink_len, chunk_start), (chunk_end, n_context)]
    scored_parts = [attend(lo, hi) for lo, hi in scored_ranges if hi > lo] + [own]
    other_parts = [attend(lo, hi) for lo, hi in other_ranges if hi > lo]
    o, _ = _merge(scored_parts + other_parts)
    row_lse = torch.logsumexp(torch.stack([lse for _, lse in scored_parts]), dim=0)
    return o.view(B, Hq, Lq, D).to(q.dtype), row_lse.view(B, Hq, Lq)


def _merge(parts):
    """(o fp32, lse) of one softmax over the union of key sets, from each set's (o, lse) (no set empty)."""
    lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), dim=0)
    (first_o, first_lse), rest = parts[0], parts[1:]
    o = first_o * torch.exp(first_lse - lse)[..., None]
    for part_o, part_lse in rest:
        o.addcmul_(part_o, torch.exp(part_lse - lse)[..., None])
    return o, lse


def _equal_length_runs(starts: list[int], lens: list[int]):
    """Yield (first segment, count, step) runs of consecutive segments with one length and even spacing."""
    S, s = len(starts), 0
    while s < S:
        count, step = 1, 0
        if s + 1 < S and lens[s + 1] == lens[s] and starts[s + 1] >= starts[s]:
            step = starts[s + 1] - starts[s]
            while s + count < S and lens[s + count] == lens[s] and starts[s + count] - starts[s + count - 1] == step:
                count += 1
        yield s, count, step
        s += count


def _flat_list(table: torch.Tensor) -> list[int]:
    """A [B, Hkv] segment table as a flat Python list in (b, h) order (one host read)."""
    return [x for per_batch in table.tolist() for x in per_batch]


def _decode_fp32(q_rows, k_pool, v_pool, starts, lens, sm_scale: float, return_lse: bool):
    """(o [S, G, D], lse [S, G] or None) of fp32 q_rows [S, G, D] (one query row per head) over each segment."""
    S, G, D = q_rows.shape
    q_scaled = q_rows * sm_scale
    outs, lses = [], []
    for s in range(S):
        start, n = starts[s], lens[s]
        if n == 0:
            outs.append(q_rows.new_zeros(G, D))
            lses.append(q_rows.new_full((G,), float("-inf")))
            continue
        logits = torch.mm(q_scaled[s], k_pool[start:start + n].t())  # [G, n]
        if return_lse:
            row_lse = torch.logsumexp(logits, 1)
            lses.append(row_lse)
            probs = logits.sub_(row_lse[:, None]).exp_()
        else:
            probs = torch.softmax(logits, 1)
        outs.append(torch.mm(probs, v_pool[start:start + n]))
    if S == 1:
        return outs[0][None], (lses[0][None] if return_lse else None)
    return torch.stack(outs), (torch.stack(lses) if return_lse else None)


def ragged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    sm_scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bottom-right causal attention of q [B, Hq, Lq, D] over each KV head's segment of the pool."""
    B, Hq, Lq, D = q.shape
    if Lq == 1 and q.dtype == torch.float32 and k_pool.stride(1) == 1 and v_pool.stride(1) == 1:
        lib = native.library()
        if lib is not None:  # the compiled decode kernel: one call for the whole layer
            o, lse = native.ragged_decode(lib, q, k_pool, v_pool, seg_start, seg_len, sm_scale, return_lse)
            return o, (lse if return_lse else o.new_empty(0))
    Hkv = seg_start.shape[1]
    S, G = B * Hkv, Hq // Hkv
    rows = G * Lq
    # Segment s = (b, h) owns query heads h*G .. h*G + G - 1: in a contiguous q these are G*Lq rows.
    q_rows = q.reshape(S, 1, rows, D)
    if q_rows.stride(-1) != 1:
        q_rows = q_rows.contiguous()
    if Lq == 1 and q.dtype == torch.float32:
        starts, lens = _flat_list(seg_start), _flat_list(seg_len)
        o, lse = _decode_fp32(q_rows.view(S, G, D), k_pool, v_pool, starts, lens, sm_scale, return_lse)
        return o.view(B, Hq, 1, D), (lse.view(B, Hq, 1) if return_lse else o.new_empty(0))
    starts, lens = _flat_list(seg_start), _flat_list(seg_len)
    o = lse = None  # allocated only when the segments need more than one call
    for s, count, step in _equal_length_runs(starts, lens):
        n = lens[s]
        if n == 0:
            o_run = q_rows.new_zeros(count, 1, rows, D)
            lse_run = torch.full((count, 1, rows), float("-inf"))
        else:
            keys = _segment_views(k_pool, starts[s], step, count, n)
            values = _segment_views(v_pool, starts[s], step, count, n)
            o_run, lse_run = causal_flash(q_rows[s:s + count], keys, values, 0, n, Lq, G, sm_scale)
        if count == S:  # one run covers the whole call: its outputs are the op's outputs
            o, lse = o_run, lse_run
            break
        if o is None:
            o = torch.empty(S, 1, rows, D, dtype=q.dtype)
            lse = torch.empty(S, 1, rows, dtype=torch.float32)
        o[s:s + count] = o_run
        lse[s:s + count] = lse_run
    o = o.view(B, Hq, Lq, D)
    return o, (lse.view(B, Hq, Lq) if return_lse else lse.new_empty(0))
