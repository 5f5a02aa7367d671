"""Benchmark cases: one per (op family, implementation, sizes), shared by report.py and the pytest suites.

Implementations (the ``impl`` column):

* ``kvkernels``  - the public op ``torch.ops.kvkernels.<op>`` with the Triton backend (validation and
                   dispatch included: what a user's call costs);
* ``cupy``       - the CuPy backend where one exists (top-k);
* ``reference``  - ``kvkernels.reference`` (pure PyTorch, what the kernels replace);
* ``sdpa_dense`` - ``scaled_dot_product_attention`` on the dense, uncompressed cache of the same
                   context (what decode costs without compression);
* ``flex_block_mask`` - FlexAttention over the per-head caches padded to the longest head, with a
                   block mask ``kv_idx < len[b, h]`` so fully masked blocks are skipped;
* ``dequant_sdpa`` - KIVI the simple way: dequantize the whole cache (kvkernels' dequantize
                   kernel), concatenate the full-precision tail, then SDPA;
* ``torch_topk`` - ``torch.topk`` then a scatter into a bool mask;
* ``*_graph``    - the same case replayed from CUDA graphs (GPU only): the kernels' own speed, without
                   the eager dispatch and launch overhead that dominates microsecond decode steps.

Each case prepares its own input sets (several, rotated, so a cache smaller than L2 is not timed
from L2) and knows the bytes it must move and the FLOPs it does, for the bandwidth and FLOP/s
columns. A case that cannot run here raises :class:`Unavailable` with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from autotune import timing
from autotune.workloads import WORKLOADS, grid, nbytes, segment_lengths

FAMILIES = ("ragged", "kivi", "topk", "pool", "kvzip", "lowrank", "quant_pool")


class Unavailable(Exception):
    """This case cannot run on this machine (missing kernel module, no CuPy, no FlexAttention...)."""


@dataclass
class Prepared:
    run: Callable[[int], Any]  # run(i): one call on input set i
    n_buffers: int
    bytes: int  # bytes the implementation must read + write per call
    flops: int
    backend: Optional[str] = None  # kvkernels backend to select while timing (use_backend)


@dataclass
class Case:
    family: str
    op: str
    impl: str
    params: dict
    make: Callable[[dict, torch.device], Prepared] = field(repr=False)
    context: int = 0  # context length (tokens) or row width, the x axis of the plots
    keep: Optional[float] = None  # kept fraction, where it applies

    @property
    def id(self) -> str:
        sizes = "-".join(f"{k}{v}" for k, v in self.params.items())
        return f"{self.op}-{self.impl}-{sizes}"


def _rotated(build: Callable[[], tuple], bytes_per_set: int, device: torch.device, first: tuple) -> list[tuple]:
    n = timing.rotation_count(bytes_per_set, device)
    return [first] + [build() for _ in range(n - 1)]


def _require_kernel(backend: str, op: str) -> None:
    from kvkernels import _backend

    module = _backend._KERNEL_MODULES.get(backend, {}).get(op)
    if module is None or importlib.util.find_spec(f"kvkernels.{backend}.{module}") is None:
        raise Unavailable(f"kvkernels.{backend}.{module or '?'} does not exist yet")


def _require_device(backend: str, device: torch.device) -> None:
    from kvkernels import _backend

    ok, why = _backend._can_run(backend, device.type)
    if not ok:
        raise Unavailable(why)


# ---------------------------------------------------------------------------------------------------
# Generic implementations: the op itself (any backend) and the reference, on the autotuner's inputs.
def op_impl(op: str, backend: str) -> Callable[[dict, torch.device], Prepared]:
    def make(p: dict, device: torch.device) -> Prepared:
        _require_device(backend, device)
        _require_kernel(backend, op)
        wl = WORKLOADS[op]
        first = wl.build(p, device)
        moved, flops = wl.traffic(p, first)
        sets = _rotated(lambda: wl.build(p, device), moved, device, first)
        fn = getattr(torch.ops.kvkernels, op)
        run = wl.make_runner(fn, sets) if wl.make_runner else (lambda i: fn(*sets[i]))
        return Prepared(run, len(sets), moved, flops, backend=backend)

    return make


def reference_impl(op: str) -> Callable[[dict, torch.device], Prepared]:
    def make(p: dict, device: torch.device) -> Prepared:
        wl = WORKLOADS[op]
        fn = getattr(importlib.import_module(f"kvkernels.reference.{wl.module}"), op)
        first = wl.build(p, device)
        moved, flops = wl.traffic(p, first)
        sets = _rotated(lambda: wl.build(p, device), moved, device, first)
        run = wl.make_runner(fn, sets) if wl.make_runner else (lambda i: fn(*sets[i]))
        return Prepared(run, len(sets), moved, flops)

    return make


# ---------------------------------------------------------------------------------------------------
# Decode baselines
def _dense_kv(p: dict, device: torch.device, tokens: int) -> tuple:
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[p["dtype"]]
    B, Hkv, G, D, Lq = p["B"], p["Hkv"], p["G"], p["D"], p.get("Lq", 1)
    q = torch.randn(B, Hkv * G, Lq, D, device=device).to(dt)
    k = torch.randn(B, Hkv, tokens, D, device=device).to(dt)
    v = torch.randn(B, Hkv, tokens, D, device=device).to(dt)
    return q, k, v


def sdpa_dense(tokens_of: Callable[[dict], int]) -> Callable[[dict, torch.device], Prepared]:
    """SDPA over the full, uncompressed cache of ``tokens_of(p)`` tokens (GQA without repeating KV)."""

    def make(p: dict, device: torch.device) -> Prepared:
        T = tokens_of(p)
        first = _dense_kv(p, device, T)
        q, k, v = first
        moved = nbytes(k, v) + 2 * nbytes(q)
        flops = 4 * q.shape[0] * q.shape[1] * q.shape[2] * T * q.shape[3]
        sets = _rotated(lambda: _dense_kv(p, device, T), moved, device, first)
        causal = q.shape[2] > 1

        def run(i):
            q, k, v = sets[i]
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

        return Prepared(run, len(sets), moved, flops)

    return make


_FLEX_COMPILED: dict = {}
ALLOW_CPU_FLEX = False  # report.py --flex: run FlexAttention eagerly on CPU too (slow to trace)


def flex_block_mask(p: dict, device: torch.device) -> Prepared:
    """FlexAttention over per-head caches padded to the longest head, with a length block mask.

    Same per-head lengths as the kvkernels case (same seed). Compiled on GPU (eager flex materializes
    the scores); creating the block mask is setup, not timed.
    """
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Unavailable(f"FlexAttention is not in this torch: {exc}")
    if device.type != "cuda" and not ALLOW_CPU_FLEX:
        raise Unavailable("FlexAttention runs unfused and takes ~15 s to trace on CPU; GPU only "
                          "(report.py --flex to force it)")
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[p["dtype"]]
    B, Hkv, G, D, N, Lq = p["B"], p["Hkv"], p["G"], p["D"], p["N"], p["Lq"]
    lens = segment_lengths(B * Hkv, p["keep"] * N, Lq, N, seed=N + B).view(B, Hkv)
    max_len = int(lens.max())
    lens_dev = lens.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lens_dev[b, h // G]

    block_mask = create_block_mask(mask_mod, B, Hkv * G, Lq, max_len, device=str(device))
    if device.type == "cuda":
        fn = _FLEX_COMPILED.setdefault("flex", torch.compile(flex_attention, dynamic=False))
    else:
        fn = flex_attention
    first = _dense_kv(p, device, max_len)
    live = int(lens.sum())
    moved = 2 * live * D * first[0].element_size() + 2 * nbytes(first[0])
    sets = _rotated(lambda: _dense_kv(p, device, max_len), moved, device, first)

    def run(i):
        q, k, v = sets[i]
        return fn(q, k, v, block_mask=block_mask, enable_gqa=True)

    return Prepared(run, len(sets), moved, 4 * B * Hkv * G * Lq * live * D)


def dequant_sdpa(p: dict, device: torch.device) -> Prepared:
    """Dequantize the whole KIVI cache with kvkernels' kernel, append the tail, run SDPA."""
    backend = "triton"
    try:
        _require_device(backend, device)
        _require_kernel(backend, "kivi_dequantize")
    except Unavailable:
        backend = "reference"  # still a fair picture of the unfused path's memory traffic
    wl = WORKLOADS["kivi_attention"]
    first = wl.build(p, device)
    q, kc, ks, kz, vc, vs, vz, kt, vt, bits, group = first[:11]
    dense = 2 * p["B"] * p["Hkv"] * p["T"] * p["D"] * q.element_size()  # dequantized K and V
    # Reads of the packed cache, the dequantized cache written, then read and written by the
    # concatenation with the tail, then read by SDPA; plus q and o.
    moved = nbytes(kc, ks, kz, vc, vs, vz, kt, vt) + 4 * dense + 2 * nbytes(q)
    sets = _rotated(lambda: wl.build(p, device), moved, device, first)
    k_ = torch.ops.kvkernels

    def run(i):
        q, kc, ks, kz, vc, vs, vz, kt, vt, bits, group = sets[i][:11]
        k = torch.cat([k_.kivi_dequantize(kc, ks, kz, bits, group, "key"), kt], dim=2)
        v = torch.cat([k_.kivi_dequantize(vc, vs, vz, bits, group, "value"), vt], dim=2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)

    tokens = p["T"] + p["tail"]
    return Prepared(run, len(sets), moved, 4 * q.shape[0] * q.shape[1] * q.shape[2] * tokens * p["D"],
                    backend=backend)


