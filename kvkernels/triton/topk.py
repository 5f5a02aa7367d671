"""Exact per-row top-k as a bool mask (op ``topk_mask``) in Triton: a radix select.

Order. Each fp32 score is mapped to the order-preserving int32 image of
``kvkernels.reference.topk.sortable_key`` (non-negative floats keep their bits, negative ones get their
magnitude bits flipped, NaN of either sign becomes INT32_MIN, -0.0 is folded onto +0.0 first). Flipping
the sign bit of that image gives a 32-bit pattern whose *unsigned* order is the float order, so it can
be cut into four 8-bit digits, most significant first.

Select. Keep, per row, the digits of the threshold found so far (``prefix``) and ``k_rem``, how many of
the keys that share the prefix still belong to the top-k (starting with k). Each of the 4 passes counts
the current digit among the keys that share the prefix (a 256-bin histogram), then walks the bins from
the top: the bin where the count from the top reaches ``k_rem`` is the next digit of the k-th largest
key, and the keys in the bins above it are all kept, so ``k_rem`` drops by their number. After 4 passes
``prefix`` is the exact k-th largest key and ``k_rem`` (>= 1) is how many keys equal to it are kept.

Tie rule. A final pass writes the mask: key > threshold -> True; key == threshold -> True only for the
first ``k_rem`` such keys in index order (a running count of equal keys along the row, plus an in-block
cumulative sum), so exactly min(k, M) entries are True per row, ties going to the lower index, as in the
stable sort of the reference.

Two launch shapes (config ``SPAN``):

* ``SPAN == 0`` (or a span >= M): one program per row loops over its row in tiles of ``BLOCK``; all
  passes run in one launch with the histogram in registers, no workspace and no atomics (5 reads of
  the row, served by L2 when it fits, and one write). Right for many rows (uniform per-head budgets:
  R = B*L*Hkv rows of a few thousand tokens), where R programs fill the GPU.
* ``SPAN > 0``: several programs per row (a 1-D grid over (row, span)); each span's histogram is added
  into a [R, 256] int32 workspace with atomics, a one-program-per-row kernel picks the digit and clears
  the workspace, and after the 4 passes a tie-count kernel, an exclusive cumsum over spans (torch) and a
  write kernel finish. Right for few long rows (the global budget over all layers and heads: B rows of up
  to ~1e9 entries), which a single program per row would leave on a few SMs. 6 reads of the scores.

The default (``_default_config``) splits rows only when there are fewer than 256 of them and they are
longer than 64K; ``TUNABLE`` lets the autotuner pick BLOCK, SPAN and num_warps per (R, M) bucket.

Offsets are int64, per-row counts int32 (so M < 2**31 - 2**20). No host synchronisation: the launch path
depends only on shapes, k and the config, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvkernels import tuning
from kvkernels.reference.topk import trivial_mask

NUM_BINS = 256  # 8-bit digits, 4 passes
MAX_ROW_LEN = 2**31 - 2**20  # per-row counts and in-row offsets of a tile fit int32

_INT32_MIN = tl.constexpr(-(2**31))


# --------------------------------------------------------------------------------------------------
# Device helpers shared by both launch shapes.
@triton.jit
def _radix_key(x):
    """fp32 -> int32 bits whose *unsigned* order is the float order (sortable_key, sign bit flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits == _INT32_MIN, 0, bits)  # -0.0 ties with +0.0 (bit test: no float compare)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # == sortable_key: signed order is float order
    key = tl.where(is_nan, _INT32_MIN, key)
    return key ^ _INT32_MIN


@triton.jit
def _digit_histogram(ukey, valid, prefix, PASS: tl.constexpr):
    """256-bin histogram of digit PASS (MSB first) over the valid keys that share prefix's top 8*PASS bits."""
    if PASS == 0:
        cand = valid
    else:
        # Arithmetic shift: the result is 0 exactly when the top 8*PASS bits agree.
        cand = valid & (((ukey ^ prefix) >> (32 - 8 * PASS)) == 0)
    digit = (ukey >> (24 - 8 * PASS)) & 0xFF
    # tl.histogram takes no mask on every Triton we support: park the non-candidates in bin 0 and
    # take them out again.
    hist = tl.histogram(tl.where(cand, digit, 0), 256)
    n_parked = tl.sum(tl.where(cand, 0, 1), 0)
    return hist - tl.where(tl.arange(0, 256) == 0, n_parked, 0)


