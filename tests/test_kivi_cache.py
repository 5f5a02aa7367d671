"""KiviCache: KIVI's flush schedule over long mixed append sequences (prefill chunks and decode steps), the
stored contents bit-exact against quantizing the whole dense sequence at once, in-place writes into
preallocated buffers, attend() against dense attention over the dequantized cache (both backends), the
GEAR-style low-rank residual, and the byte accounting."""

from __future__ import annotations

import math

import pytest
import torch

import kvkernels
from kvkernels.kivi_cache import KiviCache
from kvkernels.reference import kivi as ref

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["reference", "cpu", "triton"]


def dense_sequence(B, H, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, D, generator=g) + 3 * torch.randn(B, H, 1, D, generator=g)  # channel offsets
    v = torch.randn(B, H, T, D, generator=g)
    return k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE)


def feed(cache, k, v, chunks):
    """Append k, v in chunks of the given sizes; yield after each append."""
    pos = 0
    for t in chunks:
        cache.append(k[:, :, pos:pos + t], v[:, :, pos:pos + t])
        pos += t
        yield pos


def expected_counts(T, R):
    """KIVI: keys quantize in whole R-blocks (tail 0..R-1); values keep a window of min(T, R)."""
    return T - T % R, T % R, max(0, T - R), min(T, R)


def check_contents(cache, k, v, T):
    """Codes/scales bit-exact vs quantizing the dense prefix at once; tails equal the dense rows."""
    bits, G = cache.bits, cache.group_size
    nk, nv = cache.num_quant_keys, cache.num_quant_values
    views = cache.views()
    want_k = ref.kivi_quantize(k[:, :, :nk].contiguous(), bits, G, "key")
    want_v = ref.kivi_quantize(v[:, :, :nv].contiguous(), bits, G, "value")
    for got, want in zip((views["k_codes"], views["k_scale"], views["k_zero"]), want_k):
        assert torch.equal(got, want)
    for got, want in zip((views["v_codes"], views["v_scale"], views["v_zero"]), want_v):
        assert torch.equal(got, want)
    assert torch.equal(views["k_tail"], k[:, :, nk:T])
    assert torch.equal(views["v_tail"], v[:, :, nv:T])


def dense_reconstruction(cache):
    """[dequant(K codes) (+ U.Wᵀ); k_tail] and the same for values, in fp64, from the cache's views."""
    bits, G, vw = cache.bits, cache.group_size, cache.views()
    k = ref.kivi_dequantize(vw["k_codes"], vw["k_scale"], vw["k_zero"], bits, G, "key").double()
    v = ref.kivi_dequantize(vw["v_codes"], vw["v_scale"], vw["v_zero"], bits, G, "value").double()
    if cache.rank:
        ku, kw = vw["k_lowrank"]
        vu, vwt = vw["v_lowrank"]
        k = k + ku.double() @ kw.double().transpose(-1, -2)
        v = v + vu.double() @ vwt.double().transpose(-1, -2)
    return torch.cat([k, vw["k_tail"].double()], 2), torch.cat([v, vw["v_tail"].double()], 2)


def dense_attention(q, k, v, sm_scale):
    """fp64 bottom-right causal attention with GQA (rows that see nothing -> 0)."""
    B, Hq, Lq, D = q.shape
    G = Hq // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    T = k.shape[2]
    logits = q.double() @ k.transpose(-1, -2) * sm_scale
    visible = torch.arange(T, device=q.device)[None, :] <= (T - Lq + torch.arange(Lq, device=q.device))[:, None]
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0) @ v


# ---------------------------------------------------------------------------------------------------
# Flush schedule and contents


@pytest.mark.parametrize("R,G,bits", [(64, 32, 2), (64, 64, 4), (32, 32, 2)])
def test_flush_schedule_over_long_mixed_appends(R, G, bits):
    """Prefill chunks of odd sizes, runs of single-token decode steps, chunks longer than R: after every
    append the counts follow KIVI's rule and the stored contents equal a one-shot quantization."""
    B, H, D = 1, 2, 64
    chunks = [37] + [1] * 40 + [R + 5, 2 * R, 3] + [1] * (R + 3) + [R - 1, 1, 1, 17] + [1] * 20
    T_total = sum(chunks)
    k, v = dense_sequence(B, H, T_total, D, torch.float16)
    with kvkernels.use_backend("reference"):  # the schedule is backend-independent; keep it fast
        cache = KiviCache(B, H, D, T_total + 3, bits=bits, group_size=G, residual=R, dtype=torch.float16,
                          device=DEVICE)
        for step, T in enumerate(feed(cache, k, v, chunks)):
            got = (cache.num_quant_keys, cache.num_tail_keys, cache.num_quant_values, cache.window_len)
            assert got == expected_counts(T, R), (step, T, got)
            assert cache.seq_len == T
            if step % 7 == 0 or step == len(chunks) - 1:
                check_contents(cache, k, v, T)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_prefill_quantizes_T_minus_T_mod_R_keys_and_T_minus_R_values(T):
    R = 64
    k, v = dense_sequence(1, 1, T, 64, torch.float32)
    with kvkernels.use_backend("reference"):
        cache = KiviCache(1, 1, 64, 256, residual=R, dtype=torch.float32, device=DEVICE)
        cache.append(k, v)
    assert (cache.num_quant_keys, cache.num_quant_values) == (T - T % R, max(0, T - R))
    check_contents(cache, k, v, T)


