"""A transformers ``Cache`` whose layers live in one kvkernels ragged pool (after KVzip eviction).

Every (layer, batch, KV head) keeps its own number of context rows, so the physical lengths differ per
head; transformers only sees the *logical* length (prefilled tokens + tokens appended since), which
is what ``get_seq_length`` returns and what RoPE positions follow. New keys go in with
``ragged_append`` (in place, into per-segment slack); attention runs with ``ragged_attention`` through
the ``kvkernels_ragged`` attention implementation (see :mod:`kvkernels.hf.attention`).

Its layer's ``update`` returns the pool tensors and hands the layer to the ``kvkernels_ragged``
attention call that follows, which calls :meth:`RaggedPoolLayer.attend`.

Use::

    cache = RaggedPoolCache(pool, logical_len=n_prefilled)
    with attention_implementation(model, RAGGED_ATTENTION):
        model(input_ids=question_ids, past_key_values=cache)      # positions follow the logical length
    cache.rollback()                                              # back to the compressed context
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import kvkernels
from kvkernels.api import Pool

from .attention import hand_off


class PoolLayerLengths:
    """The length queries transformers asks of a pool layer (shared by the fp and the quantized pool layers).

    The logical length is the checkpoint's (``owner.checkpoint_len``) plus the tokens this layer appended
    since (:meth:`appended_tokens`, derived from the pool's length tensors by each layer class: a Python
    counter bumped per token would be a new constant for torch.compile every step); there is no maximum
    length.
    """

    def appended_tokens(self) -> int:
        raise NotImplementedError

    def get_seq_length(self) -> int:
        """Logical length: the tokens the context was compressed from + tokens appended since."""
        return self.owner.checkpoint_len + self.appended_tokens()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class RaggedPoolLayer(PoolLayerLengths, CacheLayerMixin):
    """One model layer's view of a shared :class:`kvkernels.Pool` (segments ``pool.seg_*[layer_idx]``)."""

    is_sliding = False
    is_croppable = True

    def __init__(self, owner: "RaggedPoolCache", layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.is_initialized = True

    @property
    def pool(self) -> Pool:
        return self.owner.pool

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the pool exists before the first update

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append in place, hand the segment table to the attention call, return the pool tensors."""
        pool = self.pool
        # Per-token state lives in pool.seg_len only: no Python attribute changes here, so torch.compile
        # has nothing to guard on that grows with the answer (see appended_tokens).
        kvkernels.ragged_append(pool, self.layer_idx, key_states.contiguous(), value_states.contiguous())
        self.handoff_key = pool.k_pool
        hand_off(self)
        return pool.k_pool, pool.v_pool

    def attend(self, query: torch.Tensor, scaling=None) -> torch.Tensor:
        """``ragged_attention`` of query [B, Hq, Lq, D] over this layer's segments (bottom-right causal)."""
        pool, layer = self.pool, self.layer_idx
        return kvkernels.ragged_attention(query, pool.k_pool, pool.v_pool, pool.seg_start[layer], pool.seg_len[layer],
                                          sm_scale=scaling)

    def appended_tokens(self) -> int:
        """Tokens appended since the checkpoint (same count in every segment of the layer).

        Derived from the tensors (live length minus the checkpoint's, first segment), not kept in a Python
        counter: a counter bumped in ``update`` would be a new constant for torch.compile on every token.
        One host read; transformers calls it only outside the decode step (``generate`` once per call; the
        mask preparation never, see :mod:`kvkernels.hf.attention`).
        """
        layer = self.layer_idx
        live = self.pool.seg_len[layer].reshape(-1)[0]
        return int(live - self.owner._saved_seg_len[layer].reshape(-1)[0])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` appended tokens (never the compressed context)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        n, appended = -tokens_to_remove, self.appended_tokens()
        if n > appended:
            raise ValueError(f"cannot crop {n} tokens: only {appended} were appended since the checkpoint")
        self.pool.seg_len[self.layer_idx] -= n

    def reset(self) -> None:
        raise NotImplementedError("a RaggedPoolCache cannot be reset; use rollback() to return to the checkpoint")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by RaggedPoolCache")


class RaggedPoolCache(Cache):
    """transformers cache over a ragged pool of all layers, with checkpoint/rollback.

    ``logical_len`` is the number of tokens the pool's rows were compressed from (RoPE positions of new
    tokens continue from it). :meth:`rollback` restores every ``seg_len`` to the checkpoint taken at
    construction (or by :meth:`checkpoint`), dropping questions and answers appended since.
    """

    # Its decode step compiles once (CompressedContext.compile checks this): nothing Python-visible changes
    # per token or on rollback; appends and rollbacks only write pool.seg_len.
    compiles_once = True

    def __init__(self, pool: Pool, logical_len: int):
        self.pool = pool
        self.checkpoint_len = int(logical_len)
        self._saved_seg_len = pool.seg_len.clone()
        num_layers = pool.seg_start.shape[0]
        super().__init__(layers=[RaggedPoolLayer(self, layer) for layer in range(num_layers)])

    @property
    def batch_size(self) -> int:
        return self.pool.seg_start.shape[1]

    def static_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor a decode step reads or writes in place: the compiled path on CUDA marks them as fixed
        addresses for CUDA graphs (valid until :meth:`reserve` re-lays out the pool)."""
        return tuple(self.pool)

    def checkpoint(self) -> None:
        """Make the current contents the state :meth:`rollback` returns to."""
        self.checkpoint_len = self.layers[0].get_seq_length()
        self._saved_seg_len = self.pool.seg_len.clone()

    def rollback(self) -> None:
        """Forget every token appended since the checkpoint (a length reset: no copy, no reallocation)."""
        self.pool.seg_len.copy_(self._saved_seg_len)

    def free_rows(self) -> int:
        """The fewest free slack rows over all segments: how many tokens can still be appended."""
        return int((self.pool.seg_cap - self.pool.seg_len).min())

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` more appended tokens in every segment, re-laying out the pool if needed.

        Rarely needed (``compress`` sizes the slack for the expected question + answer); it copies the
        live rows into a new pool with per-segment capacity ``seg_len + tokens``.
        """
        if self.free_rows() >= tokens:
            return
        pool = self.pool
        seg_len = pool.seg_len
        seg_cap = (seg_len + tokens).to(torch.int32)
        ends = torch.cumsum(seg_cap.flatten().long(), 0)
        seg_start = (ends - seg_cap.flatten().long()).view(seg_len.shape)
        total = int(ends[-1]) if ends.numel() else 0
        # Row r of segment s moves from old_start[s] + r to new_start[s] + r, for r < seg_len[s].
        lens = seg_len.flatten().long()
        seg_of_row = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
        rank = torch.arange(seg_of_row.numel(), device=lens.device) - torch.repeat_interleave(
            torch.cumsum(lens, 0) - lens, lens)
        src = pool.seg_start.flatten()[seg_of_row] + rank
        dst = seg_start.flatten()[seg_of_row] + rank
        k_pool = pool.k_pool.new_zeros(total, pool.k_pool.shape[1])
        v_pool = pool.v_pool.new_zeros(total, pool.v_pool.shape[1])
        k_pool[dst] = pool.k_pool[src]
        v_pool[dst] = pool.v_pool[src]
        # The checkpoint's lengths stay valid: rows keep their order inside each segment.
        self.pool = Pool(k_pool, v_pool, seg_start, seg_len.clone(), seg_cap)

    def nbytes(self, include_slack: bool = True) -> int:
        """Bytes of K and V held: the whole pool, or only its live rows (``include_slack=False``)."""
        k, v = self.pool.k_pool, self.pool.v_pool
        if include_slack:
            return k.numel() * k.element_size() + v.numel() * v.element_size()
        rows = int(self.pool.seg_len.sum())
        return rows * (k.shape[1] * k.element_size() + v.shape[1] * v.element_size())

    def metadata_nbytes(self) -> int:
        """Bytes of the segment table (seg_start, seg_len, seg_cap)."""
        return sum(t.numel() * t.element_size() for t in (self.pool.seg_start, self.pool.seg_len, self.pool.seg_cap))
