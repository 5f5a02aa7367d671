"""Inputs, shape grids, traffic counts and output checks for every kvkernels op.

Shared by the autotuner (which times kernel configs on these inputs) and the benchmarks in
``bench/`` (which time kvkernels against baselines on them). For each op:

* ``grids``: named presets of grid points. A point is a dict of sizes (B batch, Hkv KV heads, G query
  heads per KV head, D head dim, N context tokens, Lq query rows, keep kept fraction, ...).
  ``tiny`` runs under the Triton interpreter in seconds; ``small`` is what ``bench/gpu_report.sh``
  tunes in a minute on a GPU; ``full`` is the grid whose winners we ship.
* ``build(point, device)``: the op's positional arguments, exactly those of ``kvkernels.reference``,
  drawn at random (never zeros, which hide unwritten outputs and can run faster).
* ``traffic(point, args)``: (bytes, flops) - the fewest bytes the op must move through device memory
  (each input read once, each output written once) and its arithmetic, for bandwidth and FLOP/s.
* ``observe``/``compare``: what to compare between a kernel and the reference, and how closely.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Relative Frobenius error allowed between a kernel and the fp32 reference, by input dtype. fp32
# inputs go through tf32 dots in Triton (about 3e-4 relative); fp16/bf16 round the output.
REL_TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def grid(**axes) -> list[dict]:
    """All combinations of the given axis values, as a list of dicts (in the order given)."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def nbytes(*tensors) -> int:
    """Total bytes of the given tensors (None and non-tensors count zero; lists are walked)."""
    total = 0
    for t in tensors:
        if isinstance(t, (list, tuple)):
            total += nbytes(*t)
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.double(), ref.double()
    if not torch.isfinite(a).all():
        return math.inf
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def clone_args(args: tuple) -> tuple:
    """Deep copy of tensors (and lists of tensors) so a mutating op leaves the originals alone."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return a.clone()
        if isinstance(a, list):
            return [one(x) for x in a]
        return a

    return tuple(one(a) for a in args)


def segment_lengths(count: int, mean: float, lo: int, hi: int, seed: int) -> torch.Tensor:
    """``count`` int lengths spread uniformly over [0.5, 1.5] x mean and clipped to [lo, hi].

    KVzip's non-uniform budget gives heads very different lengths; a kernel must not be timed on
    equal segments only.
    """
    gen = torch.Generator().manual_seed(seed)
    factors = 0.5 + torch.rand(count, generator=gen)
    return (factors * mean).round().long().clamp(lo, hi)


def live_rows(seg_start: torch.Tensor, seg_len: torch.Tensor) -> torch.Tensor:
    """Pool row indices of every live row (segment after segment), for comparing pools."""
    starts = seg_start.flatten().long()
    lens = seg_len.flatten().long()
    total = int(lens.sum())
    first_of_each = torch.cumsum(lens, 0) - lens
    within = torch.arange(total, device=starts.device) - torch.repeat_interleave(first_of_each, lens)
    return torch.repeat_interleave(starts, lens) + within


@dataclass
class Workload:
    op: str
    module: str  # kernel module under kvkernels.<backend> (and kvkernels.reference)
    family: str  # benchmark family
    grids: dict[str, list[dict]]
    build: Callable[[dict, torch.device], tuple]
    traffic: Callable[[dict, tuple], tuple[int, int]]
    compare: Callable[[tuple, tuple, tuple], tuple[bool, str]]
    # What the comparison looks at: by default the op's return value; mutating ops return the
    # tensors they mutated.
    observe: Callable[[Any, tuple], tuple] = field(default=lambda result, args: _as_tuple(result))
    # For ops that mutate their inputs: (fn, arg sets) -> run(i) that keeps the inputs valid across
    # repeated calls. None: run(i) = fn(*sets[i]).
    make_runner: Optional[Callable[[Callable, list], Callable[[int], Any]]] = None
    # The ground truth; None: kvkernels.reference.<module>.<op>.
    reference: Optional[Callable] = None

    def points(self, preset: str) -> list[dict]:
        return [dict(p) for p in self.grids.get(preset, [])]


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _close(out: tuple, ref: tuple, dtype: torch.dtype) -> tuple[bool, str]:
    tol = REL_TOL[dtype]
    for i, (o, r) in enumerate(zip(out, ref)):
        if o.shape != r.shape:
            return False, f"output {i}: shape {tuple(o.shape)} != reference {tuple(r.shape)}"
        if o.numel() == 0:
            continue
        err = rel_err(o, r)
        if not err <= tol:
            return False, f"output {i}: relative error {err:.2e} > {tol:.0e}"
    return True, ""


def _exact(out: tuple, ref: tuple) -> tuple[bool, str]:
    for i, (o, r) in enumerate(zip(out, ref)):
        if o.shape != r.shape or o.dtype != r.dtype or not torch.equal(o, r):
            return False, f"output {i} differs from the reference"
    return True, ""


def _randn(shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=torch.float32).to(dtype)


def _dtype(p: dict) -> torch.dtype:
    return DTYPES[p.get("dtype", "fp16")]


# ---------------------------------------------------------------------------------------------------
# kvzip_score
def _build_kvzip(p, device):
    dt = _dtype(p)
    B, Hkv, G, D, Lq, N, sink = p["B"], p["Hkv"], p["G"], p["D"], p["Lq"], p["N"], p["sink"]
    q = _randn((B, Hkv * G, Lq, D), dt, device)
    k = _randn((B, Hkv, sink + N, D), dt, device)
    k_self = _randn((B, Hkv, Lq, D), dt, device)
    return (q, k, k_self, sink, sink, sink + N, 1.0 / math.sqrt(D))


def _traffic_kvzip(p, args):
    q, k, k_self = args[:3]
    B, Hq, Lq, D = q.shape
    keys = p["sink"] + p["N"] + Lq
    out_bytes = 4 * B * p["Hkv"] * p["N"]
    return nbytes(q, k, k_self) + out_bytes, 2 * B * Hq * Lq * keys * D


# ---------------------------------------------------------------------------------------------------
# topk_mask
def _build_topk(p, device):
    scores = torch.randn(p["R"], p["M"], device=device, dtype=torch.float32)
    return (scores, max(1, int(p["keep"] * p["M"])))


def _traffic_topk(p, args):
    return 5 * p["R"] * p["M"], 0  # read fp32 scores, write a bool mask


# ---------------------------------------------------------------------------------------------------
# compact_kv
def _build_compact(p, device):
    dt = _dtype(p)
    L, B, H, N, D = p["L"], p["B"], p["Hkv"], p["N"], p["D"]
    keys = [_randn((B, H, N, D), dt, device) for _ in range(L)]
    values = [_randn((B, H, N, D), dt, device) for _ in range(L)]
    # Per-head keep ratios vary like KVzip's global budget does.
    ratios = segment_lengths(L * B * H, p["keep"] * 1000, 0, 1000, seed=N + L).float() / 1000
    keep = torch.rand(L, B, H, N, device=device) < ratios.to(device).view(L, B, H, 1)
    return (keys, values, keep, int(keep.sum()), p["slack"])


def _traffic_compact(p, args):
    keys, _, keep, num_kept, slack = args
    D, esz = keys[0].shape[-1], keys[0].element_size()
    # Read the keep mask and the kept K/V rows, write them once.
    return keep.numel() + 4 * num_kept * D * esz, 0


def _observe_compact(result, args):
    k_pool, v_pool, seg_start, seg_len, seg_cap = result
    rows = live_rows(seg_start, seg_len)
    return k_pool[rows], v_pool[rows], seg_start, seg_len, seg_cap


# ---------------------------------------------------------------------------------------------------
# ragged_append
def _build_append(p, device):
    dt = _dtype(p)
    L, B, H, N, D, t = p["L"], p["B"], p["Hkv"], p["N"], p["D"], p["t"]
    lens = segment_lengths(L * B * H, p["keep"] * N, 1, N, seed=N).view(L, B, H)
    slack = 64 * t  # room for 64 appends before the runner rolls seg_len back
    cap = lens + slack
    starts = torch.cumsum(cap.flatten(), 0) - cap.flatten()
    P = int(cap.sum())
    k_pool = _randn((P, D), dt, device)
    v_pool = _randn((P, D), dt, device)
    k_new = _randn((B, H, t, D), dt, device)
    v_new = _randn((B, H, t, D), dt, device)
    return (k_pool, v_pool, starts.view(L, B, H).to(device), lens.to(torch.int32).to(device),
            cap.to(torch.int32).to(device), p.get("layer", 0), k_new, v_new)


def _traffic_append(p, args):
    k_new, v_new = args[6], args[7]
    return 2 * nbytes(k_new, v_new), 0  # read the new rows, write them into the pool


def _observe_append(result, args):
    k_pool, v_pool, seg_start, seg_len = args[:4]
    rows = live_rows(seg_start, seg_len)
    return k_pool[rows], v_pool[rows], seg_len


def _append_runner(fn, sets):
    """Calls that append t rows each; every 64 calls a set's seg_len is rolled back (host counter)."""
    saved = [s[3].clone() for s in sets]
    room = [64] * len(sets)

    def run(i):
        if room[i] == 0:
            sets[i][3].copy_(saved[i])
            room[i] = 64
        room[i] -= 1
        return fn(*sets[i])

    return run


