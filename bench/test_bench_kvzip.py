"""KVzip's chunk score (kvzip_score, reported in FLOP/s) vs the reference that materializes every probability.

Cases and sizes: bench/cases.py (kvzip_cases); columns: bench/harness.py. Run with
``python -m pytest bench/test_bench_kvzip.py --benchmark-only`` (tiny sizes without a GPU).
"""

import pytest

from bench import cases, harness

CASES = cases.cases_for("kvzip", smoke=harness.smoke_mode())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kvzip(benchmark, bench_env, case):
    row = harness.bench_case(benchmark, case, *bench_env)
    assert row["median_ms"] > 0
