"""Run the benchmark cases, write CSV + JSON and plots under bench/results/<gpu>/.

    python -m bench.report                      # all families, GPU sizes
    python -m bench.report --smoke              # tiny sizes: seconds on CPU (Triton interpreter)
    python -m bench.report --families ragged,kivi --impls kvkernels,sdpa_dense --out-dir /tmp/b

Files: ``bench.csv`` (one row per case, columns in :data:`bench.harness.COLUMNS`), ``bench.json``
(the same rows plus versions, the GPU, the copy bandwidth and the exact command), and three plots:
``speedup_vs_context.png`` (decode speed-up of kvkernels over the baselines vs context length, per
keep ratio / bit width; eager and, on a GPU, CUDA-graph replay), ``speedup_vs_keep.png`` (vs keep ratio) and ``bandwidth_vs_size.png``
(achieved bandwidth vs bytes moved, with the measured copy bandwidth as the ceiling).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from . import harness

harness.ensure_interpreter_without_gpu()

from . import cases as _cases  # noqa: E402  (after the interpreter switch: cases import kvkernels)

PLOTS = ("speedup_vs_context.png", "speedup_vs_keep.png", "bandwidth_vs_size.png")


def default_out_dir() -> Path:
    from kvkernels import tuning

    return harness.REPO / "bench" / "results" / tuning.device_name()


# ---------------------------------------------------------------------------------------------------
# Pairing kvkernels rows with baseline rows
def _params(row: dict) -> dict:
    return json.loads(row["params"]) if isinstance(row["params"], str) else dict(row["params"])


def speedups(rows: list[dict], baseline: str, impl: str = "kvkernels") -> list[tuple[dict, dict, float]]:
    """(impl row, baseline row, baseline time / impl time) for every matching pair of ok rows.

    A baseline row matches when it is the same family, op and context and agrees on every size both
    rows name (the dense SDPA row has no keep ratio or bit width, so it matches all of them).
    """
    ok = [r for r in rows if r["status"] == "ok" and float(r["median_ms"]) > 0]
    out = []
    for r in (r for r in ok if r["impl"] == impl):
        pr = _params(r)
        for b in (b for b in ok if b["impl"] == baseline):
            if (b["family"], b["op"], int(b["context"])) != (r["family"], r["op"], int(r["context"])):
                continue
            pb = _params(b)
            if all(pb[k] == pr[k] for k in pb.keys() & pr.keys()):
                out.append((r, b, float(b["median_ms"]) / float(r["median_ms"])))
    return out


# ---------------------------------------------------------------------------------------------------
# Plots
def _axes_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="grey", wrap=True)


def _line_groups(pairs, group_of, x_of):
    groups: dict = {}
    for r, b, s in pairs:
        groups.setdefault(group_of(r), []).append((x_of(r), s))
    return {g: sorted(v) for g, v in groups.items()}


def plot_speedup_vs_context(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        (axes[0], "ragged", "ragged_attention", "keep", [("sdpa_dense", "-"), ("flex_block_mask", "--")],
         "decode over the evicted (KVzip) cache"),
        (axes[1], "kivi", "kivi_attention", "bits", [("sdpa_dense", "-"), ("dequant_sdpa", "--")],
         "decode over the KIVI cache"),
    )
    for ax, family, op, group, baselines, label in panels:
        drawn = False
        # Eager vs eager, and CUDA-graph replay vs CUDA-graph replay (dotted; GPU only).
        for impl, baseline, style in [("kvkernels", b, st) for b, st in baselines] + \
                [("kvkernels_graph", "sdpa_dense_graph", ":")]:
            pairs = [p for p in speedups(rows, baseline, impl) if p[0]["family"] == family and p[0]["op"] == op]
            for g, pts in _line_groups(pairs, lambda r: _params(r).get(group), lambda r: int(r["context"])).items():
                xs, ys = zip(*pts)
                graph = " (graphs)" if impl.endswith("_graph") else ""
                ax.plot(xs, ys, style, marker="o", label=f"vs {baseline}{graph}, {group}={g}")
                drawn = True
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("speed-up of kvkernels (x)")
        ax.set_title(label, fontsize=10)
        if drawn:
            ax.legend(fontsize=7)
        else:
            _axes_note(ax, "no kvkernels/baseline pair ran\n(kernel missing or skipped)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup_vs_keep(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        (axes[0], "ragged", "sdpa_dense", "context", "decode: kvkernels on the kept cache vs SDPA on the full cache"),
        (axes[1], "topk", "torch_topk", "context", "selection: topk_mask vs torch.topk + scatter"),
    )
    for ax, family, baseline, group, label in panels:
        # Prefer graph replay vs graph replay (the kernels' own speed) where it ran, as on a GPU.
        pairs = [p for p in speedups(rows, baseline + "_graph", "kvkernels_graph") if p[0]["family"] == family]
        if pairs:
            label += " (CUDA graphs)"
        else:
            pairs = [p for p in speedups(rows, baseline) if p[0]["family"] == family]
        groups = _line_groups(pairs, lambda r: int(r["context"]), lambda r: float(r["keep"]))
        for g, pts in sorted(groups.items()):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=f"{group} {g}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("keep ratio (fraction of tokens kept)")
        ax.set_ylabel("speed-up (x)")
        ax.set_title(label, fontsize=10)
        if groups:
            ax.legend(fontsize=7)
        else:
            _axes_note(ax, "no kvkernels/baseline pair ran")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bandwidth(rows: list[dict], path: Path, title: str, copy_gbps: float) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ok = [r for r in rows if r["status"] == "ok" and r["GBps"] not in ("", None) and int(r["bytes"]) > 0]
    markers = dict(zip(_cases.FAMILIES, "osD^vP"))
    for family in _cases.FAMILIES:
        for impl, filled in (("kvkernels", True), ("baselines", False)):
            sel = [r for r in ok if r["family"] == family
                   and (r["impl"].startswith("kvkernels") == (impl == "kvkernels"))]
            if not sel:
                continue
            xs = [int(r["bytes"]) for r in sel]
            ys = [float(r["GBps"]) for r in sel]
            ax.scatter(xs, ys, marker=markers.get(family, "o"), label=f"{family} ({impl})",
                       facecolors=None if filled else "none", edgecolors=None if filled else f"C{_cases.FAMILIES.index(family)}",
                       color=f"C{_cases.FAMILIES.index(family)}" if filled else None)
    if copy_gbps > 0:
        ax.axhline(copy_gbps, color="black", ls="--", lw=1, label=f"device copy {copy_gbps:.0f} GB/s (this run)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes moved per call (fewest: inputs read once, outputs written once)")
    ax.set_ylabel("achieved bandwidth (GB/s)")
    if ok:
        ax.legend(fontsize=7, loc="lower right")
    else:
        _axes_note(ax, "no case ran")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(rows: list[dict], meta: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    title = f"kvkernels on {meta.get('gpu')} (torch {meta.get('torch')}, triton {meta.get('triton')})"
    paths = [out_dir / name for name in PLOTS]
    plot_speedup_vs_context(rows, paths[0], title)
    plot_speedup_vs_keep(rows, paths[1], title)
    plot_bandwidth(rows, paths[2], title, float(meta.get("copy_GBps") or 0))
    return paths


# ---------------------------------------------------------------------------------------------------
def summary_table(rows: list[dict]) -> str:
    """A Markdown table of every row: what ran, how fast, and how close to the copy bandwidth."""
    lines = ["| family | op | impl | context | keep | median ms (p20-p80) | GB/s | of copy | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            t = f"{r['median_ms']:.4g} ({r['p20_ms']:.4g}-{r['p80_ms']:.4g})"
            frac = f"{100 * r['frac_of_copy']:.1f}%" if r["frac_of_copy"] != "" else ""
            status = "ok"
        else:
            t, frac, status = "", "", f"{r['status']}: {r['detail'][:80]}"
        lines.append(f"| {r['family']} | {r['op']} | {r['impl']} | {r['context']} | {r['keep']} | {t} | "
                     f"{r['GBps']} | {frac} | {status} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (default without a GPU)")
    p.add_argument("--families", default=",".join(_cases.FAMILIES), help="comma-separated op families")
    p.add_argument("--impls", default="", help="comma-separated implementations to keep (default: all)")
    p.add_argument("--out-dir", type=Path, default=None, help="default: bench/results/<gpu>/")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--flex", action="store_true", help="also run FlexAttention on CPU (slow to trace)")
    p.add_argument("--copy-bytes", type=int, default=None, help="size of the copy-bandwidth probe")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new case after this many seconds; the rest are marked skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = harness.bench_device()
    smoke = args.smoke or device.type == "cpu"
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(_cases.CASES)
    if unknown:
        print(f"unknown families: {sorted(unknown)}; known: {', '.join(_cases.CASES)}", file=sys.stderr)
        return 2
    _cases.ALLOW_CPU_FLEX = args.flex
    selected = _cases.all_cases(families, smoke=smoke)
    if args.impls:
        impls = {i.strip() for i in args.impls.split(",")}
        selected = [c for c in selected if c.impl in impls]
    copy_bps = harness.copy_bandwidth_cached(str(device), args.copy_bytes)
    meta = harness.versions()
    meta.update(command=harness.command_line() if argv is None else "python -m bench.report " + " ".join(argv),
                smoke=smoke, copy_GBps=harness._sig(copy_bps / 1e9), families=families)
    out_dir = args.out_dir or default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)

    def save(rows_so_far: list[dict]) -> None:
        # After every case: a run stopped from outside (a timeout) keeps the rows it measured.
        harness.write_csv(rows_so_far, out_dir / "bench.csv")
        harness.write_json(rows_so_far, meta, out_dir / "bench.json")

    rows = harness.run_cases(selected, device, copy_bps, smoke=smoke,
                             progress=not (args.quiet or args.no_progress), budget_s=args.budget_s, on_row=save)
    save(rows)
    written = [out_dir / "bench.csv", out_dir / "bench.json"]
    if not args.no_plots:
        written += make_plots(rows, meta, out_dir)
    if not args.quiet:
        print(summary_table(rows))
    n_ok = sum(r["status"] == "ok" for r in rows)
    print(f"[bench] {n_ok}/{len(rows)} cases ran; copy bandwidth {copy_bps / 1e9:.1f} GB/s; wrote "
          + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
