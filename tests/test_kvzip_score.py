"""kvzip_score: the reference against a naive float64 loop, and every backend against both.

The Triton kernels run under the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes stay small; chunk lengths and row counts are chosen not to be multiples of the tiles.
"""

import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvkernels
from kvkernels.reference.kvzip_score import kvzip_score as reference_kvzip_score

# The cpu backend's max pass runs the compiled kernel (kvkernels/cpu/csrc/kvzip_score.cpp) when it is built;
# "cpu-eager" is the same backend with it forced off (the PyTorch path that runs without a C++ compiler).
BACKENDS = ["reference", "cpu", "cpu-eager", "triton"]
# Inputs are exactly representable in fp32 and every backend computes in fp32: tolerances are fp32's.
TOL = {torch.float32: dict(rtol=1e-4, atol=2e-6), torch.float16: dict(rtol=1e-4, atol=2e-6),
       torch.bfloat16: dict(rtol=1e-4, atol=2e-6)}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and compiled kernels need a CUDA GPU")


def naive_row_logits(q, k, k_self, sink_len, chunk_start, chunk_end, sm_scale):
    """Yield (b, h, hk, i, logits) in float64: row i of query head h over [sink; chunk; self 0..i]."""
    B, Hq, Lq, D = q.shape
    G = Hq // k.shape[1]
    q64, k64, s64 = q.double().cpu(), k.double().cpu(), k_self.double().cpu()
    for b in range(B):
        for h in range(Hq):
            hk = h // G
            for i in range(Lq):
                keys = torch.cat([k64[b, hk, :sink_len], k64[b, hk, chunk_start:chunk_end], s64[b, hk, : i + 1]])
                yield b, h, hk, i, keys @ q64[b, h, i] * sm_scale


def naive_row_lse(q, k, k_self, sink_len, chunk_start, chunk_end, sm_scale):
    """float64 [B, Hq, Lq]: each row's log-sum-exp over the keys it sees."""
    lse = torch.zeros(q.shape[:3], dtype=torch.float64)
    for b, h, _, i, logits in naive_row_logits(q, k, k_self, sink_len, chunk_start, chunk_end, sm_scale):
        lse[b, h, i] = torch.logsumexp(logits, 0)
    return lse


def naive_kvzip_score(q, k, k_self, sink_len, chunk_start, chunk_end, sm_scale, row_lse=None):
    """Explicit loops in float64: row i of query head h softmaxes over [sink; chunk; self 0..i] (normalised
    by ``row_lse`` instead when it is given)."""
    B, Hkv, m = q.shape[0], k.shape[1], chunk_end - chunk_start
    out = torch.zeros(B, Hkv, m, dtype=torch.float64)
    for b, h, hk, i, logits in naive_row_logits(q, k, k_self, sink_len, chunk_start, chunk_end, sm_scale):
        if row_lse is None:
            p = torch.exp(logits - logits.max())
            p = p / p.sum()
        else:
            p = torch.exp(logits - row_lse[b, h, i].double().cpu())
        out[b, hk] = torch.maximum(out[b, hk], p[sink_len : sink_len + m])
    return out


def make_inputs(B, Hq, Hkv, Lq, D, N, dtype, device, q_mult=1.0):
    q = (torch.randn(B, Hq, Lq, D) * q_mult).to(dtype).to(device)
    k = torch.randn(B, Hkv, N, D).to(dtype).to(device)
    k_self = torch.randn(B, Hkv, Lq, D).to(dtype).to(device)
    return q, k, k_self


