"""KVzip scoring by chunked context reconstruction, and the eviction budget (which KV pairs to keep).

Scoring (KVzip, arXiv 2505.23416): after the prefill, the context (system prompt excluded) is cut into
chunks of ``chunk_size`` tokens. Chunk t's input is a repeat instruction (for t >= 1 it quotes the last
``overlap`` tokens of chunk t-1), the assistant opener, then the chunk's own tokens. It runs through the
model over the full, unpruned cache with RoPE positions starting right after the whole context; in every
layer the post-RoPE queries and keys feed ``kvkernels.kvzip_score``, whose result (max attention
probability each chunk key receives) is that chunk's score. The appended tokens are dropped afterwards.

Budget: ``keep`` is the fraction of *context* KV pairs kept (KVzip's ``ratio``); the sink (system prompt)
is always kept on top, by giving it score +inf. ``budget="global"`` keeps the top pairs over all layers
and KV heads together (KVzip's default), ``"per_head"`` the same number in every (layer, head),
``"per_layer"`` the same number in every layer. Under tensor parallelism (``group`` given to
:func:`select_kept`), ``"global"`` and ``"per_layer"`` span the KV heads of every rank exactly
(:mod:`kvkernels.distributed`) and ``"per_rank"`` keeps the same number on every rank (the global rule
over this rank's heads alone); on one process ``"per_rank"`` is ``"global"``.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

import kvkernels
from kvkernels import _progress

from .attention import KVZIP_CAPTURE_ATTENTION, ScoreCapture, attention_implementation, capturing_scores

BUDGETS = ("global", "per_head", "per_layer", "per_rank")
FIRST_CHUNK_PROMPT = "Repeat the previous context exactly."
LATER_CHUNK_PROMPT = "Repeat the part of the previous context exactly, starting with "


def resolve_keep(keep: Optional[float] = None, compression_ratio: Optional[float] = None,
                 default: float = 0.3) -> float:
    """The fraction of context KV pairs to KEEP, from exactly one of two conventions.

    ``keep`` is KVzip's ``ratio`` (0.3 keeps 30%); ``compression_ratio`` is kvpress's (0.7 removes 70%,
    i.e. keep 0.3). Give at most one; with neither, ``default`` is kept.
    """
    if keep is not None and compression_ratio is not None:
        raise ValueError("give either keep (fraction KEPT, KVzip's ratio) or compression_ratio (fraction "
                         f"REMOVED, kvpress's), not both (got keep={keep}, compression_ratio={compression_ratio})")
    if compression_ratio is not None:
        if not 0.0 <= float(compression_ratio) <= 1.0:
            raise ValueError(f"compression_ratio is the fraction REMOVED and must lie in [0, 1], got {compression_ratio}")
        return 1.0 - float(compression_ratio)
    if keep is None:
        return default
    if not 0.0 <= float(keep) <= 1.0:
        raise ValueError(f"keep is the fraction KEPT and must lie in [0, 1], got {keep}")
    return float(keep)


def chunk_bounds(sink_len: int, total_len: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) of each reconstruction chunk over the context tokens sink_len .. total_len."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, total_len)) for s in range(sink_len, total_len, chunk_size)]


def reconstruction_input(prompt, input_ids: torch.Tensor, bounds: Sequence[tuple[int, int]], t: int,
                         overlap: int = 8) -> torch.Tensor:
    """Token ids [1, Lq] of chunk t's reconstruction input: repeat prompt, assistant opener, chunk tokens."""
    start, end = bounds[t]
    if t == 0:
        instruction = prompt.encode("\n\n" + FIRST_CHUNK_PROMPT)
    else:
        prev_start, prev_end = bounds[t - 1]
        tail = input_ids[0, max(prev_start, prev_end - overlap):prev_end]
        instruction = torch.cat([prompt.encode("\n\n" + LATER_CHUNK_PROMPT), tail.to("cpu")])
    ids = torch.cat([instruction, prompt.encode(prompt.turn_end), input_ids[0, start:end].to("cpu")])
    return ids[None].to(input_ids.device)


