"""The quantized ragged pool (quant_pool_build / _append / _attention): the reference against an independent
per-segment model (lists of rows, KIVI applied group by group, float64 attention), every backend against
the reference (buffers bit for bit, attention within dtype tolerance), flush order, overflow, rollback,
the deferred (graph-safe) mode, opcheck and torch.compile."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import kvkernels
from kvkernels.reference import kivi as ref_kivi
from kvkernels.reference import quant_pool as ref_qp

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = ["reference", "cpu", "cpu-ctypes", "cpu-eager", "triton"]


def backend_ok(backend, dtype):
    if backend.startswith("cpu") and CUDA:
        return False
    return not (backend == "triton" and dtype == torch.bfloat16 and not CUDA)  # interpreter bf16 is wrong


# Kept rows [L=2, B, H] per case, with GS = 32 and R = 8 unless the case says otherwise: empty segments,
# shorter than one group, exactly at a flush boundary (tail = R), a full tail (R + GS - 1), long ones.
CASES = {
    "mixed": [[[0, 5, 40], [72, 39, 100]], [[13, 0, 71], [8, 31, 64]]],
    "gqa4": [[[3, 90, 0, 47]], [[40, 41, 39, 120]]],
}


def make_kv(lens, D, dtype, seed=0, device=DEVICE):
    """Per-layer keys/values [B, H, N, D] and a keep mask with the given kept counts (random positions)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    L, B, H = lens.shape
    N = int(lens.max()) + 7
    keep = torch.zeros(L, B, H, N, dtype=torch.bool)
    for idx in lens.flatten().nonzero().flatten().tolist():
        n = int(lens.flatten()[idx])
        keep.view(-1, N)[idx, torch.randperm(N, generator=gen)[:n]] = True
    keys = [(torch.randn(B, H, N, D, generator=gen) * 2 + 0.5).to(dtype).to(device) for _ in range(L)]
    values = [torch.randn(B, H, N, D, generator=gen).to(dtype).to(device) for _ in range(L)]
    return keys, values, keep.to(device)


def build(backend, keys, values, keep, bits=2, group_size=32, residual=8, slack=48):
    with running(backend):
        return kvkernels.quant_pool_from_kv(keys, values, keep, bits, group_size, residual, slack)


def running(backend):
    """use_backend(backend); "cpu-eager" is the cpu backend with its compiled kernels (kvkernels/cpu/native:
    fp32 decode attention, appends) forced off: the path without a C++ compiler; "cpu-ctypes" calls them
    through ctypes (the C++ bindings not built: no Python headers)."""
    from kvkernels.cpu import native

    stack = contextlib.ExitStack()
    if backend == "cpu-eager":
        stack.enter_context(native.forced(False))
        backend = "cpu"
    elif backend == "cpu-ctypes":
        stack.enter_context(native.forced(True, checks=False))
        backend = "cpu"
    stack.enter_context(kvkernels.use_backend(backend))
    return stack


def builder(backend):
    """The backend that builds a pool for ``backend`` (the cpu backends build with the reference)."""
    return "reference" if backend.startswith("cpu") else backend


def append(backend, pool, layer, k, v, flush_after=False):
    with running(backend):
        kvkernels.quant_pool_append(pool, layer, k, v, flush_after=flush_after)


def attend(backend, q, pool, layer, lse=True):
    with running(backend):
        out = kvkernels.quant_pool_attention(q, pool, layer, return_lse=lse)
        assert kvkernels.last_choice() == ("quant_pool_attention", "cpu" if backend.startswith("cpu") else backend)
    return out


TOL = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


# ---------------------------------------------------------------------------------------------------
# An independent model: each segment a list of rows; KIVI group by group; float64 attention


