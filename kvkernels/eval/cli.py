"""``kvkernels eval``: the multi-query quality benchmark on SmolLM2-135M-Instruct (registered in kvkernels.cli)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from kvkernels.cli import register_subcommand

DEFAULT_TASKS = ["needle", "kv_retrieval", "var_tracking", "fact_directory"]
DEFAULT_METHODS = ["full", "kvzip", "kvzip-uniform", "kvzip-head", "snapkv", "h2o", "kivi2", "kivi4", "kvzip+kivi2"]
DEFAULT_RATIOS = [0.1, 0.3, 0.6]
# harness.ALL_METHODS, spelled out so that building the parser imports neither torch nor transformers
# (tests/test_cli.py checks the two agree).
METHODS = ("full", "kvzip", "kvzip-uniform", "kvzip-head", "snapkv", "h2o", "streaming", "random", "kvzip+kivi2", "kivi2",
           "kivi4")
MAX_QUESTIONS = 20  # the needle task draws distinct needles from a pool of 20


def default_out() -> Path:
    """A fresh folder in the working directory, never the committed bench/results/quality."""
    return Path(f"kvkernels-eval-{time.strftime('%Y%m%d-%H%M%S')}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvkernels import _args as A

    from .tasks import TASKS
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=sorted(TASKS), metavar="TASK",
                        help=f"tasks to run, from: {', '.join(sorted(TASKS))}")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS, metavar="METHOD",
                        help=f"methods to compare, from: {', '.join(METHODS)}")
    parser.add_argument("--ratios", nargs="+", type=A.fraction("(a keep ratio)"), default=DEFAULT_RATIOS,
                        metavar="KEEP", help="keep ratios (fraction of context KV pairs KEPT, in [0, 1]); 1.0 is "
                                             "the full cache")
    parser.add_argument("--contexts", type=A.int_at_least(1), default=1, help="contexts per task")
    parser.add_argument("--context-tokens", nargs="+", type=A.int_at_least(64), default=[512],
                        help="approximate context length(s) in tokens, each at least 64 (several: one run per "
                             "length)")
    parser.add_argument("--questions", type=A.int_at_least(1, MAX_QUESTIONS), default=3,
                        help=f"questions per context, 1..{MAX_QUESTIONS}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated contexts and questions")
    parser.add_argument("--out", type=A.cli_type(Path, _out_folder, "folder"), default=default_out(),
                        help="output folder (created); the default is a fresh ./kvkernels-eval-<date>-<time>, "
                             "never the committed bench/results/quality")
    parser.add_argument("--name", type=A.cli_type(str, _file_stem, "name"), default="results",
                        help="file stem of the CSV/JSON/PNG outputs")
    parser.add_argument("--device", type=A.device(), default=None,
                        help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    parser.add_argument("--threads", type=A.int_at_least(1), default=None,
                        help="torch CPU threads (default: torch's)")


def _out_folder(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise ValueError(f"out must be a folder, but {str(path)!r} is a file")
    return path


def _file_stem(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"name must be a file name without a folder, got {name!r}")
    return name


def main(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from kvkernels.hf import load_smollm2

    from . import report
    from .harness import count_questions, evaluate, summarize

    if args.threads:
        torch.set_num_threads(args.threads)
    command = "kvkernels " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("kvkernels") \
        else " ".join(shlex.quote(a) for a in sys.argv)
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(device=args.device)
    total = count_questions(args.tasks, args.methods, args.ratios, args.contexts, args.questions,
                            len(args.context_tokens))
    with tqdm(total=total, desc="eval", unit="q") as bar:
        rows = evaluate(model, tokenizer, args.tasks, args.methods, args.ratios, args.contexts, args.context_tokens,
                        args.questions, args.seed, progress=bar.update, log=bar.write)
    summary = summarize(rows)
    elapsed = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "command"}
    stem = args.out / args.name
    report.write_csv(stem.with_suffix(".csv"), summary)
    report.write_json(stem.with_suffix(".json"), command, settings, summary, rows, elapsed)
    report.plot(stem.with_suffix(".png"), summary, title=command)
    print(format_table([s for s in summary if s["task"] == "all"]))
    print(f"wrote {stem}.csv/.json/.png; the run took {elapsed:.0f}s ({elapsed / 60:.1f} min)")
    return 0


def format_table(summary) -> str:
    """Markdown table: accuracy with its 95 % Wilson interval, ratio to the full cache, and the paired
    comparison of KVzip (global) with the method at the same keep ratio (questions only KVzip / only the
    method answered, McNemar exact p)."""
    lines = ["| length | method | keep | KV fraction | accuracy [95% CI] | first q | later q | / full | "
             "KVzip-only / method-only (p) | n |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        keep = f"{s['keep']:.1f}" + (" (=full)" if s["from_full"] else "")
        paired = f"{s['kvzip_only']} / {s['method_only']} ({s['kvzip_vs_method_p']:.3g})" if s["kvzip_only"] != "" else ""
        lines.append(f"| {s['length']} | {s['method']} | {keep} | {s['kv_fraction']:.3f} | {s['accuracy']:.2f} "
                     f"[{s['wilson_low']:.2f}, {s['wilson_high']:.2f}] | {s['accuracy_first_q']:.2f} | "
                     f"{s['accuracy_later_q']:.2f} | {s['ratio_to_full']:.2f} | {paired} | {s['questions']} |")
    return "\n".join(lines)


register_subcommand("eval", "multi-query quality benchmark: KVzip vs query-aware baselines on SmolLM2",
                    add_arguments, main)
