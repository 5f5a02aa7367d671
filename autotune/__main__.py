"""kvkernels-autotune: time candidate kernel configs per op and shape bucket; write the winners.

    kvkernels-autotune                       # every op, the full grid, all configs -> kvkernels/configs/<gpu>.json
    kvkernels-autotune --dry-run             # list the grid (points, shape keys, configs per backend)
    kvkernels-autotune --ops kivi,topk_mask --shapes D=128 G=4 --grid small --out tuned.json

For each op (see ``autotune/workloads.py`` for the grids) and each grid point, the autotuner builds
inputs, runs every candidate config of every backend that implements the op (Triton and, for
``topk_mask``, CuPy), checks each result against ``kvkernels.reference``, times the ones that pass
with CUDA events over rotated input buffers, and writes:

* ``tables``: per kernel module (keyed by GPU name, Triton version and a hash of the module's
  source, see :func:`kvkernels.tuning.table_key`), ``"op|shape_key" -> config``: what the kernel
  loads at run time through :func:`kvkernels.tuning.lookup`;
* ``winners``: per ``"gpu|op|shape_key"``, the fastest backend and each backend's best time;
* ``runs``: when, with what versions and which command each tuning run was made, and every timing.

Under the Triton interpreter (no GPU) it still runs end to end on the ``tiny`` grid with one config
per kernel, so CI exercises it; its timings mean nothing there.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from . import timing
from .workloads import PRESETS, WORKLOADS, Workload, clone_args, describe, matches, parse_filters, resolve_ops

BACKEND_ORDER = ("triton", "cupy")


def log(msg: str) -> None:
    print(f"[autotune] {msg}", file=sys.stderr, flush=True)


def _ensure_interpreter_without_gpu() -> None:
    # Must happen before Triton is first imported: without a GPU, kernels can only run interpreted.
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"
        log("no GPU: running Triton kernels under the interpreter (TRITON_INTERPRET=1); timings are meaningless")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------------
# Backends
@dataclass
class Backend:
    name: str  # "triton" or "cupy"
    module_name: str  # e.g. "kvkernels.triton.topk"
    module: Any
    fn: Any
    tunable: Optional[dict]  # module.TUNABLE[op], or None when the module has nothing to tune

    def key(self, args: tuple) -> str:
        return self.tunable["key"](*args) if self.tunable else "any"

    def call(self, args: tuple, config: Optional[dict]):
        return self.fn(*args, config=config) if self.tunable else self.fn(*args)


def discover_backends(op: str, wanted: tuple[str, ...], device: torch.device,
                      modules: Optional[dict[str, str]] = None) -> tuple[list[Backend], list[str]]:
    """The backends that implement ``op`` and can run on ``device``, and why the others are skipped.

    ``modules`` maps backend -> module name (for tests with a stand-in module); by default the
    dispatcher's own table in :mod:`kvkernels._backend` decides.
    """
    from kvkernels import _backend

    found, skipped = [], []
    for name in wanted:
        module_name = (modules or {}).get(name)
        if module_name is None and modules is None:
            short = _backend._KERNEL_MODULES.get(name, {}).get(op)
            module_name = f"kvkernels.{name}.{short}" if short else None
        if module_name is None:
            continue  # this backend has no kernel for the op at all: nothing to say
        if modules is None:
            ok, why = _backend._can_run(name, device.type)
            if not ok:
                skipped.append(f"{op}: {name} skipped ({why})")
                continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            skipped.append(f"{op}: {name} skipped ({module_name} is not importable: {exc})")
            continue
        fn = getattr(module, op, None)
        if fn is None:
            skipped.append(f"{op}: {name} skipped ({module_name} defines no {op})")
            continue
        tunable = getattr(module, "TUNABLE", {}).get(op)
        found.append(Backend(name, module_name, module, fn, tunable))
    return found, skipped


def candidate_configs(backend: Backend, args: tuple, max_configs: Optional[int]) -> list[Optional[dict]]:
    """The configs to try: the first ``max_configs`` of the space, plus the heuristic default.

    Including the default means a tuned entry is never slower than what an untuned shape gets
    (as measured). Under the interpreter only the first config of the space runs, as the TUNABLE
    contract promises that one works there.
    """
    if backend.tunable is None:
        return [None]
    space = list(backend.tunable["space"])
    if max_configs is not None:
        space = space[:max_configs]
    if not interpreting() and "default" in backend.tunable:
        default = dict(backend.tunable["default"](*args))
        if default not in space:
            space.append(default)
    return space


def prune_unlaunchable(op: str, backend: Backend, args: tuple, configs: list, device: torch.device) -> list:
    """Drop the candidates that cannot launch on this GPU (shared memory, registers), saying which and why.

    Each candidate's launches are compiled for the device ahead of time (``autotune.static_check``) instead
    of being tried and failing at launch. Off a GPU, or for a backend that is not Triton, nothing is pruned.
    """
    if backend.name != "triton" or device.type != "cuda" or not backend.tunable:
        return configs
    from .static_check import prune_candidates

    kept, pruned = prune_candidates(backend.fn, args, configs, device)
    for cfg, why in pruned:
        log(f"{op}: pruned {json.dumps(cfg, sort_keys=True)}: {why}")
    return kept


# ---------------------------------------------------------------------------------------------------
# Tuning one grid point
@dataclass
class Measurement:
    op: str
    backend: str
    module: str
    key: str
    point: dict
    config: Optional[dict]
    status: str  # "ok", "wrong", "error"
    median_ms: float = float("nan")
    p20_ms: float = float("nan")
    p80_ms: float = float("nan")
    n_buffers: int = 0
    detail: str = ""

    def as_json(self) -> dict:
        out = dict(self.__dict__)
        for k in ("median_ms", "p20_ms", "p80_ms"):
            out[k] = None if out[k] != out[k] else round(out[k], 6)
        return out


@dataclass
class TuneSettings:
    device: torch.device
    max_configs: Optional[int]
    warmup: int = 1
    min_samples: int = 5
    max_samples: int = 50
    target_ms: float = 60.0
    check: bool = True


def settings_for(device: torch.device, max_configs: Optional[int]) -> TuneSettings:
    if interpreting():
        return TuneSettings(device, max_configs if max_configs is not None else 1, warmup=0, min_samples=1,
                            max_samples=1, target_ms=0.0)
    return TuneSettings(device, max_configs)


def reference_output(wl: Workload, args: tuple):
    fn = wl.reference or getattr(importlib.import_module(f"kvkernels.reference.{wl.module}"), wl.op)
    ref_args = clone_args(args)
    return wl.observe(fn(*ref_args), ref_args)


def tune_point(wl: Workload, point: dict, backends: list[Backend], s: TuneSettings, progress=None) -> list[Measurement]:
    """Measure every candidate config of every backend on one grid point."""
    first = wl.build(point, s.device)
    bytes_moved, _ = wl.traffic(point, first)
    n_buffers = timing.rotation_count(bytes_moved, s.device)
    sets = [first] + [wl.build(point, s.device) for _ in range(n_buffers - 1)]
    # Timing a mutating op (ragged_append) changes its input sets: checks start from a pristine copy.
    pristine = clone_args(first) if s.check else None
    expected = reference_output(wl, pristine) if s.check else None
    results = []
    for backend in backends:
        key = backend.key(first)
        configs = candidate_configs(backend, first, s.max_configs)
        configs = prune_unlaunchable(wl.op, backend, first, configs, s.device)
        if progress is not None:
            progress.total += len(configs)
            progress.refresh()
        for config in configs:
            m = Measurement(wl.op, backend.name, backend.module_name, key, point, config, "ok", n_buffers=n_buffers)
            try:
                if expected is not None:
                    probe = clone_args(pristine)
                    ok, why = wl.compare(wl.observe(backend.call(probe, config), probe), expected, pristine)
                    if not ok:
                        m.status, m.detail = "wrong", why
                if m.status == "ok":
                    fn = lambda *a, _b=backend, _c=config: _b.call(a, _c)  # noqa: E731
                    run = wl.make_runner(fn, sets) if wl.make_runner else (lambda i, _f=fn: _f(*sets[i]))
                    t = timing.time_rotating(run, n_buffers, s.device, warmup=s.warmup, min_samples=s.min_samples,
                                             max_samples=s.max_samples, target_ms=s.target_ms)
                    m.median_ms, m.p20_ms, m.p80_ms = t.median_ms, t.p20_ms, t.p80_ms
            except Exception as exc:  # a config that does not compile or launch is skipped, not fatal
                if isinstance(exc, KeyboardInterrupt):
                    raise
                m.status, m.detail = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            results.append(m)
            if progress is not None:
                progress.set_postfix_str(f"{wl.op} {backend.name} {m.status}", refresh=False)
                progress.update(1)
    del sets
    return results


def best_per_backend(results: list[Measurement]) -> dict[str, Measurement]:
    best: dict[str, Measurement] = {}
    for m in results:
        if m.status == "ok" and (m.backend not in best or m.median_ms < best[m.backend].median_ms):
            best[m.backend] = m
    return best


# ---------------------------------------------------------------------------------------------------
# The JSON file
def run_metadata(device: torch.device, argv: list[str], preset: str) -> dict:
    from kvkernels import tuning

    try:
        import cupy  # noqa: F401

        cupy_version = cupy.__version__
    except Exception:
        cupy_version = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": tuning.device_name(device),
        "torch": torch.__version__,
        "triton": tuning.triton_version(),
        "cupy": cupy_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "interpreter": interpreting(),
        "grid": preset,
        "command": "kvkernels-autotune " + " ".join(shlex.quote(a) for a in argv),
    }


def tables_from(results: list[Measurement], device: torch.device) -> tuple[dict, dict]:
    """(tables, winners) from all measurements: each backend's best config per op and shape key."""
    from kvkernels import tuning

    tables: dict[str, dict[str, dict]] = {}
    winners: dict[str, dict] = {}
    by_point: dict[tuple, list[Measurement]] = {}
    for m in results:
        by_point.setdefault((m.op, describe(m.point)), []).append(m)
    gpu = tuning.device_name(device)
    for (op, _), ms in by_point.items():
        best = best_per_backend(ms)
        for backend, m in best.items():
            if m.config is not None:
                tables.setdefault(tuning.table_key(m.module, device), {})[f"{op}|{m.key}"] = m.config
        if best:
            # The winners table is keyed by the Triton kernel's shape key when there is one.
            ref_key = best["triton"].key if "triton" in best else next(iter(best.values())).key
            fastest = min(best.values(), key=lambda m: m.median_ms)
            winners[f"{gpu}|{op}|{ref_key}"] = {
                "backend": fastest.backend,
                "median_ms": {b: round(m.median_ms, 6) for b, m in best.items()},
            }
    return tables, winners


