"""KIVI: fused attention over the 2/4-bit cache vs dequantize-then-SDPA, SDPA on the fp16/bf16 cache and the
reference; quantize/dequantize kernels vs the reference.

Cases and sizes: bench/cases.py (kivi_cases); columns: bench/harness.py. Run with
``python -m pytest bench/test_bench_kivi.py --benchmark-only`` (tiny sizes without a GPU).
"""

import pytest

from bench import cases, harness

CASES = cases.cases_for("kivi", smoke=harness.smoke_mode())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kivi(benchmark, bench_env, case):
    row = harness.bench_case(benchmark, case, *bench_env)
    assert row["median_ms"] > 0
