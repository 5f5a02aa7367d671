"""Checking mode (kvkernels.checking() / KVKERNELS_CHECK=1): each host-side data check, on tiny inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kvkernels
from kvkernels import _checks

D = 64


def _pool(rows=12):
    """A 1-layer, 1-batch, 2-head pool: segment 0 = rows [0, 6), segment 1 = rows [6, 12); 4 live rows each."""
    k_pool, v_pool = torch.randn(rows, D), torch.randn(rows, D)
    seg_start = torch.tensor([[[0, 6]]], dtype=torch.int64)
    seg_len = torch.tensor([[[4, 4]]], dtype=torch.int32)
    seg_cap = torch.tensor([[[6, 6]]], dtype=torch.int32)
    return k_pool, v_pool, seg_start, seg_len, seg_cap


def _attend(k_pool, v_pool, seg_start, seg_len, q=None):
    q = torch.randn(1, 2, 1, D) if q is None else q
    return kvkernels.ragged_attention(q, k_pool, v_pool, seg_start, seg_len)


def _append(k_pool, v_pool, seg_start, seg_len, seg_cap, k_new=None):
    k_new = torch.randn(1, 2, 1, D) if k_new is None else k_new
    kvkernels.ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, 0, k_new, torch.randn(1, 2, 1, D))


def test_off_by_default_and_context_manager_restores():
    assert not kvkernels.checking_enabled() or os.environ.get("KVKERNELS_CHECK")
    before = _checks.enabled
    with kvkernels.checking():
        assert kvkernels.checking_enabled()
        with kvkernels.checking(False):
            assert not kvkernels.checking_enabled()
        assert kvkernels.checking_enabled()
    assert _checks.enabled == before


def test_segment_past_pool_end_is_silent_without_checking_and_caught_with_it():
    k_pool, v_pool, seg_start, seg_len, _ = _pool()
    bad_start = torch.tensor([[0, 10]], dtype=torch.int64)  # rows 10..13 of a 12-row pool
    # Trusted without checking: the reference clamps the rows and answers silently (the case); other
    # backends may fail in their own way (the cpu backend's strided view refuses it).
    with kvkernels.checking(False), kvkernels.use_backend("reference"):
        _attend(k_pool, v_pool, bad_start, seg_len[0])
    with kvkernels.checking(), pytest.raises(ValueError, match=r"ragged_attention.*segment \[0, 1\] ends past "
                                                                r"the pool: seg_start \+ seg_len = 10 \+ 4 = 14 > 12"):
        _attend(k_pool, v_pool, bad_start, seg_len[0])


def test_ragged_attention_checks():
    k_pool, v_pool, seg_start, seg_len, _ = _pool()
    with kvkernels.checking():
        _attend(k_pool, v_pool, seg_start[0], seg_len[0])  # a valid pool passes
        with pytest.raises(ValueError, match="seg_start.*negative"):
            _attend(k_pool, v_pool, torch.tensor([[-1, 6]]), seg_len[0])
        with pytest.raises(ValueError, match="seg_len.*negative"):
            _attend(k_pool, v_pool, seg_start[0], torch.tensor([[4, -2]], dtype=torch.int32))
        with pytest.raises(ValueError, match=r"segments overlap: segment \[0, 0\] covers rows \[0, 4\)"):
            _attend(k_pool, v_pool, torch.tensor([[0, 2]]), seg_len[0])
        with pytest.raises(ValueError, match="q holds 1 NaN/inf"):
            q = torch.randn(1, 2, 1, D)
            q[0, 1, 0, 3] = float("nan")
            _attend(k_pool, v_pool, seg_start[0], seg_len[0], q)
        k_bad = k_pool.clone()
        k_bad[7] = float("inf")  # a live row of segment 1
        with pytest.raises(ValueError, match=r"k_pool \(live rows\) holds"):
            _attend(k_bad, v_pool, seg_start[0], seg_len[0])
        k_bad = k_pool.clone()
        k_bad[11] = float("nan")  # a free slack row: not read, not an error
        _attend(k_bad, v_pool, seg_start[0], seg_len[0])
        v_bad = v_pool.clone()
        v_bad[0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"v_pool \(live rows\)"):
            _attend(k_pool, v_bad, seg_start[0], seg_len[0])


def test_ragged_append_checks():
    k_pool, v_pool, seg_start, seg_len, seg_cap = _pool()
    with kvkernels.checking():
        _append(k_pool, v_pool, seg_start, seg_len.clone(), seg_cap)
        with pytest.raises(ValueError, match=r"segment \[0, 0, 1\] ends past the pool: seg_start \+ seg_cap"):
            _append(k_pool, v_pool, seg_start, seg_len.clone(), torch.tensor([[[6, 7]]], dtype=torch.int32))
        with pytest.raises(ValueError, match=r"seg_len\[0, 0, 0\] = 7 > seg_cap"):
            _append(k_pool, v_pool, seg_start, torch.tensor([[[7, 4]]], dtype=torch.int32), seg_cap)
        with pytest.raises(ValueError, match="segments overlap"):
            _append(k_pool, v_pool, torch.tensor([[[0, 5]]]), seg_len.clone(), seg_cap)
        k_new = torch.randn(1, 2, 1, D)
        k_new[0, 0, 0, 0] = float("-inf")
        with pytest.raises(ValueError, match="k_new holds"):
            _append(k_pool, v_pool, seg_start, seg_len.clone(), seg_cap, k_new)


def test_kvzip_score_and_compact_and_lowrank_checks():
    q, k, k_self = torch.randn(1, 2, 3, D), torch.randn(1, 1, 10, D), torch.randn(1, 1, 3, D)
    k[0, 0, 5, 0] = float("nan")
    kvkernels.kvzip_score(q, k, k_self, 2, 2, 10)  # trusted without checking
    with kvkernels.checking():
        with pytest.raises(ValueError, match=r"kvzip_score: k holds 1 NaN/inf value\(s\), the first at index "
                                             r"\(0, 0, 5, 0\)"):
            kvkernels.kvzip_score(q, k, k_self, 2, 2, 10)
        keys = [torch.randn(1, 1, 4, D) for _ in range(2)]
        values = [torch.randn(1, 1, 4, D) for _ in range(2)]
        values[1][0, 0, 2, 1] = float("inf")
        keep = torch.ones(2, 1, 1, 4, dtype=torch.bool)
        with pytest.raises(ValueError, match=r"values\[1\] holds"):
            kvkernels.compact_kv(keys, values, keep, num_kept=8)
        err = torch.randn(1, 1, 8, D)
        err[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="lowrank_residual: err holds"):
            kvkernels.lowrank_residual(err, 2, 1)
        # topk_mask: NaN and +inf are part of its contract, so checking mode accepts them.
        scores = torch.tensor([[float("nan"), float("inf"), 1.0]])
        assert kvkernels.topk_mask(scores, 2).tolist() == [[False, True, True]]


def test_kivi_checks():
    x = torch.randn(1, 1, 32, D)
    with kvkernels.checking():
        codes, scale, zero = kvkernels.kivi_quantize(x, 2, 32, "key")
        x_bad = x.clone()
        x_bad[0, 0, 3, 3] = float("nan")
        with pytest.raises(ValueError, match="kivi_quantize: x holds"):
            kvkernels.kivi_quantize(x_bad, 2, 32, "key")
        with pytest.raises(ValueError, match=r"kivi_dequantize: scale\[0, 0, 0, 5\] = -1.0 is negative"):
            kvkernels.kivi_dequantize(codes, scale.index_fill(3, torch.tensor([5]), -1.0), zero, 2, 32, "key")
        with pytest.raises(ValueError, match="kivi_dequantize: zero holds"):
            kvkernels.kivi_dequantize(codes, scale, zero.index_fill(3, torch.tensor([5]), float("inf")), 2, 32,
                                      "key")
        vc, vs, vz = kvkernels.kivi_quantize(x, 2, 32, "value")
        q, tail = torch.randn(1, 2, 1, D), torch.randn(1, 1, 4, D)
        kvkernels.kivi_attention(q, codes, scale, zero, vc, vs, vz, tail, tail)
        bad_tail = tail.clone()
        bad_tail[0, 0, 1, 1] = float("nan")
        with pytest.raises(ValueError, match="kivi_attention: v_tail holds"):
            kvkernels.kivi_attention(q, codes, scale, zero, vc, vs, vz, tail, bad_tail)
        with pytest.raises(ValueError, match="kivi_attention: k_scale.*negative"):
            kvkernels.kivi_attention(q, codes, -scale - 1, zero, vc, vs, vz, tail, tail)


def test_env_var_turns_checking_on_for_the_process():
    code = ("import torch, kvkernels\n"
            "k = torch.zeros(8, 64); s = torch.tensor([[6]]); n = torch.tensor([[4]], dtype=torch.int32)\n"
            "try:\n"
            "    kvkernels.ragged_attention(torch.zeros(1, 1, 1, 64), k, k, s, n)\n"
            "except ValueError as e:\n"
            "    print('caught', 'ends past the pool' in str(e))\n")
    env = {**os.environ, "KVKERNELS_CHECK": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "caught True", out.stderr[-2000:]


# The head-dim limits the README's support matrix states, checked against the ops (shape checks only, on
# the meta device: no data, no kernels).
KIVI_VALUE_GROUPS = {64: {32, 64}, 80: set(), 96: {32}, 128: {32, 64, 128}, 256: {32, 64, 128}}


@pytest.mark.parametrize("D", sorted(KIVI_VALUE_GROUPS))
def test_documented_head_dim_limits(D):
    meta = dict(device="meta")
    for group in (32, 64, 128):
        x = torch.empty(1, 1, 128, D, **meta)
        ok = group in KIVI_VALUE_GROUPS[D]
        if ok:
            kvkernels.kivi_quantize(x, 2, group, "value")
        else:
            with pytest.raises(ValueError, match=f"D = {D} must be a multiple of group_size = {group}"):
                kvkernels.kivi_quantize(x, 2, group, "value")
        kvkernels.kivi_quantize(x, 2, group, "key")  # keys: groups of tokens, any D
    q = torch.empty(1, 2, 1, D, **meta)
    pool = torch.empty(10, D, **meta)
    kvkernels.ragged_attention(q, pool, pool, torch.zeros(1, 1, dtype=torch.int64, **meta),
                               torch.zeros(1, 1, dtype=torch.int32, **meta))
    with pytest.raises(ValueError, match="head dim 72"):
        kvkernels.ragged_attention(torch.empty(1, 2, 1, 72, **meta), torch.empty(10, 72, **meta),
                                   torch.empty(10, 72, **meta), torch.zeros(1, 1, dtype=torch.int64, **meta),
                                   torch.zeros(1, 1, dtype=torch.int32, **meta))


def _quant_pool():
    """A 1-layer, 1-batch, 2-head quantized pool (group 32, residual 32): 80 and 72 live rows (one quantized
    group each), 8 free."""
    k_pool, v_pool = torch.randn(152, D), torch.randn(152, D)
    seg_start = torch.tensor([[[0, 80]]], dtype=torch.int64)
    seg_len = torch.tensor([[[80, 72]]], dtype=torch.int32)
    return kvkernels.quant_pool_build(k_pool, v_pool, seg_start, seg_len, 2, 32, 32, slack=8)


def test_quant_pool_checks():
    pool = _quant_pool()
    q = torch.randn(1, 2, 1, D)
    with kvkernels.checking():
        kvkernels.quant_pool_attention(q, pool, 0)  # a valid pool passes
        kvkernels.quant_pool_append(pool, 0, torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D))
        bad_q = q.clone()
        bad_q[0, 1, 0, 3] = float("inf")
        with pytest.raises(ValueError, match=r"quant_pool_attention.*q holds 1 NaN/inf"):
            kvkernels.quant_pool_attention(bad_q, pool, 0)
        bad_new = torch.randn(1, 2, 1, D)
        bad_new[0, 0, 0, 5] = float("nan")
        with pytest.raises(ValueError, match=r"quant_pool_append.*k_new holds 1 NaN/inf"):
            kvkernels.quant_pool_append(pool, 0, bad_new, torch.randn(1, 2, 1, D))
        assert bool((pool.q_len > 0).all())
        start = pool.q_start.clone()
        pool.q_start[0, 0, 1] = pool.v_codes.shape[0]  # its quantized rows start past the pool's
        with pytest.raises(ValueError, match=r"quant_pool_attention.*ends past the pool: q_start \+ q_len"):
            kvkernels.quant_pool_attention(q, pool, 0)
        pool.q_start[0, 0, 1] = start[0, 0, 1] - 16  # now overlaps segment 0's quantized rows
        with pytest.raises(ValueError, match=r"quant_pool_append.*segments overlap"):
            kvkernels.quant_pool_append(pool, 0, torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D))
        restored = _quant_pool()
        restored.t_head[0, 0, 0] = restored.k_tail.shape[-2]
        with pytest.raises(ValueError, match=r"quant_pool_attention.*t_head\[0, 0\] = \d+ is past the"):
            kvkernels.quant_pool_attention(q, restored, 0)
