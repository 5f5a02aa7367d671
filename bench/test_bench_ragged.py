"""Decode over the evicted ragged pool (ragged_attention) vs SDPA on the dense full cache, FlexAttention with a
length block mask, and the reference; at several context lengths and keep ratios.

Cases and sizes: bench/cases.py (ragged_cases); columns: bench/harness.py. Run with
``python -m pytest bench/test_bench_ragged.py --benchmark-only`` (tiny sizes without a GPU).
"""

import pytest

from bench import cases, harness

CASES = cases.cases_for("ragged", smoke=harness.smoke_mode())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ragged(benchmark, bench_env, case):
    row = harness.bench_case(benchmark, case, *bench_env)
    assert row["median_ms"] > 0
