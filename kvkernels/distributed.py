"""Exact top-k over scores spread across ranks (tensor parallelism), with a few small all-reduces.

Under tensor parallelism each rank holds the KV heads of its shard, so KVzip's global budget (one
threshold over all layers and heads) spans ranks. :func:`distributed_topk_mask` gives every rank its part
of the single-device ``topk_mask`` over all ranks' scores *concatenated in rank order*, without moving
any score between ranks:

* the radix select of ``topk_mask`` (``kvkernels/triton/topk.py``): the order-preserving integer image
  of the fp32 scores (``kvkernels.reference.topk.sortable_key``: NaN below -inf, -0.0 == +0.0), four
  passes of 8-bit digit histograms, most significant digit first; each pass's [R, 256] histogram is
  summed over the ranks (one all-reduce), so every rank picks the same digit and, after the four passes,
  knows the exact k-th largest key of each row and how many keys equal to it are kept (``ties_kept``);
* the tie rule (lower *global* index wins): a key equal to the threshold at local index j is kept when
  the ties on lower ranks plus the ties before j on this rank number fewer than ``ties_kept``; the ties on
  lower ranks come from one all-gather of one count per row per rank.

Collectives per call: one all-gather of (rows, local length, k) per rank (consistency check and total
length), four all-reduces of int64 [R, 256], one all-gather of int64 [R]. Works with any process group
whose backend reduces int64 tensors on the scores' device (gloo on CPU, NCCL on CUDA). The local work is
torch ops (no host sync except reading the gathered sizes). Without an initialised process group, or with
one rank, the single-device ``kvkernels.topk_mask`` runs unchanged.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

import kvkernels
from kvkernels.reference.topk import sortable_key

NUM_BINS = 256
DIGIT_BITS = 8
_SIGN_FLIP = 2**31  # sortable_key + 2**31: the unsigned (non-negative int64) image, same order


class GlobalThreshold(NamedTuple):
    """What every rank learns, identically: per row, the k-th largest key and how many ties at it are kept."""

    key: torch.Tensor  # int64 [R]: sortable_key of the k-th largest score (order-preserving image)
    ties_kept: torch.Tensor  # int64 [R]: keys equal to ``key`` kept in the whole row (>= 1), lowest global index first
    total_len: int  # entries per row over all ranks
    k: int  # min(k, total_len)

    def value(self) -> torch.Tensor:
        """fp32 [R]: the threshold score itself (NaN if the threshold is a NaN key)."""
        signed = self.key.to(torch.int32)
        bits = torch.where(signed < 0, signed ^ 0x7FFFFFFF, signed)
        return bits.view(torch.float32)


def world_of(group) -> int:
    """Ranks in ``group`` (1 when torch.distributed is not initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """[world, *t.shape]: ``t`` of every rank of ``group``, in rank order (gloo and NCCL both take lists)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def all_sum(value: int, group, device=None) -> int:
    """The sum of an integer over the ranks of ``group`` (one small all-reduce; identity on one process)."""
    if world_of(group) == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=group)
    return int(t[0])


def _gather_sizes(R: int, M: int, k: int, group, device) -> list[int]:
    """Local lengths of every rank; raises (on every rank alike) if the ranks disagree on rows or k."""
    sizes = _all_gather(torch.tensor([R, M, k], dtype=torch.int64, device=device), group).tolist()
    if any(r != R or kk != k for r, _, kk in sizes):
        raise ValueError("distributed topk_mask: every rank must pass the same number of rows and the same k; "
                         f"got (rows, local length, k) per rank = {[tuple(s) for s in sizes]}")
    return [m for _, m, _ in sizes]


def _unsigned_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) whose order is the float order of ``scores`` (NaN lowest, -0.0 == +0.0)."""
    return sortable_key(scores).long() + _SIGN_FLIP


def _digit_histogram(ukey: torch.Tensor, prefix: torch.Tensor, shift: int) -> torch.Tensor:
    """int64 [R, 256]: counts of the digit at ``shift`` among the keys that share ``prefix`` above it."""
    R = ukey.shape[0]
    above = shift + DIGIT_BITS
    candidate = (ukey >> above) == (prefix[:, None] >> above)  # shift 24: everything (both sides are 0)
    digit = (ukey >> shift) & (NUM_BINS - 1)
    hist = torch.zeros((R, NUM_BINS), dtype=torch.int64, device=ukey.device)
    return hist.scatter_add_(1, digit, candidate.long())


def _pick_digit(hist: torch.Tensor, k_rem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the bin holding the k_rem-th largest candidate and the candidates in higher bins.

    Needs 1 <= k_rem <= hist.sum(1): the intervals (above, above + hist] of the non-empty bins partition
    (0, total], so exactly one bin matches.
    """
    above = hist.sum(1, keepdim=True) - hist.cumsum(1)  # candidates in strictly higher bins
    hit = (above < k_rem[:, None]) & (above + hist >= k_rem[:, None])
    digit = hit.long().argmax(1)
    return digit, above.gather(1, digit[:, None])[:, 0]


def global_threshold(scores: torch.Tensor, k: int, group=None) -> GlobalThreshold:
    """The exact k-th largest key of each row of the ranks' scores concatenated, identical on every rank.

    ``scores``: fp32 [R, M_local] on this rank (M_local may differ between ranks, even be 0); row r of
    the global problem is the concatenation of every rank's row r in rank order. Needs 1 <= min(k, M) <
    M for the total length M (the trivial cases have no threshold; :func:`distributed_topk_mask` skips them).
    """
    R, M_local = scores.shape
    lengths = _gather_sizes(R, M_local, k, group, scores.device)
    return _radix_select(_unsigned_keys(scores), min(k, sum(lengths)), sum(lengths), group)


def _radix_select(ukey: torch.Tensor, k: int, total_len: int, group) -> GlobalThreshold:
    R = ukey.shape[0]
    prefix = torch.zeros(R, dtype=torch.int64, device=ukey.device)
    k_rem = torch.full((R,), k, dtype=torch.int64, device=ukey.device)
    for shift in (24, 16, 8, 0):
        hist = _digit_histogram(ukey, prefix, shift)
        dist.all_reduce(hist, group=group)  # the whole row's histogram, on every rank
        digit, n_above = _pick_digit(hist, k_rem)
        prefix = prefix | (digit << shift)
        k_rem = k_rem - n_above
    return GlobalThreshold(prefix - _SIGN_FLIP, k_rem, total_len, k)


def _keep_local(ukey: torch.Tensor, threshold: GlobalThreshold, group) -> torch.Tensor:
    """This rank's keep flags: above the threshold, or a tie whose global rank among ties is < ties_kept."""
    thr = threshold.key[:, None] + _SIGN_FLIP
    tie = ukey == thr
    ties_per_rank = _all_gather(tie.sum(1), group)  # [world, R]
    rank = dist.get_rank(group)
    ties_before = ties_per_rank[:rank].sum(0)  # ties on lower ranks come first (lower global index)
    tie_rank = ties_before[:, None] + tie.long().cumsum(1) - 1
    return (ukey > thr) | (tie & (tie_rank < threshold.ties_kept[:, None]))


def distributed_topk_rows(scores: torch.Tensor, k: int, group=None) -> torch.Tensor:
    """bool [R, M_local]: this rank's part of ``topk_mask(cat(scores of all ranks, dim=1), k)``.

    Exactly min(k, M) True per global row over all ranks together; ties go to the lower global index
    (lower rank first, then lower local index). ``group`` is a ``torch.distributed`` process group (None:
    the default one); every rank of it must call with the same R and k. Single process: ``topk_mask``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [rows, local length], got shape {tuple(scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be fp32 (as topk_mask), got {scores.dtype}")
    if world_of(group) == 1:
        return kvkernels.topk_mask(scores, k)
    R, M_local = scores.shape
    total = sum(_gather_sizes(R, M_local, k, group, scores.device))
    kk = min(k, total)
    if R == 0 or kk == 0 or kk == total:  # the same decision on every rank: no collective is skipped by one
        return torch.full((R, M_local), kk > 0, dtype=torch.bool, device=scores.device)
    ukey = _unsigned_keys(scores)
    return _keep_local(ukey, _radix_select(ukey, kk, total, group), group)


def distributed_topk_mask(scores: torch.Tensor, k: int, group=None) -> torch.Tensor:
    """bool, shape of ``scores``: the global top-k over every rank's scores, each flattened, in rank order.

    One row: what ``topk_mask(cat([s.flatten() for s in scores_of_every_rank])[None], k)`` keeps, split
    back to the ranks. See :func:`distributed_topk_rows` for several rows sharing the ranks.
    """
    return distributed_topk_rows(scores.reshape(1, -1), k, group).view(scores.shape)
