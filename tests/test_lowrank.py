"""lowrank_residual (op 8): the reference against a naive float64 subspace iteration (Gram-Schmidt), the Triton
backend against the reference, the error falling with the rank, and the SVD optimum on (nearly) low-rank
inputs. The fused quantize -> dequantize -> error step is tested in test_kivi.py; here its output feeds
the fit end to end."""

from __future__ import annotations

import pytest
import torch

import kvkernels
from kvkernels.reference import lowrank as ref
from kvkernels.reference.lowrank import subspace_start

pytest.importorskip("triton")
from kvkernels.triton import kivi as tri_kivi  # noqa: E402
from kvkernels.triton import lowrank as tri  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def low_rank_matrix(B, H, T, D, k, noise=0.0, seed=0, decay=1.0):
    """[B,H,T,D] = A·Bᵀ with k well-separated singular values (+ optional noise)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(B, H, T, k, generator=g)).Q
    b = torch.linalg.qr(torch.randn(B, H, D, k, generator=g)).Q
    s = 10.0 * decay ** torch.arange(k, dtype=torch.float32) + 1.0
    x = (a * s) @ b.transpose(-1, -2)
    return (x + noise * torch.randn(B, H, T, D, generator=g)).to(DEVICE)


def naive_subspace_iteration(err, rank, iters):
    """float64, one (b, h) at a time, classical Gram-Schmidt in explicit loops."""
    B, H, T, D = err.shape
    approx = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            e = err[b, h].double().cpu()
            W = subspace_start(D, rank, torch.device("cpu")).double()
            for _ in range(iters):
                Y = e @ W
                U = torch.zeros_like(Y)
                for j in range(rank):
                    col = Y[:, j].clone()
                    for i in range(j):
                        col -= (U[:, i] @ Y[:, j]) * U[:, i]
                    U[:, j] = col / col.norm()
                W = e.T @ U
            approx[b, h] = U @ W.T
    return approx


def product(U, W):
    return U.double().cpu() @ W.double().cpu().transpose(-1, -2)


def svd_optimum(err, rank):
    s = torch.linalg.svdvals(err.double().cpu())
    return s[..., rank:].pow(2).sum().sqrt()


@pytest.mark.parametrize("rank,iters", [(1, 2), (3, 3)])
def test_reference_matches_naive_float64(rank, iters):
    err = low_rank_matrix(1, 2, 40, 64, 5, noise=0.1).cpu()
    U, W = ref.lowrank_residual(err, rank, iters)
    torch.testing.assert_close(product(U, W), naive_subspace_iteration(err, rank, iters), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank,iters", [(1, 1), (4, 3), (8, 2)])
def test_triton_backend_matches_reference(dtype, rank, iters):
    err = low_rank_matrix(2, 3, 37, 64, 6, noise=0.2, seed=rank).to(dtype)
    with kvkernels.use_backend("triton"):
        U, W = kvkernels.lowrank_residual(err, rank, iters)
        assert kvkernels.last_choice() == ("lowrank_residual", "triton")
    Ur, Wr = ref.lowrank_residual(err, rank, iters)
    assert U.shape == (2, 3, 37, rank) and W.shape == (2, 3, 64, rank) and U.dtype == W.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(product(U, W), product(Ur, Wr), atol=tol * 10, rtol=tol)
    eye = torch.eye(rank, dtype=torch.float64).expand(2, 3, rank, rank)
    torch.testing.assert_close(U.double().cpu().transpose(-1, -2) @ U.double().cpu(), eye, atol=tol, rtol=0)


def test_error_falls_as_rank_grows():
    err = low_rank_matrix(1, 2, 64, 64, 16, noise=0.05, decay=0.8)
    prev = err.double().norm().item()
    for rank in (1, 2, 4, 8, 16):
        U, W = tri.lowrank_residual(err, rank, 4)
        res = (err.double().cpu() - product(U, W)).norm().item()
        assert res < prev * 0.999, (rank, res, prev)
        prev = res


@pytest.mark.parametrize("k", [1, 4])
def test_exactly_low_rank_input_reaches_the_svd_optimum(k):
    """rank = true rank: the residual is ~0 (the SVD optimum); with noise, within 2% of the optimum."""
    exact = low_rank_matrix(2, 2, 48, 64, k, seed=k)
    U, W = tri.lowrank_residual(exact, k, 3)
    res = (exact.double().cpu() - product(U, W)).norm(dim=(-2, -1))
    assert (res <= 1e-4 * exact.double().cpu().norm(dim=(-2, -1))).all()

    noisy = low_rank_matrix(2, 2, 48, 64, k, noise=0.05, seed=k)
    U, W = tri.lowrank_residual(noisy, k, 4)
    res = (noisy.double().cpu() - product(U, W)).norm(dim=(-2, -1))
    assert (res <= 1.02 * svd_optimum(noisy, k)).all()


def test_fit_on_fused_quantization_error_reduces_the_error():
    """End to end: quantization_error (Triton, one pass) -> lowrank_residual -> smaller reconstruction error."""
    g = torch.Generator().manual_seed(2)
    # Keys with a few outlier channels (the structure that makes the quantization error low-rank-ish).
    x = torch.randn(1, 2, 64, 64, generator=g) + 6 * torch.randn(1, 2, 1, 64, generator=g)
    x[..., :3] *= 8
    x = x.to(DEVICE)
    codes, scale, zero, err = tri_kivi.quantization_error(x, 2, 32, "key")
    U, W = tri.lowrank_residual(err, 4, 3)
    before = err.double().norm()
    after = (err.double().cpu() - product(U, W)).norm()
    assert after < 0.95 * before


def test_tunable_contract():
    entry = tri.TUNABLE["lowrank_residual"]
    err = low_rank_matrix(1, 1, 33, 64, 3)
    key = entry["key"](err, 2, 3)
    assert isinstance(key, str) and "33" not in key
    U, W = tri.lowrank_residual(err, 2, 3, config=entry["space"][0])
    Ur, Wr = ref.lowrank_residual(err, 2, 3)
    torch.testing.assert_close(product(U, W), product(Ur, Wr), atol=1e-4, rtol=1e-4)
    assert entry["default"](err, 2, 3) == {}
