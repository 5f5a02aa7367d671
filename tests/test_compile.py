"""The compiled decode path: one dynamo compilation of the one-token step over a ragged pool, reused for
every token, across answers (with the rollback between them) and across contexts of the same shapes.

A tiny random Llama (2 layers, GQA 6 query heads on 2 KV heads, head_dim 64) keeps this cheap; the pool
is built by the pipeline (prefill + compress with external scores). Frames are counted with dynamo's
``CompileCounter`` backend (it runs the traced graph as is); ``aot_eager`` also runs AOT autograd's
functionalization of the in-place ``ragged_append``. Inductor's code generation is measured in
``bench/cpu_compile.py`` (too slow for CI on 2 cores).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("kvkernels.hf")

from torch._dynamo.testing import CompileCounter  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvkernels.hf import (RAGGED_ATTENTION, CompressedContext, attention_implementation, compress,  # noqa: E402
                          greedy_answer, prefill)
from kvkernels.hf.pipeline import compiled_decode_step  # noqa: E402
from test_hf import CONTEXT, VOCAB, CharTokenizer  # noqa: E402

QUESTIONS = ("Where does Bruno live?", "When does code K-4821 start?")
ANSWER_TOKENS = 14  # 12+ decode steps per answer


class NoEosTokenizer(CharTokenizer):
    eos_token_id = None  # answers always run max_new_tokens steps: the step count is what is tested


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=192, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         eos_token_id=None, bos_token_id=0, pad_token_id=0, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    yield model, NoEosTokenizer()
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with no compiled graphs (dynamo keeps them per function, across tests)."""
    torch._dynamo.reset()
    compiled_decode_step.cache_clear()
    yield
    torch._dynamo.reset()
    compiled_decode_step.cache_clear()


def _context(model, tok, seed: int) -> CompressedContext:
    dense = prefill(model, tok, CONTEXT)
    scores = torch.rand(2, 2, dense.num_tokens - dense.sink_len, generator=torch.Generator().manual_seed(seed))
    return dense.compress(scores=scores, keep=0.4, slack=48)


def _answers(ctx: CompressedContext) -> list[list[int]]:
    before = ctx.pool.seg_len.clone()
    out = []
    for question in QUESTIONS:
        answer = ctx.answer(question, max_new_tokens=ANSWER_TOKENS)
        assert answer.decode_steps == ANSWER_TOKENS - 1 >= 12
        assert torch.equal(ctx.pool.seg_len, before), "the answer was not rolled back"
        assert ctx.cache.get_seq_length() == ctx.num_tokens
        out.append(answer.token_ids)
    return out


def test_decode_step_compiles_once_across_answers_rollback_and_contexts(tiny):
    model, tok = tiny
    ctx = _context(model, tok, seed=1)
    eager = _answers(ctx)
    assert eager[0] != eager[1], "two different questions should give different answers"
    counter = CompileCounter()
    assert ctx.compile(backend=counter) is ctx and ctx.compiled
    assert _answers(ctx) == eager, "compiled answers differ from eager ones"
    assert counter.frame_count == 1, f"{counter.frame_count} compilations over 2 answers of {ANSWER_TOKENS} tokens"
    # Another context of the same shapes (same kept-row count, other rows): the same graph serves it.
    other = _context(model, tok, seed=2).compile(backend=counter)
    assert other.pool.k_pool.shape == ctx.pool.k_pool.shape
    assert not torch.equal(other.pool.seg_len, ctx.pool.seg_len)
    other_eager = _answers(_context(model, tok, seed=2))
    assert _answers(other) == other_eager
    assert counter.frame_count == 1, "a context of the same shapes recompiled the step"
    assert counter.op_count > 0


def test_other_pool_sizes_compile_once_more_then_never(tiny):
    """A pool of another row count compiles a second graph with the row count dynamic; later sizes reuse it."""
    model, tok = tiny
    dense = prefill(model, tok, CONTEXT)
    counter = CompileCounter()
    frames, rows = [], set()
    for keep in (0.3, 0.5, 0.8):
        scores = torch.rand(2, 2, dense.num_tokens - dense.sink_len)
        ctx = dense.compress(scores=scores, keep=keep, slack=32).compile(backend=counter)
        ctx.answer(QUESTIONS[0], max_new_tokens=4)
        frames.append(counter.frame_count)
        rows.add(ctx.pool.k_pool.shape[0])
    assert len(rows) == 3 and frames == [1, 2, 2]


