"""KIVI-2 diagnosis on SmolLM2-135M: which part of 2-bit KIVI loses the answers, and does the order matter?

Two measurements on the same generated questions (full cache as the reference):

1. **Accuracy** of KIVI variants (``KIVI_VARIANTS``): attend-then-flush (official) vs flush-then-attend
   (our ``KiviCache``), residual 32 vs 128, group 32 vs 64, keys-only vs values-only 2-bit, and 4-bit;
   each with a 95 % Wilson interval and McNemar's exact test against the full cache on the same questions.
2. **Per-layer attention-output error**: for each question, every layer's attention output over the
   quantized context (the post-prefill KIVI image, question tokens exact) against the same layer's output
   over the exact cache, with the SAME queries (errors do not compound across layers, so each layer's
   number is that layer's own loss): ||o_hat - o|| / ||o|| over the question's rows, averaged over questions.

    python -m kvkernels.eval.kivi_diag --tasks needle passkey --length 1024 --contexts 3 --questions 4 \\
        --threads 1 --out bench/results/quality/kivi_diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from .kivi_sim import KiviConfig, prefill_image

KIVI_VARIANTS = [
    KiviConfig(2, 2, 32, 128, "official"),
    KiviConfig(2, 2, 32, 128, "flush_first"),
    KiviConfig(2, 2, 32, 32, "official"),
    KiviConfig(2, 2, 32, 32, "flush_first"),
    KiviConfig(2, 2, 64, 128, "official"),
    KiviConfig(2, None, 32, 128, "official"),
    KiviConfig(None, 2, 32, 128, "official"),
    KiviConfig(4, 4, 32, 128, "official"),
]
# Layer-error variants: the order does not enter (question tokens exact), only bits/group/residual.
ERROR_VARIANTS = [KiviConfig(2, 2, 32, 128), KiviConfig(2, None, 32, 128), KiviConfig(None, 2, 32, 128),
                  KiviConfig(2, 2, 64, 128), KiviConfig(4, 4, 32, 128), KiviConfig(4, None, 32, 128)]


class AttentionErrorCapture:
    """Per layer: relative error of the attention output over a KIVI image of the first ``num_cached`` keys
    and values, against the exact ones, for each of ``configs`` (same queries)."""

    def __init__(self, configs: List[KiviConfig], num_cached: int):
        self.configs, self.num_cached = configs, num_cached
        self.errors: Dict[str, Dict[int, float]] = {c.label: {} for c in configs}

    def consume(self, layer_idx, query, key, scale, value=None):
        from kvkernels.reference.baselines import causal_attention_probs
        B, Hq, Lq, D = query.shape
        Hkv = key.shape[1]

        def attend(k, v):
            p = causal_attention_probs(query, k, scale)  # [B, Hkv, G, Lq, Nk]
            return torch.einsum("bhgln,bhnd->bhgld", p, v.float())

        exact = attend(key, value)
        n = self.num_cached
        for cfg in self.configs:
            k_hat, v_hat, _, _ = prefill_image(key[:, :, :n], value[:, :, :n], cfg)
            out = attend(torch.cat([k_hat, key[:, :, n:]], 2), torch.cat([v_hat, value[:, :, n:]], 2))
            self.errors[cfg.label][layer_idx] = float((out - exact).norm() / exact.norm())


def diagnose(model, tokenizer, tasks, length, n_contexts, n_questions, seed, budget_s=None, log=print):
    from kvkernels.hf import prefill

    from .harness import answer, forward_question
    from .kivi_sim import KiviContext
    from .scoring import contains_answer
    from .tasks import make_samples

    count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    samples = {t: make_samples(t, n_contexts, length, n_questions, seed, count) for t in tasks}
    rows, layer_errors, t0 = [], [], time.perf_counter()
    for i in range(n_contexts):
        for task in tasks:
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                log(f"time budget of {budget_s:.0f}s reached")
                return rows, layer_errors
            sample = samples[task][i]
            t1 = time.perf_counter()
            dense = prefill(model, tokenizer, sample.context)
            for q in sample.questions:
                capture = AttentionErrorCapture(ERROR_VARIANTS, dense.num_tokens)
                forward_question(dense, q, capture)
                layer_errors.append(capture.errors)
            contexts = [("full", dense)] + [(c.label, KiviContext(dense, c)) for c in KIVI_VARIANTS]
            for label, ctx in contexts:
                for qi, q in enumerate(sample.questions):
                    a = answer(ctx, q)
                    rows.append({"task": task, "context": i, "question": qi, "variant": label,
                                 "expected": q.answers[0], "answer": a.text,
                                 "correct": contains_answer(a.text, q.answers)})
            log(f"{task} #{i}: {dense.num_tokens} tokens, {len(contexts)} variants in {time.perf_counter() - t1:.0f}s")
    return rows, layer_errors


def summarize(rows, layer_errors):
    from .stats import mcnemar_exact, wilson_interval
    by = {}
    for r in rows:
        by.setdefault(r["variant"], {})[(r["task"], r["context"], r["question"])] = r["correct"]
    full = by.get("full", {})
    acc = []
    for label, answers in by.items():
        qs = sorted(answers)
        c = sum(answers[q] for q in qs)
        lo, hi = wilson_interval(c, len(qs))
        test = mcnemar_exact([answers[q] for q in qs], [full[q] for q in qs]) if label != "full" else None
        acc.append({"variant": label, "correct": c, "questions": len(qs), "accuracy": round(c / len(qs), 4),
                    "wilson_low": round(lo, 4), "wilson_high": round(hi, 4),
                    "lost_vs_full": test["b_only"] if test else 0, "gained_vs_full": test["a_only"] if test else 0,
                    "p_vs_full": round(test["p_value"], 4) if test else float("nan")})
    errors = {}
    for label in (layer_errors[0] if layer_errors else {}):
        layers = sorted(layer_errors[0][label])
        errors[label] = [round(sum(e[label][l] for e in layer_errors) / len(layer_errors), 5) for l in layers]
    return acc, errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["needle", "passkey"])
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--contexts", type=int, default=3)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from kvkernels.hf import load_smollm2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(device="cpu", dtype=torch.float32)
    rows, layer_errors = diagnose(model, tokenizer, args.tasks, args.length, args.contexts, args.questions, args.seed,
                                  args.budget_s)
    acc, errors = summarize(rows, layer_errors)
    elapsed = time.perf_counter() - t0
    print("| variant | accuracy [95% Wilson] | n | lost / gained vs full | McNemar p |\n|---|---|---|---|---|")
    for a in acc:
        print(f"| {a['variant']} | {a['accuracy']:.2f} [{a['wilson_low']:.2f}, {a['wilson_high']:.2f}] | "
              f"{a['questions']} | {a['lost_vs_full']} / {a['gained_vs_full']} | {a['p_vs_full']} |")
    print("\nper-layer relative attention-output error (mean over", len(layer_errors), "questions)")
    for label, errs in errors.items():
        print(f"{label:28s} mean {sum(errs) / len(errs):.4f} max {max(errs):.4f} (layer {errs.index(max(errs))})  "
              + " ".join(f"{e:.3f}" for e in errs))
    print(f"diagnosis took {elapsed:.0f}s")
    if args.out:
        command = "python -m kvkernels.eval.kivi_diag " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        args.out.write_text(json.dumps({"command": command, "elapsed_seconds": round(elapsed, 1), "accuracy": acc,
                                        "layer_errors": errors, "layer_error_questions": len(layer_errors),
                                        "answers": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
