"""The ``torch.ops.kvkernels`` operators: registration, fake (meta) kernels and dispatch.

Every op is a ``torch.library`` operator with a fake kernel, so that it works the same in eager mode,
under ``torch.compile(fullgraph=True)`` (Inductor treats it as opaque and uses the fake kernel for
shapes) and inside CUDA graphs. The real kernel of every op, on every device, is the same short
function: validate, then call whatever :func:`kvkernels._backend.resolve` picks (reference, cpu,
Triton or CuPy).

Every op is registered with ``@kernel_op("name", mutates_args=(...))``: ``torch.library.Library`` define +
impl with the schema inferred from the annotations, plus ``.register_fake``. A call goes straight from the
dispatcher to the function; measured on CPU it costs about a fifth of ``torch.library.custom_op``'s
wrapper (see bench/op_overhead.py), which adds per-call Python layers (an autograd wrapper that errors on
backward, output-aliasing checks, a dynamo-disable frame). ``custom_op`` would work side by side (same
body, same ``.register_fake``): converting an op is swapping the decorator line.

In plain eager mode (no torch.compile tracing, no dispatch or function mode, no tensor subclass, no input
that requires grad) calling an op through ``kvkernels.<op>`` skips the dispatcher and calls the same
function directly: the dispatcher would do nothing else, and its round trip into Python costs about as
much as a small kernel (~50 us per call on a CPU core, 60 op calls per decoded token). Everything else
(``torch.ops.kvkernels.<op>``, opcheck, torch.compile, export, FakeTensor, autograd) goes through the
dispatcher as before. The four ops a decode step calls per layer take a shorter road still (``fast_path``
in :class:`KernelOp`): one accept check that stands for the dispatcher's conditions and the op's checks
together (in C++ when the cpu backend's bindings are built), then the op without its checks.

The ops are not differentiable: a backward through one warns (autograd's not-implemented fallback)
rather than erroring as ``custom_op`` does.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional

import torch

from . import _checks, _nvtx
from . import _validate as V
from ._backend import device_type, resolve_for

LIB = "kvkernels"
_FRAGMENT = torch.library.Library(LIB, "FRAGMENT")  # kept alive for the process: it owns the registrations


class KernelOp:
    """``torch.ops.kvkernels.<name>`` defined from an annotated Python function (see the module docstring).

    ``fast_path=(accepts, run)``, for the ops a decode step calls once per layer: ``accepts(*args)`` is True only
    when every argument has its schema type, every tensor is a plain, non-meta tensor on the first argument's
    device, none requires grad (in grad mode) and the op's checks would pass; ``run(*args)`` is the op without
    its checks. A positional call that ``accepts`` takes in plain eager mode then costs one predicate and the
    kernel; invalid input, meta tensors, subclasses, modes and autograd go through the dispatcher and the op's
    own checks; keyword calls take the general direct path below.
    """

    def __init__(self, fn: Callable, name: str, mutates_args: Iterable[str],
                 fast_path: Optional[tuple[Callable[..., bool], Callable]] = None):
        schema = torch.library.infer_schema(fn, mutates_args=tuple(mutates_args))
        _FRAGMENT.define(name + schema)
        _FRAGMENT.impl(name, fn, "CompositeExplicitAutograd")
        self.qualname = f"{LIB}::{name}"
        self._op = getattr(getattr(torch.ops, LIB), name).default
        arguments = self._op._schema.arguments
        self._arg_checks = [_schema_check(str(a.type)) for a in arguments]
        self._kwarg_checks = {a.name: c for a, c in zip(arguments, self._arg_checks)}
        self._fast_path = fast_path
        functools.update_wrapper(self, fn)

    def register_fake(self, fake: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fake)
        return fake

    def __call__(self, *args, **kwargs):
        if self._fast_path is not None and not kwargs:
            accepts, run = self._fast_path
            if _eager_without_modes() and accepts(*args):
                return run(*args)
            return self._op(*args)
        if self._dispatcher_adds_nothing(args, kwargs):
            return self.__wrapped__(*args, **kwargs)
        return self._op(*args, **kwargs)

    def _dispatcher_adds_nothing(self, args, kwargs) -> bool:
        """True when a dispatcher call would only run our function: eager, no mode, no tracing, arguments of
        the schema's types (else the dispatcher raises its schema error), plain tensors, no autograd."""
        if not _eager_without_modes() or len(args) > len(self._arg_checks):
            return False
        for a, check in zip(args, self._arg_checks):
            if check is None or not check(a):
                return False
        for name, a in kwargs.items():
            check = self._kwarg_checks.get(name)
            if check is None or not check(a):
                return False
        return not V.needs_autograd((*args, *kwargs.values()))


