"""The benchmark harness shared by report.py and the pytest-benchmark suites.

* timing: CUDA events over a pass of rotated input buffers on a GPU, ``perf_counter`` on CPU
  (:mod:`autotune.timing`); one call per buffer under the Triton interpreter;
* the ceiling: a device-to-device copy measured once per run (bytes read + written per second),
  so every row's bandwidth is also given as a fraction of what this card did in this run;
* rows: one dict per case with the columns in :data:`COLUMNS`, and the run's provenance.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from autotune import timing

from .cases import Case, Prepared, Unavailable

COLUMNS = [
    "family", "op", "impl", "params", "context", "keep",
    "median_ms", "p20_ms", "p80_ms", "spread_pct", "n_buffers",
    "bytes", "GBps", "flops", "TFLOPs", "copy_GBps", "frac_of_copy",
    "status", "detail",
]

REPO = Path(__file__).resolve().parent.parent


def ensure_interpreter_without_gpu() -> None:
    """Without a GPU the Triton kernels can only run interpreted; must precede the first Triton import."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def copy_bandwidth_cached(device_str: str, nbytes: Optional[int] = None) -> float:
    return timing.copy_bandwidth(torch.device(device_str), nbytes)


def timing_options(smoke: bool) -> dict:
    if interpreting() or smoke:
        # Interpreted kernels take ~0.1-1 s a call: one pass over the buffers, no warm-up pass.
        return dict(warmup=0, min_samples=1, max_samples=1, target_ms=0.0)
    return dict(warmup=2, min_samples=10, max_samples=200, target_ms=300.0)


def _blank_row(case: Case, copy_bps: float) -> dict:
    row = {c: "" for c in COLUMNS}
    row.update(family=case.family, op=case.op, impl=case.impl, params=json.dumps(case.params, sort_keys=True),
               context=case.context, keep="" if case.keep is None else case.keep, copy_GBps=_sig(copy_bps / 1e9))
    return row


def prepare(case: Case, device: torch.device, copy_bps: float) -> tuple[Optional[Prepared], dict]:
    """(prepared inputs, row) - prepared is None and the row says why when the case cannot run here."""
    row = _blank_row(case, copy_bps)
    try:
        return case.make(case.params, device), row
    except Unavailable as exc:
        row.update(status="skipped", detail=str(exc))
    except Exception as exc:  # a baseline this torch cannot build: report it, run the rest
        row.update(status="error", detail=f"setup: {type(exc).__name__}: {_first_line(exc)}")
    return None, row


def backend_context(prepared: Prepared):
    """use_backend(prepared.backend) for kvkernels cases; a no-op for baselines."""
    from kvkernels import use_backend

    return use_backend(prepared.backend) if prepared.backend else contextlib.nullcontext()


def time_prepared(prepared: Prepared, row: dict, device: torch.device, copy_bps: float, smoke: bool) -> dict:
    """Time a prepared case and fill the row's time, bandwidth and FLOP/s columns."""
    try:
        with backend_context(prepared):
            t = timing.time_rotating(prepared.run, prepared.n_buffers, device, **timing_options(smoke))
    except Exception as exc:
        row.update(status="error", detail=f"run: {type(exc).__name__}: {_first_line(exc)}")
        return row
    seconds = t.median_ms * 1e-3
    row.update(
        median_ms=_sig(t.median_ms, 6), p20_ms=_sig(t.p20_ms, 6), p80_ms=_sig(t.p80_ms, 6),
        spread_pct=round(100 * t.spread_ms / t.median_ms, 2) if t.median_ms > 0 else "",
        n_buffers=t.calls_per_sample, status="ok", bytes=prepared.bytes, flops=prepared.flops,
    )
    if seconds > 0:
        row["GBps"] = _sig(prepared.bytes / seconds / 1e9)
        row["TFLOPs"] = _sig(prepared.flops / seconds / 1e12) if prepared.flops else ""
        row["frac_of_copy"] = _sig(prepared.bytes / seconds / copy_bps) if copy_bps > 0 else ""
    return row


