"""Compress once, ask many: KVzip on a transformers causal LM.

::

    from kvkernels.hf import load_smollm2, compress
    model, tokenizer = load_smollm2()
    ctx = compress(model, tokenizer, long_text, keep=0.3)     # prefill + KVzip scoring + eviction
    ctx.ask("Where does Alice live?")                         # greedy answer over the ragged pool
    ctx.nbytes(), ctx.dense_nbytes()                          # bytes held vs the dense cache

Prompt layout (the model's chat template, split around the context)::

    [sink: system prompt + user header] [context] ["\\n\\n" question] [end of turn + assistant opener] answer

The sink is never evicted. ``keep`` is the fraction of context KV pairs KEPT (KVzip's ``ratio``);
``compression_ratio`` is the fraction REMOVED (kvpress's naming); give one of them.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from transformers import DynamicCache

import kvkernels
from kvkernels import _args as A
from kvkernels import _nvtx, _progress

from .attention import RAGGED_ATTENTION, attention_implementation
from .cache import RaggedPoolCache
from .scoring import (BUDGETS, broadcast_head_scores, external_scores, kvzip_scores, resolve_keep, select_kept)
from .tp import tensor_parallel_group

CONTEXT_MARKER = "\u27e6KVKERNELS-CONTEXT\u27e7"


def _check_compress_args(keep, compression_ratio, budget, chunk_size, overlap, slack, scores, head_scores) -> float:
    """Check :func:`compress`'s eviction arguments before any model work; returns the fraction kept."""
    if keep is not None:
        A.check_fraction("keep", keep, "(the fraction of context KV pairs KEPT)")
    if compression_ratio is not None:
        A.check_fraction("compression_ratio", compression_ratio, "(the fraction of context KV pairs REMOVED)")
    keep = resolve_keep(keep, compression_ratio)
    A.check_choice("budget", budget, BUDGETS)
    A.check_int("chunk_size", chunk_size, 1)
    A.check_int("overlap", overlap, 0)
    A.check_int("slack", slack, 0)
    for name, value in (("scores", scores), ("head_scores", head_scores)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if scores is not None and head_scores is not None:
        raise ValueError("give scores (per token) or head_scores (per head), not both")
    return keep


def _check_question_args(question, max_new_tokens, answer_prefix) -> None:
    A.check_text("question", question)
    A.check_int("max_new_tokens", max_new_tokens, 1)
    A.check_text("answer_prefix", answer_prefix, allow_empty=True)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class PromptFormat:
    """The chat template split around the context: ``sink`` text before it, ``turn_end`` after the user turn.

    Rendered from ``tokenizer.apply_chat_template`` with a marker in place of the user message, so any
    chat model works; without a chat template the sink is empty and the turn ends with a newline.
    """

    def __init__(self, tokenizer, system_prompt: Optional[str] = None):
        self.tokenizer = tokenizer
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": CONTEXT_MARKER})
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            self.sink, self.turn_end = rendered.split(CONTEXT_MARKER)
        else:
            self.sink, self.turn_end = (system_prompt + "\n" if system_prompt else ""), "\n"

    def encode(self, text: str) -> torch.Tensor:
        """int64 token ids [n] of ``text`` (special tokens in the text are parsed; none are added)."""
        return torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    def sink_ids(self) -> torch.Tensor:
        return self.encode(self.sink)

    def question_ids(self, question: str, answer_prefix: str = "") -> torch.Tensor:
        """The tokens that follow the context for a question: the question, end of turn, assistant opener,
        and ``answer_prefix``, the start of the assistant's reply (e.g. "The code is"), if any."""
        parts = [self.encode("\n\n" + question), self.encode(self.turn_end)]
        if answer_prefix:
            parts.append(self.encode(answer_prefix))
        return torch.cat(parts)


@dataclass
class Answer:
    """One greedy answer: text, token ids (end-of-sequence excluded) and timings."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    prompt_seconds: float  # forward over the question tokens (first answer token included)
    decode_seconds: float  # the remaining steps, one token each
    stopped_at_eos: bool = False
    decode_steps: int = field(default=0)
    step_seconds: list[float] = field(default_factory=list)  # each one-token step (host read included)

    @property
    def seconds_per_token(self) -> float:
        """Decode time per generated token (one-token steps only), or nan when there were none."""
        return self.decode_seconds / self.decode_steps if self.decode_steps else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


def decode_step(model, cache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One greedy decode step: the next token id [1, 1] after ``token`` [1, 1] at RoPE ``position`` [1, 1].

    The unit that :func:`compiled_decode_step` compiles: positions come in explicitly and the argmax is
    inside, so the step reads nothing from ``cache`` on the host and returns one id, not the logits.
    """
    logits = model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True,
                   logits_to_keep=1).logits
    return logits[:, -1].argmax(-1, keepdim=True)


