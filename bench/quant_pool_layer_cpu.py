"""One layer's decode step on the quantized ragged pool, on CPU: ``quant_pool_append`` + ``quant_pool_attention``.

SmolLM2's decode shape: B = 1, 3 KV heads with 9 query heads, D = 64, KIVI-2, group 32, residual 128,
``--slack`` rows per segment (default 256, ``compress``'s default; ``bench.cpu_e2e`` uses 20), and KVzip-like
unequal segments (default 700/450/650 rows, a 2K context at keep 0.3). Each implementation is timed over a
cycle of ``--steps`` single-token appends, then as many attentions of one query token, so flushes happen
at their natural rate (each segment once in 32 steps); the pool is rolled back between cycles.
Implementations are interleaved round by round and timed in thread CPU time (``time.thread_time``: on a
shared machine wall time also counts other processes' slices); the median over rounds is reported, with
ratios to the reference. Also timed: the plain (unquantized) KVzip pool of the same rows through
``ragged_append`` + ``ragged_attention`` (``fp pool op``), the cost the quantized pool is compared with.

Implementations: ``reference`` and ``cpu`` (the kernel functions, called directly), ``cpu op`` (the
registered op under the cpu backend: validation + dispatch + kernel, what the transformers cache calls),
``cpu op eager`` and ``fp pool op eager`` (the same with the cpu backend's compiled kernels forced off: the
PyTorch path a machine without a C++ compiler runs), and optionally an older cpu kernel file (``--old
FILE``, a copy of a previous ``kvkernels/cpu/quant_pool.py``;
its missing ops fall back to the reference's, as the backend would).

Run: ``OMP_NUM_THREADS=1 python -m bench.quant_pool_layer_cpu [--lengths 700,450,650] [--slack 256] [--rounds 15]
[--old FILE] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import statistics
import time

import torch

import kvkernels
from kvkernels.cpu import native
from kvkernels.cpu import quant_pool as cpu_qp
from kvkernels.reference import quant_pool as ref_qp


def make_kv(lengths, D, seed=0):
    """Keys, values (2 layers, [1, H, N, D]) and a keep mask giving segments of ``lengths`` rows."""
    gen = torch.Generator().manual_seed(seed)
    H, N = len(lengths), max(lengths) + 1
    keep = torch.zeros(2, 1, H, N, dtype=torch.bool)
    for h, n in enumerate(lengths):
        keep[:, 0, h, :n] = True
    keys = [torch.randn(1, H, N, D, generator=gen) * 2 + 0.5 for _ in range(2)]
    values = [torch.randn(1, H, N, D, generator=gen) for _ in range(2)]
    return keys, values, keep


def make_pool(lengths, D, bits, group, residual, slack):
    """A 2-layer quantized pool (layer 1 measured) whose segments keep ``lengths`` rows."""
    with kvkernels.use_backend("reference"):
        return kvkernels.quant_pool_from_kv(*make_kv(lengths, D), bits, group, residual, slack)


class FpPool:
    """The plain KVzip pool of the same rows (``compact_kv``), with the quantized pool's rollback interface."""

    def __init__(self, lengths, D, slack):
        self.pool = kvkernels.compact_kv(*make_kv(lengths, D), slack=slack)

    def lengths(self):
        return [self.pool.seg_len]


def fp_calls():
    """(append, attend) of one layer of the plain pool through the ops (``ragged_append``, ``ragged_attention``)."""
    def append_(fp, k, v):
        with kvkernels.use_backend("cpu"):
            kvkernels.ragged_append(fp.pool, 1, k, v)

    def attend(fp, q):
        p = fp.pool
        with kvkernels.use_backend("cpu"):
            return kvkernels.ragged_attention(q, p.k_pool, p.v_pool, p.seg_start[1], p.seg_len[1])
    return append_, attend


def rollback(pool, saved):
    if isinstance(pool, FpPool):
        pool.pool.seg_len.copy_(saved[0])
    else:
        kvkernels.quant_pool_rollback(pool, saved)


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_calls(append, attention):
    """(append, attend) of one layer through kernel functions with the ops' signatures."""
    def append_(pool, k, v):
        append(*pool.buffers(), 1, k, v, pool.bits, pool.group_size, pool.residual, False)

    def attend(pool, q):
        return attention(q, *pool.buffers()[:6], pool.k_tail[1], pool.v_tail[1], pool.q_start[1], pool.q_len[1],
                         pool.t_head[1], pool.seg_len[1], pool.bits, pool.group_size, q.shape[-1] ** -0.5, False)[0]
    return append_, attend


def op_calls():
    """(append, attend) of one layer through the registered ops under the cpu backend."""
    def append_(pool, k, v):
        with kvkernels.use_backend("cpu"):
            kvkernels.quant_pool_append(pool, 1, k, v)

    def attend(pool, q):
        with kvkernels.use_backend("cpu"):
            return kvkernels.quant_pool_attention(q, pool, 1)
    return append_, attend


