#!/usr/bin/env bash
# The one prepared command for a GPU machine lent for a few minutes: `binner bench -s gpu --quick --json` (under
# 5 minutes on one H100-class GPU, docs/benchmarks.md "GPU"), with nothing fetched there.
#
# Prepare on the development machine: scripts/device_wheels.sh (fills .whl/ and .shared/, both git-ignored), then
# carry both with the checkout. On the GPU machine, from anywhere:  bash scripts/device_check.sh
# (through the device tool: run(command="bash scripts/device_check.sh", carry=[".whl", ".shared"], timeout_s=420)).
# Writes under $OUT (default /tmp/binner-device-out): gpu.json (the report), gpu-partial.json (rewritten after every step, so a
# run cut off keeps its figures), bench.log (the scenario's step lines and warnings), nvidia-smi*.txt, python.txt.
# Exit status: 2 nothing carried, 3 a requirement missing (one "device_check: MISSING" line each, within seconds),
# otherwise the bench's (124: the hard stop below).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${TMPDIR:-/tmp}/binner-device-out}"
PYTHON="${PYTHON:-python3}"
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-330}"  # the quick plan starts no step after 230 s; this is the hard stop
mkdir -p "$OUT"

shopt -s nullglob
wheels=(.whl/*.whl)
if [ "${#wheels[@]}" -eq 0 ]; then
    echo "device_check: no wheels in .whl/; run scripts/device_wheels.sh on the development machine and carry .whl" >&2
    exit 2
fi
if [ ! -d .shared/data/images ]; then
    echo "device_check: .shared/data/images is missing; carry a copy of ../shared as .shared (scripts/device_wheels.sh)" >&2
    exit 2
fi

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/binner-device.XXXXXX")"
SITE="$SCRATCH/site"
if "$PYTHON" -m pip --version > /dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "${wheels[@]}" || {
        echo "device_check: the wheels in .whl/ do not install here; scripts/device_wheels.sh downloads them for" \
             "Python 3.12 and this is $("$PYTHON" -V 2>&1)" >&2
        exit 3
    }
else  # no pip there: a wheel is a zip archive whose top level is what goes on the import path
    "$PYTHON" -c 'import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])' "$SITE" "${wheels[@]}"
fi
export PYTHONPATH="$SITE:$PWD"
export YOLO_OFFLINE=1 YOLO_CONFIG_DIR="$SCRATCH/ultralytics" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export BINNER_BENCH_PARTIAL="$OUT/gpu-partial.json"
mkdir -p "$YOLO_CONFIG_DIR"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv \
    >> "$OUT/nvidia-smi.txt" 2>&1 || true
# What the report depends on, checked before the clock: every module and API the scenario's code uses, and CUDA.
"$PYTHON" scripts/device_preflight.py > "$OUT/python.txt" 2>&1 || { cat "$OUT/python.txt" >&2; exit 3; }
cat "$OUT/python.txt"

status=0
timeout --kill-after=20 "$BENCH_TIMEOUT_S" "$PYTHON" -m app.cli bench -s gpu --quick --json \
    --config deploy/examples/offline-cpu.yaml --source .shared/data/images \
    > "$OUT/gpu.json" 2> "$OUT/bench.log" || status=$?
nvidia-smi > "$OUT/nvidia-smi-after.txt" 2>&1 || true
grep '^\[bench gpu\]' "$OUT/bench.log" || true
tail -n 20 "$OUT/bench.log"
echo "device_check: exit status $status; report $OUT/gpu.json, partial $OUT/gpu-partial.json"
exit "$status"
