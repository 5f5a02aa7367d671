"""The main job: compress a long context once with KVzip, then answer several questions from it.

``kvkernels demo`` loads SmolLM2-135M-Instruct offline, builds a deterministic staff directory
(names, cities, employee codes, start dates), prefills it once, and answers the same questions

* over the full dense cache (transformers' own cache and SDPA attention), and
* over the KVzip-compressed ragged pool (keep 0.3: 30% of the context's KV pairs kept, the system
  prompt always kept), decoded with ``ragged_append`` + ``ragged_attention``,

then prints the answers side by side with the expected ones, the KV bytes each cache holds and the
decode time per token. On CPU the ops run the ``cpu`` backend (one compiled call per layer attends the pool in
place, reading only the kept rows of each head); on CUDA the Triton kernels.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass

FIRST_NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ines", "Jonas",
               "Kavya", "Lars", "Maya", "Nikolai", "Olivia", "Pedro", "Quentin", "Rosa", "Samir", "Tamara",
               "Ulrich", "Valeria", "Wei", "Ximena", "Yusuf", "Zofia", "Amara", "Bjorn", "Carmen", "Diego",
               "Emil", "Fatima", "Gustav", "Hana", "Ivan", "Julia", "Kenji", "Leila", "Marco", "Nadia"]
LAST_NAMES = ["Moreau", "Silva", "Rossi", "Petrov", "Garcia", "Haddad", "Larsen", "Tanaka", "Costa", "Weber",
              "Iyer", "Nilsson", "Cohen", "Volkov", "Bennett", "Alves", "Dubois", "Navarro", "Khan", "Horvat"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Montreal", "Kyoto", "Valparaiso", "Tallinn", "Marrakesh", "Auckland",
          "Krakow", "Bilbao", "Hanoi", "Reykjavik", "Cusco", "Ghent", "Izmir", "Perth", "Tbilisi", "Quito", "Turku"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    code: str
    start: str


def staff_directory(num_people: int = 16, seed: int = 7) -> list[Person]:
    """A deterministic list of distinct people with a city, an employee code and a start date."""
    rng = random.Random(seed)
    names = [f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES]
    rng.shuffle(names)
    people = []
    for name in names[:num_people]:
        code = f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}-{rng.randint(1000, 9999)}"
        start = f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(2001, 2023)}"
        people.append(Person(name, rng.choice(CITIES), code, start))
    return people


def directory_text(people: list[Person]) -> str:
    # Each fact repeats the person's name: a 135M model retrieves "X's code is ..." far better than a
    # table row (measured: about 2x more correct answers with the full cache).
    lines = ["Staff directory of the Northwind research lab.", ""]
    for p in people:
        lines.append(f"{p.name} lives in {p.city}. The employee code of {p.name} is {p.code}. "
                     f"{p.name} started on {p.start}.")
        lines.append("")
    return "\n".join(lines)


def demo_questions(people: list[Person], count: int = 4, seed: int = 11) -> list[tuple[str, str]]:
    """(question, expected answer) pairs about people spread over the directory."""
    rng = random.Random(seed)
    kinds = [("What is the employee code of {}?", "code"), ("In which city does {} live?", "city"),
             ("On which date did {} start?", "start")]
    picks = [people[round(i * (len(people) - 1) / max(count - 1, 1))] for i in range(count)]
    out = []
    for i, p in enumerate(picks):
        template, attr = kinds[(i + rng.randint(0, 2)) % len(kinds)]
        out.append((template.format(p.name), getattr(p, attr)))
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _check(answer: str, expected: str) -> str:
    return "ok" if expected.lower() in answer.lower() else "--"


def _wrap(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


MAX_PEOPLE = len(FIRST_NAMES) * len(LAST_NAMES)


def _allocated_nbytes(tensors) -> int:
    """Bytes of the storages behind ``tensors`` (each storage once): what the cache really holds in memory."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _cache_bytes(ctx, dense) -> tuple[int, int]:
    """(live, allocated) KV bytes of a context: the rows holding the context vs everything allocated."""
    if ctx is dense:
        keys, values = dense.layer_kv()
        return dense.nbytes(), _allocated_nbytes(keys + values)
    return ctx.nbytes(include_slack=False), ctx.nbytes(include_slack=True)


