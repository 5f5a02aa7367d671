"""Attention functions that plug kvkernels into transformers' ``AttentionInterface``.

Two implementations are registered (names in :data:`RAGGED_ATTENTION` and :data:`KVZIP_CAPTURE_ATTENTION`):

* ``kvkernels_ragged`` decodes over a kvkernels cache: the ragged KV pool of a
  :class:`~kvkernels.hf.cache.RaggedPoolCache` (``ragged_attention``) or its KIVI-quantized form
  (:class:`~kvkernels.hf.kivi.QuantPoolCache`). The cache layer appends the new keys in ``update`` and
  hands itself to the attention call that follows (see :func:`hand_off`), which calls its ``attend``;
  transformers passes no cache to attention functions, and the modeling code calls ``update`` and then
  the attention function back to back, so a per-thread hand-off is exact and needs no extra kwargs
  (``model.generate(past_key_values=cache)`` works unchanged). It has no mask function on purpose:
  ``ragged_attention`` is bottom-right causal per segment by itself, and a dense mask would have the
  logical, not the physical, length. With no mask function registered, transformers' mask preparation
  returns ``None`` before it asks the cache anything (``_preprocess_mask_arguments``' early exit), so a
  decode step reads no length from the cache: under ``torch.compile`` nothing that grows per token is
  guarded on, and the step compiles once (see :mod:`kvkernels.hf.cache`). Padding masks are therefore
  not supported. A compiled step must also get ``position_ids`` (the pipeline always passes them):
  without them the model derives positions from ``get_seq_length()``, a host read of the pool lengths.
* ``kvkernels_kvzip_capture`` is plain SDPA attention that also feeds the post-RoPE queries and keys of
  each layer to the active :class:`ScoreCapture` (KVzip's reconstruction scoring). It is registered with
  SDPA's mask function: an attention function without a matching mask function silently gets no causal
  mask in transformers 5.x.

Switch a model between implementations with :func:`attention_implementation`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional, Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import kvkernels

RAGGED_ATTENTION = "kvkernels_ragged"
KVZIP_CAPTURE_ATTENTION = "kvkernels_kvzip_capture"

_local = threading.local()


class AttendingLayer(Protocol):
    """What a cache layer hands to the attention call that follows its ``update``."""

    layer_idx: int
    handoff_key: torch.Tensor  # the key tensor ``update`` returned (an identity check, never read)

    def attend(self, query: torch.Tensor, scaling: Optional[float]) -> torch.Tensor:
        """o [B, Hq, Lq, D] of query [B, Hq, Lq, D] over this layer's cache (own keys already appended)."""


def hand_off(layer: AttendingLayer) -> None:
    """Called by a cache layer at the end of ``update``; read by :func:`ragged_attention_forward`."""
    _local.handoff = layer


