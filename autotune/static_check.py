"""Ahead-of-time compile check of every Triton launch the ops make, for GPU targets, without a GPU.

    python -m autotune.static_check                      # CI set: GPU defaults, sm_80 + sm_90a
    python -m autotune.static_check --set full --csv-dir bench/results/static   # defaults + every candidate
    python -m autotune.static_check --families kivi --set full --targets 90 -v

How it works
------------
1. **Launches come from the ops' own host code.** For every family (``FAMILIES``: one entry per kernel
   module) and every point of its documented shape set, the op's Triton function is called on *fake*
   CUDA tensors (``torch._subclasses.FakeTensorMode``: shapes, strides and dtypes, no memory, no GPU) with
   the config it would pick on a GPU (``config=None``: the module's default heuristic, tuned tables
   switched off) and with every candidate of its ``TUNABLE`` space. ``JITFunction.run`` is replaced by a
   recorder, so each ``kernel[grid](...)`` the host code makes is captured with its arguments, constexprs,
   ``num_warps`` and ``num_stages`` - nothing of the launch logic is duplicated here. The device's SM count
   is the target's (132 for sm_90 / H100, 108 for sm_80 / A100), since grids and split counts depend on it.
2. **Compile for each target.** Each distinct launch is specialised exactly as Triton's launcher would
   (``create_function_from_signature`` + ``_pack_args``: argument types, 16-byte divisibility of
   integers and pointers) and compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
   32), options=...)``: TTGIR, PTX and cubin, no driver.
3. **Read the result.** Registers and spill bytes from ``ptxas -v`` (the ptxas inside the Triton wheel),
   shared memory from the compiled kernel's metadata, programs per SM from registers, shared memory and
   warps against the target's limits (``TARGETS``), the MMA instruction kind from the PTX (``wgmma``,
   ``mma.sync`` shape and types, or ``fma`` when no tensor-core instruction is used), and counts of
   ``cp.async`` and ``ld.global`` instructions (what the loads look like).
4. **Fail** (exit 1) on a compile error, on a GPU default that spills or whose shared memory does not fit
   (fp32 defaults may spill only where ``FP32_SPILL_ALLOWED`` says why), and on an autotune candidate that
   cannot launch on its target (over the block's shared memory, or not even one program per SM).

Results are cached per launch and target in ``$KVKERNELS_STATIC_CACHE`` (default
``~/.cache/kvkernels/static``), keyed by the compiled source's hash (Triton's own: the kernel and every
function it calls), the Triton version, the target and the options; an edited kernel recompiles, the rest
is read back. Run it with another Triton by installing that Triton into another environment (see
bench/results/static/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import torch  # noqa: E402


def _compile_env() -> None:
    """Our own cache replaces Triton's while checking: a kernel Triton read back from its cache would come
    without the ptxas log we read registers and spills from. Fusion as at run time (Triton 3.9 warns)."""
    os.environ.setdefault("TRITON_ALWAYS_COMPILE", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


# ---------------------------------------------------------------------------------------------------
# Targets: what one program may use and what an SM holds (CUDA occupancy tables).
@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # "sm_90a"
    cc: int  # 90
    sms: int  # SM count of the reference GPU (grids depend on it)
    smem_per_block: int  # max dynamic shared memory one block may opt into
    smem_per_sm: int
    smem_reserved_per_block: int = 1024  # the runtime's own shared memory per resident block
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256


TARGETS = {
    90: Target("sm_90a", 90, sms=132, smem_per_block=227 * 1024, smem_per_sm=228 * 1024),
    80: Target("sm_80", 80, sms=108, smem_per_block=163 * 1024, smem_per_sm=164 * 1024),
}


def programs_per_sm(t: Target, regs: int, smem: int, num_warps: int) -> int:
    """How many programs (blocks) of this kernel an SM holds at once; 0 = it cannot launch."""
    if smem > t.smem_per_block or regs > 255:
        return 0
    regs_per_warp = -(-max(regs, 1) * 32 // t.reg_alloc_unit) * t.reg_alloc_unit
    by_regs = t.regs_per_sm // (regs_per_warp * num_warps)
    by_smem = t.smem_per_sm // (smem + t.smem_reserved_per_block)
    by_threads = t.max_threads_per_sm // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, t.max_blocks_per_sm))


# ---------------------------------------------------------------------------------------------------
# Families: one entry per kernel module. A new family (e.g. kvkernels/triton/quant_pool.py) is one entry:
# its module, op, shape sets, and a function building the op's arguments from a shape point.
@dataclasses.dataclass
class Family:
    name: str
    module: str  # kvkernels.triton.<module>
    op: str
    shapes: Callable[[str], list[dict]]  # set name ("ci" or "full") -> shape points
    build: Callable[[dict], tuple]  # shape point -> op arguments (fake CUDA tensors, ints, floats)
    context: Callable[[], Any] = contextlib.nullcontext  # e.g. ragged_append's deferred overflow checks
    # Fake CUDA tensors, except for host code whose integer indexing a CPU-only PyTorch refuses on fake
    # CUDA tensors ("not linked with support for cuda devices"): "meta" there. Fine for families whose
    # configs depend on shapes only (pool, topk), not on the device.
    device: str = "cuda"


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def grid(**axes) -> list[dict]:
    points = [{}]
    for name, values in axes.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


_DEVICE = ["cuda"]  # the device of the family being captured


def _t(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device=_DEVICE[0])


# Documented shape sets. Lengths are deliberately not multiples of 16 where real ones are not (token
# counts), so the check sees the unaligned specialisation the launcher would make for them.
def _ragged_shapes(which: str) -> list[dict]:
    if which == "ci":  # decode; 64 query rows (G 8 x Lq 8); fp32; D 64 and 256
        return (grid(dtype=["bf16"], D=[128], G=[4, 8], Lq=[1, 8]) + grid(dtype=["fp32"], D=[128], G=[4], Lq=[1])
                + grid(dtype=["fp16"], D=[64, 256], G=[8], Lq=[8]))
    # decode (Lq 1), small Lq (speculative), 64 query rows (wide GQA x Lq / question prefill), prefill
    return grid(dtype=["fp16", "bf16", "fp32"], D=[64, 128, 256], G=[1, 4, 8], Lq=[1, 4, 16, 128])


def _build_ragged(p):
    dt, D, G, Lq = DTYPES[p["dtype"]], p["D"], p["G"], p["Lq"]
    B, Hkv, P = 1, 8, 8 * 4099
    return (_t(B, Hkv * G, Lq, D, dtype=dt), _t(P, D, dtype=dt), _t(P, D, dtype=dt),
            _t(B, Hkv, dtype=torch.int64), _t(B, Hkv, dtype=torch.int32), D ** -0.5, True)


def _kvzip_shapes(which: str) -> list[dict]:
    if which == "ci":
        return grid(dtype=["bf16", "fp32"], D=[128], G=[4], Lq=[511]) + grid(dtype=["fp16"], D=[64, 256], G=[1],
                                                                               Lq=[511])
    # scoring chunks: a reconstruction chunk of Lq rows against a chunk of keys
    return grid(dtype=["fp16", "bf16", "fp32"], D=[64, 128, 256], G=[1, 4, 8], Lq=[1, 511])


def _build_kvzip(p):
    dt, D, G, Lq = DTYPES[p["dtype"]], p["D"], p["G"], p["Lq"]
    B, Hkv, N = 1, 8, 4099
    return (_t(B, Hkv * G, Lq, D, dtype=dt), _t(B, Hkv, N, D, dtype=dt), _t(B, Hkv, Lq, D, dtype=dt),
            64, 1024, 1024 + 2047, D ** -0.5)


def _kivi_attention_shapes(which: str) -> list[dict]:
    if which == "ci":
        return (grid(dtype=["bf16", "fp32"], D=[128], G=[4], Lq=[1], bits=[2], group=[32], rank=[0, 4])
                + grid(dtype=["fp16"], D=[64, 256], G=[8], Lq=[1], bits=[4], group=[128], rank=[0]))
    return [p for p in grid(dtype=["fp16", "bf16", "fp32"], D=[64, 128, 256], G=[1, 4, 8], Lq=[1, 8],
                            bits=[2, 4], group=[32, 64, 128], rank=[0, 4, 8])
            if not (p["rank"] and p["D"] == 256) and not (p["bits"] == 4 and p["group"] == 64)]


def _build_kivi_attention(p):
    dt, D, G, Lq, bits, group, rank = (DTYPES[p["dtype"]], p["D"], p["G"], p["Lq"], p["bits"], p["group"],
                                       p["rank"])
    B, Hkv, F = 1, 8, 32 // bits
    T, tail = 32768, 37
    args = (_t(B, Hkv * G, Lq, D, dtype=dt),
            _t(B, Hkv, T // F, D, dtype=torch.int32), _t(B, Hkv, T // group, D, dtype=dt),
            _t(B, Hkv, T // group, D, dtype=dt),
            _t(B, Hkv, T, D // F, dtype=torch.int32), _t(B, Hkv, T, D // group, dtype=dt),
            _t(B, Hkv, T, D // group, dtype=dt),
            _t(B, Hkv, tail, D, dtype=dt), _t(B, Hkv, tail, D, dtype=dt), bits, group, D ** -0.5)
    if rank:
        args += (_t(B, Hkv, T, rank, dtype=dt), _t(B, Hkv, D, rank, dtype=dt),
                 _t(B, Hkv, T, rank, dtype=dt), _t(B, Hkv, D, rank, dtype=dt))
    return args


def _kivi_codec_shapes(which: str) -> list[dict]:
    if which == "ci":
        return grid(dtype=["bf16"], D=[128], bits=[2], group=[32], axis=["key", "value"])
    return grid(dtype=["fp16", "bf16", "fp32"], D=[64, 128, 256], bits=[2, 4], group=[32, 128],
                axis=["key", "value"])


def _build_kivi_quantize(p):
    return (_t(1, 8, 4096, p["D"], dtype=DTYPES[p["dtype"]]), p["bits"], p["group"], p["axis"])


def _build_kivi_dequantize(p):
    dt, D, bits, group, axis = DTYPES[p["dtype"]], p["D"], p["bits"], p["group"], p["axis"]
    F, T = 32 // bits, 4096
    if axis == "key":
        return (_t(1, 8, T // F, D, dtype=torch.int32), _t(1, 8, T // group, D, dtype=dt),
                _t(1, 8, T // group, D, dtype=dt), bits, group, axis)
    return (_t(1, 8, T, D // F, dtype=torch.int32), _t(1, 8, T, D // group, dtype=dt),
            _t(1, 8, T, D // group, dtype=dt), bits, group, axis)


def _topk_shapes(which: str) -> list[dict]:
    if which == "ci":
        return [{"R": 1, "M": 100_000_003}, {"R": 288, "M": 4099}]
    # per-head budgets (many short rows), the global budget (few long rows, up to 1e8 scores)
    return grid(R=[1, 8], M=[65_537, 2_000_003, 100_000_003]) + grid(R=[256, 2048], M=[4099, 32_771])


def _build_topk(p):
    return (_t(p["R"], p["M"], dtype=torch.float32), max(1, int(0.3 * p["M"])))


def _pool_shapes(which: str) -> list[dict]:
    if which == "ci":
        return grid(dtype=["bf16"], D=[128], t=[1])
    return grid(dtype=["fp16", "bf16", "fp32"], D=[64, 128, 256], t=[1, 16, 129])


def _build_compact(p):
    dt, D = DTYPES[p["dtype"]], p["D"]
    L, B, H, N = 4, 1, 8, 4099
    keys = [_t(B, H, N, D, dtype=dt) for _ in range(L)]
    values = [_t(B, H, N, D, dtype=dt) for _ in range(L)]
    return keys, values, _t(L, B, H, N, dtype=torch.bool), int(0.3 * L * B * H * N), 64


def _build_append(p):
    dt, D, t = DTYPES[p["dtype"]], p["D"], p["t"]
    L, B, H, P = 4, 1, 8, 40_000
    return (_t(P, D, dtype=dt), _t(P, D, dtype=dt), _t(L, B, H, dtype=torch.int64), _t(L, B, H, dtype=torch.int32),
            _t(L, B, H, dtype=torch.int32), 1, _t(B, H, t, D, dtype=dt), _t(B, H, t, D, dtype=dt))


def _deferred_append():
    from kvkernels.triton import pool

    return pool.deferred_overflow_checks(check_on_exit=False)


def _quant_pool_shapes(which: str) -> list[dict]:
    if which == "ci":
        return (grid(dtype=["bf16"], D=[128], G=[4], Lq=[1], bits=[2], group=[32])
                + grid(dtype=["fp16"], D=[64], G=[8], Lq=[8], bits=[4], group=[64]))
    return grid(dtype=["fp16", "bf16", "fp32"], D=[64, 128, 256], G=[1, 4, 8], Lq=[1, 8], bits=[2, 4], group=[32, 128])


def _quant_pool_layer(p):
    """One layer's quantized pool buffers: Q quantized rows in all, tails of TC rows per segment."""
    dt, D, bits, group = DTYPES[p["dtype"]], p["D"], p["bits"], p["group"]
    B, Hkv, F, Q = 1, 8, 32 // bits, 8 * 4096
    TC = 128 + group - 1 + 64  # residual + group - 1 + slack
    codes = (_t(Q // F, D, dtype=torch.int32), _t(Q // group, D, dtype=dt), _t(Q // group, D, dtype=dt),
             _t(Q, D // F, dtype=torch.int32), _t(Q, D // group, dtype=dt), _t(Q, D // group, dtype=dt))
    return B, Hkv, codes, (_t(B, Hkv, TC, D, dtype=dt), _t(B, Hkv, TC, D, dtype=dt))


def _build_quant_pool_attention(p):
    B, Hkv, codes, tails = _quant_pool_layer(p)
    q = _t(B, Hkv * p["G"], p["Lq"], p["D"], dtype=DTYPES[p["dtype"]])
    tables = (_t(B, Hkv, dtype=torch.int64),) + tuple(_t(B, Hkv, dtype=torch.int32) for _ in range(3))
    return (q, *codes, *tails, *tables, p["bits"], p["group"], p["D"] ** -0.5, True)


FAMILIES: list[Family] = [
    Family("ragged", "kvkernels.triton.ragged_attention", "ragged_attention", _ragged_shapes, _build_ragged),
    Family("kvzip", "kvkernels.triton.kvzip_score", "kvzip_score", _kvzip_shapes, _build_kvzip),
    Family("kivi", "kvkernels.triton.kivi", "kivi_attention", _kivi_attention_shapes, _build_kivi_attention),
    Family("kivi", "kvkernels.triton.kivi", "kivi_quantize", _kivi_codec_shapes, _build_kivi_quantize),
    Family("kivi", "kvkernels.triton.kivi", "kivi_dequantize", _kivi_codec_shapes, _build_kivi_dequantize),
    Family("topk", "kvkernels.triton.topk", "topk_mask", _topk_shapes, _build_topk, device="meta"),
    Family("pool", "kvkernels.triton.pool", "compact_kv", _pool_shapes, _build_compact, device="meta"),
    Family("pool", "kvkernels.triton.pool", "ragged_append", _pool_shapes, _build_append, _deferred_append,
           device="meta"),
    Family("quant_pool", "kvkernels.triton.quant_pool", "quant_pool_attention", _quant_pool_shapes,
           _build_quant_pool_attention),
]

# fp32 GPU defaults that may spill: kernel -> (most spill bytes per thread, stores + loads, and why).
# The check fails on any other fp32 spill, or on more than the bound. fp32 inputs are the correctness path
# (IEEE fp32 tl.dot runs on FMA units with both operands in registers); fp16/bf16 must never spill.
FP32_SPILL_ALLOWED: dict[str, tuple[int, str]] = {
    "_ragged_chunks_kernel": (64, "sm_80, fp32 D = 128 with 32-row K/V tiles: 8 B (was 380 B with 64-row tiles)"),
    "_lse_kernel": (2048, "kvzip_score fp32 D = 128 on sm_90a: 32 x 32 tiles spill ~1.8 KB (was ~88 KB with "
                          "64 x 64); sm_80 does not spill; 16-row tiles untried"),
    "_kivi_attn_kernel": (1536, "fp32 D = 128 with 32-token tiles: ~1.2 KB (was ~30 KB with 64-token tiles); "
                                "the [32, 128] dequantised fp32 K and V tiles and their FMA dots stay in registers"),
}

# fp16/bf16 defaults with a known, bounded spill that is not fixed yet: (kernel, shape predicate, most
# spill bytes per thread, why). Each entry is an open defect, listed in bench/results/static/README.md.
KNOWN_SPILLS: list[tuple[str, Callable[[dict], bool], int, str]] = [
    ("_kivi_attn_kernel", lambda p: p.get("rank", 0) > 0, 256,
     "GEAR low-rank terms keep the kernel at 255 registers whatever the tile (64 or 32 tokens, 4 or 8 warps); "
     "32-token tiles cut the spill from 2.4 KB (before) to ~224 B per thread; open"),
]


# ---------------------------------------------------------------------------------------------------
# Capturing launches from the host code
@dataclasses.dataclass
class Launch:
    family: str
    op: str
    kernel: Any  # the JITFunction
    args: tuple
    kwargs: dict
    shape: dict
    config: str  # "default" or the candidate config as JSON
    dtype: str

    @property
    def kernel_name(self) -> str:
        return self.kernel.fn.__name__


class _FakeProps:
    def __init__(self, sms: int):
        self.multi_processor_count = sms
        self.name = "static-check"


def _stand_in(a):
    """Tensors -> Triton's MockTensor (dtype and an aligned data pointer); everything else as is."""
    from triton.runtime.jit import MockTensor

    if isinstance(a, torch.Tensor):
        return MockTensor(a.dtype, list(a.shape))
    return a


def _recorder(sink: list):
    """A stand-in for ``JITFunction.run``: appends (kernel, args, kwargs) to ``sink`` and launches nothing."""
    def record(self, *args, grid, warmup=False, **kwargs):
        sink.append((self, tuple(_stand_in(a) for a in args), {k: _stand_in(v) for k, v in kwargs.items()}))
        return None

    return record


@contextlib.contextmanager
def _recording(target: Target, sink: list):
    """Inside: Triton launches are recorded instead of run; tuned tables are off; the GPU is `target`."""
    from triton.runtime.jit import JITFunction
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kvkernels import tuning

    record = _recorder(sink)
    saved = (JITFunction.run, tuning.lookup, torch.cuda.get_device_properties, torch.cuda.is_available)
    JITFunction.run = record
    tuning.lookup = lambda *a, **k: None
    torch.cuda.get_device_properties = lambda *a, **k: _FakeProps(target.sms)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        JITFunction.run, tuning.lookup, torch.cuda.get_device_properties, torch.cuda.is_available = saved


def _dtype_of(point: dict) -> str:
    return point.get("dtype", "fp32")


def capture(families: list[Family], which: str, target: Target, candidates: bool) -> tuple[list[Launch], list[str]]:
    """Every launch of every family at every shape of set ``which`` (default config, and candidates)."""
    launches, errors = [], []
    for fam in families:
        mod = importlib.import_module(fam.module)
        fn = getattr(mod, fam.op)
        space = getattr(mod, "TUNABLE", {}).get(fam.op, {}).get("space", [])
        configs = [None] + (list(space) if candidates else [])
        _DEVICE[0] = fam.device
        for point in fam.shapes(which):
            for cfg in configs:
                sink: list = []
                label = "default" if cfg is None else json.dumps(cfg, sort_keys=True)
                try:
                    with _recording(target, sink), fam.context():
                        fn(*fam.build(point), **({} if cfg is None else {"config": cfg}))
                except Exception as exc:  # a host-side error is a finding too
                    errors.append(f"{fam.op} {point} {label}: host code raised {type(exc).__name__}: {exc}")
                    continue
                for kernel, args, kwargs in sink:
                    launches.append(Launch(fam.name, fam.op, kernel, args, kwargs, point, label, _dtype_of(point)))
    return launches, errors


# ---------------------------------------------------------------------------------------------------
# Compiling one launch for one target
@dataclasses.dataclass
class Result:
    kernel: str
    target: str
    num_warps: int
    num_stages: int
    constexprs: str
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    smem: int = -1
    programs_per_sm: int = -1
    mma: str = ""
    cp_async: int = -1
    ld_global: int = -1
    error: str = ""
    seconds: float = 0.0


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


_ptxas_logs = threading.local()


class _PtxasLogTap:
    """Stands in for the ``subprocess`` module inside Triton's NVIDIA backend: runs everything unchanged,
    and keeps the stderr log of the ``ptxas -v`` that Triton itself runs to build the cubin (so the
    registers and spills we report are those of the binary Triton produced, with its exact flags)."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, cmd, *args, **kwargs):
        out = subprocess.run(cmd, *args, **kwargs)
        log = kwargs.get("stderr")
        if isinstance(cmd, (list, tuple)) and "ptxas" in os.path.basename(str(cmd[0])) and hasattr(log, "name"):
            with contextlib.suppress(OSError):
                _ptxas_logs.text = Path(log.name).read_text()
        return out


def _install_ptxas_tap() -> None:
    from triton.backends.nvidia import compiler as nv

    if not isinstance(nv.subprocess, _PtxasLogTap):
        nv.subprocess = _PtxasLogTap()


def _ptxas_stats(log: str) -> dict:
    stats = {}
    for key, rx in _PTXAS_RE.items():
        found = [int(x) for x in rx.findall(log)]
        stats[key] = max(found) if found else 0
    return stats


_MMA_RE = re.compile(r"\b(wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.[\w.]+|mma\.sync\.aligned\.m\d+n\d+k\d+[\w.]*)")


def mma_kind(ptx: str) -> str:
    kinds = sorted({m.split()[0].replace(".sync.aligned", "").replace(".mma_async", "") for m in _MMA_RE.findall(ptx)})
    return "+".join(kinds) if kinds else "fma"


def _specialise(launch: Launch, target: Target):
    """(ASTSource, options dict) as Triton's launcher would build them for this call on `target`."""
    from triton.compiler import ASTSource, make_backend
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import create_function_from_signature

    gpu = GPUTarget("cuda", target.cc, 32)
    backend = make_backend(gpu)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), opts.__dict__, gpu, constexprs


def cache_dir() -> Path:
    return Path(os.environ.get("KVKERNELS_STATIC_CACHE", Path.home() / ".cache" / "kvkernels" / "static"))


# Results committed with the repository, read when the user cache misses: CI (a clean clone) then compiles
# only the launches whose kernel source, Triton version or options changed since they were committed.
SEED_DIR = Path(__file__).resolve().parent.parent / "bench" / "results" / "static" / "cache"
_RESULT_FIELDS = ("regs", "spill_stores", "spill_loads", "smem", "programs_per_sm", "mma", "cp_async", "ld_global",
                  "error", "seconds")
WRITE_SEED = [False]  # --write-seed: also store results in SEED_DIR


def _cached(key: str) -> Optional[dict]:
    for folder in (cache_dir(), SEED_DIR):
        path = folder / f"{key}.json"
        if path.exists():
            try:
                data = json.loads(path.read_text())
                return {k: data[k] for k in _RESULT_FIELDS}
            except (OSError, ValueError, KeyError):
                continue
    return None


def _store(key: str, res: "Result") -> None:
    for folder in [cache_dir()] + ([SEED_DIR] if WRITE_SEED[0] else []):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{key}.json").write_text(json.dumps({k: getattr(res, k) for k in _RESULT_FIELDS},
                                                           sort_keys=True))
        except OSError:
            pass