def _eager_without_modes() -> bool:
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled())


def _is_plain_tensor(a) -> bool:
    # A subclass (FakeTensor, a tracer's proxy, DTensor) needs the dispatcher; so does a meta tensor (the
    # dispatcher runs the fake kernel for it).
    return type(a) is torch.Tensor and not a.is_meta


_TYPE_CHECKS = {
    "Tensor": _is_plain_tensor,
    "List[Tensor]": lambda a: type(a) in (list, tuple) and all(_is_plain_tensor(t) for t in a),
    "int": lambda a: type(a) is int,
    "float": lambda a: type(a) in (float, int),
    "bool": lambda a: type(a) is bool,
    "str": lambda a: type(a) is str,
}


def _schema_check(type_name: str) -> Optional[Callable[[object], bool]]:
    """A predicate for arguments of a schema type, or None for a type the direct path leaves to the dispatcher."""
    if type_name.startswith("Optional[") and type_name.endswith("]"):
        inner = _TYPE_CHECKS.get(type_name[len("Optional["):-1])
        return None if inner is None else (lambda a: a is None or inner(a))
    return _TYPE_CHECKS.get(type_name)


def kernel_op(name: str, mutates_args: Iterable[str] = (), fast_path=None) -> Callable[[Callable], KernelOp]:
    """Decorator: register ``fn`` as ``torch.ops.kvkernels.<name>`` (cheap per-call registration path)."""
    return lambda fn: KernelOp(fn, name, mutates_args, fast_path)


def _run(op: str, like: torch.Tensor, *args):
    """Call the backend's kernel for ``op`` on ``like``'s device, inside an NVTX range named after the op (free
    when unprofiled)."""
    fn = resolve_for(op, device_type(like))
    with _nvtx.range(op):
        return fn(*args)


