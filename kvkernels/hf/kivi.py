"""KIVI quantization on top of KVzip eviction: the compressed ragged pool becomes one
:class:`kvkernels.QuantPool` (2 or 4 bits; keys per channel, values per token, in KIVI groups; each
(layer, batch, KV head) segment keeps its newest ``residual`` .. ``residual + group_size - 1`` rows in a
full-precision tail).

One op call per layer and step: ``quant_pool_append`` writes the step's rows into every segment of the
layer (flushing the groups earlier steps completed), ``quant_pool_attention`` attends over all of them.
Rollback after an answer restores three small length tables: appends never overwrite the build state.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import kvkernels
from kvkernels.api import Pool, QuantPool

from .attention import hand_off
from .cache import PoolLayerLengths


class QuantPoolLayer(PoolLayerLengths, CacheLayerMixin):
    """One model layer's view of a shared :class:`kvkernels.QuantPool`."""

    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "QuantPoolCache", layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # the pool exists before the first update

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append in place (one op call for all segments), hand the layer to the attention call."""
        kvkernels.quant_pool_append(self.owner.pool, self.layer_idx, key_states.contiguous(),
                                    value_states.contiguous(), flush_after=self.owner.flush_after)
        self.handoff_key = key_states
        hand_off(self)
        return key_states, value_states

    def appended_tokens(self) -> int:
        """Tokens appended since the build checkpoint, from the length tensors (one host read; see
        :class:`~kvkernels.hf.cache.PoolLayerLengths`)."""
        layer = self.layer_idx
        saved_seg_len = self.owner._saved[2]
        return int(self.owner.pool.seg_len[layer].reshape(-1)[0] - saved_seg_len[layer].reshape(-1)[0])

    def attend(self, query: torch.Tensor, scaling=None) -> torch.Tensor:
        """``quant_pool_attention`` of query [B, Hq, Lq, D] over this layer's segments (one op call)."""
        return kvkernels.quant_pool_attention(query, self.owner.pool, self.layer_idx, sm_scale=scaling)


class QuantPoolCache(Cache):
    """transformers cache over a KIVI-quantized ragged pool of all layers, with rollback to the build state.

    Built from a ragged fp pool (``compact_kv``'s, at its checkpoint lengths) in one call; ``slack`` rows
    per segment are reserved for question + answer tokens. ``flush_after`` selects the flush order (see
    :func:`kvkernels.quant_pool_append`; the default is KIVI's: new rows are attended in full precision).
    Use with the ``kvkernels_ragged`` attention implementation, like :class:`RaggedPoolCache`.
    """

    def __init__(self, pool: Pool, logical_len: int, bits: int = 2, group_size: int = 32, residual: int = 128,
                 slack: int = 256, flush_after: bool = False):
        self.checkpoint_len = int(logical_len)
        self.flush_after = flush_after
        self.pool: QuantPool = kvkernels.quant_pool_build(pool.k_pool, pool.v_pool, pool.seg_start, pool.seg_len,
                                                          bits, group_size, residual, slack)
        self._saved = [t.clone() for t in self.pool.lengths()]
        super().__init__(layers=[QuantPoolLayer(self, layer) for layer in range(pool.seg_start.shape[0])])

    # Per-token state lives only in the pool's length tensors, so a decode step compiles once.
    compiles_once = True

    @property
    def batch_size(self) -> int:
        return self.pool.seg_len.shape[1]

    def static_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor a decode step reads or writes in place (fixed addresses for CUDA graphs)."""
        return tuple(self.pool)

    def rollback(self) -> None:
        """Forget every token appended since construction (restores q_len, t_head and seg_len; no data copy)."""
        kvkernels.quant_pool_rollback(self.pool, self._saved)

    def free_rows(self) -> int:
        return int((self.pool.seg_cap - self.pool.seg_len).min())

    def reserve(self, tokens: int) -> None:
        """The buffers are sized at construction (``slack``): raise if ``tokens`` more do not fit."""
        if self.free_rows() < tokens:
            raise ValueError(f"the KIVI pool has room for {self.free_rows()} more tokens, {tokens} needed: "
                             "quantize with a larger slack")

    def nbytes(self, include_slack: bool = True) -> int:
        """Bytes of codes, scales, zeros and tails: all allocated, or only the live rows."""
        return self.pool.nbytes(include_slack)
