"""KVzip x KIVI quantized pool: KV bytes at synthetic sizes, and CPU decode ms/token on SmolLM2.

Two measurements, one script (results under bench/results/quant_pool/):

1. **Bytes.** The allocated buffers (codes, scales, zeros, full-precision tails, slack) and the live bytes
   of a quantized pool at keep 0.3, 2-bit, group 32, residual 128, slack 256, against the fp16 dense cache,
   at 2K, 8K and 128K tokens. Shapes come from the build op run on the meta device (nothing allocated; the
   fake kernel's shapes are checked against the real ones by ``torch.library.opcheck`` in the tests).
   Both SmolLM2's shape (30 layers x 3 KV heads x D 64) and a Llama-8B-like one (32 x 8 x D 128).
2. **CPU decode.** SmolLM2-135M-Instruct (fp32) on a ~2K-token context: per-token time of single-token
   forward steps over the full ``DynamicCache``, the KVzip keep-0.3 ragged pool, and the same pool
   KIVI-2-quantized (one ``quant_pool_append`` + one ``quant_pool_attention`` per layer), interleaved
   round-robin in one process so load from other processes hits all three alike. Random scores select the
   kept rows (the selection does not change decode cost; it skips the scoring pass).

Run: ``OMP_NUM_THREADS=1 python -m bench.quant_pool_cpu [--tokens 2048] [--steps 24] [--rounds 3]``
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
from kvkernels.reference.quant_pool import quant_pool_rows

OUT = Path(__file__).parent / "results" / "quant_pool"


def quant_bytes(L, H, N, D, keep=0.3, bits=2, group=32, residual=128, slack=256):
    """(dense fp16 bytes, allocated bytes, live bytes) of a pool with every segment holding keep*N rows."""
    seg_len = torch.full((L, 1, H), int(keep * N), dtype=torch.int32)
    q_rows = quant_pool_rows(seg_len, group, residual, slack)
    P = int(seg_len.sum())
    meta = torch.device("meta")
    out = torch.ops.kvkernels.quant_pool_build(
        torch.empty(P, D, dtype=torch.float16, device=meta), torch.empty(P, D, dtype=torch.float16, device=meta),
        torch.empty(L, 1, H, dtype=torch.int64, device=meta), seg_len.to(meta), bits, group, residual, slack, q_rows)
    allocated = kvkernels.QuantPool(*out, bits, group, residual).nbytes(include_slack=True)
    # Live bytes need the lengths, which meta tensors do not hold: the build's flush rule, per segment.
    F = 32 // bits
    n = int(keep * N)
    q = max(n - residual, 0) // group * group
    per_q_row = 2 * (D // F) * 4 + 2 * 2 * (D // group) * 2
    live = L * H * (q * per_q_row + (n - q) * 2 * D * 2)
    return 2 * L * H * N * D * 2, allocated, live


def bytes_table():
    rows = []
    for model, (L, H, D) in (("SmolLM2-135M", (30, 3, 64)), ("Llama-8B-like", (32, 8, 128))):
        for N in (2048, 8192, 131072):
            dense, alloc, live = quant_bytes(L, H, N, D)
            rows.append(dict(model=model, L=L, Hkv=H, D=D, tokens=N, dense_fp16=dense, allocated=alloc, live=live,
                             ratio_allocated=dense / alloc, ratio_live=dense / live))
    return rows


# ---------------------------------------------------------------------------------------------------
# CPU decode


def _context(tokens, tok):
    from kvkernels.demo import directory_text, staff_directory

    people = 8
    while True:
        text = directory_text(staff_directory(people))
        if len(tok(text).input_ids) >= tokens or people >= 800:
            return text
        people = int(people * 1.5)


@torch.no_grad()
def _step_times(model, cache, start, steps, ragged):
    """Seconds of each single-token forward over ``cache`` (tokens fed are arbitrary but fixed)."""
    from kvkernels.hf import RAGGED_ATTENTION, attention_implementation
    import contextlib

    ctx = attention_implementation(model, RAGGED_ATTENTION) if ragged else contextlib.nullcontext()
    times = []
    with ctx:
        for i in range(steps):
            ids = torch.tensor([[100 + i]])
            t0 = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, position_ids=torch.tensor([[start + i]]), use_cache=True)
            times.append(time.perf_counter() - t0)
    return times


def cpu_decode(tokens, steps, rounds):
    from kvkernels.hf import load_smollm2, prefill

    model, tok = load_smollm2(device="cpu")
    dense = prefill(model, tok, _context(tokens, tok))
    cfg = model.config
    n_ctx = dense.num_tokens - dense.sink_len
    scores = torch.rand(cfg.num_hidden_layers, cfg.num_key_value_heads, n_ctx, generator=torch.Generator().manual_seed(0))
    small = dense.compress(0.3, scores=scores, slack=steps + 8)
    quant = small.quantize(2, 32, 128)
    N = dense.num_tokens
    variants = {"full cache (DynamicCache)": (dense.cache, False, lambda: dense.cache.crop(N - dense.cache.get_seq_length())),
                "KVzip 0.3 (ragged pool)": (small.cache, True, small.cache.rollback),
                "KVzip 0.3 + KIVI-2 (quant pool)": (quant.cache, True, quant.cache.rollback)}
    per_token = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (cache, ragged, reset) in variants.items():
            times = _step_times(model, cache, N, steps, ragged)
            reset()
            per_token[name].extend(times[2:])  # the first steps warm caches and allocators
    out = {name: dict(median_ms=1e3 * statistics.median(t), p10_ms=1e3 * sorted(t)[len(t) // 10],
                      p90_ms=1e3 * sorted(t)[9 * len(t) // 10], samples=len(t)) for name, t in per_token.items()}
    base = out["full cache (DynamicCache)"]["median_ms"]
    kvzip = out["KVzip 0.3 (ragged pool)"]["median_ms"]
    for v in out.values():
        v["vs_full"] = v["median_ms"] / base
        v["vs_kvzip"] = v["median_ms"] / kvzip
    bytes_ = {"full cache (DynamicCache)": dense.nbytes(), "KVzip 0.3 (ragged pool)": small.nbytes(False),
              "KVzip 0.3 + KIVI-2 (quant pool)": quant.nbytes(False)}
    for name, b in bytes_.items():
        out[name]["live_kv_bytes"] = b
    return dict(context_tokens=N, steps_per_round=steps, rounds=rounds, variants=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)
    result = dict(command="python -m bench.quant_pool_cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
                  machine=dict(cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                               platform=platform.platform(), shared="yes: 2 cores shared with 7 other sessions"),
                  versions=dict(torch=torch.__version__, python=platform.python_version()),
                  bytes=bytes_table())
    for r in result["bytes"]:
        print(f"{r['model']:14s} {r['tokens']:>7d} tokens: dense {r['dense_fp16'] / 2**20:9.1f} MiB, quant pool "
              f"allocated {r['allocated'] / 2**20:8.2f} MiB ({r['ratio_allocated']:.1f}x), live "
              f"{r['live'] / 2**20:8.2f} MiB ({r['ratio_live']:.1f}x)")
    if not args.skip_decode:
        result["cpu_decode"] = cpu_decode(args.tokens, args.steps, args.rounds)
        for name, v in result["cpu_decode"]["variants"].items():
            print(f"{name:34s} {v['median_ms']:7.1f} ms/token (p10 {v['p10_ms']:.1f}, p90 {v['p90_ms']:.1f}) "
                  f"{v['vs_full']:.2f}x full, {v['vs_kvzip']:.2f}x KVzip, {v['live_kv_bytes'] / 2**20:.2f} MiB")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
