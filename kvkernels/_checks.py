"""Checking mode: every op validates on the host what its fast path has to trust.

The ops always check shapes, dtypes and devices (:mod:`kvkernels._validate`); those checks read no tensor
data. What they cannot check without a host sync, and so trust, is the *data*: that a segment lies inside
the pool, that segments do not overlap, that live lengths fit their capacity, that inputs hold no NaN or
inf where that would silently spoil a result. In checking mode each op also checks those, on the host,
before running, and raises ``ValueError`` naming the argument. It costs host syncs and extra passes over
the inputs: use it to debug and in tests, not in production or inside a CUDA-graph capture.

Turn it on for the whole process with ``KVKERNELS_CHECK=1`` in the environment (read once, when
kvkernels loads its ops: set it before importing kvkernels), or for a block with::

    with kvkernels.checking():          # kvkernels.checking(False) turns it off inside a block
        o = kvkernels.ragged_attention(q, k_pool, v_pool, seg_start, seg_len)

The switch is process-wide (not per thread). :data:`enabled` is the flag each op reads: one attribute
read per call when checking is off.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

from ._validate import fail

ENV_VAR = "KVKERNELS_CHECK"


def _env_flag(value: Optional[str]) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


enabled: bool = _env_flag(os.environ.get(ENV_VAR))


def checking_enabled() -> bool:
    """Whether the ops run their host-side data checks now."""
    return enabled


@contextlib.contextmanager
def checking(on: bool = True) -> Iterator[None]:
    """Run the ops inside the block with (``on=True``) or without the host-side data checks."""
    global enabled
    before, enabled = enabled, bool(on)
    try:
        yield
    finally:
        enabled = before


# ---------------------------------------------------------------------------------------------------
# Checks shared by several ops

def finite(op: str, name: str, t: Optional[torch.Tensor]) -> None:
    """``t`` holds no NaN and no +-inf (None is skipped)."""
    if t is None or t.numel() == 0 or not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        fail(op, f"{name} holds {int(bad.sum())} NaN/inf value(s), the first at index {where} "
                 f"(= {t[where].item()}); checking mode accepts finite values only")


def at_most(op: str, name: str, t: torch.Tensor, bound_name: str, bound: torch.Tensor) -> None:
    """``t <= bound`` elementwise (paired tables of one shape); the message names the first entry past it."""
    over = t > bound
    if bool(over.any()):
        where = tuple(int(i) for i in over.nonzero()[0])
        fail(op, f"{name}{list(where)} = {int(t[where])} > {bound_name}{list(where)} = {int(bound[where])}; "
                 f"accepted: 0 <= {name} <= {bound_name}")


def non_negative(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() and bool((t < 0).any()):
        where = tuple(int(i) for i in (t < 0).nonzero()[0])
        fail(op, f"{name}{list(where)} = {t[where].item()} is negative; accepted: >= 0")


def segments_inside(op: str, start: torch.Tensor, length: torch.Tensor, rows: int, start_name: str,
                    length_name: str) -> None:
    """0 <= start, 0 <= length, start + length <= rows for every segment."""
    non_negative(op, start_name, start)
    non_negative(op, length_name, length)
    end = start + length.to(start.dtype)
    past = end > rows
    if bool(past.any()):
        where = tuple(int(i) for i in past.nonzero()[0])
        fail(op, f"segment {list(where)} ends past the pool: {start_name} + {length_name} = "
                 f"{int(start[where])} + {int(length[where])} = {int(end[where])} > {rows} pool rows")


def segments_disjoint(op: str, start: torch.Tensor, length: torch.Tensor, start_name: str,
                      length_name: str) -> None:
    """No two non-empty segments [start, start + length) share a row."""
    shape = tuple(start.shape)
    start, length = start.reshape(-1), length.reshape(-1).to(start.dtype)
    index = (length > 0).nonzero().reshape(-1)
    if index.numel() < 2:
        return
    order = index[torch.argsort(start[index], stable=True)]
    s, e = start[order], start[order] + length[order]
    clash = e[:-1] > s[1:]
    if bool(clash.any()):
        i = int(clash.nonzero()[0])
        a, b = (_unravel(int(order[j]), shape) for j in (i, i + 1))
        fail(op, f"segments overlap: segment {a} covers rows [{int(s[i])}, {int(e[i])}) and segment {b} "
                 f"starts at row {int(s[i + 1])} ({start_name}, {length_name}); segments must be disjoint "
                 f"slices of the pool")


def _unravel(flat: int, shape: tuple) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return out[::-1]


# ---------------------------------------------------------------------------------------------------
# One function per op, with the op's arguments (called by the op when checking is on)

def kvzip_score(q, k, k_self, sink_len, chunk_start, chunk_end, row_lse=None) -> None:
    for name, t in (("q", q), ("k", k), ("k_self", k_self), ("row_lse", row_lse)):
        finite("kvzip_score", name, t)


def topk_mask(scores, k) -> None:
    # Nothing to check on the data: NaN ranks below -inf and +inf is allowed (protected tokens) by contract.
    return None


def compact_kv(keys, values, keep, num_kept, slack) -> None:
    for name, seq in (("keys", keys), ("values", values)):
        for i, t in enumerate(seq):
            finite("compact_kv", f"{name}[{i}]", t)


def ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new) -> None:
    op = "ragged_append"
    segments_inside(op, seg_start, seg_cap, k_pool.shape[0], "seg_start", "seg_cap")
    at_most(op, "seg_len", seg_len, "seg_cap", seg_cap)
    non_negative(op, "seg_len", seg_len)
    segments_disjoint(op, seg_start, seg_cap, "seg_start", "seg_cap")
    finite(op, "k_new", k_new)
    finite(op, "v_new", v_new)


def ragged_attention(q, k_pool, v_pool, seg_start, seg_len) -> None:
    op = "ragged_attention"
    segments_inside(op, seg_start, seg_len, k_pool.shape[0], "seg_start", "seg_len")
    segments_disjoint(op, seg_start, seg_len, "seg_start", "seg_len")
    finite(op, "q", q)
    rows = _live_rows(seg_start, seg_len)
    finite(op, "k_pool (live rows)", k_pool[rows])
    finite(op, "v_pool (live rows)", v_pool[rows])


def _live_rows(seg_start: torch.Tensor, seg_len: torch.Tensor) -> torch.Tensor:
    """Row indices of every segment's live rows (int64, concatenated)."""
    start, length = seg_start.reshape(-1), seg_len.reshape(-1).long()
    if length.numel() == 0 or int(length.sum()) == 0:
        return start.new_empty(0)
    first = torch.repeat_interleave(start, length)
    offsets = torch.arange(first.numel(), device=first.device) - torch.repeat_interleave(
        torch.cumsum(length, 0) - length, length)
    return first + offsets