def compile_one(launch: Launch, target: Target) -> Result:
    import triton

    t0 = time.time()
    try:
        src, options, gpu, constexprs = _specialise(launch, target)
    except Exception as exc:
        return Result(launch.kernel_name, target.name, launch.kwargs.get("num_warps", 4),
                      launch.kwargs.get("num_stages", 3), "", error=f"specialisation: {exc}")
    names = [p.name for p in launch.kernel.params]
    cx = " ".join(f"{names[k[0]]}={v}" for k, v in sorted(constexprs.items()) if names[k[0]].isupper())
    res = Result(launch.kernel_name, target.name, options["num_warps"], options["num_stages"], cx)
    key = hashlib.sha256(json.dumps([src.hash(), triton.__version__, target.name,
                                     {k: str(v) for k, v in sorted(options.items())}]).encode()).hexdigest()[:32]
    USED_KEYS.add(key)
    cached = _cached(key)
    if cached is not None:
        res = dataclasses.replace(res, **cached)
        if WRITE_SEED[0] and not (SEED_DIR / f"{key}.json").exists():
            _store(key, res)  # a result only in the user cache joins the committed seed
        # Occupancy depends on the target's limits, not only its name (a device may differ): recompute.
        res.programs_per_sm = programs_per_sm(target, res.regs, res.smem, res.num_warps)
        return res
    try:
        _ptxas_logs.text = ""
        ck = triton.compile(src, target=gpu, options=options)
        ptx = ck.asm["ptx"]
        if not _ptxas_logs.text:
            raise RuntimeError("no ptxas log captured (compiled kernel read from Triton's cache? "
                               "set TRITON_ALWAYS_COMPILE=1 or clear ~/.triton/cache)")
        stats = _ptxas_stats(_ptxas_logs.text)
        res.regs, res.spill_stores, res.spill_loads = stats["regs"], stats["spill_stores"], stats["spill_loads"]
        res.smem = int(ck.metadata.shared)
        res.programs_per_sm = programs_per_sm(target, res.regs, res.smem, res.num_warps)
        res.mma = mma_kind(ptx)
        res.cp_async = len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx))
        res.ld_global = len(re.findall(r"\bld\.global", ptx))
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
    res.seconds = round(time.time() - t0, 2)
    if not res.error:  # a compile error is not cached: it is re-checked every run
        _store(key, res)
    return res


