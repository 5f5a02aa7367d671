"""pytest plugin: run only the tests that CPU CI skips for want of a GPU (``-p bench.gpu_only``).

CI (no GPU) already runs every kernel against its reference under the Triton interpreter. What only a GPU
can check are the tests guarded by a ``skipif`` whose reason names CUDA or a GPU (bf16, compiled Triton,
CUDA graphs, every tuning candidate compiled, large rows, CuPy). This plugin keeps exactly those, so
``bench/gpu_report.sh --tier 1`` spends its minutes on what CI cannot see.
"""

from __future__ import annotations

import re

_GPU_REASON = re.compile(r"\b(CUDA|GPU|CuPy|cupy)\b")


def _needs_gpu(item) -> bool:
    for mark in item.iter_markers(name="skipif"):
        if _GPU_REASON.search(str(mark.kwargs.get("reason", ""))):
            return True
    return "cupy" in item.name.lower() or "cuda" in item.name.lower()


def pytest_collection_modifyitems(config, items):
    keep = [it for it in items if _needs_gpu(it)]
    drop = [it for it in items if not _needs_gpu(it)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