def merge_and_write(path: Path, tables: dict, winners: dict, run: dict) -> dict:
    """Merge into ``path`` (keeping other ops, shapes and GPUs already there) and write it atomically."""
    from kvkernels import tuning

    doc: dict[str, Any] = {"format": tuning.FORMAT_VERSION, "tables": {}, "winners": {}, "runs": []}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("format") == tuning.FORMAT_VERSION:
                doc.update({k: old.get(k, doc[k]) for k in ("tables", "winners", "runs")})
            else:
                log(f"{path}: format {old.get('format')!r} is not {tuning.FORMAT_VERSION}; replacing it")
        except ValueError:
            log(f"{path}: not valid JSON; replacing it")
    for key, entries in tables.items():
        doc["tables"].setdefault(key, {}).update(entries)
    doc["winners"].update(winners)
    # Keep the last few runs' provenance and timings; a run saved again (after each op) replaces itself.
    same = (run.get("date"), run.get("command"))
    doc["runs"] = ([r for r in doc["runs"] if (r.get("date"), r.get("command")) != same] + [run])[-5:]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    tuning.reload()
    return doc


def default_output(device: torch.device) -> Path:
    from kvkernels import tuning

    if device.type == "cuda":
        return tuning.CONFIG_DIR / f"{tuning.device_name(device)}.json"
    # Interpreter timings must never land in the shipped configs folder.
    return Path.cwd() / "kvkernels-tuning-cpu.json"