def ragged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                             dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function over a kvkernels cache layer; returns ([B, Lq, Hq, D], None)."""
    layer: Optional[AttendingLayer] = getattr(_local, "handoff", None)
    layer_idx = getattr(module, "layer_idx", None)
    # The identity checks catch a model run with this attention but another cache (or none): the keys
    # would then be dense tensors that no kvkernels layer describes.
    if layer is None or layer.handoff_key is not key or layer.layer_idx != layer_idx:
        raise RuntimeError(
            f"attention implementation {RAGGED_ATTENTION!r} needs past_key_values to be a kvkernels cache "
            f"(kvkernels.hf.RaggedPoolCache or QuantPoolCache); layer {layer_idx} got keys it does not hold")
    _local.handoff = None
    out = layer.attend(query.contiguous(), scaling)
    return out.transpose(1, 2).contiguous(), None


class ScoreCapture:
    """Accumulates KVzip scores of one reconstruction chunk, layer by layer, during a capture forward.

    ``scores`` is fp32 [L, B, Hkv, N] over the prefilled sequence (sink + context); this chunk writes
    columns ``chunk_start:chunk_end``. The attention keys of the capture forward are
    [cached N keys ; the reconstruction input's own keys], so the last Lq of them are ``k_self``.
    """

    def __init__(self, scores: torch.Tensor, sink_len: int):
        self.scores = scores
        self.sink_len = sink_len
        self.context_len = scores.shape[-1]
        self.chunk: Optional[tuple[int, int]] = None

    def check_keys(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> None:
        n = self.context_len
        if key.shape[2] != n + query.shape[2]:
            raise RuntimeError(f"KVzip capture: layer {layer_idx} sees {key.shape[2]} keys, expected the "
                               f"{n} prefilled ones plus {query.shape[2]} reconstruction tokens")

    def consume(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, sm_scale: float,
                row_lse: Optional[torch.Tensor] = None) -> None:
        """Score this chunk's keys in layer ``layer_idx`` (keys already checked by :meth:`check_keys`)."""
        start, end = self.chunk
        k_self = key[:, :, self.context_len:].contiguous()
        # The whole key tensor goes in as ``k``: the op only reads the sink and the chunk columns, and
        # passing it avoids copying the context keys per layer per chunk.
        self.scores[layer_idx, :, :, start:end] = kvkernels.kvzip_score(
            query.contiguous(), key.contiguous(), k_self, self.sink_len, start, end, sm_scale, row_lse)


def kvzip_capture_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                    value: torch.Tensor, attention_mask: Optional[torch.Tensor], **kwargs):
    """The layer's attention (exact hidden states) plus KVzip scoring of the active chunk for this layer.

    The reconstruction input sees every prefilled token and itself causally (batch 1, no padding: how
    :mod:`kvkernels.hf.scoring` runs it). On CPU, for a plain attention (no dropout, soft-capping or
    sliding window), that is computed by :func:`kvkernels.cpu.ragged_attention.context_then_causal_self`
    (a compiled kernel for fp32, else fused calls merged by log-sum-exp), faster than SDPA with the dense
    mask, which also gives ``kvzip_score`` its row LSE (``row_lse``), sparing it a pass;
    elsewhere SDPA with transformers' mask, and ``kvzip_score`` computes its own LSE. Scores and
    attention use the layer's own scaling.
    """
    capture: Optional[ScoreCapture] = getattr(_local, "capture", None)
    if capture is None:
        raise RuntimeError(f"attention implementation {KVZIP_CAPTURE_ATTENTION!r} runs only inside "
                           "kvkernels.hf.scoring (no active ScoreCapture)")
    capture.check_keys(module.layer_idx, query, key)
    scaling = kwargs.get("scaling")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if _plain_cpu_attention(module, query, kwargs):
        from kvkernels.cpu.ragged_attention import context_then_causal_self
        o, row_lse = context_then_causal_self(query, key, value, capture.context_len, scale,
                                              scored=(capture.sink_len, *capture.chunk))
        capture.consume(module.layer_idx, query, key, scale, row_lse)
        return o.transpose(1, 2).contiguous(), None
    capture.consume(module.layer_idx, query, key, scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _plain_cpu_attention(module: torch.nn.Module, query: torch.Tensor, kwargs) -> bool:
    return (query.device.type == "cpu" and not kwargs.get("dropout") and kwargs.get("softcap") is None
            and kwargs.get("sliding_window") is None and getattr(module, "is_causal", True))


@contextlib.contextmanager
def capturing_scores(capture: ScoreCapture) -> Iterator[ScoreCapture]:
    """Make ``capture`` the target of ``kvkernels_kvzip_capture`` in this thread."""
    previous = getattr(_local, "capture", None)
    _local.capture = capture
    try:
        yield capture
    finally:
        _local.capture = previous


def register_attention_functions() -> None:
    """Register both implementations (idempotent; done on import). Only the capture attention gets a mask
    function: registering one for the ragged attention, even a no-op, would make transformers ask the
    cache for its length on every forward (a new constant per token under torch.compile)."""
    AttentionInterface.register(RAGGED_ATTENTION, ragged_attention_forward)
    AttentionInterface.register(KVZIP_CAPTURE_ATTENTION, kvzip_capture_attention_forward)
    AttentionMaskInterface.register(KVZIP_CAPTURE_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Temporarily run ``model`` with attention implementation ``name`` (restored on exit)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


register_attention_functions()