# ---------------------------------------------------------------------------------------------------
# ragged_attention
def _build_ragged(p, device):
    dt = _dtype(p)
    B, Hkv, G, D, N, Lq = p["B"], p["Hkv"], p["G"], p["D"], p["N"], p["Lq"]
    lens = segment_lengths(B * Hkv, p["keep"] * N, Lq, N, seed=N + B)
    starts = torch.cumsum(lens, 0) - lens
    P = int(lens.sum())
    q = _randn((B, Hkv * G, Lq, D), dt, device)
    k_pool = _randn((P, D), dt, device)
    v_pool = _randn((P, D), dt, device)
    return (q, k_pool, v_pool, starts.view(B, Hkv).to(device), lens.to(torch.int32).view(B, Hkv).to(device),
            1.0 / math.sqrt(D), False)


def _traffic_ragged(p, args):
    q, k_pool, v_pool, seg_start, seg_len = args[:5]
    B, Hq, Lq, D = q.shape
    live = int(seg_len.sum())
    esz = q.element_size()
    G = Hq // seg_len.shape[1]
    return 2 * live * D * esz + 2 * nbytes(q), 4 * G * Lq * live * D


# ---------------------------------------------------------------------------------------------------
# KIVI
def _kivi_valid(p) -> bool:
    return p["D"] % p["group"] == 0 and p["T"] % p["group"] == 0


