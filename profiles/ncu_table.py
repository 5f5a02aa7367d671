"""Turn Nsight Compute's CSV into per-kernel achieved-bandwidth and occupancy tables.

    python -m profiles.ncu_table ncu.csv                    # Markdown table on stdout
    python -m profiles.ncu_table ncu.csv --md t.md --csv t.csv

Reads both CSV shapes ncu writes:

* ``--page raw`` (wide): a header row, a units row, then one row per profiled kernel launch with one
  column per metric;
* ``--page details`` / the default with ``--csv`` (long): one row per (launch, metric) with
  ``Metric Name``, ``Metric Unit`` and ``Metric Value`` columns.

Lines before the header (``==PROF==`` messages, the program's own output) are skipped. Values are
normalised to bytes, nanoseconds and percent whatever unit ncu chose (``--print-units base`` avoids
the guessing). Per kernel name the table gives: launches, median duration, DRAM bytes read + written,
achieved DRAM bandwidth ((read + write) / duration), DRAM throughput as % of peak, L2 bytes, SM
throughput %, achieved and theoretical occupancy, registers per thread, shared memory, grid and block.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

# The metrics profiles/profile.py asks ncu for, and what the table calls them.
METRICS = {
    "gpu__time_duration.sum": "duration_ns",
    "dram__bytes_read.sum": "dram_read_bytes",
    "dram__bytes_write.sum": "dram_write_bytes",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct_peak",
    "lts__t_bytes.sum": "l2_bytes",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_pct_peak",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "sm__maximum_warps_per_active_cycle_pct": "theoretical_occupancy_pct",
    "launch__registers_per_thread": "registers",
    "launch__shared_mem_per_block_dynamic": "smem_dynamic_bytes",
    "launch__shared_mem_per_block_static": "smem_static_bytes",
    "launch__grid_size": "grid_size",
    "launch__block_size": "block_size",
    "launch__waves_per_multiprocessor": "waves_per_sm",
}

_UNIT_SCALE = {
    # bytes
    "byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
    "kibyte": 2**10, "mibyte": 2**20, "gibyte": 2**30,
    # time, to nanoseconds
    "nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9,
    # plain counts and percentages
    "%": 1.0, "": 1.0, "register/thread": 1.0, "thread": 1.0, "block": 1.0, "warp": 1.0,
}


def to_number(text: str, unit: str = "") -> Optional[float]:
    """ncu's value text ("1,234.5", "n/a", "") in base units, or None."""
    t = (text or "").strip().replace(",", "")
    if not t or t.lower() in ("n/a", "nan", "-"):
        return None
    try:
        value = float(t)
    except ValueError:
        return None
    return value * _UNIT_SCALE.get((unit or "").strip().lower(), 1.0)


@dataclass
class Launch:
    """One profiled kernel launch: its name and its metrics in base units."""

    kernel: str
    launch_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    grid: str = ""
    block: str = ""