# ---------------------------------------------------------------------------------------------------
# 1. kvzip_score
@kernel_op("kvzip_score", mutates_args=())
def kvzip_score(
    q: torch.Tensor,
    k: torch.Tensor,
    k_self: torch.Tensor,
    sink_len: int,
    chunk_start: int,
    chunk_end: int,
    sm_scale: Optional[float] = None,
    row_lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    V.check_kvzip_score(q, k, k_self, sink_len, chunk_start, chunk_end, row_lse)
    if _checks.enabled: _checks.kvzip_score(q, k, k_self, sink_len, chunk_start, chunk_end, row_lse)
    scale = V.scale_value("kvzip_score", sm_scale, q.shape[-1])
    return _run("kvzip_score", q, q, k, k_self, sink_len, chunk_start, chunk_end, scale, row_lse)


@kvzip_score.register_fake
def _(q, k, k_self, sink_len, chunk_start, chunk_end, sm_scale=None, row_lse=None):
    V.check_kvzip_score(q, k, k_self, sink_len, chunk_start, chunk_end, row_lse)
    return q.new_empty(q.shape[0], k.shape[1], chunk_end - chunk_start, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# 2. topk_mask
@kernel_op("topk_mask", mutates_args=())
def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    V.check_topk_mask(scores, k)
    if _checks.enabled: _checks.topk_mask(scores, k)
    return _run("topk_mask", scores, scores, k)


@topk_mask.register_fake
def _(scores, k):
    V.check_topk_mask(scores, k)
    # Contiguous like every backend's output (empty_like would copy the strides of a strided `scores`,
    # and fake/real stride mismatches make torch.compile misread the result).
    return scores.new_empty(scores.shape, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------
# 3. compact_kv
def _check_num_kept(keep: torch.Tensor, num_kept: int) -> None:
    # The one host read of compact_kv: num_kept fixes the pool's shape, so it must be right.
    actual = int(keep.sum())
    if actual != num_kept:
        V.fail("compact_kv", f"num_kept = {num_kept} but keep has {actual} True entries; pass keep.sum()")


@kernel_op("compact_kv", mutates_args=())
def compact_kv(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    keep: torch.Tensor,
    num_kept: int,
    slack: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    V.check_compact_kv(keys, values, keep, num_kept, slack)
    _check_num_kept(keep, num_kept)
    if _checks.enabled: _checks.compact_kv(keys, values, keep, num_kept, slack)
    return _run("compact_kv", keep, list(keys), list(values), keep, num_kept, slack)


@compact_kv.register_fake
def _(keys, values, keep, num_kept, slack):
    V.check_compact_kv(keys, values, keep, num_kept, slack)
    L, B, H, _ = keep.shape
    P = num_kept + L * B * H * slack
    seg = (L, B, H)
    return (
        keys[0].new_empty(P, keys[0].shape[-1]),
        values[0].new_empty(P, values[0].shape[-1]),
        keep.new_empty(seg, dtype=torch.int64),
        keep.new_empty(seg, dtype=torch.int32),
        keep.new_empty(seg, dtype=torch.int32),
    )


# ---------------------------------------------------------------------------------------------------
# 4. ragged_append
def _ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new) -> None:
    if _checks.enabled: _checks.ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new)
    _run("ragged_append", k_pool, k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new)


@kernel_op("ragged_append", mutates_args=("k_pool", "v_pool", "seg_len"),
           fast_path=(V.ragged_append_accepts, _ragged_append))
def ragged_append(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    seg_cap: torch.Tensor,
    layer: int,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
) -> None:
    V.check_ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new)
    _ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new)


@ragged_append.register_fake
def _(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new):
    V.check_ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new)


# ---------------------------------------------------------------------------------------------------
# 5. ragged_attention
def _ragged_attention(q, k_pool, v_pool, seg_start, seg_len, sm_scale=None, return_lse=False):
    if _checks.enabled: _checks.ragged_attention(q, k_pool, v_pool, seg_start, seg_len)
    scale = V.scale_value("ragged_attention", sm_scale, q.shape[-1])
    return _run("ragged_attention", q, q, k_pool, v_pool, seg_start, seg_len, scale, return_lse)


@kernel_op("ragged_attention", mutates_args=(), fast_path=(V.ragged_attention_accepts, _ragged_attention))
def ragged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    sm_scale: Optional[float] = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    V.check_ragged_attention(q, k_pool, v_pool, seg_start, seg_len)
    return _ragged_attention(q, k_pool, v_pool, seg_start, seg_len, sm_scale, return_lse)


