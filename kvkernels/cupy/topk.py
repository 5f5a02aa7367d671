"""Exact per-row top-k as a bool mask (op ``topk_mask``) as CuPy RawKernels (CUDA C++, NVRTC).

The same radix select as ``kvkernels.triton.topk`` (see its docstring), written in CUDA C++ so that the
histograms can be built the way CUDA does best:

* Key. ``radix_key`` is ``kvkernels.reference.topk.sortable_key`` with the sign bit flipped: unsigned
  order == float order, NaN (either sign) lowest, -0.0 folded onto +0.0.
* Warp-level histograms. Each warp owns a private 256-bin histogram in shared memory; within a warp,
  the lanes that hold the same digit are grouped with ``__match_any_sync`` and only their leader does
  one shared-memory atomic (adding the group's size), so a skewed digit distribution (many ties, the
  common case in later passes) costs one atomic per warp, not 32. The warp histograms are summed into
  the block's bins after the loop.
* Digit pick. One warp reads the 256 bins (8 per lane), a shuffle suffix-scan gives each lane the count
  of candidates in higher bins, and the lane owning the bin where the count from the top reaches
  ``k_rem`` publishes (digit, count above). 4 passes of 8 bits give the exact k-th largest key.
* Tie rule. The write pass walks the row in tiles of one element per thread in index order; a warp
  ballot + popcount ranks the ties within a warp, a per-tile prefix over warps and a running count
  across tiles rank them along the row, and only the first ``k_rem`` keys equal to the threshold are
  kept. Exactly min(k, M) True per row, ties toward the lower index.

Launch shapes (config ``SPAN``): ``0`` -> one block per row runs all passes in one launch (``topk_rows``;
many rows). ``> 0`` -> a grid over (row, span) per pass with the block histograms added into a [R, 256]
workspace by global atomics (``topk_span_hist``), a one-warp-per-row digit pick (``topk_select``), a
tie count per span (``topk_span_ties``), an exclusive cumsum over spans (torch, same stream) and the
write (``topk_span_write``): few very long rows (up to ~1e9 entries; offsets are 64-bit).

The module is compiled lazily by NVRTC at the first call (``cupy.RawModule``, one per device), and every
kernel runs on torch's current stream (``cupy.cuda.ExternalStream``); tensors are shared zero-copy via
``cupy.asarray`` (``__cuda_array_interface__``). CuPy is imported only when a kernel runs, so this
module imports without CuPy.
"""

from __future__ import annotations

import numpy as np
import torch

from kvkernels import tuning
from kvkernels.reference.topk import trivial_mask

NUM_BINS = 256
MAX_ROW_LEN = 2**31 - 2**20  # counts are 32-bit
MAX_THREADS = 1024