DecodeStep = Callable[[torch.nn.Module, object, torch.Tensor, torch.Tensor], torch.Tensor]


def default_compile_mode(device: torch.device) -> Optional[str]:
    """``"reduce-overhead"`` (CUDA graphs) on CUDA, Inductor's default mode elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


@functools.lru_cache(maxsize=None)
def compiled_decode_step(backend="inductor", mode: Optional[str] = None) -> DecodeStep:
    """:func:`decode_step` under ``torch.compile(fullgraph=True)``, one shared callable per (backend, mode).

    Sharing matters: dynamo keeps its compiled graphs per function, so every context, answer and cache of
    the same shapes reuses the first compilation. Over a kvkernels pool cache (attention
    ``"kvkernels_ragged"``) nothing a guard reads changes per token or after a rollback (the lengths live
    in ``pool.seg_len``), so it compiles once; a new pool shape (another kept-row count, ``reserve``
    growing the pool) compiles once more, with the row count dynamic from then on (dynamo's automatic
    dynamic shapes), so further sizes reuse it.
    """
    return torch.compile(decode_step, backend=backend, mode=mode, fullgraph=True)


def cuda_graph_step(step: DecodeStep) -> DecodeStep:
    """``step`` compiled with ``mode="reduce-overhead"``, marked as a new CUDA-graph replay per token (the
    previous token's outputs were already read, so the graph may overwrite them)."""

    def graph_step(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return step(*args)

    return graph_step


def _prepare_static_pool(cache) -> None:
    """Mark a cache's tensors (``cache.static_tensors()``) as fixed addresses: CUDA graphs then neither copy
    them in per replay nor refuse the step for mutating its inputs (appends write them in place).

    ``guard=False``: another pool (another context) of the same shapes reuses the compiled graph; the
    CUDA graph is then re-recorded for its addresses instead of dynamo recompiling.
    """
    for t in cache.static_tensors():
        torch._dynamo.mark_static_address(t, guard=False)


@torch.no_grad()
def greedy_answer(model, tokenizer, cache, prompt_ids: torch.Tensor, start_position: int,
                  max_new_tokens: int, step: Optional[DecodeStep] = None) -> Answer:
    """Greedy decoding of ``prompt_ids`` [n] over ``cache``; RoPE positions start at ``start_position``.

    The prompt runs eagerly in one forward; each later token runs ``step`` (default :func:`decode_step`,
    eager; pass :func:`compiled_decode_step`'s result for the compiled path). The cache is left holding
    the prompt and answer (the caller rolls it back).
    """
    step = step or decode_step
    device = model.device
    eos = _eos_ids(model, tokenizer)
    ids = prompt_ids.to(device)[None]
    n = ids.shape[1]
    _sync(device)
    t0 = time.perf_counter()
    positions = torch.arange(start_position, start_position + n, device=device)[None]
    logits = model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True,
                   logits_to_keep=1).logits
    token = int(logits[0, -1].argmax())
    _sync(device)
    t1 = time.perf_counter()
    tokens, step_seconds, stopped = [], [], False
    position = start_position + n
    while True:
        if token in eos:
            stopped = True
            break
        tokens.append(token)
        if len(tokens) >= max_new_tokens:
            break
        s0 = time.perf_counter()
        next_id = step(model, cache, torch.tensor([[token]], device=device),
                       torch.tensor([[position]], device=device))
        token = int(next_id)  # the host read (a sync) is what greedy decoding needs anyway
        step_seconds.append(time.perf_counter() - s0)
        position += 1
    _sync(device)
    t2 = time.perf_counter()
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return Answer(text, tokens, n, t1 - t0, t2 - t1, stopped, len(step_seconds), step_seconds)


class DenseContext:
    """A prefilled context in transformers' ordinary dense cache (the baseline, and the input of compression).

    Build with :func:`prefill`. :meth:`ask` answers over the full cache and crops it back afterwards;
    :meth:`compress` evicts into a :class:`CompressedContext` (this object stays usable).
    """

    def __init__(self, model, tokenizer, prompt: PromptFormat, input_ids: torch.Tensor, sink_len: int,
                 cache: DynamicCache):
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        self.input_ids = input_ids  # [1, N]: sink + context
        self.sink_len = sink_len
        self.cache = cache

    @property
    def num_tokens(self) -> int:
        """Prefilled tokens (sink + context)."""
        return self.input_ids.shape[1]

    def layer_kv(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer dense keys and values [B, Hkv, N, D] (post-RoPE keys, as the model caches them)."""
        return [layer.keys for layer in self.cache.layers], [layer.values for layer in self.cache.layers]

    def nbytes(self) -> int:
        """Bytes of the dense K and V of the prefilled tokens (all layers)."""
        keys, values = self.layer_kv()
        return sum(t.numel() * t.element_size() for t in keys + values)

    def answer(self, question: str, max_new_tokens: int = 64, answer_prefix: str = "") -> Answer:
        """Greedy answer over the full cache; the question and answer are cropped off afterwards.

        ``answer_prefix`` starts the assistant's reply (RULER-style evaluation prompts use one).
        """
        _check_question_args(question, max_new_tokens, answer_prefix)
        ids = self.prompt.question_ids(question, answer_prefix)
        try:
            return greedy_answer(self.model, self.tokenizer, self.cache, ids, self.num_tokens, max_new_tokens)
        finally:
            extra = self.cache.get_seq_length() - self.num_tokens
            if extra > 0:
                self.cache.crop(-extra)

    def ask(self, question: str, max_new_tokens: int = 64, answer_prefix: str = "") -> str:
        """The answer text (see :meth:`answer`)."""
        return self.answer(question, max_new_tokens, answer_prefix).text

    def kvzip_scores(self, chunk_size: int = 2048, overlap: int = 8, progress: bool = False) -> torch.Tensor:
        """fp32 [L, 1, Hkv, N] KVzip scores of the prefilled tokens (sink columns +inf)."""
        return kvzip_scores(self.model, self.prompt, self.input_ids, self.cache, self.sink_len, chunk_size,
                            overlap, progress)

    def compress(self, keep: Optional[float] = None, *, compression_ratio: Optional[float] = None,
                 budget: str = "global", scores: Optional[torch.Tensor] = None,
                 head_scores: Optional[torch.Tensor] = None, chunk_size: int = 2048, overlap: int = 8,
                 slack: int = 256, progress: bool = False) -> "CompressedContext":
        """Evict the context's KV pairs into one ragged pool; see :func:`compress` for the arguments.

        ``keep`` 1 keeps everything and ``keep`` 0 only the sink: neither runs the scoring pass.
        """
        keep = _check_compress_args(keep, compression_ratio, budget, chunk_size, overlap, slack, scores, head_scores)
        keys, values = self.layer_kv()
        L, Hkv = len(keys), keys[0].shape[1]  # this rank's KV heads under tensor parallelism
        B, N = self.input_ids.shape
        if scores is not None:
            token_scores = external_scores(scores.to(self.input_ids.device), L, B, Hkv, N, self.sink_len)
        elif head_scores is not None:
            if tuple(head_scores.shape) != (L, Hkv):
                raise ValueError(f"head_scores must have shape [L={L}, Hkv={Hkv}], got {tuple(head_scores.shape)}")
            token_scores = broadcast_head_scores(head_scores.to(self.input_ids.device), B, N, self.sink_len)
        elif keep in (0.0, 1.0):
            # All or none of the context is kept: scores would not change the selection, so skip the pass.
            # The sink's +inf keeps it (alone, at keep 0) whatever the budget.
            token_scores = torch.zeros(L, B, Hkv, N, device=self.input_ids.device)
            token_scores[..., :self.sink_len] = float("inf")
        else:
            with _nvtx.range("score"):
                token_scores = self.kvzip_scores(chunk_size, overlap, progress)
        with _nvtx.range("select"):
            mask, num_kept = select_kept(token_scores, keep, self.sink_len, budget,
                                         group=tensor_parallel_group(self.model))
        with _nvtx.range("compact"):
            pool = kvkernels.compact_kv(keys, values, mask, num_kept=num_kept, slack=slack)
        return CompressedContext(self.model, self.tokenizer, self.prompt, RaggedPoolCache(pool, N), self.sink_len,
                                 keep, budget, self.nbytes(), num_kept)


class CompressedContext:
    """A context after KVzip eviction: one ragged pool for all layers, answered with the kvkernels ops.

    Each :meth:`ask` appends the question and the answer to the pool (``ragged_append``), attends with
    ``ragged_attention`` and rolls the pool back to the compressed context afterwards, so any number of
    questions can be asked of one compression. :meth:`quantize` gives a KIVI-quantized copy.
    """

    def __init__(self, model, tokenizer, prompt: PromptFormat, cache, sink_len: int, keep: float, budget: str,
                 dense_bytes: int, kept_rows: int, kivi_bits: Optional[int] = None):
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        self.cache = cache  # RaggedPoolCache, or QuantPoolCache after quantize()
        self.sink_len = sink_len
        self.keep = keep
        self.budget = budget
        self.kivi_bits = kivi_bits
        self._dense_bytes = dense_bytes
        self._kept_rows = kept_rows
        self._step: Optional[DecodeStep] = None  # set by compile()
        self._step_mode: Optional[str] = None

    @property
    def pool(self) -> kvkernels.Pool:
        """The ragged pool (not available once quantized)."""
        if not isinstance(self.cache, RaggedPoolCache):
            raise AttributeError("a KIVI-quantized context holds no ragged pool")
        return self.cache.pool

    @property
    def num_tokens(self) -> int:
        """Logical length of the compressed context (sink + context tokens before eviction)."""
        return self.cache.checkpoint_len

    def kept_rows(self) -> int:
        """KV rows (one key + one value of one head) held for the context, over all layers and heads."""
        return self._kept_rows

    def nbytes(self, include_slack: bool = True) -> int:
        """Bytes of K and V held (with the free slack rows for Q&A unless ``include_slack=False``)."""
        return self.cache.nbytes(include_slack)

    def dense_nbytes(self) -> int:
        """Bytes the dense cache of the same context holds (the compression baseline)."""
        return self._dense_bytes

    def quantize(self, bits: int = 2, group_size: int = 32, residual: int = 128,
                 slack: Optional[int] = None, flush_after: bool = False) -> "CompressedContext":
        """A KIVI-quantized copy of this context (``bits`` 2 or 4, KIVI's group size and residual window).

        The whole pool becomes one ``kvkernels.QuantPool`` (one build call for all layers; decode runs one
        append and one attention op per layer). ``slack`` (default: this pool's) bounds the question +
        answer tokens per ask; ``flush_after`` picks the flush order (default: KIVI's, the newest rows are
        attended in full precision before they are quantized).
        """
        from .kivi import QuantPoolCache

        if slack is None:
            slack = int((self.pool.seg_cap - self.cache._saved_seg_len).min())
        cache = QuantPoolCache(self.pool, self.num_tokens, bits, group_size, residual, slack, flush_after)
        return CompressedContext(self.model, self.tokenizer, self.prompt, cache, self.sink_len, self.keep,
                                 self.budget, self._dense_bytes, self._kept_rows, kivi_bits=bits)

    def compile(self, backend="inductor", mode: Optional[str] = "auto") -> "CompressedContext":
        """Decode later answers with the compiled one-token step (:func:`compiled_decode_step`); returns self.

        The question (prompt) still runs eagerly; each answer token then runs one compiled graph over the
        pool, compiled on the first token and reused for every later token, answer (after the rollback)
        and context of the same pool shapes. ``mode="auto"``: ``"reduce-overhead"`` (CUDA graphs, with the
        ops' deferred overflow checks) on CUDA, Inductor's default on CPU; ``backend`` as in
        ``torch.compile`` (``"eager"``/``"aot_eager"`` check tracing without Inductor's code generation).
        """
        if not getattr(self.cache, "compiles_once", False):
            raise ValueError(f"compile() needs a cache whose decode step compiles once (compiles_once = True); "
                             f"{type(self.cache).__name__} is not one yet: answer without compile()")
        if mode == "auto":
            mode = default_compile_mode(self.model.device)
        self._step, self._step_mode = compiled_decode_step(backend, mode), mode
        return self

    @property
    def compiled(self) -> bool:
        """Whether answers decode with the compiled step (see :meth:`compile`)."""
        return self._step is not None

    def _decode_step(self, compiled: Optional[bool]) -> Optional[DecodeStep]:
        if compiled and self._step is None:
            self.compile()
        if compiled is False or self._step is None:
            return None
        return cuda_graph_step(self._step) if self._step_mode == "reduce-overhead" else self._step

    def _decode_scope(self, step: Optional[DecodeStep]):
        """On CUDA, compiled: fixed pool addresses and no overflow-check sync per append (graph-safe)."""
        if step is None or self.model.device.type != "cuda":
            return contextlib.nullcontext()
        _prepare_static_pool(self.cache)
        return kvkernels.deferred_overflow_checks()

    def answer(self, question: str, max_new_tokens: int = 64, answer_prefix: str = "",
               compiled: Optional[bool] = None) -> Answer:
        """Greedy answer over the compressed pool; the pool is rolled back afterwards, even on error.

        ``compiled``: None follows :meth:`compile` (eager until it is called), True decodes with the
        compiled step (calling :meth:`compile` with its defaults if needed), False eagerly. The first
        compiled answer also pays the compilation, visible in its ``step_seconds[0]``.
        """
        _check_question_args(question, max_new_tokens, answer_prefix)
        ids = self.prompt.question_ids(question, answer_prefix)
        step = self._decode_step(compiled)
        self.cache.reserve(ids.numel() + max_new_tokens)
        try:
            with attention_implementation(self.model, RAGGED_ATTENTION), self._decode_scope(step):
                return greedy_answer(self.model, self.tokenizer, self.cache, ids, self.num_tokens, max_new_tokens,
                                     step=step)
        finally:
            self.cache.rollback()

    def ask(self, question: str, max_new_tokens: int = 64, answer_prefix: str = "") -> str:
        """The answer text (see :meth:`answer`)."""
        return self.answer(question, max_new_tokens, answer_prefix).text


@torch.no_grad()
def prefill(model, tokenizer, context: str, *, system_prompt: Optional[str] = None, block_size: int = 512,
            progress: bool = False) -> DenseContext:
    """Run the sink (chat template + system prompt) and ``context`` through ``model`` into a dense cache.

    The prefill runs in blocks of ``block_size`` tokens (a progress bar with ``progress=True``); the
    result equals a single forward up to floating-point rounding.
    """
    A.check_text("context", context)
    if system_prompt is not None:
        A.check_text("system_prompt", system_prompt, allow_empty=True)
    A.check_int("block_size", block_size, 1)
    prompt = PromptFormat(tokenizer, system_prompt)
    sink = prompt.sink_ids()
    ids = torch.cat([sink, prompt.encode(context)])[None].to(model.device)
    cache = DynamicCache(config=model.config)
    decoder = model.get_decoder()  # hidden states only: the vocabulary projection is not needed here
    with _progress.bar(progress, total=ids.shape[1], desc="prefill", unit="tok") as bar:
        for s in range(0, ids.shape[1], block_size):
            block = ids[:, s:s + block_size]
            positions = torch.arange(s, s + block.shape[1], device=ids.device)[None]
            decoder(input_ids=block, past_key_values=cache, position_ids=positions, use_cache=True)
            bar.update(block.shape[1])
    return DenseContext(model, tokenizer, prompt, ids, sink.numel(), cache)


def compress(model, tokenizer, context: str, keep: Optional[float] = None, *,
             compression_ratio: Optional[float] = None, budget: str = "global",
             scores: Optional[torch.Tensor] = None, head_scores: Optional[torch.Tensor] = None,
             system_prompt: Optional[str] = None, chunk_size: int = 2048, overlap: int = 8, slack: int = 256,
             kivi_bits: Optional[int] = None, kivi_group_size: int = 32, kivi_residual: int = 128,
             progress: bool = False, compile: bool = False) -> CompressedContext:
    """Prefill ``context``, score it with KVzip, evict, and return a :class:`CompressedContext` to ask.

    Args:
        keep: fraction of the context's KV pairs KEPT (KVzip's ``ratio``; default 0.3). The sink
            (chat template and system prompt before the context) is always kept on top.
        compression_ratio: fraction REMOVED (kvpress's naming; 0.7 == keep 0.3). Exclusive with ``keep``.
        budget: ``"global"`` (one threshold over all layers and KV heads, KVzip's default),
            ``"per_head"`` (same count per (layer, head)) or ``"per_layer"`` (same count per layer); under
            tensor parallelism also ``"per_rank"`` (same count per rank; see :mod:`kvkernels.hf.tp`).
        scores: optional external per-(layer, head, token) scores [L, Hkv, n] or [L, B, Hkv, n] (larger =
            keep), e.g. from another scorer; skips the KVzip scoring pass.
        head_scores: optional static per-(layer, head) scores [L, Hkv] (head-level KVzip, see
            :func:`head_level_scores`); broadcast over tokens, skips the scoring pass.
        chunk_size, overlap: KVzip reconstruction chunk length (2,048 as in kvpress) and the number of
            previous-chunk tokens quoted in the repeat prompt (8, as in the paper).
        slack: free rows per (layer, head) segment for question + answer tokens (the pool grows if a
            question needs more).
        kivi_bits: 2 or 4 to also KIVI-quantize the kept KV pairs (see :meth:`CompressedContext.quantize`;
            ``kivi_group_size`` and ``kivi_residual`` are KIVI's group size and full-precision window).
        progress: tqdm progress bars (stderr) for the prefill and the scoring, in tokens/s.
        compile: decode answers with the compiled one-token step (:meth:`CompressedContext.compile` with
            its defaults: Inductor, CUDA graphs on CUDA); works with ``kivi_bits`` too.

    Every argument is checked before any model work (``ValueError``/``TypeError`` naming it).
    """
    keep = _check_compress_args(keep, compression_ratio, budget, chunk_size, overlap, slack, scores, head_scores)
    if kivi_bits:
        A.check_kivi(kivi_bits, kivi_group_size, kivi_residual, _head_dim(model.config))
    A.check_text("context", context)
    dense = prefill(model, tokenizer, context, system_prompt=system_prompt, progress=progress)
    ctx = dense.compress(keep, budget=budget, scores=scores, head_scores=head_scores, chunk_size=chunk_size,
                         overlap=overlap, slack=slack, progress=progress)
    if kivi_bits:
        ctx = ctx.quantize(kivi_bits, kivi_group_size, kivi_residual)
    return ctx.compile() if compile else ctx


def head_level_scores(model, tokenizer, context: str, *, system_prompt: Optional[str] = None,
                      chunk_size: int = 2048, progress: bool = False) -> torch.Tensor:
    """Static per-(layer, KV head) scores [L, Hkv] (head-level KVzip): max KVzip score over the tokens.

    Compute once per model on one long context, save with :func:`save_head_scores`, and pass as
    ``compress(..., head_scores=...)`` to skip the scoring pass (the paper recommends keep ~0.6).
    """
    dense = prefill(model, tokenizer, context, system_prompt=system_prompt, progress=progress)
    scores = dense.kvzip_scores(chunk_size, progress=progress)[..., dense.sink_len:]
    return scores.amax(dim=(1, 3)).cpu()


def save_head_scores(path, head_scores: torch.Tensor, model_name: str = "") -> None:
    """Save static head scores [L, Hkv] (with the model's name, checked by :func:`load_head_scores`)."""
    torch.save({"head_scores": head_scores.float().cpu(), "model": model_name}, path)


def load_head_scores(path, model_name: Optional[str] = None) -> torch.Tensor:
    """Load head scores saved by :func:`save_head_scores`; with ``model_name``, check they belong to it."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if model_name is not None and data.get("model") and data["model"] != model_name:
        raise ValueError(f"{path} holds head scores of {data['model']!r}, not {model_name!r}")
    return data["head_scores"]