class SegmentModel:
    """One segment as rows in token order and a quantized count, flushed by KIVI groups."""

    def __init__(self, rows, bits, gs, residual):
        self.rows, self.bits, self.gs, self.residual = list(rows), bits, gs, residual
        self.nq = 0
        self.deq = []  # dequantized rows (keys, values) of the quantized prefix
        self.flush(len(self.rows))

    def flush(self, pending_tail):
        n = max(pending_tail - self.residual, 0) // self.gs * self.gs
        for g in range(0, n, self.gs):
            grp = self.rows[self.nq:self.nq + self.gs]
            k = torch.stack([r[0] for r in grp])[None, None]
            v = torch.stack([r[1] for r in grp])[None, None]
            kq = ref_kivi.kivi_dequantize(*ref_kivi.kivi_quantize(k, self.bits, self.gs, "key"), self.bits, self.gs, "key")
            vq = ref_kivi.kivi_dequantize(*ref_kivi.kivi_quantize(v, self.bits, self.gs, "value"), self.bits, self.gs,
                                          "value")
            self.deq += list(zip(kq[0, 0], vq[0, 0]))
            self.nq += self.gs

    def append(self, k, v, flush_after):
        if not flush_after:
            self.flush(len(self.rows) - self.nq)
        self.rows += list(zip(k, v))
        if flush_after:
            self.flush(len(self.rows) - self.nq)

    def kv(self):
        rows = self.deq + self.rows[self.nq:]
        if not rows:
            return None, None
        return torch.stack([r[0] for r in rows]).double(), torch.stack([r[1] for r in rows]).double()


def model_of(keys, values, keep, bits, gs, residual):
    L, B, H, N = keep.shape
    return [[[SegmentModel([(keys[l][b, h, n].cpu(), values[l][b, h, n].cpu()) for n in range(N) if keep[l, b, h, n]],
                           bits, gs, residual) for h in range(H)] for b in range(B)] for l in range(L)]


def model_attention(q, segments, sm_scale):
    B, Hq, Lq, D = q.shape
    G = Hq // len(segments[0])
    o = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            k, v = segments[b][hq // G].kv()
            n = 0 if k is None else k.shape[0]
            for i in range(Lq):
                visible = n - Lq + i + 1
                if visible <= 0:
                    continue
                logits = k[:visible] @ q[b, hq, i].double().cpu() * sm_scale
                lse[b, hq, i] = torch.logsumexp(logits, 0)
                o[b, hq, i] = torch.softmax(logits, 0) @ v[:visible]
    return o, lse


def assert_lse_close(lse, expected, atol):
    lse, expected = lse.double().cpu(), expected.double().cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected)), "rows with no visible key differ"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(lse[finite], expected[finite], atol=atol, rtol=0)


@pytest.mark.parametrize("flush_after", [False, True])
@pytest.mark.parametrize("bits,gs,residual", [(2, 32, 8), (4, 32, 0), (2, 64, 32)])
def test_reference_matches_segment_model(bits, gs, residual, flush_after):
    keys, values, keep = make_kv(CASES["mixed"], 64, torch.float32, device="cpu")
    pool = build("reference", keys, values, keep, bits, gs, residual, slack=80)
    model = model_of(keys, values, keep, bits, gs, residual)
    gen = torch.Generator().manual_seed(5)
    for t in (3, 1, 1, 29, 1, 33, 1):  # prefill-like and decode appends; several flushes
        k, v = torch.randn(2, 3, t, 64, generator=gen), torch.randn(2, 3, t, 64, generator=gen)
        append("reference", pool, 1, k, v, flush_after)
        for b in range(2):
            for h in range(3):
                model[1][b][h].append(k[b, h], v[b, h], flush_after)
        q = torch.randn(2, 9, 2, 64, generator=gen)
        o, lse = attend("reference", q, pool, 1)
        o_ref, lse_ref = model_attention(q, model[1], 1 / 8)
        # fp32 against float64: 3.4e-5 was seen once (the BLAS's reduction order varies with its threading)
        torch.testing.assert_close(o.double(), o_ref, atol=6e-5, rtol=1e-5)
        assert_lse_close(lse, lse_ref, 2e-5)
    assert pool.q_len[1].tolist() == [[m.nq for m in row] for row in model[1]]


