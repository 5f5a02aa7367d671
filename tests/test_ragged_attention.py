"""ragged_attention: the reference against a naive float64 loop, the Triton kernel against the reference
(under the interpreter on CPU, compiled on CUDA), against dense SDPA on an un-evicted cache, determinism,
the launch path's freedom from host syncs, and (CUDA only) bf16, compiled and CUDA-graph replay."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kvkernels
from kvkernels.reference.ragged_attention import ragged_attention as reference

triton = pytest.importorskip("triton")
from kvkernels.triton import ragged_attention as tri_mod  # noqa: E402  (needs TRITON_INTERPRET from conftest)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="compiled Triton (bf16, CUDA graphs) needs a CUDA GPU")

# Segment lengths [B, Hkv] that cover the edge cases: empty, single row, odd, exactly one interpreter
# chunk (64), one past it, several chunks; and a 1:100 skew across heads.
CASES = {
    "mixed": [[0, 1, 37], [64, 65, 129]],
    "skewed": [[2, 200], [150, 3]],
    "uniform": [[45, 45]],
    "short": [[1, 2, 5, 0]],
}


# ---------------------------------------------------------------------------------------------------
# Helpers


def naive_attention(q, k_pool, v_pool, seg_start, seg_len, sm_scale):
    """float64, one (batch, query head, query row) at a time: softmax over that row's visible keys."""
    B, Hq, Lq, D = q.shape
    G = Hq // seg_start.shape[1]
    o = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            start, n = int(seg_start[b, hq // G]), int(seg_len[b, hq // G])
            for i in range(Lq):
                visible = n - Lq + i + 1  # rows 0 .. n - Lq + i
                if visible <= 0:
                    continue
                keys = k_pool[start:start + visible].double().cpu()
                vals = v_pool[start:start + visible].double().cpu()
                logits = keys @ q[b, hq, i].double().cpu() * sm_scale
                top = logits.max()
                weights = torch.exp(logits - top)
                lse[b, hq, i] = top + torch.log(weights.sum())
                o[b, hq, i] = (weights / weights.sum()) @ vals
    return o, lse


def build_pool(lens, D, dtype, slack=3, lead=5, garbage=30.0, seed=0, device=DEVICE):
    """A pool holding segments of ``lens`` [B, Hkv] in shuffled order after ``lead`` foreign rows.

    Rows outside the live segments (lead rows, slack) hold ``garbage``: large finite values, so a kernel
    that reads them shifts the softmax visibly, while the reference (which multiplies them by 0) stays finite.
    """
    gen = torch.Generator().manual_seed(seed)
    seg_len = torch.tensor(lens, dtype=torch.int32)
    cap = (seg_len + slack).flatten()
    order = torch.randperm(cap.numel(), generator=gen)  # physical order of the segments
    starts_in_order = lead + torch.cumsum(cap[order], 0) - cap[order]
    seg_start = torch.empty_like(cap, dtype=torch.int64)
    seg_start[order] = starts_in_order
    P = lead + int(cap.sum())
    k_pool = torch.full((P, D), garbage)
    v_pool = torch.full((P, D), garbage)
    for s in range(cap.numel()):
        st, n = int(seg_start[s]), int(seg_len.flatten()[s])
        k_pool[st:st + n] = torch.randn(n, D, generator=gen)
        v_pool[st:st + n] = torch.randn(n, D, generator=gen)
    return (k_pool.to(dtype).to(device), v_pool.to(dtype).to(device),
            seg_start.view(seg_len.shape).to(device), seg_len.to(device))


def make_inputs(lens, G, Lq, D, dtype, device=DEVICE, seed=0):
    k_pool, v_pool, seg_start, seg_len = build_pool(lens, D, dtype, seed=seed, device=device)
    B, Hkv = seg_len.shape
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(B, Hkv * G, Lq, D, generator=gen).to(dtype).to(device)
    return q, k_pool, v_pool, seg_start, seg_len


TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def assert_lse_close(lse, expected, atol):
    lse, expected = lse.double().cpu(), expected.double().cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected)), "rows with no visible key differ"
    finite = torch.isfinite(expected)
    assert torch.isfinite(lse[finite]).all()
    torch.testing.assert_close(lse[finite], expected[finite], atol=atol, rtol=0)


