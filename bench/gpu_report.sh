#!/usr/bin/env bash
# GPU report in tiers, sized for a GPU lent for ~15 minutes in all (machine start-up included):
#
#   --tier 1   (<= 5 min on an H100/H200, Triton compilation included) GPU-only correctness tests (the ones
#              CPU CI skips: bf16, compiled Triton, CUDA graphs, CuPy) and the headline measurements
#              (bench/cases.py headline_cases: ragged decode at keep 0.3 vs SDPA on the full cache with
#              GB/s vs a measured copy; fused KIVI-2 vs SDPA at 32K; kvzip_score vs one SDPA forward;
#              topk_mask over 1e8 scores), then the hooks other branches add: the fused quantized ragged
#              decode case (a bench/cases.py family named by KVK_QPOOL_FAMILY, default: the first family
#              whose name starts with "quant") and a CUDA-graph decode-step script (KVK_GRAPH_SCRIPT, default:
#              the first of bench/*graph*decode*.py, bench/*cuda_graph*.py), each skipped with a line if absent.
#   --tier 2   (<= 4 min) autotune the decode kernels (ragged_attention, kivi_attention; candidates that
#              cannot launch are pruned statically and listed), then the demo on the GPU.
#   --tier 12  both, tier 1 first (the default).
#   --tier full  the previous 9-minute report: all tests, autotune, every benchmark, plots, ncu/nsys.
#
# Every result is written into OUT_DIR as soon as it exists (bench.csv after every case, junit.xml, the
# autotune JSON after every grid point, summary.md rewritten after every stage), so a run cut short keeps
# what finished. Files: summary.md, report.log, junit.xml, bench.csv, bench.json, autotune.json, demo.txt
# (+ plots.tar.gz, profile.tar.gz for --tier full).
#
# usage: bench/gpu_report.sh [--tier 1|2|12|full] OUT_DIR
#   env: PYTHON (default /opt/torch/.venv/bin/python3 or python3), KVK_REPORT_BUDGET (seconds; default 300
#        for tier 1, 240 for tier 2, 540 for 12, 520 for full), KVK_AUTOTUNE_GRID=small,
#        KVK_REPORT_TESTS (pytest paths), KVK_REPORT_SKIP_INSTALL=1 (already installed; e.g. a CPU dry run),
#        KVK_QPOOL_FAMILY, KVK_GRAPH_SCRIPT (see above)
# Every stage runs under `timeout`; stages after the budget is spent are recorded as skipped.
set -u

TIER=full
if [ "${1:-}" = "--tier" ]; then TIER=${2:-}; shift 2; else TIER=12; fi
case $TIER in 1|2|12|full) ;; *) echo "usage: $0 [--tier 1|2|12|full] OUT_DIR" >&2; exit 2 ;; esac
if [ $# -lt 1 ]; then echo "usage: $0 [--tier 1|2|12|full] OUT_DIR" >&2; exit 2; fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x /opt/torch/.venv/bin/python3 ]; then PY=/opt/torch/.venv/bin/python3
else PY=python3; fi
case $TIER in 1) DEFAULT_BUDGET=300 ;; 2) DEFAULT_BUDGET=240 ;; 12) DEFAULT_BUDGET=540 ;; *) DEFAULT_BUDGET=520 ;; esac
BUDGET=${KVK_REPORT_BUDGET:-$DEFAULT_BUDGET}
RESERVE=15                      # seconds kept for the summary and packing
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvk_report.XXXXXX")
LOG="$OUT/report.log"
STAGES="$WORK/stages.tsv"
: > "$LOG"; : > "$STAGES"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MPLBACKEND=Agg
cd "$REPO" || exit 2

elapsed() { echo $(( $(date +%s) - START )); }
# inner_budget LIMIT MARGIN: seconds a stage's own --budget-s may use, so that it ends cleanly (writing
# its results) before `timeout` would stop it: min(LIMIT, what is left) - MARGIN, at least 5.
inner_budget() {
  local left=$(( BUDGET - RESERVE - $(elapsed) )) b=$1
  if [ "$left" -lt "$b" ]; then b=$left; fi
  b=$(( b - $2 )); if [ "$b" -lt 5 ]; then b=5; fi
  echo "$b"
}

