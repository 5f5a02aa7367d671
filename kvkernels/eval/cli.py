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
    parser.add_argument("--shard", type=A.cli_type(str, _shard, "shard"), default=(0, 1), metavar="I/N",
                        help="evaluate only the contexts whose index is I modulo N (0 <= I < N), so that N "
                             "processes can share one run; run them with the same --out and --name: each "
                             "appends its contexts to OUT/NAME.shard-I-of-N.jsonl and writes the summary of "
                             "all shards' rows present when it ends")
    parser.add_argument("--merge-only", action="store_true",
                        help="evaluate nothing: write the summary (CSV/JSON/PNG) from the rows already saved "
                             "in OUT/NAME.shard-*.jsonl")


def _out_folder(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise ValueError(f"out must be a folder, but {str(path)!r} is a file")
    return path


def _shard(text: str) -> tuple:
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"shard must be I/N with integers 0 <= I < N, got {text!r}")
    index, count = int(parts[0]), int(parts[1])
    if not 0 <= index < count:
        raise ValueError(f"shard must be I/N with integers 0 <= I < N, got {text!r}")
    return index, count


def _file_stem(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"name must be a file name without a folder, got {name!r}")
    return name


def main(args: argparse.Namespace) -> int:
    from . import report, runlog

    command = "kvkernels " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("kvkernels") \
        else " ".join(shlex.quote(a) for a in sys.argv)
    t0 = time.perf_counter()
    identity = runlog.run_identity(args)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = runlog.shard_path(args.out, args.name, args.shard)
    try:
        if not args.merge_only:
            _evaluate_shard(args, identity, log_path, command)
        shards = runlog.read_shards(args.out, args.name, identity)
    except runlog.OtherRunError as exc:
        print(f"kvkernels eval: error: {exc}", file=sys.stderr)
        return 2
    if not shards.rows:
        print(f"no saved rows in {args.out}/{args.name}.shard-*.jsonl for these settings", file=sys.stderr)
        return 1
    from .harness import summarize
    expected = _questions(args, args.contexts)
    commands = shards.commands or [command]
    summary = summarize(shards.rows)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("command", "shard", "merge_only")}
    stem = args.out / args.name
    report.write_csv(stem.with_suffix(".csv"), summary)
    report.write_json(stem.with_suffix(".json"), commands, settings, summary, shards.rows,
                      shards.compute_seconds, complete=len(shards.rows) == expected)
    report.plot(stem.with_suffix(".png"), summary, title=commands[0])
    print(format_table([s for s in summary if s["task"] == "all"]))
    status = "" if len(shards.rows) == expected else \
        f" INCOMPLETE: {len(shards.rows)} of {expected} answers (rerun the missing shards with the same command)"
    print(f"wrote {stem}.csv/.json/.png from {len(shards.rows)} answers;{status} this process took "
          f"{time.perf_counter() - t0:.0f}s, the saved contexts {shards.compute_seconds:.0f}s of compute "
          f"({shards.compute_seconds / 60:.1f} min)")
    return 0


def _questions(args, n_contexts: int) -> int:
    """Answers a run of these settings gives over ``n_contexts`` contexts per task and length."""
    from .harness import count_questions
    return count_questions(args.tasks, args.methods, args.ratios, n_contexts, args.questions,
                           len(args.context_tokens))


def _evaluate_shard(args, identity, log_path, command) -> None:
    """Evaluate this shard's contexts that ``log_path`` does not hold yet, appending each as it finishes."""
    import torch
    from tqdm.auto import tqdm

    from kvkernels.hf import load_smollm2

    from . import runlog
    from .harness import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    writer = runlog.ShardWriter(log_path, identity, command)
    saved = runlog.read_shards(args.out, args.name, identity).contexts  # by any shard file, this one included
    index, n_shards = args.shard
    mine = [(length, task, i) for length in args.context_tokens for task in args.tasks
            for i in range(args.contexts) if i % n_shards == index]
    per_context = _questions(args, 1) // (len(args.tasks) * len(args.context_tokens))
    todo = per_context * sum(1 for key in mine if key not in saved)
    if todo == 0:
        return  # everything of this shard is saved: nothing to load the model for
    model, tokenizer = load_smollm2(device=args.device)
    with tqdm(total=todo, desc="eval", unit="q") as bar:
        evaluate(model, tokenizer, args.tasks, args.methods, args.ratios, args.contexts, args.context_tokens,
                 args.questions, args.seed, progress=bar.update, log=bar.write, shard=args.shard,
                 done=lambda *key: key in saved, on_sample=writer.append)


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