# ---------------------------------------------------------------------------------------------------
# Backends against the reference


BACKEND_CASES = [
    # dtype, case, G, D, Lq, bits, group, residual
    (torch.float32, "mixed", 3, 64, 1, 2, 32, 8),
    (torch.float16, "mixed", 3, 128, 2, 2, 32, 8),
    (torch.float16, "gqa4", 4, 64, 1, 4, 32, 0),
    (torch.float32, "gqa4", 4, 128, 3, 2, 64, 16),
    (torch.bfloat16, "mixed", 3, 64, 1, 2, 32, 8),
    (torch.bfloat16, "gqa4", 4, 128, 2, 4, 32, 0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,case,G,D,Lq,bits,gs,residual", BACKEND_CASES,
                         ids=[f"{str(c[0])[6:]}-{c[1]}-G{c[2]}-D{c[3]}-Lq{c[4]}-b{c[5]}-g{c[6]}-R{c[7]}"
                              for c in BACKEND_CASES])
def test_backend_matches_reference(backend, dtype, case, G, D, Lq, bits, gs, residual):
    if not backend_ok(backend, dtype):
        pytest.skip("bf16 under the Triton interpreter is wrong; the cpu backend runs on CPU only")
    keys, values, keep = make_kv(CASES[case], D, dtype)
    slack = Lq + gs + 2
    ref = build("reference", keys, values, keep, bits, gs, residual, slack)
    got = build(backend, keys, values, keep, bits, gs, residual, slack)
    B, H = keep.shape[1:3]
    gen = torch.Generator().manual_seed(3)
    for step, t in enumerate((Lq, 1, 1, gs - 1, 1)):
        k = torch.randn(B, H, t, D, generator=gen).to(dtype).to(DEVICE)
        v = torch.randn(B, H, t, D, generator=gen).to(dtype).to(DEVICE)
        for pool, be in ((ref, "reference"), (got, backend)):
            append(be, pool, 1, k, v, flush_after=step % 2 == 1)
        for i, (a, b) in enumerate(zip(ref.buffers(), got.buffers())):
            assert torch.equal(a, b), f"buffer {kvkernels.QuantPool._fields[i]} differs after append {step}"
    q = torch.randn(B, H * G, Lq, D, generator=gen).to(dtype).to(DEVICE)
    o_ref, lse_ref = attend("reference", q, ref, 1)
    o, lse = attend(backend, q, got, 1)
    assert o.dtype == dtype and o.shape == q.shape and torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, **TOL[dtype])
    assert_lse_close(lse, lse_ref, 1e-3 if dtype != torch.float32 else 2e-5)
    o0 = attend(backend, q, got, 0, lse=False)  # layer 0, without LSE
    torch.testing.assert_close(o0, attend("reference", q, ref, 0, lse=False), **TOL[dtype])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_attention_poisoned_outputs_and_empty_layer(backend, monkeypatch):
    """Every output element is written (torch.empty poisoned with NaN); an all-empty layer gives 0 / -inf."""
    keys, values, keep = make_kv([[[0, 0, 0]], [[33, 0, 70]]], 64, torch.float32)
    pool = build("reference", keys, values, keep, 2, 32, 8)
    q = torch.randn(1, 9, 2, 64, device=DEVICE)
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    o, lse = attend(backend, q, pool, 0)
    assert (o == 0).all() and torch.isneginf(lse).all()
    o, lse = attend(backend, q, pool, 1)
    monkeypatch.undo()
    o_ref, lse_ref = attend("reference", q, pool, 1)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float32])
    assert_lse_close(lse, lse_ref, 2e-5)


