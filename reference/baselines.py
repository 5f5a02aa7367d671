"""Query-aware eviction baselines as score functions: SnapKV-style and H2O-style.

Both produce fp32 scores per (batch, KV head, key token), the layout of ``kvzip_score`` (stack L layers
for [L, B, Hkv, N]), so they feed the same budget selection (``topk_mask``) and eviction (``compact_kv``)
as KVzip; only the scoring differs. Larger = keep. Inputs are post-RoPE, as the model caches them.

* H2O (Zhang et al., 2023, "heavy hitters"): a key's score is the attention probability it has
  accumulated from every query of the prefill. Under causal attention late keys receive from fewer
  queries, a bias of the method itself that we keep (the recent-window part of H2O's policy is left to
  the budget: the question tokens that follow are never evicted anyway).
* SnapKV (Li et al., 2024): a key's score is the attention it receives from an observation window, the
  last tokens of the prompt, pooled over neighbouring keys (kernel 7) so that kept tokens come in small
  clusters. In the multi-query protocol the window is the FIRST question: that is the query-aware bet
  that compress-once/ask-many exposes.

GQA: query head h reads KV head h // G; a KV head's score sums its G query heads, as a shared KV head
must keep what any of its query heads attends to (rankings inside a head do not depend on sum vs mean).
"""

from __future__ import annotations

import torch


def causal_attention_probs(q: torch.Tensor, k: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """fp32 softmax probabilities [B, Hkv, G, Lq, Nk] of queries q [B, Hq, Lq, D] over keys k [B, Hkv, Nk, D].

    Bottom-right causal: the Lq queries are the last Lq positions of the key sequence, so query row i
    sees keys 0 .. Nk - Lq + i (the layout of a block of new tokens attending over a cache plus itself).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if Nk < Lq:
        raise ValueError(f"{Nk} keys cannot hold the {Lq} queries' own positions")
    G = Hq // Hkv
    logits = torch.einsum("bhgld,bhnd->bhgln", q.float().reshape(B, Hkv, G, Lq, D), k.float()) * sm_scale
    rows = torch.arange(Lq, device=q.device)[:, None] + (Nk - Lq)
    cols = torch.arange(Nk, device=q.device)[None, :]
    return torch.softmax(logits.masked_fill(cols > rows, float("-inf")), dim=-1)


def h2o_scores(q: torch.Tensor, k: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """fp32 [B, Hkv, Nk]: attention each key receives, summed over the Lq queries and the G heads.

    For a prefill run in blocks, call once per block (q = the block's queries, k = all keys so far)
    and add the results into the first Nk columns of a running total: that is H2O's accumulation.
    """
    return causal_attention_probs(q, k, sm_scale).sum(dim=(2, 3))


def snapkv_scores(q_window: torch.Tensor, k: torch.Tensor, sm_scale: float, num_context: int,
                  kernel_size: int = 7) -> torch.Tensor:
    """fp32 [B, Hkv, num_context]: SnapKV votes of the observation window for the first ``num_context`` keys.

    q_window [B, Hq, w, D] are the window's queries; k [B, Hkv, Nk, D] holds the context keys followed by
    the window's own keys (Nk >= num_context + w is not required: any keys between are attended but not
    scored). Each window row's softmax runs over all keys it can see (bottom-right causal); the votes
    are summed over rows and G heads, then averaged over a centred window of ``kernel_size`` keys
    (odd; edges average over the keys that exist), SnapKV's clustering step.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    votes = causal_attention_probs(q_window, k, sm_scale)[..., :num_context].sum(dim=(2, 3))  # [B, Hkv, n]
    if kernel_size == 1:
        return votes.contiguous()
    B, Hkv, n = votes.shape
    pad = kernel_size // 2
    flat = votes.reshape(B * Hkv, 1, n)
    # count_include_pad=False: edge keys average over their real neighbours only.
    pooled = torch.nn.functional.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=False)
    return pooled.reshape(B, Hkv, n).contiguous()