def run_demo(people: int = 16, keep: float = 0.3, questions: int = 4, max_new_tokens: int = 16,
             chunk_size: int = 2048, kivi_bits: int = 2, kivi_residual: int = 128, device=None,
             model_and_tokenizer=None, out=sys.stdout, quiet: bool = False) -> dict:
    """Run the demo and print its report to ``out``; returns the numbers (for tests and scripts).

    ``kivi_bits`` 2 or 4 adds a column with the KVzip pool KIVI-quantized on top (0: none);
    ``model_and_tokenizer`` reuses an already loaded SmolLM2 (else it is loaded here). ``keep`` 1 keeps
    everything and skips the scoring pass; ``keep`` 0 keeps only the sink (chat template + system prompt).
    Progress goes to stderr unless ``quiet``.
    """
    from kvkernels import _progress
    from kvkernels._args import check_fraction, check_int, check_kivi

    check_int("people", people, 1, MAX_PEOPLE)
    check_fraction("keep", keep, "(the fraction of context KV pairs KEPT)")
    check_int("questions", questions, 1)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("chunk_size", chunk_size, 1)
    if kivi_bits:
        check_kivi(kivi_bits, 32, kivi_residual)

    import torch

    import kvkernels
    from kvkernels.hf import load_smollm2, prefill

    print(f"kvkernels {kvkernels.__version__} demo: KVzip compress-once / ask-many on SmolLM2-135M-Instruct",
          file=out)
    t0 = time.perf_counter()
    if model_and_tokenizer is not None:
        model, tokenizer = model_and_tokenizer
    else:
        with _progress.step("loading SmolLM2-135M-Instruct (about 25 s on 2 CPU cores)", not quiet):
            model, tokenizer = load_smollm2(device=device)
    if model.device.type == "cuda":
        backend = "Triton kernels"
    else:
        from kvkernels.cpu import native

        # Built here (once per machine: seconds for the kernels, ~20 s for the bindings), not in a timed step.
        on, checks = native.library() is not None, native.bindings() is not None
        backend = "cpu kernels, " + ("compiled kernels" if on else "no compiled kernels (see README, Backends): "
                                     "the decode step and KVzip scoring run PyTorch ops")
        backend += ", C++ bindings" if checks else ""
    print(f"model loaded in {time.perf_counter() - t0:.1f} s on {model.device} ({model.dtype}); "
          f"kvkernels backend: {backend}", file=out)

    folks = staff_directory(people)
    qa = demo_questions(folks, questions)

    t0 = time.perf_counter()
    dense = prefill(model, tokenizer, directory_text(folks), progress=not quiet, block_size=256)
    prefill_s = time.perf_counter() - t0
    print(f"context: {people} people, {dense.num_tokens} tokens ({dense.sink_len} sink tokens: chat template "
          f"+ system prompt, never evicted); prefill {prefill_s:.1f} s", file=out)

    # Free rows per segment for the longest question + its answer: the pool allocates no more than that.
    slack = max(dense.prompt.question_ids(q).numel() for q, _ in qa) + max_new_tokens
    t0 = time.perf_counter()
    small = dense.compress(keep, chunk_size=chunk_size, progress=not quiet, slack=slack)
    compress_s = time.perf_counter() - t0
    total_rows = dense.num_tokens * model.config.num_hidden_layers * model.config.num_key_value_heads
    what = ("KVzip scoring + eviction" if 0.0 < keep < 1.0 else
            f"eviction (keep {keep:g}: {'everything' if keep else 'only the sink'} kept, no scoring needed)")
    print(f"{what}: {compress_s:.1f} s; kept {small.kept_rows()} of {total_rows} (layer, head, token) KV pairs",
          file=out)

    variants = [("full cache", dense), (f"KVzip keep {keep:g}", small)]
    if kivi_bits:
        try:
            variants.append((f"KVzip {keep:g} + KIVI-{kivi_bits}", small.quantize(kivi_bits, 32, kivi_residual)))
        except ImportError as exc:
            print(f"(KIVI column skipped: {exc})", file=out)

    answers = {label: [] for label, _ in variants}
    with _progress.bar(not quiet, total=len(qa) * len(variants), desc="answers", unit="answer") as bar:
        for question, _ in qa:
            for label, ctx in variants:
                a = ctx.answer(question, max_new_tokens)
                answers[label].append(a)
                bar.set_postfix_str(f"{label}: {len(a.token_ids) / (a.prompt_seconds + a.decode_seconds):.1f} tok/s")
                bar.update(1)

    pad = max(len(label) for label, _ in variants)
    for i, (question, expected) in enumerate(qa):
        print(f"\nQ{i + 1}. {question}   (expected: {expected})", file=out)
        for label, _ in variants:
            text = answers[label][i].text
            print(f"    {label:<{pad}}  [{_check(text, expected)}] {_wrap(text, 90)}", file=out)

    def mean(xs):
        xs = [x for x in xs if x == x]
        return sum(xs) / len(xs) if xs else float("nan")

    dense_bytes, dense_allocated = _cache_bytes(dense, dense)
    print(f"\n{'cache':<{pad + 16}} {'live KV':>10} {'allocated':>10} {'vs dense':>9} {'decode/token':>13} "
          f"{'expected':>9} {'= full':>7}", file=out)
    summary = {}
    for label, ctx in variants:
        live, allocated = _cache_bytes(ctx, dense)
        tpt = mean([a.seconds_per_token for a in answers[label]])
        ok = sum(_check(a.text, e) == "ok" for a, (_, e) in zip(answers[label], qa))
        same = sum(a.token_ids == f.token_ids for a, f in zip(answers[label], answers[variants[0][0]]))
        name = label + (" (transformers)" if ctx is dense else "")
        print(f"{name:<{pad + 16}} {_mib(live):>10} {_mib(allocated):>10} {dense_allocated / allocated:>8.2f}x "
              f"{_ms(tpt):>13} {ok:>5}/{len(qa)} {same:>5}/{len(qa)}", file=out)
        summary[label] = {"bytes": live, "allocated_bytes": allocated, "ratio": dense_allocated / allocated,
                          "s_per_token": tpt, "correct": ok, "same_as_full": same,
                          "answers": [a.text for a in answers[label]]}
    print("(live KV: the rows holding the context; allocated: all the cache holds in memory, with the free rows "
          f"reserved for a question + answer ({slack} per layer and head in the compressed caches); vs dense: "
          "dense allocated / allocated)", file=out)
    print("(expected: answers containing the right value; = full: token-identical to the full-cache answer)",
          file=out)
    if kivi_bits:
        print(f"(KIVI: group 32, full-precision window of {kivi_residual} tokens per head)", file=out)
    print(_speed_sentence(summary, variants[0][0]), file=out)
    if model.device.type == "cuda":
        print(f"peak GPU memory: {_mib(torch.cuda.max_memory_allocated(model.device))}", file=out)
    return {"questions": qa, "variants": summary, "dense_bytes": dense_bytes, "dense_allocated_bytes": dense_allocated,
            "prefill_s": prefill_s, "compress_s": compress_s, "slack": slack}


