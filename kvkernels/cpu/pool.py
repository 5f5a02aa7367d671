"""The ragged KV pool on CPU tensors: in-place ``ragged_append`` in O(new rows).

``compact_kv`` has no cpu kernel: it falls through to the reference (one boolean gather per K and V,
already proportional to the rows it copies; see the README's backend table for its measured cost).

``ragged_append`` runs the compiled kernel of :mod:`kvkernels.cpu.native` when it is available (capacity
of every segment checked first, then one row copy per segment and K/V, ``seg_len += t``: no tensor ops,
no host reads in Python). Without it, it reads the layer's segment table on the host (free for CPU
tensors), checks capacity in Python, then writes the new rows with one copy per K and V: into a strided
view of the pool when the layer's segments are evenly spaced and equally long (how ``compact_kv`` lays
out an un-evicted cache or a per-head budget), else with one ``index_copy_`` over the destination rows. Overflow raises
``PoolOverflowError`` before anything is written, the same message as the reference; host syncs cost
nothing on CPU, so the cpu backend checks at once also inside ``deferred_overflow_checks`` (whose
deferral exists to keep CUDA graphs free of syncs).
"""

from __future__ import annotations

import torch

from kvkernels._validate import check_capacity
from kvkernels.cpu import native


def _layer_rows(table: torch.Tensor, layer: int) -> list[int]:
    """Layer ``layer`` of an [L, B, H] segment table as a flat Python list (one host read, no tensor ops)."""
    return [x for per_batch in table[layer].tolist() for x in per_batch]


def _destination_rows(starts: list[int], lens: list[int], t: int) -> torch.Tensor:
    """int64 pool rows that the t new rows of each segment go to, segments in flat (b, h) order."""
    return torch.tensor([s + n + i for s, n in zip(starts, lens) for i in range(t)], dtype=torch.int64)


def _even_step(starts: list[int], lens: list[int]) -> int | None:
    """The row step between consecutive segments if they are evenly spaced and equally long, else None."""
    if len(starts) == 1:
        return 0
    step = starts[1] - starts[0]
    if step <= 0 or any(n != lens[0] for n in lens):  # step 0 would be overlapping segments
        return None
    if any(b - a != step for a, b in zip(starts, starts[1:])):
        return None
    return step


def _write(pool: torch.Tensor, new: torch.Tensor, starts, lens, step, rows) -> None:
    S, t, D = len(starts), new.shape[2], new.shape[3]
    src = new.reshape(S, t, D)
    if rows is None:
        row, col = pool.stride()
        first = starts[0] + lens[0]
        pool.as_strided((S, t, D), (step * row, row, col), pool.storage_offset() + first * row).copy_(src)
    else:
        pool.index_copy_(0, rows, src.reshape(S * t, D))


def ragged_append(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    seg_cap: torch.Tensor,
    layer: int,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
) -> None:
    """Write k_new/v_new [B, Hkv, t, D] after the live rows of each segment of ``layer``; grow seg_len."""
    lib = native.library()
    code = -1 if lib is None else native.ragged_append(lib, k_pool, v_pool, seg_start, seg_len, seg_cap, layer,
                                                       k_new, v_new)
    if code == 0:
        return
    if code > 0:
        check_capacity(seg_len, seg_cap, layer, k_new.shape[2])  # raises with the reference's message
        raise native.SegmentTableError(
            f"kvkernels.ragged_append: a segment of layer {layer} lies outside the pool's {k_pool.shape[0]} rows")
    t = k_new.shape[2]
    lens, caps = _layer_rows(seg_len, layer), _layer_rows(seg_cap, layer)
    if any(n + t > c for n, c in zip(lens, caps)):
        check_capacity(seg_len, seg_cap, layer, t)  # raises with the reference's message
    if t == 0:
        return
    starts = _layer_rows(seg_start, layer)
    step = _even_step(starts, lens)
    rows = None if step is not None else _destination_rows(starts, lens, t)
    _write(k_pool, k_new, starts, lens, step, rows)
    _write(v_pool, v_new, starts, lens, step, rows)
    seg_len[layer].add_(t)  # in place on the row view (``+=`` would also write the row back)