WRAP_CASES = [
    # dtype, case, G, D, bits, group, residual, scratch poisoned: fresh NaN-filled buffers every call
    (torch.float32, "mixed", 3, 64, 2, 32, 8, True),
    (torch.float16, "gqa4", 4, 128, 4, 32, 0, False),
    (torch.bfloat16, "mixed", 3, 128, 2, 64, 16, False),
    (torch.float32, "gqa4", 4, 128, 4, 32, 0, True),
    (torch.float32, "mixed", 3, 128, 2, 64, 16, False),
]


def rotate_rings(pool, layer, gen):
    """Rotate every segment's ring of ``layer`` by its own random shift (t_head moves with it): the same
    logical pool, with live tails that wrap around the ring's end. Appends from a build never wrap (the
    slots they use are bounded by the slack), so this is how the wrapped paths get exercised."""
    TC = pool.k_tail.shape[3]
    B, H = pool.t_head.shape[1:]
    tail = (pool.seg_len[layer] - pool.q_len[layer]).long()
    # A head 1 .. tail - 1 slots before the end: the live rows straddle it (tails of 0 or 1 row: anywhere).
    before_end = (torch.rand(B, H, generator=gen) * (tail - 1).clamp(min=1)).long() + 1
    shift = torch.where(tail > 1, TC - before_end, torch.randint(0, TC, (B, H), generator=gen))
    for b in range(B):
        for h in range(H):
            for ring in (pool.k_tail, pool.v_tail):
                ring[layer, b, h] = torch.roll(ring[layer, b, h], int(shift[b, h]), dims=0)
    pool.t_head[layer] = shift.to(torch.int32)


@pytest.mark.skipif(CUDA, reason="the cpu backend runs on CPU tensors")
@pytest.mark.parametrize("dtype,case,G,D,bits,gs,residual,poison", WRAP_CASES,
                         ids=[f"{str(c[0])[6:]}-{c[1]}-D{c[3]}-b{c[4]}-g{c[5]}-R{c[6]}" for c in WRAP_CASES])
@pytest.mark.parametrize("backend", ["cpu", "cpu-eager"])
def test_cpu_kernels_on_wrapped_rings(dtype, case, G, D, bits, gs, residual, poison, backend, monkeypatch):
    """The cpu append and attention against the reference on pools whose tails wrap around the ring: appends
    of 1 .. group_size rows in both flush orders (flushes that read wrapped rows, new rows written across
    the ring's end), attention with Lq = 1, 3 and Lq longer than some tails (causal rows that see part of
    the quantized rows, or nothing), more segments than one block of the kernel, empty segments."""
    from kvkernels.cpu import quant_pool as cpu_qp

    if poison:  # every scratch element the kernel reads must have been written in the same call
        monkeypatch.setattr(cpu_qp, "_SCRATCH_MAX", 0)
        real_empty = torch.empty

        def poisoned(*args, **kwargs):
            t = real_empty(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, "empty", poisoned)
    keys, values, keep = make_kv(CASES[case], D, dtype, device="cpu")
    ref = build("reference", keys, values, keep, bits, gs, residual, slack=2 * gs + 8)
    got = build("reference", keys, values, keep, bits, gs, residual, slack=2 * gs + 8)
    gen = torch.Generator().manual_seed(11)
    for pool in (ref, got):
        rotate_rings(pool, 1, torch.Generator().manual_seed(4))
    TC = got.k_tail.shape[3]
    assert ((got.t_head[1] + got.seg_len[1] - got.q_len[1]) > TC).any(), "no ring wraps: the test would not test it"
    L, B, H = keep.shape[:3]
    q_len0 = got.q_len.clone()
    for step, t in enumerate((1, 3, gs - 1, 1, 1, 2, gs, 1)):
        k = torch.randn(B, H, t, D, generator=gen).to(dtype)
        v = torch.randn(B, H, t, D, generator=gen).to(dtype)
        for pool, be in ((ref, "reference"), (got, backend)):
            append(be, pool, 1, k, v, flush_after=step % 3 == 1)
        for i, (a, b) in enumerate(zip(ref.buffers(), got.buffers())):
            assert torch.equal(a, b), f"buffer {kvkernels.QuantPool._fields[i]} differs after append {step}"
        for layer, Lq in ((1, 1), (1, 3), (0, 1 + step * 5)):
            q = torch.randn(B, H * G, Lq, D, generator=gen).to(dtype)
            o_ref, lse_ref = attend("reference", q, ref, layer)
            o, lse = attend(backend, q, got, layer)
            assert o.dtype == dtype and o.shape == q.shape and torch.isfinite(o).all()
            torch.testing.assert_close(o, o_ref, **TOL[dtype])
            assert_lse_close(lse, lse_ref, 1e-3 if dtype != torch.float32 else 2e-5)
    assert (got.q_len[1] > q_len0[1]).any(), "no flush happened"