# (B, Hq, Hkv, Lq, D, N, sink_len, chunk_start, chunk_end)
CASES = [
    (1, 2, 2, 5, 64, 50, 0, 0, 37),  # G = 1, no sink, chunk from 0
    (2, 9, 3, 7, 64, 70, 4, 10, 53),  # G = 3 (SmolLM2), B = 2, gap between sink and chunk
    (1, 8, 2, 3, 128, 40, 3, 3, 40),  # G = 4, D = 128, chunk reaches the end of k
    (1, 4, 1, 1, 64, 30, 5, 5, 6),  # one query row, one chunk key
    (1, 3, 1, 17, 80, 33, 2, 9, 30),  # D = 80 padded to 128, Lq > the 16-row tile
    (2, 4, 1, 2, 96, 24, 1, 1, 24),  # D = 96, G = 4
]
CASE_IDS = [f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-Lq{c[3]}-D{c[4]}-sink{c[6]}-chunk{c[7]}:{c[8]}" for c in CASES]


def run_op(backend, *args, **kwargs):
    from kvkernels.cpu import native

    eager = backend == "cpu-eager"
    backend = "cpu" if eager else backend
    with kvkernels.use_backend(backend), native.forced(False) if eager else contextlib.nullcontext():
        out = kvkernels.kvzip_score(*args, **kwargs)
        assert kvkernels.last_choice() == ("kvzip_score", backend)
    return out


@pytest.fixture
def poisoned(monkeypatch):
    """Triton outputs and workspaces start as NaN, so an element no program writes fails the test."""
    import kvkernels.triton.kvzip_score as mod

    def nan_empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mod, "_empty", nan_empty)


# ---------------------------------------------------------------------------------------------------
# reference vs naive float64
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_matches_naive_float64(case, dtype):
    B, Hq, Hkv, Lq, D, N, sink, cs, ce = case
    q, k, ks = make_inputs(B, Hq, Hkv, Lq, D, N, dtype, "cpu")
    scale = 1 / math.sqrt(D)
    got = reference_kvzip_score(q, k, ks, sink, cs, ce, scale)
    assert got.dtype == torch.float32 and got.shape == (B, Hkv, ce - cs)
    torch.testing.assert_close(got.double(), naive_kvzip_score(q, k, ks, sink, cs, ce, scale), **TOL[dtype])