def torch_topk(p: dict, device: torch.device) -> Prepared:
    wl = WORKLOADS["topk_mask"]
    first = wl.build(p, device)
    moved, _ = wl.traffic(p, first)
    sets = _rotated(lambda: wl.build(p, device), moved, device, first)

    def run(i):
        scores, k = sets[i]
        idx = torch.topk(scores, min(k, scores.shape[1]), dim=1).indices
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, idx, True)

    return Prepared(run, len(sets), moved, 0)


def graphed(make: Callable[[dict, torch.device], Prepared]) -> Callable[[dict, torch.device], Prepared]:
    """The same case replayed from CUDA graphs (one per input set): launch and dispatch overhead gone.

    Decode kernels move a few MB; at 3 TB/s that is microseconds, comparable to an eager op's Python
    and launch overhead. Graph replay shows the kernels' own speed (and proves they are capturable).
    """

    def make_graphed(p: dict, device: torch.device) -> Prepared:
        if device.type != "cuda":
            raise Unavailable("CUDA graphs need a GPU")
        prepared = make(p, device)
        from kvkernels import use_backend

        graphs = []
        ctx = use_backend(prepared.backend) if prepared.backend else contextlib.nullcontext()
        with ctx:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (compile, autotune lookups) outside the capture
                for i in range(prepared.n_buffers):
                    prepared.run(i)
            torch.cuda.current_stream().wait_stream(side)
            for i in range(prepared.n_buffers):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    prepared.run(i)
                graphs.append(g)
        # The graphs read the inputs' addresses: keep the eager case (which owns the inputs) alive.
        return Prepared(lambda i, _inputs=prepared: graphs[i].replay(), prepared.n_buffers, prepared.bytes,
                        prepared.flops)

    return make_graphed