def _build_kivi_quantize(p, device):
    x = _randn((p["B"], p["Hkv"], p["T"], p["D"]), _dtype(p), device)
    return (x, p["bits"], p["group"], p["axis"])


def _traffic_kivi_quantize(p, args):
    x, bits, group, _ = args
    n = x.numel()
    return nbytes(x) + n * bits // 8 + 2 * (n // group) * x.element_size(), 0


def _build_kivi_dequantize(p, device):
    from kvkernels.reference.kivi import kivi_quantize

    x, bits, group, axis = _build_kivi_quantize(p, device)
    codes, scale, zero = kivi_quantize(x, bits, group, axis)
    return (codes, scale, zero, bits, group, axis)


def _traffic_kivi_dequantize(p, args):
    codes, scale, zero = args[:3]
    n = p["B"] * p["Hkv"] * p["T"] * p["D"]
    return nbytes(codes, scale, zero) + n * scale.element_size(), 0


def _build_kivi_attention(p, device):
    from kvkernels.reference.kivi import kivi_quantize

    dt = _dtype(p)
    B, Hkv, G, D, T, R, Lq = p["B"], p["Hkv"], p["G"], p["D"], p["T"], p["tail"], p["Lq"]
    bits, group, rank = p["bits"], p["group"], p.get("rank", 0)
    k_codes, k_scale, k_zero = kivi_quantize(_randn((B, Hkv, T, D), dt, device), bits, group, "key")
    v_codes, v_scale, v_zero = kivi_quantize(_randn((B, Hkv, T, D), dt, device), bits, group, "value")
    q = _randn((B, Hkv * G, Lq, D), dt, device)
    k_tail = _randn((B, Hkv, R, D), dt, device)
    v_tail = _randn((B, Hkv, R, D), dt, device)
    lowrank = [None] * 4
    if rank:
        lowrank = [_randn((B, Hkv, T, rank), dt, device) * 0.1, _randn((B, Hkv, D, rank), dt, device) * 0.1,
                   _randn((B, Hkv, T, rank), dt, device) * 0.1, _randn((B, Hkv, D, rank), dt, device) * 0.1]
    return (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, bits, group,
            1.0 / math.sqrt(D), *lowrank)


