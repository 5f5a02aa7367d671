"""Compiled decode over a KVzip pool vs what transformers users run: the measurement behind
``bench/cpu_compile.py`` (CPU, Inductor) and ``bench/gpu_graph_decode.py`` (CUDA, CUDA graphs).

One context is prefilled once; from its dense cache come both caches of the run:

* the compressed pool (``keep`` of the context rows, chosen by external random scores: decode cost does
  not depend on which rows are kept, and 8K-token KVzip scoring is slow on a small CPU), answered
  eagerly and with the compiled one-token step (:func:`kvkernels.hf.pipeline.compiled_decode_step`);
* the full cache in transformers' ``StaticCache`` (the dense rows copied in), answered with the same
  step, eagerly and compiled (SDPA attention, transformers' own mask).

Every question is answered by every variant in turn (interleaved, so machine noise hits all alike), with
the rollback after each answer; end of sequence is ignored so each answer runs ``tokens`` steps. Per
variant: median ms per step (the first compiled step, the compilation, excluded), the slowest later
step over that median, and how many graphs dynamo compiled.
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Iterator, Optional

import torch

from kvkernels.hf import DenseContext, greedy_answer, prefill
from kvkernels.hf.pipeline import compiled_decode_step, cuda_graph_step, decode_step

# Two questions about people of a staff directory (kvkernels.demo), formatted with two names.
QUESTIONS = ("List everything the directory says about {}.", "Where does {} live, and what is their employee code?")


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (any backend)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class WithoutEos:
    """A tokenizer as seen by the pipeline, minus its end-of-sequence id (answers run every step)."""

    eos_token_id = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@contextlib.contextmanager
def model_without_eos(model) -> Iterator[None]:
    """The model's generation config without an end-of-sequence id, for the duration."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


class StaticContext:
    """The full prefilled cache in transformers' ``StaticCache``: the baseline users compile."""

    def __init__(self, dense: DenseContext, room: int):
        from transformers import StaticCache

        self.dense = dense
        self.cache = StaticCache(config=dense.model.config, max_cache_len=dense.num_tokens + room)
        keys, values = dense.layer_kv()
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.cache.update(k, v, layer)  # allocates the static buffers and writes the context rows

    def rollback(self) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(self.dense.num_tokens)

    def answer(self, question: str, tokens: int, step):
        d = self.dense
        try:
            return greedy_answer(d.model, d.tokenizer, self.cache, d.prompt.question_ids(question), d.num_tokens,
                                 tokens, step=step)
        finally:
            self.rollback()


def _summary(name: str, answers, frames: int, compiled: bool) -> dict:
    steps = [s for a in answers for s in a.step_seconds]
    later = steps[1:] if compiled else steps  # the very first compiled step includes the compilation
    median = statistics.median(later)
    return {
        "variant": name,
        "ms_per_token": 1e3 * median,
        "mean_ms_per_token": 1e3 * statistics.fmean(later),
        "slowest_over_median": max(later) / median,
        "first_step_s": steps[0],
        "steps": len(steps) // len(answers),
        "frames": frames,
        "step_ms": [round(1e3 * t, 2) for t in steps],  # every step, in order (answer after answer)
        "token_ids": [a.token_ids for a in answers],
    }


def context_of_tokens(tokenizer, tokens: int) -> tuple[str, list]:
    """A staff directory (kvkernels.demo) of about ``tokens`` tokens, and its people."""
    from kvkernels.demo import FIRST_NAMES, LAST_NAMES, directory_text, staff_directory

    people = staff_directory(len(FIRST_NAMES) * len(LAST_NAMES))
    per_person = len(tokenizer(directory_text(people[:20]), add_special_tokens=False).input_ids) / 20
    n = max(2, min(len(people), int(tokens / per_person)))
    return directory_text(people[:n]), people[:n]


def measure(model, tokenizer, *, context: str, keep: float = 0.3, tokens: int = 14,
            questions: tuple[str, ...] = ("Tell me about the context.", "Summarise the context."),
            backend="inductor", mode: Optional[str] = None, static_baseline: bool = True, seed: int = 0,
            progress: bool = False) -> list[dict]:
    """Rows (see the module doc) for the pool eager / compiled and, with ``static_baseline``, the full
    StaticCache eager / compiled; ``tokens`` new tokens per question (``tokens - 1`` one-token steps)."""
    dense = prefill(model, WithoutEos(tokenizer), context, progress=progress)
    L, Hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    scores = torch.rand(L, Hkv, dense.num_tokens - dense.sink_len, generator=torch.Generator().manual_seed(seed))
    room = max(len(dense.prompt.question_ids(q)) for q in questions) + tokens + 8
    ctx = dense.compress(keep, scores=scores, slack=room)
    ctx.compile(backend=backend, mode=mode)
    variants = [("pool eager", False), ("pool compiled", True)]
    static = None
    if static_baseline:
        static = StaticContext(dense, room)
        variants += [("full StaticCache eager", False), ("full StaticCache compiled", True)]
    answers = {name: [] for name, _ in variants}
    frames = dict.fromkeys(answers, 0)
    compiled_step = compiled_decode_step(backend, mode)
    with model_without_eos(model):
        for question in questions:
            for name, compiled in variants:
                before = dynamo_graphs()
                if name.startswith("pool"):
                    a = ctx.answer(question, tokens, compiled=compiled)
                else:
                    step = compiled_step if compiled else decode_step
                    if compiled and mode == "reduce-overhead":
                        step = cuda_graph_step(step)
                    a = static.answer(question, tokens, step)
                frames[name] += dynamo_graphs() - before
                answers[name].append(a)
    rows = [_summary(name, answers[name], frames[name], compiled) for name, compiled in variants]
    for row in rows:
        row.update(context_tokens=dense.num_tokens, keep=keep, kept_rows=ctx.kept_rows(),
                   pool_bytes=ctx.nbytes(include_slack=False), dense_bytes=ctx.dense_nbytes(), backend=str(backend),
                   mode=mode, device=str(model.device), dtype=str(model.dtype).replace("torch.", ""))
    return rows


def ratios(rows: list[dict]) -> dict:
    """The ratios the issue asks for, from :func:`measure`'s rows (ms per token, medians)."""
    ms = {r["variant"]: r["ms_per_token"] for r in rows}
    out = {"pool compiled / pool eager": ms["pool compiled"] / ms["pool eager"]}
    if "full StaticCache compiled" in ms:
        out["pool compiled / full StaticCache compiled"] = ms["pool compiled"] / ms["full StaticCache compiled"]
        # The honest baseline is whichever full-cache variant is faster on this machine.
        out["pool compiled / best full cache"] = ms["pool compiled"] / min(ms["full StaticCache compiled"],
                                                                          ms["full StaticCache eager"])
        out["full StaticCache compiled / full StaticCache eager"] = (ms["full StaticCache compiled"]
                                                                     / ms["full StaticCache eager"])
    return out


def table(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| variant | ms/token (median) | mean | slowest / median | first step s | steps/answer | graphs compiled |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms_per_token']:.1f} | {r['mean_ms_per_token']:.1f} | "
                     f"{r['slowest_over_median']:.2f} | {r['first_step_s']:.2f} | {r['steps']} | {r['frames']} |")
    return "\n".join(lines)
