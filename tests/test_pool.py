"""The ragged KV pool: compact_kv and ragged_append, reference vs naive float64 loops, every backend vs both.

Copies are exact, so pools are compared bit for bit, whole. The op contract leaves the slack rows of a
fresh pool unspecified, but both backends zero them (deterministic outputs), so the naive model does
too; Triton's pool allocations are poisoned with NaN, so any row that no program writes fails.
ragged_append starts from pools whose slack rows hold NaN, which catches rows written where they
should not be.
"""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvkernels
from kvkernels.reference import pool as ref_pool

BACKENDS = ["reference", "cpu", "triton"]
# The backend that actually runs compact_kv when one is requested (the cpu backend keeps the reference's).
COMPACT_RUNS_ON = {"cpu": "reference"}
DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and compiled kernels need a CUDA GPU")


# ---------------------------------------------------------------------------------------------------
# naive float64 models
def naive_compact(keys, values, keep, slack):
    """Loop over segments (l, b, h) in order; returns float64 pools (slack rows zero) and the layout."""
    L, B, H, N = keep.shape
    seg_start = torch.zeros(L, B, H, dtype=torch.int64)
    seg_len = torch.zeros(L, B, H, dtype=torch.int32)
    rows_k, rows_v, pos = [], [], 0
    for l in range(L):
        for b in range(B):
            for h in range(H):
                kept = [n for n in range(N) if keep[l, b, h, n]]
                seg_start[l, b, h] = pos
                seg_len[l, b, h] = len(kept)
                for n in kept:
                    rows_k.append(keys[l][b, h, n].double().cpu())
                    rows_v.append(values[l][b, h, n].double().cpu())
                zero_row = torch.zeros(keys[0].shape[-1], dtype=torch.float64)
                rows_k.extend([zero_row] * slack)
                rows_v.extend([zero_row] * slack)
                pos += len(kept) + slack
    D = keys[0].shape[-1]
    stack = lambda rows: torch.stack(rows) if rows else torch.zeros(0, D, dtype=torch.float64)  # noqa: E731
    return stack(rows_k), stack(rows_v), seg_start, seg_len, seg_len + slack


def naive_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new):
    """Returns (k_pool, v_pool, seg_len) after the append as float64 copies, or None on overflow."""
    B, H, t, _ = k_new.shape
    k, v, lens = k_pool.double().cpu().clone(), v_pool.double().cpu().clone(), seg_len.cpu().clone()
    for b in range(B):
        for h in range(H):
            if int(seg_cap[layer, b, h]) - int(seg_len[layer, b, h]) < t:
                return None
    for b in range(B):
        for h in range(H):
            row = int(seg_start[layer, b, h]) + int(seg_len[layer, b, h])
            for j in range(t):
                k[row + j] = k_new[b, h, j].double().cpu()
                v[row + j] = v_new[b, h, j].double().cpu()
            lens[layer, b, h] += t
    return k, v, lens


def live_rows(seg_start, seg_len, P):
    live = torch.zeros(P, dtype=torch.bool)
    for s, n in zip(seg_start.flatten().tolist(), seg_len.flatten().tolist()):
        live[s : s + n] = True
    return live


# ---------------------------------------------------------------------------------------------------
# inputs
def make_keep(L, B, H, N, kind):
    keep = torch.rand(L, B, H, N) < 0.45
    if kind == "empty_and_full":  # one empty segment, one full one, the rest random
        keep[0, 0, 0] = False
        keep[-1, -1, -1] = True
    elif kind == "none":
        keep[:] = False
    elif kind == "all":
        keep[:] = True
    return keep


def make_cache(L, B, H, N, D, dtype, device, layout="contiguous"):
    def one():
        if layout == "contiguous":
            return torch.randn(B, H, N, D).to(dtype).to(device)
        # a [B, N + 5, H, D] cache sliced to N tokens and viewed as [B, H, N, D]: strided, non-contiguous
        return torch.randn(B, N + 5, H, D).to(dtype).to(device)[:, :N].transpose(1, 2)

    return [one() for _ in range(L)], [one() for _ in range(L)]


def run_compact(backend, keys, values, keep, slack):
    with kvkernels.use_backend(backend):
        pool = kvkernels.compact_kv(keys, values, keep, int(keep.sum()), slack)
        assert kvkernels.last_choice() == ("compact_kv", COMPACT_RUNS_ON.get(backend, backend))
    return pool


