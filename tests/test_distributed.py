"""Distributed exact top-k (kvkernels.distributed) against the single-process topk_mask.

One launch of 4 gloo processes (torch.multiprocessing, forked) runs every case on three process groups: the default group (4 ranks),
ranks [0, 1, 2] (3 ranks) and ranks [1, 3] (2 ranks, group ranks differ from global ranks). Each group
rank r takes part r of a case; the parent checks that the parts, concatenated in group-rank order, equal
``topk_mask`` of the concatenated scores (the reference backend and the default one).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kvkernels
from kvkernels.distributed import distributed_topk_mask, distributed_topk_rows, global_threshold
from kvkernels.reference.topk import topk_mask as reference_topk_mask

NAN, INF = float("nan"), float("inf")
WORLD = 4
GROUPS = {"world4": None, "ranks012": [0, 1, 2], "ranks13": [1, 3]}


def _values(g, R, M, levels=None):
    if levels is None:
        return torch.randn(R, M, generator=g)
    return torch.randint(0, levels, (R, M), generator=g).float() * 0.5 - 1.0


def _split(full: torch.Tensor, lengths) -> list[torch.Tensor]:
    return list(torch.split(full, list(lengths), dim=1))


def _lengths(world: int, pattern) -> list[int]:
    return [pattern[i % len(pattern)] for i in range(world)]


def make_cases(world: int) -> dict[str, tuple[list[torch.Tensor], int]]:
    """name -> (per-rank fp32 scores [R, M_r], k); deterministic, so parent and workers agree."""
    g = torch.Generator().manual_seed(1000 + world)
    cases = {}

    def add(name, R, lengths, k, levels=None, fill=None):
        M = sum(lengths)
        full = _values(g, R, M, levels)
        if fill is not None:
            fill(full)
        cases[name] = (_split(full, lengths), k)

    add("random", 3, _lengths(world, [37, 51, 20, 9]), 40)
    add("random_large", 2, _lengths(world, [700, 1301, 555, 901]), 1000, levels=300)  # all 4 digit passes
    add("heavy_ties", 3, _lengths(world, [23, 17, 31, 5]), 29, levels=3)
    add("all_equal_k1", 2, _lengths(world, [5, 9, 4, 7]), 1, fill=lambda t: t.fill_(0.25))
    add("all_equal_mid", 2, _lengths(world, [5, 9, 4, 7]), 11, fill=lambda t: t.fill_(0.25))

    def sinks(t):  # +inf at the start of every rank's part, as KVzip's sink columns
        start = 0
        for m in _lengths(world, [30, 25, 40, 20]):
            t[:, start:start + 4] = INF
            start += m
    add("inf_sinks_above", 2, _lengths(world, [30, 25, 40, 20]), 4 * world + 13, fill=sinks)
    add("inf_sinks_split", 2, _lengths(world, [30, 25, 40, 20]), 4 * world - 3, fill=sinks)

    def specials(t):
        t[:, ::7] = NAN
        t[:, 1::7] = -INF
        t[:, 2::7] = -0.0
        t[:, 3::7] = 0.0
        t[:, 4::11] = INF
    add("nan_inf_zeros", 2, _lengths(world, [19, 23, 14, 30]), 70, levels=4, fill=specials)
    add("into_nan", 1, _lengths(world, [19, 23, 14, 30]), sum(_lengths(world, [19, 23, 14, 30])) - 3,
        fill=specials)
    add("k0", 2, _lengths(world, [11, 13, 7, 3]), 0)
    add("k_all", 2, _lengths(world, [11, 13, 7, 3]), sum(_lengths(world, [11, 13, 7, 3])))
    add("k_over", 2, _lengths(world, [11, 13, 7, 3]), 1000)
    add("k_all_minus_1", 2, _lengths(world, [11, 13, 7, 3]), sum(_lengths(world, [11, 13, 7, 3])) - 1, levels=2)
    add("empty_ranks", 2, _lengths(world, [0, 29, 0, 17]), 20, levels=5)
    add("only_last_rank", 2, [0] * (world - 1) + [33], 12, levels=4)
    add("no_rows", 0, _lengths(world, [6, 8, 3, 5]), 4)
    return cases


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        groups = {name: (None if ranks is None else dist.new_group(ranks)) for name, ranks in GROUPS.items()}
        results = {}
        for gname, ranks in GROUPS.items():
            if ranks is not None and rank not in ranks:
                continue
            group = groups[gname]
            world = dist.get_world_size(group)
            part = dist.get_rank(group)
            for cname, (parts, k) in make_cases(world).items():
                results[gname, cname] = distributed_topk_rows(parts[part], k, group)
            # Any shape, flattened in order: KVzip's [L, B, Hkv_local, N] scores of one batch element.
            g = torch.Generator().manual_seed(7)
            shaped = [torch.randint(0, 9, (3, 1, 2, 13), generator=g).float() for _ in range(world)]
            results[gname, "shaped"] = distributed_topk_mask(shaped[part], 50, group)
            parts, k = make_cases(world)["random_large"]
            results[gname, "threshold"] = global_threshold(parts[part], k, group).value()
            try:  # ranks that disagree on k must all get the error, none may hang
                distributed_topk_rows(parts[part], k + part, group)
                results[gname, "mismatch"] = "no error"
            except ValueError as exc:
                results[gname, "mismatch"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    """{(group, case): [part of group rank 0, part of group rank 1, ...]} from one 4-process spawn."""
    tmp = tmp_path_factory.mktemp("dist")
    # fork, not spawn: the children inherit the imported torch and kvkernels (a spawned child re-imports
    # them, ~10 s each on a busy 2-core machine); they run single-threaded (no OpenMP pool after fork).
    mp.start_processes(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True, start_method="fork")
    per_rank = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    out = {}
    for gname, ranks in GROUPS.items():
        for grank in (ranks if ranks is not None else range(WORLD)):
            for (g, cname), value in per_rank[grank].items():
                if g == gname:
                    out.setdefault((gname, cname), []).append(value)
    return out


def _world(gname):
    return WORLD if GROUPS[gname] is None else len(GROUPS[gname])


CASE_NAMES = sorted(make_cases(2))


@pytest.mark.parametrize("gname", sorted(GROUPS))
@pytest.mark.parametrize("cname", CASE_NAMES)
def test_union_equals_single_process_topk(gathered, gname, cname):
    parts, k = make_cases(_world(gname))[cname]
    got = torch.cat(gathered[gname, cname], dim=1)
    full = torch.cat(parts, dim=1)
    expected = reference_topk_mask(full, k)
    assert got.dtype == torch.bool and got.shape == full.shape
    assert torch.equal(got, expected)
    assert torch.equal(got, kvkernels.topk_mask(full, k))
    assert got.sum(1).tolist() == [min(k, full.shape[1])] * full.shape[0]


@pytest.mark.parametrize("gname", sorted(GROUPS))
def test_any_shape_is_flattened_in_rank_order(gathered, gname):
    g = torch.Generator().manual_seed(7)
    shaped = [torch.randint(0, 9, (3, 1, 2, 13), generator=g).float() for _ in range(_world(gname))]
    got = torch.cat([m.flatten() for m in gathered[gname, "shaped"]])
    expected = reference_topk_mask(torch.cat([s.flatten() for s in shaped])[None], 50)[0]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("gname", sorted(GROUPS))
def test_every_rank_learns_the_same_exact_threshold(gathered, gname):
    parts, k = make_cases(_world(gname))["random_large"]
    full = torch.cat(parts, dim=1)
    kth = torch.sort(full, dim=1, descending=True).values[:, k - 1]
    for value in gathered[gname, "threshold"]:
        assert torch.equal(value, kth)


@pytest.mark.parametrize("gname", sorted(GROUPS))
def test_ranks_disagreeing_on_k_all_raise(gathered, gname):
    for message in gathered[gname, "mismatch"]:
        assert "same number of rows and the same k" in message


def test_single_process_path_is_topk_mask():
    scores = torch.randn(3, 40)
    assert not dist.is_initialized()
    assert torch.equal(distributed_topk_rows(scores, 17), kvkernels.topk_mask(scores, 17))
    assert torch.equal(distributed_topk_mask(scores, 17), kvkernels.topk_mask(scores.view(1, -1), 17).view(3, 40))
    with pytest.raises(ValueError, match="k must be an int"):
        distributed_topk_rows(scores, -1)
    with pytest.raises(TypeError, match="fp32"):
        distributed_topk_rows(scores.double(), 3)
