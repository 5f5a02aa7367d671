"""The one place that decides which implementation runs an op.

Backends, in the order a request falls back through them:

* ``reference`` - the pure-PyTorch references in ``kvkernels.reference``; run on any device.
* ``triton``    - the Triton kernels in ``kvkernels.triton``; need CUDA tensors, or CPU tensors with
                  ``TRITON_INTERPRET=1`` (the Triton interpreter, which is how CI runs them).
* ``cupy``      - CuPy RawKernels in ``kvkernels.cupy``; CUDA tensors only. Only some ops have one;
                  the others fall through to ``triton``.
* ``cpu``       - kernels for CPU tensors written for speed in ``kvkernels.cpu`` (the references stay
                  the oracle); ops without one fall through to ``reference``.
* ``auto``      - the default: ``triton`` for CUDA tensors when Triton is importable, ``cpu`` for CPU
                  tensors, else ``reference``.

Choose with the environment variable ``KVKERNELS_BACKEND`` (read at every call, so it can be set after
import) or, taking precedence, with the context manager :func:`use_backend`. A backend that was asked
for explicitly but cannot run the op on the given tensors is an error, never a silent fallback to a
slower path; only an op that a backend does not implement at all falls through (``cupy`` → ``triton``
→ ``reference``, ``cpu`` → ``reference``), and :func:`resolve` reports which one ran through :func:`last_choice` for tests.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from typing import Callable, Iterator

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cupy")

# The module (kernel family) of each op: kvkernels/reference/<module>.py, kvkernels/triton/<module>.py.
_FAMILY = {
    "kvzip_score": "kvzip_score",
    "topk_mask": "topk",
    "compact_kv": "pool",
    "ragged_append": "pool",
    "ragged_attention": "ragged_attention",
    "kivi_quantize": "kivi",
    "kivi_dequantize": "kivi",
    "kivi_attention": "kivi",
    "lowrank_residual": "lowrank",
    "quant_pool_build": "quant_pool",
    "quant_pool_append": "quant_pool",
    "quant_pool_attention": "quant_pool",
}
# The ops each compiled backend implements (op -> module under kvkernels.<backend>). An op missing from
# a backend's map falls through to the next backend (see _FALLBACK).
_KERNEL_MODULES: dict[str, dict[str, str]] = {
    "triton": dict(_FAMILY),
    "cupy": {"topk_mask": "topk"},
    "cpu": {
        "ragged_attention": "ragged_attention",
        "ragged_append": "pool",
        "kvzip_score": "kvzip_score",
        "kivi_attention": "kivi",
        "quant_pool_attention": "quant_pool",
        "quant_pool_append": "quant_pool",
    },
}
_FALLBACK = {"cupy": "triton", "triton": "reference", "cpu": "reference"}

_local = threading.local()


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; accepted: {', '.join(BACKENDS)}")
    return name


_ENV = "KVKERNELS_BACKEND"
try:  # the dict behind os.environ (bytes keys on POSIX, upper-case str on Windows); os.environ writes through it
    _ENVIRON_DATA, _ENV_KEY, _decode = os.environ._data, os.environ.encodekey(_ENV), os.environ.decodevalue
except AttributeError:  # an os.environ without CPython's internals
    _ENVIRON_DATA = None


def _env_backend() -> str:
    """``$KVKERNELS_BACKEND`` or "". Read at every op call, so not with ``os.environ.get``: that costs ~1.5 us
    when the variable is unset (a KeyError raised and caught inside), a twentieth of a small op call."""
    if _ENVIRON_DATA is None:
        return os.environ.get(_ENV, "")
    raw = _ENVIRON_DATA.get(_ENV_KEY)
    return "" if raw is None else _decode(raw)


def current_backend() -> str:
    """The backend requested now: the innermost :func:`use_backend`, else ``$KVKERNELS_BACKEND``, else auto."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = _env_backend()
    return _check_name(env, _ENV) if env else "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (overrides ``KVKERNELS_BACKEND``)."""
    name = _check_name(name, "use_backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def cupy_available() -> bool:
    return importlib.util.find_spec("cupy") is not None and torch.cuda.is_available()


def _can_run(backend: str, device_type: str) -> tuple[bool, str]:
    """Whether ``backend`` can run on tensors of ``device_type`` ("cpu", "cuda", ...), and if not, why."""
    if backend == "reference":
        return True, ""
    if backend == "triton":
        if not triton_available():
            return False, "Triton is not installed (pip install triton)"
        if device_type == "cuda" or (device_type == "cpu" and triton_interpreting()):
            return True, ""
        return False, f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; got {device_type}"
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the cpu backend runs on CPU tensors; got {device_type}"
        return True, ""
    if backend == "cupy":
        if device_type != "cuda":
            return False, f"CuPy kernels need CUDA tensors; got {device_type}"
        if not cupy_available():
            return False, "CuPy is not installed (pip install kvkernels[cupy])"
        return True, ""
    raise AssertionError(backend)


def _auto(device_type: str) -> str:
    if device_type == "cuda" and triton_available():
        return "triton"
    if device_type == "cpu":
        return "cpu"
    return "reference"


# (op, requested backend, device type) -> (backend that runs, kernel function). Only successful
# resolutions are cached, so a backend that cannot run is re-examined (and reported) at every call. The
# one input not in the key, TRITON_INTERPRET, matters only for Triton on CPU tensors, which re-checks it
# at every call. Dispatch thus costs one env read and a dict lookup per call (no importlib, no spec search).
_resolved: dict[tuple[str, str, str], tuple[str, Callable]] = {}


def _lookup(op: str, requested: str, device_type: str) -> tuple[str, Callable]:
    backend = _auto(device_type) if requested == "auto" else requested
    while backend != "reference" and op not in _KERNEL_MODULES[backend]:
        backend = _FALLBACK[backend]
    ok, why = _can_run(backend, device_type)
    if not ok:
        raise RuntimeError(f"kvkernels.{op}: backend {backend!r} (requested {requested!r}) cannot run here: {why}")
    if backend == "reference":
        module = importlib.import_module(f"kvkernels.reference.{_FAMILY[op]}")
    else:
        module = importlib.import_module(f"kvkernels.{backend}.{_KERNEL_MODULES[backend][op]}")
    return backend, getattr(module, op)


def resolve(op: str, device: torch.device) -> Callable:
    """The function that implements ``op`` for tensors on ``device`` under the current backend."""
    return resolve_for(op, device.type)


def device_type(t: torch.Tensor) -> str:
    """``t.device.type`` without building a ``torch.device`` (a third of a microsecond instead of one)."""
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


def resolve_for(op: str, device_type: str) -> Callable:
    """:func:`resolve` for a device type ("cpu", "cuda", "meta", ...): what every op call runs."""
    requested = current_backend()
    key = (op, requested, device_type)
    hit = _resolved.get(key)
    if hit is None or (hit[0] == "triton" and device_type == "cpu" and not triton_interpreting()):
        hit = _lookup(op, requested, device_type)  # raises if the interpreter was switched off since
        _resolved[key] = hit
    _local.last = (op, hit[0])
    return hit[1]


def clear_cache() -> None:
    """Forget resolved kernels (after changing ``_KERNEL_MODULES`` or installing a backend, e.g. in tests)."""
    _resolved.clear()


def last_choice() -> tuple[str, str] | None:
    """``(op, backend)`` of the last op resolved in this thread (for tests and debugging)."""
    return getattr(_local, "last", None)
