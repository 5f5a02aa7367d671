"""Exact top-k selection mask (topk_mask): Triton and CuPy backends vs torch.topk + scatter and the reference.

Cases and sizes: bench/cases.py (topk_cases); columns: bench/harness.py. Run with
``python -m pytest bench/test_bench_topk.py --benchmark-only`` (tiny sizes without a GPU).
"""

import pytest

from bench import cases, harness

CASES = cases.cases_for("topk", smoke=harness.smoke_mode())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_topk(benchmark, bench_env, case):
    row = harness.bench_case(benchmark, case, *bench_env)
    assert row["median_ms"] > 0