# ---------------------------------------------------------------------------------------------------
# The case lists. ``smoke``: tiny sizes that run in seconds on CPU under the Triton interpreter.
def _ragged_points(smoke: bool) -> list[dict]:
    if smoke:
        return grid(B=[1], Hkv=[2], G=[2], D=[64], N=[48, 96], keep=[0.3, 0.6], Lq=[1], dtype=["fp16"])
    return grid(B=[8], Hkv=[8], G=[4], D=[128], N=[4096, 16384, 65536], keep=[0.1, 0.3, 0.6], Lq=[1],
                dtype=["bf16"])


def _kivi_points(smoke: bool) -> list[dict]:
    if smoke:
        return grid(B=[1], Hkv=[2], G=[2], D=[64], T=[64, 128], tail=[8], bits=[2], group=[32], Lq=[1], rank=[0],
                    dtype=["fp16"])
    return grid(B=[8], Hkv=[8], G=[4], D=[128], T=[4032, 16320, 65472], tail=[64], bits=[2, 4], group=[32],
                Lq=[1], rank=[0], dtype=["bf16"])


def _largest_reference_context(smoke: bool) -> int:
    # The references materialize every score; past this they only cost minutes, not insight.
    return 10**9 if smoke else 16384


def ragged_cases(smoke: bool) -> list[Case]:
    cases = []
    max_ref = _largest_reference_context(smoke)
    for p in _ragged_points(smoke):
        for impl, make in (("kvkernels", op_impl("ragged_attention", "triton")),
                           ("kvkernels_graph", graphed(op_impl("ragged_attention", "triton"))),
                           ("reference", reference_impl("ragged_attention"))):
            if impl == "reference" and p["N"] > max_ref:
                continue
            cases.append(Case("ragged", "ragged_attention", impl, p, make, context=p["N"], keep=p["keep"]))
    # The uncompressed cache does not depend on keep: one SDPA row per context length.
    for p in {p["N"]: p for p in _ragged_points(smoke)}.values():
        dense = {k: v for k, v in p.items() if k != "keep"}
        for impl, make in (("sdpa_dense", sdpa_dense(lambda q: q["N"])),
                           ("sdpa_dense_graph", graphed(sdpa_dense(lambda q: q["N"])))):
            cases.append(Case("ragged", "ragged_attention", impl, dense, make, context=p["N"], keep=1.0))
    # FlexAttention compiles once per shape (10-30 s each): last, and at one keep ratio unless smoke.
    for p in _ragged_points(smoke):
        if smoke or p["keep"] == 0.3:
            cases.append(Case("ragged", "ragged_attention", "flex_block_mask", p, flex_block_mask, context=p["N"],
                              keep=p["keep"]))
    return cases