@ragged_attention.register_fake
def _(q, k_pool, v_pool, seg_start, seg_len, sm_scale=None, return_lse=False):
    V.check_ragged_attention(q, k_pool, v_pool, seg_start, seg_len)
    lse_shape = q.shape[:3] if return_lse else (0,)
    # o is contiguous on every backend, whatever q's strides (not empty_like(q): see topk_mask's fake).
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# 6. kivi_quantize / kivi_dequantize
@kernel_op("kivi_quantize", mutates_args=())
def kivi_quantize(
    x: torch.Tensor, bits: int, group_size: int, axis: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    V.check_kivi_quantize(x, bits, group_size, axis)
    if _checks.enabled: _checks.kivi_quantize(x, bits, group_size, axis)
    return _run("kivi_quantize", x, x, bits, group_size, axis)


def kivi_shapes(B: int, H: int, T: int, D: int, bits: int, group_size: int, axis: str):
    """(codes shape, scale/zero shape) of a [B, H, T, D] tensor quantized along ``axis``."""
    F = 32 // bits
    if axis == "key":
        return (B, H, T // F, D), (B, H, T // group_size, D)
    return (B, H, T, D // F), (B, H, T, D // group_size)


@kivi_quantize.register_fake
def _(x, bits, group_size, axis):
    V.check_kivi_quantize(x, bits, group_size, axis)
    codes_shape, group_shape = kivi_shapes(*x.shape, bits, group_size, axis)
    return x.new_empty(codes_shape, dtype=torch.int32), x.new_empty(group_shape), x.new_empty(group_shape)


@kernel_op("kivi_dequantize", mutates_args=())
def kivi_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, axis: str
) -> torch.Tensor:
    V.check_kivi_dequantize(codes, scale, zero, bits, group_size, axis)
    if _checks.enabled: _checks.kivi_dequantize(codes, scale, zero, bits, group_size, axis)
    return _run("kivi_dequantize", codes, codes, scale, zero, bits, group_size, axis)


@kivi_dequantize.register_fake
def _(codes, scale, zero, bits, group_size, axis):
    V.check_kivi_dequantize(codes, scale, zero, bits, group_size, axis)
    B, H, T, D = V.kivi_layout("kivi_dequantize", codes, scale, zero, bits, group_size, axis)
    return scale.new_empty(B, H, T, D)


# ---------------------------------------------------------------------------------------------------
# 7. kivi_attention
@kernel_op("kivi_attention", mutates_args=())
def kivi_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    bits: int,
    group_size: int,
    sm_scale: Optional[float] = None,
    k_lr_u: Optional[torch.Tensor] = None,
    k_lr_w: Optional[torch.Tensor] = None,
    v_lr_u: Optional[torch.Tensor] = None,
    v_lr_w: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    V.check_kivi_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits,
                           group_size, k_lr_u, k_lr_w, v_lr_u, v_lr_w)
    if _checks.enabled: _checks.kivi_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size, k_lr_u, k_lr_w, v_lr_u, v_lr_w)
    scale = V.scale_value("kivi_attention", sm_scale, q.shape[-1])
    return _run("kivi_attention", q, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail,
                bits, group_size, scale, k_lr_u, k_lr_w, v_lr_u, v_lr_w)


@kivi_attention.register_fake
def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group_size, sm_scale=None,
      k_lr_u=None, k_lr_w=None, v_lr_u=None, v_lr_w=None):
    V.check_kivi_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits,
                           group_size, k_lr_u, k_lr_w, v_lr_u, v_lr_w)
    return q.new_empty(q.shape)  # contiguous on every backend, like ragged_attention's o


