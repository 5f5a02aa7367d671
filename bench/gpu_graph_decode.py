"""GPU: the pool decode step captured in CUDA graphs and replayed as lengths grow (tier 1 of the report).

    python -m bench.gpu_graph_decode --out OUT_DIR          # SmolLM2-135M bf16, 8K-token context, keep 0.3
    python -m bench.gpu_graph_decode --cpu-check            # the same code on CPU: tiny random model, no graphs

On CUDA: ``torch.compile(mode="reduce-overhead")`` of the one-token step (Inductor + CUDA graph trees) over
the KVzip pool, with the ops' deferred overflow checks (``kvkernels.deferred_overflow_checks()``: no host
sync per append), against the same pool eagerly and the full cache in ``StaticCache`` eagerly and compiled
the same way; ``--tokens`` new tokens per question, two questions with the rollback between them
(:mod:`bench.compiled_decode`). Reports ms per token, the slowest later step over the median, graphs
compiled and CUDA-graph skips (both should be 0 skips and 1 graph per cache). Writes
``OUT_DIR/graph_decode.json`` and ``.md`` (default ``bench/results/<gpu>/``). Without CUDA it prints why and exits 0 (``--cpu-check`` runs the
measurement code on CPU with a tiny random Llama and the eager backend, as the test suite does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.compiled_decode import QUESTIONS, context_of_tokens, measure, ratios, table
from bench.harness import command_line, versions


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def tiny_llama():
    """A random 2-layer Llama (GQA 3) and a one-id-per-character tokenizer: the CPU check needs no files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class CharTokenizer:
        eos_token_id = None
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return type("Encoding", (), {"input_ids": [ord(c) % 250 for c in text]})()

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(48 + i % 64) for i in ids)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=64, initializer_range=0.2)
    return LlamaForCausalLM(config).eval(), CharTokenizer()


def run(model, tok, context_tokens: int, tokens: int, keep: float, backend: str, mode) -> dict:
    text, people = context_of_tokens(tok, context_tokens)
    questions = tuple(q.format(people[i * len(people) // 3].name) for i, q in enumerate(QUESTIONS))
    skips = cudagraph_skips()
    rows = measure(model, tok, context=text, keep=keep, tokens=tokens, questions=questions, backend=backend,
                   mode=mode)
    return {"rows": rows, "ratios": ratios(rows), "cudagraph_skips": cudagraph_skips() - skips,
            "questions": questions}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<gpu>/)")
    p.add_argument("--context-tokens", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--cpu-check", action="store_true", help="run the measurement on CPU with a tiny random model")
    args = p.parse_args(argv)

    if args.cpu_check:
        model, tok = tiny_llama()
        result = run(model, tok, min(args.context_tokens, 400), min(args.tokens, 6), args.keep, "eager", None)
    elif not torch.cuda.is_available():
        print("bench/gpu_graph_decode.py: no CUDA device here, nothing measured (use --cpu-check to exercise "
              "the code on CPU)")
        return 0
    else:
        from kvkernels.hf import load_smollm2

        model, tok = load_smollm2(device="cuda")
        result = run(model, tok, args.context_tokens, args.tokens, args.keep, "inductor", "reduce-overhead")
    result.update(versions=versions(), command=command_line())
    rows = result["rows"]
    md = [f"# Pool decode step, CUDA graphs ({rows[0]['device']}, {rows[0]['context_tokens']} context tokens, "
          f"keep {args.keep}, {rows[0]['steps']} steps per answer)", "", table(rows), "",
          *(f"- {k}: {v:.3f}" for k, v in result["ratios"].items()),
          f"- CUDA-graph skips: {result['cudagraph_skips']}", "", f"`{result['command']}`"]
    print("\n".join(md))
    out = args.out
    if out is None and not args.cpu_check:  # a CPU check writes only where asked: it measures nothing real
        from kvkernels import tuning

        out = Path(__file__).resolve().parent / "results" / tuning.device_name().replace(" ", "_")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "graph_decode.json").write_text(json.dumps(result, indent=1))
        (out / "graph_decode.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
