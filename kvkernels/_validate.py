"""Input checks shared by every backend of every op.

Each ``check_<op>`` raises ``TypeError`` (wrong dtype / type) or ``ValueError`` (wrong shape, range or
value) naming the argument, what it got and what is accepted. Shape and dtype checks read no tensor
data, so they also run inside the fake (meta) kernels under torch.compile. Checks that must read data
(``num_kept`` against ``keep.sum()``, append overflow) live with the ops that need them.
"""

from __future__ import annotations

import math

import torch

from kvkernels.cpu import native as _native  # stdlib + torch only: importing it builds nothing

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 80, 96, 128, 256)
KIVI_BITS = (2, 4)
KIVI_GROUPS = (32, 64, 128)
KIVI_AXES = ("key", "value")


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def fail(op: str, msg: str, kind=ValueError):
    raise kind(f"kvkernels.{op}: {msg}")


def tensor(op: str, name: str, t, ndim: int | None = None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if ndim is not None and t.dim() != ndim:
        fail(op, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(op, f"{name} has dtype {t.dtype}; accepted: {_names(dtypes)}", TypeError)


def same_device(op: str, **tensors):
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for n, d in devices.items():
        if d != first:
            listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
            fail(op, f"all tensors must be on one device; got {listed}")


def shape_is(op: str, name: str, t: torch.Tensor, expected: tuple):
    if tuple(t.shape) != tuple(expected):
        fail(op, f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def head_dim(op: str, name: str, D: int):
    if D not in HEAD_DIMS:
        fail(op, f"{name} has head dim {D}; accepted: {', '.join(map(str, HEAD_DIMS))}")


def gqa(op: str, Hq: int, Hkv: int, kv_name: str) -> int:
    if Hkv <= 0 or Hq % Hkv != 0:
        fail(op, f"the query head count {Hq} must be a positive multiple of {kv_name}'s KV head count {Hkv}")
    return Hq // Hkv


def integer(op: str, name: str, v, lo: int | None = None, hi: int | None = None, what: str = ""):
    if isinstance(v, bool) or not isinstance(v, int):
        fail(op, f"{name} must be an int, got {type(v).__name__}", TypeError)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{'' if lo is None else lo}, {'' if hi is None else hi}]"
        fail(op, f"{name} = {v} is out of range; accepted: {rng}{' ' + what if what else ''}")


def scale_value(op: str, sm_scale, D: int) -> float:
    """sm_scale, defaulting to 1/sqrt(D); must be finite and positive."""
    if sm_scale is None:
        return 1.0 / math.sqrt(D)
    if not isinstance(sm_scale, (int, float)) or isinstance(sm_scale, bool):
        fail(op, f"sm_scale must be a float or None, got {type(sm_scale).__name__}", TypeError)
    if not math.isfinite(sm_scale) or sm_scale <= 0:
        fail(op, f"sm_scale = {sm_scale} must be finite and > 0")
    return float(sm_scale)


def check_kvzip_score(q, k, k_self, sink_len, chunk_start, chunk_end, row_lse=None):
    op = "kvzip_score"
    tensor(op, "q", q, 4, FLOAT_DTYPES)
    tensor(op, "k", k, 4, (q.dtype,))
    tensor(op, "k_self", k_self, 4, (q.dtype,))
    same_device(op, q=q, k=k, k_self=k_self)
    B, Hq, Lq, D = q.shape
    head_dim(op, "q", D)
    Hkv, N = k.shape[1], k.shape[2]
    gqa(op, Hq, Hkv, "k")
    shape_is(op, "k", k, (B, Hkv, N, D))
    shape_is(op, "k_self", k_self, (B, Hkv, Lq, D))
    if Lq < 1:
        fail(op, "q must have at least one query row (Lq >= 1)")
    integer(op, "sink_len", sink_len, 0)
    integer(op, "chunk_start", chunk_start, sink_len, None, "(chunk_start >= sink_len)")
    integer(op, "chunk_end", chunk_end, chunk_start + 1, N, "(chunk_start < chunk_end <= N)")
    if row_lse is not None:
        tensor(op, "row_lse", row_lse, 3, (torch.float32,))
        same_device(op, q=q, row_lse=row_lse)
        shape_is(op, "row_lse", row_lse, (B, Hq, Lq))


def check_topk_mask(scores, k):
    op = "topk_mask"
    tensor(op, "scores", scores, 2, (torch.float32,))
    integer(op, "k", k, 0)


def check_compact_kv(keys, values, keep, num_kept, slack):
    op = "compact_kv"
    tensor(op, "keep", keep, 4, (torch.bool,))
    L, B, H, N = keep.shape
    for name, seq in (("keys", keys), ("values", values)):
        if not isinstance(seq, (list, tuple)) or len(seq) != L:
            fail(op, f"{name} must be a list of L = {L} tensors (keep.shape[0]), got "
                 f"{len(seq) if isinstance(seq, (list, tuple)) else type(seq).__name__}")
    first = keys[0]
    tensor(op, "keys[0]", first, 4, FLOAT_DTYPES)
    D = first.shape[-1]
    for name, seq in (("keys", keys), ("values", values)):
        for i, t in enumerate(seq):
            tensor(op, f"{name}[{i}]", t, 4, (first.dtype,))
            shape_is(op, f"{name}[{i}]", t, (B, H, N, D))
            same_device(op, keep=keep, **{f"{name}[{i}]": t})
    integer(op, "num_kept", num_kept, 0, L * B * H * N)
    integer(op, "slack", slack, 0)


# Decode-path fast checks: ragged_append, ragged_attention and the quantized pool's append and attention run
# once per layer per decoded token, so their checks first try one boolean expression that holds exactly
# when every detailed check below passes (no per-check function calls); only when it fails do the detailed
# checks run, to name the argument in the error. Each predicate must imply its detailed check: keep the
# two in step (tests/test_ops.py::test_fast_checks_imply_detailed_checks).
_T = torch.Tensor


def _append_ok(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new) -> bool:
    if not (type(k_pool) is _T and type(v_pool) is _T and type(seg_start) is _T and type(seg_len) is _T
            and type(seg_cap) is _T and type(k_new) is _T and type(v_new) is _T and type(layer) is int):
        return False
    dt, shape, table = k_pool.dtype, k_pool.shape, seg_start.shape
    dev = k_pool.device
    return (len(shape) == 2 and dt in FLOAT_DTYPES and v_pool.dtype == dt and v_pool.shape == shape
            and len(table) == 3 and seg_start.dtype == torch.int64 and seg_len.dtype == torch.int32
            and seg_cap.dtype == torch.int32 and seg_len.shape == table and seg_cap.shape == table
            and 0 <= layer < table[0] and k_new.dtype == dt and v_new.dtype == dt and k_new.dim() == 4
            and k_new.shape == (table[1], table[2], k_new.shape[2], shape[1]) and v_new.shape == k_new.shape
            and v_pool.device == dev and seg_start.device == dev and seg_len.device == dev
            and seg_cap.device == dev and k_new.device == dev and v_new.device == dev)


def _quant_buffers_ok(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size,
                      tail_dims) -> bool:
    """Fast form of check_kivi_params + quant_pool_buffers."""
    if not (type(k_codes) is _T and type(k_scale) is _T and type(k_zero) is _T and type(v_codes) is _T
            and type(v_scale) is _T and type(v_zero) is _T and type(k_tail) is _T and type(v_tail) is _T
            and type(bits) is int and bits in KIVI_BITS and type(group_size) is int and group_size in KIVI_GROUPS):
        return False
    shape, dt, dev = k_tail.shape, k_tail.dtype, k_tail.device
    if not (len(shape) == tail_dims and dt in FLOAT_DTYPES and v_tail.dtype == dt and v_tail.shape == shape
            and shape[-1] in HEAD_DIMS and v_codes.dim() == 2):
        return False
    D, F, gs, Q = shape[-1], 32 // bits, group_size, v_codes.shape[0]
    return (Q % gs == 0 and v_codes.dtype == torch.int32 and k_codes.dtype == torch.int32
            and v_codes.shape == (Q, D // F) and k_codes.shape == (Q // F, D)
            and k_scale.dtype == dt and k_zero.dtype == dt and v_scale.dtype == dt and v_zero.dtype == dt
            and k_scale.shape == (Q // gs, D) and k_zero.shape == (Q // gs, D)
            and v_scale.shape == (Q, D // gs) and v_zero.shape == (Q, D // gs)
            and k_codes.device == dev and k_scale.device == dev and k_zero.device == dev and v_codes.device == dev
            and v_scale.device == dev and v_zero.device == dev and v_tail.device == dev)


def _tables_ok(table, dev, q_start, *int32_tables) -> bool:
    """q_start int64 and the others int32, all of shape ``table`` on ``dev`` (plain tensors)."""
    return (type(q_start) is _T and q_start.dtype == torch.int64 and q_start.shape == table
            and q_start.device == dev
            and all(type(t) is _T and t.dtype == torch.int32 and t.shape == table and t.device == dev
                    for t in int32_tables))


def _quant_append_ok(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap,
                     t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual) -> bool:
    if not (_quant_buffers_ok(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size, 5)
            and type(residual) is int and residual >= 0 and type(layer) is int
            and type(k_new) is _T and type(v_new) is _T):
        return False
    L, B, H, TC, D = k_tail.shape
    dt, dev = k_tail.dtype, k_tail.device
    return (D % group_size == 0 and 0 <= layer < L and _tables_ok((L, B, H), dev, q_start, q_len, q_cap, t_head,
                                                                   seg_len, seg_cap)
            and k_new.dtype == dt and v_new.dtype == dt and k_new.dim() == 4
            and k_new.shape == (B, H, k_new.shape[2], D) and v_new.shape == k_new.shape
            and k_new.device == dev and v_new.device == dev)


def _quant_attention_ok(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                        t_head, seg_len, bits, group_size) -> bool:
    if not (type(q) is _T and q.dim() == 4 and
            _quant_buffers_ok(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size, 4)):
        return False
    B, Hq, Lq, D = q.shape
    Bt, H, TC, Dt = k_tail.shape
    dev = k_tail.device
    return (q.dtype == k_tail.dtype and D == Dt and Lq >= 1 and Bt == B and H > 0 and Hq % H == 0
            and q.device == dev and _tables_ok((B, H), dev, q_start, q_len, t_head, seg_len))


def _attention_ok(q, k_pool, v_pool, seg_start, seg_len) -> bool:
    if not (type(q) is _T and type(k_pool) is _T and type(v_pool) is _T and type(seg_start) is _T
            and type(seg_len) is _T):
        return False
    qs, dt, dev = q.shape, q.dtype, q.device
    table = seg_start.shape
    return (len(qs) == 4 and dt in FLOAT_DTYPES and qs[3] in HEAD_DIMS and qs[2] >= 1
            and k_pool.dim() == 2 and k_pool.dtype == dt and v_pool.dtype == dt and k_pool.shape[1] == qs[3]
            and v_pool.shape == k_pool.shape and len(table) == 2 and seg_start.dtype == torch.int64
            and seg_len.dtype == torch.int32 and table[0] == qs[0] and seg_len.shape == table
            and table[1] > 0 and qs[1] % table[1] == 0
            and k_pool.device == dev and v_pool.device == dev and seg_start.device == dev and seg_len.device == dev)


# The ops' fast paths (kvkernels.ops.KernelOp): True means the dispatcher would only run the op's function and
# every check would pass: the predicates above, the schema types of the arguments they leave out, and no meta
# tensor or tensor that requires grad. Each has a C++ twin (kvkernels/cpu/csrc/bindings.cpp, same results,
# ~0.3 us instead of 5-15 us) that runs once the cpu backend has built its bindings.
def _scale_arg_ok(sm_scale) -> bool:
    return sm_scale is None or type(sm_scale) is float


def _scale_and_lse_ok(args, first: int) -> bool:
    """args[first:] are the optional (sm_scale, return_lse) of an attention op, with their schema types."""
    sm_scale, return_lse = (*args[first:], None, False)[:2]
    return first <= len(args) <= first + 2 and _scale_arg_ok(sm_scale) and type(return_lse) is bool


def needs_autograd(args) -> bool:
    """Grad mode is on and a (plain) tensor among ``args`` requires grad."""
    if torch.is_grad_enabled():
        for a in args:
            if type(a) is _T and a.requires_grad:
                return True
    return False


def meta_or_autograd(args) -> bool:
    """For arguments a fast check accepted (all tensors on args[0]'s device): meta tensors (the dispatcher runs
    the fake kernel for them) or a tensor that requires grad."""
    return args[0].is_meta or needs_autograd(args)


def _cxx_checks():
    # Built by the cpu backend's first decode call; until then (and on CUDA-only use, or without a compiler)
    # the Python checks run.
    return _native.loaded_bindings()


def ragged_append_accepts(*args) -> bool:
    """(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new)"""
    cxx = _cxx_checks()
    if cxx is not None:
        return cxx.ragged_append_accepts(*args)
    return len(args) == 8 and _append_ok(*args) and not meta_or_autograd(args)


def ragged_attention_accepts(*args) -> bool:
    """(q, k_pool, v_pool, seg_start, seg_len, sm_scale=None, return_lse=False)"""
    cxx = _cxx_checks()
    if cxx is not None:
        return cxx.ragged_attention_accepts(*args)
    return _scale_and_lse_ok(args, 5) and _attention_ok(*args[:5]) and not meta_or_autograd(args)


def quant_pool_append_accepts(*args) -> bool:
    """(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap, t_head, seg_len,
    seg_cap, layer, k_new, v_new, bits, group_size, residual, flush_after=False)"""
    cxx = _cxx_checks()
    if cxx is not None:
        return cxx.quant_pool_append_accepts(*args)
    flush_after = args[20] if len(args) == 21 else False
    return (20 <= len(args) <= 21 and type(flush_after) is bool and _quant_append_ok(*args[:20])
            and not meta_or_autograd(args))


def quant_pool_attention_accepts(*args) -> bool:
    """(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, t_head, seg_len, bits,
    group_size, sm_scale=None, return_lse=False)"""
    cxx = _cxx_checks()
    if cxx is not None:
        return cxx.quant_pool_attention_accepts(*args)
    return _scale_and_lse_ok(args, 15) and _quant_attention_ok(*args[:15]) and not meta_or_autograd(args)


def check_ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new):
    if _append_ok(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new):
        return
    op = "ragged_append"
    tensor(op, "k_pool", k_pool, 2, FLOAT_DTYPES)
    tensor(op, "v_pool", v_pool, 2, (k_pool.dtype,))
    shape_is(op, "v_pool", v_pool, tuple(k_pool.shape))
    tensor(op, "seg_start", seg_start, 3, (torch.int64,))
    tensor(op, "seg_len", seg_len, 3, (torch.int32,))
    tensor(op, "seg_cap", seg_cap, 3, (torch.int32,))
    shape_is(op, "seg_len", seg_len, tuple(seg_start.shape))
    shape_is(op, "seg_cap", seg_cap, tuple(seg_start.shape))
    L, B, H = seg_start.shape
    integer(op, "layer", layer, 0, L - 1, f"(the pool has L = {L} layers)")
    tensor(op, "k_new", k_new, 4, (k_pool.dtype,))
    tensor(op, "v_new", v_new, 4, (k_pool.dtype,))
    t = k_new.shape[2]
    shape_is(op, "k_new", k_new, (B, H, t, k_pool.shape[1]))
    shape_is(op, "v_new", v_new, (B, H, t, k_pool.shape[1]))
    same_device(op, k_pool=k_pool, v_pool=v_pool, seg_start=seg_start, seg_len=seg_len, seg_cap=seg_cap,
                k_new=k_new, v_new=v_new)


def check_ragged_attention(q, k_pool, v_pool, seg_start, seg_len):
    if _attention_ok(q, k_pool, v_pool, seg_start, seg_len):
        return
    op = "ragged_attention"
    tensor(op, "q", q, 4, FLOAT_DTYPES)
    tensor(op, "k_pool", k_pool, 2, (q.dtype,))
    tensor(op, "v_pool", v_pool, 2, (q.dtype,))
    B, Hq, Lq, D = q.shape
    head_dim(op, "q", D)
    if k_pool.shape[1] != D:
        fail(op, f"k_pool rows have {k_pool.shape[1]} channels, q has head dim {D}; they must match")
    shape_is(op, "v_pool", v_pool, tuple(k_pool.shape))
    tensor(op, "seg_start", seg_start, 2, (torch.int64,))
    tensor(op, "seg_len", seg_len, 2, (torch.int32,))
    if seg_start.shape[0] != B:
        fail(op, f"seg_start must have shape [B={B}, Hkv] (one layer: pass seg_start[layer]), "
             f"got {tuple(seg_start.shape)}")
    shape_is(op, "seg_len", seg_len, tuple(seg_start.shape))
    gqa(op, Hq, seg_start.shape[1], "seg_start")
    if Lq < 1:
        fail(op, "q must have at least one query row (Lq >= 1)")
    same_device(op, q=q, k_pool=k_pool, v_pool=v_pool, seg_start=seg_start, seg_len=seg_len)


def check_kivi_params(op, bits, group_size):
    integer(op, "bits", bits)
    if bits not in KIVI_BITS:
        fail(op, f"bits = {bits}; accepted: {', '.join(map(str, KIVI_BITS))}")
    integer(op, "group_size", group_size)
    if group_size not in KIVI_GROUPS:
        fail(op, f"group_size = {group_size}; accepted: {', '.join(map(str, KIVI_GROUPS))}")


def check_axis(op, axis):
    if axis not in KIVI_AXES:
        fail(op, f"axis = {axis!r}; accepted: 'key' (per-channel groups along tokens) or "
             f"'value' (per-token groups along channels)")


def check_kivi_quantize(x, bits, group_size, axis):
    op = "kivi_quantize"
    tensor(op, "x", x, 4, FLOAT_DTYPES)
    check_kivi_params(op, bits, group_size)
    check_axis(op, axis)
    T, D = x.shape[2], x.shape[3]
    if axis == "key" and T % group_size:
        fail(op, f"axis='key' quantizes whole groups of tokens: T = {T} must be a multiple of group_size = {group_size}")
    if axis == "value" and D % group_size:
        fail(op, f"axis='value' groups channels: D = {D} must be a multiple of group_size = {group_size}")


def kivi_layout(op, codes, scale, zero, bits, group_size, axis, prefix=""):
    """Check a packed (codes, scale, zero) triple and return its logical (B, H, T, D)."""
    tensor(op, f"{prefix}codes", codes, 4, (torch.int32,))
    tensor(op, f"{prefix}scale", scale, 4, FLOAT_DTYPES)
    tensor(op, f"{prefix}zero", zero, 4, (scale.dtype,))
    F = 32 // bits
    B, H = codes.shape[:2]
    if axis == "key":
        T, D = codes.shape[2] * F, codes.shape[3]
        if T % group_size:
            fail(op, f"{prefix}codes holds T = {T} tokens, not a whole number of groups of {group_size}")
        groups = (B, H, T // group_size, D)
    else:
        T, D = codes.shape[2], codes.shape[3] * F
        if D % group_size:
            fail(op, f"{prefix}codes holds D = {D} channels, not a whole number of groups of {group_size}")
        groups = (B, H, T, D // group_size)
    shape_is(op, f"{prefix}scale", scale, groups)
    shape_is(op, f"{prefix}zero", zero, groups)
    same_device(op, **{f"{prefix}codes": codes, f"{prefix}scale": scale, f"{prefix}zero": zero})
    return B, H, T, D


def check_kivi_dequantize(codes, scale, zero, bits, group_size, axis):
    op = "kivi_dequantize"
    check_kivi_params(op, bits, group_size)
    check_axis(op, axis)
    kivi_layout(op, codes, scale, zero, bits, group_size, axis)


def check_kivi_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size,
                         k_lr_u, k_lr_w, v_lr_u, v_lr_w):
    op = "kivi_attention"
    tensor(op, "q", q, 4, FLOAT_DTYPES)
    check_kivi_params(op, bits, group_size)
    B, Hq, Lq, D = q.shape
    head_dim(op, "q", D)
    if Lq < 1:
        fail(op, "q must have at least one query row (Lq >= 1)")
    kb, kh, Tk, kd = kivi_layout(op, k_codes, k_scale, k_zero, bits, group_size, "key", "k_")
    vb, vh, Tv, vd = kivi_layout(op, v_codes, v_scale, v_zero, bits, group_size, "value", "v_")
    tensor(op, "k_tail", k_tail, 4, (q.dtype,))
    tensor(op, "v_tail", v_tail, 4, (q.dtype,))
    Hkv = k_tail.shape[1]
    gqa(op, Hq, Hkv, "k_tail")
    shape_is(op, "k_tail", k_tail, (B, Hkv, k_tail.shape[2], D))
    shape_is(op, "v_tail", v_tail, (B, Hkv, v_tail.shape[2], D))
    for name, got in (("k_codes", (kb, kh, kd)), ("v_codes", (vb, vh, vd))):
        if got != (B, Hkv, D):
            fail(op, f"{name} describes (B, Hkv, D) = {got}, expected {(B, Hkv, D)} from q and k_tail")
    if k_scale.dtype != q.dtype or v_scale.dtype != q.dtype:
        fail(op, f"k_scale/v_scale must have q's dtype {q.dtype}, got {k_scale.dtype}/{v_scale.dtype}", TypeError)
    Rk, Rv = k_tail.shape[2], v_tail.shape[2]
    if Tk + Rk != Tv + Rv:
        fail(op, f"keys and values must cover the same tokens: Tk_quant + Rk = {Tk} + {Rk} != "
             f"Tv_quant + Rv = {Tv} + {Rv}")
    for side, U, W, T in (("k", k_lr_u, k_lr_w, Tk), ("v", v_lr_u, v_lr_w, Tv)):
        if (U is None) != (W is None):
            fail(op, f"{side}_lowrank needs both U and W, got only one")
        if U is not None:
            tensor(op, f"{side}_lowrank U", U, 4, FLOAT_DTYPES)
            tensor(op, f"{side}_lowrank W", W, 4, (U.dtype,))
            r = U.shape[-1]
            shape_is(op, f"{side}_lowrank U", U, (B, Hkv, T, r))
            shape_is(op, f"{side}_lowrank W", W, (B, Hkv, D, r))
    same_device(op, q=q, k_codes=k_codes, v_codes=v_codes, k_tail=k_tail, v_tail=v_tail,
                k_lr_u=k_lr_u, k_lr_w=k_lr_w, v_lr_u=v_lr_u, v_lr_w=v_lr_w)


def check_lowrank_residual(err, rank, iters):
    op = "lowrank_residual"
    tensor(op, "err", err, 4, FLOAT_DTYPES)
    T, D = err.shape[2], err.shape[3]
    integer(op, "rank", rank, 1, min(T, D), f"(1 <= rank <= min(T, D) = {min(T, D)})")
    integer(op, "iters", iters, 1)


class PoolOverflowError(ValueError):
    """ragged_append would write past a segment's capacity (seg_cap); nothing was written."""


def check_capacity(seg_len: torch.Tensor, seg_cap: torch.Tensor, layer: int, t: int) -> None:
    """Raise PoolOverflowError if t more rows do not fit in every segment of ``layer`` (a host sync)."""
    room = seg_cap[layer] - seg_len[layer]
    short = room < t
    if bool(short.any()):
        b, h = (int(i) for i in short.nonzero()[0])
        raise PoolOverflowError(
            f"kvkernels.ragged_append: appending t = {t} rows to layer {layer} would overflow segment "
            f"(batch {b}, head {h}): seg_len = {int(seg_len[layer, b, h])}, seg_cap = {int(seg_cap[layer, b, h])}; "
            f"{int(short.sum())} segment(s) lack room. Nothing was written. Compact with more slack, "
            f"or roll back seg_len."
        )


# ---------------------------------------------------------------------------------------------------
# quant_pool: the quantized ragged pool (kvkernels.reference.quant_pool documents the layout)
QUANT_POOL_TABLE = ("q_start", "q_len", "q_cap", "t_head", "seg_len", "seg_cap")


def quant_pool_params(op, bits, group_size, residual, D):
    check_kivi_params(op, bits, group_size)
    integer(op, "residual", residual, 0)
    if D % group_size:
        fail(op, f"head dim D = {D} must be a multiple of group_size = {group_size} (values are grouped over "
             f"channels)")


def quant_pool_buffers(op, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size,
                       tail_dims):
    """Check the codes/scales/zeros/tails of a quantized pool; returns (Q, D, TC)."""
    tensor(op, "k_tail", k_tail, tail_dims, FLOAT_DTYPES)
    tensor(op, "v_tail", v_tail, tail_dims, (k_tail.dtype,))
    shape_is(op, "v_tail", v_tail, tuple(k_tail.shape))
    TC, D = k_tail.shape[-2], k_tail.shape[-1]
    head_dim(op, "k_tail", D)
    F = 32 // bits
    tensor(op, "v_codes", v_codes, 2, (torch.int32,))
    Q = v_codes.shape[0]
    if Q % group_size:
        fail(op, f"v_codes has Q = {Q} rows, not a whole number of groups of {group_size}")
    for name, t, shape in (("v_codes", v_codes, (Q, D // F)), ("k_codes", k_codes, (Q // F, D)),
                           ("k_scale", k_scale, (Q // group_size, D)), ("k_zero", k_zero, (Q // group_size, D)),
                           ("v_scale", v_scale, (Q, D // group_size)), ("v_zero", v_zero, (Q, D // group_size))):
        tensor(op, name, t, 2, (torch.int32,) if "codes" in name else (k_tail.dtype,))
        shape_is(op, name, t, shape)
    same_device(op, k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, v_codes=v_codes, v_scale=v_scale,
                v_zero=v_zero, k_tail=k_tail, v_tail=v_tail)
    return Q, D, TC


def quant_pool_table(op, shape_name, ndim, **tables):
    """Segment tables: int64 q_start, int32 for the rest, one shape; returns it."""
    first = None
    for name, t in tables.items():
        tensor(op, name, t, ndim, (torch.int64,) if name == "q_start" else (torch.int32,))
        if first is None:
            first = tuple(t.shape)
        shape_is(op, name, t, first)
    return first


def check_quant_pool_build(k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack, q_rows):
    op = "quant_pool_build"
    tensor(op, "k_pool", k_pool, 2, FLOAT_DTYPES)
    tensor(op, "v_pool", v_pool, 2, (k_pool.dtype,))
    shape_is(op, "v_pool", v_pool, tuple(k_pool.shape))
    head_dim(op, "k_pool", k_pool.shape[1])
    tensor(op, "seg_start", seg_start, 3, (torch.int64,))
    tensor(op, "seg_len", seg_len, 3, (torch.int32,))
    shape_is(op, "seg_len", seg_len, tuple(seg_start.shape))
    quant_pool_params(op, bits, group_size, residual, k_pool.shape[1])
    integer(op, "slack", slack, 0)
    integer(op, "q_rows", q_rows, 0, None, "(pass kvkernels.reference.quant_pool.quant_pool_rows(seg_len, ...))")
    if q_rows % group_size:
        fail(op, f"q_rows = {q_rows} must be a multiple of group_size = {group_size}")
    same_device(op, k_pool=k_pool, v_pool=v_pool, seg_start=seg_start, seg_len=seg_len)


def check_quant_pool_append(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                            q_cap, t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual):
    if _quant_append_ok(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap,
                        t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual):
        return
    op = "quant_pool_append"
    check_kivi_params(op, bits, group_size)
    Q, D, TC = quant_pool_buffers(op, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits,
                                  group_size, 5)
    quant_pool_params(op, bits, group_size, residual, D)
    L, B, H = quant_pool_table(op, "q_start", 3, q_start=q_start, q_len=q_len, q_cap=q_cap, t_head=t_head,
                               seg_len=seg_len, seg_cap=seg_cap)
    shape_is(op, "k_tail", k_tail, (L, B, H, TC, D))
    integer(op, "layer", layer, 0, L - 1, f"(the pool has L = {L} layers)")
    tensor(op, "k_new", k_new, 4, (k_tail.dtype,))
    tensor(op, "v_new", v_new, 4, (k_tail.dtype,))
    t = k_new.shape[2]
    shape_is(op, "k_new", k_new, (B, H, t, D))
    shape_is(op, "v_new", v_new, (B, H, t, D))
    same_device(op, k_tail=k_tail, q_start=q_start, q_len=q_len, q_cap=q_cap, t_head=t_head, seg_len=seg_len,
                seg_cap=seg_cap, k_new=k_new, v_new=v_new)


def check_quant_pool_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                               t_head, seg_len, bits, group_size):
    if _quant_attention_ok(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                           t_head, seg_len, bits, group_size):
        return
    op = "quant_pool_attention"
    tensor(op, "q", q, 4, FLOAT_DTYPES)
    check_kivi_params(op, bits, group_size)
    Q, D, TC = quant_pool_buffers(op, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits,
                                  group_size, 4)
    if k_tail.dtype != q.dtype:
        fail(op, f"k_tail has dtype {k_tail.dtype}; it must match q's {q.dtype}", TypeError)
    B, Hq, Lq, Dq = q.shape
    if Dq != D:
        fail(op, f"q has head dim {Dq} but k_tail rows have {D} channels; they must match")
    if Lq < 1:
        fail(op, "q must have at least one query row (Lq >= 1)")
    shape = quant_pool_table(op, "q_start", 2, q_start=q_start, q_len=q_len, t_head=t_head, seg_len=seg_len)
    if shape[0] != B:
        fail(op, f"q_start must have shape [B={B}, Hkv] (one layer: pass q_start[layer]), got {shape}")
    gqa(op, Hq, shape[1], "q_start")
    shape_is(op, "k_tail", k_tail, (B, shape[1], TC, D))
    same_device(op, q=q, k_tail=k_tail, q_start=q_start, q_len=q_len, t_head=t_head, seg_len=seg_len)