# ---------------------------------------------------------------------------------------------------
# 8. lowrank_residual
@kernel_op("lowrank_residual", mutates_args=())
def lowrank_residual(err: torch.Tensor, rank: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    V.check_lowrank_residual(err, rank, iters)
    if _checks.enabled: _checks.lowrank_residual(err, rank, iters)
    return _run("lowrank_residual", err, err, rank, iters)


@lowrank_residual.register_fake
def _(err, rank, iters):
    V.check_lowrank_residual(err, rank, iters)
    B, H, T, D = err.shape
    return err.new_empty(B, H, T, rank), err.new_empty(B, H, D, rank)


# ---------------------------------------------------------------------------------------------------
# 9. quant_pool: the quantized ragged pool (KVzip segments as KIVI codes + full-precision tails)
def _quant_pool_rows_check(seg_len, group_size, residual, slack, q_rows):
    # The one host read of the build: q_rows fixes the buffers' shapes, so it must be right.
    from kvkernels.reference.quant_pool import quant_pool_rows

    actual = quant_pool_rows(seg_len, group_size, residual, slack)
    if actual != q_rows:
        V.fail("quant_pool_build", f"q_rows = {q_rows} but seg_len needs {actual}; pass quant_pool_rows(seg_len, "
               f"group_size, residual, slack)")


@kernel_op("quant_pool_build", mutates_args=())
def quant_pool_build(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    bits: int,
    group_size: int,
    residual: int,
    slack: int,
    q_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    V.check_quant_pool_build(k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack, q_rows)
    _quant_pool_rows_check(seg_len, group_size, residual, slack, q_rows)
    if _checks.enabled: _checks.quant_pool_build(k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack, q_rows)
    return _run("quant_pool_build", k_pool, k_pool, v_pool, seg_start, seg_len, bits, group_size, residual,
                slack, q_rows)


@quant_pool_build.register_fake
def _(k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack, q_rows):
    V.check_quant_pool_build(k_pool, v_pool, seg_start, seg_len, bits, group_size, residual, slack, q_rows)
    L, B, H = seg_start.shape
    D, F, Q = k_pool.shape[1], 32 // bits, q_rows
    TC = residual + group_size - 1 + slack
    new = k_pool.new_empty
    seg = (L, B, H)
    return (new(Q // F, D, dtype=torch.int32), new(Q // group_size, D), new(Q // group_size, D),
            new(Q, D // F, dtype=torch.int32), new(Q, D // group_size), new(Q, D // group_size),
            new(L, B, H, TC, D), new(L, B, H, TC, D), new(seg, dtype=torch.int64), new(seg, dtype=torch.int32),
            new(seg, dtype=torch.int32), new(seg, dtype=torch.int32), new(seg, dtype=torch.int32),
            new(seg, dtype=torch.int32))


def _quant_pool_append(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap,
                       t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual,
                       flush_after=False) -> None:
    args = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap, t_head,
            seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual)
    if _checks.enabled: _checks.quant_pool_append(*args)
    _run("quant_pool_append", k_tail, *args, flush_after)


@kernel_op("quant_pool_append",
           mutates_args=("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_tail", "v_tail", "q_len",
                         "t_head", "seg_len"),
           fast_path=(V.quant_pool_append_accepts, _quant_pool_append))
def quant_pool_append(
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    q_cap: torch.Tensor,
    t_head: torch.Tensor,
    seg_len: torch.Tensor,
    seg_cap: torch.Tensor,
    layer: int,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    bits: int,
    group_size: int,
    residual: int,
    flush_after: bool = False,
) -> None:
    args = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap, t_head,
            seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual)
    V.check_quant_pool_append(*args)
    _quant_pool_append(*args, bool(flush_after))


@quant_pool_append.register_fake
def _(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap, t_head, seg_len,
      seg_cap, layer, k_new, v_new, bits, group_size, residual, flush_after=False):
    V.check_quant_pool_append(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                              q_cap, t_head, seg_len, seg_cap, layer, k_new, v_new, bits, group_size, residual)


def _quant_pool_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len,
                          t_head, seg_len, bits, group_size, sm_scale=None, return_lse=False):
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, t_head, seg_len,
            bits, group_size)
    if _checks.enabled: _checks.quant_pool_attention(*args)
    scale = V.scale_value("quant_pool_attention", sm_scale, q.shape[-1])
    return _run("quant_pool_attention", q, *args, scale, return_lse)


@kernel_op("quant_pool_attention", mutates_args=(),
           fast_path=(V.quant_pool_attention_accepts, _quant_pool_attention))
def quant_pool_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    t_head: torch.Tensor,
    seg_len: torch.Tensor,
    bits: int,
    group_size: int,
    sm_scale: Optional[float] = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, t_head, seg_len,
            bits, group_size)
    V.check_quant_pool_attention(*args)
    return _quant_pool_attention(*args, sm_scale, return_lse)


@quant_pool_attention.register_fake
def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, t_head, seg_len, bits,
      group_size, sm_scale=None, return_lse=False):
    V.check_quant_pool_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start,
                                 q_len, t_head, seg_len, bits, group_size)
    lse_shape = q.shape[:3] if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)