@triton.jit
def _pick_digit(hist, k_rem):
    """The bin holding the k_rem-th largest candidate, and how many candidates lie in higher bins.

    Needs 1 <= k_rem <= sum(hist). The intervals (above, above + hist] of the non-empty bins partition
    (0, sum(hist)], so exactly one bin matches.
    """
    above = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # candidates in strictly higher bins
    hit = (above < k_rem) & (above + hist >= k_rem)
    digit = tl.sum(tl.where(hit, tl.arange(0, 256), 0), 0)
    n_above = tl.sum(tl.where(hit, above, 0), 0)
    return digit, n_above


@triton.jit
def _keep_tile(ukey, valid, threshold, k_rem, ties_before):
    """Keep flags of one tile in index order, and the tile's number of keys equal to the threshold."""
    # Compare in the signed image (flip the sign bit back): Triton compares int32 as signed.
    key = ukey ^ _INT32_MIN
    thr = threshold ^ _INT32_MIN
    tie = valid & (key == thr)
    tie_i = tie.to(tl.int32)
    tie_rank = ties_before + tl.cumsum(tie_i, 0) - 1  # rank among equal keys along the row
    keep = (valid & (key > thr)) | (tie & (tie_rank < k_rem))
    return keep, tl.sum(tie_i, 0)


