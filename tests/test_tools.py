"""CI tests of the tools: the autotuner, the benchmark report, the ncu CSV tables, the profiler
scripts' graceful paths and the NVTX helper. Everything runs on CPU (Triton under the interpreter)
on tiny sizes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ and profiles/ are run from the source tree, not installed
    sys.path.insert(0, str(REPO))

from autotune import __main__ as cli  # noqa: E402
from autotune import timing, workloads  # noqa: E402
from kvkernels import _backend, _nvtx, tuning  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def tuning_file(monkeypatch, tmp_path):
    """A tmp tuning file that kvkernels.tuning.lookup reads; forgotten again after the test."""
    path = tmp_path / "tuned.json"
    monkeypatch.setenv("KVKERNELS_TUNING_FILE", str(path))
    tuning.reload()
    yield path
    monkeypatch.delenv("KVKERNELS_TUNING_FILE")
    tuning.reload()


# ---------------------------------------------------------------------------------------------------
# Autotuner machinery on a stand-in kernel module of our own
FAKE_TRITON = '''
"""Stand-in kernel module with a TUNABLE table, as the kernel modules define it."""
import time
from kvkernels import tuning

def _key(x, alpha):
    return f"N{tuning.length_bucket(x.shape[0])}"

TUNABLE = {
    "fake_scale": {
        "space": [{"SLEEP_MS": 30, "num_warps": 4},      # valid, slow
                  {"SLEEP_MS": 4, "num_warps": 8},       # valid, the fastest valid one
                  {"SLEEP_MS": 0, "num_warps": 2, "BUG": 1}],  # fastest, but wrong
        "key": _key,
        "default": lambda x, alpha: {"SLEEP_MS": 30, "num_warps": 4},
    }
}

def fake_scale(x, alpha, *, config=None):
    if config is None:
        config = tuning.lookup(__name__, "fake_scale", _key(x, alpha)) or TUNABLE["fake_scale"]["default"](x, alpha)
    time.sleep(config["SLEEP_MS"] / 1e3)
    return x * alpha + config.get("BUG", 0)
'''

FAKE_CUPY = '''
"""Stand-in second backend without a TUNABLE table (nothing to tune, one way to launch)."""
import time

def fake_scale(x, alpha):
    time.sleep(0.001)
    return x * alpha
'''


def _fake_workload() -> workloads.Workload:
    return workloads.Workload(
        op="fake_scale", module="fake", family="fake",
        grids={"tiny": workloads.grid(n=[100, 300])},
        build=lambda p, device: (torch.randn(p["n"], device=device), 2.0),
        traffic=lambda p, args: (8 * p["n"], p["n"]),
        compare=lambda out, ref, args: workloads._close(out, ref, torch.float32),
        reference=lambda x, alpha: x * alpha,
    )


def test_autotuner_picks_fastest_correct_config_and_backend(tmp_path, monkeypatch, tuning_file):
    (tmp_path / "fake_kvk_triton.py").write_text(FAKE_TRITON)
    (tmp_path / "fake_kvk_cupy.py").write_text(FAKE_CUPY)
    monkeypatch.syspath_prepend(str(tmp_path))
    backends, skipped = cli.discover_backends(
        "fake_scale", ("triton", "cupy"), CPU, modules={"triton": "fake_kvk_triton", "cupy": "fake_kvk_cupy"})
    assert [b.name for b in backends] == ["triton", "cupy"] and not skipped
    wl = _fake_workload()
    settings = cli.TuneSettings(CPU, max_configs=None, warmup=0, min_samples=3, max_samples=3, target_ms=0)
    results = []
    for point in wl.points("tiny"):
        results += cli.tune_point(wl, point, backends, settings)
    # 2 points x (3 triton configs + 1 cupy launch)
    assert len(results) == 8
    wrong = [m for m in results if m.status == "wrong"]
    assert len(wrong) == 2 and all(m.config.get("BUG") for m in wrong)
    assert all(m.median_ms > 0 for m in results if m.status == "ok")

    tables, winners = cli.tables_from(results, CPU)
    cli.merge_and_write(tuning_file, tables, winners, {"date": "t", "command": "test"})
    doc = json.loads(tuning_file.read_text())
    assert doc["format"] == tuning.FORMAT_VERSION
    assert set(doc["tables"]) == {tuning.table_key("fake_kvk_triton")}  # cupy has nothing to tune
    import fake_kvk_triton

    for n in (100, 300):
        key = fake_kvk_triton._key(torch.empty(n), 2.0)
        assert tuning.lookup("fake_kvk_triton", "fake_scale", key) == {"SLEEP_MS": 4, "num_warps": 8}
        win = doc["winners"][f"cpu|fake_scale|{key}"]
        assert win["backend"] == "cupy" and win["median_ms"]["cupy"] < win["median_ms"]["triton"]
    # The kernel itself now runs the tuned config when called without one.
    assert torch.equal(fake_kvk_triton.fake_scale(torch.ones(100), 2.0), torch.full((100,), 2.0))

    # Merging a second run keeps the first run's entries and replaces a re-saved run in place.
    cli.merge_and_write(tuning_file, {"other|table": {"op|k": {"B": 1}}}, {}, {"date": "t", "command": "test"})
    doc = json.loads(tuning_file.read_text())
    assert tuning.table_key("fake_kvk_triton") in doc["tables"] and "other|table" in doc["tables"]
    assert len(doc["runs"]) == 1


def test_autotuner_records_failing_configs(tmp_path, monkeypatch):
    (tmp_path / "fake_kvk_broken.py").write_text(textwrap.dedent('''
        TUNABLE = {"fake_scale": {"space": [{"X": 1}], "key": lambda x, a: "k", "default": lambda x, a: {"X": 1}}}
        def fake_scale(x, alpha, *, config=None):
            raise RuntimeError("out of shared memory")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    backends, _ = cli.discover_backends("fake_scale", ("triton",), CPU, modules={"triton": "fake_kvk_broken"})
    settings = cli.TuneSettings(CPU, max_configs=1, warmup=0, min_samples=1, max_samples=1, target_ms=0)
    (m,) = cli.tune_point(_fake_workload(), {"n": 10}, backends, settings)
    assert m.status == "error" and "out of shared memory" in m.detail
    assert cli.tables_from([m], CPU) == ({}, {})


def test_autotuner_checks_every_config_of_a_mutating_op_on_fresh_inputs(tmp_path, monkeypatch):
    """Timing ragged_append grows seg_len in the input sets; later configs must still be checked on
    the original inputs (a stale check would reject correct configs)."""
    (tmp_path / "fake_kvk_append.py").write_text(textwrap.dedent('''
        from kvkernels.reference.pool import ragged_append as _ref
        TUNABLE = {"ragged_append": {"space": [{"V": 0}, {"V": 1}, {"V": 2}], "key": lambda *a: "k",
                                     "default": lambda *a: {"V": 0}}}
        def ragged_append(*args, config=None):
            return _ref(*args)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    backends, _ = cli.discover_backends("ragged_append", ("triton",), CPU, modules={"triton": "fake_kvk_append"})
    settings = cli.TuneSettings(CPU, max_configs=None, warmup=1, min_samples=2, max_samples=2, target_ms=0)
    wl = workloads.WORKLOADS["ragged_append"]
    results = cli.tune_point(wl, wl.points("tiny")[0], backends, settings)
    assert [m.status for m in results] == ["ok", "ok", "ok"], [m.detail for m in results]


def _available_triton_ops(candidates):
    ops = []
    for op in candidates:
        found, _ = cli.discover_backends(op, ("triton",), CPU)
        if found and found[0].tunable:
            ops.append(op)
    return ops


def test_autotune_cli_end_to_end_under_interpreter(tuning_file, capsys):
    """`kvkernels-autotune` on the tiny grid with one config per kernel, then lookup finds the winners."""
    ops = _available_triton_ops(["topk_mask", "kivi_quantize", "ragged_append"])
    rc = cli.main(["--ops", ",".join(ops) or "topk_mask", "--shapes", "axis=key", "--grid", "tiny",
                   "--max-configs", "1", "--out", str(tuning_file), "--quiet"])
    assert rc == 0
    if not ops:  # no kernel module exists yet: the CLI says so and writes nothing
        assert not tuning_file.exists()
        return
    doc = json.loads(tuning_file.read_text())
    assert doc["format"] == tuning.FORMAT_VERSION
    run = doc["runs"][-1]
    assert run["interpreter"] is cli.interpreting() and run["grid"] == "tiny" and "--ops" in run["command"]
    assert run["measurements"] and all(m["status"] == "ok" for m in run["measurements"]), run["measurements"]
    for op in ops:
        wl = workloads.WORKLOADS[op]
        (backend,), _ = cli.discover_backends(op, ("triton",), CPU)
        for point in wl.points("tiny"):
            if point.get("axis", "key") != "key":
                continue
            args = wl.build(point, CPU)
            key = backend.key(args)
            # One config per kernel under the interpreter: the first of the space, found at run time.
            # (On a GPU the heuristic default competes with it.)
            allowed = [backend.tunable["space"][0]]
            if not cli.interpreting():
                allowed.append(dict(backend.tunable["default"](*args)))
            assert tuning.lookup(backend.module_name, op, key) in allowed
            assert doc["winners"][f"{tuning.device_name()}|{op}|{key}"]["backend"] == "triton"


def test_autotune_dry_run_lists_grid(capsys):
    assert cli.main(["--dry-run", "--ops", "kivi", "--shapes", "axis=value", "--grid", "tiny"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("kivi_")]
    n_tiny = sum(1 for op in ("kivi_quantize", "kivi_dequantize", "kivi_attention")
                 for p in workloads.WORKLOADS[op].points("tiny") if p.get("axis", "value") == "value")
    assert len(lines) == n_tiny and f"{n_tiny} grid points" in out
    assert all("axis=key" not in line for line in lines)


def test_autotune_rejects_unknown_ops_and_bad_filters():
    assert cli.main(["--ops", "no_such_op", "--dry-run"]) == 2
    assert cli.main(["--shapes", "D128", "--dry-run"]) == 2
    assert workloads.resolve_ops(["pool"]) == ["compact_kv", "ragged_append"]
    assert workloads.parse_filters(["D=64,128", "G=4"]) == {"D": {"64", "128"}, "G": {"4"}}


def test_every_workload_builds_valid_inputs_for_the_reference():
    """The grids' inputs pass the ops' validation, and the traffic counts are positive."""
    for op, wl in workloads.WORKLOADS.items():
        for point in wl.points("tiny"):
            args = wl.build(point, CPU)
            with _backend.use_backend("reference"):
                result = getattr(torch.ops.kvkernels, op)(*workloads.clone_args(args))
            moved, flops = wl.traffic(point, args)
            assert moved > 0 and flops >= 0, op
            ok, why = wl.compare(wl.observe(result, args), wl.observe(result, args), args)
            assert ok, (op, why)
        for preset in ("small", "full"):
            assert wl.points(preset), (op, preset)


# ---------------------------------------------------------------------------------------------------
# Timing
def test_timing_median_spread_and_rotation():
    import time

    seen = []
    t = timing.time_rotating(lambda i: (seen.append(i), time.sleep(0.002)), 3, CPU, warmup=1, min_samples=4,
                             max_samples=4, target_ms=0)
    assert seen[:3] == [0, 1, 2] and set(seen) == {0, 1, 2} and len(seen) == 3 * 5  # 1 warm-up + 4 samples
    assert t.samples == 4 and t.calls_per_sample == 3
    assert 1.9 <= t.median_ms < 20 and t.p20_ms <= t.median_ms <= t.p80_ms
    s = timing.summarize([1.0, 2.0, 3.0, 4.0, 5.0], 1)
    assert (s.median_ms, s.p20_ms, s.p80_ms, s.min_ms) == pytest.approx((3.0, 1.8, 4.2, 1.0))
    assert timing.rotation_count(10**9, CPU) == 2
    assert timing.copy_bandwidth(CPU, 4 * 2**20) > 1e6


# ---------------------------------------------------------------------------------------------------
# Benchmark report
def test_speedup_pairing():
    from bench import report

    def row(impl, ctx, ms, **params):
        return {"family": "ragged", "op": "ragged_attention", "impl": impl, "context": ctx, "status": "ok",
                "median_ms": ms, "params": json.dumps(params)}

    rows = [row("kvkernels", 64, 1.0, N=64, keep=0.3), row("kvkernels", 64, 2.0, N=64, keep=0.6),
            row("sdpa_dense", 64, 4.0, N=64), row("sdpa_dense", 128, 9.0, N=128),
            row("flex_block_mask", 64, 3.0, N=64, keep=0.6)]
    pairs = {(r["params"], b["impl"]): s for r, b, s in report.speedups(rows, "sdpa_dense")}
    assert pairs == {(rows[0]["params"], "sdpa_dense"): 4.0, (rows[1]["params"], "sdpa_dense"): 2.0}
    (flex,) = report.speedups(rows, "flex_block_mask")
    assert flex[0] is rows[1] and flex[2] == 1.5


def test_bench_report_smoke(tmp_path):
    from bench import harness, report

    out = tmp_path / "results"
    rc = report.main(["--smoke", "--families", "ragged,topk", "--impls", "kvkernels,sdpa_dense,torch_topk,cupy",
                      "--out-dir", str(out), "--quiet", "--copy-bytes", str(2**20)])
    assert rc == 0
    with (out / "bench.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == harness.COLUMNS
        rows = list(reader)
    doc = json.loads((out / "bench.json").read_text())
    assert doc["columns"] == harness.COLUMNS and len(doc["rows"]) == len(rows)
    meta = doc["meta"]
    for key in ("command", "torch", "triton", "gpu", "copy_GBps", "date", "python"):
        assert key in meta, key
    assert "--smoke" in meta["command"] and meta["copy_GBps"] > 0

    by_impl = {}
    for r in rows:
        by_impl.setdefault(r["impl"], []).append(r)
    assert {r["status"] for r in by_impl["sdpa_dense"]} == {"ok"}
    assert {r["status"] for r in by_impl["torch_topk"]} == {"ok"}
    if _backend.cupy_available():
        assert {r["status"] for r in by_impl["cupy"]} == {"ok"}
    else:
        assert all(r["status"] == "skipped" and "CuPy" in r["detail"] for r in by_impl["cupy"])
    for r in by_impl["sdpa_dense"] + by_impl["torch_topk"]:
        assert float(r["median_ms"]) > 0 and int(r["bytes"]) > 0 and float(r["GBps"]) > 0
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert 0 < float(r["frac_of_copy"]) and r["copy_GBps"] == str(meta["copy_GBps"])
    # kvkernels rows ran under the interpreter, or say why not (a kernel module not written yet).
    for r in by_impl["kvkernels"]:
        assert r["status"] == "ok" or (r["status"] == "skipped" and "does not exist" in r["detail"]), r
    assert len(by_impl["kvkernels"]) == 4 + 2  # ragged: 2 contexts x 2 keep ratios; topk: 2 widths

    for name in report.PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_gpu_report_script_is_valid_bash():
    script = REPO / "bench" / "gpu_report.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)


# ---------------------------------------------------------------------------------------------------
# ncu CSV tables
NCU_RAW = '''==PROF== Connected to process 4242 (/usr/bin/python3)
==PROF== Disconnected from process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","sm__warps_active.avg.pct_of_peak_sustained_active","sm__maximum_warps_per_active_cycle_pct","launch__registers_per_thread"
"","","","","","","","","","","","byte","byte","nsecond","%","%","register/thread"
"0","4242","python3","127.0.0.1","_ragged_decode_kernel","1","7","(128, 1, 1)","(64, 8, 4)","0","9.0","2,000,000","1,000,000","1,500","40.5","50","96"
"1","4242","python3","127.0.0.1","_ragged_decode_kernel","1","7","(128, 1, 1)","(64, 8, 4)","0","9.0","2,000,000","1,000,000","1,000","41.5","50","96"
"2","4242","python3","127.0.0.1","_merge_kernel","1","7","(64, 1, 1)","(32, 1, 1)","0","9.0","100,000","0","n/a","20","100","32"
'''

NCU_LONG = '''"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","7","python3","h","kivi_attn","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","Mbyte","3.00"
"0","7","python3","h","kivi_attn","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","Kbyte","1,000.00"
"0","7","python3","h","kivi_attn","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","2.00"
"0","7","python3","h","kivi_attn","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","sm__warps_active.avg.pct_of_peak_sustained_active","%","62.5"
'''


def test_ncu_table_wide_csv():
    from profiles import ncu_table

    launches = ncu_table.parse(NCU_RAW)
    assert [l.kernel for l in launches] == ["_ragged_decode_kernel"] * 2 + ["_merge_kernel"]
    table = {r["kernel"]: r for r in ncu_table.summarize(launches)}
    decode = table["_ragged_decode_kernel"]
    assert decode["launches"] == 2 and decode["duration_us"] == pytest.approx(1.25)
    # 3 MB moved in 1.5 us and in 1.0 us: 2000 and 3000 GB/s, median 2500.
    assert decode["dram_GBps"] == pytest.approx(2500.0)
    assert decode["dram_MB"] == pytest.approx(3.0)
    assert decode["achieved_occupancy_pct"] == pytest.approx(41.0) and decode["theoretical_occupancy_pct"] == 50
    assert decode["registers"] == 96 and decode["grid"] == "(64, 8, 4)" and decode["block"] == "(128, 1, 1)"
    merge = table["_merge_kernel"]
    assert merge["duration_us"] is None and merge["dram_GBps"] is None  # "n/a" is not a number
    md = ncu_table.to_markdown(list(table.values()))
    assert md.count("\n") == 3 and "| _merge_kernel | 1 |" in md and "2500" in md


def test_ncu_table_long_csv_normalises_units(tmp_path, capsys):
    from profiles import ncu_table

    path = tmp_path / "ncu.csv"
    path.write_text(NCU_LONG)
    (row,) = ncu_table.summarize(ncu_table.parse(path.read_text()))
    assert row["kernel"] == "kivi_attn" and row["duration_us"] == pytest.approx(2.0)
    assert row["dram_MB"] == pytest.approx(4.0)  # 3 Mbyte + 1,000 Kbyte
    assert row["dram_GBps"] == pytest.approx(2000.0)  # 4 MB in 2 us
    assert row["achieved_occupancy_pct"] == pytest.approx(62.5)
    assert ncu_table.main([str(path), "--csv-out", str(tmp_path / "t.csv")]) == 0
    assert "kivi_attn" in capsys.readouterr().out
    assert next(csv.DictReader((tmp_path / "t.csv").open()))["dram_GBps"] == "2000"
    with pytest.raises(ValueError):
        ncu_table.parse("no csv here\n")


# ---------------------------------------------------------------------------------------------------
# Profiler scripts: graceful without the tools, and the ncu flow with a stand-in ncu
def _fake_tool(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_profile_scripts_are_graceful_without_reports(tmp_path, monkeypatch, capsys):
    from profiles import profile

    monkeypatch.setenv("KVKERNELS_NCU", str(tmp_path / "absent-ncu"))
    assert profile.main(["ncu", "--family", "topk", "--out-dir", str(tmp_path / "a")]) == 0
    assert "not found" in capsys.readouterr().err
    # An nsys that records a raw trace but cannot build a report, as on Firecracker machines.
    nsys = _fake_tool(tmp_path, "nsys", 'while [ $# -gt 0 ]; do [ "$1" = --output ] && out=$2; shift; done\n'
                      'touch "$out.qdstrm"; echo "Importer error" >&2; exit 1\n')
    monkeypatch.setenv("KVKERNELS_NSYS", str(nsys))
    assert profile.main(["nsys", "--family", "topk", "--out-dir", str(tmp_path / "b")]) == 0
    assert "could not turn it into a report" in capsys.readouterr().err


def test_profile_ncu_flow_with_stand_in_ncu(tmp_path, monkeypatch, capsys):
    from profiles import profile

    canned = tmp_path / "canned.csv"
    canned.write_text(NCU_RAW)
    # Stand-in ncu: profiling writes the report file; --import prints the canned CSV.
    ncu = _fake_tool(tmp_path, "ncu", f'''
case " $* " in *" --import "*) cat "{canned}"; exit 0;; esac
while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done
echo "==PROF== profiling"; touch "$out.ncu-rep"
''')
    monkeypatch.setenv("KVKERNELS_NCU", str(ncu))
    out = tmp_path / "prof"
    assert profile.main(["ncu", "--family", "ragged", "--kernel", "ragged", "--out-dir", str(out)]) == 0
    md = (out / "ncu.md").read_text()
    assert "_ragged_decode_kernel" in md and "2500" in md
    logged = (out / "ncu.log").read_text()
    assert "--clock-control none" in logged and "regex:ragged" in logged and "profiles.target" in logged


# ---------------------------------------------------------------------------------------------------
# NVTX ranges
def test_nvtx_range_is_a_noop_without_nvtx(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvtx", None)  # `import nvtx` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _nvtx.reset()
    try:
        with _nvtx.range("score"):
            with _nvtx.range("select"):
                pass
        assert _nvtx.source() == "none" and not _nvtx.enabled()
        with pytest.raises(KeyError):
            with _nvtx.range("attend"):
                raise KeyError("errors pass through the range")
    finally:
        _nvtx.reset()


def test_nvtx_range_pushes_and_pops_with_nvtx_package(monkeypatch):
    events = []

    class Domain:
        def push_range(self, message=None, **_):
            events.append(("push", message))

        def pop_range(self):
            events.append(("pop",))

    domains = {}
    fake = types.SimpleNamespace(get_domain=lambda name: domains.setdefault(name, Domain()))
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    _nvtx.reset()
    try:
        with _nvtx.range("compact"):
            with pytest.raises(RuntimeError):
                with _nvtx.range("append"):
                    raise RuntimeError("boom")
        assert _nvtx.source() == "nvtx" and list(domains) == ["kvkernels"]
        assert events == [("push", "compact"), ("push", "append"), ("pop",), ("pop",)]
        monkeypatch.setenv("KVKERNELS_NVTX", "0")
        _nvtx.reset()
        with _nvtx.range("ignored"):
            pass
        assert _nvtx.source() == "disabled" and len(events) == 4
    finally:
        _nvtx.reset()


def test_headline_cases_cover_tier1_numbers():
    """bench/gpu_report.sh --tier 1 runs `bench.report --families headline`: its cases are the issue's numbers."""
    from bench import cases

    got = {(c.op, c.impl) for c in cases.headline_cases(smoke=False)}
    for pair in [("ragged_attention", "kvkernels"), ("ragged_attention", "sdpa_dense"),
                 ("kivi_attention", "kvkernels"), ("kivi_attention", "sdpa_dense"),
                 ("kvzip_score", "kvkernels"), ("kvzip_score", "sdpa_dense"),
                 ("topk_mask", "kvkernels"), ("topk_mask", "torch_topk")]:
        assert pair in got, pair
    ragged = [c for c in cases.headline_cases(smoke=False) if c.impl == "kvkernels" and c.op == "ragged_attention"]
    assert ragged[0].params["keep"] == 0.3
    topk = [c for c in cases.headline_cases(smoke=False) if c.op == "topk_mask"]
    assert topk[0].params["M"] == 10**8
    assert "headline" in cases.CASES and "headline" not in cases.FAMILIES