USED_KEYS: set = set()


# ---------------------------------------------------------------------------------------------------
# The check
@dataclasses.dataclass
class Row:
    family: str
    op: str
    kernel: str
    target: str
    dtype: str
    shape: str
    config: str
    result: Result
    verdict: str = "ok"
    point: dict = dataclasses.field(default_factory=dict)


def verdict(row: Row, target: Target) -> str:
    r = row.result
    if r.error:
        return f"FAIL compile error: {r.error}"
    if r.programs_per_sm == 0:
        why = (f"shared memory {r.smem} B > {target.smem_per_block} B per block" if r.smem > target.smem_per_block
               else f"{r.regs} registers x {r.num_warps} warps do not fit")
        return f"FAIL cannot launch on {target.name}: {why}"
    if row.config == "default":
        spill = r.spill_stores + r.spill_loads
        if spill and row.dtype != "fp32":
            for kernel, applies, bound, why in KNOWN_SPILLS:
                if kernel == row.kernel and applies(row.point) and spill <= bound:
                    return f"ok (known spill {spill} B <= {bound} B: {why})"
            return f"FAIL default spills {r.spill_stores} B stores / {r.spill_loads} B loads"
        if spill and row.dtype == "fp32":
            bound, why = FP32_SPILL_ALLOWED.get(row.kernel, (0, ""))
            if spill > bound:
                return (f"FAIL fp32 default spills {r.spill_stores}/{r.spill_loads} B"
                        + (f" (> {bound} B allowed: {why})" if why else " (not in FP32_SPILL_ALLOWED)"))
            return f"ok (fp32 spill {spill} B <= {bound} B allowed: {why})"
    return "ok"


