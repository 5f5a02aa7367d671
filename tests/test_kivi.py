"""KIVI quantize / dequantize / attention (ops 6 and 7).

The reference against naive float64 loops (packing, grouping, dequantization error, attention); the Triton
kernels against the reference: bit-exact codes, scales and zeros for quantize, a one-rounding tolerance for
dequantize, the fused quantize->dequantize->error step, and the fused attention over [codes; tails] with GQA,
Lq >= 1, empty parts, split-K and the GEAR low-rank terms. bf16 and compiled runs need CUDA."""

from __future__ import annotations

import math

import pytest
import torch

import kvkernels
from kvkernels.reference import kivi as ref

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from kvkernels.triton import kivi as tri  # noqa: E402  (needs TRITON_INTERPRET from conftest)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16 and compiled Triton need a CUDA GPU")
CPU_DTYPES = [torch.float16, torch.float32]


@pytest.fixture
def poisoned(monkeypatch):
    """Every Triton output/workspace starts as NaN (floats) or a sentinel word (ints)."""

    def poisoned_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(0x5A5A5A5A)

    monkeypatch.setattr(tri, "_empty", poisoned_empty)


def rand_kv(shape, dtype, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * spread + torch.randn(shape[:-1] + (1,), generator=g)
    return x.to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------------
# Reference against naive float64 / explicit loops


def naive_pack(codes, bits):
    """Python-int packing of F codes into one int32 value, code j in bits [j*bits, (j+1)*bits)."""
    word = 0
    for j, c in enumerate(codes):
        word |= int(c) << (j * bits)
    return word - (1 << 32) if word >= 1 << 31 else word


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis", ["key", "value"])
def test_reference_packing_matches_naive_bit_loop(bits, axis):
    F = 32 // bits
    B, H, T, D = 1, 2, 2 * F if axis == "key" else 3, 2 * F
    codes = torch.randint(0, 1 << bits, (B, H, T, D))
    dim = 2 if axis == "key" else 3
    packed = ref.pack_codes(codes, bits, dim)
    for b in range(B):
        for h in range(H):
            if axis == "key":
                for w in range(T // F):
                    for d in range(D):
                        assert int(packed[b, h, w, d]) == naive_pack(codes[b, h, w * F:(w + 1) * F, d].tolist(), bits)
            else:
                for t in range(T):
                    for w in range(D // F):
                        assert int(packed[b, h, t, w]) == naive_pack(codes[b, h, t, w * F:(w + 1) * F].tolist(), bits)
    assert torch.equal(ref.unpack_codes(packed, bits, dim), codes)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("axis", ["key", "value"])
@pytest.mark.parametrize("bits", [2, 4])
def test_reference_quantize_matches_naive_group_loop(dtype, axis, bits):
    """Per group: zero = min, scale = (max-min)/levels (stored), codes within one of the float64 ratio,
    exactly round(ratio) away from .5 ties, and |x - x_hat| <= scale/2 (+ the storage rounding)."""
    G, levels = 32, (1 << bits) - 1
    x = rand_kv((1, 2, 64, 64), dtype).cpu()
    codes, scale, zero = ref.kivi_quantize(x, bits, G, axis)
    c = ref.unpack_codes(codes, bits, 2 if axis == "key" else 3)
    x_hat = ref.kivi_dequantize(codes, scale, zero, bits, G, axis)
    for h in range(2):
        for gi in range(64 // G):
            for j in range(64):
                sl = (0, h, slice(gi * G, (gi + 1) * G), j) if axis == "key" else (0, h, j, slice(gi * G, (gi + 1) * G))
                gs = (0, h, gi, j) if axis == "key" else (0, h, j, gi)
                grp = x[sl].double()
                assert float(zero[gs]) == float(grp.min().to(dtype))
                # The contract computes the scale in fp32 (x.max - x.min, then / levels), then stores it.
                span = grp.max().float() - grp.min().float()
                assert float(scale[gs]) == float((span / levels).to(dtype))
                s = float(scale[gs])
                ratio = ((grp - float(zero[gs])) / s).clamp(0, levels)
                got = c[sl].double()
                far_from_tie = (ratio - ratio.floor() - 0.5).abs() > 1e-4
                assert torch.equal(got[far_from_tie], ratio.round()[far_from_tie])
                assert (got - ratio).abs().max() <= 0.5 + 1e-4
                err = (x_hat[sl].double() - grp).abs()
                assert err.max() <= s / 2 + 2 * grp.abs().max() * torch.finfo(dtype).eps + 1e-12


def naive_attention(q, k, v, sm_scale):
    """float64 loops over (b, query head, row): softmax over the visible keys; nothing visible -> 0."""
    B, Hq, Lq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    o = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            for i in range(Lq):
                n = T - Lq + i + 1
                if n <= 0:
                    continue
                logits = k[b, hq // G, :n].double() @ q[b, hq, i].double() * sm_scale
                w = torch.softmax(logits, dim=0)
                o[b, hq, i] = w @ v[b, hq // G, :n].double()
    return o


def make_attention_case(B, Hkv, G, Lq, D, Tk, Rk, Tv, bits, group, dtype, rank=0, seed=0):
    """Random quantized parts (quantized from random data by the reference) + tails + optional low rank."""
    T = Tk + Rk
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype).to(DEVICE)

    q = rnd(B, Hkv * G, Lq, D)
    kc, ks, kz = ref.kivi_quantize(rnd(B, Hkv, Tk, D), bits, group, "key")
    vc, vs, vz = ref.kivi_quantize(rnd(B, Hkv, Tv, D), bits, group, "value")
    lr = [None] * 4
    if rank:
        lr = [rnd(B, Hkv, Tk, rank, s=0.3), rnd(B, Hkv, D, rank, s=0.3), rnd(B, Hkv, Tv, rank, s=0.3),
              rnd(B, Hkv, D, rank, s=0.3)]
    return [q, kc, ks, kz, vc, vs, vz, rnd(B, Hkv, T - Tk, D), rnd(B, Hkv, T - Tv, D), bits, group,
            1 / math.sqrt(D), *lr]


def dense_from_case(args):
    q, kc, ks, kz, vc, vs, vz, kt, vt, bits, group, sm, ku, kw, vu, vw = args
    k = ref.kivi_dequantize(kc, ks, kz, bits, group, "key").double()
    v = ref.kivi_dequantize(vc, vs, vz, bits, group, "value").double()
    if ku is not None:
        k = k + ku.double() @ kw.double().transpose(-1, -2)
        v = v + vu.double() @ vw.double().transpose(-1, -2)
    return torch.cat([k, kt.double()], 2).cpu(), torch.cat([v, vt.double()], 2).cpu()


@pytest.mark.parametrize("shape", [
    dict(B=1, Hkv=2, G=3, Lq=1, D=64, Tk=64, Rk=5, Tv=40, rank=0),
    dict(B=2, Hkv=1, G=4, Lq=3, D=64, Tk=32, Rk=0, Tv=32, rank=2),
    dict(B=1, Hkv=1, G=1, Lq=4, D=64, Tk=0, Rk=2, Tv=0, rank=0),  # Lq > T: the first rows see nothing
])
def test_reference_attention_matches_naive_float64(shape):
    args = make_attention_case(shape["B"], shape["Hkv"], shape["G"], shape["Lq"], shape["D"], shape["Tk"],
                               shape["Rk"], shape["Tv"], 2, 32, torch.float32, rank=shape["rank"])
    args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    k, v = dense_from_case(args)
    want = naive_attention(args[0], k, v, args[11])
    got = ref.kivi_attention(*args)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------
# Triton quantize / dequantize


@triton.jit
def _round_probe_kernel(x_ptr, y_ptr, N, LEVELS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N)
    tl.store(y_ptr + offs, tri._round_half_even_clamped(x, LEVELS), mask=offs < N)


def test_magic_number_rounding_is_round_half_even():
    """(v + 1.5*2^23) - 1.5*2^23 == round_half_even(v) for 0 <= v < 2^22 (here after the clamp to 15):
    every exact tie k + 0.5, its fp32 neighbours, and random values, as executed by Triton."""
    ties = torch.arange(0, 16, dtype=torch.float32) + 0.5
    near = torch.cat([torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    rand = torch.rand(400, generator=torch.Generator().manual_seed(3)) * 20 - 2
    x = torch.cat([ties, near, rand, torch.tensor([0.0, 15.0, 1e30, -1e30])]).to(DEVICE)
    y = torch.full_like(x, float("nan"))
    _round_probe_kernel[(1,)](x, y, x.numel(), LEVELS=15, BLOCK=1024)
    assert torch.equal(y, torch.round(x.clamp(0, 15)))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("axis", ["key", "value"])
@pytest.mark.parametrize("bits,group,D", [(2, 32, 64), (2, 64, 128), (4, 32, 96), (4, 128, 128), (2, 32, 96)])
def test_triton_quantize_is_bit_exact(dtype, axis, bits, group, D, poisoned):
    T = 2 * group if axis == "key" else 37  # odd token count for the value axis
    x = rand_kv((2, 3, T, D), dtype, seed=bits * D + group)
    x[0, 0, :group, :group] = 1.25  # constant groups on both axes -> code 0, scale 0
    want = ref.kivi_quantize(x, bits, group, axis)
    with kvkernels.use_backend("triton"):
        got = kvkernels.kivi_quantize(x, bits, group, axis)
        assert kvkernels.last_choice() == ("kivi_quantize", "triton")
    for g, w, name in zip(got, want, ("codes", "scale", "zero")):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name


@pytest.mark.parametrize("axis", ["key", "value"])
def test_triton_quantize_ties_round_half_even(axis, poisoned):
    """A group spanning 0..3 has scale 1 at 2 bits: values 0.5, 1.5, 2.5 are exact ties -> codes 0, 2, 2."""
    base = torch.tensor([0.0, 3.0, 0.5, 1.5, 2.5, 1.0, 2.0, 0.5] * 4)  # 32 values, min 0, max 3
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0] = base[:, None] if axis == "key" else base[None, :]
    x = x.to(DEVICE)
    codes, scale, _ = tri.kivi_quantize(x, 2, 32, axis)
    assert torch.equal(scale, torch.ones_like(scale))
    c = ref.unpack_codes(codes, 2, 2 if axis == "key" else 3)[0, 0].cpu()
    c = c[:, 0] if axis == "key" else c[0]
    expect = torch.tensor([0, 3, 0, 2, 2, 1, 2, 0] * 4)
    assert torch.equal(c, expect)
    assert torch.equal(codes, ref.kivi_quantize(x, 2, 32, axis)[0])


def test_triton_quantize_reads_strided_input(poisoned):
    big = rand_kv((2, 4, 70, 64), torch.float16)
    x = big[:, 1:3, 3:67]  # non-contiguous view
    for axis in ("key", "value"):
        got = tri.kivi_quantize(x, 2, 32, axis)
        want = ref.kivi_quantize(x.contiguous(), 2, 32, axis)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def _dequant_tolerance(x_hat_ref, dtype):
    # Interpreter: exact. Compiled: code*scale+zero may fuse into one FMA -> at most one rounding apart.
    eps = torch.finfo(dtype).eps
    return dict(rtol=eps, atol=eps * float(x_hat_ref.abs().max()) + 1e-30)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("axis", ["key", "value"])
@pytest.mark.parametrize("bits,group,D", [(2, 32, 64), (4, 64, 128), (2, 32, 96)])
def test_triton_dequantize_matches_reference(dtype, axis, bits, group, D, poisoned):
    T = 2 * group if axis == "key" else 21
    x = rand_kv((1, 3, T, D), dtype, seed=7)
    codes, scale, zero = ref.kivi_quantize(x, bits, group, axis)
    want = ref.kivi_dequantize(codes, scale, zero, bits, group, axis)
    with kvkernels.use_backend("triton"):
        got = kvkernels.kivi_dequantize(codes, scale, zero, bits, group, axis)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **_dequant_tolerance(want, dtype))
    # KIVI's error bound: within half a stored scale of the input (+ the output's own rounding).
    s = scale.float()
    s = s.repeat_interleave(group, 2) if axis == "key" else s.repeat_interleave(group, 3)
    slack = 2 * torch.finfo(dtype).eps * x.float().abs() + 1e-6
    assert ((got.float() - x.float()).abs() <= s / 2 + slack).all()


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("axis", ["key", "value"])
def test_quantization_error_is_fused_quantize_dequantize_subtract(dtype, axis, poisoned):
    T = 64 if axis == "key" else 19
    x = rand_kv((1, 2, T, 64), dtype, seed=11)
    codes, scale, zero, err = tri.quantization_error(x, 2, 32, axis)
    want = ref.kivi_quantize(x, 2, 32, axis)
    assert all(torch.equal(g, w) for g, w in zip((codes, scale, zero), want))
    x_hat = ref.kivi_dequantize(*want, 2, 32, axis)
    expect = (x.float() - x_hat.float()).to(dtype)
    assert err.dtype == dtype and torch.isfinite(err).all()
    torch.testing.assert_close(err, expect, **_dequant_tolerance(x, dtype))


def test_empty_inputs_give_empty_outputs():
    x = torch.zeros(1, 2, 0, 64, device=DEVICE)
    codes, scale, zero = tri.kivi_quantize(x, 2, 32, "key")
    assert codes.shape == (1, 2, 0, 64) and scale.shape == (1, 2, 0, 64)
    assert tri.kivi_dequantize(codes, scale, zero, 2, 32, "key").shape == (1, 2, 0, 64)


# ---------------------------------------------------------------------------------------------------
# Triton attention


ATTN_CASES = {
    # name: (B, Hkv, G, Lq, D, Tk, Rk, Tv, bits, group, rank, config)
    "decode-G3": (1, 2, 3, 1, 64, 64, 7, 40, 2, 32, None, None),
    "gqa4-splits": (2, 1, 4, 1, 128, 128, 30, 100, 4, 64, None, {"BLOCK_N": 32, "NUM_SPLITS": 3, "num_warps": 4}),
    "lq3-causal": (1, 1, 3, 3, 64, 64, 3, 36, 2, 32, None, {"BLOCK_N": 16, "NUM_SPLITS": 2, "num_warps": 4}),
    "mha-g128": (1, 2, 1, 2, 128, 128, 1, 120, 2, 128, None, None),
    "d96": (1, 1, 3, 1, 96, 32, 9, 20, 4, 32, None, {"BLOCK_N": 32, "NUM_SPLITS": 1, "num_warps": 4}),
    "tail-only": (1, 2, 3, 2, 64, 0, 25, 0, 2, 32, None, {"BLOCK_N": 16, "NUM_SPLITS": 2, "num_warps": 4}),
    "quant-only": (1, 1, 4, 1, 64, 64, 0, 64, 2, 64, None, {"BLOCK_N": 64, "NUM_SPLITS": 8, "num_warps": 4}),
    "lq-gt-t": (1, 1, 3, 6, 64, 0, 4, 0, 2, 32, None, {"BLOCK_N": 16, "NUM_SPLITS": 2, "num_warps": 4}),
    "empty": (1, 1, 3, 2, 64, 0, 0, 0, 2, 32, None, None),
    "rows-over-64": (1, 1, 4, 20, 64, 32, 2, 20, 4, 32, None, {"BLOCK_N": 16, "NUM_SPLITS": 2, "num_warps": 4}),
    "lowrank": (1, 2, 3, 1, 64, 64, 5, 50, 2, 32, 3, {"BLOCK_N": 32, "NUM_SPLITS": 2, "num_warps": 4}),
    "lowrank-direct": (2, 1, 1, 2, 128, 32, 10, 30, 4, 32, 4, None),
}
ATTN_TOL = {torch.float16: dict(atol=3e-3, rtol=3e-3), torch.float32: dict(atol=2e-5, rtol=2e-5),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def run_attention_case(name, dtype):
    B, Hkv, G, Lq, D, Tk, Rk, Tv, bits, group, rank, config = ATTN_CASES[name]
    args = make_attention_case(B, Hkv, G, Lq, D, Tk, Rk, Tv, bits, group, dtype, rank=rank or 0,
                               seed=len(name))
    want = ref.kivi_attention(*args)
    got = tri.kivi_attention(*args, config=config)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), **ATTN_TOL[dtype])
    return args, got


@pytest.mark.parametrize("name", list(ATTN_CASES))
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_triton_attention_matches_reference(name, dtype, poisoned):
    run_attention_case(name, dtype)


@pytest.mark.parametrize("name", list(ATTN_CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_attention_matches_reference(name, dtype, monkeypatch):
    from kvkernels.cpu import kivi as cpu_kivi

    B, Hkv, G, Lq, D, Tk, Rk, Tv, bits, group, rank, _ = ATTN_CASES[name]
    args = make_attention_case(B, Hkv, G, Lq, D, Tk, Rk, Tv, bits, group, dtype, rank=rank or 0, seed=len(name))
    want = ref.kivi_attention(*args)
    monkeypatch.setattr(cpu_kivi, "_BLOCK_TOKENS", 32)  # several blocks even on these short caches
    with kvkernels.use_backend("cpu"):
        got = torch.ops.kvkernels.kivi_attention(*args)
        assert kvkernels.last_choice() == ("kivi_attention", "cpu")
    assert got.dtype == dtype and got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), **ATTN_TOL[dtype])
    if name in ("lq-gt-t", "empty"):
        assert torch.equal(got[:, :, :2], torch.zeros_like(got[:, :, :2]))


def test_attention_rows_that_see_nothing_are_zero(poisoned):
    args, got = run_attention_case("lq-gt-t", torch.float32)
    assert torch.equal(got[:, :, :2], torch.zeros_like(got[:, :, :2]))  # Lq = 6 > T = 4
    args, got = run_attention_case("empty", torch.float32)
    assert torch.equal(got, torch.zeros_like(got))


def test_attention_lowrank_terms_change_the_result(poisoned):
    """Guard against a kernel that ignores U.Wᵀ: the residual must move the output, exactly as the reference."""
    args, got = run_attention_case("lowrank", torch.float32)
    plain = tri.kivi_attention(*args[:12])
    assert (got - plain).abs().max() > 1e-3


def test_every_split_count_gives_the_same_output(poisoned):
    args = make_attention_case(1, 1, 3, 2, 64, 64, 20, 70, 2, 32, torch.float32, rank=2, seed=5)
    outs = [tri.kivi_attention(*args, config={"BLOCK_N": 16, "NUM_SPLITS": s, "num_warps": 4})
            for s in (1, 2, 5, 16)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-6)


def test_attention_through_public_api_dispatches_to_triton(poisoned):
    args = make_attention_case(1, 2, 3, 1, 64, 32, 3, 20, 2, 32, torch.float16, rank=2, seed=9)
    q, kc, ks, kz, vc, vs, vz, kt, vt, bits, group, sm, ku, kw, vu, vw = args
    with kvkernels.use_backend("triton"):
        got = kvkernels.kivi_attention(q, kc, ks, kz, vc, vs, vz, kt, vt, bits, group, k_lowrank=(ku, kw),
                                       v_lowrank=(vu, vw))
        assert kvkernels.last_choice() == ("kivi_attention", "triton")
    torch.testing.assert_close(got, ref.kivi_attention(*args), **ATTN_TOL[torch.float16])


def test_attention_reads_strided_views(poisoned):
    """The cache hands slices of preallocated buffers; the kernel must honour their strides."""
    args = make_attention_case(1, 2, 3, 1, 64, 64, 5, 40, 2, 32, torch.float16, seed=4)
    padded = []
    for a in args[1:9]:
        big = torch.zeros(a.shape[0], a.shape[1], a.shape[2] + 8, a.shape[3], dtype=a.dtype, device=a.device)
        big[:, :, 3:3 + a.shape[2]] = a
        padded.append(big[:, :, 3:3 + a.shape[2]])
    got = tri.kivi_attention(args[0], *padded, *args[9:])
    torch.testing.assert_close(got, ref.kivi_attention(*args), **ATTN_TOL[torch.float16])


# ---------------------------------------------------------------------------------------------------
# Tuning contract


@pytest.mark.parametrize("op", ["kivi_quantize", "kivi_dequantize", "kivi_attention"])
def test_tunable_contract(op, poisoned):
    entry = tri.TUNABLE[op]
    x = rand_kv((1, 2, 64, 64), torch.float16)
    codes, scale, zero = ref.kivi_quantize(x, 2, 32, "key")
    if op == "kivi_quantize":
        args = (x, 2, 32, "key")
    elif op == "kivi_dequantize":
        args = (codes, scale, zero, 2, 32, "key")
    else:
        args = tuple(make_attention_case(1, 2, 3, 1, 64, 64, 5, 53, 2, 32, torch.float16))  # T = 69
    key = entry["key"](*args)
    assert isinstance(key, str) and "69" not in key  # bucketed, never the raw length
    longer = list(args)
    if op == "kivi_attention":  # 3 more tail tokens stay in the same length bucket -> same key
        longer[7] = torch.cat([args[7], args[7][:, :, :3]], 2)
        longer[8] = torch.cat([args[8], args[8][:, :, :3]], 2)
        assert entry["key"](*longer) == key
    default = entry["default"](*args)
    assert set(default) <= set(entry["space"][0]) | {"num_stages"}
    fn = getattr(tri, op)
    want = getattr(ref, op)(*args)
    got = fn(*args, config=entry["space"][0])
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=3e-3, rtol=3e-3)


# ---------------------------------------------------------------------------------------------------
# CUDA only: bf16 and compiled kernels


@needs_cuda
@pytest.mark.parametrize("axis", ["key", "value"])
def test_bf16_quantize_bit_exact_cuda(axis):
    x = rand_kv((2, 3, 128, 128), torch.bfloat16)
    got = tri.kivi_quantize(x, 2, 32, axis)
    want = ref.kivi_quantize(x, 2, 32, axis)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    d = tri.kivi_dequantize(*got, 2, 32, axis)
    torch.testing.assert_close(d, ref.kivi_dequantize(*want, 2, 32, axis), **_dequant_tolerance(x, torch.bfloat16))


@needs_cuda
@pytest.mark.parametrize("name", ["decode-G3", "gqa4-splits", "lowrank", "lq3-causal"])
def test_bf16_attention_cuda(name):
    run_attention_case(name, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# Review fixes


@pytest.mark.parametrize("D", [128, 256])
def test_fp32_attention_default_fits_h100_shared_memory(D):
    """fp32 attention with 2 pipeline stages needs 245 KiB (D = 128) / 487 KiB (D = 256) of shared memory
    when compiled for sm_90 (Triton 3.9, measured ahead of time), more than the 227 KiB an H100 block may
    have: the launch fails with OutOfResources. The default must use one stage for fp32 (45 / 86 KiB);
    fp16 keeps two (25-51 KiB)."""
    args32 = make_attention_case(1, 2, 3, 1, D, 64, 5, 40, 2, 32, torch.float32)
    args16 = make_attention_case(1, 2, 3, 1, D, 64, 5, 40, 2, 32, torch.float16)
    assert tri._attn_default(*args32)["num_stages"] == 1
    assert tri._attn_default(*args16)["num_stages"] == 2


@needs_cuda
@pytest.mark.parametrize("D", [128, 256])
def test_fp32_attention_default_config_launches_cuda(D):
    args = make_attention_case(2, 2, 3, 1, D, 128, 7, 100, 2, 32, torch.float32, rank=2)
    torch.testing.assert_close(tri.kivi_attention(*args), ref.kivi_attention(*args), **ATTN_TOL[torch.float32])
    # A config that names no stage count gets the same safe fallback.
    cfg = {"BLOCK_N": 64, "NUM_SPLITS": 2, "num_warps": 4}
    torch.testing.assert_close(tri.kivi_attention(*args, config=cfg), ref.kivi_attention(*args),
                               **ATTN_TOL[torch.float32])


@needs_cuda
@pytest.mark.parametrize("axis", ["key", "value"])
def test_quantize_dequantize_past_2_31_elements_cuda(axis):
    """int64 offsets: a [B, H, T, D] tensor of more than 2**31 elements (4 GiB in fp16). With int32
    (b, h) offsets the last heads were read from and written to wrapped addresses."""
    B, H, T, D = 2, 8, 2**31 // (2 * 8 * 128) + 256, 128
    try:
        x = torch.empty(B, H, T, D, dtype=torch.float16, device=DEVICE)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("needs about 12 GiB of GPU memory")
    assert x.numel() > 2**31
    last = rand_kv((1, 1, T, D), torch.float16, seed=3)
    x.normal_()
    x[-1:, -1:] = last
    codes, scale, zero = tri.kivi_quantize(x, 2, 32, axis)
    want = ref.kivi_quantize(last, 2, 32, axis)
    for got, w in zip((codes, scale, zero), want):
        assert torch.equal(got[-1:, -1:], w)
    del x
    deq = tri.kivi_dequantize(codes, scale, zero, 2, 32, axis)
    want_deq = ref.kivi_dequantize(*want, 2, 32, axis)
    torch.testing.assert_close(deq[-1:, -1:], want_deq, **_dequant_tolerance(want_deq, torch.float16))


class _GridLog:
    """Stands in for a jitted kernel: records the launch grid, runs nothing."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, tuple(grid)))


def test_quantize_dequantize_grids_fit_cuda_axis_limits(monkeypatch):
    """Review fix: CUDA grid axes 1 and 2 are limited to 65535 programs. The token blocks were on axis 1,
    so quantizing/dequantizing more than ~1M (value axis) or ~2M (key axis) tokens failed to launch on a
    GPU. They are on axis 0 now. (The interpreter has no such limit, hence a launch-grid check; inputs
    and outputs are zero-stride views, so nothing large is allocated.)"""
    log = []
    for name in ("_quant_key_kernel", "_quant_value_kernel", "_dequant_key_kernel", "_dequant_value_kernel"):
        monkeypatch.setattr(tri, name, _GridLog(name, log))
    monkeypatch.setattr(tri, "_empty", lambda shape, dtype, device: torch.zeros((), dtype=dtype).expand(shape))
    T, D, bits, group = 65536 * 32 + 64, 64, 2, 32
    x = torch.zeros((), dtype=torch.float16).expand(1, 1, T, D)
    for axis in ("key", "value"):
        codes, scale, zero = tri.kivi_quantize(x, bits, group, axis)
        tri.kivi_dequantize(codes, scale, zero, bits, group, axis)
    assert len(log) == 4
    for name, grid in log:
        assert all(g <= 65535 for g in grid[1:]), f"{name}: grid {grid} exceeds 65535 on axis 1 or 2"