@torch.no_grad()
def kvzip_scores(model, prompt, input_ids: torch.Tensor, cache, sink_len: int, chunk_size: int = 2048,
                 overlap: int = 8, progress: bool = False) -> torch.Tensor:
    """fp32 [L, B, Hkv, N] KVzip scores of the prefilled sequence ``input_ids`` [B, N]; sink columns = +inf.

    ``cache`` is the transformers cache holding the N prefilled tokens; it is restored to N tokens after
    every chunk. ``prompt`` is a :class:`~kvkernels.hf.pipeline.PromptFormat`.
    """
    B, N = input_ids.shape
    # The cache's heads, not the config's: under tensor parallelism a rank holds only its KV heads.
    L, Hkv = len(cache.layers), cache.layers[0].keys.shape[1]
    scores = torch.full((L, B, Hkv, N), float("inf"), dtype=torch.float32, device=input_ids.device)
    bounds = chunk_bounds(sink_len, N, chunk_size)
    capture = ScoreCapture(scores, sink_len)
    decoder = model.get_decoder()  # the base model: no vocabulary projection is needed to score
    bar = _progress.bar(progress, total=N - sink_len, desc=f"KVzip scoring ({len(bounds)} chunks)", unit="tok")
    with bar, attention_implementation(model, KVZIP_CAPTURE_ATTENTION), capturing_scores(capture):
        for t in range(len(bounds)):
            ids = reconstruction_input(prompt, input_ids, bounds, t, overlap).expand(B, -1)
            capture.chunk = bounds[t]
            # Every chunk sits right after the whole context, whatever its own place in it.
            positions = torch.arange(N, N + ids.shape[1], device=ids.device)[None].expand(B, -1)
            decoder(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True)
            cache.crop(-ids.shape[1])
            bar.update(bounds[t][1] - bounds[t][0])  # context tokens scored: the rate is in tokens/s
    return scores


def broadcast_head_scores(head_scores: torch.Tensor, batch: int, num_tokens: int, sink_len: int) -> torch.Tensor:
    """fp32 [L, B, Hkv, N] token scores from static per-(layer, head) scores [L, Hkv] (head-level KVzip)."""
    L, Hkv = head_scores.shape
    scores = head_scores.float()[:, None, :, None].expand(L, batch, Hkv, num_tokens).clone()
    scores[..., :sink_len] = float("inf")
    return scores


def external_scores(scores: torch.Tensor, num_layers: int, batch: int, num_kv_heads: int, num_tokens: int,
                    sink_len: int) -> torch.Tensor:
    """fp32 [L, B, Hkv, N] from a user score tensor over the context tokens, sink set to +inf.

    Accepted shapes: [L, Hkv, n] or [L, B, Hkv, n], with n the context length (sink excluded) or the
    whole prefilled length N (then the sink columns are overwritten with +inf). Larger = more important.
    """
    n_ctx = num_tokens - sink_len
    if scores.dim() == 3:
        scores = scores[:, None].expand(-1, batch, -1, -1)
    if scores.dim() != 4 or tuple(scores.shape[:3]) != (num_layers, batch, num_kv_heads) \
            or scores.shape[3] not in (n_ctx, num_tokens):
        raise ValueError(f"scores must have shape [L={num_layers}, Hkv={num_kv_heads}, n] or [L, B={batch}, Hkv, n] "
                         f"with n = {n_ctx} context tokens or {num_tokens} prefilled tokens; got {tuple(scores.shape)}")
    full = torch.full((num_layers, batch, num_kv_heads, num_tokens), float("inf"), dtype=torch.float32,
                      device=scores.device)
    full[..., sink_len:] = scores[..., scores.shape[3] - n_ctx:].float()
    return full


def select_kept(scores: torch.Tensor, keep: float, sink_len: int, budget: str = "global",
                group=None) -> tuple[torch.Tensor, int]:
    """(bool keep mask [L, B, Hkv, N], number of kept pairs) for fp32 scores [L, B, Hkv, N].

    Sink columns must hold +inf (always kept). The count is exact and known without reading the mask
    (``topk_mask`` keeps exactly k per row), which keeps ``compact_kv``'s pool shape host-sync free.
    ``group``: a ``torch.distributed`` process group whose ranks hold the other KV heads (tensor
    parallelism; ``scores`` are this rank's heads); ``"global"``/``"per_layer"`` then select over all
    ranks' heads (identical to one device holding them all, in rank order) and the count is this rank's.
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if budget == "per_rank" or budget == "per_head":
        budget, group = ("global" if budget == "per_rank" else budget), None  # this rank's heads alone
    L, B, H, N = scores.shape
    n_ctx = N - sink_len
    topk = kvkernels.topk_mask
    if group is not None:
        from kvkernels.distributed import all_sum, distributed_topk_rows
        topk = functools.partial(distributed_topk_rows, group=group)
        H = all_sum(H, group, scores.device)  # the budget counts the KV heads of every rank
    if budget == "global":
        k = L * H * sink_len + round(keep * L * H * n_ctx)
        rows = scores.permute(1, 0, 2, 3).reshape(B, -1)
        mask = topk(rows, k).view(B, L, -1, N).permute(1, 0, 2, 3).contiguous()
    elif budget == "per_layer":
        k = H * sink_len + round(keep * H * n_ctx)
        rows = scores.reshape(L * B, -1)
        mask = topk(rows, k).view(scores.shape)
    else:
        k = sink_len + round(keep * n_ctx)
        rows = scores.reshape(L * B * H, N)
        mask = topk(rows, k).view(L, B, H, N)
    if group is not None:
        return mask, int(mask.sum())  # this rank's share of the k per row (one host read)
    return mask, k * rows.shape[0]