@triton.jit
def _row_lead(x_ptr, row, stride_r, CONTIG: tl.constexpr):
    """(aligned row base, lead): tiles of a contiguous row start `lead` elements before it, at a multiple
    of 4 floats, so every tile load is 16-byte aligned and vectorises whatever the row length.

    Without this, a row length that is not a multiple of 16 (most token counts) leaves the row's start
    alignment unknown to the compiler, and every load becomes a 4-byte scalar load. ``(base // 4) * 4`` is
    provably a multiple of 4; the positions before the row (at most 3) are masked.
    """
    base = row * stride_r
    if CONTIG:
        aligned = (base // 4) * 4
        return aligned, (base - aligned).to(tl.int32)
    return base, (row * 0).to(tl.int32)


# --------------------------------------------------------------------------------------------------
# SPAN == 0: one program per row, everything in one launch.
@triton.jit
def _topk_rows_kernel(x_ptr, out_ptr, M, k, stride_r, stride_m, BLOCK: tl.constexpr, CONTIG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_base, lead = _row_lead(x_ptr, row, stride_r, CONTIG)
    out_row = out_ptr + row * M
    lanes = tl.arange(0, BLOCK)
    zero = tl.program_id(0) * 0  # an int32 scalar *tensor* (k may arrive as the constexpr 1)
    # Tile positions t cover row positions t - lead; M + 3 >= M + lead bounds them with no loaded value.
    n_pos = M + 3 if CONTIG else M

    prefix = zero
    k_rem = k + zero
    for PASS in tl.static_range(4):
        hist = tl.zeros((256,), tl.int32)
        for start in range(0, n_pos, BLOCK):
            offs = start + lanes - lead
            valid = (offs >= 0) & (offs < M)
            x = _load_scores(x_ptr, x_base, start + lanes, offs, valid, stride_m, CONTIG)
            hist += _digit_histogram(_radix_key(x), valid, prefix, PASS)
        digit, n_above = _pick_digit(hist, k_rem)
        prefix = prefix | (digit << (24 - 8 * PASS))
        k_rem = k_rem - n_above

    ties_before = zero
    for start in range(0, n_pos, BLOCK):
        offs = start + lanes - lead
        valid = (offs >= 0) & (offs < M)
        x = _load_scores(x_ptr, x_base, start + lanes, offs, valid, stride_m, CONTIG)
        keep, n_ties = _keep_tile(_radix_key(x), valid, prefix, k_rem, ties_before)
        tl.store(out_row + offs, keep.to(tl.int8), mask=valid)
        ties_before += n_ties


@triton.jit
def _load_scores(x_ptr, x_base, pos, offs, valid, stride_m, CONTIG: tl.constexpr):
    """One tile of scores: contiguous rows by aligned tile position, strided rows by row position."""
    if CONTIG:
        return tl.load(x_ptr + x_base + pos.to(tl.int64), mask=valid, other=0.0)
    return tl.load(x_ptr + x_base + offs.to(tl.int64) * stride_m, mask=valid, other=0.0)


# --------------------------------------------------------------------------------------------------
# SPAN > 0: a grid over (row, span) per pass. state[row] = (prefix, k_rem); hist[row] = 256 counts.
@triton.jit
def _span_histogram_kernel(x_ptr, hist_ptr, state_ptr, M, stride_r, stride_m, parts,
                           PASS: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr, CONTIG: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // parts).to(tl.int64)
    # Spans cut the aligned tile positions (see _row_lead), so with CONTIG they start `lead` before the row.
    span_start = (pid % parts).to(tl.int64) * (BLOCK * CHUNKS)
    x_base, lead = _row_lead(x_ptr, row, stride_r, CONTIG)
    prefix = tl.load(state_ptr + row * 2)
    lanes = tl.arange(0, BLOCK)
    hist = tl.zeros((256,), tl.int32)
    for c in range(0, CHUNKS):
        pos = span_start + c * BLOCK + lanes
        offs = pos - lead
        valid = (offs >= 0) & (offs < M)
        x = _load_scores(x_ptr, x_base, pos, offs, valid, stride_m, CONTIG)
        hist += _digit_histogram(_radix_key(x), valid, prefix, PASS)
    bins = tl.arange(0, 256)
    # Empty bins are skipped: in the later passes most bins of most spans are empty.
    tl.atomic_add(hist_ptr + row * 256 + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _select_digit_kernel(hist_ptr, state_ptr, PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, 256)
    hist = tl.load(hist_ptr + row * 256 + bins)
    prefix = tl.load(state_ptr + row * 2)
    k_rem = tl.load(state_ptr + row * 2 + 1)
    digit, n_above = _pick_digit(hist, k_rem)
    tl.store(state_ptr + row * 2, prefix | (digit << (24 - 8 * PASS)))
    tl.store(state_ptr + row * 2 + 1, k_rem - n_above)
    tl.store(hist_ptr + row * 256 + bins, tl.zeros_like(hist))  # ready for the next pass


@triton.jit
def _span_tie_count_kernel(x_ptr, state_ptr, ties_ptr, M, stride_r, stride_m, parts,
                           BLOCK: tl.constexpr, CHUNKS: tl.constexpr, CONTIG: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // parts).to(tl.int64)
    span_start = (pid % parts).to(tl.int64) * (BLOCK * CHUNKS)
    x_base, lead = _row_lead(x_ptr, row, stride_r, CONTIG)
    threshold = tl.load(state_ptr + row * 2)
    lanes = tl.arange(0, BLOCK)
    n_ties = pid * 0
    for c in range(0, CHUNKS):
        pos = span_start + c * BLOCK + lanes
        offs = pos - lead
        valid = (offs >= 0) & (offs < M)
        x = _load_scores(x_ptr, x_base, pos, offs, valid, stride_m, CONTIG)
        n_ties += tl.sum((valid & (_radix_key(x) == threshold)).to(tl.int32), 0)
    tl.store(ties_ptr + pid, n_ties)


@triton.jit
def _span_write_kernel(x_ptr, out_ptr, state_ptr, ties_before_ptr, M, stride_r, stride_m, parts,
                       BLOCK: tl.constexpr, CHUNKS: tl.constexpr, CONTIG: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // parts).to(tl.int64)
    span_start = (pid % parts).to(tl.int64) * (BLOCK * CHUNKS)
    x_base, lead = _row_lead(x_ptr, row, stride_r, CONTIG)
    threshold = tl.load(state_ptr + row * 2)
    k_rem = tl.load(state_ptr + row * 2 + 1)
    ties_before = tl.load(ties_before_ptr + pid)  # equal keys in the earlier spans of the row
    lanes = tl.arange(0, BLOCK)
    for c in range(0, CHUNKS):
        pos = span_start + c * BLOCK + lanes
        offs = pos - lead
        valid = (offs >= 0) & (offs < M)
        x = _load_scores(x_ptr, x_base, pos, offs, valid, stride_m, CONTIG)
        keep, n_ties = _keep_tile(_radix_key(x), valid, threshold, k_rem, ties_before)
        tl.store(out_ptr + row * M + offs, keep.to(tl.int8), mask=valid)
        ties_before += n_ties


# --------------------------------------------------------------------------------------------------
# Configs (TUNABLE contract of kvkernels.tuning).
def _tuning_key(scores: torch.Tensor, k: int) -> str:
    R, M = scores.shape
    return f"R{tuning.length_bucket(R)}-M{tuning.length_bucket(M)}"


def _default_config(scores: torch.Tensor, k: int) -> dict:
    """One program per row unless the rows are too few to fill a GPU and long enough to split.

    Split rows get spans of 4..256 tiles, aiming at ~2048 programs in all (a few waves on 132 SMs).
    """
    R, M = scores.shape
    m = tuning.length_bucket(M)
    block = min(2048, max(128, m))
    num_warps = 8 if block >= 2048 else 4
    if R >= 256 or m <= 32 * block:
        return {"BLOCK": block, "SPAN": 0, "num_warps": num_warps}
    span = tuning.length_bucket(-(-R * m // 2048))
    span = min(256 * block, max(4 * block, span))
    return {"BLOCK": block, "SPAN": span, "num_warps": num_warps}


TUNABLE = {
    "topk_mask": {
        "space": [
            {"BLOCK": 1024, "SPAN": 0, "num_warps": 4},
            {"BLOCK": 2048, "SPAN": 0, "num_warps": 8},
            {"BLOCK": 4096, "SPAN": 0, "num_warps": 8},
            {"BLOCK": 1024, "SPAN": 16 * 1024, "num_warps": 4},
            {"BLOCK": 2048, "SPAN": 64 * 2048, "num_warps": 8},
            {"BLOCK": 2048, "SPAN": 256 * 2048, "num_warps": 8},
            {"BLOCK": 4096, "SPAN": 64 * 4096, "num_warps": 8},
        ],
        "key": _tuning_key,
        "default": _default_config,
    },
}


def _empty_mask(R: int, M: int, device: torch.device) -> torch.Tensor:
    """The output; every element is written by the kernels (tests poison it through this hook)."""
    return torch.empty((R, M), dtype=torch.bool, device=device)


def _launch_rows(scores, out, k, config):
    R, M = scores.shape
    _topk_rows_kernel[(R,)](
        scores, out, M, k, scores.stride(0), scores.stride(1),
        BLOCK=config["BLOCK"], CONTIG=scores.stride(1) == 1, num_warps=config["num_warps"],
    )


def _launch_spans(scores, out, k, config):
    R, M = scores.shape
    block, span, warps = config["BLOCK"], config["SPAN"], config["num_warps"]
    chunks = span // block
    contig = scores.stride(1) == 1
    parts = triton.cdiv(M + 3 if contig else M, span)  # aligned tile positions reach M + lead - 1 <= M + 2
    dev = scores.device
    state = torch.zeros((R, 2), dtype=torch.int32, device=dev)  # (prefix, k_rem) per row
    state[:, 1] = k
    hist = torch.zeros((R, NUM_BINS), dtype=torch.int32, device=dev)
    grid = (R * parts,)
    args = (M, scores.stride(0), scores.stride(1), parts)
    for p in range(4):
        _span_histogram_kernel[grid](scores, hist, state, *args, PASS=p, BLOCK=block, CHUNKS=chunks,
                                     CONTIG=contig, num_warps=warps)
        _select_digit_kernel[(R,)](hist, state, PASS=p, num_warps=4)
    ties = torch.empty((R, parts), dtype=torch.int32, device=dev)
    _span_tie_count_kernel[grid](scores, state, ties, *args, BLOCK=block, CHUNKS=chunks, CONTIG=contig,
                                 num_warps=warps)
    ties_before = torch.cumsum(ties, dim=1, dtype=torch.int32) - ties
    _span_write_kernel[grid](scores, out, state, ties_before, *args, BLOCK=block, CHUNKS=chunks,
                             CONTIG=contig, num_warps=warps)


def check_config(config: dict) -> None:
    block, span = config["BLOCK"], config["SPAN"]
    if block < 16 or block & (block - 1):
        raise ValueError(f"topk_mask config: BLOCK = {block} must be a power of two >= 16")
    if span < 0 or span % block:
        raise ValueError(f"topk_mask config: SPAN = {span} must be 0 or a positive multiple of BLOCK = {block}")


def topk_mask(scores: torch.Tensor, k: int, *, config: dict | None = None) -> torch.Tensor:
    """bool [R, M]: True at the min(k, M) largest entries of each row; ties go to the lower index."""
    R, M = scores.shape
    trivial = trivial_mask(scores, k)
    if trivial is not None:
        return trivial
    kk = min(k, M)
    if M > MAX_ROW_LEN:
        raise ValueError(f"kvkernels.topk_mask (triton): rows of {M} entries exceed the supported "
                         f"{MAX_ROW_LEN} (int32 counts); split the row")
    if config is None:
        config = (tuning.lookup(__name__, "topk_mask", _tuning_key(scores, k), scores.device)
                  or _default_config(scores, k))
    check_config(config)
    mask = _empty_mask(R, M, scores.device)
    out = mask.view(torch.uint8)  # the kernels store int8 0/1
    if config["SPAN"] == 0 or config["SPAN"] >= M:
        _launch_rows(scores, out, kk, config)
    else:
        _launch_spans(scores, out, kk, config)
    return mask