# stage NAME LIMIT CMD... : run CMD with at most LIMIT seconds (less if the budget is nearly spent).
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - RESERVE - $(elapsed) ))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped (time budget spent)\t0\t0\n' "$name" >> "$STAGES"
    echo "=== $name: skipped, time budget spent ===" >> "$LOG"
    return 0
  fi
  echo "=== $name (limit ${limit}s, at $(elapsed)s): $* ===" >> "$LOG"
  local t0=$(date +%s) rc status
  timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit" >> "$STAGES"
  echo "=== $name: $status after $(( $(date +%s) - t0 ))s ===" >> "$LOG"
  return 0
}

# --- environment --------------------------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)   repo: $REPO   python: $PY"
  (git -C "$REPO" rev-parse --short HEAD 2>/dev/null | sed 's/^/commit: /') || true
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | head -2
  else echo "nvidia-smi: not found"; fi
  "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("triton", "cupy-cuda13x", "cupy-cuda12x", "numpy", "pytest", "pytest-benchmark", "matplotlib",
             "tqdm", "nvtx"):
    try:
        print(f"{name} {md.version(name)}", end=" | ")
    except md.PackageNotFoundError:
        print(f"{name} absent", end=" | ")
print()
EOF
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt" >> "$LOG"

# --- install without fetching ---------------------------------------------------------------------
install_pkg() {
  "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$REPO" && \
    "$PY" -c "import kvkernels, kvkernels.reference.topk, autotune; print('installed', kvkernels.__file__)"
}
if [ "${KVK_REPORT_SKIP_INSTALL:-0}" = 1 ]; then
  printf 'install\tskipped (KVK_REPORT_SKIP_INSTALL=1)\t0\t0\n' >> "$STAGES"
else
  stage install 120 install_pkg
