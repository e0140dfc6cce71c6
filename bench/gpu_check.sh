#!/usr/bin/env bash
# One prepared check for a lent H100/H200, within about 6 minutes in all:
#   1. install (offline, editable; a PYTHONPATH shim if the editable install fails), a
#      preflight import of every dependency, and the machine: nvidia-smi, pip freeze, versions
#   2. the GPU tests              pytest -m gpu (triton backend and attention first)
#   3. the kernel benchmark       bench/bench_kernels.py --no-compile
#   4. the throughput benchmark   moon3-2b bf16, batch 1,16,64, short durations: moon3rt
#                                 backends and the transformers peer
#   5. reasoning mode             generated tokens/s and decode bandwidth, batch 64
#   6. optional (COMPILE=1)       torch.compile of the reference in a run of its own, whose
#                                 report includes step 4's rows (compiling a 2B model with
#                                 per-segment loops rarely fits the budget)
#   7. optional (ALL_TESTS=1)     pytest -m "not gpu" tests/, in whatever time is left
# Each stage runs under `timeout`, sized to what is left of the budget; a failing or hung
# stage is recorded with its exit code (124 = timed out) and the next one runs.
#
# Everything lands in $OUT (default ./out): summary.txt (stages, exit codes, the throughput
# tables), the throughput JSON and PNG files, the kernel benchmark's JSON, and logs.tgz with
# every log, JSON, PNG, nvidia-smi and pip freeze. (Seven files at most, on purpose: the
# device tool returns no more than 8.)
#
#   MOON3RT_GIT_COMMIT=$(git rev-parse HEAD) bash bench/gpu_check.sh   # the copy there has no .git
#
# Knobs (environment): BUDGET_S (360), DURATION (seconds per measurement, 2), MODEL
# (moon3-2b), DTYPE (bf16), BATCH_SIZES (1,16,64), SKIP_BACKENDS (moon3rt backends too slow
# to set up in the budget: onnxruntime exports a 2B model to fp32 ONNX first, tensorrt
# builds an engine), PYTHON (python3), INSTALL=0 (skip the pip install), KEEP_RAW=1,
# COMPILE=1, ALL_TESTS=1.
# A dry run on a CPU machine:
#   INSTALL=0 MODEL=moon3-tiny DTYPE=fp32 BATCH_SIZES=1,2 OUT=/tmp/gc bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-360}
DURATION=${DURATION:-2}
MODEL=${MODEL:-moon3-2b}
DTYPE=${DTYPE:-bf16}
BATCH_SIZES=${BATCH_SIZES:-1,16,64}
SKIP_BACKENDS=${SKIP_BACKENDS:-onnxruntime,tensorrt}
PY=${PYTHON:-python3}
OUT=${OUT:-./out}
RAW="$OUT/raw"
mkdir -p "$RAW"
SUMMARY="$OUT/summary.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME CAP_S CMD...: run CMD with a timeout of min(CAP_S, time left - 15 s), log to $RAW/NAME.log
stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START) - 15))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        note "$(printf '%-22s %6s %7s  %s' "$name" skip - "no time left in the ${BUDGET_S} s budget")"
        return 0
    fi
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$RAW/$name.log" 2>&1
    local rc=$?
    local why=""
    [ $rc -eq 124 ] && why="timed out after ${limit} s"
    note "$(printf '%-22s %6s %6ss  %s' "$name" "rc=$rc" "$(($(date +%s) - t0))" "$why")"
    return 0
}

note "moon3rt gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET_S} s"
note "$(printf '%-22s %6s %7s  %s' stage exit time note)"

if [ "${INSTALL:-1}" = 1 ]; then
    stage install 90 $PY -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e .
