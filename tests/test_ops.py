"""The op contract as a whole: registration, opcheck, torch.compile, dispatch and bad inputs.

Numerical correctness of each op lives in tests/test_<family>.py; here every op is exercised through
``torch.ops.kvkernels`` on the reference backend.
"""

import math
import warnings
from pathlib import Path

import pytest
import torch

import kvkernels

OPS = ["kvzip_score", "topk_mask", "compact_kv", "ragged_append", "ragged_attention", "kivi_quantize",
       "kivi_dequantize", "kivi_attention", "lowrank_residual"]


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def small_pool(L=2, B=1, H=3, N=9, D=64, slack=4, dtype=torch.float32):
    keys = [rand(B, H, N, D, dtype=dtype) for _ in range(L)]
    values = [rand(B, H, N, D, dtype=dtype) for _ in range(L)]
    keep = torch.rand(L, B, H, N) < 0.5
    return keys, values, keep, int(keep.sum()), slack


def kivi_inputs(B=1, Hq=3, Hkv=1, Lq=1, D=64, Tq=32, R=5, bits=2, G=32, lowrank=False):
    q = rand(B, Hq, Lq, D)
    kc, ks, kz = kvkernels.kivi_quantize(rand(B, Hkv, Tq, D), bits, G, "key")
    vc, vs, vz = kvkernels.kivi_quantize(rand(B, Hkv, Tq, D), bits, G, "value")
    lr = [rand(B, Hkv, Tq, 2), rand(B, Hkv, D, 2), rand(B, Hkv, Tq, 2), rand(B, Hkv, D, 2)] if lowrank else [None] * 4
    return (q, kc, ks, kz, vc, vs, vz, rand(B, Hkv, R, D), rand(B, Hkv, R, D), bits, G, None, *lr)


def op_samples():
    keys, values, keep, num_kept, slack = small_pool()
    pool = kvkernels.compact_kv(keys, values, keep, num_kept, slack)
    yield "kvzip_score", (rand(1, 6, 5, 64), rand(1, 2, 40, 64), rand(1, 2, 5, 64), 4, 10, 27, None)
    yield "kvzip_score", (rand(1, 6, 5, 64), rand(1, 2, 40, 64), rand(1, 2, 5, 64), 4, 10, 27, 0.1, rand(1, 6, 5))
    yield "topk_mask", (rand(3, 50), 7)
    yield "compact_kv", (keys, values, keep, num_kept, slack)
    yield "ragged_append", (*pool, 1, rand(1, 3, 2, 64), rand(1, 3, 2, 64))
    yield "ragged_attention", (rand(1, 9, 2, 64), pool.k_pool, pool.v_pool, pool.seg_start[0], pool.seg_len[0],
                               None, True)
    yield "kivi_quantize", (rand(1, 2, 64, 64), 2, 32, "key")
    yield "kivi_dequantize", (*kvkernels.kivi_quantize(rand(1, 2, 8, 64), 4, 32, "value"), 4, 32, "value")
    yield "kivi_attention", kivi_inputs(lowrank=True)
    yield "lowrank_residual", (rand(1, 2, 20, 64), 3, 2)


@pytest.mark.parametrize("name,args", list(op_samples()), ids=[n for n, _ in op_samples()])
def test_opcheck(name, args):
    # opcheck runs the op through the schema, fake-tensor, autograd-registration and AOT-dispatch checks.
    torch.library.opcheck(getattr(torch.ops.kvkernels, name).default, args)


def test_every_op_is_registered():
    for name in OPS:
        assert hasattr(torch.ops.kvkernels, name), name