# ---------------------------------------------------------------------------------------------------
# Flush order, overflow, rollback


@pytest.mark.parametrize("backend", BACKENDS)
def test_flush_order_on_the_append_that_completes_a_group(backend):
    """R = 0, a segment holding 31 tail rows: the append of row 32 completes a group. The default order
    (flush first) keeps it in full precision for this step and quantizes it at the next append;
    flush_after quantizes it at once."""
    keys, values, keep = make_kv([[[31]]], 64, torch.float32)
    k1, v1 = torch.randn(1, 1, 1, 64, device=DEVICE), torch.randn(1, 1, 1, 64, device=DEVICE)
    for flush_after, q_now in ((False, 0), (True, 32)):
        pool = build(builder(backend), keys, values, keep, 2, 32, 0, slack=8)
        assert pool.q_len.item() == 0 and pool.seg_len.item() == 31
        append(backend, pool, 0, k1, v1, flush_after)
        assert pool.q_len.item() == q_now and pool.seg_len.item() == 32
        append(backend, pool, 0, k1, v1, flush_after)
        assert pool.q_len.item() == 32 and pool.seg_len.item() == 33


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_writes_nothing_and_raises(backend):
    keys, values, keep = make_kv(CASES["mixed"], 64, torch.float16)
    pool = build(backend, keys, values, keep, slack=4)
    append(backend, pool, 1, torch.randn(2, 3, 3, 64, device=DEVICE).half(), torch.randn(2, 3, 3, 64,
                                                                                       device=DEVICE).half())
    before = [t.clone() for t in pool.buffers()]
    k = torch.randn(2, 3, 2, 64, device=DEVICE).half()
    with pytest.raises(kvkernels.PoolOverflowError, match=r"quant_pool_append: appending t = 2 rows to layer 1"):
        append(backend, pool, 1, k, k)
    for a, b in zip(before, pool.buffers()):
        assert torch.equal(a, b)
    append(backend, pool, 1, k[:, :, :1], k[:, :, :1])  # the last free row still fits


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_is_exact(backend):
    keys, values, keep = make_kv(CASES["mixed"], 64, torch.float16)
    pool = build(builder(backend), keys, values, keep, 2, 32, 8, slack=40)
    q = torch.randn(2, 9, 1, 64, device=DEVICE).half()
    o0 = attend(backend, q, pool, 1, lse=False)
    saved = [t.clone() for t in pool.lengths()]
    gen = torch.Generator().manual_seed(9)
    steps = [torch.randn(2, 3, t, 64, generator=gen).half().to(DEVICE) for t in (20, 1, 1, 1, 1)]
    for x in steps:  # flushes in several segments
        append(backend, pool, 1, x, -x)
    after = [t.clone() for t in pool.buffers()]
    assert (pool.q_len[1] > saved[0][1]).any()
    kvkernels.quant_pool_rollback(pool, saved)
    assert torch.equal(attend(backend, q, pool, 1, lse=False), o0)
    for x in steps:  # the same appends again reproduce the same pool
        append(backend, pool, 1, x, -x)
    for a, b in zip(after, pool.buffers()):
        assert torch.equal(a, b)