# The cpu backend's append runs the compiled kernel (kvkernels/cpu/native) when it is built, called through the
# C++ bindings; "cpu-ctypes" calls it through ctypes (the bindings not built: no Python headers), "cpu-eager"
# runs with it forced off (the PyTorch path that runs without a C++ compiler).
APPEND_BACKENDS = BACKENDS + ["cpu-ctypes", "cpu-eager"]


def _native_forced(backend):
    from kvkernels.cpu import native

    if backend == "cpu-eager":
        return native.forced(False)
    if backend == "cpu-ctypes":
        if not native.compiler_available():
            pytest.skip("no C++ compiler to build the compiled kernels")
        return native.forced(True, checks=False)
    return contextlib.nullcontext()


def run_append(backend, pool, layer, k_new, v_new):
    forced = _native_forced(backend)
    backend = "cpu" if backend.startswith("cpu") else backend
    with kvkernels.use_backend(backend), forced:
        try:
            kvkernels.ragged_append(pool, layer, k_new, v_new)
        finally:
            assert kvkernels.last_choice() == ("ragged_append", backend)


@pytest.fixture
def poisoned(monkeypatch):
    """Triton's pool allocations start as NaN, so a live row that no program writes fails the test."""
    import kvkernels.triton.pool as mod

    def nan_empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mod, "_empty", nan_empty)


def assert_layout_equal(got, want):
    for name, g, w in zip(("seg_start", "seg_len", "seg_cap"), got, want):
        assert g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w), f"{name}: {g} != {w}"


def assert_pools_equal(pool, want):
    """Whole pools, bit for bit: live rows copied exactly, slack rows zero, nothing left unwritten (NaN)."""
    k_want, v_want = want[:2]
    assert pool.k_pool.shape == k_want.shape and pool.v_pool.shape == v_want.shape
    for got, exp in ((pool.k_pool, k_want), (pool.v_pool, v_want)):
        assert torch.equal(got.double().cpu(), exp)


# (L, B, H, N, D, slack, keep kind)
COMPACT_CASES = [
    (2, 1, 3, 9, 64, 4, "random"),
    (3, 2, 3, 70, 64, 0, "empty_and_full"),  # N = 70: two 64-token tiles, the second partial; no slack
    (1, 2, 2, 37, 128, 5, "empty_and_full"),
    (2, 1, 2, 21, 64, 3, "none"),  # nothing kept: the pool is slack only
    (2, 1, 1, 1, 64, 0, "none"),  # an empty pool
    (1, 1, 3, 33, 80, 2, "all"),  # D = 80 padded to 128
    (2, 3, 1, 16, 96, 1, "random"),
]
COMPACT_IDS = [f"L{c[0]}-B{c[1]}-H{c[2]}-N{c[3]}-D{c[4]}-slack{c[5]}-{c[6]}" for c in COMPACT_CASES]


