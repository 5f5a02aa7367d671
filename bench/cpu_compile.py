"""CPU: compiled vs eager decode over a KVzip pool, and vs the full cache in StaticCache + torch.compile.

    python -m bench.cpu_compile                      # SmolLM2-135M, 8K-token context, keep 0.3, Inductor
    python -m bench.cpu_compile --context-tokens 1024 --backend aot_eager   # a quick check

Two questions of ``--tokens`` new tokens each (end of sequence ignored), the rollback after each, all
variants interleaved in one run (see :mod:`bench.compiled_decode`). The pool's rows are chosen by random
external scores: decode cost does not depend on which rows are kept, and KVzip's 8K scoring pass is slow
on a small CPU. Writes ``OUT.json`` (rows, ratios, checks, versions, command, threads) and ``OUT.md``.
Checks (issue 18): the pool's compiled step compiled once over both answers; no later compiled step
slower than 2x the median; compiled pool ms/token <= 0.75x of StaticCache + compile. On a branch without
the fast CPU ops, the pool's ops run their PyTorch references: rerun after they land.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from bench.compiled_decode import QUESTIONS, context_of_tokens, measure, ratios, table
from bench.harness import command_line, versions

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu" / "compile"


def checks(rows: list[dict], r: dict) -> dict:
    by = {row["variant"]: row for row in rows}
    pool = by["pool compiled"]
    out = {
        "pool step compiled once over both answers": pool["frames"] == 1,
        "no later compiled pool step > 2x median": pool["slowest_over_median"] <= 2.0,
        "compiled pool answers == eager pool answers": pool["token_ids"] == by["pool eager"]["token_ids"],
    }
    if "pool compiled / full StaticCache compiled" in r:
        out["pool compiled <= 0.75x StaticCache compiled"] = r["pool compiled / full StaticCache compiled"] <= 0.75
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context-tokens", type=int, default=8192)
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--tokens", type=int, default=14, help="new tokens per answer (13 one-token steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--no-static", action="store_true", help="skip the StaticCache baseline")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path without extension")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # a shared machine makes per-step timings noisy: record how busy it was
    from kvkernels.hf import load_smollm2

    model, tok = load_smollm2(device="cpu")
    text, people = context_of_tokens(tok, args.context_tokens)
    questions = tuple(q.format(people[i * len(people) // 3].name) for i, q in enumerate(QUESTIONS))
    rows = measure(model, tok, context=text, keep=args.keep, tokens=args.tokens, questions=questions,
                   backend=args.backend, mode=None, static_baseline=not args.no_static, progress=True)
    r = ratios(rows)
    result = {
        "rows": rows, "ratios": r, "checks": checks(rows, r), "questions": questions,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "load_average_before_after": [load_before, os.getloadavg()],
                    "kvkernels_backend": os.environ.get("KVKERNELS_BACKEND", "auto")},
        "versions": versions(), "command": command_line(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = [f"# Compiled decode on CPU ({rows[0]['context_tokens']} context tokens, keep {args.keep})", "",
          table(rows), "", *(f"- {k}: {v:.3f}" for k, v in r.items()),
          *(f"- check: {k}: {'PASS' if v else 'FAIL'}" for k, v in result["checks"].items()), "",
          f"`{result['command']}`; torch {torch.__version__}, {result['machine']['cores']} cores, "
          f"{result['machine']['threads']} threads, load average {load_before[0]:.1f} before / "
          f"{os.getloadavg()[0]:.1f} after"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
