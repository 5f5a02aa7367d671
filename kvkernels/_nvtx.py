"""NVTX ranges for profilers (Nsight Systems / Nsight Compute), free when nothing is listening.

``with _nvtx.range("kvzip_score"):`` marks a named range on the CPU timeline; nsys shows it above
the kernels it launched, and ``ncu --nvtx --nvtx-include`` can filter kernels by it. Sources, in order:

1. the ``nvtx`` package (``pip install nvtx``): push/pop with a per-library domain;
2. ``torch.cuda.nvtx`` when CUDA is available (it ships with every CUDA build of torch);
3. otherwise a no-op (CPU, CI, or ``KVKERNELS_NVTX=0``).

The source is chosen once, at first use, so the per-call cost is one push and one pop (about a
microsecond each), or a bare generator when disabled. Ranges carry no tensors and never synchronize,
so they are safe under CUDA graph capture; inside ``torch.compile`` they only appear around
custom ops (which Inductor does not trace into).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Tuple

DOMAIN = "kvkernels"

# (push, pop) once resolved; None until the first range is opened.
_impl: Optional[Tuple[Callable[[str], None], Callable[[], None]]] = None
_source = "unresolved"


def _noop_push(name: str) -> None:
    pass


def _noop_pop() -> None:
    pass


def _from_nvtx_package():
    import nvtx  # optional dependency

    # Without a profiler attached, get_domain returns a dummy domain whose calls do nothing.
    domain = nvtx.get_domain(DOMAIN)

    def push(name: str) -> None:
        domain.push_range(message=name)

    def pop() -> None:
        domain.pop_range()

    return push, pop


def _from_torch():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA")

    def push(name: str) -> None:
        torch.cuda.nvtx.range_push(f"{DOMAIN}:{name}")

    def pop() -> None:
        torch.cuda.nvtx.range_pop()

    return push, pop


def _resolve() -> Tuple[Callable[[str], None], Callable[[], None]]:
    global _impl, _source
    if os.environ.get("KVKERNELS_NVTX", "1") in ("0", "", "false", "off"):
        _impl, _source = (_noop_push, _noop_pop), "disabled"
        return _impl
    for source, factory in (("nvtx", _from_nvtx_package), ("torch.cuda.nvtx", _from_torch)):
        try:
            _impl, _source = factory(), source
            return _impl
        except Exception:  # missing package, no CUDA, or an nvtx build without domains
            continue
    _impl, _source = (_noop_push, _noop_pop), "none"
    return _impl


def source() -> str:
    """Which NVTX source ranges go to: 'nvtx', 'torch.cuda.nvtx', 'none' or 'disabled'."""
    if _impl is None:
        _resolve()
    return _source


def enabled() -> bool:
    return source() in ("nvtx", "torch.cuda.nvtx")


def reset() -> None:
    """Choose the source again at the next range (after setting KVKERNELS_NVTX, in tests)."""
    global _impl, _source
    _impl, _source = None, "unresolved"


_NULL = contextlib.nullcontext()  # reusable: a disabled range costs one function call


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        _impl[0](self.name)

    def __exit__(self, *exc) -> bool:
        _impl[1]()
        return False  # exceptions propagate


def range(name: str):  # noqa: A001 - mirrors nvtx's own naming
    """Context manager marking ``name`` (an op, or a pipeline phase: score, select, compact, append,
    attend) for profilers; a shared no-op context when no NVTX source is active."""
    if _impl is None:
        _resolve()
    if _impl[0] is _noop_push:
        return _NULL
    return _Range(name)
