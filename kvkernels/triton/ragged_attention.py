"""Split-K flash-decoding over the ragged per-head pool: the Triton kernel of ``ragged_attention``.

Contract (same as ``kvkernels.reference.ragged_attention``): q [B, Hq, Lq, D] attends to KV head
h = hq // G's segment of the pool, rows ``seg_start[b, h] .. + seg_len[b, h]``; query row i sees segment
rows 0 .. seg_len - Lq + i (bottom-right causal). Returns o [B, Hq, Lq, D] in q.dtype and, with
``return_lse``, the fp32 natural-log LSE [B, Hq, Lq] (else an empty fp32 tensor of shape (0,)).
A query that sees no row gets o = 0 and lse = -inf.

Design
------
After KVzip eviction the heads' lengths are skewed (1:100 is common), so one program per head (or one
split count for all heads, as FlashAttention-2's varlen path does) leaves most of the GPU idle while the
long heads run. We schedule *work*, not heads:

1. **Chunks and the work list.** Every segment's rows are cut into fixed-size chunks of ``CHUNK`` rows;
   a segment of n rows has ``cdiv(n, CHUNK)`` items (0 for an empty one). Items are numbered segment
   after segment (segment s = b * Hkv + h), chunk after chunk. The list is never materialised on the
   host and never read back: a program that owns item number ``i`` finds its (segment, chunk) on the
   device from ``seg_len`` alone (``_locate``: per-segment chunk counts -> an in-register prefix sum ->
   the segment is the number of prefix ends <= i, the chunk is i minus the largest such end). The live
   item count is the total of the prefix sum, again a device value.
2. **Grid from shapes.** The number of items is bounded from shapes only:
   ``items <= B*Hkv + cdiv(P, CHUNK)`` with P = k_pool.shape[0], because one layer's segments are
   disjoint slices of the pool (their live rows sum to at most P; see "Precondition"). The attention
   kernel runs a persistent grid of ``min(bound, SMs * programs_per_sm)`` programs (sized so that all
   of them are resident at once); program p reads the live item count from ``seg_len`` once and
   handles items p, p + grid, p + 2*grid, ... below it (on the GPU the loop bound *is* that count; under
   the interpreter it is ``cdiv(bound, grid)`` with a guard). Items are near-equal in size, so the
   static round-robin balances. The launch never depends on live lengths: a decode step can be
   captured in a CUDA graph and replayed as lengths grow, and there is no host sync (no ``.item()``,
   ``int(tensor)`` or ``max(seg_len)``). A grid of ``bound`` one-item programs would be simpler, but
   P spans all layers, so most of those programs would be dead and each would still rescan seg_len.
3. **GQA packing.** A program loads each K/V tile of its chunk once for all G query heads of the KV head:
   the G*Lq query rows (padded to BLOCK_M >= 16, masked) are the M side of both ``tl.dot``s, so KV bytes
   are read once per KV head, not G times. Very long G*Lq (question prefill) splits into M blocks
   (grid axis 1), each re-reading the chunk.
4. **Partials.** For its chunk a program runs the online softmax (fp32, in log2 units) and writes the
   normalised partial output [G*Lq, D] and its LSE to a workspace slot owned by the item. The program
   that owns chunk 0 of a segment also writes the segment's first item number (its offset in the
   workspace) for the merge.
5. **Merge.** A second small kernel, one program per (segment, block of query rows), combines the
   segment's partials in chunk order by log-sum-exp and writes o (q.dtype) and the natural-log LSE.

Masking: K/V rows past the chunk's end, past the query's causal limit, or outside the pool are masked;
D is padded to the next power of two (64, 80, 96, 128, 256 -> 64, 128, 128, 128, 256) with channel
masks. Inputs fp16, bf16 or fp32; logits, softmax and accumulation are fp32 (for fp32 inputs the dots
run in IEEE fp32, not TF32); the probabilities are cast to the V dtype for the second dot, as
FlashAttention does.

Determinism: every item's partial depends only on its rows and the launch config, each item has its own
workspace slot (no atomics) and the merge order is fixed (chunk 0, 1, 2, ...), so for a given config the
output is bit-identical across runs, whatever program ran which item. *Deterministic mode*
(``KVKERNELS_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``) additionally pins the
config to the documented default heuristic (tuned tables are ignored), so the chunking and tile sizes -
and hence the summation order - do not change with a tuning file. An explicit ``config=`` still wins.

Workspace: each call allocates ``bound * G*Lq * (D + 1)`` fp32 values of partials plus ``B*Hkv`` int32
offsets with ``torch.empty`` (the caching allocator makes this cheap, and it is legal inside CUDA-graph
capture, where it comes from the graph's private pool). Only the live items' slots are written or read.
Because P counts the rows of *all* layers, the bound over-counts the live items by about the number of
layers: that costs workspace address space (memory that is allocated but never touched), not time.
It is capped at 256 MiB by doubling CHUNK for the call when needed (many query rows on a huge pool);
decode shapes stay well under it (P = 2.6M rows, G*Lq = 4, D = 128: about 20 MiB).

Loops: on the GPU the tile loop of a chunk and the merge loop over a segment's chunks use bounds read
from ``seg_len`` (``DYNAMIC_LOOPS``). Under the Triton interpreter (``TRITON_INTERPRET=1``) they loop
to a static bound (tiles per chunk, or the chunks a segment can have) and mask instead, because Triton
3.6 with numpy >= 2.4 breaks interpreted loops whose bounds come from ``tl.load``.

Precondition (not checked: checking would read data on the host): the segments of one call are
disjoint and inside the pool (as ``compact_kv``/``ragged_append`` build them), so sum(seg_len) <= P.
Pool rows outside [0, P) are never read; items past the bound are not computed (a violated precondition
gives wrong outputs for the segments concerned, never a write past the workspace).

Tuning (``TUNABLE``): ``CHUNK`` (rows per work item; multiple of BLOCK_N), ``BLOCK_N`` (K/V rows per
tile), ``BLOCK_M`` (max query rows per tile, >= 16), ``programs_per_sm`` (persistent grid size),
``num_warps``, ``num_stages``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvkernels import tuning
from kvkernels._backend import triton_interpreting

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)  # a constexpr: jitted code may only read constexpr globals

# Loops bounded by values read from seg_len (GPU) or by static bounds plus masks (interpreter, see the
# module docstring). A module attribute read at every call, so tests can exercise both paths.
DYNAMIC_LOOPS: bool | None = None  # None: dynamic unless TRITON_INTERPRET is set

# Config pinned by deterministic mode and used when nothing is tuned.
# programs_per_sm = 2 at 4 warps always fits on the SM (<= 255 registers, <= 2 x 64 KiB of staged K/V at
# D = 128): a persistent program that is not resident would start late and stretch the tail.
_GPU_DEFAULT = {"CHUNK": 256, "BLOCK_N": 64, "BLOCK_M": 64, "programs_per_sm": 2, "num_warps": 4, "num_stages": 2}
# Small chunks under the interpreter, so that short test segments still span several chunks.
_INTERPRETER_DEFAULT = {"CHUNK": 64, "BLOCK_N": 32, "BLOCK_M": 32, "programs_per_sm": 1, "num_warps": 4,
                        "num_stages": 1}
_INTERPRETER_PROGRAMS = 3  # persistent programs under the interpreter: small, so each loops over items
# Cap on the partials workspace. The bound on items counts the rows of every layer of the pool, so with
# many query rows (question prefill: G*Lq in the hundreds) 256-row chunks would ask for gigabytes;
# the chunk doubles until the workspace fits (a function of shapes only, so still deterministic).
_WORKSPACE_BYTES = 256 << 20
_MAX_CHUNK = 1 << 16


# ---------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _locate(item, seg_len_ptr, S, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, NUM_S_BLOCKS: tl.constexpr):
    """(segment, chunk, live item count) of work item ``item``, from the per-segment chunk counts."""
    carry = tl.full([], 0, tl.int32)  # items in the segment blocks already scanned
    seg = tl.full([], 0, tl.int32)  # segments whose items all come before `item`
    first = tl.full([], 0, tl.int32)  # largest prefix end <= item: the segment's first item
    for sb in tl.static_range(NUM_S_BLOCKS):
        offs = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        lens = tl.load(seg_len_ptr + offs, mask=offs < S, other=0)
        n = (tl.maximum(lens, 0) + CHUNK - 1) // CHUNK
        ends = tl.cumsum(n, 0) + carry
        before = ends <= item
        seg += tl.sum(before.to(tl.int32), 0)
        first = tl.maximum(first, tl.max(tl.where(before, ends, 0), 0))
        carry += tl.sum(n, 0)
    return seg, item - first, carry


@triton.jit
def _attend_chunk(
    q_ptr, k_ptr, v_ptr, seg_start_ptr, seg_len_ptr, ws_o_ptr, ws_lse_ptr,
    item, seg, chunk, mblk,
    Hkv, G, Lq, D, P, qk_scale,
    sq_b, sq_h, sq_l, sq_d, sk_p, sk_d, sv_p, sv_d,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_FP32: tl.constexpr, DYNAMIC: tl.constexpr,
):
    """Online softmax of the G*Lq query rows of block ``mblk`` over one chunk; writes the partial."""
    b = seg // Hkv
    h = seg % Hkv
    start = tl.load(seg_start_ptr + seg)  # int64 pool row of the segment's row 0
    seg_rows = tl.load(seg_len_ptr + seg)
    row0 = chunk * CHUNK
    row_end = tl.minimum(row0 + CHUNK, seg_rows)

    # Query rows r = g * Lq + i of this M block: query head h*G + g, query row i.
    r = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < G * Lq
    g = r // Lq
    i = r % Lq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_offs = b.to(tl.int64) * sq_b + (h * G + g).to(tl.int64)[:, None] * sq_h + i[:, None] * sq_l + d[None, :] * sq_d
    qt = tl.load(q_ptr + q_offs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    last_visible = seg_rows - Lq + i  # query i's causal limit (segment row index)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DYNAMIC:
        n_tiles = tl.cdiv(row_end - row0, BLOCK_N)
    else:
        n_tiles = CHUNK // BLOCK_N
    for t in range(0, n_tiles):
        pos = row0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        pool_row = start + pos
        kv_ok = (pos < row_end) & (pool_row >= 0) & (pool_row < P)
        kv_mask = kv_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_ptr + pool_row[:, None] * sk_p + d[None, :] * sk_d, mask=kv_mask, other=0.0)
        if IS_FP32:
            s = tl.dot(qt, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(qt, tl.trans(kt))
        visible = kv_ok[None, :] & (pos[None, :] <= last_visible[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row that has seen nothing yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m - m_ref)
        l = l * alpha + tl.sum(p, 1)
        vt = tl.load(v_ptr + pool_row[:, None] * sv_p + d[None, :] * sv_d, mask=kv_mask, other=0.0)
        if IS_FP32:
            pv = tl.dot(p, vt, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m = m_new

    seen = l > 0
    o = acc / tl.where(seen, l, 1.0)[:, None]
    lse2 = tl.where(seen, m + tl.log2(tl.where(seen, l, 1.0)), float("-inf"))
    rows = item.to(tl.int64) * (G * Lq) + r
    tl.store(ws_o_ptr + rows[:, None] * D + d[None, :], o, mask=r_ok[:, None] & d_ok[None, :])
    tl.store(ws_lse_ptr + rows, lse2, mask=r_ok)


@triton.jit
def _ragged_chunks_kernel(
    q_ptr, k_ptr, v_ptr, seg_start_ptr, seg_len_ptr, ws_o_ptr, ws_lse_ptr, item_off_ptr,
    S, Hkv, G, Lq, D, P, qk_scale, num_programs, iters, bound,
    sq_b, sq_h, sq_l, sq_d, sk_p, sk_d, sv_p, sv_d,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, NUM_S_BLOCKS: tl.constexpr, IS_FP32: tl.constexpr, DYNAMIC: tl.constexpr,
):
    """Persistent programs: program p computes the partials of items p, p + num_programs, ..."""
    pid = tl.program_id(0)
    mblk = tl.program_id(1)
    # The live item count, once per program: later iterations past it cost one comparison each.
    _, _, total = _locate(0, seg_len_ptr, S, CHUNK, BLOCK_S, NUM_S_BLOCKS)
    if DYNAMIC:
        my_items = tl.cdiv(tl.maximum(total - pid, 0), num_programs)
    else:
        my_items = iters
    for it in range(0, my_items):
        item = pid + it * num_programs
        if item < total:
            seg, chunk, _ = _locate(item, seg_len_ptr, S, CHUNK, BLOCK_S, NUM_S_BLOCKS)
            # The workspace has `bound` slots. Live items stay below it when the precondition holds; if
            # it does not (overlapping segments, e.g. one segment shared by several batch rows), the
            # items past it are dropped here rather than written past the end of the workspace.
            if item < bound:
                _attend_chunk(
                    q_ptr, k_ptr, v_ptr, seg_start_ptr, seg_len_ptr, ws_o_ptr, ws_lse_ptr,
                    item, seg, chunk, mblk, Hkv, G, Lq, D, P, qk_scale,
                    sq_b, sq_h, sq_l, sq_d, sk_p, sk_d, sv_p, sv_d,
                    CHUNK, BLOCK_N, BLOCK_M, BLOCK_D, IS_FP32, DYNAMIC,
                )
            # Chunk 0's item number is where the segment's partials start in the workspace (written even
            # past the bound, so that the merge never forms addresses from an unwritten offset).
            tl.store(item_off_ptr + seg, item, mask=(chunk == 0) & (mblk == 0))


@triton.jit
def _merge_kernel(
    ws_o_ptr, ws_lse_ptr, item_off_ptr, seg_len_ptr, o_ptr, lse_ptr,
    Hkv, G, Lq, D, bound, max_chunks,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    RETURN_LSE: tl.constexpr, DYNAMIC: tl.constexpr,
):
    """Log-sum-exp merge of one segment's partials, in chunk order, for one block of query rows."""
    seg = tl.program_id(0)
    mblk = tl.program_id(1)
    b = seg // Hkv
    h = seg % Hkv
    n = (tl.maximum(tl.load(seg_len_ptr + seg), 0) + CHUNK - 1) // CHUNK
    # item_off is only written for segments with items; don't form addresses from the unwritten ones.
    off = tl.load(item_off_ptr + seg, mask=n > 0, other=0)

    r = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < G * Lq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    mask2 = r_ok[:, None] & d_ok[None, :]
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DYNAMIC:
        n_loop = n
    else:
        n_loop = max_chunks
    for j in range(0, n_loop):
        item = off + j
        # Fold the scalar "chunk j exists" test into the row bound: the interpreter mishandles
        # `vector_mask & scalar_mask` (it yields an int mask).
        # item >= 0: under the interpreter's static loops a segment past the bound may have no offset.
        live_rows = tl.where((n > j) & (item < bound) & (item >= 0), G * Lq, 0)
        r_live = r < live_rows
        rows = item.to(tl.int64) * (G * Lq) + r
        lse2 = tl.load(ws_lse_ptr + rows, mask=r_live, other=float("-inf"))
        part = tl.load(ws_o_ptr + rows[:, None] * D + d[None, :], mask=r_live[:, None] & d_ok[None, :],
                       other=0.0)
        m_new = tl.maximum(m, lse2)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        w = tl.exp2(lse2 - m_ref)
        l = l * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * part
        m = m_new

    seen = l > 0
    o = acc / tl.where(seen, l, 1.0)[:, None]
    g = r // Lq
    i = r % Lq
    out_rows = (b.to(tl.int64) * (Hkv * G) + h * G + g) * Lq + i  # row of o viewed as [B*Hq*Lq, D]
    tl.store(o_ptr + out_rows[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty), mask=mask2)
    if RETURN_LSE:
        lse = tl.where(seen, (m + tl.log2(tl.where(seen, l, 1.0))) * _LN2, float("-inf"))
        tl.store(lse_ptr + out_rows, lse, mask=r_ok)