def measure(case: Case, device: torch.device, copy_bps: float, smoke: bool = False) -> dict:
    """Prepare and time one case; a row dict with every column (status 'skipped'/'error' on failure)."""
    prepared, row = prepare(case, device, copy_bps)
    if prepared is None:
        return row
    return time_prepared(prepared, row, device, copy_bps, smoke)


def _sig(x: float, digits: int = 4) -> float:
    """Round to significant digits (CPU smoke rates are tiny; GPU ones large)."""
    return float(f"{x:.{digits}g}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def run_cases(cases: list[Case], device: torch.device, copy_bps: float, smoke: bool = False,
              progress: bool = True, budget_s: Optional[float] = None, on_row=None) -> list[dict]:
    """Measure every case in order; once ``budget_s`` seconds have passed, the rest are marked skipped.
    ``on_row(rows so far)`` is called after each measured case."""
    import time

    rows = []
    start = time.monotonic()
    try:
        from tqdm import tqdm

        it = tqdm(cases, desc="bench", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    except ImportError:
        it = cases
    for case in it:
        if budget_s is not None and time.monotonic() - start > budget_s:
            row = _blank_row(case, copy_bps)
            row.update(status="skipped", detail=f"time budget of {budget_s:.0f} s spent")
            rows.append(row)
            continue
        rows.append(measure(case, device, copy_bps, smoke))
        if on_row is not None:
            on_row(rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------
# Provenance and files
def versions() -> dict:
    from kvkernels import tuning

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": tuning.device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": tuning.triton_version(),
        "python": platform.python_version(),
        "interpreter": interpreting(),
        "host": platform.node(),
    }
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except Exception:
        info["cupy"] = None
    try:
        import kvkernels

        info["kvkernels"] = kvkernels.__version__
    except Exception:
        pass
    info["git"] = _git_commit()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["l2_bytes"] = timing.l2_bytes("cuda")
        info["driver"] = _nvidia_smi("driver_version")
    return info


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return None


def _nvidia_smi(field: str) -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)


def write_csv(rows: list[dict], path: Path) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_json(rows: list[dict], meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "columns": COLUMNS, "rows": rows}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark glue, shared by bench/test_bench_*.py
def smoke_mode() -> bool:
    """Tiny sizes without a GPU, or when KVKERNELS_BENCH_SMOKE=1."""
    return not torch.cuda.is_available() or os.environ.get("KVKERNELS_BENCH_SMOKE", "0") not in ("", "0")


def bench_case(benchmark, case: Case, device: torch.device, copy_bps: float, smoke: bool) -> dict:
    """Time ``case`` with the harness (events, rotation) and with pytest-benchmark; return the row.

    The harness numbers (per-call median and spread from CUDA events, bandwidth, fraction of the copy
    bandwidth) go into ``extra_info``; pytest-benchmark's own table times one call plus a device
    synchronize, so it includes the launch and sync latency. A kvkernels case that errors fails the
    test; a baseline or backend that cannot run here is skipped with the reason.
    """
    import itertools

    import pytest

    prepared, row = prepare(case, device, copy_bps)
    if prepared is not None:
        row = time_prepared(prepared, row, device, copy_bps, smoke)
    if row["status"] != "ok":
        if row["status"] == "error" and case.impl == "kvkernels":
            pytest.fail(f"{case.id}: {row['detail']}")
        pytest.skip(f"{case.impl} {row['status']}: {row['detail']}")
    benchmark.group = f"{case.op} context={case.context}" + (f" keep={case.keep}" if case.keep is not None else "")
    benchmark.extra_info.update({k: row[k] for k in COLUMNS if row[k] != "" and k not in ("family", "op")})
    calls = itertools.count()

    def one_call():
        prepared.run(next(calls) % prepared.n_buffers)
        timing.synchronize(device)

    with backend_context(prepared):
        benchmark.pedantic(one_call, rounds=1 if smoke else 30, iterations=1, warmup_rounds=0 if smoke else 2)
    return row