# ---------------------------------------------------------------------------------------------------
# compact_kv
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", COMPACT_CASES, ids=COMPACT_IDS)
def test_reference_compact_matches_naive(case, dtype):
    L, B, H, N, D, slack, kind = case
    keys, values = make_cache(L, B, H, N, D, dtype, "cpu")
    keep = make_keep(L, B, H, N, kind)
    got = ref_pool.compact_kv(keys, values, keep, int(keep.sum()), slack)
    want = naive_compact(keys, values, keep, slack)
    assert_layout_equal(got[2:], want[2:])
    assert_pools_equal(kvkernels.Pool(*got), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", COMPACT_CASES, ids=COMPACT_IDS)
def test_compact_matches_naive(case, dtype, backend, device, poisoned):
    L, B, H, N, D, slack, kind = case
    keys, values = make_cache(L, B, H, N, D, dtype, device)
    keep = make_keep(L, B, H, N, kind).to(device)
    pool = run_compact(backend, keys, values, keep, slack)
    want = naive_compact(keys, values, keep.cpu(), slack)
    assert pool.k_pool.dtype == dtype and pool.k_pool.device == keep.device
    assert_layout_equal(pool[2:], want[2:])
    assert_pools_equal(pool, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_reads_strided_layers(backend, device, poisoned):
    """Layers as non-contiguous views of a [B, N', H, D] cache, and a non-contiguous keep mask."""
    L, B, H, N, D = 2, 2, 3, 29, 64
    keys, values = make_cache(L, B, H, N, D, torch.float32, device, layout="strided")
    assert not keys[0].is_contiguous()
    keep = (torch.rand(L, B, N, H) < 0.5).to(device).transpose(2, 3)
    pool = run_compact(backend, keys, values, keep, 2)
    want = naive_compact(keys, values, keep.cpu(), 2)
    assert_layout_equal(pool[2:], want[2:])
    assert_pools_equal(pool, want)


def test_compact_every_tunable_config(device, poisoned):
    from kvkernels.triton import pool as mod

    L, B, H, N, D, slack = 2, 1, 3, 75, 64, 2
    keys, values = make_cache(L, B, H, N, D, torch.float16, device)
    keep = make_keep(L, B, H, N, "empty_and_full").to(device)
    args = (keys, values, keep, int(keep.sum()), slack)
    want = naive_compact(keys, values, keep.cpu(), slack)
    spec = mod.TUNABLE["compact_kv"]
    assert spec["default"](*args) and isinstance(spec["key"](*args), str)
    for config in spec["space"]:
        pool = kvkernels.Pool(*mod.compact_kv(*args, config=config))
        assert_layout_equal(pool[2:], want[2:])
        assert_pools_equal(pool, want)


# ---------------------------------------------------------------------------------------------------
# ragged_append
def poisoned_pool(L, B, H, N, D, slack, dtype, device):
    """A compacted pool whose slack rows hold NaN, so the whole pool can be compared after appends."""
    keys, values = make_cache(L, B, H, N, D, dtype, device)
    keep = make_keep(L, B, H, N, "empty_and_full").to(device)
    k, v, seg_start, seg_len, seg_cap = ref_pool.compact_kv(keys, values, keep, int(keep.sum()), slack)
    live = live_rows(seg_start.cpu(), seg_len.cpu(), k.shape[0]).to(device)
    k[~live] = float("nan")
    v[~live] = float("nan")
    return kvkernels.Pool(k, v, seg_start, seg_len, seg_cap)


def assert_pool_equals(pool, want):
    k_want, v_want, len_want = want
    torch.testing.assert_close(pool.k_pool.double().cpu(), k_want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(pool.v_pool.double().cpu(), v_want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(pool.seg_len.cpu(), len_want)


def new_rows(B, H, t, D, dtype, device, strided=False):
    if strided:  # [B, t, H, D] viewed as [B, H, t, D]
        return torch.randn(B, t, H, D).to(dtype).to(device).transpose(1, 2)
    return torch.randn(B, H, t, D).to(dtype).to(device)


# (L, B, H, N, D, slack, sequence of (layer, t) appends); the last append of each fills segments exactly
APPEND_CASES = [
    (2, 1, 3, 12, 64, 4, [(1, 1), (0, 3), (1, 0), (1, 3)]),
    (1, 2, 3, 20, 128, 5, [(0, 2), (0, 2), (0, 1)]),
    (3, 2, 1, 9, 64, 40, [(2, 17), (0, 40)]),  # t = 17 and 40: partial 32-row step
    (2, 2, 2, 7, 80, 1, [(0, 1), (1, 1)]),
]
APPEND_IDS = [f"L{c[0]}-B{c[1]}-H{c[2]}-D{c[4]}-slack{c[5]}-" + "_".join(f"{l}x{t}" for l, t in c[6])
              for c in APPEND_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", APPEND_CASES, ids=APPEND_IDS)
def test_reference_append_matches_naive(case, dtype):
    L, B, H, N, D, slack, appends = case
    pool = poisoned_pool(L, B, H, N, D, slack, dtype, "cpu")
    for layer, t in appends:
        k_new, v_new = new_rows(B, H, t, D, dtype, "cpu"), new_rows(B, H, t, D, dtype, "cpu")
        want = naive_append(*pool, layer, k_new, v_new)
        ref_pool.ragged_append(*pool, layer, k_new, v_new)
        assert_pool_equals(pool, want)


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", APPEND_CASES, ids=APPEND_IDS)
def test_append_matches_naive(case, dtype, backend, device):
    L, B, H, N, D, slack, appends = case
    pool = poisoned_pool(L, B, H, N, D, slack, dtype, device)
    for i, (layer, t) in enumerate(appends):
        strided = i % 2 == 1
        k_new, v_new = new_rows(B, H, t, D, dtype, device, strided), new_rows(B, H, t, D, dtype, device, strided)
        want = naive_append(*pool, layer, k_new, v_new)
        run_append(backend, pool, layer, k_new, v_new)
        assert_pool_equals(pool, want)
    last = appends[-1][0]
    assert torch.equal(pool.seg_len[last], pool.seg_cap[last])  # the last append filled its layer exactly


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
def test_overflow_writes_nothing_and_raises(backend, device):
    """One segment of the layer lacks room: PoolOverflowError, and no segment of it is written."""
    pool = poisoned_pool(2, 2, 3, 15, 64, 3, torch.float32, device)
    run_append(backend, pool, 1, new_rows(2, 3, 1, 64, torch.float32, device),
               new_rows(2, 3, 1, 64, torch.float32, device))
    pool.seg_len[1, 1, 2] += 1  # this segment now has 1 free row, the others 2
    before = (pool.k_pool.clone(), pool.v_pool.clone(), pool.seg_len.clone())
    k_new, v_new = new_rows(2, 3, 2, 64, torch.float32, device), new_rows(2, 3, 2, 64, torch.float32, device)
    assert naive_append(*pool, 1, k_new, v_new) is None
    with pytest.raises(kvkernels.PoolOverflowError, match=r"layer 1 would overflow segment \(batch 1, head 2\)"):
        run_append(backend, pool, 1, k_new, v_new)
    for got, was in zip((pool.k_pool, pool.v_pool, pool.seg_len), before):
        torch.testing.assert_close(got, was, rtol=0, atol=0, equal_nan=True)
    # The same call one row shorter fits and writes every segment.
    want = naive_append(*pool, 1, k_new[:, :, :1], v_new[:, :, :1])
    run_append(backend, pool, 1, k_new[:, :, :1], v_new[:, :, :1])
    assert_pool_equals(pool, want)


def test_overflow_messages_match_the_reference(device):
    pool = poisoned_pool(1, 1, 2, 10, 64, 0, torch.float32, device)
    rows = new_rows(1, 2, 1, 64, torch.float32, device)
    messages = []
    for backend in BACKENDS:
        with pytest.raises(kvkernels.PoolOverflowError) as err:
            run_append(backend, pool, 0, rows, rows)
        messages.append(str(err.value))
    assert all(m == messages[0] for m in messages)


def test_deferred_mode_records_overflow_without_syncing(device, monkeypatch):
    from kvkernels.triton import pool as mod

    pool = poisoned_pool(2, 1, 3, 11, 64, 2, torch.float32, device)
    mod.check_overflow(device)  # allocates the status buffer; nothing pending
    big = new_rows(1, 3, 3, 64, torch.float32, device)
    one = new_rows(1, 3, 1, 64, torch.float32, device)
    before = (pool.k_pool.clone(), pool.seg_len.clone())

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in the deferred (graph-safe) path")

    with mod.deferred_overflow_checks(check_on_exit=False):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__int__", "cpu"):
                m.setattr(torch.Tensor, name, no_sync)
            run_append("triton", pool, 1, big, big)  # overflows: no raise, nothing written
            overflowed_k, overflowed_len = pool.k_pool.clone(), pool.seg_len.clone()
            run_append("triton", pool, 0, one, one)  # fits: written normally
    torch.testing.assert_close(overflowed_k, before[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(overflowed_len, before[1])
    assert torch.equal(pool.seg_len[0], before[1][0] + 1) and torch.equal(pool.seg_len[1], before[1][1])
    with pytest.raises(kvkernels.PoolOverflowError, match=r"1 deferred append\(s\).*layer 1, t = 3"):
        mod.check_overflow(device)
    mod.check_overflow(device)  # the record was cleared by the check that raised

    with pytest.raises(kvkernels.PoolOverflowError, match=r"2 deferred append\(s\).*layer 0, t = 3"):
        with mod.deferred_overflow_checks():  # checks on exit
            run_append("triton", pool, 0, big, big)
            run_append("triton", pool, 1, big, big)
    mod.check_overflow(device)


def test_append_every_tunable_config(device):
    from kvkernels.triton import pool as mod

    spec = mod.TUNABLE["ragged_append"]
    for config in spec["space"]:
        pool = poisoned_pool(1, 2, 3, 9, 64, 20, torch.float16, device)
        k_new, v_new = new_rows(2, 3, 19, 64, torch.float16, device), new_rows(2, 3, 19, 64, torch.float16, device)
        args = (*pool, 0, k_new, v_new)
        assert spec["default"](*args) and isinstance(spec["key"](*args), str)
        want = naive_append(*args)
        mod.ragged_append(*args, config=config)
        assert_pool_equals(pool, want)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    L=st.integers(1, 2),
    B=st.integers(1, 2),
    H=st.sampled_from([1, 3]),
    N=st.integers(1, 80),
    p=st.floats(0.0, 1.0),
    slack=st.integers(0, 4),
    ts=st.lists(st.integers(0, 3), min_size=1, max_size=3),
)
def test_hypothesis_triton_compact_then_append(device, poisoned, L, B, H, N, p, slack, ts):
    """Random keep masks, then appends until (maybe) overflow: triton and reference agree throughout."""
    D = 64
    keys, values = make_cache(L, B, H, N, D, torch.float16, device)
    keep = (torch.rand(L, B, H, N) < p).to(device)
    pools = {b: run_compact(b, keys, values, keep, slack) for b in BACKENDS}
    want = naive_compact(keys, values, keep.cpu(), slack)
    for pool in pools.values():
        assert_layout_equal(pool[2:], want[2:])
        assert_pools_equal(pool, want)
    for i, t in enumerate(ts):
        layer = i % L
        k_new, v_new = new_rows(B, H, t, D, torch.float16, device), new_rows(B, H, t, D, torch.float16, device)
        outcomes = []
        for backend, pool in pools.items():
            try:
                run_append(backend, pool, layer, k_new, v_new)
                outcomes.append("ok")
            except kvkernels.PoolOverflowError:
                outcomes.append("overflow")
        assert outcomes[0] == outcomes[1]
        for a, b in zip(pools["reference"], pools["triton"]):
            assert torch.equal(a, b)


@cuda_only
def test_bf16_on_cuda():
    pool = poisoned_pool(2, 2, 3, 30, 128, 3, torch.bfloat16, "cuda")
    k_new, v_new = new_rows(2, 3, 2, 128, torch.bfloat16, "cuda"), new_rows(2, 3, 2, 128, torch.bfloat16, "cuda")
    want = naive_append(*pool, 1, k_new, v_new)
    run_append("triton", pool, 1, k_new, v_new)
    assert_pool_equals(pool, want)
    keys, values = make_cache(2, 2, 3, 30, 128, torch.bfloat16, "cuda")
    keep = make_keep(2, 2, 3, 30, "empty_and_full").cuda()
    got = run_compact("triton", keys, values, keep, 3)
    want = naive_compact(keys, values, keep.cpu(), 3)
    assert_layout_equal(got[2:], want[2:])
    assert_pools_equal(got, want)


@cuda_only
def test_deferred_append_replays_in_a_cuda_graph():
    """Deferred mode captured in a CUDA graph: each replay appends; an overflowing replay writes nothing."""
    from kvkernels.triton import pool as mod

    device = torch.device("cuda")
    pool = poisoned_pool(2, 2, 3, 20, 64, 2, torch.float16, device)
    k_new, v_new = new_rows(2, 3, 1, 64, torch.float16, device), new_rows(2, 3, 1, 64, torch.float16, device)
    mod.check_overflow(device)  # allocates the status buffer before capture
    saved_len = pool.seg_len.clone()
    with mod.deferred_overflow_checks(check_on_exit=False):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph compiles the kernels
            run_append("triton", pool, 1, k_new, v_new)
        torch.cuda.current_stream().wait_stream(stream)
        pool.seg_len.copy_(saved_len)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_append("triton", pool, 1, k_new, v_new)
        pool.seg_len.copy_(saved_len)  # capture does not run the kernels, but be explicit
        for step in range(3):  # slack 2: the third replay overflows
            k_new.copy_(torch.randn_like(k_new))
            v_new.copy_(torch.randn_like(v_new))
            want = naive_append(*pool, 1, k_new, v_new)
            before = (pool.k_pool.clone(), pool.v_pool.clone(), pool.seg_len.clone())
            graph.replay()
            torch.cuda.synchronize()
            if step < 2:
                assert_pool_equals(pool, want)
            else:
                assert want is None
                assert_pool_equals(pool, tuple(t.double().cpu() if t.is_floating_point() else t.cpu()
                                               for t in before))
    with pytest.raises(kvkernels.PoolOverflowError, match=r"1 deferred append\(s\).*layer 1, t = 1"):
        mod.check_overflow(device)


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
def test_append_into_strided_pool_views(backend, device):
    """Review fix: the pools are mutated in place, so the Triton kernel must honour their channel stride.

    k_pool/v_pool are [P, D] views with channel stride 2 (every other column of a [P, 2D] buffer); the
    kernel used to assume stride 1, writing the wrong columns (and past the row for the last rows).
    """
    L, B, H, N, D, slack = 2, 2, 3, 12, 64, 4
    pool = poisoned_pool(L, B, H, N, D, slack, torch.float32, device)
    wide_k = torch.full((pool.k_pool.shape[0], 2 * D), 7.0, device=device)
    wide_v = torch.full_like(wide_k, 7.0)
    wide_k[:, ::2], wide_v[:, ::2] = pool.k_pool, pool.v_pool
    strided = kvkernels.Pool(wide_k[:, ::2], wide_v[:, ::2], pool.seg_start, pool.seg_len, pool.seg_cap)
    k_new, v_new = new_rows(B, H, 3, D, torch.float32, device), new_rows(B, H, 3, D, torch.float32, device)
    want = naive_append(*pool, 1, k_new, v_new)
    run_append(backend, strided, 1, k_new, v_new)
    assert_pool_equals(strided, want)
    assert (wide_k[:, 1::2] == 7.0).all() and (wide_v[:, 1::2] == 7.0).all()  # the other columns untouched


class _GridLog:
    """Stands in for a jitted kernel: records the launch grid, runs nothing."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, tuple(grid)))


def test_compact_grids_fit_cuda_axis_limits(monkeypatch):
    """Review fix: CUDA grid axes 1 and 2 are limited to 65535 programs. The compact kernels put the
    L*B*H segments (or B*H heads) on axis 1, so compacting e.g. 36 layers x batch 256 x 8 KV heads (73,728
    segments) failed to launch on a GPU; they now use 1-D grids. (The interpreter has no such limit,
    hence a launch-grid check.)"""
    import kvkernels.triton.pool as mod

    log = []
    for name in ("_count_tiles_kernel", "_zero_slack_kernel", "_gather_kernel"):
        monkeypatch.setattr(mod, name, _GridLog(name, log))
    L, B, H, N, D = 1, 128, 513, 3, 64  # 65,664 segments
    keys = [torch.zeros(B, H, N, D)]
    keep = torch.ones(L, B, H, N, dtype=torch.bool)
    mod.compact_kv(keys, keys, keep, L * B * H * N, 2)
    assert {name for name, _ in log} == {"_count_tiles_kernel", "_zero_slack_kernel", "_gather_kernel"}
    for name, grid in log:
        assert all(g <= 65535 for g in grid[1:]), f"{name}: grid {grid} exceeds 65535 on axis 1 or 2"


@pytest.mark.parametrize("checks", ["cxx", "python"])
def test_cpu_native_append_rejects_segments_outside_the_pool(checks):
    """A table whose segment reaches past the pool is an error, not a write past the end; nothing is written
    (the kernel called through the C++ bindings and through ctypes)."""
    from kvkernels.cpu import native

    if not native.compiler_available():
        pytest.skip("no C++ compiler to build the compiled kernels")
    pool = poisoned_pool(2, 1, 3, 12, 64, 4, torch.float32, "cpu")
    pool.seg_start[1, 0, 2] = pool.k_pool.shape[0] - 2  # room for 4 more rows by its seg_cap, 2 in the pool
    before = [t.clone() for t in pool]
    rows = new_rows(1, 3, 1, 64, torch.float32, "cpu")
    with native.forced(True, checks=checks == "cxx"), pytest.raises(RuntimeError, match="layer 1 lies outside"):
        run_append("cpu", pool, 1, rows, rows)
    for got, was in zip(pool, before):
        torch.testing.assert_close(got, was, rtol=0, atol=0, equal_nan=True)
