#!/usr/bin/env bash
# The GPU check of ntkit: the CUDA tests and the GPU benchmarks, one report, < 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Needs only torch (with CUDA), pytest, numpy, scipy, scikit-learn, tqdm and click:
# no dask, zarr or network; ntkit is taken from src/ (PYTHONPATH), not installed.
# Writes to $OUT (default ./gpu_out): report.md (the Markdown report), pytest_cuda.txt
# (raw pytest output) and pytest_cuda.xml, each step's JSON and log, steps.tsv.
# Every step runs under its own timeout; a step that fails or hangs is recorded in
# the report and the script goes on. It exits 0 once the report is written.
#
# Settings (environment): NTKIT_GPU_CHECK_DEVICE (default cuda), NTKIT_GPU_CHECK_SIZE
# (full or tiny; default full), NTKIT_GPU_CHECK_PYTEST (0 skips the CUDA tests),
# NTKIT_GPU_CHECK_PYTHON (default python).
set -u

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-./gpu_out}"
DEVICE="${NTKIT_GPU_CHECK_DEVICE:-cuda}"
SIZE="${NTKIT_GPU_CHECK_SIZE:-full}"
PY="${NTKIT_GPU_CHECK_PYTHON:-python}"
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, output in $OUT/NAME.log,
# and records "NAME, exit status, seconds, limit" in steps.tsv (124: timed out).
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit} s)"
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" >> "$OUT/steps.tsv"
    echo "   exit $rc after $(( $(date +%s) - start )) s"
}

bench() {   # bench STEP LIMIT_S: repetitions stop at half the limit (warm-ups come first)
    step "$1" "$2" "$PY" benchmarks/gpu_bench.py "$1" --out "$OUT" --device "$DEVICE" \
        --size "$SIZE" --budget-s $(( $2 / 2 ))
}

# Limits add up to 400 s (+ 5 s of grace per step, + 20 s for the report): under 8 minutes.
bench env 20
if [ "${NTKIT_GPU_CHECK_PYTEST:-1}" != "0" ]; then
    # the test files that use a CUDA device; files needing dask/zarr skip themselves
    # (pytest.importorskip), and a file that cannot be collected does not stop the rest
    files=$(grep -rlE "torch\.cuda|\.cuda\(\)|\"cuda\"" tests --include='test_*.py' | sort)
    step pytest_cuda 130 "$PY" -m pytest -q -rA -p no:cacheprovider \
        --continue-on-collection-errors -k "cuda or device" \
        --junitxml "$OUT/pytest_cuda.xml" $files
    cp "$OUT/pytest_cuda.log" "$OUT/pytest_cuda.txt"
else
    printf 'pytest_cuda\tskipped\t0\t130\n' >> "$OUT/steps.tsv"
fi
bench myrtle 60
bench cnn_gap21 80
bench entk 60
bench predict 50
timeout 20 "$PY" benchmarks/gpu_bench.py report --out "$OUT" || {
    echo "the report could not be written; see $OUT/*.log" >&2
    exit 1
}
echo "report: $OUT/report.md"
