"""The Python API rejects bad arguments before any model work; keep 0 / keep 1; demo byte accounting.

Validation is checked with a model stand-in that fails on any use, so an error raised here can only come
from the argument checks. keep 0/1 run a tiny random Llama (2 layers, hidden 64).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvkernels.hf import compress, pipeline, prefill  # noqa: E402
from test_hf import VOCAB, CharTokenizer  # noqa: E402  (the tiny model's stand-in tokenizer)


class UntouchableModel:
    """A model stand-in: the config is readable (for head_dim), anything else fails the test."""

    config = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)

    def __getattr__(self, name):
        raise AssertionError(f"model.{name} used before the arguments were checked")


BAD_COMPRESS = [
    (dict(keep=1.5), ValueError, "keep must be a number in [0, 1]"),
    (dict(keep=-0.1), ValueError, "keep must be a number in [0, 1]"),
    (dict(keep="0.3"), TypeError, "keep must be a number in [0, 1]"),
    (dict(compression_ratio=2.0), ValueError, "compression_ratio must be a number in [0, 1]"),
    (dict(keep=0.3, compression_ratio=0.7), ValueError, "not both"),
    (dict(budget="per_token"), ValueError, "budget must be one of 'global', 'per_head', 'per_layer'"),
    (dict(chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
    (dict(chunk_size=2.5), TypeError, "chunk_size must be an int"),
    (dict(overlap=-1), ValueError, "overlap must be an int >= 0"),
    (dict(slack=-3), ValueError, "slack must be an int >= 0"),
    (dict(scores=[1, 2]), TypeError, "scores must be a torch.Tensor"),
    (dict(scores=torch.zeros(1), head_scores=torch.zeros(1)), ValueError, "not both"),
    (dict(kivi_bits=3), ValueError, "kivi_bits must be one of 2, 4"),
    (dict(kivi_bits=2, kivi_group_size=48), ValueError, "kivi_group_size must be one of 32, 64, 128"),
    (dict(kivi_bits=2, kivi_residual=100), ValueError, "kivi_residual must be a multiple of kivi_group_size"),
    (dict(kivi_bits=2, kivi_group_size=128), ValueError, "kivi_group_size = 128 must divide the model's head dim 64"),
]


@pytest.mark.parametrize("kwargs,kind,message", BAD_COMPRESS, ids=[m for _, _, m in BAD_COMPRESS])
def test_compress_rejects_bad_arguments_before_model_work(kwargs, kind, message):
    with pytest.raises(kind, match=__import__("re").escape(message)):
        compress(UntouchableModel(), CharTokenizer(), "some context", **kwargs)


@pytest.mark.parametrize("context,kind", [("", ValueError), ("   ", ValueError), (None, TypeError), (b"x", TypeError)])
def test_prefill_and_compress_reject_a_missing_context(context, kind):
    with pytest.raises(kind, match="context must be a"):
        prefill(UntouchableModel(), CharTokenizer(), context)
    with pytest.raises(kind, match="context must be a"):
        compress(UntouchableModel(), CharTokenizer(), context)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        prefill(UntouchableModel(), CharTokenizer(), "text", block_size=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                         eos_token_id=VOCAB - 1, bos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval(), CharTokenizer()


def test_dense_compress_and_answer_reject_bad_arguments_before_model_work(tiny):
    model, tok = tiny
    dense = prefill(model, tok, "Alice lives in Lisbon. " * 4, system_prompt="Be brief.")
    dense.model = UntouchableModel()  # from here on, any model work fails the test
    for kwargs, kind, message in BAD_COMPRESS[:12]:
        with pytest.raises(kind, match=__import__("re").escape(message)):
            dense.compress(**kwargs)
    for ask in (dense.answer, dense.ask):
        with pytest.raises(ValueError, match="question must be a non-empty str"):
            ask("")
        with pytest.raises(TypeError, match="question must be a str"):
            ask(42)
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            ask("Where?", 0)
        with pytest.raises(TypeError, match="answer_prefix must be a str"):
            ask("Where?", 4, None)


def test_keep_1_skips_scoring_and_keep_0_keeps_only_the_sink(tiny, monkeypatch):
    model, tok = tiny
    dense = prefill(model, tok, "Alice lives in Lisbon; Bruno in Oslo. " * 3, system_prompt="Answer briefly.")
    assert dense.sink_len > 0
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads

    def no_scoring(*args, **kwargs):
        raise AssertionError("the KVzip scoring pass ran")

    monkeypatch.setattr(pipeline, "kvzip_scores", no_scoring)
    for budget in ("global", "per_head", "per_layer"):
        everything = dense.compress(1.0, budget=budget, slack=8)
        assert everything.kept_rows() == L * H * dense.num_tokens
        sink_only = dense.compress(0.0, budget=budget, slack=8)
        assert sink_only.kept_rows() == L * H * dense.sink_len
        # Every segment holds exactly the sink's rows, i.e. each head kept its sink, not some other rows.
        assert bool((sink_only.cache._saved_seg_len == dense.sink_len).all())
        k_pool, seg_start = sink_only.pool.k_pool, sink_only.pool.seg_start
        keys, _ = dense.layer_kv()
        for layer in range(L):
            for head in range(H):
                start = int(seg_start[layer, 0, head])
                assert torch.equal(k_pool[start:start + dense.sink_len], keys[layer][0, head, :dense.sink_len])
        assert sink_only.answer("Where does Bruno live?", 3).token_ids  # answers from the sink alone
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="scoring pass ran"):
        monkeypatch.setattr(pipeline, "kvzip_scores", no_scoring)
        dense.compress(0.5)  # the check above can fail: keep strictly between 0 and 1 does score


def test_demo_reports_allocated_bytes_and_ratio_from_them(tiny, monkeypatch):
    from kvkernels import demo
    import io

    model, tok = tiny
    model.generation_config.eos_token_id = VOCAB - 1
    out = io.StringIO()
    result = demo.run_demo(people=3, questions=2, max_new_tokens=3, kivi_bits=0, model_and_tokenizer=(model, tok),
                           out=out, quiet=True)
    text = out.getvalue()
    assert "live KV" in text and "allocated" in text
    dense = result["variants"]["full cache"]
    small = result["variants"]["KVzip keep 0.3"]
    L, H, D = 2, 1, 64
    assert small["allocated_bytes"] - small["bytes"] == L * H * result["slack"] * 2 * D * 4  # slack K + V rows, fp32
    assert dense["allocated_bytes"] >= dense["bytes"] == result["dense_bytes"]
    assert small["ratio"] == pytest.approx(result["dense_allocated_bytes"] / small["allocated_bytes"])
    assert f"{small['ratio']:.2f}x" in text


def test_demo_rejects_bad_values_before_loading(monkeypatch):
    from kvkernels import demo
    from kvkernels.hf import model as model_module

    monkeypatch.setattr(model_module, "load_smollm2", lambda *a, **k: pytest.fail("model loaded"))
    for kwargs, message in ((dict(keep=1.5), "keep must be"), (dict(people=0), "people must be"),
                            (dict(questions=0), "questions must be"), (dict(kivi_residual=40), "kivi_residual")):
        with pytest.raises(ValueError, match=message):
            demo.run_demo(**kwargs)


def test_demo_progress_goes_to_stderr_and_quiet_silences_it(tiny, capsys):
    from kvkernels import _progress, demo
    import io

    model, tok = tiny
    model.generation_config.eos_token_id = VOCAB - 1
    kwargs = dict(people=2, questions=1, max_new_tokens=2, kivi_bits=0, model_and_tokenizer=(model, tok))
    capsys.readouterr()
    demo.run_demo(out=io.StringIO(), quiet=True, **kwargs)
    assert capsys.readouterr().err == ""
    demo.run_demo(out=io.StringIO(), quiet=False, **kwargs)
    err = capsys.readouterr().err
    for step in ("prefill", "KVzip scoring (1 chunks)", "tok/s", "answers"):
        assert step in err, (step, err)
    with _progress.step("loading", enabled=True):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "loading ..." and lines[1].startswith("loading: ") and lines[1].endswith(" s")
    with _progress.step("loading", enabled=False):
        print("a third-party bar", file=__import__("sys").stderr)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("keep,what", [(1.0, "everything kept"), (0.0, "only the sink kept")])
def test_demo_keep_1_and_0_run_without_scoring(tiny, monkeypatch, keep, what):
    from kvkernels import demo
    import io

    model, tok = tiny
    model.generation_config.eos_token_id = VOCAB - 1
    monkeypatch.setattr(pipeline, "kvzip_scores", lambda *a, **k: pytest.fail("the KVzip scoring pass ran"))
    out = io.StringIO()
    result = demo.run_demo(people=2, questions=1, max_new_tokens=2, keep=keep, kivi_bits=0,
                           model_and_tokenizer=(model, tok), out=out, quiet=True)
    assert f"(keep {keep:g}: {what}, no scoring needed)" in out.getvalue()
    small = result["variants"][f"KVzip keep {keep:g}"]
    if keep == 1.0:
        assert small["bytes"] == result["dense_bytes"]
    else:  # the stand-in tokenizer has no chat template, so the sink is empty and nothing is kept
        assert small["bytes"] == 0 and len(small["answers"]) == 1