def _traffic_kivi_attention(p, args):
    q = args[0]
    B, Hq, Lq, D = q.shape
    tokens = p["T"] + p["tail"]
    # Everything is read once (q, packed codes, scales, zeros, tails, low-rank factors); o written once.
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return nbytes(*tensors) + nbytes(q), 4 * Hq * B * Lq * tokens * D


# ---------------------------------------------------------------------------------------------------
# lowrank_residual
def _build_lowrank(p, device):
    err = _randn((p["B"], p["Hkv"], p["T"], p["D"]), _dtype(p), device)
    return (err, p["rank"], p["iters"])


def _traffic_lowrank(p, args):
    err, rank, iters = args
    B, H, T, D = err.shape
    out = B * H * (T + D) * rank * err.element_size()
    return nbytes(err) + out, iters * 4 * B * H * T * D * rank


def _compare_lowrank(out, ref, args):
    # U and W are unique only up to a rotation of the basis; U·Wᵀ is what attention uses.
    prod_out = out[0].float() @ out[1].float().transpose(-1, -2)
    prod_ref = ref[0].float() @ ref[1].float().transpose(-1, -2)
    return _close((prod_out,), (prod_ref,), args[0].dtype)


def _compare_kivi_quantize(out, ref, args):
    # Codes may differ by one level where (x - zero) / scale lands on a rounding tie (a kernel may
    # multiply by a reciprocal); compare what the codes mean instead.
    from kvkernels.reference.kivi import kivi_dequantize

    x, bits, group, axis = args
    ok, why = _close(out[1:], ref[1:], x.dtype)
    if not ok:
        return ok, "scale/zero: " + why
    x_out = kivi_dequantize(out[0], out[1], out[2], bits, group, axis)
    x_ref = kivi_dequantize(ref[0], ref[1], ref[2], bits, group, axis)
    return _close((x_out,), (x_ref,), x.dtype)


# ---------------------------------------------------------------------------------------------------
TINY_KV = dict(B=[1], Hkv=[2], D=[64], dtype=["fp16"])

# Quantize and dequantize run over the same shapes.
KIVI_CODEC_GRIDS = {
    "tiny": grid(**TINY_KV, T=[64], bits=[2], group=[32], axis=["key", "value"]),
    "small": grid(B=[8], Hkv=[8], T=[4096], D=[128], bits=[2], group=[32], axis=["key", "value"], dtype=["bf16"]),
    "full": [p for p in grid(B=[8], Hkv=[8], T=[4096], D=[64, 128], bits=[2, 4], group=[32, 64, 128],
                             axis=["key", "value"], dtype=["bf16", "fp16"]) if _kivi_valid(p)],
}

