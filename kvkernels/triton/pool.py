"""The ragged KV pool in Triton: physical eviction (``compact_kv``) and in-place append (``ragged_append``).

Pool layout (same as the reference): segment s = (l, b, h) in flat (l, b, h) order owns rows
``seg_start[s] .. seg_start[s] + seg_cap[s]`` of ``k_pool``/``v_pool`` [P, D]; its first ``seg_len[s]``
rows are live, the rest is slack for appends. The contract leaves slack contents unspecified, but,
like the reference, these kernels zero them (one small extra launch writing L*B*H*slack rows): the op
then has deterministic outputs, which torch.compile's AOT checks (``torch.library.opcheck``) compare.

compact_kv - three steps, the keep mask tiled in BLOCK_N tokens:
    1. ``_count_tiles_kernel``, 1-D grid over (L*B*H segments) x (T = cdiv(N, BLOCK_N) tiles): kept
       tokens per tile.
    2. torch on the device: ``cumsum`` over the tiles of each segment gives seg_len and each tile's
       offset inside its segment; an exclusive ``cumsum`` of ``seg_cap = seg_len + slack`` gives the
       int64 seg_start. (Tiny tensors: L*B*H*T entries.)
    3. ``_gather_kernel``, one launch per layer, 1-D grid over (B*H) x T: reload the tile's keep bits, an
       in-tile exclusive ``tl.cumsum`` ranks the kept tokens, and each kept row of K and V is copied to
       ``tile base + rank``. Rows of evicted tokens are masked out of the loads, so the kept rows are
       read once and written once. The keep mask (1 byte per token against >= 256 bytes of K+V rows)
       is read twice, by steps 1 and 3 - a single-pass look-back scan was not worth its complexity.
       ``_zero_slack_kernel``, one launch for all layers, 1-D grid over (L*B*H) x cdiv(slack, BLOCK_N),
       zeroes the slack rows.
    Layers arrive as a Python list of separate tensors; launching per layer reads them in place with
    their own strides (no ``torch.stack`` copy of the whole cache, non-contiguous views are fine).
    Each program owns a disjoint set of destination rows, so no atomics.

ragged_append - two launches, no host sync in the normal path:
    1. ``_overflow_kernel``, one program: loops over the layer's B*H segments and sets
       ``status[0] = any(seg_cap - seg_len < t)`` (a device int32 flag).
    2. ``_append_kernel``, grid ``(B*H,)``: one program per segment reads the flag and, unless it is
       set, copies the t new rows after the live rows and then bumps its own seg_len. The program that
       writes a segment is the only one that reads or writes its seg_len, so again no atomics, and
       an overflow in any segment means no program writes anything.
    Grids depend only on shapes (B, H) and t, never on live lengths, so the deferred mode below can be
    captured in a CUDA graph.

Overflow checking and host syncs:
    * Default mode: after the two launches the host reads the flag once (``.item()``: one sync per
      call). If set, it raises :class:`kvkernels.PoolOverflowError` with the same message as the
      reference (which checks on the host before writing); the pool and seg_len are untouched.
    * Deferred (graph-safe) mode, inside ``with deferred_overflow_checks():``: no sync at all; an
      overflowing call writes nothing and is recorded in a per-device status buffer (how many calls
      overflowed, layer and t of the first). :func:`check_overflow` (one sync) raises for them and
      clears the record; leaving the ``with`` block calls it too (unless ``check_on_exit=False``).
      The status buffer is allocated on the first call per device: do one warm-up call (or
      ``check_overflow(device)``) before CUDA-graph capture, as usual for graph capture.
      The status buffer is shared by every stream of its device: issue appends from one stream at a
      time (appends on two concurrent streams would race on the flag).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from kvkernels import tuning
from kvkernels._validate import PoolOverflowError, check_capacity


# ---------------------------------------------------------------------------------------------------
# Launch configuration (tuning contract of kvkernels.tuning / issue 6)
def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _compact_key(keys, values, keep, num_kept, slack) -> str:
    L, B, H, N = keep.shape
    return f"D{keys[0].shape[-1]}-N{tuning.length_bucket(N)}-{_dtype_name(keys[0])}"


def _compact_default(keys, values, keep, num_kept, slack) -> dict:
    """64-token tiles: 64 x D rows per tensor per program, enough bytes in flight per program."""
    return {"BLOCK_N": 64, "num_warps": 4}


def _append_key(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new) -> str:
    return f"D{k_pool.shape[1]}-T{tuning.length_bucket(k_new.shape[2])}-{_dtype_name(k_pool)}"


def _append_default(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new) -> dict:
    """Rows per step: as many as appended, at least 2 (decode appends 1), at most 32; 256 segments per flag step."""
    t = k_new.shape[2]
    return {"BLOCK_T": min(32, max(2, triton.next_power_of_2(max(t, 1)))), "BLOCK_S": 256, "num_warps": 4}


TUNABLE = {
    "compact_kv": {
        "space": [
            {"BLOCK_N": 16, "num_warps": 4},
            {"BLOCK_N": 32, "num_warps": 4},
            {"BLOCK_N": 64, "num_warps": 4},
            {"BLOCK_N": 64, "num_warps": 8},
            {"BLOCK_N": 128, "num_warps": 8},
        ],
        "key": _compact_key,
        "default": _compact_default,
    },
    "ragged_append": {
        "space": [
            {"BLOCK_T": 16, "BLOCK_S": 128, "num_warps": 4},
            {"BLOCK_T": 2, "BLOCK_S": 256, "num_warps": 1},
            {"BLOCK_T": 2, "BLOCK_S": 256, "num_warps": 4},
            {"BLOCK_T": 8, "BLOCK_S": 256, "num_warps": 4},
            {"BLOCK_T": 32, "BLOCK_S": 256, "num_warps": 4},
            {"BLOCK_T": 64, "BLOCK_S": 256, "num_warps": 8},
        ],
        "key": _append_key,
        "default": _append_default,
    },
}


def _config(op: str, args: tuple, device: torch.device, config: Optional[dict]) -> dict:
    if config is not None:
        return config
    entry = TUNABLE[op]
    return tuning.lookup(__name__, op, entry["key"](*args), device) or entry["default"](*args)


# ---------------------------------------------------------------------------------------------------
# compact_kv kernels
@triton.jit
def _load_keep_tile(keep_ptr, s, t, N, stride_ks, stride_kn, BLOCK_N: tl.constexpr):
    """(token indices, keep as int32 0/1) of tile t of segment s."""
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    bits = tl.load(keep_ptr + s.to(tl.int64) * stride_ks + offs_n * stride_kn, mask=offs_n < N, other=0)
    return offs_n, (bits != 0).to(tl.int32)


@triton.jit
def _count_tiles_kernel(keep_ptr, counts_ptr, N, T, stride_ks, stride_kn, BLOCK_N: tl.constexpr):
    # A 1-D grid over (segment, tile): CUDA limits grid axes 1 and 2 to 65535 programs, which the
    # L*B*H segments (e.g. 36 layers x batch 256 x 8 KV heads) or the tiles of a long row can pass.
    pid = tl.program_id(0)
    s = pid // T
    t = pid % T
    _, kept = _load_keep_tile(keep_ptr, s, t, N, stride_ks, stride_kn, BLOCK_N)
    tl.store(counts_ptr + s.to(tl.int64) * T + t, tl.sum(kept, 0))


@triton.jit
def _copy_rows(src_base, stride_sn, stride_sd, dst_ptr, stride_dp, offs_n, dest, kept, D,
               BLOCK_D: tl.constexpr):
    """Copy rows offs_n of one [N, D] head (where kept) to pool rows dest."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = (kept[:, None] != 0) & (offs_d[None, :] < D)
    rows = tl.load(src_base + offs_n[:, None].to(tl.int64) * stride_sn + offs_d[None, :] * stride_sd,
                   mask=mask, other=0.0)
    tl.store(dst_ptr + dest[:, None] * stride_dp + offs_d[None, :], rows, mask=mask)


