"""A KIVI quantized KV cache for one attention layer, with an optional GEAR-style low-rank residual.

Layout and flush rules (KIVI, arXiv 2402.02750; see shared notes):

* Keys are quantized per channel, so a key group needs ``group_size`` consecutive tokens. Keys stay in a
  full-precision tail until ``residual`` (R, a multiple of the group size) have accumulated; then all R are
  quantized at once and the tail empties. After every append the key tail holds 0 .. R-1 tokens; a prefill
  of T tokens quantizes T - T % R keys.
* Values are quantized per token. They keep a sliding full-precision window of the R most recent tokens;
  once it holds R, each new token pushes the oldest one into codes. A prefill of T tokens quantizes
  max(0, T - R) values.

Memory: every buffer is preallocated for ``max_tokens`` and written in place. Flushing keys writes R/F rows
of int32 words (F = 32 // bits) and R/group_size rows of scale/zero into the next free slot; flushing a
value writes one row. Nothing that is already quantized is ever copied again. The value window lives in a
2R-row buffer used as a sliding region: the live window is ``win[start : start + len]`` and moves back to the
front (an R-row copy) only when it reaches the end, so a decode step costs O(1) amortized copies.
``attend`` hands strided views of the live parts to ``kvkernels.kivi_attention`` (no gather, no concat).

Low rank (``lowrank_rank = r > 0``): GEAR adds U.Wᵀ ≈ X - dequant(quant(X)). The op ``kivi_attention`` takes
one W [B, Hkv, D, r] per (batch, head) for all quantized tokens, so this cache uses a *shared right basis*:
at the first key flush it fits the basis on that block's quantization error with ``lowrank_residual``
(subspace iteration) and orthonormalises it (W = orth(W_fit)); every flushed block then stores
U = err.W, the projection of its own error onto that basis (never worse than no correction, since
||e - e W Wᵀ|| <= ||e||). Values do the same with the basis fitted at their first flush on the error of
the flushed rows plus the current window (per-token quantization makes the window's error known already,
so even a one-token flush fits on >= R rows). This differs from GEAR's per-block factors, which the op's
single-W contract cannot express; the cost is r values per token plus one D x r matrix per head.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

import kvkernels
from kvkernels import _backend


def _quantize_with_error(x: torch.Tensor, bits: int, group_size: int, axis: str):
    """(codes, scale, zero, err = x - dequant(quant(x)) in x.dtype) on the backend selected for x.

    On the Triton backend this is one fused pass (``quantization_error``); elsewhere quantize, dequantize
    and subtract with the selected backend's ops.
    """
    fn = _backend.resolve("kivi_quantize", x.device)
    if fn.__module__ == "kvkernels.triton.kivi":
        from kvkernels.triton.kivi import quantization_error

        return quantization_error(x, bits, group_size, axis)
    codes, scale, zero = kvkernels.kivi_quantize(x, bits, group_size, axis)
    deq = kvkernels.kivi_dequantize(codes, scale, zero, bits, group_size, axis)
    return codes, scale, zero, (x.float() - deq.float()).to(x.dtype)


class KiviCache:
    """KIVI 2/4-bit cache of one layer: packed keys/values + full-precision tails, in preallocated buffers.

    Args:
        batch, num_kv_heads, head_dim: the shapes of the k, v passed to :meth:`append` ([B, Hkv, t, D]).
        max_tokens: capacity in tokens (appends beyond it raise ``ValueError``).
        bits: 2 or 4. group_size: 32, 64 or 128 (keys: tokens per group; values: channels per group;
            head_dim must be a multiple). residual: R, the full-precision window, a positive multiple of
            group_size (KIVI default 128).
        lowrank_rank: r > 0 adds the GEAR-style low-rank residual (see the module docstring);
            lowrank_iters: subspace iterations of its fit.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, max_tokens: int, bits: int = 2,
                 group_size: int = 32, residual: int = 128, dtype: torch.dtype = torch.float16,
                 device="cpu", lowrank_rank: int = 0, lowrank_iters: int = 3):
        self._check_config(head_dim, max_tokens, bits, group_size, residual, lowrank_rank, lowrank_iters)
        B, H, D, R = batch, num_kv_heads, head_dim, residual
        F = 32 // bits
        self.batch, self.num_kv_heads, self.head_dim = B, H, D
        self.max_tokens, self.bits, self.group_size, self.residual = max_tokens, bits, group_size, R
        self.dtype, self.device = dtype, torch.device(device)
        self.rank, self.lowrank_iters = lowrank_rank, lowrank_iters

        # Keys are quantized R at a time, so at most floor(max_tokens / R) * R of them; values at most
        # max_tokens - R (the window always keeps min(T, R) tokens).
        self.key_capacity = (max_tokens // R) * R
        self.value_capacity = max(0, max_tokens - R)
        kcap, vcap = self.key_capacity, self.value_capacity
        new = dict(device=self.device)
        self.k_codes = torch.zeros(B, H, kcap // F, D, dtype=torch.int32, **new)
        self.k_scale = torch.zeros(B, H, kcap // group_size, D, dtype=dtype, **new)
        self.k_zero = torch.zeros_like(self.k_scale)
        self.v_codes = torch.zeros(B, H, vcap, D // F, dtype=torch.int32, **new)
        self.v_scale = torch.zeros(B, H, vcap, D // group_size, dtype=dtype, **new)
        self.v_zero = torch.zeros_like(self.v_scale)
        self.k_tail = torch.zeros(B, H, R, D, dtype=dtype, **new)
        self.v_window = torch.zeros(B, H, 2 * R, D, dtype=dtype, **new)
        # The device the buffers actually live on: torch.device("cuda") != torch.device("cuda:0"), so
        # comparing an append's tensors against the *requested* device would reject every tensor of a
        # cache built with device="cuda" (tensors always report an index).
        self.device = self.k_tail.device
        if lowrank_rank:
            self.k_lr_u = torch.zeros(B, H, kcap, lowrank_rank, dtype=dtype, **new)
            self.k_lr_w = torch.zeros(B, H, D, lowrank_rank, dtype=dtype, **new)
            self.v_lr_u = torch.zeros(B, H, vcap, lowrank_rank, dtype=dtype, **new)
            self.v_lr_w = torch.zeros(B, H, D, lowrank_rank, dtype=dtype, **new)
        self._k_basis_ready = self._v_basis_ready = False

        # Host-side lengths: the cache's own bookkeeping, never read from the device.
        self.num_quant_keys = 0     # keys in codes (a multiple of R)
        self.num_tail_keys = 0      # keys in k_tail (0 .. R-1 after every append)
        self.num_quant_values = 0   # values in codes
        self.window_start = 0       # the value window is v_window[:, :, start : start + len]
        self.window_len = 0

    @staticmethod
    def _check_config(head_dim, max_tokens, bits, group_size, residual, rank, iters):
        if bits not in (2, 4):
            raise ValueError(f"KiviCache: bits = {bits}; accepted: 2, 4")
        if group_size not in (32, 64, 128):
            raise ValueError(f"KiviCache: group_size = {group_size}; accepted: 32, 64, 128")
        if head_dim % group_size:
            raise ValueError(f"KiviCache: head_dim = {head_dim} must be a multiple of group_size = {group_size} "
                             f"(values are grouped along channels)")
        if residual <= 0 or residual % group_size:
            raise ValueError(f"KiviCache: residual = {residual} must be a positive multiple of group_size = "
                             f"{group_size} (keys are flushed in whole groups)")
        if max_tokens < 0:
            raise ValueError(f"KiviCache: max_tokens = {max_tokens} must be >= 0")
        if not 0 <= rank <= min(group_size, head_dim):
            raise ValueError(f"KiviCache: lowrank_rank = {rank} must be in [0, min(group_size, head_dim)] = "
                             f"[0, {min(group_size, head_dim)}]")
        if iters < 1:
            raise ValueError(f"KiviCache: lowrank_iters = {iters} must be >= 1")

    # -------------------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        """Tokens held (quantized + full precision); keys and values always cover the same tokens."""
        return self.num_quant_keys + self.num_tail_keys

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [B, Hkv, t, D] (t >= 1: a prefill or decode steps) and apply KIVI's flush rules."""
        self._check_append(k, v)
        self._append_keys(k)
        self._append_values(v)

    def _check_append(self, k, v):
        want = (self.batch, self.num_kv_heads, k.shape[2] if k.dim() == 4 else -1, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if x.dim() != 4 or tuple(x.shape) != want:
                raise ValueError(f"KiviCache.append: {name} must have shape [B, Hkv, t, D] = {want}, "
                                 f"got {tuple(x.shape)}")
            if x.dtype != self.dtype or x.device != self.device:
                raise TypeError(f"KiviCache.append: {name} must be {self.dtype} on {self.device}, "
                                f"got {x.dtype} on {x.device}")
        if v.shape != k.shape:
            raise ValueError(f"KiviCache.append: k and v differ in shape: {tuple(k.shape)} vs {tuple(v.shape)}")
        if self.seq_len + k.shape[2] > self.max_tokens:
            raise ValueError(f"KiviCache.append: {self.seq_len} + {k.shape[2]} tokens exceed max_tokens = "
                             f"{self.max_tokens}")

    def _append_keys(self, k: torch.Tensor) -> None:
        R, t, held = self.residual, k.shape[2], self.num_tail_keys
        flush = (held + t) // R * R  # whole R-blocks of [tail; new] move to codes
        if flush == 0:
            self.k_tail[:, :, held:held + t] = k
            self.num_tail_keys = held + t
            return
        # Only the flushed blocks are gathered (O(flushed) copy); already-quantized keys are untouched.
        block = torch.cat([self.k_tail[:, :, :held], k[:, :, :flush - held]], dim=2)
        self._store_keys(block)
        rest = k[:, :, flush - held:]
        self.k_tail[:, :, :rest.shape[2]] = rest
        self.num_tail_keys = rest.shape[2]

    def _store_keys(self, block: torch.Tensor) -> None:
        """Quantize whole R-blocks of keys into their slot [num_quant_keys, + n)."""
        F, Gs = 32 // self.bits, self.group_size
        start, n = self.num_quant_keys, block.shape[2]
        if self.rank:
            codes, scale, zero, err = _quantize_with_error(block, self.bits, Gs, "key")
            if not self._k_basis_ready:
                self.k_lr_w.copy_(self._fit_basis(err))
                self._k_basis_ready = True
            self.k_lr_u[:, :, start:start + n] = self._project(err, self.k_lr_w)
        else:
            codes, scale, zero = kvkernels.kivi_quantize(block, self.bits, Gs, "key")
        self.k_codes[:, :, start // F:(start + n) // F] = codes
        self.k_scale[:, :, start // Gs:(start + n) // Gs] = scale
        self.k_zero[:, :, start // Gs:(start + n) // Gs] = zero
        self.num_quant_keys = start + n

    def _append_values(self, v: torch.Tensor) -> None:
        R, t = self.residual, v.shape[2]
        flush = max(0, self.window_len + t - R)  # the oldest tokens of [window; new] beyond R
        from_window = min(flush, self.window_len)
        from_new = flush - from_window
        if flush:
            s = self.window_start
            block = torch.cat([self.v_window[:, :, s:s + from_window], v[:, :, :from_new]], dim=2)
            self._store_values(block, v[:, :, from_new:])
            self.window_start += from_window
            self.window_len -= from_window
        rest = v[:, :, from_new:]
        if self.window_start + self.window_len + rest.shape[2] > self.v_window.shape[2]:
            # Slide the live window back to the front: at most R rows, once every ~R decode steps.
            s, n = self.window_start, self.window_len
            self.v_window[:, :, :n] = self.v_window[:, :, s:s + n].clone()
            self.window_start = 0
        end = self.window_start + self.window_len
        self.v_window[:, :, end:end + rest.shape[2]] = rest
        self.window_len += rest.shape[2]

    def _store_values(self, block: torch.Tensor, incoming_rest: torch.Tensor) -> None:
        """Quantize value rows into their slot [num_quant_values, + n): one row of codes per token."""
        start, n = self.num_quant_values, block.shape[2]
        if self.rank:
            codes, scale, zero, err = _quantize_with_error(block, self.bits, self.group_size, "value")
            if not self._v_basis_ready:
                self.v_lr_w.copy_(self._fit_basis(self._value_basis_sample(err, block.shape[2], incoming_rest)))
                self._v_basis_ready = True
            self.v_lr_u[:, :, start:start + n] = self._project(err, self.v_lr_w)
        else:
            codes, scale, zero = kvkernels.kivi_quantize(block, self.bits, self.group_size, "value")
        self.v_codes[:, :, start:start + n] = codes
        self.v_scale[:, :, start:start + n] = scale
        self.v_zero[:, :, start:start + n] = zero
        self.num_quant_values = start + n

    def _value_basis_sample(self, err: torch.Tensor, flushed: int, incoming_rest: torch.Tensor) -> torch.Tensor:
        """Errors of the flushed rows plus the rows that stay in the window (their error is already known,
        since values are quantized per token), so the first fit sees >= R rows even for a one-token flush."""
        s = self.window_start
        from_window = min(flushed, self.window_len)
        staying = torch.cat([self.v_window[:, :, s + from_window:s + self.window_len], incoming_rest], dim=2)
        if staying.shape[2] == 0:
            return err
        *_, staying_err = _quantize_with_error(staying.contiguous(), self.bits, self.group_size, "value")
        return torch.cat([err, staying_err], dim=2)

    def _fit_basis(self, err: torch.Tensor) -> torch.Tensor:
        """Orthonormal right basis [B, H, D, r] of the error's best rank-r subspace (subspace iteration)."""
        _, W = kvkernels.lowrank_residual(err, self.rank, self.lowrank_iters)
        return torch.linalg.qr(W.float(), mode="reduced").Q.to(self.dtype)

    def _project(self, err: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """U = err.W: the coordinates of each row's error in the shared basis."""
        return torch.matmul(err.float(), basis.float()).to(self.dtype)

    # -------------------------------------------------------------------------------------------------
    def views(self) -> dict:
        """Views of the live parts (no copies), named like ``kvkernels.kivi_attention``'s arguments."""
        F, Gs = 32 // self.bits, self.group_size
        nk, nv = self.num_quant_keys, self.num_quant_values
        s, w = self.window_start, self.window_len
        out = dict(
            k_codes=self.k_codes[:, :, :nk // F], k_scale=self.k_scale[:, :, :nk // Gs],
            k_zero=self.k_zero[:, :, :nk // Gs],
            v_codes=self.v_codes[:, :, :nv], v_scale=self.v_scale[:, :, :nv], v_zero=self.v_zero[:, :, :nv],
            k_tail=self.k_tail[:, :, :self.num_tail_keys], v_tail=self.v_window[:, :, s:s + w],
        )
        if self.rank:
            out["k_lowrank"] = (self.k_lr_u[:, :, :nk], self.k_lr_w)
            out["v_lowrank"] = (self.v_lr_u[:, :, :nv], self.v_lr_w)
        return out

    def attend(self, q: torch.Tensor, sm_scale: Optional[float] = None) -> torch.Tensor:
        """Attention of q [B, Hq, Lq, D] (Hq a multiple of Hkv; bottom-right causal) over the cache."""
        v = self.views()
        return kvkernels.kivi_attention(
            q, v["k_codes"], v["k_scale"], v["k_zero"], v["v_codes"], v["v_scale"], v["v_zero"],
            v["k_tail"], v["v_tail"], self.bits, self.group_size, sm_scale,
            k_lowrank=v.get("k_lowrank"), v_lowrank=v.get("v_lowrank"),
        )

    def nbytes(self) -> int:
        """Bytes of the live cache: packed codes, scales/zeros, full-precision tails (+ low-rank factors)."""
        total = 0
        for name, x in self.views().items():
            parts = x if isinstance(x, tuple) else (x,)
            total += sum(p.numel() * p.element_size() for p in parts)
        return total

    def dense_nbytes(self) -> int:
        """Bytes the same tokens would take as a dense K and V cache in ``dtype``."""
        elt = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.batch * self.num_kv_heads * self.seq_len * self.head_dim * elt

    def __repr__(self) -> str:
        ratio = self.dense_nbytes() / self.nbytes() if self.nbytes() else math.nan
        return (f"KiviCache(B={self.batch}, Hkv={self.num_kv_heads}, D={self.head_dim}, bits={self.bits}, "
                f"group={self.group_size}, R={self.residual}, rank={self.rank}, seq_len={self.seq_len}, "
                f"keys quantized={self.num_quant_keys}, values quantized={self.num_quant_values}, "
                f"{ratio:.2f}x smaller than dense)")