def _dedupe(launches: list[Launch]) -> dict[tuple, Launch]:
    """Launches that compile to the same binary (same kernel, argument types, alignment, constexprs and
    options) are compiled once; the key is computed without compiling."""
    unique: dict[tuple, Launch] = {}
    for la in launches:
        unique.setdefault(_launch_key(la), la)
    return unique


def _launch_key(la: Launch) -> tuple:
    """What decides the binary: kernel, argument types, integer divisibility/==1, constexprs, options."""
    def spec(name, v):
        if hasattr(v, "dtype") and not isinstance(v, (int, float)):
            return str(v.dtype)
        if isinstance(v, int) and not isinstance(v, bool) and not name.isupper() and name not in ("num_warps",
                                                                                                  "num_stages"):
            return (v % 16 == 0, v == 1)
        return v if isinstance(v, (bool, str, float, int)) else None

    names = [p.name for p in la.kernel.params]
    sig = tuple(spec(n, a) for n, a in zip(names, la.args))
    kw = tuple(sorted((k, spec(k, v)) for k, v in la.kwargs.items()))
    return (id(la.kernel), sig, kw)


def run_check(families: list[Family], which: str, targets: list[Target], candidates: bool, jobs: int,
              log=print) -> tuple[list[Row], list[str]]:
    rows, host_errors = [], []
    _compile_env()
    _install_ptxas_tap()
    for target in targets:
        launches, errors = capture(families, which, target, candidates)
        host_errors += [f"{target.name}: {e}" for e in errors]
        unique = _dedupe(launches)
        log(f"{target.name}: {len(launches)} launches, {len(unique)} distinct compiles")
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = dict(zip(unique, pool.map(lambda la: compile_one(la, target), unique.values())))
        log(f"{target.name}: compiled in {time.time() - t0:.0f}s")
        for la in launches:
            res = results[_launch_key(la)]
            row = Row(la.family, la.op, la.kernel_name, target.name, la.dtype,
                      " ".join(f"{a}={b}" for a, b in la.shape.items()), la.config, res, point=la.shape)
            row.verdict = verdict(row, target)
            rows.append(row)
    return rows, host_errors