@triton.jit
def _gather_kernel(
    k_ptr, v_ptr, keep_ptr, tile_base_ptr, k_pool_ptr, v_pool_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ks, stride_kpn, stride_kp, stride_vp,
    seg0, H, N, T, D, DV,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)  # 1-D grid over (head, tile): see _count_tiles_kernel
    bh = pid // T
    t = pid % T
    s = seg0 + bh  # flat segment index (l, b, h) of this layer's head
    offs_n, kept = _load_keep_tile(keep_ptr, s, t, N, stride_ks, stride_kpn, BLOCK_N)
    # Destination = first free row for this tile (from the host-side scans) + rank among kept in tile.
    rank = tl.cumsum(kept, 0) - kept
    dest = tl.load(tile_base_ptr + s.to(tl.int64) * T + t) + rank.to(tl.int64)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    _copy_rows(k_ptr + b * stride_kb + h * stride_kh, stride_kn, stride_kd, k_pool_ptr, stride_kp,
               offs_n, dest, kept, D, BLOCK_D)
    _copy_rows(v_ptr + b * stride_vb + h * stride_vh, stride_vn, stride_vd, v_pool_ptr, stride_vp,
               offs_n, dest, kept, DV, BLOCK_DV)


@triton.jit
def _zero_slack_kernel(k_pool_ptr, v_pool_ptr, seg_start_ptr, seg_len_ptr, slack, n_blocks, stride_kp, stride_vp,
                       D, DV, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Zero rows seg_len .. seg_len + slack - 1 of segment s (deterministic pools, like the reference)."""
    pid = tl.program_id(0)  # 1-D grid over (segment, block of slack rows): see _count_tiles_kernel
    s = pid // n_blocks
    j = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    dest = tl.load(seg_start_ptr + s) + tl.load(seg_len_ptr + s).to(tl.int64) + j.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(k_pool_ptr + dest[:, None] * stride_kp + offs_d[None, :], tl.zeros([BLOCK_N, BLOCK_D], tl.float32),
             mask=(j[:, None] < slack) & (offs_d[None, :] < D))
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(v_pool_ptr + dest[:, None] * stride_vp + offs_dv[None, :], tl.zeros([BLOCK_N, BLOCK_DV], tl.float32),
             mask=(j[:, None] < slack) & (offs_dv[None, :] < DV))


# ---------------------------------------------------------------------------------------------------
# ragged_append kernels
@triton.jit
def _overflow_kernel(seg_len_ptr, seg_cap_ptr, status_ptr, S, H, stride_lb, stride_lh, stride_cb, stride_ch,
                     t, layer, ACCUMULATE: tl.constexpr, BLOCK_S: tl.constexpr):
    """status[0] = 1 if some segment of the layer lacks room for t rows; deferred mode also records it."""
    over = tl.zeros([BLOCK_S], tl.int32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        live = s < S
        b = s // H
        h = s % H
        ln = tl.load(seg_len_ptr + b * stride_lb + h * stride_lh, mask=live, other=0)
        cap = tl.load(seg_cap_ptr + b * stride_cb + h * stride_ch, mask=live, other=0)
        over = tl.maximum(over, (live & (cap - ln < t)).to(tl.int32))
    flag = tl.max(over, 0)
    tl.store(status_ptr, flag)
    if ACCUMULATE:
        # status[1] counts overflowed calls since the last check; [2], [3] = layer, t of the first one.
        # One program, so a plain read-modify-write is race free.
        count = tl.load(status_ptr + 1)
        first = (count == 0) & (flag != 0)
        tl.store(status_ptr + 1, count + flag)
        tl.store(status_ptr + 2, tl.where(first, layer, tl.load(status_ptr + 2)))
        tl.store(status_ptr + 3, tl.where(first, t, tl.load(status_ptr + 3)))


@triton.jit
def _append_rows(src_base, stride_st, stride_sd, dst_ptr, stride_dp, stride_dd, row0, t, n_write, D,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Copy the first n_write (t, or 0 on overflow) new rows of one head to pool rows row0, row0 + 1, ..."""
    offs_d = tl.arange(0, BLOCK_D)
    # The loop bound t is a kernel argument (never a loaded value); n_write masks inside.
    for t0 in range(0, t, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t[:, None] < n_write) & (offs_d[None, :] < D)
        rows = tl.load(src_base + offs_t[:, None].to(tl.int64) * stride_st + offs_d[None, :] * stride_sd,
                       mask=mask, other=0.0)
        dest = row0 + offs_t.to(tl.int64)
        tl.store(dst_ptr + dest[:, None] * stride_dp + offs_d[None, :] * stride_dd, rows, mask=mask)


@triton.jit
def _append_kernel(
    k_pool_ptr, v_pool_ptr, seg_start_ptr, seg_len_ptr, k_new_ptr, v_new_ptr, status_ptr,
    stride_kp, stride_kpd, stride_vp, stride_vpd, stride_ab, stride_ah, stride_lb, stride_lh,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    H, t, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    ok = tl.load(status_ptr) == 0  # set by _overflow_kernel: any overflow -> no program writes
    n_write = tl.where(ok, t, 0)
    len_ptr = seg_len_ptr + b * stride_lb + h * stride_lh
    n_live = tl.load(len_ptr)
    row0 = tl.load(seg_start_ptr + b * stride_ab + h * stride_ah) + n_live.to(tl.int64)
    _append_rows(k_new_ptr + b * stride_kb + h * stride_kh, stride_kt, stride_kd, k_pool_ptr, stride_kp,
                 stride_kpd, row0, t, n_write, D, BLOCK_T, BLOCK_D)
    _append_rows(v_new_ptr + b * stride_vb + h * stride_vh, stride_vt, stride_vd, v_pool_ptr, stride_vp,
                 stride_vpd, row0, t, n_write, D, BLOCK_T, BLOCK_D)
    # This program alone reads and writes this segment's seg_len, so the update cannot race.
    tl.store(len_ptr, n_live + t, mask=ok)


# ---------------------------------------------------------------------------------------------------
# Overflow status: default (sync per call) or deferred (graph-safe) mode
_mode = threading.local()
_status_buffers: dict[torch.device, torch.Tensor] = {}


def _deferred() -> bool:
    return getattr(_mode, "depth", 0) > 0


def _normalize(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one buffer
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def status_buffer(device: torch.device) -> torch.Tensor:
    """The device's int32[4] overflow status: [this call's flag, #overflowed calls, first layer, first t]."""
    device = _normalize(device)
    buf = _status_buffers.get(device)
    if buf is None:
        buf = _status_buffers[device] = torch.zeros(4, dtype=torch.int32, device=device)
    return buf


def check_overflow(device: Optional[torch.device] = None) -> None:
    """Raise PoolOverflowError if a deferred-mode append overflowed since the last check; then clear.

    One host sync per device checked (all devices seen so far when ``device`` is None).
    """
    devices = list(_status_buffers) if device is None else [_normalize(device)]
    for dev in devices:
        buf = status_buffer(dev)
        _, count, layer, t = buf.tolist()
        if count:
            buf.zero_()
            raise PoolOverflowError(
                f"kvkernels.ragged_append: {count} deferred append(s) on {dev} would have overflowed a "
                f"segment since the last check (the first: layer {layer}, t = {t} rows). Nothing was written "
                f"by those calls and their seg_len is unchanged. Compact with more slack, or roll back seg_len."
            )


@contextlib.contextmanager
def deferred_overflow_checks(check_on_exit: bool = True) -> Iterator[None]:
    """Graph-safe mode: ``ragged_append`` never syncs; overflow surfaces at :func:`check_overflow`.

    An overflowing append inside the block still writes nothing (for any segment); it is recorded on
    the device instead of raising. On exit (without an exception in flight) the block calls
    ``check_overflow()`` unless ``check_on_exit`` is False. Per thread; blocks may nest.
    """
    _mode.depth = getattr(_mode, "depth", 0) + 1
    try:
        yield
    finally:
        _mode.depth -= 1
    if check_on_exit:
        check_overflow()


# ---------------------------------------------------------------------------------------------------
# Host side
def _empty(*shape, dtype, device):
    """Allocation of the pools (one place, so tests can poison it with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _segment_layout(tile_counts: torch.Tensor, shape, slack: int):
    """(seg_start int64, seg_len int32, seg_cap int32 [L, B, H], tile_base int64 [S, T]) from tile counts."""
    within = torch.cumsum(tile_counts, dim=1)  # int64: kept tokens up to and including each tile
    seg_len = within[:, -1].to(torch.int32)
    seg_cap = seg_len + slack
    cap64 = seg_cap.long()
    seg_start = torch.cumsum(cap64, dim=0) - cap64
    tile_base = seg_start[:, None] + within - tile_counts  # pool row of each tile's first kept token
    return seg_start.view(shape), seg_len.view(shape), seg_cap.view(shape), tile_base.contiguous()


def compact_kv(keys, values, keep, num_kept, slack, *, config=None):
    """Same contract and outputs as :func:`kvkernels.reference.pool.compact_kv` (slack rows zeroed)."""
    L, B, H, N = keep.shape
    S = L * B * H
    D, DV = keys[0].shape[-1], values[0].shape[-1]
    device = keep.device
    cfg = _config("compact_kv", (keys, values, keep, num_kept, slack), device, config)
    block_n, num_warps = cfg["BLOCK_N"], cfg.get("num_warps", 4)
    T = triton.cdiv(N, block_n)

    # bool -> uint8 is a free reinterpretation; reshape copies only if keep is an odd view (1 B/token).
    keep_u8 = keep.view(torch.uint8).reshape(S, N)
    tile_counts = torch.zeros(S, T, dtype=torch.int32, device=device)
    if S and T:
        _count_tiles_kernel[(S * T,)](keep_u8, tile_counts, N, T, *keep_u8.stride(), BLOCK_N=block_n,
                                    num_warps=num_warps)
    if T == 0:  # N == 0: every segment is empty; keep the cumsum shapes valid
        tile_counts = torch.zeros(S, 1, dtype=torch.int32, device=device)
    seg_start, seg_len, seg_cap, tile_base = _segment_layout(tile_counts, (L, B, H), slack)

    P = num_kept + S * slack
    k_pool = _empty(P, D, dtype=keys[0].dtype, device=device)
    v_pool = _empty(P, DV, dtype=values[0].dtype, device=device)
    block_d, block_dv = triton.next_power_of_2(D), triton.next_power_of_2(DV)
    if slack and S:
        n_blocks = triton.cdiv(slack, block_n)
        _zero_slack_kernel[(S * n_blocks,)](
            k_pool, v_pool, seg_start, seg_len, slack, n_blocks, k_pool.stride(0), v_pool.stride(0), D, DV,
            BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=num_warps)
    if num_kept == 0 or T == 0:
        return k_pool, v_pool, seg_start, seg_len, seg_cap
    for layer, (k, v) in enumerate(zip(keys, values)):
        # Each layer is read in place with its own strides: no torch.stack of the whole cache.
        _gather_kernel[(B * H * T,)](
            k, v, keep_u8, tile_base, k_pool, v_pool,
            *k.stride(), *v.stride(), *keep_u8.stride(), k_pool.stride(0), v_pool.stride(0),
            layer * B * H, H, N, T, D, DV,
            BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=num_warps,
        )
    return k_pool, v_pool, seg_start, seg_len, seg_cap


def ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new, *, config=None):
    """Same contract as :func:`kvkernels.reference.pool.ragged_append` (see the module doc for syncs)."""
    B, H, t, D = k_new.shape
    args = (k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new)
    cfg = _config("ragged_append", args, k_pool.device, config)
    deferred = _deferred()
    status = status_buffer(k_pool.device)
    lens, caps, starts = seg_len[layer], seg_cap[layer], seg_start[layer]  # [B, H] views, no copies
    _overflow_kernel[(1,)](lens, caps, status, B * H, H, *lens.stride(), *caps.stride(), t, layer,
                           ACCUMULATE=deferred, BLOCK_S=cfg.get("BLOCK_S", 256))
    _append_kernel[(B * H,)](
        k_pool, v_pool, starts, lens, k_new, v_new, status,
        # Both pool strides: the pools are mutated in place, so they cannot be made contiguous here, and
        # the op accepts any [P, D] view (e.g. a pool whose rows are slices of a wider buffer).
        *k_pool.stride(), *v_pool.stride(), *starts.stride(), *lens.stride(),
        *k_new.stride(), *v_new.stride(),
        H, t, D,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_D=triton.next_power_of_2(D), num_warps=cfg.get("num_warps", 4),
    )
    if not deferred and status[0].item():  # the one host sync of the default mode
        check_capacity(seg_len, seg_cap, layer, t)  # raises the reference's exact message
        raise PoolOverflowError(f"kvkernels.ragged_append: appending t = {t} rows to layer {layer} overflowed a "
                                f"segment; nothing was written")


__all__ = ["TUNABLE", "check_overflow", "compact_kv", "deferred_overflow_checks", "ragged_append",
           "status_buffer"]
