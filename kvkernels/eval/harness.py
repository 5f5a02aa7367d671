"""The multi-query quality harness: compress each context once per method, ask all its questions, score.

Per context the expensive parts run once and are shared by every method and keep ratio: the prefill
(with H2O's attention accumulation captured on the way), KVzip's scoring pass, SnapKV's window pass
(the first question). Each (method, keep) then only selects and evicts (``topk_mask`` + ``compact_kv``
through ``DenseContext.compress(scores=...)``), answers every question greedily over the compressed
cache, and rolls the cache back after each answer.

Methods (``keep`` = fraction of context KV pairs KEPT; the chat-template sink is always kept on top):

* ``full``: the dense cache (keep 1.0).
* ``kvzip``: KVzip scores, one global threshold over all layers and heads (the paper's default).
* ``kvzip-uniform``: KVzip scores, the same count in every (layer, KV head).
* ``kvzip-head``: head-level KVzip: static per-(layer, head) scores from one calibration context
  (another generated context, never one that is evaluated), broadcast over tokens, global threshold.
* ``snapkv``: SnapKV votes of the FIRST question's tokens, pooled (kernel 7), per-head budget.
* ``h2o``: attention accumulated over the whole prefill, per-head budget.
* ``streaming``: StreamingLLM-style floor: the sink (the chat template, always kept) plus the most recent
  context tokens, the same count in every (layer, KV head).
* ``random``: random eviction at the same per-head budget (a floor; seeded by the context, deterministic).
* ``kivi2`` / ``kivi4``: KIVI 2/4-bit (group 32, residual 128) applied to the dense cache as
  quantize-dequantize (numerically the attention KIVI computes) with KIVI's streaming flush rules and
  its official order (attend, then flush: ``kivi_sim``); no eviction, the x axis is bytes.
* ``kvzip+kivi2``: KVzip (global) at each keep ratio, then the real KIVI-2 quantized ragged pool
  (``CompressedContext.quantize(2)``: group 32, residual 128, KIVI's order; decoded by
  ``quant_pool_attention``). Its bytes are counted as KIVI's fp16 layout of each kept segment
  (:func:`kivi_bytes`), comparable with ``kivi2``/``kivi4``.

A keep ratio of 1.0 evicts nothing, so eviction methods are not re-run at 1.0: their 1.0 point is the
full cache's accuracy (marked ``from_full`` in the results; not for ``kvzip+kivi2``, whose 1.0 is KIVI-2).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import kvkernels
from kvkernels.hf import DenseContext, prefill

from .capture import H2OCapture, SnapKVCapture, capturing
from .scoring import contains_answer
from .kivi_sim import KiviConfig, KiviContext, prefill_image
from .kivi_sim import kivi_bytes as kivi_config_bytes
from .stats import mcnemar_exact, ratio_interval, wilson_interval
from .tasks import Question, Sample, make_samples

EVICTION_METHODS = ("kvzip", "kvzip-uniform", "kvzip-head", "snapkv", "h2o", "streaming", "random", "kvzip+kivi2")
PER_HEAD_METHODS = ("kvzip-uniform", "snapkv", "h2o", "streaming", "random")
QUANT_METHODS = ("kivi2", "kivi4")
ALL_METHODS = ("full",) + EVICTION_METHODS + QUANT_METHODS
KIVI_GROUP, KIVI_RESIDUAL, KIVI_ORDER = 32, 128, "official"
COMBINED_KIVI_BITS = 2


@dataclass(frozen=True)
class Setting:
    """One evaluated configuration: a method at a keep ratio (1.0 for ``full`` and plain KIVI)."""

    method: str
    keep: float

    @property
    def budget(self) -> str:
        return "per_head" if self.method in PER_HEAD_METHODS else "global"


def settings_for(methods: Sequence[str], ratios: Sequence[float]) -> List[Setting]:
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(ALL_METHODS)}")
    out = []
    for m in methods:
        if m in ("full",) + QUANT_METHODS:
            out.append(Setting(m, 1.0))
        else:
            out.extend(Setting(m, float(r)) for r in ratios if float(r) < 1.0)
    return out


# ----------------------------------------------------------------------------------------------
# Answering. The pipeline's ``ask`` takes a question only; our tasks start the assistant's reply with
# an answer prefix, so the same greedy decoding runs on [question tokens ; prefix tokens] here.

def answer(ctx, question: Question):
    """Greedy answer of ``ctx`` (DenseContext or CompressedContext); the cache is restored afterwards."""
    return ctx.answer(question.prompt, question.max_new_tokens, answer_prefix=question.answer_prefix)


# ----------------------------------------------------------------------------------------------
# KIVI as quantize-dequantize.

def kivi_config(bits: int, group: int = KIVI_GROUP, residual: int = KIVI_RESIDUAL) -> KiviConfig:
    """The harness's KIVI: both sides at ``bits``, official order (attend, then flush; see the diagnosis)."""
    return KiviConfig(bits, bits, group, residual, KIVI_ORDER)