WORKLOADS: dict[str, Workload] = {
    "kvzip_score": Workload(
        op="kvzip_score", module="kvzip_score", family="kvzip",
        grids={
            "tiny": grid(**TINY_KV, G=[2], Lq=[16], N=[48], sink=[4]),
            "small": grid(B=[1], Hkv=[8], G=[4], D=[128], Lq=[512], N=[2048], sink=[64], dtype=["bf16"]),
            "full": grid(B=[1], Hkv=[8], G=[1, 3, 4, 8], D=[64, 128], Lq=[256, 2048], N=[2048], sink=[64],
                         dtype=["bf16", "fp16"]),
        },
        build=_build_kvzip, traffic=_traffic_kvzip,
        compare=lambda out, ref, args: _close(out, ref, args[0].dtype),
    ),
    "topk_mask": Workload(
        op="topk_mask", module="topk", family="topk",
        grids={
            "tiny": grid(R=[3], M=[100], keep=[0.3]),
            "small": grid(R=[1, 256], M=[8192, 2**21], keep=[0.3]),
            "full": grid(R=[1, 8, 256], M=[4096, 65536, 2**21], keep=[0.1, 0.3, 0.6]),
        },
        build=_build_topk, traffic=_traffic_topk,
        compare=lambda out, ref, args: _exact(out, ref),
    ),
    "compact_kv": Workload(
        op="compact_kv", module="pool", family="pool",
        grids={
            "tiny": grid(L=[2], B=[1], Hkv=[2], N=[40], D=[64], keep=[0.5], slack=[4], dtype=["fp16"]),
            "small": grid(L=[8], B=[1], Hkv=[8], N=[8192], D=[128], keep=[0.3], slack=[64], dtype=["bf16"]),
            "full": grid(L=[8], B=[1, 4], Hkv=[8], N=[8192, 32768], D=[64, 128], keep=[0.1, 0.3, 0.6],
                         slack=[64], dtype=["bf16"]),
        },
        build=_build_compact, traffic=_traffic_compact, observe=_observe_compact,
        compare=lambda out, ref, args: _exact(out, ref),
    ),
    "ragged_append": Workload(
        op="ragged_append", module="pool", family="pool",
        grids={
            "tiny": grid(L=[2], B=[1], Hkv=[2], N=[32], D=[64], keep=[0.5], t=[1], dtype=["fp16"]),
            "small": grid(L=[4], B=[8], Hkv=[8], N=[4096], D=[128], keep=[0.3], t=[1, 16], dtype=["bf16"]),
            "full": grid(L=[4], B=[1, 8, 32], Hkv=[8], N=[4096], D=[64, 128], keep=[0.3], t=[1, 16, 128],
                         dtype=["bf16"]),
        },
        build=_build_append, traffic=_traffic_append, observe=_observe_append, make_runner=_append_runner,
        compare=lambda out, ref, args: _exact(out, ref),
    ),
    "ragged_attention": Workload(
        op="ragged_attention", module="ragged_attention", family="ragged",
        grids={
            "tiny": grid(**TINY_KV, G=[2], N=[48], keep=[0.5], Lq=[1]),
            "small": grid(B=[1, 8], Hkv=[8], G=[4], D=[128], N=[32768], keep=[0.3], Lq=[1], dtype=["bf16"]),
            "full": grid(B=[1, 8, 32], Hkv=[8], G=[1, 3, 4, 8], D=[64, 128], N=[4096, 32768, 131072],
                         keep=[0.1, 0.3], Lq=[1, 8], dtype=["bf16"]),
        },
        build=_build_ragged, traffic=_traffic_ragged,
        compare=lambda out, ref, args: _close(out[:1], ref[:1], args[0].dtype),
    ),
    "kivi_quantize": Workload(
        op="kivi_quantize", module="kivi", family="kivi",
        grids=KIVI_CODEC_GRIDS,
        build=_build_kivi_quantize, traffic=_traffic_kivi_quantize, compare=_compare_kivi_quantize,
    ),
    "kivi_dequantize": Workload(
        op="kivi_dequantize", module="kivi", family="kivi",
        grids=KIVI_CODEC_GRIDS,
        build=_build_kivi_dequantize, traffic=_traffic_kivi_dequantize,
        compare=lambda out, ref, args: _close(out, ref, args[1].dtype),
    ),
    "kivi_attention": Workload(
        op="kivi_attention", module="kivi", family="kivi",
        grids={
            "tiny": grid(**TINY_KV, G=[2], T=[64], tail=[8], bits=[2], group=[32], Lq=[1], rank=[0]),
            "small": grid(B=[8], Hkv=[8], G=[4], D=[128], T=[16384], tail=[64], bits=[2], group=[32], Lq=[1],
                          rank=[0, 4], dtype=["bf16"]),
            "full": [p for p in grid(B=[1, 8, 32], Hkv=[8], G=[1, 4], D=[64, 128], T=[4096, 32768], tail=[64],
                                     bits=[2, 4], group=[32, 128], Lq=[1], rank=[0, 4], dtype=["bf16"])
                     if _kivi_valid(p)],
        },
        build=_build_kivi_attention, traffic=_traffic_kivi_attention,
        compare=lambda out, ref, args: _close(out, ref, args[0].dtype),
    ),
    "lowrank_residual": Workload(
        op="lowrank_residual", module="lowrank", family="lowrank",
        grids={
            "tiny": grid(B=[1], Hkv=[2], T=[64], D=[64], rank=[4], iters=[2], dtype=["fp32"]),
            "small": grid(B=[8], Hkv=[8], T=[4096], D=[128], rank=[4], iters=[3], dtype=["bf16"]),
            "full": grid(B=[1, 8], Hkv=[8], T=[1024, 4096, 16384], D=[64, 128], rank=[2, 4, 8], iters=[2, 3],
                         dtype=["bf16", "fp32"]),
        },
        build=_build_lowrank, traffic=_traffic_lowrank, compare=_compare_lowrank,
    ),
}