def kivi_cases(smoke: bool) -> list[Case]:
    cases = []
    max_ref = _largest_reference_context(smoke)
    for p in _kivi_points(smoke):
        ctx = p["T"] + p["tail"]
        for impl, make in (("kvkernels", op_impl("kivi_attention", "triton")),
                           ("kvkernels_graph", graphed(op_impl("kivi_attention", "triton"))),
                           ("dequant_sdpa", dequant_sdpa), ("reference", reference_impl("kivi_attention"))):
            if impl == "reference" and ctx > max_ref:
                continue
            cases.append(Case("kivi", "kivi_attention", impl, p, make, context=ctx))
    for p in {p["T"]: p for p in _kivi_points(smoke)}.values():
        dense = {k: p[k] for k in ("B", "Hkv", "G", "D", "Lq", "dtype")} | {"N": p["T"] + p["tail"]}
        for impl, make in (("sdpa_dense", sdpa_dense(lambda q: q["N"])),
                           ("sdpa_dense_graph", graphed(sdpa_dense(lambda q: q["N"])))):
            cases.append(Case("kivi", "kivi_attention", impl, dense, make, context=dense["N"]))
    qpoints = WORKLOADS["kivi_quantize"].points("tiny" if smoke else "small")
    for op in ("kivi_quantize", "kivi_dequantize"):
        for p in qpoints:
            for impl, make in (("kvkernels", op_impl(op, "triton")), ("reference", reference_impl(op))):
                cases.append(Case("kivi", op, impl, p, make, context=p["T"]))
    return cases


def topk_cases(smoke: bool) -> list[Case]:
    points = grid(R=[3], M=[100, 400], keep=[0.3]) if smoke else \
        grid(R=[1], M=[2**18, 2**21], keep=[0.3]) + grid(R=[256], M=[8192], keep=[0.1, 0.3, 0.6])
    cases = []
    for p in points:
        for impl, make in (("kvkernels", op_impl("topk_mask", "triton")), ("cupy", op_impl("topk_mask", "cupy")),
                           ("torch_topk", torch_topk), ("reference", reference_impl("topk_mask"))):
            cases.append(Case("topk", "topk_mask", impl, p, make, context=p["M"], keep=p["keep"]))
    return cases


def pool_cases(smoke: bool) -> list[Case]:
    compact = grid(L=[2], B=[1], Hkv=[2], N=[40, 80], D=[64], keep=[0.5], slack=[4], dtype=["fp16"]) if smoke else \
        grid(L=[8], B=[1], Hkv=[8], N=[8192, 32768], D=[128], keep=[0.1, 0.3], slack=[64], dtype=["bf16"])
    append = WORKLOADS["ragged_append"].points("tiny" if smoke else "small")
    cases = []
    for op, points in (("compact_kv", compact), ("ragged_append", append)):
        for p in points:
            for impl, make in (("kvkernels", op_impl(op, "triton")), ("reference", reference_impl(op))):
                cases.append(Case("pool", op, impl, p, make, context=p["N"], keep=p["keep"]))
    return cases


def kvzip_cases(smoke: bool) -> list[Case]:
    points = WORKLOADS["kvzip_score"].points("tiny") if smoke else \
        grid(B=[1], Hkv=[8], G=[4], D=[128], Lq=[512, 2048], N=[2048], sink=[64], dtype=["bf16"])
    return [Case("kvzip", "kvzip_score", impl, p, make, context=p["N"])
            for p in points
            for impl, make in (("kvkernels", op_impl("kvzip_score", "triton")),
                               ("reference", reference_impl("kvzip_score")))]