def test_deferred_mode_never_syncs_and_records_overflow(monkeypatch):
    from kvkernels.triton import pool as pool_mod

    keys, values, keep = make_kv(CASES["mixed"], 64, torch.float32)
    pool = build("triton", keys, values, keep, slack=2)
    k = torch.randn(2, 3, 3, 64, device=DEVICE)
    pool_mod.check_overflow(DEVICE)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in the deferred (graph-safe) path")

    before = [t.clone() for t in pool.buffers()]
    with pool_mod.deferred_overflow_checks(check_on_exit=False):
        monkeypatch.setattr(torch.Tensor, "item", no_sync)
        monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
        with kvkernels.use_backend("triton"):
            torch.ops.kvkernels.quant_pool_append(*pool.buffers(), 1, k, k, 2, 32, 8, False)
            torch.ops.kvkernels.quant_pool_attention(k[:, :, :1].repeat_interleave(3, 1), *pool.buffers()[:8 - 2],
                                                     pool.k_tail[1], pool.v_tail[1], pool.q_start[1], pool.q_len[1],
                                                     pool.t_head[1], pool.seg_len[1], 2, 32)
        monkeypatch.undo()
    for a, b in zip(before, pool.buffers()):
        assert torch.equal(a, b)
    with pytest.raises(kvkernels.PoolOverflowError, match=r"1 deferred append\(s\).*layer 1, t = 3"):
        pool_mod.check_overflow(DEVICE)


# ---------------------------------------------------------------------------------------------------
# Errors, opcheck, torch.compile


def test_errors_name_the_argument():
    keys, values, keep = make_kv(CASES["mixed"], 64, torch.float32, device="cpu")
    pool = build("reference", keys, values, keep)
    with pytest.raises(ValueError, match="group_size = 48"):
        kvkernels.quant_pool_from_kv(keys, values, keep, group_size=48)
    with pytest.raises(ValueError, match="head dim D = 64 must be a multiple of group_size = 128"):
        kvkernels.quant_pool_from_kv(keys, values, keep, group_size=128)
    with pytest.raises(ValueError, match="layer = 2 is out of range"):
        kvkernels.quant_pool_append(pool, 2, torch.zeros(2, 3, 1, 64), torch.zeros(2, 3, 1, 64))
    with pytest.raises(TypeError, match="k_new has dtype torch.float16"):
        kvkernels.quant_pool_append(pool, 0, torch.zeros(2, 3, 1, 64).half(), torch.zeros(2, 3, 1, 64))
    with pytest.raises(ValueError, match="query head count 8 must be a positive multiple"):
        kvkernels.quant_pool_attention(torch.zeros(2, 8, 1, 64), pool, 0)
    with pytest.raises(ValueError, match="q_rows = 32 but seg_len needs"):
        torch.ops.kvkernels.quant_pool_build(torch.zeros(10, 64), torch.zeros(10, 64), torch.zeros(1, 1, 1,
                                             dtype=torch.int64), torch.full((1, 1, 1), 10, dtype=torch.int32),
                                             2, 32, 0, 60, 32)


def test_opcheck_all_ops():
    keys, values, keep = make_kv([[[5, 40]], [[70, 0]]], 64, torch.float32, device="cpu")
    pool = build("reference", keys, values, keep, 2, 32, 8, slack=20)
    fp = kvkernels.compact_kv(keys, values, keep)
    q_rows = ref_qp.quant_pool_rows(fp.seg_len, 32, 8, 20)
    ops = torch.ops.kvkernels
    torch.library.opcheck(ops.quant_pool_build, (fp.k_pool, fp.v_pool, fp.seg_start, fp.seg_len, 2, 32, 8, 20, q_rows))
    q = torch.randn(1, 6, 2, 64)
    layer = (pool.k_tail[1], pool.v_tail[1], pool.q_start[1], pool.q_len[1], pool.t_head[1], pool.seg_len[1])
    torch.library.opcheck(ops.quant_pool_attention, (q, *pool.buffers()[:6], *layer, 2, 32, None, True))
    k = torch.randn(1, 2, 1, 64)
    torch.library.opcheck(ops.quant_pool_append, (*pool.buffers(), 1, k, k, 2, 32, 8, False))