def timed_cycle(pool, saved, calls, inputs):
    """Seconds per call of the appends of one cycle (then rolled back), and of as many attentions over the
    pool as left by the appends."""
    append, attend = calls
    t0 = time.thread_time()
    for q, k, v in inputs:
        append(pool, k, v)
    t1 = time.thread_time()
    for q, k, v in inputs:
        attend(pool, q)
    t2 = time.thread_time()
    rollback(pool, saved)
    return (t1 - t0) / len(inputs), (t2 - t1) / len(inputs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="700,450,650", help="kept rows of each KV head's segment")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=3, help="query heads per KV head")
    parser.add_argument("--slack", type=int, default=256, help="rows reserved per segment at build")
    parser.add_argument("--steps", type=int, default=64, help="appends + attentions per timed cycle")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--old", default=None, help="an older kvkernels/cpu/quant_pool.py to time as 'old cpu'")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    H, D, G = len(lengths), args.head_dim, args.groups

    impls = {"reference": kernel_calls(ref_qp.quant_pool_append, ref_qp.quant_pool_attention),
             "cpu": kernel_calls(cpu_qp.quant_pool_append, cpu_qp.quant_pool_attention),
             "cpu op": op_calls()}
    if args.old:
        old = load_module(args.old, "old_cpu_quant_pool")
        impls["old cpu"] = kernel_calls(getattr(old, "quant_pool_append", ref_qp.quant_pool_append),
                                        old.quant_pool_attention)
    impls["cpu op eager"] = op_calls()
    impls["fp pool op"] = fp_calls()
    impls["fp pool op eager"] = fp_calls()
    eager = {"cpu op eager", "fp pool op eager"}  # run with the compiled kernels forced off
    pools = {name: make_pool(lengths, D, 2, 32, 128, args.slack) for name in impls if not name.startswith("fp pool")}
    pools["fp pool op"] = FpPool(lengths, D, args.slack)
    pools["fp pool op eager"] = FpPool(lengths, D, args.slack)

    def mode(name):
        return native.forced(False) if name in eager else contextlib.nullcontext()
    saved = {name: [t.clone() for t in pool.lengths()] for name, pool in pools.items()}
    gen = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(1, H * G, 1, D, generator=gen), torch.randn(1, H, 1, D, generator=gen),
               torch.randn(1, H, 1, D, generator=gen)) for _ in range(args.steps)]

    outputs = {}
    for name, (append, attend) in impls.items():  # warm-up, and a check that every implementation agrees
        outs = []
        with mode(name):
            for q, k, v in inputs:
                append(pools[name], k, v)
                outs.append(attend(pools[name], q))
        outputs[name] = outs
        rollback(pools[name], saved[name])
    for name, outs in outputs.items():
        if name.startswith("fp pool"):  # not quantized: its outputs differ by the quantization error
            continue
        err = max(float((a - b).abs().max()) for a, b in zip(outs, outputs["reference"]))
        assert err < 1e-4, f"{name} differs from the reference by {err}"

    times = {name: ([], []) for name in impls}
    for _ in range(args.rounds):
        for name, calls in impls.items():
            with mode(name):
                t_append, t_attend = timed_cycle(pools[name], saved[name], calls, inputs)
            times[name][0].append(t_append)
            times[name][1].append(t_attend)
    med = {name: (statistics.median(a), statistics.median(b), statistics.median(x + y for x, y in zip(a, b)))
           for name, (a, b) in times.items()}
    result = dict(command="python -m bench.quant_pool_layer_cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
                  shape=dict(B=1, Hkv=H, Hq=H * G, D=D, lengths=lengths, bits=2, group=32, residual=128,
                             slack=args.slack), timing="thread CPU time, median over rounds",
                  threads=torch.get_num_threads(), load_average=os.getloadavg(), torch=torch.__version__,
                  platform=platform.platform(), results={})
    ref = med["reference"]
    print(f"{'':10s} {'append us':>10s} {'attention us':>13s} {'step us':>9s}   ratios to the reference")
    for name, m in med.items():
        ratios = [x / r for x, r in zip(m, ref)]
        result["results"][name] = dict(append_us=1e6 * m[0], attention_us=1e6 * m[1], step_us=1e6 * m[2],
                                       append_vs_reference=ratios[0], attention_vs_reference=ratios[1],
                                       step_vs_reference=ratios[2])
        print(f"{name:10s} {1e6 * m[0]:10.1f} {1e6 * m[1]:13.1f} {1e6 * m[2]:9.1f}   "
              + "  ".join(f"{r:.3f}x" for r in ratios))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