def test_appends_write_in_place_and_never_touch_quantized_rows():
    """Buffers are allocated once; a flush writes only its own slot (earlier codes keep their bytes)."""
    R = 32
    k, v = dense_sequence(1, 2, 150, 64, torch.float16, seed=3)
    with kvkernels.use_backend("reference"):
        cache = KiviCache(1, 2, 64, 160, residual=R, dtype=torch.float16, device=DEVICE)
        buffers = {n: getattr(cache, n) for n in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale",
                                                   "v_zero", "k_tail", "v_window")}
        ptrs = {n: b.data_ptr() for n, b in buffers.items()}
        cache.append(k[:, :, :70], v[:, :, :70])
        first_k = cache.views()["k_codes"].clone()
        first_v = cache.views()["v_codes"].clone()
        for i in range(70, 150):
            cache.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    for n, b in buffers.items():
        assert getattr(cache, n) is b and b.data_ptr() == ptrs[n], n
    assert torch.equal(cache.k_codes[:, :, :first_k.shape[2]], first_k)
    assert torch.equal(cache.v_codes[:, :, :first_v.shape[2]], first_v)
    check_contents(cache, k, v, 150)


# ---------------------------------------------------------------------------------------------------
# attend()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,G,Lq", [(torch.float16, 3, 1), (torch.float32, 4, 2), (torch.float32, 1, 1)])
def test_attend_matches_dense_attention_over_dequantized_cache(backend, dtype, G, Lq):
    B, H, D, R = 1, 2, 64, 32
    k, v = dense_sequence(B, H, 90, D, dtype, seed=G)
    cache = KiviCache(B, H, D, 128, bits=2, group_size=32, residual=R, dtype=dtype, device=DEVICE)
    q = torch.randn(B, H * G, Lq, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    with kvkernels.use_backend(backend):
        cache.append(k[:, :, :50], v[:, :, :50])           # prefill
        for i in range(50, 90, 8):                        # then a few decode-sized appends
            cache.append(k[:, :, i:i + 8], v[:, :, i:i + 8])
        o = cache.attend(q)
        assert kvkernels.last_choice() == ("kivi_attention", backend)
    kd, vd = dense_reconstruction(cache)
    want = dense_attention(q, kd, vd, 1 / math.sqrt(D))
    tol = 3e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(o.double(), want, atol=tol, rtol=tol)
    # And the cache approximates the unquantized attention (a loose sanity bound at 2 bits).
    exact = dense_attention(q, k.double(), v.double(), 1 / math.sqrt(D))
    cos = torch.nn.functional.cosine_similarity(o.double().flatten(), exact.flatten(), dim=0)
    assert cos > 0.8, cos  # random data at 2 bits: about 0.9


def test_attend_on_a_cache_with_only_tails_and_after_one_token():
    with kvkernels.use_backend("triton"):
        cache = KiviCache(1, 1, 64, 64, residual=32, dtype=torch.float32, device=DEVICE)
        k, v = dense_sequence(1, 1, 5, 64, torch.float32)
        q = torch.randn(1, 3, 1, 64).to(DEVICE)
        cache.append(k[:, :, :1], v[:, :, :1])
        torch.testing.assert_close(cache.attend(q), v[:, :, :1].expand(1, 3, 1, 64))  # one key: output = v
        cache.append(k[:, :, 1:], v[:, :, 1:])
        want = dense_attention(q, k.double(), v.double(), 1 / 8)
        torch.testing.assert_close(cache.attend(q).double(), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Low-rank residual


@pytest.mark.parametrize("backend", BACKENDS)
def test_lowrank_cache_attends_like_dense_and_reduces_error(backend):
    B, H, D, R, r = 1, 2, 64, 32, 4
    g = torch.Generator().manual_seed(5)
    # Keys with outlier channels and values with a shared low-rank component: structure GEAR exploits.
    T = 80
    k = torch.randn(B, H, T, D, generator=g) + 4 * torch.randn(B, H, 1, D, generator=g)
    k[..., :4] *= 6
    v = torch.randn(B, H, T, D, generator=g) + torch.randn(B, H, T, 2, generator=g) @ torch.randn(2, D, generator=g) * 3
    k, v = k.to(DEVICE), v.to(DEVICE)
    plain = KiviCache(B, H, D, 128, residual=R, dtype=torch.float32, device=DEVICE)
    lowrank = KiviCache(B, H, D, 128, residual=R, dtype=torch.float32, device=DEVICE, lowrank_rank=r)
    q = torch.randn(B, 3 * H, 1, D, generator=g).to(DEVICE)
    with kvkernels.use_backend(backend):
        for cache in (plain, lowrank):
            cache.append(k[:, :, :60], v[:, :, :60])
            for i in range(60, T):
                cache.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
        o = lowrank.attend(q)
    assert lowrank.num_quant_keys == plain.num_quant_keys == 64 and lowrank.num_quant_values == 48
    kd, vd = dense_reconstruction(lowrank)
    torch.testing.assert_close(o.double(), dense_attention(q, kd, vd, 1 / 8), atol=2e-5, rtol=2e-5)
    kp, vp = dense_reconstruction(plain)
    for name, got, base, x in (("keys", kd, kp, k), ("values", vd, vp, v)):
        err_lr = (got - x.double()).norm().item()
        err_plain = (base - x.double()).norm().item()
        assert err_lr < 0.97 * err_plain, (name, err_lr, err_plain)
    # Rows flushed one at a time (decode) got their own coordinates, not zeros.
    assert (lowrank.v_lr_u[:, :, 28:48].abs().sum(-1) > 0).all()


# ---------------------------------------------------------------------------------------------------
# Bytes and validation


def test_nbytes_counts_live_packed_bytes():
    """2-bit, group 32, D = 128, fp16: a quantized token costs 96 bytes per KV head (keys 48 + values 48)."""
    B, H, D, R = 1, 2, 128, 32
    k, v = dense_sequence(B, H, 96, D, torch.float16)
    with kvkernels.use_backend("reference"):
        cache = KiviCache(B, H, D, 256, bits=2, group_size=32, residual=R, dtype=torch.float16, device=DEVICE)
        cache.append(k, v)  # 96 keys quantized, 64 values quantized, v window 32, key tail 0
    per_head = 96 * 48 + 64 * 48 + 32 * D * 2
    assert cache.nbytes() == B * H * per_head
    assert cache.dense_nbytes() == 2 * B * H * 96 * D * 2
    lr = KiviCache(B, H, D, 256, residual=R, dtype=torch.float16, device=DEVICE, lowrank_rank=2)
    with kvkernels.use_backend("reference"):
        lr.append(k, v)
    assert lr.nbytes() == cache.nbytes() + B * H * ((96 + 64) * 2 * 2 + 2 * D * 2 * 2)


def test_validation_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        KiviCache(1, 1, 64, 64, group_size=32, residual=48)
    with pytest.raises(ValueError, match="head_dim"):
        KiviCache(1, 1, 96, 64, group_size=64, residual=64)
    with pytest.raises(ValueError, match="bits"):
        KiviCache(1, 1, 64, 64, bits=3)
    cache = KiviCache(1, 1, 64, 40, residual=32, dtype=torch.float32, device=DEVICE)
    k, v = dense_sequence(1, 1, 41, 64, torch.float32)
    with pytest.raises(ValueError, match="max_tokens"):
        cache.append(k, v)
    with pytest.raises(ValueError, match="shape"):
        cache.append(k[:, :, :2, :32], v[:, :, :2, :32])
    with pytest.raises(TypeError):
        cache.append(k[:, :, :2].half(), v[:, :, :2].half())
    assert cache.seq_len == 0  # failed appends wrote nothing


def test_device_without_index_accepts_its_own_tensors():
    """Review fix: a cache built with device="cuda" (or "cpu:0") must accept tensors on that device.

    torch.device("cuda") != torch.device("cuda:0") and tensors always report an index, so comparing
    appends against the requested device rejected every tensor; the cache now keeps its buffers' device.
    """
    name = "cuda" if DEVICE.type == "cuda" else "cpu:0"
    cache = KiviCache(1, 1, 64, 64, residual=32, dtype=torch.float32, device=name)
    k, v = dense_sequence(1, 1, 3, 64, torch.float32)
    cache.append(k, v)
    assert cache.seq_len == 3 and cache.device == k.device