def test_compile_fullgraph_decode_step():
    keys, values, keep = make_kv([[[5, 40]], [[70, 9]]], 64, torch.float32, device="cpu")
    eager = build("reference", keys, values, keep, 2, 32, 8, slack=20)
    compiled_pool = build("reference", keys, values, keep, 2, 32, 8, slack=20)

    def step(q, k, v, bufs):
        torch.ops.kvkernels.quant_pool_append(*bufs, 1, k, v, 2, 32, 8, False)
        return torch.ops.kvkernels.quant_pool_attention(q, *bufs[:6], bufs[6][1], bufs[7][1], bufs[8][1], bufs[9][1],
                                                        bufs[11][1], bufs[12][1], 2, 32, None, False)[0]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        q, k, v = (torch.randn(1, 6 if i == 0 else 2, 1, 64, generator=gen) for i in range(3))
        expected = step(q, k, v, eager.buffers())
        got = compiled(q, k, v, compiled_pool.buffers())
        torch.testing.assert_close(got, expected)
    for a, b in zip(eager.buffers(), compiled_pool.buffers()):
        assert torch.equal(a, b)


def test_bytes_at_keep_03_2bit_are_15x_smaller_at_128k():
    """Allocated bytes (codes, scales, zeros, tails, slack 256) of a synthetic 128K-token pool vs fp16 dense,
    from the build op's shapes on the meta device (nothing is allocated)."""
    L, B, H, N, D = 2, 1, 8, 131072, 128
    seg_len = torch.full((L, B, H), int(0.3 * N), dtype=torch.int32)
    q_rows = ref_qp.quant_pool_rows(seg_len, 32, 128, 256)
    P = int(seg_len.sum())
    meta = dict(device="meta")
    out = torch.ops.kvkernels.quant_pool_build(torch.empty(P, D, dtype=torch.float16, **meta),
                                               torch.empty(P, D, dtype=torch.float16, **meta),
                                               torch.empty(L, B, H, dtype=torch.int64, **meta), seg_len.to("meta"),
                                               2, 32, 128, 256, q_rows)
    pool = kvkernels.QuantPool(*out, 2, 32, 128)
    dense = 2 * L * B * H * N * D * 2
    assert 15 <= dense / pool.nbytes() < 17.8  # 17.8x is the ratio without tails and slack


@pytest.mark.skipif(CUDA, reason="the cpu backend runs on CPU tensors")
def test_cpu_native_attention_rejects_tables_outside_the_buffers():
    """A corrupt table (q_len past the quantized rows) is an error naming the segment, not an out-of-bounds
    read by the compiled kernel."""
    from kvkernels.cpu import native

    if not native.compiler_available():
        pytest.skip("no C++ compiler to build the compiled kernels")
    keys, values, keep = make_kv(CASES["mixed"], 64, torch.float32, device="cpu")
    pool = build("reference", keys, values, keep)
    q = torch.randn(2, 9, 1, 64)
    attend("cpu", q, pool, 1)  # valid tables: fine
    pool.q_len[1, 1, 2] = pool.v_codes.shape[0]
    pool.seg_len[1, 1, 2] = pool.v_codes.shape[0] + 1
    with native.forced(True), pytest.raises(RuntimeError, match="segment 5's tables .* point outside"):
        attend("cpu", q, pool, 1)