PRESETS = ("tiny", "small", "full")


def families() -> dict[str, list[str]]:
    """Benchmark/kernel family -> its ops, e.g. {'kivi': ['kivi_quantize', ...]}."""
    out: dict[str, list[str]] = {}
    for name, wl in WORKLOADS.items():
        out.setdefault(wl.family, []).append(name)
    return out


def resolve_ops(names: Optional[list[str]]) -> list[str]:
    """Expand op names, family names ('kivi') and module names ('pool') into op names, in grid order."""
    if not names:
        return list(WORKLOADS)
    chosen: list[str] = []
    for name in names:
        matches = [op for op, wl in WORKLOADS.items() if name in (op, wl.family, wl.module)]
        if not matches:
            known = sorted(set(WORKLOADS) | {w.family for w in WORKLOADS.values()} | {w.module for w in WORKLOADS.values()})
            raise ValueError(f"unknown op or family {name!r}; known: {', '.join(known)}")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def parse_filters(tokens: Optional[list[str]]) -> dict[str, set[str]]:
    """``["D=128", "G=1,4"]`` -> {"D": {"128"}, "G": {"1", "4"}} (values compared as strings)."""
    filters: dict[str, set[str]] = {}
    for token in tokens or []:
        for part in token.split():
            if "=" not in part:
                raise ValueError(f"--shapes takes NAME=VALUE[,VALUE...] filters, got {part!r}")
            name, values = part.split("=", 1)
            filters.setdefault(name.strip(), set()).update(v.strip() for v in values.split(","))
    return filters


def matches(point: dict, filters: dict[str, set[str]]) -> bool:
    """A point passes when every filtered name it has takes one of the allowed values."""
    return all(name not in point or str(point[name]) in allowed for name, allowed in filters.items())


def describe(point: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())
