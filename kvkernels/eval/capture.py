"""Attention capture for the query-aware baselines (H2O, SnapKV) on a transformers model.

``kvkernels.hf`` captures queries only for KVzip's reconstruction pass, so this module registers its
own attention implementation, ``kvkernels_eval_capture``: plain SDPA (hidden states are exact) that
also hands each layer's post-RoPE queries, (unrepeated) keys and values to the active capture, which turns
them into per-(layer, KV head, token) scores with the pure-PyTorch scorers of
``kvkernels.reference.baselines``. It is registered with SDPA's mask function, since an attention
function without one silently gets no causal mask in transformers 5.x.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvkernels.hf.attention import attention_implementation
from kvkernels.reference.baselines import h2o_scores, snapkv_scores

EVAL_CAPTURE_ATTENTION = "kvkernels_eval_capture"
_local = threading.local()


class H2OCapture:
    """Accumulates H2O scores [L, B, Hkv, N] over the blocks of a prefill (each block adds its queries' votes)."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, num_tokens: int, device):
        self.scores = torch.zeros(num_layers, batch, num_kv_heads, num_tokens, dtype=torch.float32, device=device)

    def consume(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scale: float, value=None) -> None:
        nk = key.shape[2]
        self.scores[layer_idx, :, :, :nk] += h2o_scores(query, key, scale)


class SnapKVCapture:
    """SnapKV scores [L, B, Hkv, N] of the N cached tokens from one observation window's forward."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, num_tokens: int, device,
                 kernel_size: int = 7):
        self.num_tokens = num_tokens
        self.kernel_size = kernel_size
        self.scores = torch.zeros(num_layers, batch, num_kv_heads, num_tokens, dtype=torch.float32, device=device)

    def consume(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scale: float, value=None) -> None:
        self.scores[layer_idx] = snapkv_scores(query, key, scale, self.num_tokens, self.kernel_size)


def _capture_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Optional[torch.Tensor], **kwargs):
    capture = getattr(_local, "capture", None)
    if capture is None:
        raise RuntimeError(f"attention implementation {EVAL_CAPTURE_ATTENTION!r} runs only inside capturing()")
    scale = kwargs.get("scaling")
    capture.consume(module.layer_idx, query, key, float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1]),
                    value=value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(EVAL_CAPTURE_ATTENTION, _capture_attention_forward)
AttentionMaskInterface.register(EVAL_CAPTURE_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def capturing(model: torch.nn.Module, capture) -> Iterator[None]:
    """Run ``model`` with the capture attention feeding ``capture`` (restores the previous state on exit)."""
    previous = getattr(_local, "capture", None)
    _local.capture = capture
    try:
        with attention_implementation(model, EVAL_CAPTURE_ATTENTION):
            yield
    finally:
        _local.capture = previous