_CUDA_SOURCE = r"""
#define FULL_MASK 0xFFFFFFFFu

// sortable_key(x) ^ 0x80000000: unsigned order == float order; NaN -> 0 (lowest); -0.0 == +0.0.
__device__ __forceinline__ unsigned int radix_key(float x) {
    unsigned int bits = __float_as_uint(x);
    if (bits == 0x80000000u) bits = 0u;                 // -0.0 -> +0.0 (a bit test: no float compare)
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0u;  // NaN of either sign
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Does u share the top 8*pass bits of prefix? (pass 0: every key is a candidate)
__device__ __forceinline__ bool is_candidate(unsigned int u, unsigned int prefix, int pass) {
    return pass == 0 || ((u ^ prefix) >> (32 - 8 * pass)) == 0u;
}

// Histogram of digit `pass` over x[begin:end) (stride stride_m) among the candidates, into bins[256].
// Called by the whole block; every thread runs the same number of iterations (warp intrinsics).
__device__ void block_histogram(const float* __restrict__ x, long long stride_m, long long begin,
                                long long end, unsigned int prefix, int pass,
                                unsigned int* warp_hists, unsigned int* bins) {
    const int nwarps = blockDim.x >> 5;
    for (int i = threadIdx.x; i < nwarps * 256; i += blockDim.x) warp_hists[i] = 0u;
    __syncthreads();
    unsigned int* my_hist = warp_hists + (threadIdx.x >> 5) * 256;
    const int lane = threadIdx.x & 31;
    const int shift = 24 - 8 * pass;
    for (long long base = begin; base < end; base += blockDim.x) {
        const long long i = base + threadIdx.x;
        bool cand = false;
        unsigned int digit = 0u;
        if (i < end) {
            const unsigned int u = radix_key(x[i * stride_m]);
            cand = is_candidate(u, prefix, pass);
            digit = (u >> shift) & 0xFFu;
        }
        const unsigned int cand_lanes = __ballot_sync(FULL_MASK, cand);
        if (cand) {
            // Lanes with equal digits add once, through their lowest lane.
            const unsigned int peers = __match_any_sync(cand_lanes, digit);
            if (lane == __ffs(peers) - 1) atomicAdd(&my_hist[digit], (unsigned int)__popc(peers));
        }
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        unsigned int s = 0u;
        for (int w = 0; w < nwarps; ++w) s += warp_hists[w * 256 + b];
        bins[b] = s;
    }
    __syncthreads();
}

// One full warp: the bin holding the k_rem-th largest candidate -> sel[0], candidates above it -> sel[1].
// Needs 1 <= k_rem <= sum(bins); exactly one (lane, bin) matches.
__device__ void pick_digit_warp(const unsigned int* bins, unsigned int k_rem, unsigned int* sel) {
    const int lane = threadIdx.x & 31;
    unsigned int local[8];
    unsigned int lane_sum = 0u;
    for (int j = 0; j < 8; ++j) {
        local[j] = bins[lane * 8 + j];
        lane_sum += local[j];
    }
    unsigned int suffix = lane_sum;  // inclusive suffix sum over lanes (higher lanes = higher bins)
    for (int off = 1; off < 32; off <<= 1) {
        const unsigned int t = __shfl_down_sync(FULL_MASK, suffix, off);
        if (lane + off < 32) suffix += t;
    }
    unsigned int above = suffix - lane_sum;
    for (int j = 7; j >= 0; --j) {
        if (above < k_rem && above + local[j] >= k_rem) {
            sel[0] = (unsigned int)(lane * 8 + j);
            sel[1] = above;
        }
        above += local[j];
    }
}

// Writes out[begin:end) = keep flags; ties_before = keys equal to thr in the row before `begin`.
__device__ void write_range(const float* __restrict__ x, long long stride_m, unsigned char* __restrict__ out,
                            long long begin, long long end, unsigned int thr, unsigned int k_rem,
                            unsigned int ties_before, unsigned int* warp_ties) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (long long base = begin; base < end; base += blockDim.x) {
        const long long i = base + threadIdx.x;
        const bool valid = i < end;
        const unsigned int u = valid ? radix_key(x[i * stride_m]) : 0u;
        const bool tie = valid && u == thr;
        const unsigned int tie_lanes = __ballot_sync(FULL_MASK, tie);
        if (lane == 0) warp_ties[warp] = (unsigned int)__popc(tie_lanes);
        __syncthreads();
        unsigned int rank = ties_before + (unsigned int)__popc(tie_lanes & ((1u << lane) - 1u));
        unsigned int tile_ties = 0u;
        for (int w = 0; w < nwarps; ++w) {
            if (w < warp) rank += warp_ties[w];
            tile_ties += warp_ties[w];
        }
        if (valid) out[i] = (unsigned char)((u > thr) || (tie && rank < k_rem));
        ties_before += tile_ties;
        __syncthreads();  // warp_ties is rewritten by the next tile
    }
}

// Shared memory of the block kernels: [nwarps*256 warp hists | 256 bins | 2 sel | 32 warp ties].
struct Smem {
    unsigned int* warp_hists;
    unsigned int* bins;
    unsigned int* sel;
    unsigned int* warp_ties;
};

__device__ __forceinline__ Smem smem_layout() {
    extern __shared__ unsigned int smem[];
    Smem s;
    s.warp_hists = smem;
    s.bins = smem + (blockDim.x >> 5) * 256;
    s.sel = s.bins + 256;
    s.warp_ties = s.sel + 2;
    return s;
}

// SPAN == 0: one block per row, all passes.
extern "C" __global__ void topk_rows(const float* __restrict__ x, unsigned char* __restrict__ out,
                                     long long M, long long stride_r, long long stride_m, unsigned int k) {
    const Smem sm = smem_layout();
    const long long row = blockIdx.x;
    const float* xr = x + row * stride_r;
    unsigned int prefix = 0u, k_rem = k;
    for (int pass = 0; pass < 4; ++pass) {
        block_histogram(xr, stride_m, 0, M, prefix, pass, sm.warp_hists, sm.bins);
        if (threadIdx.x < 32) pick_digit_warp(sm.bins, k_rem, sm.sel);
        __syncthreads();
        prefix |= sm.sel[0] << (24 - 8 * pass);
        k_rem -= sm.sel[1];
        __syncthreads();  // sel is rewritten by the next pass
    }
    write_range(xr, stride_m, out + row * M, 0, M, prefix, k_rem, 0u, sm.warp_ties);
}

// SPAN > 0. state[row] = (prefix, k_rem); hist[row] = 256 counts, zero between passes.
extern "C" __global__ void topk_span_hist(const float* __restrict__ x, unsigned int* __restrict__ hist,
                                          const unsigned int* __restrict__ state, long long M,
                                          long long stride_r, long long stride_m, long long span,
                                          int parts, int pass) {
    const Smem sm = smem_layout();
    const long long row = blockIdx.x / parts;
    const long long begin = (blockIdx.x % parts) * span;
    const long long end = begin + span < M ? begin + span : M;
    block_histogram(x + row * stride_r, stride_m, begin, end, state[row * 2], pass, sm.warp_hists, sm.bins);
    for (int b = threadIdx.x; b < 256; b += blockDim.x)
        if (sm.bins[b]) atomicAdd(&hist[row * 256 + b], sm.bins[b]);
}

// One warp per row: pick the digit, update the state, clear the row's histogram for the next pass.
extern "C" __global__ void topk_select(unsigned int* __restrict__ hist, unsigned int* __restrict__ state,
                                       int pass) {
    __shared__ unsigned int bins[256];
    __shared__ unsigned int sel[2];
    const long long row = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const unsigned int k_rem = state[row * 2 + 1];
    for (int b = lane; b < 256; b += 32) {
        bins[b] = hist[row * 256 + b];
        hist[row * 256 + b] = 0u;
    }
    __syncwarp();
    pick_digit_warp(bins, k_rem, sel);
    __syncwarp();
    if (lane == 0) {
        state[row * 2] |= sel[0] << (24 - 8 * pass);
        state[row * 2 + 1] = k_rem - sel[1];
    }
}

// Keys equal to the threshold per span.
extern "C" __global__ void topk_span_ties(const float* __restrict__ x, const unsigned int* __restrict__ state,
                                          unsigned int* __restrict__ ties, long long M, long long stride_r,
                                          long long stride_m, long long span, int parts) {
    const Smem sm = smem_layout();
    const long long row = blockIdx.x / parts;
    const long long begin = (blockIdx.x % parts) * span;
    const long long end = begin + span < M ? begin + span : M;
    const unsigned int thr = state[row * 2];
    const float* xr = x + row * stride_r;
    unsigned int count = 0u;
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) count += radix_key(xr[i * stride_m]) == thr;
    for (int off = 16; off > 0; off >>= 1) count += __shfl_down_sync(FULL_MASK, count, off);
    if ((threadIdx.x & 31) == 0) sm.warp_ties[threadIdx.x >> 5] = count;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int total = 0u;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += sm.warp_ties[w];
        ties[blockIdx.x] = total;
    }
}

extern "C" __global__ void topk_span_write(const float* __restrict__ x, unsigned char* __restrict__ out,
                                           const unsigned int* __restrict__ state,
                                           const unsigned int* __restrict__ ties_before, long long M,
                                           long long stride_r, long long stride_m, long long span, int parts) {
    const Smem sm = smem_layout();
    const long long row = blockIdx.x / parts;
    const long long begin = (blockIdx.x % parts) * span;
    const long long end = begin + span < M ? begin + span : M;
    write_range(x + row * stride_r, stride_m, out + row * M, begin, end, state[row * 2], state[row * 2 + 1],
                ties_before[blockIdx.x], sm.warp_ties);
}
"""