def lowrank_cases(smoke: bool) -> list[Case]:
    points = WORKLOADS["lowrank_residual"].points("tiny" if smoke else "small")
    return [Case("lowrank", "lowrank_residual", impl, p, make, context=p["T"])
            for p in points
            for impl, make in (("kvkernels", op_impl("lowrank_residual", "triton")),
                               ("reference", reference_impl("lowrank_residual")))]


def _quant_pool_points(smoke: bool) -> list[dict]:
    if smoke:
        return grid(B=[1], Hkv=[2], G=[2], D=[64], N=[256], keep=[0.3], bits=[2], Lq=[1], dtype=["fp16"])
    return grid(B=[1], Hkv=[8], G=[4], D=[128], N=[32768, 131072], keep=[0.3], bits=[2], Lq=[1], dtype=["bf16"])


def _build_quant_pool(p: dict, device: torch.device) -> tuple:
    """One layer of a KVzip (keep, skewed per-head lengths) + KIVI pool: group 32, residual 128, slack 16."""
    import kvkernels

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[p["dtype"]]
    B, Hkv, G, D, N, Lq = p["B"], p["Hkv"], p["G"], p["D"], p["N"], p["Lq"]
    lens = segment_lengths(B * Hkv, p["keep"] * N, Lq, N, seed=N + B).to(torch.int32)
    P = int(lens.sum())
    k_pool, v_pool = (torch.randn(P, D, device=device).to(dt) for _ in range(2))
    starts = (torch.cumsum(lens.long(), 0) - lens.long()).view(1, B, Hkv).to(device)
    pool = kvkernels.quant_pool_build(k_pool, v_pool, starts, lens.view(1, B, Hkv).to(device), p["bits"], 32, 128, 16)
    q = torch.randn(B, Hkv * G, Lq, D, device=device).to(dt)
    return (q, *pool.buffers()[:6], pool.k_tail[0], pool.v_tail[0], pool.q_start[0], pool.q_len[0], pool.t_head[0],
            pool.seg_len[0], p["bits"], 32)


def quant_pool_attention_impl(p: dict, device: torch.device) -> Prepared:
    """``quant_pool_attention`` (Triton): one fused split-K launch (+ merge) over all segments of a layer."""
    _require_device("triton", device)
    _require_kernel("triton", "quant_pool_attention")
    first = _build_quant_pool(p, device)
    moved = nbytes(*first[:9]) + 2 * nbytes(first[0])  # codes, scales, zeros, tails read; q read, o written
    flops = 4 * first[0].shape[0] * first[0].shape[1] * first[0].shape[2] * int(first[12].sum()) * first[0].shape[3]
    sets = _rotated(lambda: _build_quant_pool(p, device), moved, device, first)
    fn = torch.ops.kvkernels.quant_pool_attention
    return Prepared(lambda i: fn(*sets[i]), len(sets), moved, flops, backend="triton")


def quant_pool_cases(smoke: bool) -> list[Case]:
    """Fused quantized ragged decode (KVzip keep 0.3 + KIVI-2) vs fp16/bf16 SDPA over the full dense cache."""
    cases = []
    for p in _quant_pool_points(smoke):
        for impl, make in (("kvkernels", quant_pool_attention_impl),
                           ("kvkernels_graph", graphed(quant_pool_attention_impl))):
            cases.append(Case("quant_pool", "quant_pool_attention", impl, p, make, context=p["N"], keep=p["keep"]))
        dense = {k: v for k, v in p.items() if k not in ("keep", "bits")}
        for impl, make in (("sdpa_dense", sdpa_dense(lambda q: q["N"])),
                           ("sdpa_dense_graph", graphed(sdpa_dense(lambda q: q["N"])))):
            cases.append(Case("quant_pool", "quant_pool_attention", impl, dense, make, context=p["N"], keep=1.0))
    return cases