def kivi_fake_quant(k: torch.Tensor, v: torch.Tensor, bits: int, group: int = KIVI_GROUP,
                    residual: int = KIVI_RESIDUAL):
    """(k_hat, v_hat) for one layer's k, v [B, H, T, D] under KIVI's prefill rule.

    Keys: the first T - T % residual tokens are quantized per channel (groups of ``group`` tokens
    aligned to token 0), the rest stay exact; values: all but the last ``residual`` tokens are quantized
    per token (groups of ``group`` channels). Tokens appended later follow the streaming rules of
    :class:`~kvkernels.eval.kivi_sim.KiviSimCache`.
    """
    k_hat, v_hat, _, _ = prefill_image(k, v, kivi_config(bits, group, residual))
    return k_hat, v_hat


def kivi_bytes(T: int, D: int, bits: int, group: int = KIVI_GROUP, residual: int = KIVI_RESIDUAL) -> int:
    """Bytes of one (layer, head) KIVI cache of T tokens: packed codes, fp16 scale/zero, fp16 tails."""
    return kivi_config_bytes(T, D, kivi_config(bits, group, residual))


def kivi_pool_bytes(ctx, bits: int) -> int:
    """Bytes of KIVI's fp16 layout (:func:`kivi_bytes`) of every kept (layer, b, head) segment of a context."""
    D = ctx.pool.k_pool.shape[1]
    return sum(kivi_bytes(n, D, bits) for n in ctx.pool.seg_len.flatten().tolist())


# ----------------------------------------------------------------------------------------------

def model_shape(model):
    c = model.config
    return c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads


def prefill_with_h2o(model, tokenizer, context: str, want_h2o: bool):
    """Prefill; with ``want_h2o`` the H2O accumulation is captured during the same forward."""
    if not want_h2o:
        return prefill(model, tokenizer, context), None
    L, Hkv, _ = model_shape(model)
    # The token count is known only after tokenising: size the capture from the prompt format.
    from kvkernels.hf import PromptFormat
    prompt = PromptFormat(tokenizer)
    n = prompt.sink_ids().numel() + prompt.encode(context).numel()
    capture = H2OCapture(L, 1, Hkv, n, model.device)
    with capturing(model, capture), torch.no_grad():
        dense = prefill(model, tokenizer, context)
    if dense.num_tokens != n:
        raise RuntimeError(f"H2O capture sized for {n} tokens, prefill produced {dense.num_tokens}")
    return dense, capture.scores


@torch.no_grad()
def forward_question(dense: DenseContext, question: Question, capture) -> None:
    """Run the question's tokens (with its answer prefix) over ``dense``'s cache with ``capture`` attached;
    the cache is cropped back to the context afterwards."""
    ids = dense.prompt.question_ids(question.prompt, question.answer_prefix)[None].to(dense.input_ids.device)
    positions = torch.arange(dense.num_tokens, dense.num_tokens + ids.shape[1], device=ids.device)[None]
    try:
        with capturing(dense.model, capture):
            dense.model.get_decoder()(input_ids=ids, past_key_values=dense.cache, position_ids=positions, use_cache=True)
    finally:
        dense.cache.crop(-ids.shape[1])