fi
if ! "$PY" -c "import kvkernels.reference.topk, autotune" >/dev/null 2>&1; then
  # pip could not install: an overlay folder maps reference/ to kvkernels.reference, as setup.py does.
  OV="$WORK/pypath"; mkdir -p "$OV/kvkernels"
  for f in "$REPO"/kvkernels/*; do ln -s "$f" "$OV/kvkernels/"; done
  ln -s "$REPO/reference" "$OV/kvkernels/reference"
  export PYTHONPATH="$OV:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  echo "=== install: pip failed; using PYTHONPATH overlay $OV ===" >> "$LOG"
  printf 'install-fallback\tPYTHONPATH overlay\t0\t0\n' >> "$STAGES"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # bench/ and profiles/ are run from the tree

summarise() {  # summary.md after every stage: a run stopped from outside keeps an up-to-date summary
  "$PY" -m bench.summary "$OUT" "$STAGES" "$WORK/profile" >> "$LOG" 2>&1 || echo "summary failed" >> "$LOG"
}
mkdir -p "$WORK/profile"
cp "$WORK/env.txt" "$WORK/profile/env.txt" 2>/dev/null
TEST_ARGS=(-q -p no:cacheprovider --durations=15 --junitxml="$OUT/junit.xml")
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then TEST_ARGS+=(--timeout=120); fi
KERNEL_TESTS="tests/test_ragged_attention.py tests/test_kivi.py tests/test_kvzip_score.py tests/test_topk.py tests/test_pool.py tests/test_lowrank.py tests/test_kivi_cache.py"

tier1() {
  # GPU-only correctness: the tests CPU CI skips (bench/gpu_only.py keeps exactly those).
  stage gpu-tests 120 "$PY" -m pytest -p bench.gpu_only ${KVK_REPORT_TESTS:-$KERNEL_TESTS} "${TEST_ARGS[@]}"
  summarise
  # Headline numbers, written to bench.csv after every case.
  stage headline 120 "$PY" -m bench.report --families headline --out-dir "$OUT" --no-plots --no-progress \
    --budget-s "$(inner_budget 120 20)"
  summarise
  local fam=${KVK_QPOOL_FAMILY:-$("$PY" -c "import bench.cases as c; print(next((f for f in c.CASES if f.startswith('quant')), ''))" 2>/dev/null)}
  if [ -n "$fam" ]; then
    stage quant-ragged-decode 45 "$PY" -m bench.report --families "$fam" --out-dir "$WORK/qpool" --no-plots \
      --no-progress --budget-s "$(inner_budget 45 10)"
    cp "$WORK/qpool/bench.csv" "$OUT/bench_${fam}.csv" 2>/dev/null
  else
    printf 'quant-ragged-decode\tskipped (no quantized ragged decode family in bench/cases.py yet)\t0\t0\n' >> "$STAGES"
  fi
  local graph=${KVK_GRAPH_SCRIPT:-$(ls bench/*graph*decode*.py bench/*cuda_graph*.py 2>/dev/null | head -1)}
  if [ -n "$graph" ] && [ -f "$graph" ]; then
    stage cuda-graph-decode 45 "$PY" "$graph"
  else
    printf 'cuda-graph-decode\tskipped (no CUDA-graph decode-step script under bench/ yet)\t0\t0\n' >> "$STAGES"
  fi
  summarise
}

tier2() {
  # Decode kernels only; --budget-s makes the autotuner stop between grid points and write what it has.
  stage autotune-decode 150 "$PY" -m autotune --grid "${KVK_AUTOTUNE_GRID:-small}" \
    --ops ragged_attention,kivi_attention --budget-s "$(inner_budget 150 25)" --quiet --out "$OUT/autotune.json"
  if [ -f "$OUT/autotune.json" ]; then export KVKERNELS_TUNING_FILE="$OUT/autotune.json"; fi
  summarise
  stage demo 80 bash -c "\"$PY\" -m kvkernels demo > \"$OUT/demo.txt\" 2>&1"
  summarise
}

tier_full() {
# --- tests: compiled Triton, bf16, torch.compile, CUDA graphs, CuPy (all enabled by the GPU) -------
TEST_ARGS=(-q -p no:cacheprovider --durations=15 --junitxml="$OUT/junit.xml")
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then TEST_ARGS+=(--timeout=120); fi
stage tests 230 "$PY" -m pytest ${KVK_REPORT_TESTS:-tests} "${TEST_ARGS[@]}"

# --- autotune a small grid; the benchmarks then use its winners ------------------------------------
# Decode kernels first: if the budget runs out, the ops the benchmarks care most about are tuned.
TUNE_OPS=ragged_attention,kivi_attention,topk_mask,kvzip_score,compact_kv,ragged_append,kivi_quantize,kivi_dequantize,lowrank_residual
stage autotune 110 "$PY" -m autotune --grid "${KVK_AUTOTUNE_GRID:-small}" --ops "$TUNE_OPS" --max-configs 4 \
  --budget-s "$(inner_budget 110 30)" --quiet --out "$OUT/autotune.json"
if [ -f "$OUT/autotune.json" ]; then export KVKERNELS_TUNING_FILE="$OUT/autotune.json"; fi

# --- benchmarks and plots -----------------------------------------------------------------------
stage bench 150 "$PY" -m bench.report --out-dir "$WORK/bench" --budget-s "$(inner_budget 150 35)" --no-progress
cp "$WORK/bench/bench.csv" "$WORK/bench/bench.json" "$OUT/" 2>/dev/null
(cd "$WORK/bench" 2>/dev/null && tar czf "$OUT/plots.tar.gz" ./*.png) 2>>"$LOG"

# --- profiles: ncu on one decode case (works on Firecracker with --clock-control none); nsys try ---
mkdir -p "$WORK/profile"
stage ncu 90 "$PY" -m profiles.profile ncu --family ragged --match N16384 --launch-count 12 --timeout 80 \
  --out-dir "$WORK/profile"
stage nsys 45 "$PY" -m profiles.profile nsys --family ragged --match N16384 --timeout 40 --out-dir "$WORK/profile"
stage pytest-benchmark 40 "$PY" -m pytest bench/test_bench_topk.py -q -p no:cacheprovider \
  --benchmark-json="$WORK/profile/pytest_benchmark_topk.json"

}

case $TIER in
  1) tier1 ;;
  2) tier2 ;;
  12) tier1; tier2 ;;
  full) tier_full ;;
esac

# --- summary and packing --------------------------------------------------------------------------
summarise
# .ncu-rep / .nsys-rep can be large: keep them only while the tarball stays small.
if [ "$TIER" = full ]; then
  (cd "$WORK/profile" && tar czf "$OUT/profile.tar.gz" . ) 2>>"$LOG"
  if [ -f "$OUT/profile.tar.gz" ] && [ "$(stat -c %s "$OUT/profile.tar.gz")" -gt $((12 * 1024 * 1024)) ]; then
    (cd "$WORK/profile" && tar czf "$OUT/profile.tar.gz" --exclude='*.ncu-rep' --exclude='*.nsys-rep' \
      --exclude='*.qdstrm' .) 2>>"$LOG"
  fi
fi
echo "=== done in $(elapsed)s; files: $(ls "$OUT" | tr '\n' ' ') ===" >> "$LOG"
tail -n 1 "$LOG"
cat "$STAGES"
rm -rf "$WORK"
exit 0