# ---------------------------------------------------------------------------------------------------
# Configs


def _shape_key(q, k_pool, v_pool, seg_start, seg_len, sm_scale=None, return_lse=False) -> str:
    """dtype, D, G, bucketed Lq and bucketed segment count (B*Hkv, the parallelism the chunks feed).

    No pool size: P spans every layer of a real pool but one layer in the autotuner's workloads, so a key
    on it would never match at run time; live lengths are not readable without a host sync.
    """
    B, Hq, Lq, D = q.shape
    S = seg_start.numel()
    dtype = str(q.dtype).replace("torch.", "")
    G = Hq // max(seg_start.shape[1], 1)
    return f"{dtype}-D{D}-G{G}-Lq{tuning.length_bucket(Lq)}-S{tuning.length_bucket(S)}"


def default_config(q, k_pool, v_pool, seg_start, seg_len, sm_scale=None, return_lse=False) -> dict:
    """The documented heuristic: 256-row chunks of 64-row tiles (32 at D = 256); small chunks on CPU.

    Register budget (checked by ``python -m autotune.static_check``): more than 32 query rows (wide GQA,
    several query positions, question prefill) at D >= 128 run on 8 warps, because the [64, D] fp32
    accumulator plus the Q, K and V tiles of 4 warps pass 255 registers per thread and spill; fp32 inputs
    use 32-row K/V tiles (the fp32 dots keep both operands in registers).
    """
    if q.device.type != "cuda":
        return dict(_INTERPRETER_DEFAULT)
    cfg = dict(_GPU_DEFAULT)
    D = q.shape[-1]
    rows = (q.shape[1] // max(seg_start.shape[1], 1)) * q.shape[2]
    if D > 128:
        cfg.update(BLOCK_N=32, BLOCK_M=32)
    if q.dtype == torch.float32:
        cfg.update(BLOCK_N=32)
    if rows > 32 and D >= 128 and cfg["BLOCK_M"] > 32:
        # 186 registers x 8 warps: one program per SM is resident (static check), so the persistent grid
        # is sized for one; the SM still runs 8 warps, as two 4-warp programs would.
        cfg.update(num_warps=8, programs_per_sm=1)
    return cfg


TUNABLE = {
    "ragged_attention": {
        "space": [
            dict(_GPU_DEFAULT),
            {"CHUNK": 128, "BLOCK_N": 64, "BLOCK_M": 64, "programs_per_sm": 2, "num_warps": 4, "num_stages": 2},
            {"CHUNK": 512, "BLOCK_N": 64, "BLOCK_M": 64, "programs_per_sm": 2, "num_warps": 4, "num_stages": 3},
            {"CHUNK": 256, "BLOCK_N": 32, "BLOCK_M": 32, "programs_per_sm": 3, "num_warps": 4, "num_stages": 3},
            {"CHUNK": 512, "BLOCK_N": 128, "BLOCK_M": 64, "programs_per_sm": 1, "num_warps": 8, "num_stages": 2},
            {"CHUNK": 1024, "BLOCK_N": 64, "BLOCK_M": 16, "programs_per_sm": 2, "num_warps": 4, "num_stages": 4},
        ],
        "key": _shape_key,
        "default": default_config,
    },
}


def deterministic_mode() -> bool:
    """True under ``KVKERNELS_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``."""
    flag = os.environ.get("KVKERNELS_DETERMINISTIC", "0").strip().lower() not in ("", "0", "false", "no")
    return flag or torch.are_deterministic_algorithms_enabled()


def _pick_config(args, config) -> dict:
    if config is None:
        tuned = None if deterministic_mode() else tuning.lookup(__name__, "ragged_attention", _shape_key(*args),
                                                               args[0].device)
        config = tuned or default_config(*args)
    cfg = {**default_config(*args), **config}
    if cfg["CHUNK"] % cfg["BLOCK_N"] or cfg["BLOCK_N"] < 16 or cfg["BLOCK_M"] < 16:
        raise ValueError(f"ragged_attention config {cfg}: need BLOCK_N, BLOCK_M >= 16 and CHUNK % BLOCK_N == 0")
    return cfg


def _num_programs(device: torch.device, cfg: dict, bound: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count  # cached; no sync
        return max(1, min(bound, sms * cfg["programs_per_sm"]))
    return max(1, min(bound, _INTERPRETER_PROGRAMS))


def _chunk_rows(cfg: dict, S: int, P: int, rows: int, D: int) -> int:
    """cfg's CHUNK, doubled while the partials of the worst-case item count exceed _WORKSPACE_BYTES."""
    chunk = cfg["CHUNK"]
    while (S + triton.cdiv(P, chunk)) * rows * (D + 1) * 4 > _WORKSPACE_BYTES and chunk < _MAX_CHUNK:
        chunk *= 2
    return chunk


def _dynamic_loops() -> bool:
    return (not triton_interpreting()) if DYNAMIC_LOOPS is None else DYNAMIC_LOOPS


# ---------------------------------------------------------------------------------------------------
# Op


def ragged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    sm_scale: float,
    return_lse: bool,
    *,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``ragged_attention`` (see the module docstring). Launches two kernels; reads no device data."""
    args = (q, k_pool, v_pool, seg_start, seg_len, sm_scale, return_lse)
    B, Hq, Lq, D = q.shape
    Hkv = seg_start.shape[1]
    G = Hq // Hkv
    S = B * Hkv
    P = k_pool.shape[0]
    o = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq) if return_lse else (0,), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse

    cfg = _pick_config(args, config)
    rows = G * Lq
    chunk = _chunk_rows(cfg, S, P, rows, D)
    bound = S + triton.cdiv(P, chunk)  # >= live items when one call's segments are disjoint in the pool
    block_m = max(16, min(cfg["BLOCK_M"], triton.next_power_of_2(rows)))
    block_d = triton.next_power_of_2(D)
    block_s = min(1024, triton.next_power_of_2(S))
    dynamic = _dynamic_loops()

    ws_o = torch.empty((bound, rows, D), dtype=torch.float32, device=q.device)
    ws_lse = torch.empty((bound, rows), dtype=torch.float32, device=q.device)
    item_off = torch.empty((S,), dtype=torch.int32, device=q.device)
    seg_start = seg_start.contiguous()
    seg_len = seg_len.contiguous()
    if P == 0:
        # An empty pool may have a null data pointer, which Triton's launcher rejects; every row load is
        # masked by `row < P` anyway, so any valid buffer will do.
        k_pool = v_pool = q.new_zeros(1, D)

    nprog = _num_programs(q.device, cfg, bound)
    m_blocks = triton.cdiv(rows, block_m)
    _ragged_chunks_kernel[(nprog, m_blocks)](
        q, k_pool, v_pool, seg_start, seg_len, ws_o, ws_lse, item_off,
        S, Hkv, G, Lq, D, P, float(sm_scale) * _LOG2E, nprog, triton.cdiv(bound, nprog), bound,
        *q.stride(), *k_pool.stride(), *v_pool.stride(),
        CHUNK=chunk, BLOCK_N=cfg["BLOCK_N"], BLOCK_M=block_m, BLOCK_D=block_d,
        BLOCK_S=block_s, NUM_S_BLOCKS=triton.cdiv(S, block_s), IS_FP32=q.dtype == torch.float32,
        DYNAMIC=dynamic, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _merge_kernel[(S, m_blocks)](
        ws_o, ws_lse, item_off, seg_len, o, lse if return_lse else ws_lse,
        Hkv, G, Lq, D, bound, triton.cdiv(P, chunk),
        CHUNK=chunk, BLOCK_M=block_m, BLOCK_D=block_d, RETURN_LSE=return_lse, DYNAMIC=dynamic,
        num_warps=4,
    )
    return o, lse
