"""Per-call overhead of the kvkernels ops in eager mode on CPU, against SDPA and torch.cat in the same run.

    python -m bench.op_overhead [--threads 1] [--rounds 15] [--calls 300] [--out bench/results/cpu/op_overhead.json]

Tiny inputs (one decode query, 3 query heads on 1 KV head, 8 cached rows, D = 64), so the time is the
fixed cost of a call. Every case runs ``--calls`` times per round, the cases interleaved round by
round; the reported time is the median over rounds of the per-call mean (robust to a shared machine),
and the ratios divide by the baseline's median of the same run. Layers measured:

* ``sdpa`` / ``torch.cat x2``: the baselines (a dense decode attention; a DynamicCache-style append of K and V).
* ``kernel``: the cpu backend's function called directly (no dispatch, no validation).
* ``torch.ops``: ``torch.ops.kvkernels.<op>`` (dispatcher + validation + backend resolution + kernel).
* ``api``: ``kvkernels.<op>`` (what the HF integration calls).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kvkernels
from kvkernels.cpu.pool import ragged_append as cpu_append
from kvkernels.cpu.ragged_attention import ragged_attention as cpu_attention


def build_cases():
    q = torch.randn(1, 3, 1, 64)
    k_pool, v_pool = torch.randn(16, 64), torch.randn(16, 64)
    seg_start = torch.zeros(1, 1, dtype=torch.int64)
    seg_len = torch.full((1, 1), 8, dtype=torch.int32)
    dense_k, dense_v = k_pool[:8].reshape(1, 1, 8, 64), v_pool[:8].reshape(1, 1, 8, 64)
    rows = torch.randn(1, 1, 8, 64)
    pool = kvkernels.compact_kv([rows], [rows], torch.ones(1, 1, 1, 8, dtype=torch.bool), 8, 1 << 20)
    new = torch.randn(1, 1, 1, 64)
    saved = pool.seg_len.clone()
    ops = torch.ops.kvkernels

    def rewind():  # appends grow the segment; keep every round on the same rows
        pool.seg_len.copy_(saved)

    attention = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, dense_k, dense_v, enable_gqa=True),
        "kernel": lambda: cpu_attention(q, k_pool, v_pool, seg_start, seg_len, 0.125, False),
        "torch.ops": lambda: ops.ragged_attention(q, k_pool, v_pool, seg_start, seg_len, None, False),
        "api": lambda: kvkernels.ragged_attention(q, k_pool, v_pool, seg_start, seg_len),
    }
    append = {
        "torch.cat x2": lambda: (torch.cat([dense_k, new], 2), torch.cat([dense_v, new], 2)),
        "kernel": lambda: cpu_append(pool.k_pool, pool.v_pool, pool.seg_start, pool.seg_len, pool.seg_cap, 0, new, new),
        "torch.ops": lambda: ops.ragged_append(pool.k_pool, pool.v_pool, pool.seg_start, pool.seg_len, pool.seg_cap,
                                               0, new, new),
        "api": lambda: kvkernels.ragged_append(pool, 0, new, new),
    }
    return {"ragged_attention": (attention, "sdpa", None), "ragged_append": (append, "torch.cat x2", rewind)}


def per_call_us(fn, calls: int, before=None) -> float:
    if before is not None:
        before()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def measure(rounds: int, calls: int) -> dict:
    results = {}
    for op, (cases, baseline, before) in build_cases().items():
        times = {name: [] for name in cases}
        for name, fn in cases.items():  # warm-up (first-call resolution, allocator)
            per_call_us(fn, 50, before)
        for _ in range(rounds):
            for name, fn in cases.items():
                times[name].append(per_call_us(fn, calls, before))
        medians = {name: statistics.median(t) for name, t in times.items()}
        results[op] = {name: {"us": round(m, 2), "ratio_to_" + baseline.replace(" ", "_"): round(m / medians[baseline], 2)}
                       for name, m in medians.items()}
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", default="bench/results/cpu/op_overhead.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        results = measure(args.rounds, args.calls)
    report = {
        "command": "python -m bench.op_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), {platform.processor() or 'cpu'}",
        "torch": torch.__version__, "python": platform.python_version(),
        "note": "median over rounds of the per-call mean; shared machine: read the ratios",
        "results": results,
    }
    for op, cases in results.items():
        for name, row in cases.items():
            print(f"{op:17s} {name:13s} " + "  ".join(f"{k}={v}" for k, v in row.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