def _speed_sentence(summary: dict, full_label: str) -> str:
    """What the decode/token column says, in words: each compressed cache's speed against the full cache."""
    full = summary[full_label]["s_per_token"]
    parts = []
    for label, row in summary.items():
        if label == full_label or not row["s_per_token"] == row["s_per_token"]:
            continue
        speedup = full / row["s_per_token"]
        parts.append(f"{label} decodes {speedup:.2f}x faster per token" if speedup >= 1
                     else f"{label} decodes {1 / speedup:.2f}x slower per token")
    if not parts:
        return "(decode speed: no compressed answer ran a decode step)"
    return ("(measured in this run, against the full cache: " + "; ".join(parts) + ". On CPU the model's weights "
            "cost the same at any context length, so the gain grows with the context: see README, Performance)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options; every value is checked here, at parse time (nothing heavy is imported)."""
    from kvkernels import _args as A

    parser.add_argument("--people", type=A.int_at_least(1, MAX_PEOPLE), default=16,
                        help=f"directory entries, 1..{MAX_PEOPLE} (about 42 tokens each)")
    parser.add_argument("--keep", type=A.fraction("(the fraction of context KV pairs KEPT)"), default=0.3,
                        help="fraction of the context's KV pairs KEPT (KVzip's ratio), in [0, 1]; 1 keeps "
                             "everything and skips scoring, 0 keeps only the sink (chat template + system prompt)")
    parser.add_argument("--questions", type=A.int_at_least(1), default=4, help="number of questions asked")
    parser.add_argument("--max-new-tokens", type=A.int_at_least(1), default=16,
                        help="longest answer, in tokens (greedy decoding stops earlier at end of turn)")
    parser.add_argument("--chunk-size", type=A.int_at_least(1), default=2048,
                        help="KVzip reconstruction chunk length, in tokens")
    parser.add_argument("--kivi-bits", type=int, default=2, choices=(0, 2, 4),
                        help="also KIVI-quantize the KVzip pool to this many bits (0: skip that column)")
    parser.add_argument("--kivi-residual", type=A.cli_type(A._to_int, _kivi_residual, "int"), default=128,
                        help="KIVI full-precision window of recent tokens per head (a positive multiple of the "
                             "group size 32; KIVI's default 128; smaller quantizes more of a short context)")
    parser.add_argument("--threads", type=A.int_at_least(1), default=None,
                        help="torch CPU threads (default: torch's; 1 is often faster on a busy shared CPU)")
    parser.add_argument("--device", type=A.device(), default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr (the report still prints)")


def _kivi_residual(value: int) -> int:
    from kvkernels._args import check_kivi
    check_kivi(2, 32, value)
    return value


def main(args: argparse.Namespace) -> int:
    """Entry point of ``kvkernels demo``; returns the exit status."""
    try:
        from kvkernels.hf.model import ModelNotInstalledError
    except ImportError as exc:  # transformers missing
        print(f"kvkernels demo needs the [hf] extra: pip install -e \".[hf]\"  ({exc})", file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        run_demo(args.people, args.keep, args.questions, args.max_new_tokens, args.chunk_size, args.kivi_bits,
                 args.kivi_residual, args.device, quiet=args.quiet)
    except ModelNotInstalledError as exc:
        print(f"kvkernels demo: {exc}", file=sys.stderr)
        return 2
    return 0