fi
if ! $PY -c "import moon3rt.kernels, moon3rt.export" 2>/dev/null; then
    # moon3rt.kernels/export exist through setuptools' package-dir mapping; without the
    # editable install, a folder of links gives the same package layout.
    SHIM=$(mktemp -d)
    mkdir -p "$SHIM/moon3rt"
    for f in "$PWD"/moon3rt/*; do ln -s "$f" "$SHIM/moon3rt/"; done
    ln -s "$PWD/kernels" "$SHIM/moon3rt/kernels"
    ln -s "$PWD/export" "$SHIM/moon3rt/export"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    note "editable install unavailable: using the package shim at $SHIM"
fi
stage preflight 30 $PY -c "import PIL, tqdm, safetensors, tokenizers, transformers, triton, torch, moon3rt, moon3rt.kernels
print('imports ok')"
stage nvidia-smi 20 nvidia-smi
stage pip-freeze 30 $PY -m pip freeze
stage versions 30 $PY -c "
import torch, triton, transformers, moon3rt
from moon3rt.backends import BACKENDS
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
      'transformers', transformers.__version__, 'moon3rt', moon3rt.__version__)
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device',
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else '')
print('backends', ','.join(BACKENDS))"

PYTEST=(-m pytest -q -rfE --durations=15 -p no:cacheprovider --continue-on-collection-errors)
stage gpu-tests 120 $PY "${PYTEST[@]}" -m gpu tests/test_triton_backend.py tests/test_varlen_attention.py tests/


if [ -f bench/bench_kernels.py ]; then
    stage bench-kernels 35 $PY bench/bench_kernels.py --no-compile --out-dir "$RAW"
else
    note "$(printf '%-22s %6s %7s  %s' bench-kernels skip - 'bench/bench_kernels.py does not exist')"
fi

BACKENDS=$($PY -c "
from moon3rt.backends import BACKENDS
skip = set('$SKIP_BACKENDS'.split(','))
print(','.join(b for b in BACKENDS if b not in skip))" 2>/dev/null || echo torch)
COMMON=(--model "$MODEL" --dtype "$DTYPE" --batch-sizes "$BATCH_SIZES" --duration "$DURATION" --warmup 0.5 --out-dir "$RAW")
stage throughput 120 $PY bench/throughput.py "${COMMON[@]}" --backends "$BACKENDS,transformers" --no-compile

# reasoning mode: generated tokens/s and decode bandwidth at the largest batch size
stage throughput-reasoning 45 $PY bench/throughput.py --model "$MODEL" --dtype "$DTYPE" --batch-sizes 64 \
    --backends "torch,triton" --skip-peers --reasoning-only --reasoning-tokens 64 --no-plot --out-dir "$RAW/reasoning"

if [ "${COMPILE:-0}" = 1 ]; then
    # torch.compile alone, its rows set beside the first run's (table, plot and goals in one report)
    MAIN_JSON=$(ls -t "$RAW"/throughput-*.json 2>/dev/null | head -1)
    stage throughput-compile 150 $PY bench/throughput.py "${COMMON[@]}" --backends torch.compile \
        ${MAIN_JSON:+--include-results "$MAIN_JSON"}
fi
if [ "${ALL_TESTS:-0}" = 1 ]; then
    stage tests-not-gpu 300 $PY "${PYTEST[@]}" -m "not gpu" tests/
fi

# ------------------------------------------------------------------- summary and packing
for name in throughput throughput-compile throughput-reasoning; do
    if [ -f "$RAW/$name.log" ]; then
        { echo; echo "===== $name (stdout tables; progress lines dropped)"; grep -Ev '^\[throughput\]|^[WIEV][0-9]{4} ' "$RAW/$name.log" | tail -80; } >> "$SUMMARY"
    fi
done
for name in gpu-tests tests-not-gpu bench-kernels; do
    if [ -f "$RAW/$name.log" ]; then
        { echo; echo "===== $name (last lines)"; tail -25 "$RAW/$name.log"; } >> "$SUMMARY"
    fi
done
cp "$RAW"/throughput-*.json "$RAW"/throughput-*.png "$RAW"/kernels-*.json "$OUT"/ 2>/dev/null
for f in "$RAW"/reasoning/throughput-*.json; do [ -f "$f" ] && cp "$f" "$OUT/reasoning-$(basename "$f")"; done
tar -czf "$OUT/logs.tgz" -C "$OUT" raw
[ "${KEEP_RAW:-0}" = 1 ] || rm -rf "$RAW"
echo "gpu_check done in $(($(date +%s) - START)) s; files in $OUT:"
ls -la "$OUT"