# ---------------------------------------------------------------------------------------------------
# every backend vs naive float64 and vs the reference
@pytest.mark.parametrize("given_lse", [False, True], ids=["own-lse", "true-row-lse"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backend_matches_naive_float64(case, dtype, backend, given_lse, device, poisoned):
    """Also with ``row_lse`` = the LSE an attention over the same rows would return (each backend then skips
    its own LSE pass): the scores are the same."""
    B, Hq, Hkv, Lq, D, N, sink, cs, ce = case
    q, k, ks = make_inputs(B, Hq, Hkv, Lq, D, N, dtype, device)
    scale = 1 / math.sqrt(D)
    row_lse = naive_row_lse(q, k, ks, sink, cs, ce, scale).float().to(device) if given_lse else None
    got = run_op(backend, q, k, ks, sink, cs, ce, row_lse=row_lse)
    assert got.dtype == torch.float32 and got.shape == (B, Hkv, ce - cs)
    assert torch.isfinite(got).all()
    want = naive_kvzip_score(q, k, ks, sink, cs, ce, scale)
    torch.testing.assert_close(got.double().cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_triton_matches_reference(case, dtype, device, poisoned):
    B, Hq, Hkv, Lq, D, N, sink, cs, ce = case
    q, k, ks = make_inputs(B, Hq, Hkv, Lq, D, N, dtype, device)
    torch.testing.assert_close(run_op("triton", q, k, ks, sink, cs, ce, 0.3),
                               run_op("reference", q, k, ks, sink, cs, ce, 0.3), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_softmax_is_stable(backend, device, poisoned):
    """Large logits (sm_scale = 1, |q| ~ 8): the online max must keep exp from overflowing."""
    q, k, ks = make_inputs(1, 6, 2, 4, 64, 45, torch.float32, device, q_mult=8.0)
    # Make one chunk key nearly the query direction of row 0 of head 0, so its score approaches 1.
    k[0, 0, 20] = q[0, 0, 0] / q[0, 0, 0].norm() * 12
    got = run_op(backend, q, k, ks, 3, 7, 41, 1.0)
    want = naive_kvzip_score(q, k, ks, 3, 7, 41, 1.0)
    assert want.max() > 0.99  # the case really is peaked
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_are_read_in_place(backend, device, poisoned):
    """k as a slice of a larger cache in [B, N, H, D] layout, q and k_self transposed views."""
    B, Hq, Hkv, Lq, D, N = 2, 6, 2, 5, 64, 41
    cache = torch.randn(B, N + 7, Hkv, D, device=device)
    k = cache[:, :N].transpose(1, 2)  # [B, Hkv, N, D], non-contiguous
    q = torch.randn(B, Lq, Hq, D, device=device).transpose(1, 2)
    ks = torch.randn(B, Lq, Hkv, D, device=device).transpose(1, 2)
    assert not (k.is_contiguous() or q.is_contiguous() or ks.is_contiguous())
    got = run_op(backend, q, k, ks, 2, 4, 39)
    torch.testing.assert_close(got.double().cpu(), naive_kvzip_score(q, k, ks, 2, 4, 39, D ** -0.5),
                               **TOL[torch.float32])


def test_every_tunable_config_gives_the_same_scores(device, poisoned):
    """Each candidate config of the autotuner's space computes the same thing (tiles are masked)."""
    from kvkernels.triton import kvzip_score as mod

    q, k, ks = make_inputs(1, 9, 3, 7, 64, 90, torch.float16, device)
    args = (q, k, ks, 4, 6, 83, 0.125)
    want = naive_kvzip_score(*args)
    spec = mod.TUNABLE["kvzip_score"]
    assert spec["default"](*args) and isinstance(spec["key"](*args), str)
    for config in spec["space"]:
        got = mod.kvzip_score(*args, config=config)
        torch.testing.assert_close(got.double().cpu(), want, **TOL[torch.float16], msg=lambda m: f"{config}: {m}")


def test_tuning_key_buckets_lengths():
    from kvkernels.triton import kvzip_score as mod

    key = mod.TUNABLE["kvzip_score"]["key"]
    a = key(*make_inputs(1, 9, 3, 5, 64, 300, torch.float16, "cpu"), 0, 10, 210, 0.1)
    b = key(*make_inputs(1, 9, 3, 4, 64, 300, torch.float16, "cpu"), 0, 0, 222, 0.1)
    assert a == b  # 15 vs 12 rows, 200 vs 222 keys: same buckets
    assert a != key(*make_inputs(1, 9, 3, 5, 128, 300, torch.float16, "cpu"), 0, 10, 210, 0.1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 3, 4]),
    Lq=st.integers(1, 9),
    D=st.sampled_from([64, 128]),
    sink=st.integers(0, 6),
    gap=st.integers(0, 5),
    m=st.integers(1, 40),
    tail=st.integers(0, 5),
    half=st.booleans(),
)
def test_hypothesis_triton_matches_naive(device, B, Hkv, G, Lq, D, sink, gap, m, tail, half):
    dtype = torch.float16 if half else torch.float32
    cs = sink + gap
    N = cs + m + tail
    q, k, ks = make_inputs(B, Hkv * G, Hkv, Lq, D, N, dtype, device)
    got = run_op("triton", q, k, ks, sink, cs, cs + m)
    torch.testing.assert_close(got.double().cpu(), naive_kvzip_score(q, k, ks, sink, cs, cs + m, D ** -0.5),
                               **TOL[dtype])


@cuda_only
@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_bf16_on_cuda(case):
    B, Hq, Hkv, Lq, D, N, sink, cs, ce = case
    q, k, ks = make_inputs(B, Hq, Hkv, Lq, D, N, torch.bfloat16, "cuda")
    got = run_op("triton", q, k, ks, sink, cs, ce)
    torch.testing.assert_close(got.double().cpu(), naive_kvzip_score(q, k, ks, sink, cs, ce, D ** -0.5),
                               **TOL[torch.bfloat16])


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_compiled_kernel_on_a_realistic_chunk(dtype):
    """A 2,000-key chunk, 40 reconstruction rows, G = 4, D = 128, compiled on the GPU, against the reference."""
    q, k, ks = make_inputs(1, 12, 3, 40, 128, 2600, dtype, "cuda")
    got = run_op("triton", q, k, ks, 10, 100, 2100)
    want = run_op("reference", q, k, ks, 10, 100, 2100)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_cpu_blocks_match_one_block(case, monkeypatch):
    """The cpu kernel's pass over chunk keys and query rows in many small blocks gives the one-block answer."""
    from kvkernels.cpu import kvzip_score as cpu_mod

    from kvkernels.cpu import native

    B, Hq, Hkv, Lq, D, N, sink, cs, ce = case
    q, k, ks = make_inputs(B, Hq, Hkv, Lq, D, N, torch.float32, "cpu")
    with native.forced(False):  # the eager path's blocks (the compiled kernel has its own tiles)
        whole = cpu_mod.kvzip_score(q, k, ks, sink, cs, ce, 0.1)
        monkeypatch.setattr(cpu_mod, "_KEYS_PER_BLOCK", 8)  # several key blocks per chunk, the last one partial
        monkeypatch.setattr(cpu_mod, "_ROWS_PER_BLOCK", 4)  # several row blocks (G*Lq is 5, 21 and 12 here)
        blocked = cpu_mod.kvzip_score(q, k, ks, sink, cs, ce, 0.1)
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(blocked, reference_kvzip_score(q, k, ks, sink, cs, ce, 0.1), **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------------
# row_lse: the caller's log-sum-exp replaces each backend's own LSE pass (the true one: above)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_row_lse_is_taken_as_given(case, dtype, backend, device, poisoned):
    """An LSE that is not the true one (shifted by fresh random offsets per row) is used as given, not
    recomputed: every backend gives exp(logit - row_lse), like the float64 loop."""
    B, Hq, Hkv, Lq, D, N, sink, cs, ce = case
    q, k, ks = make_inputs(B, Hq, Hkv, Lq, D, N, dtype, device)
    row_lse = (naive_row_lse(q, k, ks, sink, cs, ce, 0.2) + torch.rand(B, Hq, Lq) * 2 - 0.5).float().to(device)
    got = run_op(backend, q, k, ks, sink, cs, ce, 0.2, row_lse=row_lse)
    want = naive_kvzip_score(q, k, ks, sink, cs, ce, 0.2, row_lse=row_lse)
    assert (want - naive_kvzip_score(q, k, ks, sink, cs, ce, 0.2)).abs().max() > 1e-3  # the offsets matter
    torch.testing.assert_close(got.double().cpu(), want, **TOL[dtype])


# ---------------------------------------------------------------------------------------------------
# the cpu backend's compiled max pass
@pytest.mark.parametrize("D", [64, 128, 256, 48], ids=["D64", "D128", "D256", "D48-no-kernel"])
@pytest.mark.parametrize("rows_keys", [(1, 1), (4, 48), (5, 49), (35, 95)], ids=["1x1", "tile", "tile+1", "odd"])
def test_cpu_compiled_max_pass_matches_eager(rows_keys, D):
    """The compiled pass (row and key counts around its 4-row x 48-key tile; D 48 has no kernel and takes the
    eager path) gives the eager pass's maxima, reading the chunk keys out of a larger key tensor."""
    from kvkernels.cpu import kvzip_score as cpu_mod
    from kvkernels.cpu import native

    R, m = rows_keys
    q_rows = torch.randn(3, R, D)
    k = torch.randn(1, 3, m + 9, D)
    lse = torch.randn(3, R) + 4
    scale = D ** -0.5
    with native.forced(False):
        want = cpu_mod._max_logit_minus_lse(q_rows, scale, k, lse, 5, 5 + m)
    with native.forced(True):
        lib = native.library()
        got = cpu_mod._max_logit_minus_lse(q_rows, scale, k, lse, 5, 5 + m)
        direct = native.score_max(lib, q_rows, scale, lse, k[0, :, 5:5 + m])
    assert (direct is None) == (D == 48)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
