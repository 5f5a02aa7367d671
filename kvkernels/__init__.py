"""kvkernels: kernels for KV-cache compression in LLM inference (KVzip, KIVI, GEAR-style low rank).

``import kvkernels`` imports neither Triton nor CuPy; those load when their backend is first chosen (see
:mod:`kvkernels._backend`). The ``torch.ops.kvkernels.*`` operators are registered when torch is
imported before kvkernels (``import torch`` then ``import kvkernels``, the usual order) or, otherwise,
on the first use of any name below (``kvkernels.compact_kv``, ``from kvkernels import Pool``, ...).
That keeps ``import kvkernels`` without torch cheap, so the ``kvkernels`` command answers ``--help``
and argument errors at once.
"""

import importlib as _importlib
import sys as _sys

__version__ = "0.1.0"

# Public name -> the submodule that defines it (imported together on first use; see _load).
_EXPORTS = {
    "current_backend": "._backend",
    "last_choice": "._backend",
    "use_backend": "._backend",
    "PoolOverflowError": "._validate",
    "Pool": ".api",
    "QuantPool": ".api",
    "check_overflow": ".api",
    "compact_kv": ".api",
    "deferred_overflow_checks": ".api",
    "kivi_attention": ".api",
    "kivi_dequantize": ".api",
    "kivi_quantize": ".api",
    "kvzip_score": ".api",
    "lowrank_residual": ".api",
    "quant_pool_append": ".api",
    "quant_pool_attention": ".api",
    "quant_pool_build": ".api",
    "quant_pool_from_kv": ".api",
    "quant_pool_rollback": ".api",
    "ragged_append": ".api",
    "ragged_attention": ".api",
    "topk_mask": ".api",
    "KiviCache": ".kivi_cache",
    "checking": "._checks",
    "checking_enabled": "._checks",
}

__all__ = sorted(_EXPORTS)


def _load() -> None:
    """Import every public name (this registers the ``torch.ops.kvkernels.*`` operators)."""
    for name, module in _EXPORTS.items():
        globals()[name] = getattr(_importlib.import_module(module, __name__), name)


def __getattr__(name: str):
    if name in _EXPORTS:
        _load()
        return globals()[name]
    if not name.startswith("__"):
        try:  # a submodule that nothing has imported yet (kvkernels.ops, kvkernels.hf, ...)
            return _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if "torch" in _sys.modules:
    _load()