_KERNEL_NAMES = ("topk_rows", "topk_span_hist", "topk_select", "topk_span_ties", "topk_span_write")
_modules: dict = {}  # device index -> {kernel name: cupy.RawKernel}


def _kernels(device_index: int) -> dict:
    """Compile (NVRTC, once per device and process) and return the kernels."""
    if device_index not in _modules:
        import cupy

        with cupy.cuda.Device(device_index):
            module = cupy.RawModule(code=_CUDA_SOURCE, options=("--std=c++14",))
            _modules[device_index] = {name: module.get_function(name) for name in _KERNEL_NAMES}
    return _modules[device_index]


def _smem_bytes(threads: int) -> int:
    return 4 * ((threads // 32) * NUM_BINS + NUM_BINS + 2 + 32)


# --------------------------------------------------------------------------------------------------
# Configs (same contract as the Triton modules: kvkernels.tuning).
def _tuning_key(scores: torch.Tensor, k: int) -> str:
    R, M = scores.shape
    return f"R{tuning.length_bucket(R)}-M{tuning.length_bucket(M)}"


def _default_config(scores: torch.Tensor, k: int) -> dict:
    """One block per row unless rows are few (< 256) and long (> 64K): then ~2048 blocks of >= 8K entries."""
    R, M = scores.shape
    m = tuning.length_bucket(M)
    if R >= 256 or m <= 65536:
        return {"THREADS": 512 if m >= 8192 else 256, "SPAN": 0}
    span = min(2**24, max(2**13, tuning.length_bucket(-(-R * m // 2048))))
    return {"THREADS": 512, "SPAN": span}


TUNABLE = {
    "topk_mask": {
        "space": [
            {"THREADS": 256, "SPAN": 0},
            {"THREADS": 512, "SPAN": 0},
            {"THREADS": 1024, "SPAN": 0},
            {"THREADS": 256, "SPAN": 2**16},
            {"THREADS": 512, "SPAN": 2**18},
            {"THREADS": 512, "SPAN": 2**20},
            {"THREADS": 1024, "SPAN": 2**20},
        ],
        "key": _tuning_key,
        "default": _default_config,
    },
}


def check_config(config: dict) -> None:
    threads, span = config["THREADS"], config["SPAN"]
    if threads % 32 or not 32 <= threads <= MAX_THREADS:
        raise ValueError(f"topk_mask config: THREADS = {threads} must be a multiple of 32 in [32, {MAX_THREADS}]")
    if span < 0:
        raise ValueError(f"topk_mask config: SPAN = {span} must be >= 0")


def _empty_mask(R: int, M: int, device: torch.device) -> torch.Tensor:
    """The output; every element is written by the kernels (tests poison it through this hook)."""
    return torch.empty((R, M), dtype=torch.bool, device=device)


def _launch_rows(cp, kern, scores, out, k, threads):
    R, M = scores.shape
    kern["topk_rows"](
        (R,), (threads,),
        (cp.asarray(scores), cp.asarray(out), np.int64(M), np.int64(scores.stride(0)),
         np.int64(scores.stride(1)), np.uint32(k)),
        shared_mem=_smem_bytes(threads),
    )


def _launch_spans(cp, kern, scores, out, k, threads, span):
    R, M = scores.shape
    parts = -(-M // span)
    dev = scores.device
    state = torch.zeros((R, 2), dtype=torch.int32, device=dev)  # (prefix, k_rem) per row
    state[:, 1] = k
    hist = torch.zeros((R, NUM_BINS), dtype=torch.int32, device=dev)
    ties = torch.empty((R, parts), dtype=torch.int32, device=dev)
    x, o, st, hi, ti = (cp.asarray(t) for t in (scores, out, state, hist, ties))
    shape = (np.int64(M), np.int64(scores.stride(0)), np.int64(scores.stride(1)), np.int64(span),
             np.int32(parts))
    smem = _smem_bytes(threads)
    grid = (R * parts,)
    for p in range(4):
        kern["topk_span_hist"](grid, (threads,), (x, hi, st, *shape, np.int32(p)), shared_mem=smem)
        kern["topk_select"]((R,), (32,), (hi, st, np.int32(p)))
    kern["topk_span_ties"](grid, (threads,), (x, st, ti, *shape), shared_mem=smem)
    # torch ops run on torch's current stream, which is also the stream of the kernels.
    ties_before = (torch.cumsum(ties, dim=1, dtype=torch.int32) - ties).contiguous()
    kern["topk_span_write"](grid, (threads,), (x, o, st, cp.asarray(ties_before), *shape), shared_mem=smem)


def topk_mask(scores: torch.Tensor, k: int, *, config: dict | None = None) -> torch.Tensor:
    """bool [R, M]: True at the min(k, M) largest entries of each row; ties go to the lower index."""
    R, M = scores.shape
    trivial = trivial_mask(scores, k)
    if trivial is not None:
        return trivial
    kk = min(k, M)
    if scores.device.type != "cuda":
        raise RuntimeError(f"kvkernels.topk_mask (cupy): needs a CUDA tensor, got {scores.device.type}")
    if M > MAX_ROW_LEN:
        raise ValueError(f"kvkernels.topk_mask (cupy): rows of {M} entries exceed the supported "
                         f"{MAX_ROW_LEN} (32-bit counts); split the row")
    if config is None:
        config = (tuning.lookup(__name__, "topk_mask", _tuning_key(scores, k), scores.device)
                  or _default_config(scores, k))
    check_config(config)

    import cupy as cp

    mask = _empty_mask(R, M, scores.device)
    out = mask.view(torch.uint8)
    index = scores.device.index if scores.device.index is not None else torch.cuda.current_device()
    kern = _kernels(index)
    stream = cp.cuda.ExternalStream(torch.cuda.current_stream(scores.device).cuda_stream)
    with cp.cuda.Device(index), stream:
        if config["SPAN"] == 0 or config["SPAN"] >= M:
            _launch_rows(cp, kern, scores, out, kk, config["THREADS"])
        else:
            _launch_spans(cp, kern, scores, out, kk, config["THREADS"], config["SPAN"])
    return mask