# ---------------------------------------------------------------------------------------------------
# Static pruning of autotune candidates (used by the autotune CLI on a GPU)
def device_target(device: torch.device) -> Target:
    """The Target of a real CUDA device, with its own limits (from the driver's properties)."""
    props = torch.cuda.get_device_properties(device)
    major, minor = props.major, props.minor
    cc = major * 10 + minor
    name = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    base = TARGETS.get(cc, TARGETS[80])
    optin = getattr(props, "shared_memory_per_block_optin", 0) or base.smem_per_block
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or base.smem_per_sm
    regs = getattr(props, "regs_per_multiprocessor", 0) or base.regs_per_sm
    return dataclasses.replace(base, name=name, cc=cc, sms=props.multi_processor_count, smem_per_block=optin,
                               smem_per_sm=per_sm, regs_per_sm=regs)


@contextlib.contextmanager
def _recording_real(sink: list):
    """Record the launches of real-tensor host code (no fake tensors, the real device)."""
    from triton.runtime.jit import JITFunction

    saved = JITFunction.run
    JITFunction.run = _recorder(sink)
    try:
        yield
    finally:
        JITFunction.run = saved


def launch_problem(fn: Callable, args: tuple, config: dict, target: Target) -> Optional[str]:
    """Why ``fn(*args, config=config)`` cannot launch on ``target`` (None when every kernel fits).

    Each launch it would make is compiled for the target (or read from the static-check cache) and its
    shared memory, registers and warps are checked against the target's limits, as the launch would.
    Mutating ops are safe: nothing runs, every launch is only recorded.
    """
    sink: list = []
    try:
        with _recording_real(sink):
            fn(*args, config=config)
    except Exception as exc:  # the host code rejects the config itself
        return f"host code: {type(exc).__name__}: {exc}"
    _compile_env()
    _install_ptxas_tap()
    for kernel, kargs, kwargs in sink:
        la = Launch("", "", kernel, kargs, kwargs, {}, json.dumps(config), "")
        r = compile_one(la, target)
        if r.error:
            return f"{la.kernel_name}: compile error {r.error}"
        if r.smem > target.smem_per_block:
            return (f"{la.kernel_name}: {r.smem // 1024} KiB shared memory > {target.smem_per_block // 1024} KiB "
                    f"per block on {target.name}")
        if r.programs_per_sm == 0:
            return f"{la.kernel_name}: {r.regs} registers x {r.num_warps} warps do not fit an SM of {target.name}"
    return None