def poison_empty(monkeypatch):
    """Make torch.empty return NaN-filled floats and huge ints, so unwritten outputs or workspace show up."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(2**30)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)


def run_backend(backend, *args, **kwargs):
    with kvkernels.use_backend(backend):
        out = torch.ops.kvkernels.ragged_attention(*args, **kwargs)
        assert kvkernels.last_choice() == ("ragged_attention", backend)
    return out


def run_triton(*args, **kwargs):
    return run_backend("triton", *args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Reference vs naive float64


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("G,Lq", [(1, 1), (3, 1), (4, 3)])
def test_reference_matches_naive(case, G, Lq):
    q, k_pool, v_pool, seg_start, seg_len = make_inputs(CASES[case], G, Lq, 64, torch.float32, device="cpu")
    o, lse = reference(q, k_pool, v_pool, seg_start, seg_len, 0.125, True)
    o_ref, lse_ref = naive_attention(q, k_pool, v_pool, seg_start, seg_len, 0.125)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5)
    assert_lse_close(lse, lse_ref, atol=1e-5)
    _, empty = reference(q, k_pool, v_pool, seg_start, seg_len, 0.125, False)
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_reference_fp16_matches_naive():
    q, k_pool, v_pool, seg_start, seg_len = make_inputs(CASES["skewed"], 3, 2, 128, torch.float16, device="cpu")
    o, lse = reference(q, k_pool, v_pool, seg_start, seg_len, 0.09, True)
    o_ref, lse_ref = naive_attention(q, k_pool, v_pool, seg_start, seg_len, 0.09)
    assert o.dtype == torch.float16
    torch.testing.assert_close(o.double(), o_ref, atol=1e-3, rtol=1e-3)
    assert_lse_close(lse, lse_ref, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Triton vs reference


TRITON_CASES = [
    # dtype, G, D, Lq, case, return_lse
    (torch.float32, 1, 64, 1, "mixed", True),
    (torch.float16, 1, 128, 3, "skewed", False),
    (torch.float32, 3, 64, 1, "skewed", True),
    (torch.float16, 3, 64, 4, "mixed", True),
    (torch.float16, 4, 128, 1, "mixed", True),
    (torch.float32, 4, 128, 2, "short", True),
    (torch.float16, 8, 64, 1, "skewed", True),
    (torch.float32, 8, 128, 3, "uniform", False),
    (torch.float16, 3, 96, 2, "mixed", True),  # D padded 96 -> 128
    (torch.float32, 1, 80, 1, "short", True),  # D padded 80 -> 128
    (torch.float16, 2, 256, 1, "uniform", True),
    (torch.float32, 8, 64, 5, "short", True),  # G*Lq = 40 rows: two M blocks of 32
]


@pytest.mark.parametrize("dtype,G,D,Lq,case,return_lse", TRITON_CASES,
                         ids=[f"{str(c[0])[6:]}-G{c[1]}-D{c[2]}-Lq{c[3]}-{c[4]}-lse{int(c[5])}" for c in TRITON_CASES])
def test_triton_matches_reference(monkeypatch, dtype, G, D, Lq, case, return_lse):
    args = make_inputs(CASES[case], G, Lq, D, dtype)
    scale = 1.0 / math.sqrt(D)
    o_ref, lse_ref = reference(*args, scale, True)
    poison_empty(monkeypatch)
    o, lse = run_triton(*args, scale, return_lse)
    monkeypatch.undo()
    assert o.dtype == dtype and o.shape == args[0].shape
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, **TOL[dtype])
    if return_lse:
        assert lse.dtype == torch.float32 and lse.shape == args[0].shape[:3]
        assert_lse_close(lse, lse_ref, atol=1e-4)
    else:
        assert lse.shape == (0,) and lse.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# The cpu backend vs the reference (every dtype, bf16 included: it runs natively, not interpreted)

CPU_CASES = [c for c in TRITON_CASES] + [
    (torch.bfloat16, 3, 64, 1, "skewed", True),
    (torch.bfloat16, 4, 128, 3, "mixed", True),
    (torch.bfloat16, 1, 64, 2, "short", False),
    (torch.float32, 3, 64, 1, "uniform", True),  # one batched call over evenly spaced equal segments
    (torch.float16, 4, 64, 3, "uniform", True),
]


@pytest.mark.parametrize("dtype,G,D,Lq,case,return_lse", CPU_CASES,
                         ids=[f"{str(c[0])[6:]}-G{c[1]}-D{c[2]}-Lq{c[3]}-{c[4]}-lse{int(c[5])}" for c in CPU_CASES])
def test_cpu_matches_reference(monkeypatch, dtype, G, D, Lq, case, return_lse):
    args = make_inputs(CASES[case], G, Lq, D, dtype, device="cpu")
    scale = 1.0 / math.sqrt(D)
    o_ref, lse_ref = reference(*args, scale, True)
    poison_empty(monkeypatch)
    o, lse = run_backend("cpu", *args, scale, return_lse)
    monkeypatch.undo()
    assert o.dtype == dtype and o.shape == args[0].shape and o.is_contiguous()
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, **TOL[dtype])
    if return_lse:
        assert lse.dtype == torch.float32 and lse.shape == args[0].shape[:3]
        assert_lse_close(lse, lse_ref, atol=1e-4 if dtype == torch.float32 else 1e-3)
    else:
        assert lse.shape == (0,) and lse.dtype == torch.float32


def test_cpu_batches_evenly_spaced_segments_without_copies(monkeypatch):
    """A pool of equal segments at even spacing (an un-evicted cache) is one fused call over a view
    (question prefill, Lq > 1; fp32 decode takes its own paths, tested below)."""
    from kvkernels.cpu import ragged_attention as cpu_mod

    calls = []
    real = cpu_mod._flash
    monkeypatch.setattr(cpu_mod, "_flash", lambda q, k, v, **kw: calls.append(k.shape) or real(q, k, v, **kw))
    args = make_inputs([[40, 40, 40], [40, 40, 40]], 3, 2, 64, torch.float32, device="cpu")
    seg_start = torch.arange(6, dtype=torch.int64).view(2, 3) * 43 + 5  # even spacing, slack 3
    k_pool, v_pool = args[1], args[2]
    k_pool[:5 + 6 * 43] = torch.randn(5 + 6 * 43, 64)
    got = run_backend("cpu", args[0], k_pool, v_pool, seg_start, args[4], 0.125, True)
    assert calls == [torch.Size([6, 1, 40, 64])]
    want = reference(args[0], k_pool, v_pool, seg_start, args[4], 0.125, True)
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])


@pytest.mark.parametrize("return_lse", [False, True])
def test_cpu_fp32_decode_never_calls_the_fused_kernel(monkeypatch, return_lse):
    """fp32 Lq = 1 never calls the fused kernel; empty segments give o = 0, lse = -inf; GQA 3, ragged lengths."""
    from kvkernels.cpu import ragged_attention as cpu_mod

    monkeypatch.setattr(cpu_mod, "_flash", lambda *a, **kw: pytest.fail("fp32 decode called the fused kernel"))
    args = make_inputs([[37, 0, 129], [1, 64, 5]], 3, 1, 64, torch.float32, device="cpu")
    got = run_backend("cpu", *args, 0.125, return_lse)
    want = reference(*args, 0.125, return_lse)
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    if return_lse:
        torch.testing.assert_close(got[1], want[1], **TOL[torch.float32])
        assert torch.isneginf(got[1][0, 3:6]).all() and (got[0][0, 3:6] == 0).all()


def native_modes():
    """The cpu backend's three fp32 decode paths: the compiled kernel called through the C++ bindings, the same
    kernel through ctypes (the bindings not built), and eager PyTorch (no compiler)."""
    from kvkernels.cpu import native

    no_compiler = pytest.mark.skipif(not native.compiler_available(), reason="no C++ compiler to build the kernels")
    return [pytest.param("native", marks=no_compiler), pytest.param("ctypes", marks=no_compiler), "eager"]


def native_path(mode):
    from kvkernels.cpu import native

    return native.forced(mode != "eager", checks=mode == "native")


@pytest.mark.parametrize("native_on", native_modes())
@pytest.mark.parametrize("G,D", [(1, 64), (3, 64), (4, 128), (3, 80), (2, 96), (9, 256)])
def test_cpu_fp32_decode_paths_match_reference(monkeypatch, native_on, G, D):
    """Both fp32 decode paths against the reference: ragged lengths across the compiled kernel's 256-row
    chunks (1, 255, 256, 257, 600 rows; empty segments), every head dim, GQA 1-9, outputs poisoned, and
    NaN in every pool row outside the live segments (a stray read shows)."""
    from kvkernels.cpu import native

    q, k_pool, v_pool, seg_start, seg_len = make_inputs([[0, 600, 1], [257, 255, 256]], G, 1, D, torch.float32,
                                                        device="cpu")
    want = reference(q, k_pool, v_pool, seg_start, seg_len, 0.125, True)
    owned = torch.zeros(k_pool.shape[0], dtype=torch.bool)
    for st, n in zip(seg_start.flatten().tolist(), seg_len.flatten().tolist()):
        owned[st:st + n] = True
    k_pool[~owned] = float("nan")
    v_pool[~owned] = float("nan")
    with native_path(native_on):
        poison_empty(monkeypatch)
        o, lse = run_backend("cpu", q, k_pool, v_pool, seg_start, seg_len, 0.125, True)
        o_only, no_lse = run_backend("cpu", q, k_pool, v_pool, seg_start, seg_len, 0.125, False)
        monkeypatch.undo()
    torch.testing.assert_close(o, want[0], **TOL[torch.float32])
    assert_lse_close(lse, want[1], atol=2e-5)
    assert (o[0, :G] == 0).all() and torch.isneginf(lse[0, :G]).all()  # the empty segment
    torch.testing.assert_close(o_only, want[0], **TOL[torch.float32])
    assert no_lse.shape == (0,)


def test_cpu_native_decode_rejects_segments_outside_the_pool():
    """A table pointing past the pool is an error naming the segment, not an out-of-bounds read."""
    from kvkernels.cpu import native

    if not native.compiler_available():
        pytest.skip("no C++ compiler to build the compiled kernels")
    q, k_pool, v_pool, seg_start, seg_len = make_inputs([[3, 40]], 3, 1, 64, torch.float32, device="cpu")
    seg_start[0, 1] = k_pool.shape[0] - 10
    with native.forced(True), pytest.raises(RuntimeError, match="segment 1 .* outside the pool"):
        run_backend("cpu", q, k_pool, v_pool, seg_start, seg_len, 0.125, False)


def test_opcheck_on_cpu_backend():
    args = make_inputs([[3, 40]], 3, 2, 64, torch.float32, device="cpu")
    with kvkernels.use_backend("cpu"):
        torch.library.opcheck(torch.ops.kvkernels.ragged_attention.default, (*args, None, True))


def test_compiled_cpu_backend_matches_eager():
    args = make_inputs(CASES["mixed"], 3, 1, 64, torch.float32, device="cpu")
    with kvkernels.use_backend("cpu"):
        eager = kvkernels.ragged_attention(*args, return_lse=True)
        compiled = torch.compile(lambda *a: kvkernels.ragged_attention(*a, return_lse=True), fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_empty_visibility_gives_zero_and_neg_inf(backend):
    # seg_len < Lq: the first queries see nothing; an empty segment sees nothing at all.
    q, k_pool, v_pool, seg_start, seg_len = make_inputs([[0, 2]], 2, 4, 64, torch.float32)
    o, lse = run_backend(backend, q, k_pool, v_pool, seg_start, seg_len, 0.125, True)
    assert (o[0, :2] == 0).all() and torch.isneginf(lse[0, :2]).all()  # KV head 0: empty
    assert (o[0, 2:, :2] == 0).all() and torch.isneginf(lse[0, 2:, :2]).all()  # rows 0, 1 see no row
    torch.testing.assert_close(o[0, 2:, 2], v_pool[seg_start[0, 1]].expand(2, -1))  # row 2 sees row 0 only
    torch.testing.assert_close(lse[0, 2:, 2], (q[0, 2:, 2] @ k_pool[seg_start[0, 1]]) * 0.125)
    assert torch.isfinite(lse[0, 2:, 3]).all() and torch.isfinite(o[0, 2:, 3]).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_empty_pool(backend):
    q = torch.randn(2, 4, 1, 64, device=DEVICE)
    k_pool = torch.empty(0, 64, device=DEVICE)
    seg_start = torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)
    seg_len = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    o, lse = run_backend(backend, q, k_pool, k_pool.clone(), seg_start, seg_len, 0.125, True)
    assert (o == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_strided_query_and_pool(backend):
    q, k_pool, v_pool, seg_start, seg_len = make_inputs(CASES["mixed"], 3, 2, 64, torch.float32)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, Lq, D] view with Lq-major storage
    wide = torch.randn(k_pool.shape[0], 2 * 64, device=DEVICE)
    wide[:, ::2] = k_pool  # k_pool as a view with channel stride 2
    o_ref, lse_ref = reference(q, k_pool, v_pool, seg_start, seg_len, 0.125, True)
    o, lse = run_backend(backend, q_t, wide[:, ::2], v_pool, seg_start, seg_len, 0.125, True)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float32])
    assert_lse_close(lse, lse_ref, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_stray_reads_outside_segments(backend):
    # NaN in every row that no segment owns (slack, foreign rows): one stray read would show as NaN.
    q, k_pool, v_pool, seg_start, seg_len = make_inputs(CASES["mixed"], 4, 3, 64, torch.float16)
    o_clean, _ = reference(q, k_pool, v_pool, seg_start, seg_len, 0.125, True)
    owned = torch.zeros(k_pool.shape[0], dtype=torch.bool, device=k_pool.device)
    for s, n in zip(seg_start.flatten().tolist(), seg_len.flatten().tolist()):
        owned[s:s + n] = True
    k_pool[~owned] = float("nan")
    v_pool[~owned] = float("nan")
    o_ref, _ = reference(q, k_pool, v_pool, seg_start, seg_len, 0.125, True)
    torch.testing.assert_close(o_ref, o_clean, atol=0, rtol=0)  # the reference ignores those rows too
    o, _ = run_backend(backend, q, k_pool, v_pool, seg_start, seg_len, 0.125, True)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float16])


def test_loaded_loop_bounds_path():
    """The GPU loop structure (bounds read from seg_len) under the interpreter of this Triton."""
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9) and not CUDA:
        pytest.skip("interpreted loops with loaded bounds break on Triton < 3.9 with numpy >= 2.4")
    args = make_inputs(CASES["skewed"], 3, 2, 64, torch.float32)
    o_ref, lse_ref = reference(*args, 0.125, True)
    for dynamic in (True, False):
        tri_mod.DYNAMIC_LOOPS = dynamic
        try:
            o, lse = run_triton(*args, 0.125, True)
        finally:
            tri_mod.DYNAMIC_LOOPS = None
        torch.testing.assert_close(o, o_ref, **TOL[torch.float32])
        assert_lse_close(lse, lse_ref, atol=1e-4)


def test_every_tunable_config_runs_and_first_is_interpreter_safe():
    spec = tri_mod.TUNABLE["ragged_attention"]
    args = make_inputs([[3, 70]], 2, 1, 64, torch.float16)
    key = spec["key"](*args, 0.125, True)
    assert isinstance(key, str) and "70" not in key  # lengths are bucketed, never raw
    assert isinstance(spec["default"](*args, 0.125, True), dict)
    o_ref, _ = reference(*args, 0.125, True)
    configs = spec["space"] if CUDA else spec["space"][:1]
    for cfg in configs:
        o, _ = tri_mod.ragged_attention(*args, 0.125, True, config=cfg)
        torch.testing.assert_close(o, o_ref, **TOL[torch.float16])


def test_workspace_cap_grows_the_chunk(monkeypatch):
    args = make_inputs(CASES["skewed"], 4, 3, 64, torch.float32)
    cfg = tri_mod._pick_config(args + (0.125, True), None)
    rows, S, P = 12, 4, args[1].shape[0]
    assert tri_mod._chunk_rows(cfg, S, P, rows, 64) == cfg["CHUNK"]  # test shapes fit the default cap
    monkeypatch.setattr(tri_mod, "_WORKSPACE_BYTES", (S + 2) * rows * 65 * 4)  # room for about 2 chunks
    chunk = tri_mod._chunk_rows(cfg, S, P, rows, 64)
    assert chunk >= P // 2 and (S + triton.cdiv(P, chunk)) * rows * 65 * 4 <= tri_mod._WORKSPACE_BYTES
    o_ref, lse_ref = reference(*args, 0.125, True)
    o, lse = run_triton(*args, 0.125, True)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float32])
    assert_lse_close(lse, lse_ref, atol=1e-4)


def test_opcheck_on_triton_backend():
    args = make_inputs([[3, 40]], 3, 2, 64, torch.float32)
    with kvkernels.use_backend("triton"):
        torch.library.opcheck(torch.ops.kvkernels.ragged_attention.default, (*args, None, True))


def test_bad_config_is_rejected():
    args = make_inputs([[3]], 1, 1, 64, torch.float32)
    with pytest.raises(ValueError, match="CHUNK"):
        tri_mod.ragged_attention(*args, 0.125, True, config={"CHUNK": 48, "BLOCK_N": 32})


# ---------------------------------------------------------------------------------------------------
# Dense SDPA on an un-evicted cache laid out as a pool


@pytest.mark.parametrize("G,Lq,dtype", [(3, 1, torch.float32), (4, 3, torch.float16)])
def test_matches_sdpa_on_uncompressed_pool(G, Lq, dtype):
    L, B, Hkv, N, D = 2, 2, 2, 77, 64
    keys = [torch.randn(B, Hkv, N, D, device=DEVICE, dtype=dtype) for _ in range(L)]
    values = [torch.randn(B, Hkv, N, D, device=DEVICE, dtype=dtype) for _ in range(L)]
    keep = torch.ones(L, B, Hkv, N, dtype=torch.bool, device=DEVICE)
    with kvkernels.use_backend("reference"):
        pool = kvkernels.compact_kv(keys, values, keep, L * B * Hkv * N, slack=2)
    q = torch.randn(B, Hkv * G, Lq, D, device=DEVICE, dtype=dtype)
    layer = 1  # the second layer: its segments start mid-pool
    # Dense attention in fp32; query i is the (Lq - i)-th last token, so it sees keys 0 .. N - Lq + i.
    k = keys[layer].float().repeat_interleave(G, dim=1)
    v = values[layer].float().repeat_interleave(G, dim=1)
    allowed = torch.arange(N, device=DEVICE)[None, :] <= (N - Lq + torch.arange(Lq, device=DEVICE))[:, None]
    dense = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=allowed)
    o = run_triton(q, pool.k_pool, pool.v_pool, pool.seg_start[layer], pool.seg_len[layer], None, False)[0]
    torch.testing.assert_close(o.float(), dense, **TOL[dtype])


# ---------------------------------------------------------------------------------------------------
# Determinism and the launch path


def test_deterministic_mode_is_bit_identical(monkeypatch):
    args = make_inputs(CASES["skewed"], 4, 2, 64, torch.float16)
    monkeypatch.setenv("KVKERNELS_DETERMINISTIC", "1")
    assert tri_mod.deterministic_mode()
    # A tuned table must not change the result in deterministic mode.
    monkeypatch.setattr(tri_mod.tuning, "lookup", lambda *a, **k: {"CHUNK": 32, "BLOCK_N": 16})
    first = run_triton(*args, 0.125, True)
    # Nor may the number of persistent programs (which program runs which item).
    monkeypatch.setattr(tri_mod, "_INTERPRETER_PROGRAMS", 5)
    second = run_triton(*args, 0.125, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # The tuned config is used outside deterministic mode (so the check above was not vacuous).
    monkeypatch.setenv("KVKERNELS_DETERMINISTIC", "0")
    tuned = tri_mod._pick_config(args + (0.125, True), None)
    assert tuned["CHUNK"] == 32


class _FakeLaunch:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((grid, args, kwargs))


def test_launch_path_reads_no_device_data(monkeypatch):
    """The host wrapper must not read seg_len (no .item()/int()/tolist()): grids and scalars come from shapes."""
    log = []
    monkeypatch.setattr(tri_mod, "_ragged_chunks_kernel", _FakeLaunch(log))
    monkeypatch.setattr(tri_mod, "_merge_kernel", _FakeLaunch(log))

    def forbidden(self, *a, **k):
        raise AssertionError("host read of tensor data in the launch path")

    q, k_pool, v_pool, seg_start, seg_len = make_inputs([[3, 70]], 2, 1, 64, torch.float16)
    other_len = torch.tensor([[70, 1]], dtype=torch.int32, device=DEVICE)  # same shapes, other lengths
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for lens in (seg_len, other_len):
        tri_mod.ragged_attention(q, k_pool, v_pool, seg_start, lens, 0.125, True)
    monkeypatch.undo()

    def scalars(entry):
        grid, args, kwargs = entry
        return grid, [a for a in args if not isinstance(a, torch.Tensor)], kwargs

    assert len(log) == 4
    assert scalars(log[0]) == scalars(log[2]) and scalars(log[1]) == scalars(log[3])


# ---------------------------------------------------------------------------------------------------
# CUDA only: compiled, bf16, CUDA graphs


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,Lq,D", [(4, 1, 128), (3, 4, 64), (8, 1, 256)])
def test_compiled_matches_reference_cuda(dtype, G, Lq, D):
    lens = [[5, 3000, 17, 0], [999, 1, 2048, 64]]
    args = make_inputs(lens, G, Lq, D, dtype)
    o_ref, lse_ref = reference(*args, D ** -0.5, True)
    o, lse = run_triton(*args, D ** -0.5, True)
    torch.testing.assert_close(o, o_ref, **TOL[dtype])
    assert_lse_close(lse, lse_ref, atol=2e-3)


@needs_cuda
def test_no_sync_and_cuda_graph_replay_with_growing_lengths():
    B, Hkv, G, D, cap = 2, 2, 4, 128, 600
    lens = [[5, 400], [250, 0]]
    k_pool, v_pool, seg_start, seg_len = build_pool(lens, D, torch.float16, slack=cap)
    q = torch.randn(B, Hkv * G, 1, D, device=DEVICE, dtype=torch.float16)
    with kvkernels.use_backend("triton"):
        run = lambda: torch.ops.kvkernels.ragged_attention(q, k_pool, v_pool, seg_start, seg_len, None, True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # compile outside the capture
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
    growth = [[1, 150], [7, 3]]
    for step in range(3):
        for b in range(B):  # fresh rows where the segments grow (outside the graph: host indexing is fine)
            for h in range(Hkv):
                st, n, t = int(seg_start[b, h]), int(seg_len[b, h]), growth[b][h]
                k_pool[st + n:st + n + t] = torch.randn(t, D, device=DEVICE, dtype=k_pool.dtype)
                v_pool[st + n:st + n + t] = torch.randn(t, D, device=DEVICE, dtype=v_pool.dtype)
        seg_len += torch.tensor(growth, dtype=torch.int32, device=DEVICE)  # grow in place
        new_q = torch.randn_like(q)
        q.copy_(new_q)
        graph.replay()
        o_ref, lse_ref = reference(q, k_pool, v_pool, seg_start, seg_len, D ** -0.5, True)
        torch.testing.assert_close(out[0], o_ref, **TOL[torch.float16])
        assert_lse_close(out[1], lse_ref, atol=2e-3)


def test_overlapping_segments_never_write_past_the_workspace(monkeypatch):
    """Review fix: with the disjointness precondition violated (both heads share all P rows of the pool),
    the live items (2 * cdiv(P, CHUNK)) exceed the workspace bound (S + cdiv(P, CHUNK)). Items past the
    bound must be dropped, not written past the end of the workspace (memory corruption on a GPU)."""
    D, G = 64, 2
    chunk = tri_mod._INTERPRETER_DEFAULT["CHUNK"] if not CUDA else tri_mod._GPU_DEFAULT["CHUNK"]
    P = 2 * chunk + 2  # 3 chunks per segment: 6 live items, bound = 2 + 3 = 5
    k_pool = torch.randn(P, D, device=DEVICE)
    v_pool = torch.randn(P, D, device=DEVICE)
    seg_start = torch.zeros(1, 2, dtype=torch.int64, device=DEVICE)
    seg_len = torch.full((1, 2), P, dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 2 * G, 1, D, device=DEVICE)
    bound = 2 + triton.cdiv(P, chunk)
    sentinel, guard = 12345.0, 4
    real_empty, tails = torch.empty, []

    def guarded_empty(*shape, **kwargs):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if kwargs.get("dtype") == torch.float32 and shape and shape[0] == bound and len(shape) in (2, 3):
            # The partials workspace: hand out the front of a larger buffer whose tail must stay intact.
            big = real_empty((bound + guard,) + shape[1:], **kwargs).fill_(sentinel)
            tails.append(big[bound:])
            return big[:bound]
        return real_empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", guarded_empty)
    o, _ = tri_mod.ragged_attention(q, k_pool, v_pool, seg_start, seg_len, 0.125, True)
    monkeypatch.undo()
    assert len(tails) == 2  # ws_o and ws_lse were both intercepted
    for tail in tails:
        assert (tail == sentinel).all(), "a work item wrote past the end of the partials workspace"
    o_ref, _ = reference(q, k_pool, v_pool, seg_start, seg_len, 0.125, True)
    torch.testing.assert_close(o[:, :G], o_ref[:, :G], **TOL[torch.float32])  # head 0's items fit the bound


# KVzip's reconstruction attention on CPU. "compiled" is the fp32 kernel (kvkernels/cpu/csrc/attention.cpp),
# "eager" the PyTorch path (without a C++ compiler, and for every other dtype); bf16 runs the eager path only.
RECONSTRUCTION_PATHS = [(torch.float32, "compiled"), (torch.float32, "eager"), (torch.bfloat16, "eager")]


def reconstruction_path(path):
    from kvkernels.cpu import native

    return native.forced(path == "compiled")


@pytest.mark.parametrize("dtype, path", RECONSTRUCTION_PATHS, ids=["fp32-compiled", "fp32-eager", "bf16"])
@pytest.mark.parametrize("Hkv, G, D, N, Lq", [(3, 3, 64, 37, 21), (2, 4, 128, 37, 21), (1, 1, 80, 5, 1),
                                              (2, 2, 96, 100, 70), (1, 3, 256, 60, 3), (1, 2, 48, 9, 4)],
                         ids=["G3-D64", "G4-D128", "D80-one-row", "D96-many-blocks", "D256", "D48-no-kernel"])
def test_context_then_causal_self_matches_masked_sdpa(dtype, path, Hkv, G, D, N, Lq):
    """Every context row visible, self rows causal; equal to SDPA with the dense mask (odd sizes, row and key
    counts across the compiled kernel's tiles; the query is strided as transformers passes it)."""
    from kvkernels.cpu.ragged_attention import context_then_causal_self

    gen = torch.Generator().manual_seed(3)
    B = 1
    q = torch.randn(B, Lq, Hkv * G, D, generator=gen).to(dtype).transpose(1, 2)
    k, v = (torch.randn(B, Hkv, N + Lq, D, generator=gen).to(dtype) for _ in range(2))
    mask = torch.ones(Lq, N + Lq, dtype=torch.bool)
    mask[:, N:] = torch.ones(Lq, Lq, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                            enable_gqa=True, scale=0.1)
    with reconstruction_path(path):
        got = context_then_causal_self(q, k, v, N, 0.1)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype, path", RECONSTRUCTION_PATHS, ids=["fp32-compiled", "fp32-eager", "bf16"])
@pytest.mark.parametrize("sink, start, end", [(4, 4, 37), (4, 4, 20), (3, 11, 30), (2, 9, 37), (0, 0, 37)],
                         ids=["one-chunk", "first-of-two", "middle", "last", "no-sink"])
def test_context_then_causal_self_scored_lse(dtype, path, sink, start, end):
    """With ``scored``, the same output as without, plus each row's LSE over [sink; chunk; self 0..i]: the
    normaliser kvzip_score takes as row_lse (checked against logsumexp of the masked logits)."""
    from kvkernels.cpu.ragged_attention import context_then_causal_self

    gen = torch.Generator().manual_seed(5)
    B, Hkv, G, N, Lq, D = 1, 3, 3, 37, 21, 64
    q = torch.randn(B, Lq, Hkv * G, D, generator=gen).to(dtype).transpose(1, 2)
    k, v = (torch.randn(B, Hkv, N + Lq, D, generator=gen).to(dtype) for _ in range(2))
    with reconstruction_path(path):
        o, row_lse = context_then_causal_self(q, k, v, N, 0.1, scored=(sink, start, end))
        torch.testing.assert_close(o, context_then_causal_self(q, k, v, N, 0.1), **TOL[dtype])
    seen = torch.zeros(Lq, N + Lq, dtype=torch.bool)
    seen[:, :sink] = seen[:, start:end] = True
    seen[:, N:] = torch.ones(Lq, Lq, dtype=torch.bool).tril()
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double().repeat_interleave(G, dim=1)) * 0.1
    want = torch.logsumexp(logits.masked_fill(~seen, float("-inf")), dim=-1)
    assert row_lse.dtype == torch.float32 and row_lse.shape == (B, Hkv * G, Lq)
    torch.testing.assert_close(row_lse.double(), want, rtol=1e-5, atol=1e-5)
