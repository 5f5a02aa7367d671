"""topk_mask: the reference against a naive Python sort, and every backend against the naive sort.

Order used everywhere: descending float value, NaN (any sign or payload) below -inf, -0.0 == +0.0,
ties broken toward the lower index; exactly min(k, M) True per row.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvkernels
from kvkernels import _backend
from kvkernels.reference.topk import sortable_key
from kvkernels.reference.topk import topk_mask as reference_topk_mask

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as in conftest.py
NAN = float("nan")
INF = float("inf")


def floats_from_bits(bits: list[int]) -> torch.Tensor:
    """fp32 values with exactly these bit patterns (unsigned 32-bit ints)."""
    signed = [b - 2**32 if b >= 2**31 else b for b in bits]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


NEG_NAN = floats_from_bits([0xFFC00000])[0].item()  # NaN with the sign bit set
PAYLOAD_NAN = floats_from_bits([0x7F800001])[0].item()  # signalling-pattern NaN
TINY = floats_from_bits([0x00000001])[0].item()  # smallest subnormal


# --------------------------------------------------------------------------------------------------
# The naive model: Python's sort with key (is NaN, -value, index), in float64.
def naive_sort_key(value: float, index: int) -> tuple:
    if math.isnan(value):
        return (1, 0.0, index)
    return (0, -value, index)  # -(-0.0) == -(+0.0): the zeros tie and fall back to the index


def naive_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    R, M = scores.shape
    mask = torch.zeros(R, M, dtype=torch.bool)
    for r, row in enumerate(scores.double().cpu().tolist()):
        order = sorted(range(M), key=lambda j: naive_sort_key(row[j], j))
        for j in order[: min(k, M)]:
            mask[r, j] = True
    return mask


def check_properties(scores: torch.Tensor, k: int, mask: torch.Tensor) -> None:
    """count == min(k, M); every kept entry precedes every dropped one in the (value, index) order."""
    R, M = scores.shape
    assert mask.dtype == torch.bool and tuple(mask.shape) == (R, M)
    assert mask.sum(dim=1).tolist() == [min(k, M)] * R
    for r, row in enumerate(scores.double().cpu().tolist()):
        keep = mask[r].cpu().tolist()
        kept = [naive_sort_key(row[j], j) for j in range(M) if keep[j]]
        dropped = [naive_sort_key(row[j], j) for j in range(M) if not keep[j]]
        if kept and dropped:
            # max over kept of the sort key (= the worst kept) must precede the best dropped; comparing
            # the full key including the index checks "ties go to the lower index" as well.
            assert max(kept) < min(dropped)


# --------------------------------------------------------------------------------------------------
# Named cases: (scores [R, M] fp32 on CPU, k).
def _rows(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _random(R, M, seed, levels=None):
    g = torch.Generator().manual_seed(seed)
    if levels is None:
        return torch.randn(R, M, generator=g)
    return torch.randint(0, levels, (R, M), generator=g).float() * 0.25 - 1.0  # many ties


CASES = {
    # many equal values; the threshold falls inside a run of ties
    "ties_at_threshold": lambda: (_random(3, 41, 1, levels=4), 17),
    "all_equal": lambda: (torch.full((2, 33), 1.5), 10),
    "ties_k1": lambda: (_rows([3.0, 7.0, 7.0, 1.0, 7.0]), 1),
    "pos_inf": lambda: (_rows([1.0, INF, 2.0, INF, INF, -3.0, INF]), 3),
    "neg_inf": lambda: (_rows([-INF, 1.0, -INF, -INF, 0.5, -INF, -INF]), 4),
    "nan_below_neg_inf": lambda: (_rows([NAN, -INF, 2.0, NEG_NAN, -INF, PAYLOAD_NAN, 0.0]), 5),
    "nan_ties": lambda: (_rows([NAN, 1.0, NEG_NAN, PAYLOAD_NAN, NAN, 2.0, NAN]), 4),
    "all_nan": lambda: (torch.full((2, 9), NAN), 3),
    "signed_zero": lambda: (_rows([1.0, -0.0, 0.0, -0.0, 0.0, -1.0, -0.0]), 3),
    "signed_zero_first": lambda: (_rows([0.0, -0.0, 0.0, -0.0, -0.0]), 2),
    "subnormals": lambda: (_rows([TINY, -TINY, 0.0, -0.0, 2 * TINY, -2 * TINY, TINY]), 3),
    "mixed_specials": lambda: (_rows([NAN, INF, -0.0, -INF, 0.0, TINY, -TINY, NAN, INF, 3.0, -3.0]), 6),
    "k0": lambda: (_random(3, 11, 2), 0),
    "k1": lambda: (_random(3, 11, 3), 1),
    "k_eq_m": lambda: (_random(2, 13, 4), 13),
    "k_gt_m": lambda: (_random(2, 13, 5), 50),
    "k_m_minus_1": lambda: (_random(2, 13, 6, levels=3), 12),
    "r1_odd_m": lambda: (_random(1, 101, 7), 37),
    "r_many_odd_m": lambda: (_random(5, 67, 8, levels=6), 20),
    "m1": lambda: (_random(4, 1, 9), 1),
    # uniform per-head budget: many rows, few tokens
    "per_head": lambda: (_random(32, 37, 10, levels=9), 11),
    # global budget: few rows, many tokens
    "global": lambda: (_random(2, 1537, 11, levels=200), 600),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]()


# --------------------------------------------------------------------------------------------------
# Reference vs naive.
def test_reference_matches_naive(case):
    scores, k = case
    got = reference_topk_mask(scores, k)
    assert torch.equal(got, naive_topk_mask(scores, k))
    check_properties(scores, k, got)


def test_sortable_key_is_float_order():
    values = [NAN, NEG_NAN, -INF, -3.5, -TINY, -0.0, 0.0, TINY, 1.0, 3.5, INF]
    keys = sortable_key(torch.tensor(values, dtype=torch.float32)).tolist()
    assert keys[0] == keys[1] == -(2**31)  # every NaN has the lowest key
    assert keys[2:5] == sorted(keys[2:5]) and len(set(keys[2:])) == len(keys[2:]) - 1
    assert keys[5] == keys[6] == 0  # -0.0 folded onto +0.0
    assert keys[2:] == sorted(keys[2:])


def test_naive_model_itself():
    # hand-checked: keep 7.0 at index 1 (the lower of the tied 7.0s) for k=1; NaN only when needed
    assert naive_topk_mask(_rows([3.0, 7.0, 7.0]), 1).tolist() == [[False, True, False]]
    assert naive_topk_mask(_rows([NAN, -INF, -0.0, 0.0]), 2).tolist() == [[False, False, True, True]]
    assert naive_topk_mask(_rows([NAN, -INF, NAN]), 2).tolist() == [[True, True, False]]


# --------------------------------------------------------------------------------------------------
# Backends vs naive (through the public op and the dispatcher).
def _backend_device(backend: str) -> torch.device:
    if backend == "cupy":
        if not _backend.cupy_available():
            pytest.skip("the cupy backend needs CuPy and a CUDA GPU")
        return torch.device("cuda")
    if backend == "triton":
        if not _backend.triton_available():
            pytest.skip("Triton is not installed")
        if DEVICE.type == "cpu" and not _backend.triton_interpreting():
            pytest.skip("no GPU and TRITON_INTERPRET is off")
    return DEVICE


def _kernel_module(backend: str):
    if backend == "reference":
        return None
    return importlib.import_module(f"kvkernels.{backend}.topk")


@pytest.fixture
def poisoned(monkeypatch):
    """Make the kernels' output start as bytes of 2, so unwritten elements show up."""

    def poison(backend):
        module = _kernel_module(backend)
        if module is not None:
            monkeypatch.setattr(
                module, "_empty_mask",
                lambda R, M, device: torch.full((R, M), 2, dtype=torch.uint8, device=device).view(torch.bool),
            )

    return poison