def snapkv_window_scores(dense: DenseContext, question: Question, kernel_size: int = 7) -> torch.Tensor:
    """SnapKV scores [L, 1, Hkv, N]: the first question's tokens (with its answer prefix) as the window."""
    L, Hkv, _ = model_shape(dense.model)
    capture = SnapKVCapture(L, 1, Hkv, dense.num_tokens, dense.input_ids.device, kernel_size)
    forward_question(dense, question, capture)
    return capture.scores


def streaming_scores(L: int, Hkv: int, n_ctx: int) -> torch.Tensor:
    """[L, Hkv, n_ctx]: later = larger, so a per-head top-k keeps the most recent tokens (StreamingLLM)."""
    return torch.arange(n_ctx, dtype=torch.float32).expand(L, Hkv, n_ctx)


def random_scores(L: int, Hkv: int, n_ctx: int, seed: str) -> torch.Tensor:
    """[L, Hkv, n_ctx] uniform random scores from a generator seeded by ``seed`` (reproducible)."""
    gen = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    return torch.rand(L, Hkv, n_ctx, generator=gen)


def calibration_head_scores(model, tokenizer, target_tokens: int, seed: int) -> torch.Tensor:
    """Head-level KVzip scores [L, Hkv] from one generated context that is never evaluated."""
    sample = make_samples("fact_directory", 1, target_tokens, 1, seed=seed + 10_000,
                          count_tokens=lambda s: len(tokenizer(s, add_special_tokens=False).input_ids))[0]
    dense = prefill(model, tokenizer, sample.context)
    scores = dense.kvzip_scores()[..., dense.sink_len:]
    return scores.amax(dim=(1, 3)).cpu()