def test_import_does_not_import_triton_or_cupy():
    import subprocess
    import sys

    code = "import sys, kvkernels; print('triton' in sys.modules, 'cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_compile_fullgraph_compress_append_attend():
    """A small compress -> append -> attend sequence compiles as one graph and matches eager."""
    L, B, Hkv, Hq, N, D, slack = 2, 1, 3, 9, 12, 64, 4
    keys = [rand(B, Hkv, N, D) for _ in range(L)]
    values = [rand(B, Hkv, N, D) for _ in range(L)]
    scores = rand(L, B, Hkv, N)
    num_kept = 20
    q = rand(B, Hq, 1, D)
    k_new, v_new = rand(B, Hkv, 1, D), rand(B, Hkv, 1, D)

    def step(keys, values, scores, q, k_new, v_new):
        flat = scores.permute(1, 0, 2, 3).reshape(B, L * Hkv * N)
        keep = torch.ops.kvkernels.topk_mask(flat, num_kept // B).view(B, L, Hkv, N).permute(1, 0, 2, 3)
        k_pool, v_pool, start, length, cap = torch.ops.kvkernels.compact_kv(keys, values, keep.contiguous(),
                                                                            num_kept, slack)
        torch.ops.kvkernels.ragged_append(k_pool, v_pool, start, length, cap, 1, k_new, v_new)
        o, lse = torch.ops.kvkernels.ragged_attention(q, k_pool, v_pool, start[1], length[1], None, True)
        return o, lse, length

    eager = step(keys, values, scores, q, k_new, v_new)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")(keys, values, scores, q, k_new, v_new)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


# --------------------------------------------------------------------------------------------------
# Dispatch


def test_backend_env_and_context(monkeypatch):
    monkeypatch.setenv("KVKERNELS_BACKEND", "reference")
    assert kvkernels.current_backend() == "reference"
    with kvkernels.use_backend("auto"):
        assert kvkernels.current_backend() == "auto"
        kvkernels.topk_mask(rand(2, 5), 2)
        assert kvkernels.last_choice() == ("topk_mask", "reference")  # auto on CPU = cpu, which falls through to reference for ops it lacks
        if not torch.cuda.is_available():
            q = rand(1, 3, 1, 64)
            kvkernels.ragged_attention(q, rand(4, 64), rand(4, 64), torch.zeros(1, 1, dtype=torch.int64),
                                       torch.full((1, 1), 4, dtype=torch.int32))
            assert kvkernels.last_choice() == ("ragged_attention", "cpu")  # ops it implements run on it
    assert kvkernels.current_backend() == "reference"
    monkeypatch.setenv("KVKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="KVKERNELS_BACKEND.*unknown backend 'fast'"):
        kvkernels.current_backend()
    with pytest.raises(ValueError, match="use_backend.*accepted"):
        with kvkernels.use_backend("cuda"):
            pass


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kvkernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kvkernels.topk_mask(rand(2, 5), 2)


def test_cupy_falls_through_for_ops_it_lacks_and_refuses_cpu():
    with kvkernels.use_backend("cupy"):
        with pytest.raises(RuntimeError, match="CuPy kernels need CUDA tensors"):
            kvkernels.topk_mask(rand(2, 5), 2)
    # cupy has no lowrank kernel: it falls through to triton (the interpreter runs it on CPU here).
    with kvkernels.use_backend("cupy"):
        kvkernels.lowrank_residual(rand(1, 1, 8, 64), 2, 1)
    assert kvkernels.last_choice() == ("lowrank_residual", "triton")


# --------------------------------------------------------------------------------------------------
# Bad inputs: every op names the argument and what it accepts.

BAD = [
    ("kvzip_score", lambda: kvkernels.kvzip_score(rand(1, 6, 5, 64), rand(1, 4, 40, 64), rand(1, 4, 5, 64), 0, 0, 8),
     ValueError, "multiple of k's KV head count 4"),
    ("kvzip_score", lambda: kvkernels.kvzip_score(rand(1, 6, 5, 60), rand(1, 2, 40, 60), rand(1, 2, 5, 60), 0, 0, 8),
     ValueError, "head dim 60; accepted: 64, 80, 96, 128, 256"),
    ("kvzip_score", lambda: kvkernels.kvzip_score(rand(1, 6, 5, 64), rand(1, 2, 40, 64), rand(1, 2, 5, 64), 4, 2, 8),
     ValueError, "chunk_start = 2 is out of range"),
    ("kvzip_score", lambda: kvkernels.kvzip_score(rand(1, 6, 5, 64), rand(1, 2, 40, 64), rand(1, 2, 5, 64), 0, 0, 41),
     ValueError, "chunk_end = 41 is out of range"),
    ("kvzip_score", lambda: kvkernels.kvzip_score(rand(1, 6, 5, 64), rand(1, 2, 40, 64).half(), rand(1, 2, 5, 64),
                                                  0, 0, 8), TypeError, "k has dtype torch.float16"),
    ("kvzip_score", lambda: kvkernels.kvzip_score(rand(1, 6, 5, 64), rand(1, 2, 40, 64), rand(1, 2, 4, 64), 0, 0, 8),
     ValueError, r"k_self must have shape \(1, 2, 5, 64\)"),
    ("kvzip_score", lambda: kvkernels.kvzip_score(rand(1, 6, 5, 64), rand(1, 2, 40, 64), rand(1, 2, 5, 64), 0, 0, 8,
                                                  sm_scale=-1.0), ValueError, "sm_scale"),
    ("kvzip_score", lambda: kvkernels.kvzip_score(rand(1, 6, 5, 64), rand(1, 2, 40, 64), rand(1, 2, 5, 64), 0, 0, 8,
                                                  row_lse=rand(1, 6, 4)), ValueError, r"row_lse must have shape \(1, 6, 5\)"),
    ("kvzip_score", lambda: kvkernels.kvzip_score(rand(1, 6, 5, 64), rand(1, 2, 40, 64), rand(1, 2, 5, 64), 0, 0, 8,
                                                  row_lse=rand(1, 6, 5).double()), TypeError,
     "row_lse has dtype torch.float64; accepted: float32"),
    ("topk_mask", lambda: kvkernels.topk_mask(rand(2, 5).half(), 2), TypeError, "scores has dtype torch.float16"),
    ("topk_mask", lambda: kvkernels.topk_mask(rand(10), 2), ValueError, "scores must have 2 dims"),
    ("topk_mask", lambda: kvkernels.topk_mask(rand(2, 5), -1), ValueError, "k = -1 is out of range"),
    ("compact_kv", lambda: kvkernels.compact_kv(*small_pool()[:2], torch.ones(2, 1, 3, 9, dtype=torch.bool), 5, 0),
     ValueError, "num_kept = 5 but keep has 54 True entries"),
    ("compact_kv", lambda: kvkernels.compact_kv(*small_pool()[:2], torch.ones(3, 1, 3, 9, dtype=torch.bool), 81, 0),
     ValueError, "keys must be a list of L = 3 tensors"),
    ("compact_kv", lambda: kvkernels.compact_kv(*small_pool()[:2], torch.ones(2, 1, 3, 9), 54, 0),
     TypeError, "keep has dtype torch.float32; accepted: bool"),
    ("compact_kv", lambda: kvkernels.compact_kv(*small_pool()[:3], 54, -1), ValueError, "slack = -1"),
    ("ragged_attention", lambda: kvkernels.ragged_attention(rand(2, 9, 1, 64), rand(10, 64), rand(10, 64),
                                                            torch.zeros(1, 3, dtype=torch.long),
                                                            torch.zeros(1, 3, dtype=torch.int32)),
     ValueError, r"seg_start must have shape \[B=2, Hkv\]"),
    ("ragged_attention", lambda: kvkernels.ragged_attention(rand(1, 9, 1, 64), rand(10, 64), rand(10, 64),
                                                            torch.zeros(1, 3, dtype=torch.int32),
                                                            torch.zeros(1, 3, dtype=torch.int32)),
     TypeError, "seg_start has dtype torch.int32; accepted: int64"),
    ("ragged_attention", lambda: kvkernels.ragged_attention(rand(1, 9, 1, 64), rand(10, 128), rand(10, 128),
                                                            torch.zeros(1, 3, dtype=torch.long),
                                                            torch.zeros(1, 3, dtype=torch.int32)),
     ValueError, "k_pool rows have 128 channels"),
    ("kivi_quantize", lambda: kvkernels.kivi_quantize(rand(1, 1, 48, 64), 2, 32, "key"), ValueError,
     "T = 48 must be a multiple of group_size = 32"),
    ("kivi_quantize", lambda: kvkernels.kivi_quantize(rand(1, 1, 32, 64), 3, 32, "key"), ValueError,
     "bits = 3; accepted: 2, 4"),
    ("kivi_quantize", lambda: kvkernels.kivi_quantize(rand(1, 1, 32, 64), 2, 16, "key"), ValueError,
     "group_size = 16; accepted: 32, 64, 128"),
    ("kivi_quantize", lambda: kvkernels.kivi_quantize(rand(1, 1, 32, 64), 2, 128, "value"), ValueError,
     "D = 64 must be a multiple of group_size = 128"),
    ("kivi_quantize", lambda: kvkernels.kivi_quantize(rand(1, 1, 32, 64), 2, 32, "channel"), ValueError,
     "axis = 'channel'; accepted"),
    ("kivi_dequantize", lambda: kvkernels.kivi_dequantize(torch.zeros(1, 1, 2, 64, dtype=torch.int32),
                                                          rand(1, 1, 2, 64), rand(1, 1, 2, 64), 2, 32, "key"),
     ValueError, r"scale must have shape \(1, 1, 1, 64\)"),
    ("kivi_attention", lambda: kvkernels.kivi_attention(*kivi_inputs(R=5)[:7], rand(1, 1, 5, 64), rand(1, 1, 4, 64)),
     ValueError, "Tk_quant \\+ Rk = 32 \\+ 5 != Tv_quant \\+ Rv = 32 \\+ 4"),
    ("kivi_attention", lambda: kvkernels.kivi_attention(*kivi_inputs()[:9], k_lowrank=(rand(1, 1, 32, 2), None)),
     ValueError, "k_lowrank needs both U and W"),
    ("lowrank_residual", lambda: kvkernels.lowrank_residual(rand(1, 1, 8, 64), 9, 2), ValueError,
     r"rank = 9 is out of range; accepted: \[1, 8\]"),
    ("lowrank_residual", lambda: kvkernels.lowrank_residual(rand(1, 1, 8, 64), 2, 0), ValueError, "iters = 0"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_raise_clear_errors(name, call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    assert f"kvkernels.{name}" in str(info.value)


def test_append_overflow_writes_nothing():
    keys, values, keep, num_kept, _ = small_pool()
    pool = kvkernels.compact_kv(keys, values, keep, num_kept, slack=2)
    before = [t.clone() for t in pool]
    with pytest.raises(kvkernels.PoolOverflowError, match="would overflow segment"):
        kvkernels.ragged_append(pool, 0, rand(1, 3, 3, 64), rand(1, 3, 3, 64))
    for b, a in zip(before, pool):
        assert torch.equal(b, a)


def test_default_sm_scale_is_inverse_sqrt_d():
    q, k = rand(1, 3, 2, 64), rand(1, 1, 20, 64)
    ks = rand(1, 1, 2, 64)
    default = kvkernels.kvzip_score(q, k, ks, 0, 0, 20)
    explicit = kvkernels.kvzip_score(q, k, ks, 0, 0, 20, sm_scale=1 / math.sqrt(64))
    torch.testing.assert_close(default, explicit)


@pytest.mark.parametrize("call", ["api", "torch.ops"])
def test_wrong_python_types_are_rejected_by_the_schema(call):
    # torch checks scalar argument types against the op schema before our validation runs; its
    # message names the argument and the expected type. The Python API's direct eager path (no
    # dispatcher) checks the schema's types too and hands a mismatch to the dispatcher, for this error.
    topk = kvkernels.topk_mask if call == "api" else torch.ops.kvkernels.topk_mask
    with pytest.raises(RuntimeError, match="Expected a value of type 'int' for argument 'k'"):
        topk(rand(2, 5), 2.0)
    with pytest.raises(RuntimeError, match="Expected a value of type 'bool' for argument 'return_lse'"):
        pool = kvkernels.compact_kv(*small_pool())
        attention = kvkernels.ragged_attention if call == "api" else torch.ops.kvkernels.ragged_attention
        attention(rand(1, 6, 1, 64), pool.k_pool, pool.v_pool, pool.seg_start[0], pool.seg_len[0], None, "yes")


def test_api_calls_skip_the_dispatcher_only_in_plain_eager_mode(monkeypatch):
    """kvkernels.<op> calls the op's function directly in plain eager mode; under a dispatch mode, with a
    tensor that requires grad, or with arguments the schema rejects it goes through torch.ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kvkernels import ops
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = rand(2, 5)
    assert ops.topk_mask._dispatcher_adds_nothing((x, 2), {})
    with Spy():
        kvkernels.topk_mask(x, 2)
    assert "kvkernels.topk_mask.default" in seen
    assert not ops.topk_mask._dispatcher_adds_nothing((x.requires_grad_(), 2), {})
    assert not ops.topk_mask._dispatcher_adds_nothing((x.detach(), 2.0), {})
    assert not ops.ragged_attention._dispatcher_adds_nothing((x,) * 5, {"nonexistent": 1})
    with torch.no_grad():
        assert ops.topk_mask._dispatcher_adds_nothing((x, 2), {})


def test_fast_path_ops_go_through_the_dispatcher_only_when_it_adds_something(monkeypatch):
    """The decode ops' fast path (one predicate, then the kernel) runs for valid positional calls in plain
    eager mode; invalid input, meta tensors, a tensor that requires grad or a dispatch mode go through
    torch.ops (whose checks then name the bad argument). Keyword calls take the general direct path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kvkernels import ops

    pool = kvkernels.compact_kv(*small_pool())
    args = (rand(1, 9, 1, 64), pool.k_pool, pool.v_pool, pool.seg_start[0], pool.seg_len[0])
    calls = []
    real = ops.ragged_attention._op
    monkeypatch.setattr(ops.ragged_attention, "_op", lambda *a, **k: calls.append(1) or real(*a, **k))

    def through_dispatcher(*a, **k) -> bool:
        calls.clear()
        kvkernels.ragged_attention(*a, **k)
        return bool(calls)

    assert not through_dispatcher(*args)
    assert not through_dispatcher(*args, 0.125, True)
    assert not through_dispatcher(*args, sm_scale=0.125)
    with pytest.raises(RuntimeError, match="Expected a value of type 'bool' for argument 'return_lse'"):
        through_dispatcher(*args, return_lse="yes")
    assert through_dispatcher(*args, 1, False)  # an int sm_scale: the schema converts it
    with torch.no_grad():
        assert not through_dispatcher(*args)
    assert through_dispatcher(args[0].clone().requires_grad_(), *args[1:])
    assert through_dispatcher(*(t.to("meta") for t in args))
    with pytest.raises(ValueError, match="seg_len must have 2 dims"):
        through_dispatcher(*args[:4], pool.seg_len)

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert through_dispatcher(*args)


def _strided_q(B, Hq, Lq, D):
    """A [B, Hq, Lq, D] query whose storage is Lq-major (as after a [B, Lq, Hq, D] -> transpose)."""
    return rand(B, Lq, Hq, D).transpose(1, 2)


@pytest.mark.parametrize("name", ["topk_mask", "ragged_attention", "kivi_attention"])
def test_fake_output_strides_match_real_for_strided_inputs(name):
    """Review fix: the fake kernels used empty_like(input), which copies a strided input's layout, while
    every backend returns a contiguous output; opcheck's fake-tensor test rejects the mismatch (and
    torch.compile would read the real output with the fake's strides)."""
    if name == "topk_mask":
        args = (rand(6, 5).t(), 2)  # [5, 6] with column-major storage
    elif name == "ragged_attention":
        pool = kvkernels.compact_kv(*small_pool())
        args = (_strided_q(1, 6, 3, 64), pool.k_pool, pool.v_pool, pool.seg_start[0], pool.seg_len[0], None, True)
    else:
        args = (_strided_q(1, 3, 2, 64),) + kivi_inputs(Lq=2)[1:]
    assert not args[0].is_contiguous()
    torch.library.opcheck(getattr(torch.ops.kvkernels, name).default, args)


def _mutations(arg):
    """Variants of one valid argument, most of them invalid: other dtypes, shapes and devices for a tensor,
    out-of-range values and a bool for an int."""
    if isinstance(arg, torch.Tensor):
        other = {torch.float32: torch.float64, torch.int32: torch.int64, torch.int64: torch.int32}
        yield arg.to(other.get(arg.dtype, torch.float32))
        yield arg.unsqueeze(-1)
        yield arg.to("meta")
        if arg.dim() and arg.shape[0] > 1:
            yield arg[1:]
        if arg.dim() > 1 and arg.shape[-1] > 1:
            yield arg[..., 1:]
    elif isinstance(arg, int) and not isinstance(arg, bool):
        yield from (-1, 3, 10 ** 6, True, float(arg))


def _fast_check_cases():
    from kvkernels import _validate as V

    keys, values, keep, num_kept, slack = small_pool()
    pool = kvkernels.compact_kv(keys, values, keep, num_kept, slack)
    yield (V._append_ok, V.check_ragged_append, (*pool, 1, rand(1, 3, 2, 64), rand(1, 3, 2, 64)))
    yield (V._attention_ok, V.check_ragged_attention,
           (rand(1, 9, 1, 64), pool.k_pool, pool.v_pool, pool.seg_start[0], pool.seg_len[0]))
    qp = kvkernels.quant_pool_from_kv(keys, values, keep, 2, 32, 4, 8)
    yield (V._quant_append_ok, V.check_quant_pool_append,
           (*qp.buffers()[:6], qp.k_tail, qp.v_tail, qp.q_start, qp.q_len, qp.q_cap, qp.t_head, qp.seg_len,
            qp.seg_cap, 1, rand(1, 3, 1, 64), rand(1, 3, 1, 64), 2, 32, 4))
    yield (V._quant_attention_ok, V.check_quant_pool_attention,
           (rand(1, 9, 1, 64), *qp.buffers()[:6], qp.k_tail[1], qp.v_tail[1], qp.q_start[1], qp.q_len[1],
            qp.t_head[1], qp.seg_len[1], 2, 32))


@pytest.mark.parametrize("case", range(4), ids=["ragged_append", "ragged_attention", "quant_pool_append",
                                                "quant_pool_attention"])
def test_fast_checks_imply_detailed_checks(case, monkeypatch):
    """The decode path's one-expression checks accept valid input, and accept no variant (wrong dtype, shape,
    device, range, type of any one argument) that the detailed check rejects."""
    fast, check, args = list(_fast_check_cases())[case]
    assert fast(*args), "the fast check rejects valid input"
    monkeypatch.setattr(kvkernels._validate, fast.__name__, lambda *a: False)  # run the detailed checks only
    check(*args)
    rejected = 0
    for i, arg in enumerate(args):
        for bad in _mutations(arg):
            mutated = (*args[:i], bad, *args[i + 1:])
            try:
                check(*mutated)
            except (TypeError, ValueError):
                rejected += 1
                assert not fast(*mutated), f"the fast check accepts argument {i} = {bad!r:.80}, which is invalid"
    assert rejected >= len(args), "too few invalid variants: the test would not test the fast check"


def _more_variants(arg):
    """Beyond _mutations: dim 1 shortened (e.g. a head count that is not a multiple of the KV heads), a Parameter
    (a tensor subclass), None, a list; int64 overflows for an int."""
    if isinstance(arg, torch.Tensor):
        if arg.dim() > 1 and arg.shape[1] > 1:
            yield arg[:, 1:]
        yield torch.nn.Parameter(arg.detach().float(), requires_grad=False)
    elif isinstance(arg, int) and not isinstance(arg, bool):
        yield from (2 ** 63, -2 ** 70)
    yield None
    yield [arg]


@pytest.mark.parametrize("case", range(4), ids=["ragged_append", "ragged_attention", "quant_pool_append",
                                                "quant_pool_attention"])
def test_cxx_checks_equal_the_python_checks(case, monkeypatch):
    """The fast paths' checks in C++ (cpu/csrc/bindings.cpp) return what the Python ones return, on valid input
    and on every variant of one argument (dtype, shape, device, range, Python type, requires_grad), on all-meta
    input, and on the trailing schema arguments (sm_scale, return_lse, flush_after)."""
    from kvkernels import _validate as V
    from kvkernels.cpu import native

    if native.bindings() is None:
        pytest.skip(f"no C++ checks here: {native.status()}")
    name = ["ragged_append", "ragged_attention", "quant_pool_append", "quant_pool_attention"][case]
    accepts = getattr(V, f"{name}_accepts")
    _, _, args = list(_fast_check_cases())[case]
    n = len(args)
    args = (*args, *[(), (None, False), (False,), (None, False)][case])
    variants = [args, tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)]
    for i, arg in enumerate(args[:n]):
        bad = list(_mutations(arg)) + list(_more_variants(arg))
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            bad.append(arg.detach().clone().requires_grad_())
        variants += [(*args[:i], b, *args[i + 1:]) for b in bad]
    for i in range(n, len(args)):
        variants += [(*args[:i], b, *args[i + 1:]) for b in (0.5, 1, "x", float("nan"), True, 1, None)]
    variants += [args[:n - 1], (*args, False, False)]  # an argument missing, one too many
    grad = [v for v in variants if any(isinstance(a, torch.Tensor) and a.requires_grad for a in v)]
    compiled = [accepts(*v) for v in variants]
    with torch.no_grad():  # outside grad mode, requires_grad does not matter
        compiled_no_grad = [accepts(*v) for v in grad]
    monkeypatch.setattr(V, "_cxx_checks", lambda: None)
    python = [accepts(*v) for v in variants]
    with torch.no_grad():
        python_no_grad = [accepts(*v) for v in grad]
    assert grad and all(compiled_no_grad) and all(python_no_grad)
    assert compiled[0] and python[0]
    mismatches = [i for i, (c, p) in enumerate(zip(compiled, python)) if c != p]
    assert not mismatches, f"C++ and Python checks differ on variants {mismatches}"
    assert python.count(False) >= n, "too few invalid variants to test anything"


def test_accept_checks_never_build_the_cpu_kernels(monkeypatch):
    """An op's accept check uses the C++ bindings only once the cpu backend has built them: CUDA-only use (or a
    check before any CPU call) never compiles anything; the Python checks answer meanwhile."""
    from kvkernels import _validate as V
    from kvkernels.cpu import native

    monkeypatch.setattr(native, "_state", {})  # nothing built or loaded in this process, as on a fresh machine
    _, _, args = list(_fast_check_cases())[1]
    assert V.ragged_attention_accepts(*args)
    assert native._state == {}


def test_cpu_compiled_kernels_fall_back_with_a_warning(monkeypatch, tmp_path):
    """No usable compiler: one RuntimeWarning that says why, then the PyTorch path (same results);
    KVKERNELS_NATIVE=0: the PyTorch path, silently."""
    from kvkernels.cpu import native

    q = rand(1, 3, 1, 64)
    pool = rand(16, 64), rand(16, 64)
    tables = torch.zeros(1, 1, dtype=torch.int64), torch.full((1, 1), 8, dtype=torch.int32)
    with kvkernels.use_backend("reference"):
        want = kvkernels.ragged_attention(q, *pool, *tables)
    monkeypatch.setenv("KVKERNELS_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="compiled kernels are unavailable .*build failed"):
            assert native.library() is None
        assert "off, build failed" in native.status()
        with kvkernels.use_backend("cpu"):
            torch.testing.assert_close(kvkernels.ragged_attention(q, *pool, *tables), want)
        native.reset()
        monkeypatch.setenv("KVKERNELS_NATIVE", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.library() is None
        assert native.status() == ("compiled kernels: off, turned off by KVKERNELS_NATIVE=0; "
                                   "C++ bindings: off, compiled kernels off")
    finally:
        native.reset()


def test_compiled_kernel_sources_ship_with_the_package():
    """Every file the build reads (sources and headers) matches setup.py's package_data, so an installed
    kvkernels can build its cpu kernels; and every file in csrc/ is one the build reads."""
    import fnmatch
    import re

    from kvkernels.cpu import native

    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    globs = re.findall(r'"(cpu/csrc/[^"]+)"', setup)
    package = Path(native.__file__).parents[1]
    built = {path.relative_to(package).as_posix() for path in (*native.SOURCES, *native.HEADERS, native.BINDINGS)}
    assert built and all(any(fnmatch.fnmatch(path, g) for g in globs) for path in built), (built, globs)
    assert {p.relative_to(package).as_posix() for p in native.CSRC.iterdir()} == built


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="needs an x86-64 CPU with AVX2 and FMA")
def test_cpu_scoring_kernels_built_for_avx2_match_eager(tmp_path, monkeypatch):
    """The scoring kernels' 8-lane build (what a CPU without AVX-512 compiles: other tiles, other horizontal
    reductions) against the eager paths, built here with -march=x86-64-v3 whatever this CPU has."""
    from kvkernels.cpu import native
    from kvkernels.cpu.kvzip_score import _max_logit_minus_lse
    from kvkernels.cpu.ragged_attention import context_then_causal_self

    cxx = native._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("KVKERNELS_CACHE_DIR", str(tmp_path))
    flags = tuple("-march=x86-64-v3" if f == "-march=native" else f for f in native.FLAGS)
    lib = native.ctypes.CDLL(str(native._build(cxx, flags)))
    native._declare(lib)
    assert lib.kvk_keys_per_tile() == 16  # the 8-lane tile
    gen = torch.Generator().manual_seed(7)
    for Hkv, G, D, N, Lq, scored in ((3, 3, 64, 37, 21, (2, 5, 30)), (1, 2, 128, 70, 5, (3, 10, 70)),
                                     (2, 1, 80, 3, 40, (1, 1, 3))):
        q = torch.randn(1, Hkv * G, Lq, D, generator=gen)
        k, v = (torch.randn(1, Hkv, N + Lq, D, generator=gen) for _ in range(2))
        _, start, end = scored
        o, row_lse = native.reconstruction_attention(lib, q, k, v, N, 0.1, scored)
        with native.forced(False):
            o_eager, lse_eager = context_then_causal_self(q, k, v, N, 0.1, scored=scored)
        torch.testing.assert_close(o, o_eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(row_lse, lse_eager, rtol=1e-5, atol=1e-5)
        q_rows, lse = q.reshape(Hkv, G * Lq, D), row_lse.reshape(Hkv, G * Lq)
        best = native.score_max(lib, q_rows, 0.1, lse, k[0, :, start:end])
        with native.forced(False):
            want = _max_logit_minus_lse(q_rows, 0.1, k, lse, start, end)
        torch.testing.assert_close(best, want, rtol=1e-5, atol=1e-5)
