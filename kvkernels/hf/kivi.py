"""KIVI quantization on top of KVzip eviction: every (batch, KV head) segment of a compressed pool
becomes one :class:`kvkernels.kivi_cache.KiviCache` (2 or 4 bits, keys per channel, values per token,
a full-precision window of the most recent ``residual`` tokens).

Segments keep different numbers of rows after eviction, while a ``KiviCache`` holds one length for all
its heads, so each segment gets its own single-head cache and attention runs head by head
(``kivi_attention`` per KV head with its G query heads). Rollback after an answer restores each cache's
host-side counters and its small full-precision tail/window buffers: appends only ever write past the
counters, so this is exact without copying any quantized data.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvkernels.api import Pool

from .attention import hand_off

# KiviCache state that an append changes: host counters, and the buffers rewritten in place.
_KIVI_COUNTERS = ("num_quant_keys", "num_tail_keys", "num_quant_values", "window_start", "window_len",
                  "_k_basis_ready", "_v_basis_ready")
_KIVI_BUFFERS = ("k_tail", "v_window", "k_lr_w", "v_lr_w")


def _snapshot(cache) -> dict:
    state = {}
    for name in _KIVI_COUNTERS:
        if not hasattr(cache, name):
            raise RuntimeError(f"KiviCache has no attribute {name!r}: kvkernels.hf.kivi needs updating")
        state[name] = getattr(cache, name)
    for name in _KIVI_BUFFERS:
        if hasattr(cache, name):
            state[name] = getattr(cache, name).clone()
    return state


def _restore(cache, state: dict) -> None:
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            getattr(cache, name).copy_(value)
        else:
            setattr(cache, name, value)


class KiviPoolLayer(CacheLayerMixin):
    """One model layer: a single-head ``KiviCache`` per (batch, KV head) segment."""

    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "KiviPoolCache", layer_idx: int, heads: list[list]):
        super().__init__()
        self.owner, self.layer_idx, self.heads = owner, layer_idx, heads  # heads[b][h]: KiviCache
        self.appended = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        for b, row in enumerate(self.heads):
            for h, cache in enumerate(row):
                cache.append(key_states[b:b + 1, h:h + 1].contiguous(), value_states[b:b + 1, h:h + 1].contiguous())
        self.appended += key_states.shape[2]
        self.handoff_key = key_states
        hand_off(self)
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling=None) -> torch.Tensor:
        """Per (batch, KV head): ``kivi_attention`` of its G query heads over that head's cache."""
        G = query.shape[1] // len(self.heads[0])
        out = torch.empty_like(query)
        for b, row in enumerate(self.heads):
            for h, cache in enumerate(row):
                out[b:b + 1, h * G:(h + 1) * G] = cache.attend(query[b:b + 1, h * G:(h + 1) * G].contiguous(), scaling)
        return out

    def get_seq_length(self) -> int:
        return self.owner.checkpoint_len + self.appended

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class KiviPoolCache(Cache):
    """transformers cache of KIVI-quantized segments (built from a ragged pool), with rollback.

    Use with the ``kvkernels_ragged`` attention implementation, like :class:`RaggedPoolCache`.
    """

    def __init__(self, pool: Pool, logical_len: int, bits: int = 2, group_size: int = 32, residual: int = 128,
                 slack: int = 256):
        from kvkernels.kivi_cache import KiviCache

        self.checkpoint_len = int(logical_len)
        self.bits, self.group_size, self.residual, self.slack = bits, group_size, residual, slack
        L, B, H = pool.seg_start.shape
        D = pool.k_pool.shape[1]
        starts, lens = pool.seg_start.tolist(), pool.seg_len.tolist()
        layers = []
        for l in range(L):
            heads = []
            for b in range(B):
                row = []
                for h in range(H):
                    s, n = starts[l][b][h], lens[l][b][h]
                    cache = KiviCache(1, 1, D, n + slack, bits=bits, group_size=group_size, residual=residual,
                                      dtype=pool.k_pool.dtype, device=pool.k_pool.device)
                    if n:
                        cache.append(pool.k_pool[s:s + n].view(1, 1, n, D), pool.v_pool[s:s + n].view(1, 1, n, D))
                    row.append(cache)
                heads.append(row)
            layers.append(KiviPoolLayer(self, l, heads))
        super().__init__(layers=layers)
        self._batch = B
        self._saved = [[_snapshot(c) for row in layer.heads for c in row] for layer in self.layers]

    @property
    def batch_size(self) -> int:
        return self._batch

    def _caches(self):
        for layer in self.layers:
            for row in layer.heads:
                yield from row

    def rollback(self) -> None:
        """Forget every token appended since construction (counters and full-precision tails restored)."""
        for layer, saved in zip(self.layers, self._saved):
            for cache, state in zip((c for row in layer.heads for c in row), saved):
                _restore(cache, state)
            layer.appended = 0

    def free_rows(self) -> int:
        return min(c.max_tokens - c.seq_len for c in self._caches())

    def reserve(self, tokens: int) -> None:
        """KIVI buffers are preallocated at construction (``slack``): raise if ``tokens`` do not fit."""
        if self.free_rows() < tokens:
            raise ValueError(f"the KIVI cache has room for {self.free_rows()} more tokens, {tokens} needed: "
                             "build it with a larger slack")

    def nbytes(self, include_slack: bool = True) -> int:
        """Bytes held: all preallocated buffers, or only the live codes/scales/zeros/tails."""
        if not include_slack:
            return sum(c.nbytes() for c in self._caches())
        return sum(t.numel() * t.element_size() for c in self._caches() for t in vars(c).values()
                   if isinstance(t, torch.Tensor))