def _csv_body(text: str) -> str:
    """The CSV part of ncu's output: from the header line (first field "ID") on."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith('"ID"') or line.startswith("ID,"):
            return "\n".join(lines[i:])
    raise ValueError("no ncu CSV header (a line starting with \"ID\") found")


def parse(text: str) -> list[Launch]:
    """Every kernel launch in an ncu CSV export (wide or long layout)."""
    rows = list(csv.reader(io.StringIO(_csv_body(text))))
    header, body = rows[0], [r for r in rows[1:] if any(c.strip() for c in r)]
    col = {name: i for i, name in enumerate(header)}
    if "Metric Name" in col:
        return _parse_long(col, body)
    return _parse_wide(header, col, body)


def _cell(row: list[str], col: dict, name: str) -> str:
    i = col.get(name)
    return row[i] if i is not None and i < len(row) else ""


def _parse_long(col: dict, body: list[list[str]]) -> list[Launch]:
    launches: dict[str, Launch] = {}
    for row in body:
        lid = _cell(row, col, "ID")
        launch = launches.setdefault(lid, Launch(_cell(row, col, "Kernel Name"), lid,
                                                 grid=_cell(row, col, "Grid Size"), block=_cell(row, col, "Block Size")))
        value = to_number(_cell(row, col, "Metric Value"), _cell(row, col, "Metric Unit"))
        if value is not None:
            launch.metrics[_cell(row, col, "Metric Name")] = value
    return list(launches.values())


def _parse_wide(header: list[str], col: dict, body: list[list[str]]) -> list[Launch]:
    # The row after the header holds units: its ID cell is empty.
    units = [""] * len(header)
    if body and not _cell(body[0], col, "ID").strip():
        units, body = body[0], body[1:]
    launches = []
    for row in body:
        launch = Launch(_cell(row, col, "Kernel Name"), _cell(row, col, "ID"),
                        grid=_cell(row, col, "Grid Size"), block=_cell(row, col, "Block Size"))
        for name, i in col.items():
            if "__" in name and i < len(row):  # metric columns look like unit__counter.rollup
                value = to_number(row[i], units[i] if i < len(units) else "")
                if value is not None:
                    launch.metrics[name] = value
        launches.append(launch)
    return launches


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def summarize(launches: list[Launch]) -> list[dict]:
    """One row per kernel name (in order of first appearance), medians over its launches."""
    by_kernel: dict[str, list[Launch]] = {}
    for launch in launches:
        by_kernel.setdefault(launch.kernel, []).append(launch)
    table = []
    for kernel, ls in by_kernel.items():
        def med(metric):
            return _median(l.metrics.get(metric) for l in ls)

        bandwidth = []
        for l in ls:
            t = l.metrics.get("gpu__time_duration.sum")
            rd, wr = l.metrics.get("dram__bytes_read.sum"), l.metrics.get("dram__bytes_write.sum")
            if t and rd is not None and wr is not None:
                bandwidth.append((rd + wr) / (t * 1e-9) / 1e9)
        smem = [(l.metrics.get("launch__shared_mem_per_block_dynamic") or 0)
                + (l.metrics.get("launch__shared_mem_per_block_static") or 0) for l in ls]
        duration = med("gpu__time_duration.sum")
        rd, wr = med("dram__bytes_read.sum"), med("dram__bytes_write.sum")
        table.append({
            "kernel": kernel,
            "launches": len(ls),
            "duration_us": None if duration is None else duration / 1e3,
            "dram_MB": None if rd is None or wr is None else (rd + wr) / 1e6,
            "dram_GBps": _median(bandwidth),
            "dram_pct_peak": med("dram__throughput.avg.pct_of_peak_sustained_elapsed"),
            "l2_MB": None if med("lts__t_bytes.sum") is None else med("lts__t_bytes.sum") / 1e6,
            "sm_pct_peak": med("sm__throughput.avg.pct_of_peak_sustained_elapsed"),
            "achieved_occupancy_pct": med("sm__warps_active.avg.pct_of_peak_sustained_active"),
            "theoretical_occupancy_pct": med("sm__maximum_warps_per_active_cycle_pct"),
            "registers": med("launch__registers_per_thread"),
            "smem_KB": _median(smem) / 1024 if smem else None,
            "grid": ls[0].grid or _fmt(med("launch__grid_size")),
            "block": ls[0].block or _fmt(med("launch__block_size")),
        })
    return table


COLUMNS = ["kernel", "launches", "duration_us", "dram_MB", "dram_GBps", "dram_pct_peak", "l2_MB", "sm_pct_peak",
           "achieved_occupancy_pct", "theoretical_occupancy_pct", "registers", "smem_KB", "grid", "block"]


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def to_markdown(table: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table:
        cells = [_short(row["kernel"]).replace("|", "\\|")] + [_fmt(row[c]) for c in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(table: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in table:
            w.writerow({k: _fmt(v) if k != "kernel" else v for k, v in row.items()})


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiles.ncu_table", description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="ncu --csv output (raw or details page)")
    p.add_argument("--md", type=Path, help="write the Markdown table here (default: stdout)")
    p.add_argument("--csv-out", dest="csv_out", type=Path, help="also write the table as CSV")
    args = p.parse_args(argv)
    try:
        table = summarize(parse(args.csv.read_text(errors="replace")))
    except (OSError, ValueError) as exc:
        print(f"ncu_table: cannot read {args.csv}: {exc}", file=sys.stderr)
        return 1
    md = to_markdown(table)
    if args.md:
        args.md.write_text(md + "\n")
    else:
        print(md)
    if args.csv_out:
        write_csv(table, args.csv_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
