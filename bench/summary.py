"""Write summary.md for bench/gpu_report.sh: stage results, tests, tuned entries, benchmark and ncu tables.

    python -m bench.summary OUT_DIR STAGES_TSV [EXTRA_DIR]

STAGES_TSV has one line per stage: name, status, seconds, limit (tab-separated). The summary reads
what the stages left in OUT_DIR (junit.xml, autotune.json, bench.csv, bench.json) and in EXTRA_DIR
(ncu.md, env.txt); a missing file is mentioned, never an error.
"""

from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def stage_table(stages_tsv: Path) -> list[str]:
    lines = ["| stage | status | seconds | limit |", "|---|---|---|---|"]
    if stages_tsv.exists():
        for line in stages_tsv.read_text().splitlines():
            parts = line.split("\t") + [""] * 4
            lines.append(f"| {parts[0]} | {parts[1]} | {parts[2]} | {parts[3]} |")
    return lines


def junit_summary(path: Path) -> list[str]:
    if not path.exists():
        return ["(no junit.xml: the test stage did not finish)"]
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return [f"(junit.xml unreadable: {exc})"]
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out = [f"tests {totals['tests']}, failures {totals['failures']}, errors {totals['errors']}, "
           f"skipped {totals['skipped']}"]
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else ""
            out.append(f"- FAILED {case.get('classname')}::{case.get('name')}: {msg}")
    return out


def autotune_summary(path: Path) -> list[str]:
    if not path.exists():
        return ["(no autotune.json)"]
    doc = json.loads(path.read_text())
    lines = [f"{sum(len(v) for v in doc.get('tables', {}).values())} tuned entries in "
             f"{len(doc.get('tables', {}))} kernel tables; winners:"]
    for key, w in sorted(doc.get("winners", {}).items()):
        times = ", ".join(f"{b} {t:.4g} ms" for b, t in w.get("median_ms", {}).items())
        lines.append(f"- {key}: **{w.get('backend')}** ({times})")
    runs = doc.get("runs", [])
    if runs:
        bad = [m for m in runs[-1].get("measurements", []) if m.get("status") != "ok"]
        if bad:
            lines.append(f"{len(bad)} config(s) failed or disagreed with the reference, e.g.:")
            lines += [f"- {m['op']} {m['backend']} {m['config']}: {m['status']} {m.get('detail', '')[:120]}"
                      for m in bad[:8]]
    return lines


def bench_summary(csv_path: Path, json_path: Path) -> list[str]:
    if not csv_path.exists():
        return ["(no bench.csv)"]
    meta = json.loads(json_path.read_text()).get("meta", {}) if json_path.exists() else {}
    rows = list(csv.DictReader(csv_path.open()))
    lines = [f"copy bandwidth {meta.get('copy_GBps')} GB/s; command `{meta.get('command')}`", "",
             "| op | impl | context | keep | median ms | spread % | GB/s | of copy | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = f"{100 * float(r['frac_of_copy']):.1f}%" if r["frac_of_copy"] else ""
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['detail'][:70]}"
        lines.append(f"| {r['op']} | {r['impl']} | {r['context']} | {r['keep']} | {r['median_ms']} | "
                     f"{r['spread_pct']} | {r['GBps']} | {frac} | {status} |")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0])
    stages = Path(argv[1])
    extra = Path(argv[2]) if len(argv) > 2 else out
    parts = ["# kvkernels GPU report", ""]
    env = extra / "env.txt"
    if env.exists():
        parts += ["```", env.read_text().strip(), "```", ""]
    parts += ["## Stages", *stage_table(stages), "", "## Tests", *junit_summary(out / "junit.xml"), "",
              "## Autotuning", *autotune_summary(out / "autotune.json"), "",
              "## Benchmarks", *bench_summary(out / "bench.csv", out / "bench.json"), ""]
    ncu_md = extra / "ncu.md"
    parts += ["## Nsight Compute", ncu_md.read_text() if ncu_md.exists() else "(no ncu table)", ""]
    (out / "summary.md").write_text("\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
