"""Timing shared by the autotuner and the benchmarks: CUDA events on a GPU, perf_counter on CPU.

Two rules from measuring memory-bound kernels:

* Rotate input buffers. H100's L2 holds 50 MB (H200: 60 MB); a compressed KV cache often fits, and
  re-reading one buffer would time the cache, not HBM. :func:`rotation_count` picks enough input sets
  that one pass over them is several times the L2.
* Time a pass over all buffers between two events and divide, rather than an event pair per call:
  back-to-back launches hide the event overhead, and the median over passes gives the spread.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

DEFAULT_L2_BYTES = 50 * 2**20  # H100; used when the device does not report its L2 size


@dataclass(frozen=True)
class Timing:
    """Per-call times in milliseconds over ``samples`` passes of ``calls_per_sample`` calls each."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    samples: int
    calls_per_sample: int

    @property
    def spread_ms(self) -> float:
        """Width of the 20-80 percentile band: the noise to compare differences against."""
        return self.p80_ms - self.p20_ms


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def l2_bytes(device: torch.device | str) -> int:
    if not is_cuda(device):
        return 0
    props = torch.cuda.get_device_properties(torch.device(device))
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotation_count(bytes_per_set: int, device: torch.device | str, *, minimum: int = 2, maximum: int = 32,
                   memory_budget: int = 8 * 2**30) -> int:
    """How many independent input sets to rotate through so that one pass over them exceeds 3x the L2.

    Capped by ``maximum`` and by ``memory_budget`` bytes in total; on CPU ``minimum`` sets suffice
    (the numbers there only check that the machinery runs).
    """
    if not is_cuda(device):
        return minimum
    need = math.ceil(3 * l2_bytes(device) / max(1, bytes_per_set))
    affordable = max(1, memory_budget // max(1, bytes_per_set))
    return int(max(minimum, min(need, maximum, affordable)))


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted list (q in [0, 1])."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(per_call_ms: list[float], calls_per_sample: int) -> Timing:
    values = sorted(per_call_ms)
    return Timing(
        median_ms=statistics.median(values),
        p20_ms=_percentile(values, 0.2),
        p80_ms=_percentile(values, 0.8),
        min_ms=values[0],
        samples=len(values),
        calls_per_sample=calls_per_sample,
    )


def _one_pass_ms(run: Callable[[int], Any], n_buffers: int, device: torch.device) -> float:
    """Wall time of one call on each of the ``n_buffers`` input sets, in ms (device time on CUDA)."""
    if is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(n_buffers):
            run(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    for i in range(n_buffers):
        run(i)
    return (time.perf_counter() - t0) * 1e3


def time_rotating(
    run: Callable[[int], Any],
    n_buffers: int,
    device: torch.device | str,
    *,
    warmup: int = 1,
    min_samples: int = 5,
    max_samples: int = 100,
    target_ms: float = 200.0,
) -> Timing:
    """Time ``run(i)``, i cycling over ``n_buffers`` input sets; per-call median and spread in ms.

    ``warmup`` passes run first (compilation, allocator, caches of launch metadata), then as many
    passes as fit in about ``target_ms`` (between ``min_samples`` and ``max_samples``). Pass
    ``warmup=0, min_samples=1, max_samples=1`` under the Triton interpreter, where one call is slow.
    """
    device = torch.device(device)
    n_buffers = max(1, int(n_buffers))
    for _ in range(warmup):
        for i in range(n_buffers):
            run(i)
    synchronize(device)
    first = _one_pass_ms(run, n_buffers, device)
    samples = [first / n_buffers]
    budget = max(min_samples, min(max_samples, int(target_ms / max(first, 1e-3))))
    for _ in range(budget - 1):
        samples.append(_one_pass_ms(run, n_buffers, device) / n_buffers)
    return summarize(samples, n_buffers)


def copy_bandwidth(device: torch.device | str, nbytes: Optional[int] = None) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written.

    The ceiling a memory-bound kernel is compared against, measured in the same run as the kernels
    (clocks and the card's state vary between machines and runs). 1 GiB on CUDA, far above any L2;
    64 MiB on CPU.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if is_cuda(device) else 64 * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_rotating(lambda i: dst.copy_(src), 1, device, warmup=2, min_samples=5, max_samples=20,
                           target_ms=100.0)
    del src, dst
    return 2 * nbytes / (timing.median_ms * 1e-3)
