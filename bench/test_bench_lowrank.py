"""GEAR low-rank residual by subspace iteration (lowrank_residual) vs the reference (torch.linalg.qr).

Cases and sizes: bench/cases.py (lowrank_cases); columns: bench/harness.py. Run with
``python -m pytest bench/test_bench_lowrank.py --benchmark-only`` (tiny sizes without a GPU).
"""

import pytest

from bench import cases, harness

CASES = cases.cases_for("lowrank", smoke=harness.smoke_mode())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lowrank(benchmark, bench_env, case):
    row = harness.bench_case(benchmark, case, *bench_env)
    assert row["median_ms"] > 0