def prune_candidates(fn: Callable, args: tuple, configs: list, device: torch.device) -> tuple[list, list]:
    """(configs that fit the device, [(config, reason)] pruned). Nothing is pruned off a GPU."""
    if device.type != "cuda":
        return list(configs), []
    target = device_target(device)
    kept, pruned = [], []
    for cfg in configs:
        why = None if cfg is None else launch_problem(fn, args, cfg, target)
        (pruned.append((cfg, why)) if why else kept.append(cfg))
    return kept, pruned


# ---------------------------------------------------------------------------------------------------
# The CuPy top-k kernel: its CUDA C++ compiled by NVRTC (no driver needed), resource usage from ptxas -v.
def _load_nvrtc():
    """libnvrtc from the ``nvidia-cuda-nvrtc-cu12`` wheel (or the system), through ctypes."""
    import ctypes
    import glob

    candidates = []
    with contextlib.suppress(ImportError):
        import nvidia.cuda_nvrtc as pkg  # the wheel's namespace package

        for root in pkg.__path__:
            candidates += sorted(glob.glob(os.path.join(root, "lib", "libnvrtc.so*")))
    candidates += ["libnvrtc.so.12", "libnvrtc.so"]
    for name in candidates:
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name)
    raise RuntimeError("no libnvrtc found: pip install nvidia-cuda-nvrtc-cu12")