def headline_cases(smoke: bool) -> list[Case]:
    """The few numbers tier 1 of ``bench/gpu_report.sh`` must bring back (see bench/README.md):
    ragged decode at keep 0.3 vs SDPA on the full cache (with GB/s vs the measured copy), fused KIVI-2 vs
    SDPA at a 32K context, kvzip_score vs one SDPA forward over the same rows, topk_mask over 1e8 scores.
    Eager and CUDA-graph replays; no references (minutes at these sizes)."""
    if smoke:
        ragged = grid(B=[1], Hkv=[2], G=[2], D=[64], N=[96], keep=[0.3], Lq=[1], dtype=["fp16"])
        kivi = grid(B=[1], Hkv=[2], G=[2], D=[64], T=[96], tail=[32], bits=[2], group=[32], Lq=[1], rank=[0],
                    dtype=["fp16"])
        kvzip = WORKLOADS["kvzip_score"].points("tiny")
        topk = grid(R=[1], M=[1000], keep=[0.3])
    else:
        ragged = grid(B=[8], Hkv=[8], G=[4], D=[128], N=[32768], keep=[0.3], Lq=[1], dtype=["bf16"])
        kivi = grid(B=[8], Hkv=[8], G=[4], D=[128], T=[32704], tail=[64], bits=[2], group=[32], Lq=[1], rank=[0],
                    dtype=["bf16"])
        kvzip = grid(B=[1], Hkv=[8], G=[4], D=[128], Lq=[2048], N=[2048], sink=[64], dtype=["bf16"])
        topk = grid(R=[1], M=[10**8], keep=[0.3])
    cases = []
    for p in ragged:
        dense = {k: v for k, v in p.items() if k != "keep"}
        cases += [Case("ragged", "ragged_attention", "kvkernels", p, op_impl("ragged_attention", "triton"),
                       context=p["N"], keep=p["keep"]),
                  Case("ragged", "ragged_attention", "kvkernels_graph", p,
                       graphed(op_impl("ragged_attention", "triton")), context=p["N"], keep=p["keep"]),
                  Case("ragged", "ragged_attention", "sdpa_dense", dense, sdpa_dense(lambda q: q["N"]),
                       context=p["N"], keep=1.0),
                  Case("ragged", "ragged_attention", "sdpa_dense_graph", dense,
                       graphed(sdpa_dense(lambda q: q["N"])), context=p["N"], keep=1.0)]
    for p in kivi:
        ctx = p["T"] + p["tail"]
        dense = {k: p[k] for k in ("B", "Hkv", "G", "D", "Lq", "dtype")} | {"N": ctx}
        cases += [Case("kivi", "kivi_attention", "kvkernels", p, op_impl("kivi_attention", "triton"), context=ctx),
                  Case("kivi", "kivi_attention", "kvkernels_graph", p, graphed(op_impl("kivi_attention", "triton")),
                       context=ctx),
                  Case("kivi", "kivi_attention", "sdpa_dense", dense, sdpa_dense(lambda q: q["N"]), context=ctx),
                  Case("kivi", "kivi_attention", "sdpa_dense_graph", dense, graphed(sdpa_dense(lambda q: q["N"])),
                       context=ctx)]
    for p in kvzip:
        # One SDPA forward of the same Lq rows over sink + chunk keys: what scoring costs against attention.
        cases += [Case("kvzip", "kvzip_score", "kvkernels", p, op_impl("kvzip_score", "triton"), context=p["N"]),
                  Case("kvzip", "kvzip_score", "sdpa_dense", p, sdpa_dense(lambda q: q["N"] + q["sink"]),
                       context=p["N"])]
    for p in topk:
        cases += [Case("topk", "topk_mask", impl, p, make, context=p["M"], keep=p["keep"])
                  for impl, make in (("kvkernels", op_impl("topk_mask", "triton")),
                                     ("cupy", op_impl("topk_mask", "cupy")), ("torch_topk", torch_topk))]
    return cases


CASES = {
    "headline": headline_cases,  # not in FAMILIES: a selection of the others' cases, for gpu_report tier 1
    "ragged": ragged_cases,
    "kivi": kivi_cases,
    "topk": topk_cases,
    "pool": pool_cases,
    "kvzip": kvzip_cases,
    "lowrank": lowrank_cases,
    "quant_pool": quant_pool_cases,
}


def cases_for(family: str, smoke: bool) -> list[Case]:
    return CASES[family](smoke)


def all_cases(families=FAMILIES, smoke: bool = False) -> list[Case]:
    """Every case of the families; cases that compile slowly (FlexAttention) come after all others, so a
    time budget cuts them first."""
    cases = [c for f in families for c in cases_for(f, smoke)]
    return sorted(cases, key=lambda c: c.impl in SLOW_TO_START)


SLOW_TO_START = ("flex_block_mask",)