# ---------------------------------------------------------------------------------------------------
# CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvkernels-autotune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="", help="comma-separated ops or families (kvzip_score, topk_mask, pool, "
                   "ragged_attention, kivi, lowrank, ...); default: all")
    p.add_argument("--shapes", nargs="*", default=[], metavar="NAME=V[,V]",
                   help="keep grid points whose NAME is one of the values, e.g. D=128 G=1,4 dtype=bf16")
    p.add_argument("--grid", choices=PRESETS, default=None,
                   help="grid preset (default: full on a GPU, tiny under the interpreter)")
    p.add_argument("--backends", default=",".join(BACKEND_ORDER), help="backends to time (default: triton,cupy)")
    p.add_argument("--max-configs", type=int, default=None,
                   help="try only the first N configs of each space (default: all; 1 under the interpreter)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file to merge the winners into (default: kvkernels/configs/<gpu>.json; "
                   "./kvkernels-tuning-cpu.json without a GPU)")
    p.add_argument("--dry-run", action="store_true", help="list the grid and the configs per backend; time nothing")
    p.add_argument("--no-check", action="store_true", help="skip comparing each config with the reference")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new grid point after this many seconds (results so far are kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def plan(ops: list[str], preset: str, filters: dict) -> list[tuple[str, dict]]:
    return [(op, point) for op in ops for point in WORKLOADS[op].points(preset) if matches(point, filters)]


def dry_run(tasks: list[tuple[str, dict]], backends: dict[str, list[Backend]], max_configs: Optional[int]) -> None:
    """Print the grid: one line per point with its shape key and how many configs each backend has."""
    meta = torch.device("meta")
    print(f"{len(tasks)} grid points")
    for op, point in tasks:
        cols = []
        for b in backends.get(op, []):
            n = len(b.tunable["space"]) if b.tunable else 1
            n = min(n, max_configs) if max_configs is not None else n
            try:  # the key only reads shapes, so meta tensors (no memory) usually suffice
                key = b.key(WORKLOADS[op].build(point, meta))
            except Exception:
                key = "?"
            cols.append(f"{b.name}: key={key} configs={n}")
        print(f"{op:18s} {describe(point):60s} {' | '.join(cols) or 'no backend available'}")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _ensure_interpreter_without_gpu()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.grid or ("tiny" if device.type == "cpu" else "full")
    try:
        ops = resolve_ops([o for o in args.ops.split(",") if o.strip()])
        filters = parse_filters(args.shapes)
    except ValueError as exc:
        log(str(exc))
        return 2
    wanted = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    backends: dict[str, list[Backend]] = {}
    for op in ops:
        found, skipped = discover_backends(op, wanted, device)
        for line in skipped:
            log(line)
        if found:
            backends[op] = found
        else:
            log(f"{op}: no kernel backend available; skipping this op")
    tasks = plan(ops, preset, filters)
    if args.dry_run:
        dry_run(tasks, backends, args.max_configs if args.max_configs is not None
                else (1 if interpreting() else None))
        return 0
    tasks = [(op, point) for op, point in tasks if op in backends]
    if not tasks:
        log("nothing to tune (no grid point matched, or no kernel module exists yet)")
        return 0
    settings = settings_for(device, args.max_configs)
    settings.check = not args.no_check
    out = args.out or default_output(device)
    run = run_metadata(device, argv, preset)

    def save(results: list[Measurement]) -> None:
        # Written after every op, so a run stopped by a timeout keeps what it finished.
        tables, winners = tables_from(results, device)
        run["measurements"] = [m.as_json() for m in results]
        merge_and_write(out, tables, winners, run)

    results = run_tasks(tasks, backends, settings, quiet=args.quiet, on_op_done=save, budget_s=args.budget_s)
    print_summary(results)
    tables, _ = tables_from(results, device)
    n_entries = sum(len(v) for v in tables.values())
    log(f"wrote {n_entries} tuned entries for {len(tables)} kernel module(s) to {out}")
    bad = [m for m in results if m.status != "ok"]
    if bad:
        log(f"{len(bad)} config(s) failed or disagreed with the reference (see 'runs' in {out})")
    return 0


def run_tasks(tasks, backends, settings: TuneSettings, quiet: bool = False, on_op_done=None,
              budget_s: Optional[float] = None) -> list[Measurement]:
    """Tune every (op, point); call ``on_op_done(results so far)`` after each op's last point."""
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; tuning works without it
        tqdm = None
    bar = tqdm(total=0, desc="autotune", unit="cfg", file=sys.stderr, disable=quiet, dynamic_ncols=True) \
        if tqdm is not None else None
    results: list[Measurement] = []
    start = time.monotonic()
    try:
        for n, (op, point) in enumerate(tasks):
            if budget_s is not None and time.monotonic() - start > budget_s:
                log(f"time budget of {budget_s:.0f} s spent: {len(tasks) - n} grid point(s) not tuned")
                break
            try:
                results.extend(tune_point(WORKLOADS[op], point, backends[op], settings, bar))
            except torch.cuda.OutOfMemoryError:
                log(f"{op} {describe(point)}: out of GPU memory; point skipped")
                torch.cuda.empty_cache()
            last_of_op = n + 1 == len(tasks) or tasks[n + 1][0] != op
            if last_of_op and on_op_done is not None and results:
                on_op_done(results)
    finally:
        if bar is not None:
            bar.close()
    if on_op_done is not None and results:
        on_op_done(results)
    return results


def print_summary(results: list[Measurement]) -> None:
    """One line per (op, point, backend): the winning config and its time."""
    by_point: dict[tuple, list[Measurement]] = {}
    for m in results:
        by_point.setdefault((m.op, describe(m.point)), []).append(m)
    for (op, desc), ms in by_point.items():
        best = best_per_backend(ms)
        parts = [f"{b}={m.median_ms:.4f}ms {m.config}" for b, m in best.items()] or ["no config passed"]
        print(f"{op:18s} {desc:60s} " + " ; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
