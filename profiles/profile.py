"""Profile a chosen benchmark with Nsight Compute (ncu) or Nsight Systems (nsys).

    python -m profiles.profile ncu  --family ragged --match N16384 --kernel 'ragged|attn'
    python -m profiles.profile nsys --family kivi

Both run ``python -m profiles.target`` (the chosen bench cases, warmed up, then a few passes inside
the NVTX range ``kvk_profile``) under the profiler and leave everything in ``--out-dir``
(default ``profiles/out/<gpu>/``):

* ``ncu``: ``ncu --clock-control none`` (the GPU's own clocks: the lent Firecracker machines allow
  only that, and it matches what the benchmarks see) collecting the metrics of
  :data:`profiles.ncu_table.METRICS` for kernels inside ``kvk_profile`` whose name matches
  ``--kernel``; writes ``ncu.ncu-rep`` (open it in the Nsight Compute GUI), ``ncu.csv`` (raw page) and
  ``ncu.md`` (achieved bandwidth / occupancy per kernel, see ``profiles/ncu_table.py``).
* ``nsys``: ``nsys profile --trace cuda,nvtx``; writes ``nsys.nsys-rep`` and the kernel / NVTX
  summaries (``nsys_stats_*.csv``, filtered by ``--kernel``). Where nsys records but cannot build a
  report (seen on this project's Firecracker GPU machines: only a ``.qdstrm`` appears), it says so
  and exits 0; use ``ncu`` there.

A missing profiler is reported the same way (exit 0, a message). Exit codes: 0 done or gracefully
skipped, 1 the profiled program failed.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from profiles import ncu_table

REPO = Path(__file__).resolve().parent.parent

# Where the tools hide when they are not on PATH (CUDA toolkit, standalone installs, the nsys that
# ships inside Nsight Compute).
_SEARCH = {
    "ncu": ["/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda*/bin/ncu"],
    "nsys": ["/usr/local/cuda/bin/nsys", "/opt/nvidia/nsight-systems/*/bin/nsys", "/usr/local/cuda*/bin/nsys",
             "/opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys"],
}


def log(msg: str) -> None:
    print(f"[profile] {msg}", file=sys.stderr, flush=True)


def find_tool(name: str) -> Optional[str]:
    """$KVKERNELS_<NAME> if set, else PATH, else the usual install folders; None when absent."""
    override = os.environ.get(f"KVKERNELS_{name.upper()}")
    if override:
        return override if os.path.exists(override) else None
    found = shutil.which(name)
    if found:
        return found
    for pattern in _SEARCH.get(name, []):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]  # the newest version folder sorts last
    return None


def target_command(args) -> list[str]:
    cmd = [sys.executable, "-m", "profiles.target", "--family", args.family, "--impls", args.impls,
           "--iters", str(args.iters)]
    if args.match:
        cmd += ["--match", args.match]
    if args.smoke:
        cmd.append("--smoke")
    return cmd


def _run(cmd: list[str], log_path: Path, timeout: int) -> int:
    log("$ " + " ".join(cmd))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        with log_path.open("a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        log(f"timed out after {timeout} s (see {log_path})")
        return 124


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------
def run_ncu(args, out: Path) -> int:
    ncu = find_tool("ncu")
    if ncu is None:
        log("ncu (Nsight Compute) was not found on PATH or in /usr/local/cuda, /opt/nvidia: nothing profiled")
        return 0
    report = out / "ncu"
    log_path = out / "ncu.log"
    cmd = [ncu, "--clock-control", "none", "--target-processes", "all", "--force-overwrite",
           "--metrics", ",".join(ncu_table.METRICS), "--launch-count", str(args.launch_count), "-o", str(report)]
    if not args.no_nvtx_filter:
        cmd += ["--nvtx", "--nvtx-include", "kvk_profile/"]
    if args.kernel:
        cmd += ["--kernel-name", f"regex:{args.kernel}"]
    rc = _run(cmd + target_command(args), log_path, args.timeout)
    rep = report.with_suffix(".ncu-rep")
    if not rep.exists():
        log(f"ncu wrote no report (exit {rc}). Last lines of {log_path}:\n{_tail(log_path)}")
        return 1 if rc not in (0, 124) else 0
    csv_path = out / "ncu.csv"
    export = [ncu, "--import", str(rep), "--csv", "--page", "raw", "--print-units", "base"]
    with csv_path.open("w") as f:
        done = subprocess.run(export, stdout=f, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:  # an older ncu without --print-units: export with its own units
        with csv_path.open("w") as f:
            subprocess.run(export[:-2], stdout=f, stderr=subprocess.PIPE, text=True)
    try:
        table = ncu_table.summarize(ncu_table.parse(csv_path.read_text(errors="replace")))
    except ValueError as exc:
        log(f"could not read ncu's CSV ({exc}); the report is {rep}")
        return 0
    md = ncu_table.to_markdown(table)
    (out / "ncu.md").write_text(md + "\n")
    ncu_table.write_csv(table, out / "ncu_table.csv")
    print(md)
    if not table:
        log("ncu profiled no kernel: check --kernel, or try --no-nvtx-filter")
    log(f"wrote {rep}, {csv_path}, {out / 'ncu.md'}")
    return 0


def _filter_rows(path: Path, pattern: Optional[str]) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(path.open(newline="")))
    if not rows:
        return [], []
    header, body = rows[0], rows[1:]
    if pattern and "Name" in header:
        i = header.index("Name")
        rx = re.compile(pattern)
        body = [r for r in body if i < len(r) and rx.search(r[i])]
    return header, body


def run_nsys(args, out: Path) -> int:
    nsys = find_tool("nsys")
    if nsys is None:
        log("nsys (Nsight Systems) was not found on PATH or in /usr/local/cuda, /opt/nvidia: nothing profiled. "
            "Use `python -m profiles.profile ncu` for per-kernel numbers.")
        return 0
    report = out / "nsys"
    log_path = out / "nsys.log"
    cmd = [nsys, "profile", "--trace", "cuda,nvtx", "--force-overwrite", "true", "--output", str(report)]
    rc = _run(cmd + target_command(args), log_path, args.timeout)
    rep = report.with_suffix(".nsys-rep")
    if not rep.exists():
        raw = sorted(out.glob("nsys*.qdstrm"))
        if raw:
            log(f"nsys recorded a trace ({raw[0].name}) but could not turn it into a report (exit {rc}). "
                "This happens on the Firecracker GPU machines lent to this project, where nsys's importer "
                "fails; use `python -m profiles.profile ncu` there.")
        else:
            log(f"nsys produced no report (exit {rc}). Last lines of {log_path}:\n{_tail(log_path)}")
        return 0
    prefix = out / "nsys_stats"
    for reports in ("cuda_gpu_kern_sum,nvtx_sum", "gpukernsum,nvtxsum"):  # current names, then pre-2023 ones
        done = subprocess.run([nsys, "stats", "--force-overwrite", "true", "--report", reports, "--format", "csv",
                               "--output", str(prefix), str(rep)], capture_output=True, text=True)
        if done.returncode == 0 and list(out.glob("nsys_stats*.csv")):
            break
    written = sorted(out.glob("nsys_stats*.csv"))
    for path in written:
        header, body = _filter_rows(path, args.kernel if "kern" in path.name else None)
        print(f"## {path.name}")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in body[:30]:
            print("| " + " | ".join(r) + " |")
    log(f"wrote {rep}" + (", " + ", ".join(str(p) for p in written) if written else " (nsys stats made no CSV)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profiles.profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tool", choices=("ncu", "nsys"))
    p.add_argument("--family", required=True, help="benchmark family (ragged, kivi, topk, pool, kvzip, lowrank)")
    p.add_argument("--impls", default="kvkernels", help="implementations to run (default: kvkernels)")
    p.add_argument("--match", default="", help="only cases whose id contains this text, e.g. N16384")
    p.add_argument("--kernel", default="", help="regex on kernel names (ncu --kernel-name regex:...; nsys: filters "
                   "the kernel summary)")
    p.add_argument("--launch-count", type=int, default=20, help="ncu: profile at most this many kernel launches")
    p.add_argument("--iters", type=int, default=2, help="profiled passes over each case's input buffers")
    p.add_argument("--no-nvtx-filter", action="store_true", help="ncu: profile kernels outside the kvk_profile range too")
    p.add_argument("--smoke", action="store_true", help="tiny sizes")
    p.add_argument("--timeout", type=int, default=480, help="seconds for the profiled program")
    p.add_argument("--out-dir", type=Path, default=None, help="default: profiles/out/<gpu>/")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out_dir is None:
        from kvkernels import tuning

        args.out_dir = REPO / "profiles" / "out" / tuning.device_name()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return run_ncu(args, args.out_dir) if args.tool == "ncu" else run_nsys(args, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
