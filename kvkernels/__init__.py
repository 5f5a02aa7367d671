"""kvkernels: kernels for KV-cache compression in LLM inference (KVzip, KIVI, GEAR-style low rank).

``import kvkernels`` registers the ``torch.ops.kvkernels.*`` operators and imports neither Triton nor
CuPy; those load when their backend is first chosen (see :mod:`kvkernels._backend`).
"""

from ._backend import current_backend, last_choice, use_backend
from ._validate import PoolOverflowError
from .api import (
    Pool,
    QuantPool,
    check_overflow,
    compact_kv,
    deferred_overflow_checks,
    kivi_attention,
    kivi_dequantize,
    kivi_quantize,
    kvzip_score,
    lowrank_residual,
    ragged_append,
    quant_pool_append,
    quant_pool_attention,
    quant_pool_build,
    quant_pool_from_kv,
    quant_pool_rollback,
    ragged_attention,
    topk_mask,
)
from .kivi_cache import KiviCache

__version__ = "0.1.0"

__all__ = [
    "KiviCache",
    "Pool",
    "PoolOverflowError",
    "QuantPool",
    "check_overflow",
    "compact_kv",
    "deferred_overflow_checks",
    "current_backend",
    "kivi_attention",
    "kivi_dequantize",
    "kivi_quantize",
    "kvzip_score",
    "last_choice",
    "lowrank_residual",
    "quant_pool_append",
    "quant_pool_attention",
    "quant_pool_build",
    "quant_pool_from_kv",
    "quant_pool_rollback",
    "ragged_append",
    "ragged_attention",
    "topk_mask",
    "use_backend",
]
