#!/usr/bin/env bash
# One device call that verifies and benchmarks attnkit on a GPU and leaves the result sets
# in $OUT/results.tar.gz (one archive: the device tool returns at most 8 files). Each step
# has its own time limit and the archive is rewritten after each, so a cut-off run still
# returns what finished; bench writes its results after every config.
#   usage: bash benchmarks/gpu_run.sh PREFIX   (e.g. h100: dirs h100-notebook-bf16, ...)
set -u
prefix=${1:-gpu}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
results=/tmp/attnkit-results
mkdir -p "$results" "${OUT:=/tmp/out}"
ak() { python3 -m attnkit.cli "$@"; }
pack() { tar czf "$OUT/results.tar.gz" -C "$results" .; }

{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} > "$results/versions.txt" 2>&1
cat "$results/versions.txt"

# Correctness first, both dtypes at once (they only compile and compare; no timing).
timeout "${VERIFY_S:-150}" python3 -m attnkit.cli verify --dtype bfloat16 \
    --out "$results/$prefix-verify-bf16" > "$results/verify-bf16.log" 2>&1 &
timeout "${VERIFY_S:-150}" python3 -m attnkit.cli verify --dtype float32 \
    --out "$results/$prefix-verify-fp32" > "$results/verify-fp32.log" 2>&1 &
wait
pack
tail -n 4 "$results"/verify-*.log

# Timing, one at a time.
step() {  # step SECONDS NAME ARGS...
    local seconds=$1 name=$2
    shift 2
    timeout "$seconds" python3 -m attnkit.cli bench --no-progress "$@" \
        --out "$results/$prefix-$name" > "$results/$name.log" 2>&1
    echo "$name: exit $?"
    pack
}
step "${NB_S:-60}" notebook-bf16 --preset notebook --dtype bfloat16
step "${BERT_S:-45}" bert-bf16 --preset bert --dtype bfloat16
step "${CORE_S:-120}" core-bf16 --preset core --dtype bfloat16
step "${NB_S:-60}" notebook-fp32 --preset notebook --dtype float32
step "${BERT_S:-45}" bert-fp32 --preset bert --dtype float32
[ "${CORE32_S:-60}" -gt 0 ] && step "${CORE32_S:-60}" core-fp32 --preset core --dtype float32
ls -R "$results" | head -60
