"""A short program for profilers: run chosen benchmark cases a few times, inside NVTX ranges.

    python -m profiles.target --family ragged --impls kvkernels --iters 3
    python -m profiles.target --family kivi --match N16384 --smoke

Setup (building inputs, compiling kernels in a warm-up pass) happens outside the ``kvk_profile``
NVTX range; the profiled passes happen inside it, each case in its own range named after the case.
``profiles/profile.py`` points ``ncu --nvtx-include kvk_profile/`` at that range, so input
generation kernels stay out of the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Optional

from bench import harness

harness.ensure_interpreter_without_gpu()

from bench import cases as _cases  # noqa: E402

PROFILE_RANGE = "kvk_profile"


@contextlib.contextmanager
def nvtx_range(name: str):
    """A push/pop range in NVTX's default domain (what ncu's --nvtx-include NAME/ matches)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def select(family: str, impls: set[str], match: str, smoke: bool) -> list:
    chosen = _cases.cases_for(family, smoke)
    if impls:
        chosen = [c for c in chosen if c.impl in impls]
    if match:
        chosen = [c for c in chosen if match in c.id]
    return chosen


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiles.target", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, choices=_cases.FAMILIES)
    p.add_argument("--impls", default="kvkernels", help="comma-separated impls (default: kvkernels; '' for all)")
    p.add_argument("--match", default="", help="keep cases whose id contains this text (e.g. N16384)")
    p.add_argument("--iters", type=int, default=3, help="profiled passes over each case's buffers")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (default without a GPU)")
    args = p.parse_args(argv)
    import torch

    device = harness.bench_device()
    smoke = args.smoke or device.type == "cpu"
    impls = {i.strip() for i in args.impls.split(",") if i.strip()}
    chosen = select(args.family, impls, args.match, smoke)
    if not chosen:
        print("profiles.target: no case matched", file=sys.stderr)
        return 2
    ran = 0
    for case in chosen:
        prepared, row = harness.prepare(case, device, 0.0)
        if prepared is None:
            print(f"[target] {case.id}: {row['status']} ({row['detail']})", file=sys.stderr)
            continue
        with harness.backend_context(prepared):
            for i in range(prepared.n_buffers):  # warm-up: compilation stays outside the range
                prepared.run(i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            with nvtx_range(PROFILE_RANGE), nvtx_range(case.id):
                for _ in range(args.iters):
                    for i in range(prepared.n_buffers):
                        prepared.run(i)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        ran += 1
        print(f"[target] {case.id}: {args.iters} x {prepared.n_buffers} calls", file=sys.stderr)
        del prepared
    return 0 if ran else 3


if __name__ == "__main__":
    sys.exit(main())