def kivi_quantize(x, bits, group_size, axis) -> None:
    finite("kivi_quantize", "x", x)


def _kivi_groups(op: str, prefix: str, scale, zero) -> None:
    finite(op, f"{prefix}scale", scale)
    finite(op, f"{prefix}zero", zero)
    non_negative(op, f"{prefix}scale", scale)


def kivi_dequantize(codes, scale, zero, bits, group_size, axis) -> None:
    _kivi_groups("kivi_dequantize", "", scale, zero)


def kivi_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size,
                   k_lr_u=None, k_lr_w=None, v_lr_u=None, v_lr_w=None) -> None:
    op = "kivi_attention"
    finite(op, "q", q)
    _kivi_groups(op, "k_", k_scale, k_zero)
    _kivi_groups(op, "v_", v_scale, v_zero)
    for name, t in (("k_tail", k_tail), ("v_tail", v_tail), ("k_lowrank U", k_lr_u), ("k_lowrank W", k_lr_w),
                    ("v_lowrank U", v_lr_u), ("v_lowrank W", v_lr_w)):
        finite(op, name, t)


def lowrank_residual(err, rank, iters) -> None:
    finite("lowrank_residual", "err", err)


def _quant_segments(op: str, q_start, q_extent, extent_name: str, q_rows: int, seg_len, t_head, tail_rows: int,
                    q_len=None) -> None:
    """The quantized pool's tables: each segment's quantized rows inside the pool and disjoint, 0 <= q_len <=
    seg_len (the tail holds the rest), and the tail ring's head inside the tail."""
    segments_inside(op, q_start, q_extent, q_rows, "q_start", extent_name)
    segments_disjoint(op, q_start, q_extent, "q_start", extent_name)
    non_negative(op, "seg_len", seg_len)
    if q_len is not None:
        at_most(op, "q_len", q_len, "seg_len", seg_len)
    non_negative(op, "t_head", t_head)
    past = t_head >= max(tail_rows, 1)
    if bool(past.any()):
        where = tuple(int(i) for i in past.nonzero()[0])
        fail(op, f"t_head{list(where)} = {int(t_head[where])} is past the {tail_rows}-row tail; "
                 f"accepted: 0 <= t_head < {tail_rows}")


def quant_pool_build(k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack, q_rows) -> None:
    op = "quant_pool_build"
    segments_inside(op, seg_start, seg_len, k_pool.shape[0], "seg_start", "seg_len")
    segments_disjoint(op, seg_start, seg_len, "seg_start", "seg_len")
    rows = _live_rows(seg_start, seg_len)
    finite(op, "k_pool (live rows)", k_pool[rows])
    finite(op, "v_pool (live rows)", v_pool[rows])


def quant_pool_append(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap,
                      t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual) -> None:
    op = "quant_pool_append"
    _quant_segments(op, q_start, q_cap, "q_cap", v_codes.shape[0], seg_len, t_head, k_tail.shape[-2], q_len)
    at_most(op, "seg_len", seg_len, "seg_cap", seg_cap)
    finite(op, "k_new", k_new)
    finite(op, "v_new", v_new)


def quant_pool_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                         t_head, seg_len, bits, group_size) -> None:
    op = "quant_pool_attention"
    _quant_segments(op, q_start, q_len, "q_len", v_codes.shape[0], seg_len, t_head, k_tail.shape[-2], q_len)
    finite(op, "q", q)
    _kivi_groups(op, "k_", k_scale, k_zero)
    _kivi_groups(op, "v_", v_scale, v_zero)
