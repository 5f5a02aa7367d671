"""pytest-benchmark suites: tiny sizes under the Triton interpreter without a GPU, real sizes with one.

    python -m pytest bench --benchmark-only                         # GPU: every family
    python -m pytest bench/test_bench_ragged.py --benchmark-json=out.json
    KVKERNELS_BENCH_SMOKE=1 python -m pytest bench -q               # tiny sizes anywhere
"""

import pytest

from bench import harness

harness.ensure_interpreter_without_gpu()  # before anything imports Triton


@pytest.fixture(scope="session")
def bench_env():
    """(device, copy bandwidth in bytes/s measured once for the session, smoke mode)."""
    device = harness.bench_device()
    return device, harness.copy_bandwidth_cached(str(device)), harness.smoke_mode()
