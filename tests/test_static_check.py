"""The AOT compile check (``python -m autotune.static_check``): every GPU default compiles for sm_80 and
sm_90a, fits, and does not spill; the autotuner's static pruning names what does not fit.

The check compiles real Triton kernels (no interpreter), so it runs in a subprocess with
TRITON_INTERPRET=0 (conftest.py sets it to 1 for the kernel tests). Results are cached by kernel source
hash + Triton version + target + options, and the committed seed cache (bench/results/static/cache/)
makes a clean clone compile only what changed since it was last refreshed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_programs_per_sm_limits():
    from autotune.static_check import TARGETS, programs_per_sm

    h100, a100 = TARGETS[90], TARGETS[80]
    assert programs_per_sm(h100, 128, 0, 4) == 4  # registers: 65536 / (128 * 128)
    assert programs_per_sm(h100, 255, 0, 4) == 2
    assert programs_per_sm(h100, 32, 100 * 1024, 4) == 2  # shared memory: 228 KiB / (100 + 1) KiB
    assert programs_per_sm(a100, 32, 100 * 1024, 4) == 1
    assert programs_per_sm(a100, 32, 170 * 1024, 4) == 0  # over A100's 163 KiB per block
    assert programs_per_sm(h100, 32, 170 * 1024, 4) == 1


def test_gpu_defaults_compile_fit_and_do_not_spill():
    out = _run(["-m", "autotune.static_check", "--set", "ci", "--targets", "80,90", "--jobs", "2"], timeout=1500)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " 0 failures" in out.stdout
    assert "launches checked" in out.stdout


def test_pruning_names_a_candidate_that_does_not_fit():
    script = textwrap.dedent("""
        import dataclasses, torch
        from autotune import static_check as sc
        from kvkernels.triton import kivi
        B, Hkv, G, D, T, F = 1, 2, 2, 64, 64, 16
        t = lambda *s, dtype=torch.float16: torch.zeros(*s, dtype=dtype)
        args = (t(B, Hkv * G, 1, D), t(B, Hkv, T // F, D, dtype=torch.int32), t(B, Hkv, T // 32, D),
                t(B, Hkv, T // 32, D), t(B, Hkv, T, D // F, dtype=torch.int32), t(B, Hkv, T, D // 32),
                t(B, Hkv, T, D // 32), t(B, Hkv, 3, D), t(B, Hkv, 3, D), 2, 32, 0.125)
        small = dataclasses.replace(sc.TARGETS[80], smem_per_block=8 * 1024)  # a GPU with 8 KiB per block
        cfg = {"BLOCK_N": 64, "NUM_SPLITS": 1, "num_warps": 4, "num_stages": 2}
        print("WHY", sc.launch_problem(kivi.kivi_attention, args, cfg, small))
        print("FITS", sc.launch_problem(kivi.kivi_attention, args, cfg, sc.TARGETS[80]))
    """)
    out = _run(["-c", script], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    why = next(line for line in out.stdout.splitlines() if line.startswith("WHY"))
    assert "shared memory" in why and "per block" in why, why
    assert "FITS None" in out.stdout, out.stdout


def test_cupy_topk_source_compiles_with_nvrtc_for_sm80_and_sm90():
    from autotune import static_check as sc

    try:
        sc._load_nvrtc()
    except RuntimeError as exc:
        pytest.skip(str(exc))  # the NVRTC wheel is optional: pip install nvidia-cuda-nvrtc-cu12
    rows = sc.check_cupy_topk((80, 90))
    kernels = {"topk_rows", "topk_span_hist", "topk_select", "topk_span_ties", "topk_span_write"}
    for target in ("sm_80", "sm_90"):
        got = {r["kernel"]: r for r in rows if r["target"] == target}
        assert set(got) == kernels, got
        for r in got.values():
            assert 0 < r["regs"] <= 255 and r["spill_stores"] == r["spill_loads"] == 0, r