def _assert_mask_ok(scores, k, got):
    assert got.dtype == torch.bool and tuple(got.shape) == tuple(scores.shape)
    # no byte left at the poison value: every element was written with 0 or 1
    assert bool((got.view(torch.uint8) <= 1).all())
    expected = naive_topk_mask(scores.cpu(), k)
    assert torch.equal(got.cpu(), expected)
    check_properties(scores.cpu(), k, got.cpu())


BACKENDS = ["reference", "triton", "cupy"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_naive(backend, case, poisoned):
    scores, k = case
    device = _backend_device(backend)
    poisoned(backend)
    x = scores.to(device)
    with kvkernels.use_backend(backend):
        got = torch.ops.kvkernels.topk_mask(x, k)
        assert kvkernels.last_choice() == ("topk_mask", backend)
    assert got.device == x.device
    _assert_mask_ok(scores, k, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_non_contiguous_rows(backend, poisoned):
    device = _backend_device(backend)
    poisoned(backend)
    base = _random(29, 6, 12, levels=5).to(device)  # [M, R] -> transposed view [R, M], strides (1, R)
    x = base.t()
    assert not x.is_contiguous()
    with kvkernels.use_backend(backend):
        got = kvkernels.topk_mask(x, 9)
    _assert_mask_ok(x, 9, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_empty_rows(backend):
    device = _backend_device(backend)
    with kvkernels.use_backend(backend):
        assert torch.ops.kvkernels.topk_mask(torch.randn(0, 7, device=device), 3).shape == (0, 7)
        got = torch.ops.kvkernels.topk_mask(torch.randn(3, 0, device=device), 3)
    assert got.shape == (3, 0) and got.dtype == torch.bool


# --------------------------------------------------------------------------------------------------
# Both launch shapes of the compiled backends, with explicit configs (small tiles for the interpreter).
TRITON_CONFIGS = [
    {"BLOCK": 64, "SPAN": 0, "num_warps": 4},  # one program per row, several tiles per row
    {"BLOCK": 32, "SPAN": 64, "num_warps": 4},  # several programs per row, 2 tiles per program
    {"BLOCK": 128, "SPAN": 128, "num_warps": 4},  # one tile per program
]
CUPY_CONFIGS = [
    {"THREADS": 64, "SPAN": 0},
    {"THREADS": 256, "SPAN": 0},
    {"THREADS": 64, "SPAN": 96},  # a span that is not a multiple of the block
    {"THREADS": 128, "SPAN": 512},
]
SHAPES = [  # (R, M, k, levels): ties that straddle tiles and spans
    (2, 301, 77, 5),
    (1, 250, 249, None),
    (3, 130, 1, 2),
]


def _launch_cases():
    for backend, configs in (("triton", TRITON_CONFIGS), ("cupy", CUPY_CONFIGS)):
        for config in configs:
            for shape in SHAPES:
                yield pytest.param(backend, config, shape, id=f"{backend}-{config}-{shape}")


@pytest.mark.parametrize("backend, config, shape", list(_launch_cases()))
def test_launch_shapes(backend, config, shape, poisoned):
    device = _backend_device(backend)
    poisoned(backend)
    R, M, k, levels = shape
    scores = _random(R, M, 13 + M, levels=levels)
    scores[0, 3] = NAN
    scores[-1, 5] = -0.0
    scores[-1, 6] = INF
    got = _kernel_module(backend).topk_mask(scores.to(device), k, config=config)
    _assert_mask_ok(scores, k, got)


def test_triton_first_space_entry_runs():
    device = _backend_device("triton")
    module = _kernel_module("triton")
    scores, k = _random(3, 1100, 14, levels=50), 300
    got = module.topk_mask(scores.to(device), k, config=module.TUNABLE["topk_mask"]["space"][0])
    _assert_mask_ok(scores, k, got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="every tuning candidate is only run compiled on a GPU")
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_every_space_entry_on_gpu(backend):
    device = _backend_device(backend)
    module = _kernel_module(backend)
    scores = _random(3, 70001, 15, levels=1000)
    for config in module.TUNABLE["topk_mask"]["space"]:
        got = module.topk_mask(scores.to(device), 20000, config=config)
        assert torch.equal(got.cpu(), reference_topk_mask(scores, 20000)), config


@pytest.mark.skipif(not torch.cuda.is_available(), reason="large rows are only run compiled on a GPU")
@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("R, M", [(1, 3_000_001), (1024, 4097), (4, 1 << 20)])
def test_large_rows_on_gpu(backend, R, M):
    device = _backend_device(backend)
    scores = torch.randn(R, M, device=device).round(decimals=2)  # plenty of ties
    k = M // 3
    with kvkernels.use_backend(backend):
        got = kvkernels.topk_mask(scores, k)
    assert torch.equal(got, reference_topk_mask(scores, k))


# --------------------------------------------------------------------------------------------------
# Tuning contract.
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_tunable_contract(backend):
    if backend == "triton" and not _backend.triton_available():
        pytest.skip("Triton is not installed")
    module = importlib.import_module(f"kvkernels.{backend}.topk")  # imports without CuPy
    entry = module.TUNABLE["topk_mask"]
    space = entry["space"]
    assert space and all(isinstance(c, dict) for c in space)
    for config in space:
        module.check_config(config)
    a, b = torch.empty(7, 1000), torch.empty(7, 1020)
    assert entry["key"](a, 5) == entry["key"](b, 999) == "R16-M1024"  # bucketed, k-independent
    assert entry["key"](torch.empty(1, 3_000_000), 5) == "R16-M4194304"
    for shape in [(1, 37), (4, 3000), (1, 10**6), (2, 10**9 // 2), (4096, 4096)]:
        scores = torch.empty(1, 1).expand(*shape)  # no storage: the heuristics read shapes only
        config = entry["default"](scores, 10)
        assert set(config) == set(space[0])
        module.check_config(config)
    # few very long rows are split; many rows are not
    assert entry["default"](torch.empty(1, 1).expand(1, 10**8), 10)["SPAN"] > 0
    assert entry["default"](torch.empty(1, 1).expand(4096, 8192), 10)["SPAN"] == 0


def test_cupy_backend_refuses_cpu_tensors():
    with kvkernels.use_backend("cupy"), pytest.raises(RuntimeError, match="cupy"):
        torch.ops.kvkernels.topk_mask(torch.randn(2, 5), 2)


# --------------------------------------------------------------------------------------------------
# Properties (hypothesis): values from a pool rich in ties and specials.
SPECIALS = [NAN, NEG_NAN, INF, -INF, 0.0, -0.0, TINY, -TINY, 1.0, -1.0, 1.0 + 2**-23, 3.0e38, -3.0e38]
value_strategy = st.one_of(
    st.sampled_from(SPECIALS),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.integers(-3, 3).map(float),
)


@st.composite
def scores_and_k(draw, max_rows=3, max_cols=40):
    R = draw(st.integers(1, max_rows))
    M = draw(st.integers(1, max_cols))
    values = draw(st.lists(value_strategy, min_size=R * M, max_size=R * M))
    k = draw(st.integers(0, M + 3))
    return torch.tensor(values, dtype=torch.float32).view(R, M), k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scores_and_k())
def test_reference_properties(args):
    scores, k = args
    got = reference_topk_mask(scores, k)
    check_properties(scores, k, got)
    assert torch.equal(got, naive_topk_mask(scores, k))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scores_and_k(max_rows=2, max_cols=70), st.sampled_from(TRITON_CONFIGS))
def test_triton_properties(args, config):
    device = _backend_device("triton")
    scores, k = args
    got = _kernel_module("triton").topk_mask(scores.to(device), k, config=config)
    check_properties(scores, k, got.cpu())


@pytest.mark.skipif(not _backend.cupy_available(), reason="the cupy backend needs CuPy and a CUDA GPU")
@settings(max_examples=100, deadline=None)
@given(scores_and_k(max_rows=4, max_cols=300), st.sampled_from(CUPY_CONFIGS))
def test_cupy_properties(args, config):
    scores, k = args
    got = _kernel_module("cupy").topk_mask(scores.cuda(), k, config=config)
    check_properties(scores, k, got.cpu())


# --------------------------------------------------------------------------------------------------
# The CuPy backend's CUDA C++ on CPU: compiled with g++ against a tiny emulator of the CUDA features it
# uses (one std::thread per CUDA thread, barriers for __syncthreads and each warp intrinsic), and driven
# by the module's own launch code through stand-ins for cupy and its RawKernels. This checks the kernels'
# logic (histograms, digit pick, tie ranks, spans) where no GPU is present; the real thing is checked
# by the cupy-backend tests above on a GPU.
EMULATOR_PRELUDE = r"""
// A tiny CPU emulator of the CUDA features the topk kernels use: one std::thread per CUDA thread,
// blocks run one after another, barriers for __syncthreads and for each warp intrinsic.
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

struct EmuDim3 { unsigned int x, y, z; };
static thread_local EmuDim3 threadIdx, blockIdx;
static EmuDim3 blockDim, gridDim;
static std::vector<unsigned int> emu_smem;

struct EmuBarrier {
    std::mutex m;
    std::condition_variable cv;
    int count = 0;
    unsigned long gen = 0;
    void wait(int n) {
        std::unique_lock<std::mutex> lock(m);
        unsigned long g = gen;
        if (++count == n) { count = 0; ++gen; cv.notify_all(); }
        else cv.wait(lock, [&] { return gen != g; });
    }
};

// One barrier and one exchange slot array per intrinsic and warp: lanes that skip an intrinsic
// (e.g. __match_any_sync under a branch) move on to a different barrier, never into this one.
struct EmuWarpOp {
    EmuBarrier bar[32];
    unsigned int slot[32][32];
    // every lane in mask posts v, then reads all posts
    void exchange(unsigned int mask, unsigned int v, unsigned int* all) {
        int w = threadIdx.x >> 5, lane = threadIdx.x & 31, n = __builtin_popcount(mask);
        slot[w][lane] = v;
        bar[w].wait(n);
        for (int l = 0; l < 32; ++l) all[l] = slot[w][l];
        bar[w].wait(n);
    }
};
static EmuBarrier emu_block_barrier;
static EmuWarpOp emu_ballot, emu_match, emu_shfl, emu_syncwarp;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

static void __syncthreads() { emu_block_barrier.wait((int)blockDim.x); }
static void __syncwarp() { unsigned int all[32]; emu_syncwarp.exchange(0xFFFFFFFFu, 0u, all); }
static unsigned int __ballot_sync(unsigned int mask, bool pred) {
    unsigned int all[32], r = 0u;
    emu_ballot.exchange(mask, pred ? 1u : 0u, all);
    for (int l = 0; l < 32; ++l) if (((mask >> l) & 1u) && all[l]) r |= 1u << l;
    return r;
}
static unsigned int __match_any_sync(unsigned int mask, unsigned int v) {
    unsigned int all[32], r = 0u;
    emu_match.exchange(mask, v, all);
    for (int l = 0; l < 32; ++l) if (((mask >> l) & 1u) && all[l] == v) r |= 1u << l;
    return r;
}
static unsigned int __shfl_down_sync(unsigned int mask, unsigned int v, int off) {
    unsigned int all[32];
    emu_shfl.exchange(mask, v, all);
    int src = (int)(threadIdx.x & 31) + off;
    return src < 32 ? all[src] : v;
}
static unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static int __popc(unsigned int v) { return __builtin_popcount(v); }
static int __ffs(unsigned int v) { return __builtin_ffs((int)v); }
static unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }

template <class F>
static void emu_run(unsigned int grid, unsigned int block, size_t smem_bytes, F kernel) {
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    for (unsigned int b = 0; b < grid; ++b) {
        emu_smem.assign(smem_bytes / 4 + 1, 0xDEADBEEFu);  // shared memory starts as garbage
        std::vector<std::thread> threads;
        for (unsigned int t = 0; t < block; ++t)
            threads.emplace_back([&, b, t] { blockIdx = {b, 0, 0}; threadIdx = {t, 0, 0}; kernel(); });
        for (auto& th : threads) th.join();
    }
}
"""

EMULATOR_LAUNCHERS = r"""
extern "C" {
void emu_topk_rows(unsigned g, unsigned b, size_t s, const float* x, unsigned char* out, long long M,
                   long long sr, long long sm, unsigned k) {
    emu_run(g, b, s, [=] { topk_rows(x, out, M, sr, sm, k); });
}
void emu_topk_span_hist(unsigned g, unsigned b, size_t s, const float* x, unsigned* hist, const unsigned* state,
                        long long M, long long sr, long long sm, long long span, int parts, int pass) {
    emu_run(g, b, s, [=] { topk_span_hist(x, hist, state, M, sr, sm, span, parts, pass); });
}
void emu_topk_select(unsigned g, unsigned b, size_t s, unsigned* hist, unsigned* state, int pass) {
    emu_run(g, b, s, [=] { topk_select(hist, state, pass); });
}
void emu_topk_span_ties(unsigned g, unsigned b, size_t s, const float* x, const unsigned* state, unsigned* ties,
                        long long M, long long sr, long long sm, long long span, int parts) {
    emu_run(g, b, s, [=] { topk_span_ties(x, state, ties, M, sr, sm, span, parts); });
}
void emu_topk_span_write(unsigned g, unsigned b, size_t s, const float* x, unsigned char* out, const unsigned* state,
                         const unsigned* ties_before, long long M, long long sr, long long sm, long long span,
                         int parts) {
    emu_run(g, b, s, [=] { topk_span_write(x, out, state, ties_before, M, sr, sm, span, parts); });
}
}
"""


@pytest.fixture(scope="module")
def emulated_cuda(tmp_path_factory):
    import ctypes
    import shutil
    import subprocess

    import numpy as np

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is needed to emulate the CUDA kernels on CPU")
    module = importlib.import_module("kvkernels.cupy.topk")
    dynamic_smem = "extern __shared__ unsigned int smem[];"
    assert module._CUDA_SOURCE.count(dynamic_smem) == 1
    source = module._CUDA_SOURCE.replace(dynamic_smem, "unsigned int* smem = emu_smem.data();")
    folder = tmp_path_factory.mktemp("cuda_emulator")
    (folder / "emu.cpp").write_text(EMULATOR_PRELUDE + source + EMULATOR_LAUNCHERS)
    subprocess.run([compiler, "-O1", "-std=c++17", "-pthread", "-shared", "-fPIC", "emu.cpp", "-o", "emu.so"],
                   cwd=folder, check=True, capture_output=True)
    lib = ctypes.CDLL(str(folder / "emu.so"))

    def c_arg(a):
        if isinstance(a, torch.Tensor):
            return ctypes.c_void_p(a.data_ptr())
        return {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int, np.uint32: ctypes.c_uint}[type(a)](int(a))

    class RawKernel:  # the call convention of cupy.RawKernel: (grid, block, args, shared_mem=)
        def __init__(self, name):
            self.fn = getattr(lib, "emu_" + name)

        def __call__(self, grid, block, args, shared_mem=0):
            assert len(grid) == 1 and len(block) == 1
            self.fn(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), ctypes.c_size_t(shared_mem), *map(c_arg, args))

    class Cupy:  # only asarray is used by the launch code; the stand-in kernels take tensors directly
        @staticmethod
        def asarray(t):
            return t

    kernels = {name: RawKernel(name) for name in module._KERNEL_NAMES}

    def topk(scores, k, config):
        R, M = scores.shape
        kk = min(k, M)
        if R == 0 or kk in (0, M):  # the module answers these without a kernel
            return module.topk_mask(scores, k, config=config)
        module.check_config(config)
        out = torch.full((R, M), 2, dtype=torch.uint8)  # poison: unwritten bytes stay 2
        if config["SPAN"] == 0 or config["SPAN"] >= M:
            module._launch_rows(Cupy, kernels, scores, out, kk, config["THREADS"])
        else:
            module._launch_spans(Cupy, kernels, scores, out, kk, config["THREADS"], config["SPAN"])
        return out.view(torch.bool)

    return topk


EMULATED_CONFIGS = [{"THREADS": 64, "SPAN": 0}, {"THREADS": 64, "SPAN": 96}]


@pytest.mark.parametrize("config", EMULATED_CONFIGS, ids=str)
def test_cuda_source_emulated_cases(emulated_cuda, case, config):
    scores, k = case
    _assert_mask_ok(scores, k, emulated_cuda(scores, k, config))


@pytest.mark.parametrize("config", CUPY_CONFIGS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cuda_source_emulated_launch_shapes(emulated_cuda, config, shape):
    R, M, k, levels = shape
    scores = _random(R, M, 13 + M, levels=levels)
    scores[0, 3] = NAN
    scores[-1, 5] = -0.0
    scores[-1, 6] = INF
    _assert_mask_ok(scores, k, emulated_cuda(scores, k, config))


def test_cuda_source_emulated_non_contiguous(emulated_cuda):
    x = _random(29, 6, 12, levels=5).t()
    for config in EMULATED_CONFIGS:
        _assert_mask_ok(x, 9, emulated_cuda(x, 9, config))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(args=scores_and_k(max_rows=2, max_cols=150), config=st.sampled_from(CUPY_CONFIGS))
def test_cuda_source_emulated_properties(emulated_cuda, args, config):
    scores, k = args
    got = emulated_cuda(scores, k, config)
    check_properties(scores, k, got)
    assert torch.equal(got, naive_topk_mask(scores, k))