def evaluate(model, tokenizer, tasks: Sequence[str], methods: Sequence[str], ratios: Sequence[float],
             n_contexts: int, context_tokens, n_questions: int, seed: int = 0,
             progress: Optional[Callable] = None, log: Callable[[str], None] = lambda s: None,
             shard: Tuple[int, int] = (0, 1), done: Optional[Callable[[int, str, int], bool]] = None,
             on_sample: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Run every setting on every sample; returns one row per (sample, setting, question).

    ``context_tokens`` is one target length or a list of them (each row records its target as ``length``).
    ``progress`` is called with the number of answered questions after each answer (a tqdm update).
    ``shard = (i, n)`` evaluates only the contexts whose index is i modulo n (the other shards of the same
    run evaluate the rest; the union of the shards' rows is the whole run's). ``done(length, task, index)``
    says which contexts already have rows (a resumed run skips them; their questions are not counted by
    ``progress``). ``on_sample(rows, seconds)`` receives each context's rows and wall time as soon as they exist (to save them).
    """
    lengths = [context_tokens] if isinstance(context_tokens, int) else list(context_tokens)
    settings = settings_for(methods, ratios)
    count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    names = {s.method for s in settings}
    index, n_shards = shard
    wanted = lambda i: i % n_shards == index  # noqa: E731
    rows: List[Dict] = []
    for length in lengths:
        todo = {task: [s for s in make_samples(task, n_contexts, length, n_questions, seed, count, wanted)
                       if done is None or not done(length, task, s.index)] for task in tasks}
        if not any(todo.values()):
            continue
        head_scores = None
        if "kvzip-head" in names:
            log(f"head-level KVzip: scoring the calibration context ({length} tokens)")
            head_scores = calibration_head_scores(model, tokenizer, length, seed)
        for task in tasks:
            for sample in todo[task]:
                t0 = time.perf_counter()
                sample_rows = _evaluate_sample(model, tokenizer, sample, settings, head_scores, progress, log)
                for row in sample_rows:
                    row["length"] = length
                if on_sample is not None:
                    on_sample(sample_rows, time.perf_counter() - t0)
                rows.extend(sample_rows)
    return rows


def _evaluate_sample(model, tokenizer, sample: Sample, settings: List[Setting], head_scores, progress, log):
    L, Hkv, D = model_shape(model)
    names = {s.method for s in settings}
    t0 = time.perf_counter()
    dense, h2o = prefill_with_h2o(model, tokenizer, sample.context, "h2o" in names)
    n_ctx = dense.num_tokens - dense.sink_len
    kvzip = dense.kvzip_scores() if names & {"kvzip", "kvzip-uniform", "kvzip+kivi2"} else None
    snap = snapkv_window_scores(dense, sample.questions[0]) if "snapkv" in names else None
    log(f"{sample.task}#{sample.index}: {dense.num_tokens} tokens (sink {dense.sink_len}) prefilled and scored "
        f"in {time.perf_counter() - t0:.1f}s")
    dense_rows = L * Hkv * dense.num_tokens
    scores_of = {"kvzip": kvzip, "kvzip-uniform": kvzip, "kvzip+kivi2": kvzip, "snapkv": snap, "h2o": h2o}
    if "streaming" in names:
        scores_of["streaming"] = streaming_scores(L, Hkv, n_ctx)
    if "random" in names:
        scores_of["random"] = random_scores(L, Hkv, n_ctx, f"{sample.task}/{sample.index}/{n_ctx}")
    rows = []
    for setting in settings:
        t1 = time.perf_counter()
        if setting.method == "full":
            ctx, kv_fraction = dense, 1.0
        elif setting.method in QUANT_METHODS:
            bits = int(setting.method[-1])
            ctx = KiviContext(dense, kivi_config(bits))
            kv_fraction = L * Hkv * kivi_bytes(dense.num_tokens, D, bits) / (dense_rows * D * 2 * 2)
        else:
            if setting.method == "kvzip-head":
                ctx = dense.compress(setting.keep, budget="global", head_scores=head_scores)
            else:
                ctx = dense.compress(setting.keep, budget=setting.budget, scores=scores_of[setting.method])
            kv_fraction = ctx.kept_rows() / dense_rows
            if setting.method == "kvzip+kivi2":
                kv_fraction = kivi_pool_bytes(ctx, COMBINED_KIVI_BITS) / (dense_rows * D * 2 * 2)
                ctx = ctx.quantize(COMBINED_KIVI_BITS, KIVI_GROUP, KIVI_RESIDUAL)
        setup_s = time.perf_counter() - t1
        for qi, question in enumerate(sample.questions):
            a = answer(ctx, question)
            rows.append({
                "task": sample.task, "context": sample.index, "context_tokens": n_ctx, "sink_tokens": dense.sink_len,
                "method": setting.method, "keep": setting.keep, "budget": setting.budget,
                "kv_fraction": round(kv_fraction, 6), "question": qi, "kind": question.kind,
                "first_question": qi == 0, "expected": question.answers[0], "answer": a.text,
                "correct": contains_answer(a.text, question.answers), "answer_tokens": len(a.token_ids),
                "setup_seconds": round(setup_s, 3), "answer_seconds": round(a.prompt_seconds + a.decode_seconds, 3),
            })
            if progress is not None:
                progress(1)
    return rows


def count_questions(tasks, methods, ratios, n_contexts, n_questions, n_lengths: int = 1) -> int:
    return len(tasks) * n_contexts * n_questions * len(settings_for(methods, ratios)) * n_lengths


def question_id(row: Dict) -> tuple:
    """The identity of a question across settings (the pairing key of the paired comparisons)."""
    return row.get("length"), row["task"], row["context"], row["question"]


def summarize(rows: List[Dict], full_rows_for_keep1: bool = True) -> List[Dict]:
    """Accuracy per (length, method, keep, task) and over all tasks ('all'), with a 95 % Wilson interval,
    the ratio to the full cache and paired comparisons on the same questions (McNemar exact): against the
    full cache, and KVzip (global) against every other method at the same keep ratio.

    Eviction methods get a keep-1.0 point copied from the full cache (marked ``from_full``), since
    keeping everything is the full cache."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        for task in (r["task"], "all"):
            groups.setdefault((r.get("length"), r["method"], r["keep"], task), []).append(r)
    out = []
    for (length, method, keep, task), rs in groups.items():
        full = groups.get((length, "full", 1.0, task))
        kvzip = groups.get((length, "kvzip", keep, task)) if method != "kvzip" else None
        out.append(_summary_row(length, method, keep, task, rs, False, full, kvzip))
    if full_rows_for_keep1:
        # kvzip+kivi2 at keep 1.0 would be plain KIVI-2, not the full cache: no copied point for it.
        methods = {r["method"] for r in rows if r["method"] in EVICTION_METHODS and r["method"] != "kvzip+kivi2"}
        for (length, method, keep, task), rs in list(groups.items()):
            if method == "full":
                out.extend(_summary_row(length, m, 1.0, task, rs, True, rs, None) for m in sorted(methods))
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    out.sort(key=lambda s: (s["length"] or 0, s["task"] != "all", s["task"], order.get(s["method"], 99), s["keep"]))
    return out


def _paired(rs: List[Dict], other: Optional[List[Dict]]) -> Optional[Dict]:
    """McNemar on the questions both row sets answered (None when there is nothing to pair)."""
    if not other:
        return None
    mine = {question_id(r): r["correct"] for r in rs}
    theirs = {question_id(r): r["correct"] for r in other}
    common = sorted(set(mine) & set(theirs), key=str)
    if not common:
        return None
    return mcnemar_exact([mine[q] for q in common], [theirs[q] for q in common])


def _summary_row(length, method, keep, task, rs, from_full, full=None, kvzip=None):
    n = len(rs)
    correct = sum(r["correct"] for r in rs)
    later = [r for r in rs if not r["first_question"]]
    lo, hi = wilson_interval(correct, n)
    later_correct = sum(r["correct"] for r in later)
    row = {
        "length": length, "task": task, "method": method, "keep": keep, "questions": n, "correct": correct,
        "accuracy": round(correct / n, 4) if n else float("nan"), "wilson_low": round(lo, 4), "wilson_high": round(hi, 4),
        "accuracy_first_q": round(sum(r["correct"] for r in rs if r["first_question"]) / max(1, n - len(later)), 4),
        "accuracy_later_q": round(later_correct / len(later), 4) if later else float("nan"),
        "later_questions": len(later),
        "kv_fraction": 1.0 if from_full else round(sum(r["kv_fraction"] for r in rs) / n, 4),
        "from_full": from_full,
    }
    full_correct = sum(r["correct"] for r in full) if full else 0
    ratio, rlo, rhi = ratio_interval(correct, n, full_correct, len(full) if full else 0)
    row.update({"ratio_to_full": round(ratio, 4), "ratio_low": round(rlo, 4), "ratio_high": round(rhi, 4)})
    vs_full = None if method == "full" or from_full else _paired(rs, full)
    row["vs_full_diff"] = round(vs_full["diff"], 4) if vs_full else float("nan")
    row["vs_full_p"] = round(vs_full["p_value"], 4) if vs_full else float("nan")
    vs_kvzip = _paired(kvzip, rs) if kvzip and not from_full else None
    row["kvzip_only"] = vs_kvzip["a_only"] if vs_kvzip else ""
    row["method_only"] = vs_kvzip["b_only"] if vs_kvzip else ""
    row["kvzip_minus_method"] = round(vs_kvzip["diff"], 4) if vs_kvzip else float("nan")
    row["kvzip_vs_method_p"] = round(vs_kvzip["p_value"], 4) if vs_kvzip else float("nan")
    return row
