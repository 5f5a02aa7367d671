"""One layer of KVzip's scoring pass on CPU: the reconstruction forward's attention and ``kvzip_score``.

SmolLM2's shape (9 query heads on 3 KV heads, D = 64), one reconstruction chunk of ``--chunk`` tokens plus
the repeat prompt (``--prompt`` tokens) over a context of ``--context`` tokens, fp32, batch 1. Timed, in
one run with every variant interleaved round by round (median and min of ``--rounds``; wall time,
``--threads``; the host may be shared: read the ratios, which compare times taken seconds apart):

* ``attention compiled`` / ``attention eager``: ``context_then_causal_self`` with ``scored`` (output + the
  scored LSE) through the compiled kernel (``csrc/attention.cpp``) and through the PyTorch path (two fused
  flash calls merged by log-sum-exp);
* ``score compiled`` / ``score eager``: ``kvzip_score`` given that LSE (its max pass only), with the
  compiled kernel (``csrc/kvzip_score.cpp``) and without;
* ``prefill attention (SDPA)``: what the prefill runs for the same layer at the same context length
  (causal SDPA over ``--context`` tokens, 9 heads): the baseline the compression-over-prefill ratio
  divides by.

Each line also gives GFLOP/s (2 * D flops per query-key product, 2 * D per weighted value: what is
computed, not the flops of the masked half of causal blocks). Results: ``--out`` JSON with the machine,
threads, torch version and the command.

Run: ``python -m bench.scoring_layer_cpu [--context 2042] [--chunk 2042] [--rounds 15] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import kvkernels
from kvkernels.cpu import native
from kvkernels.cpu.ragged_attention import context_then_causal_self

HQ, HKV, D = 9, 3, 64


def inputs(context: int, lq: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HQ, lq, D, generator=gen)
    k, v = (torch.randn(1, HKV, context + lq, D, generator=gen) for _ in range(2))
    return q, k, v


def variants(context: int, chunk: int, prompt: int, sink: int):
    """{name: (callable, flops)} for one layer."""
    lq = chunk + prompt
    q, k, v = inputs(context, lq)
    scale = D ** -0.5
    start, end = sink, min(context, sink + chunk)
    scored = (sink, start, end)
    with native.forced(True):
        _, row_lse = context_then_causal_self(q, k, v, context, scale, scored=scored)
    k_self = k[:, :, context:].contiguous()
    # The prefill's attention of this layer: 9 heads, keys and values repeated per query head as
    # transformers' SDPA path passes them.
    pq, pk, pv = (torch.randn(1, HQ, context, D) for _ in range(3))

    def attention(on):
        def run():
            with native.forced(on):
                context_then_causal_self(q, k, v, context, scale, scored=scored)
        return run

    def score(on):
        def run():
            with native.forced(on), kvkernels.use_backend("cpu"):
                kvkernels.kvzip_score(q, k, k_self, sink, start, end, scale, row_lse)
        return run

    def prefill():
        torch.nn.functional.scaled_dot_product_attention(pq, pk, pv, is_causal=True)

    pairs_attention = HQ * lq * context + HQ * lq * (lq + 1) / 2  # context keys + causal own keys
    pairs_score = HQ * lq * (end - start)
    pairs_prefill = HQ * context * (context + 1) / 2
    return {
        "attention compiled": (attention(True), 4 * D * pairs_attention),
        "attention eager": (attention(False), 4 * D * pairs_attention),
        "score compiled": (score(True), 2 * D * pairs_score),
        "score eager": (score(False), 2 * D * pairs_score),
        "prefill attention (SDPA)": (prefill, 4 * D * pairs_prefill),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=2042, help="context tokens (the prefilled cache)")
    parser.add_argument("--chunk", type=int, default=2042, help="context tokens in the reconstruction chunk")
    parser.add_argument("--prompt", type=int, default=31, help="repeat-prompt tokens before the chunk")
    parser.add_argument("--sink", type=int, default=30, help="sink (system prompt) tokens")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/cpu/scoring_layer.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = variants(args.context, args.chunk, args.prompt, args.sink)
    for fn, _ in runs.values():
        fn()  # warm-up (and the kernels' build, if needed)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (fn, _) in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["prefill attention (SDPA)"])
    results = []
    for name, (_, flops) in runs.items():
        t, fastest = statistics.median(times[name]), min(times[name])
        results.append({"variant": name, "ms": round(t * 1e3, 2), "min_ms": round(fastest * 1e3, 2),
                        "gflops": round(flops / t / 1e9, 1), "gflops_at_min": round(flops / fastest / 1e9, 1),
                        "ratio_to_prefill_attention": round(t / base, 3)})
        print(f"{name:26s} median {t * 1e3:7.1f} ms (min {fastest * 1e3:7.1f})  {flops / t / 1e9:6.1f} GFLOP/s  "
              f"{t / base:5.2f}x prefill attention")
    for kind in ("attention", "score"):
        eager = statistics.median(times[f"{kind} eager"])
        compiled = statistics.median(times[f"{kind} compiled"])
        ratios = [e / c for e, c in zip(times[f"{kind} eager"], times[f"{kind} compiled"])]
        print(f"{kind}: compiled {eager / compiled:.2f}x faster than eager (medians; median of per-round "
              f"ratios {statistics.median(ratios):.2f}x)")
    meta = {"command": "python -m bench.scoring_layer_cpu " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores visible", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "native": native.status(), "context": args.context, "chunk": args.chunk,
            "prompt": args.prompt, "rounds": args.rounds, "shape": f"Hq {HQ}, Hkv {HKV}, D {D}, fp32, batch 1"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