def nvrtc_compile(source: str, cc: int, options: tuple = ()) -> tuple[bytes, str]:
    """(cubin, log) of ``source`` compiled for sm_<cc> with ptxas -v, by NVRTC through ctypes."""
    import ctypes

    lib = _load_nvrtc()
    prog = ctypes.c_void_p()
    check = lambda rc, what: rc == 0 or (_ for _ in ()).throw(RuntimeError(f"{what}: nvrtc error {rc}"))  # noqa
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"topk.cu", 0, None, None), "create")
    opts = [f"--gpu-architecture=sm_{cc}".encode(), b"--ptxas-options=-v"] + [o.encode() for o in options]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace")
    cubin = b""
    if rc == 0:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, buf), "get cubin")
        cubin = buf.raw
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if rc != 0:
        raise RuntimeError(f"NVRTC compile failed for sm_{cc}: {text[-2000:]}")
    return cubin, text


def check_cupy_topk(ccs=(80, 90)) -> list[dict]:
    """Compile kvkernels/cupy/topk.py's CUDA source as CuPy would (``--std=c++14``) for each target and
    read each kernel's registers, spills and static shared memory from the ptxas log."""
    from kvkernels.cupy import topk as cupy_topk

    rows = []
    for cc in ccs:
        cubin, log = nvrtc_compile(cupy_topk._CUDA_SOURCE, cc, ("--std=c++14",))
        current = None
        for line in log.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                current = {"kernel": m.group(1), "target": f"sm_{cc}", "regs": 0, "spill_stores": 0,
                           "spill_loads": 0, "smem_static": 0, "cubin_bytes": len(cubin)}
                rows.append(current)
            elif current is not None:
                for key, rx in (("regs", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                                ("spill_loads", r"(\d+) bytes spill loads"), ("smem_static", r"(\d+) bytes smem")):
                    found = re.search(rx, line)
                    if found:
                        current[key] = int(found.group(1))
    return rows


CSV_FIELDS = ["family", "op", "kernel", "target", "dtype", "shape", "config", "num_warps", "num_stages", "regs",
              "spill_stores", "spill_loads", "smem", "programs_per_sm", "mma", "cp_async", "ld_global",
              "constexprs", "verdict"]


def _csv_row(row: Row) -> dict:
    r = row.result
    return {"family": row.family, "op": row.op, "kernel": row.kernel, "target": row.target, "dtype": row.dtype,
            "shape": row.shape, "config": row.config, "num_warps": r.num_warps, "num_stages": r.num_stages,
            "regs": r.regs, "spill_stores": r.spill_stores, "spill_loads": r.spill_loads, "smem": r.smem,
            "programs_per_sm": r.programs_per_sm, "mma": r.mma, "cp_async": r.cp_async, "ld_global": r.ld_global,
            "constexprs": r.constexprs, "verdict": row.verdict}


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow(_csv_row(row))


def summarise(rows: list[Row]) -> str:
    """One line per (target, kernel, dtype) of the defaults: worst registers/spills/smem, fewest programs."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        if row.config == "default":
            groups.setdefault((row.target, row.op, row.kernel, row.dtype), []).append(row)
    lines = [f"{'target':8} {'op':17} {'kernel':26} {'dtype':5} {'regs':>4} {'spill B':>8} {'smem KiB':>8} "
             f"{'prog/SM':>7} mma"]
    for (tgt, op, kernel, dt), rs in sorted(groups.items()):
        ok = [r.result for r in rs if not r.result.error]
        if not ok:
            lines.append(f"{tgt:8} {op:17} {kernel:26} {dt:5} compile error")
            continue
        lines.append(f"{tgt:8} {op:17} {kernel:26} {dt:5} {max(r.regs for r in ok):4d} "
                     f"{max(r.spill_stores + r.spill_loads for r in ok):8d} {max(r.smem for r in ok) / 1024:8.1f} "
                     f"{min(r.programs_per_sm for r in ok):7d} {'/'.join(sorted({r.mma for r in ok}))}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autotune.static_check", description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=("ci", "full"), default="ci",
                    help="shape set: 'ci' (a few shapes per family) or 'full' (the documented GPU shapes)")
    ap.add_argument("--candidates", action="store_true",
                    help="also compile every TUNABLE candidate (implied by --set full)")
    ap.add_argument("--targets", default="80,90", help="compute capabilities, e.g. 90 or 80,90")
    ap.add_argument("--families", default="", help="comma-separated family or op names (default: all)")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--csv-dir", default="", help="write <target>.csv there (the full table)")
    ap.add_argument("--write-seed", action="store_true",
                    help=f"also store results in {SEED_DIR} (committed; read by CI when its cache misses)")
    ap.add_argument("--cupy", action="store_true",
                    help="also compile the CuPy top-k CUDA source with NVRTC (needs nvidia-cuda-nvrtc-cu12)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every row, not only failures")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Interpreted kernels cannot be compiled: the check needs real JITFunctions (set before the kernel
        # modules are imported; only here, never at import, so importing this module changes nothing).
        os.environ["TRITON_INTERPRET"] = "0"

    import triton

    WRITE_SEED[0] = args.write_seed
    wanted = {x for x in args.families.split(",") if x}
    families = [f for f in FAMILIES if not wanted or f.name in wanted or f.op in wanted]
    targets = [TARGETS[int(x)] for x in args.targets.split(",")]
    candidates = args.candidates or args.set == "full"
    print(f"triton {triton.__version__}, torch {torch.__version__}, set {args.set}, "
          f"candidates {'yes' if candidates else 'no'}, targets {', '.join(t.name for t in targets)}, "
          f"cache {cache_dir()}", flush=True)
    t0 = time.time()
    rows, host_errors = run_check(families, args.set, targets, candidates, args.jobs,
                                  log=lambda m: print(m, flush=True))
    if args.csv_dir:
        for t in targets:
            write_csv([r for r in rows if r.target == t.name], Path(args.csv_dir) / f"{t.name}.csv")
    print(summarise(rows))
    failures = [r for r in rows if r.verdict.startswith("FAIL")]
    seen = set()
    for r in rows if args.verbose else failures:
        line = f"{r.target} {r.op} {r.kernel} [{r.dtype} {r.shape}] config={r.config}: {r.verdict}"
        if line not in seen:
            seen.add(line)
            print(line)
    for e in host_errors:
        print("FAIL host:", e)
    n_fail = len(failures) + len(host_errors)
    if args.cupy:
        try:
            cupy_rows = check_cupy_topk(tuple(t.cc for t in targets))
        except Exception as exc:
            print(f"FAIL cupy topk: {exc}")
            n_fail += 1
        else:
            for r in cupy_rows:
                spill = r["spill_stores"] + r["spill_loads"]
                print(f"cupy {r['target']:6} {r['kernel']:18} regs {r['regs']:3d} spill {spill} B "
                      f"smem(static) {r['smem_static']} B")
                n_fail += bool(spill)
            if args.csv_dir:
                with (Path(args.csv_dir) / "cupy_topk.csv").open("w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(cupy_rows[0]))
                    w.writeheader()
                    w.writerows(cupy_rows)
    print(f"{len(rows)} launches checked, {n_fail} failures, {time.time() - t0:.0f}s")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
