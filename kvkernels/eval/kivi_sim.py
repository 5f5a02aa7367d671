"""KIVI applied to a transformers cache as quantize-dequantize, with KIVI's streaming flush rules and a
choice of ORDER between attending and flushing (the question the KIVI-2 diagnosis asks).

The numbers a KIVI cache attends with are dequantized codes for the flushed tokens and the exact
values for the full-precision tails, so a ``DynamicCache`` holding that image computes the attention
KIVI computes (in fp32, without the packed layout). What this module adds over a one-shot image of the
prefill is what happens while a question and its answer are appended:

* keys: a full-precision tail of at most R - 1 tokens; once R have accumulated they are quantized
  together (per channel, groups of G tokens); values: a sliding window of the R newest tokens, older
  ones quantized per token (groups of G channels). A prefill of T tokens starts with T - T % R keys and
  max(0, T - R) values quantized (its own attention ran unquantized).
* ``order="official"`` (KIVI's code): a step attends with its new tokens still in full precision and
  flushes afterwards (here: at the start of the next step, which is the same thing).
  ``order="flush_first"`` (our ``KiviCache``): the new tokens are appended and flushed, then attended,
  so a key-flush step attends to its own freshly quantized keys.

``key_bits`` / ``value_bits`` None keep that side exact (the keys-only / values-only diagnosis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from transformers import DynamicCache

import kvkernels

ORDERS = ("official", "flush_first")


@dataclass(frozen=True)
class KiviConfig:
    """One KIVI variant: bits per side (None = exact), group size G, residual R, attend/flush order."""

    key_bits: Optional[int] = 2
    value_bits: Optional[int] = 2
    group: int = 32
    residual: int = 128
    order: str = "official"

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.residual % self.group:
            raise ValueError(f"residual ({self.residual}) must be a multiple of group ({self.group})")

    @property
    def label(self) -> str:
        bits = (f"K{self.key_bits or 16}V{self.value_bits or 16}")
        return f"{bits} R{self.residual} G{self.group} {self.order}"


def fake_quant(x: torch.Tensor, bits: Optional[int], group: int, axis: str) -> torch.Tensor:
    """dequant(quant(x)) of x [B, H, t, D] along KIVI's ``axis`` ('key': per channel over t, 'value':
    per token over D); x itself when ``bits`` is None or there is nothing to quantize."""
    if bits is None or x.shape[2] == 0:
        return x
    codes, scale, zero = kvkernels.kivi_quantize(x.contiguous(), bits, group, axis)
    return kvkernels.kivi_dequantize(codes, scale, zero, bits, group, axis).to(x.dtype)


def prefill_image(k: torch.Tensor, v: torch.Tensor, cfg: KiviConfig):
    """(k_hat, v_hat, keys quantized, values quantized) of one layer after a prefill of T tokens."""
    T = k.shape[2]
    tk, tv = T - T % cfg.residual, max(0, T - cfg.residual)
    k_hat = torch.cat([fake_quant(k[:, :, :tk], cfg.key_bits, cfg.group, "key"), k[:, :, tk:]], dim=2)
    v_hat = torch.cat([fake_quant(v[:, :, :tv], cfg.value_bits, cfg.group, "value"), v[:, :, tv:]], dim=2)
    return k_hat, v_hat, tk, tv


class KiviSimCache(DynamicCache):
    """A ``DynamicCache`` that keeps KIVI's quantize-dequantize image under KIVI's streaming flush rules."""

    def __init__(self, config, kivi: KiviConfig, keys: List[torch.Tensor], values: List[torch.Tensor],
                 key_done: List[int], value_done: List[int]):
        super().__init__(config=config)
        self.kivi = kivi
        for layer, (k, v) in enumerate(zip(keys, values)):
            DynamicCache.update(self, k.clone(), v.clone(), layer)
        self.key_done, self.value_done = list(key_done), list(value_done)

    @classmethod
    def from_dense(cls, config, kivi: KiviConfig, keys, values) -> "KiviSimCache":
        images = [prefill_image(k, v, kivi) for k, v in zip(keys, values)]
        return cls(config, kivi, [i[0] for i in images], [i[1] for i in images], [i[2] for i in images],
                   [i[3] for i in images])

    def flush(self, layer_idx: int) -> None:
        """Quantize what KIVI's rules say is due in ``layer_idx`` (whole R-blocks of keys; values older than R)."""
        cfg, layer = self.kivi, self.layers[layer_idx]
        T = layer.keys.shape[2]
        while T - self.key_done[layer_idx] >= cfg.residual:
            a = self.key_done[layer_idx]
            layer.keys[:, :, a:a + cfg.residual] = fake_quant(layer.keys[:, :, a:a + cfg.residual], cfg.key_bits,
                                                              cfg.group, "key")
            self.key_done[layer_idx] = a + cfg.residual
        due = T - cfg.residual
        if due > self.value_done[layer_idx]:
            a = self.value_done[layer_idx]
            layer.values[:, :, a:due] = fake_quant(layer.values[:, :, a:due], cfg.value_bits, cfg.group, "value")
            self.value_done[layer_idx] = due

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.kivi.order == "official":
            self.flush(layer_idx)  # the previous step's tokens: attended in full precision, flushed now
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.flush(layer_idx)
        layer = self.layers[layer_idx]
        return layer.keys, layer.values


class KiviContext:
    """Answers questions like ``DenseContext`` over a KIVI image of its cache; each question starts from
    the same post-prefill image (flushes during one answer must not leak into the next question)."""

    def __init__(self, dense, kivi: KiviConfig):
        self.dense, self.kivi = dense, kivi
        keys, values = dense.layer_kv()
        images = [prefill_image(k, v, kivi) for k, v in zip(keys, values)]
        self._keys = [i[0] for i in images]
        self._values = [i[1] for i in images]
        self._key_done = [i[2] for i in images]
        self._value_done = [i[3] for i in images]

    def fresh_cache(self) -> KiviSimCache:
        return KiviSimCache(self.dense.model.config, self.kivi, self._keys, self._values, self._key_done,
                            self._value_done)

    def answer(self, question: str, max_new_tokens: int = 64, answer_prefix: str = ""):
        from kvkernels.hf import DenseContext
        d = self.dense
        ctx = DenseContext(d.model, d.tokenizer, d.prompt, d.input_ids, d.sink_len, self.fresh_cache())
        return ctx.answer(question, max_new_tokens, answer_prefix)


def kivi_bytes(T: int, D: int, cfg: KiviConfig) -> int:
    """Bytes of one (layer, head) KIVI cache of T tokens after prefill: packed codes, fp16 scale/zero, fp16 tails."""
    R, G = cfg.residual, cfg.group
    tk, tv = T - T % R, max(0, T - R)
    keys = tk * D * 2 if cfg.key_bits is None else tk * D * cfg.key_bits // 8 + 2 * 2 * (tk // G) * D
    values = tv * D * 2 if cfg.value_bits is None else tv * D * cfg.value_bits // 8 + 2 * 2 * tv * (D // G)
    return keys + (T - tk) * D * 2 + values + (T - tv) * D * 2
