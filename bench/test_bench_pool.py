"""Physical eviction into the ragged pool (compact_kv) and in-place append (ragged_append) vs the reference.

Cases and sizes: bench/cases.py (pool_cases); columns: bench/harness.py. Run with
``python -m pytest bench/test_bench_pool.py --benchmark-only`` (tiny sizes without a GPU).
"""

import pytest

from bench import cases, harness

CASES = cases.cases_for("pool", smoke=harness.smoke_mode())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_pool(benchmark, bench_env, case):
    row = harness.bench_case(benchmark, case, *bench_env)
    assert row["median_ms"] > 0