def test_compiled_step_under_aot_eager_matches_eager(tiny):
    """AOT autograd functionalizes the in-place append (k_pool, v_pool, seg_len): the pool it leaves must be
    the eager one, token for token."""
    model, tok = tiny
    ctx = _context(model, tok, seed=3)
    eager = _answers(ctx)
    assert _answers(ctx.compile(backend="aot_eager")) == eager
    # The appended rows are really written: the pool after one compiled answer (not rolled back) equals
    # the pool after the same answer eagerly.
    pools = []
    for step in (None, compiled_decode_step("aot_eager", None)):
        c = _context(model, tok, seed=3)
        with attention_implementation(model, RAGGED_ATTENTION):
            greedy_answer(model, tok, c.cache, c.prompt.question_ids(QUESTIONS[0]), c.num_tokens, 6, step=step)
        pools.append(c.pool)
    for eager_t, compiled_t in zip(*pools):
        torch.testing.assert_close(compiled_t, eager_t, rtol=1e-5, atol=1e-5)


def test_compress_compile_switch_and_refusal(tiny):
    model, tok = tiny
    ctx = compress(model, tok, CONTEXT[:80], keep=1.0, slack=32, compile=True)
    assert ctx.compiled and not _context(model, tok, seed=4).compiled
    not_once = CompressedContext(model, tok, ctx.prompt, object(), ctx.sink_len, 1.0, "global", 0, 0)
    with pytest.raises(ValueError, match="compiles_once"):
        not_once.compile()


def test_gpu_graph_decode_script_runs_its_cpu_path(tmp_path, capsys):
    """bench/gpu_graph_decode.py's measurement on CPU (tiny random model, eager backend, no CUDA graphs), so
    it is not dead code where no GPU is lent; on CUDA the same code compiles with mode="reduce-overhead"."""
    import json

    from bench.gpu_graph_decode import main

    assert main(["--cpu-check", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "graph_decode.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["pool eager", "pool compiled", "full StaticCache eager", "full StaticCache compiled"]
    assert all(r["ms_per_token"] > 0 and r["steps"] == 5 for r in rows.values())
    assert rows["pool compiled"]["frames"] == rows["full StaticCache compiled"]["frames"] == 1
    assert rows["pool compiled"]["token_ids"] == rows["pool eager"]["token_ids"]
    assert "pool compiled / full StaticCache compiled" in result["ratios"]
    if not torch.cuda.is_available():
        assert main([]) == 0
        assert "no CUDA device" in capsys.readouterr().out


def test_quantized_pool_decode_compiles_once_across_answers(tiny):
    """The KIVI-quantized pool (kvkernels.hf.kivi.QuantPoolCache) keeps its per-token state in tensors too:
    one compilation serves both answers, with the rollback between them, and matches eager decoding."""
    model, tok = tiny
    ctx = _context(model, tok, seed=5).quantize(2, 32, 32, slack=48)
    before = [t.clone() for t in ctx.cache.pool.lengths()]
    eager = [ctx.answer(q, max_new_tokens=ANSWER_TOKENS).token_ids for q in QUESTIONS]
    counter = CompileCounter()
    assert ctx.compile(backend=counter).compiled
    compiled = []
    for question in QUESTIONS:
        answer = ctx.answer(question, max_new_tokens=ANSWER_TOKENS)
        assert answer.decode_steps == ANSWER_TOKENS - 1
        assert all(torch.equal(a, b) for a, b in zip(ctx.cache.pool.lengths(), before)), "not rolled back"
        assert ctx.cache.get_seq_length() == ctx.num_tokens
        compiled.append(answer.token_ids)
    assert compiled == eager, "compiled answers over the quantized pool differ from eager ones"
    assert counter.frame_count == 1, f"{counter.frame_count} compilations over 2 answers of {ANSWER_TOKENS} tokens"
