"""Which task families can SmolLM2-135M-Instruct answer with the FULL cache? (no compression: cheap)

A compression method can only be judged on questions the model answers without compression, so the
evaluation keeps task families whose full-cache accuracy is high at the tested lengths. This script
prefills each generated context once, asks all its questions on the dense cache, and prints accuracy
with a 95 % Wilson interval per (task, length). Contexts come from a seed the evaluation does not use
(default 1000), so the families are chosen on other questions than the ones reported.

    python -m kvkernels.eval.calibrate --lengths 1024 2048 4096 --contexts 3 --questions 4 \\
        --threads 1 --out bench/results/quality/calibration.json

``--budget-s`` stops starting new contexts after that many seconds (contexts run round-robin over
tasks, so every task gets about the same number).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

CANDIDATES = ["needle", "passkey", "word_needle", "var_tracking", "kv_retrieval", "fact_directory"]


def calibrate(model, tokenizer, tasks, lengths, n_contexts, n_questions, seed, budget_s=None,
              log=lambda s: print(s, flush=True)):
    from kvkernels.hf import prefill

    from .harness import answer
    from .scoring import contains_answer
    from .tasks import make_samples

    count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    rows, t0 = [], time.perf_counter()
    for length in lengths:
        samples = {t: make_samples(t, n_contexts, length, n_questions, seed, count) for t in tasks}
        for i in range(n_contexts):
            for task in tasks:
                if budget_s is not None and time.perf_counter() - t0 > budget_s:
                    log(f"time budget of {budget_s:.0f}s reached")
                    return rows
                sample = samples[task][i]
                t1 = time.perf_counter()
                dense = prefill(model, tokenizer, sample.context)
                for qi, q in enumerate(sample.questions):
                    a = answer(dense, q)
                    rows.append({"task": task, "length": length, "context": i, "question": qi,
                                 "context_tokens": dense.num_tokens - dense.sink_len, "expected": q.answers[0],
                                 "answer": a.text, "correct": contains_answer(a.text, q.answers)})
                    if not rows[-1]["correct"]:
                        log(f"  wrong: {q.prompt!r} expected {q.answers[0]!r}, answered {a.text!r}")
                got = [r["correct"] for r in rows if r["task"] == task and r["length"] == length and r["context"] == i]
                log(f"{task:15s} {length:5d} #{i}: {sum(got)}/{len(got)} ({time.perf_counter() - t1:.0f}s)")
    return rows


def summarize(rows):
    from .stats import wilson_interval
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["length"]), []).append(r["correct"])
    out = []
    for (task, length), c in sorted(groups.items()):
        lo, hi = wilson_interval(sum(c), len(c))
        out.append({"task": task, "length": length, "correct": sum(c), "questions": len(c),
                    "accuracy": round(sum(c) / len(c), 4), "wilson_low": round(lo, 4), "wilson_high": round(hi, 4)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=CANDIDATES)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    p.add_argument("--contexts", type=int, default=3)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the per-question rows and the summary")
    args = p.parse_args(argv)
    import torch

    from kvkernels.hf import load_smollm2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(device="cpu", dtype=torch.float32)
    rows = calibrate(model, tokenizer, args.tasks, args.lengths, args.contexts, args.questions, args.seed,
                     args.budget_s)
    summary = summarize(rows)
    elapsed = time.perf_counter() - t0
    print("| task | length | full-cache accuracy [95% Wilson] | n |\n|---|---|---|---|")
    for s in summary:
        print(f"| {s['task']} | {s['length']} | {s['accuracy']:.2f} [{s['wilson_low']:.2f}, {s['wilson_high']:.2f}] "
              f"| {s['questions']} |")
    print(f"calibration took {elapsed:.0f}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m kvkernels.eval.calibrate " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        args.out.write_text(json.dumps({"command": command, "elapsed_seconds": round(elapsed, 1), "summary": summary,
                                        "answers": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
