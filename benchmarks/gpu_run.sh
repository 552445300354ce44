#!/usr/bin/env bash
# Verify and benchmark attnkit on a GPU inside device calls of at most 10 minutes, leaving
# the result sets in $OUT/results.tar.gz (one archive: the device tool returns at most 8
# files). Each step has its own time limit and the archive is rewritten after each, so a
# cut-off run still returns what finished; bench also writes its results after every config.
#
#   bash benchmarks/gpu_run.sh PREFIX [STEP ...]     (no STEP: all of them, in this order)
#   steps: verify notebook-bf16 bert-bf16 core-bf16 notebook-fp32 bert-fp32 core-fp32 memcheck
#   and, not in the default list, for kernel work on `triton`: triton-configs (every kernel
#   under every candidate tile config, ~4 minutes), triton-tuned (the same shapes, only
#   what the autotuner picks, ~1 minute), triton-kernel (benchmarks/triton_kernel.py:
#   large-shape checks against the oracle, then timings beside SDPA), verify-fp16 (verify
#   of `triton` alone in float16), host-overhead (benchmarks/host_overhead.py: host time
#   per call of sdpa, triton and flex on a tiny input, and a profile of triton's),
#   triton-registers (benchmarks/triton_registers.py under the machine's own Triton:
#   registers and spills per kernel and tile config, D=64/128, full/causal, MHA/GQA,
#   and the forward with TMA loads), fwd-bwd-gap (benchmarks/fwd_bwd_gap.py: triton's
#   forward+backward kernels timed alone against attention() + autograd, profiled),
#   decode (benchmarks/decode.py: decoding steps, K/V bytes per second against a copy),
#   decode-splits (decode.py --splits: the forward's GPU time per key-range count),
#   gpu-tests (pytest -m gpu: the tests that need a GPU; cold on an H200 in run 25 the 17
#   of them needed more than one 600 s call: the large shapes ~190 s, each Gluon forward
#   config test ~100 s; GPU_TESTS_ARGS adds pytest arguments, e.g. "-k hopper", or
#   "-n 4" to compile in four processes with pytest-xdist, not yet tried), kernel-variants
#   (benchmarks/kernel_variants.py: fused_triton's code variants timed in turns),
#   gluon-forward (benchmarks/gluon_forward.py: the Gluon forward's tile configs checked
#   against the oracle, then timed beside the Triton forward; GLUON_ARGS adds arguments,
#   e.g. "--shape 4,32,4096,64,1 --config 64,3,3,0"), gluon-dq (benchmarks/gluon_dq.py,
#   the Gluon dQ experiment: oracle checks, then the A/B against the Triton dQ kernel),
#   gluon-dkdv (benchmarks/gluon_dkdv.py, the same for the dK/dV kernel), module-time
#   (benchmarks/module_time.py: the notebook and bert presets' host and GPU time per call
#   apart, ~2.5 minutes cold), consan (benchmarks/memcheck.py --gluon-only under Triton's
#   concurrency sanitizer for Gluon kernels, through benchmarks/consan.py; each kernel build
#   takes about a minute under it, so CONSAN_S defaults to 570 s; run 43 cut it at 170 s)
#
# CORE_IMPLS="triton sdpa flex" limits the core steps to those implementations, CORE_ARGS
# adds arguments to them (e.g. "--rounds 7": more, shorter timing rounds, against the GPU's
# drift; "--head-dim 128": one half of core, which cold does not fit
# one 10-minute call beside the other half with five implementations; "--key-lengths":
# padded batches), TUNED_ARGS
# adds arguments to triton-tuned (e.g. "--shape 1,32,16384,64,0"). The bench
# steps log the Triton autotuner's picks (TRITON_PRINT_AUTOTUNING=1).
#
# VERIFY_MEMCHECK=1 runs the memcheck step alongside verify (all three only check results);
# VERIFY_DTYPES="bfloat16" limits verify to one dtype; VERIFY_ARGS adds arguments to it
# (e.g. "--exclude flex": the bfloat16 verify of everything did not finish cold in 420 s
# alone on the GPU, run 10; verify.json keeps what a cut-off run finished).
# Cold starts dominate on a fresh machine (flex compiles ~2-9 s per new shape, the Triton
# kernels autotune ~5 s on their first shape), so the limits below are what one H100 needed
# or more; the whole list is about 17 minutes: split it over two calls, e.g.
#   bash benchmarks/gpu_run.sh h100 verify notebook-bf16 bert-bf16
#   bash benchmarks/gpu_run.sh h100 core-bf16 notebook-fp32 bert-fp32 core-fp32
set -u
prefix=${1:-gpu}
shift || true
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(verify notebook-bf16 bert-bf16 core-bf16 notebook-fp32 bert-fp32 core-fp32 memcheck)

export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
results=/tmp/attnkit-results
mkdir -p "$results" "${OUT:=/tmp/out}"
pack() { tar czf "$OUT/results.tar.gz" -C "$results" .; }
core_args=()
for impl in ${CORE_IMPLS:-}; do core_args+=(--impl "$impl"); done
# shellcheck disable=SC2206  # CORE_ARGS: e.g. "--head-dim 128", split on purpose
core_args+=(${CORE_ARGS:-})

{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} > "$results/versions.txt" 2>&1
cat "$results/versions.txt"

# bench NAME SECONDS ARGS... The log is named by the prefix too: a warm machine keeps the
# last call's files, and two calls with one step name overwrote each other's log (run 11).
bench() {
    local name=$1 seconds=$2
    shift 2
    TRITON_PRINT_AUTOTUNING=1 timeout "$seconds" python3 -m attnkit.cli bench --no-progress "$@" \
        --out "$results/$prefix-$name" > "$results/$prefix-$name.log" 2>&1
    echo "$name: exit $?"
}

memcheck() {  # the Triton kernels, and on sm_90 the Gluon ones, under compute-sanitizer
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${MEMCHECK_S:-240}" compute-sanitizer \
        --tool memcheck --error-exitcode 1 python3 benchmarks/memcheck.py \
        > "$results/memcheck.log" 2>&1
    echo "memcheck: exit $?" >> "$results/memcheck.log"
    tail -n 12 "$results/memcheck.log"
}

for step in "${steps[@]}"; do
    started=$SECONDS
    case $step in
    verify)  # correctness only, so both dtypes share the GPU
        [ "${VERIFY_MEMCHECK:-0}" = 1 ] && memcheck > /dev/null &
        for dtype in ${VERIFY_DTYPES:-bfloat16 float32}; do
            short=${dtype/bfloat16/bf16}; short=${short/float32/fp32}
            # shellcheck disable=SC2086  # VERIFY_ARGS: e.g. "--exclude flex", split
            timeout "${VERIFY_S:-330}" python3 -m attnkit.cli verify --no-progress \
                --dtype "$dtype" --out "$results/$prefix-verify-$short" ${VERIFY_ARGS:-} \
                > "$results/verify-$short.log" 2>&1 &
        done
        wait
        tail -n 3 "$results"/verify-*.log
        [ -f "$results/memcheck.log" ] && tail -n 8 "$results/memcheck.log" ;;
    notebook-bf16) bench "$step" "${NB_S:-120}" --preset notebook --dtype bfloat16 ;;
    bert-bf16) bench "$step" "${BERT_S:-90}" --preset bert --dtype bfloat16 ;;
    core-bf16) bench "$step" "${CORE_S:-300}" --preset core --dtype bfloat16 "${core_args[@]}" ;;
    notebook-fp32) bench "$step" "${NB_S:-120}" --preset notebook --dtype float32 ;;
    bert-fp32) bench "$step" "${BERT_S:-90}" --preset bert --dtype float32 ;;
    core-fp32) bench "$step" "${CORE_S:-300}" --preset core --dtype float32 "${core_args[@]}" ;;
    memcheck) memcheck ;;
    consan)  # memcheck.py's Gluon cases under Triton's concurrency sanitizer (consan.py)
        timeout "${CONSAN_S:-570}" python3 benchmarks/consan.py benchmarks/memcheck.py \
            --gluon-only > "$results/consan.log" 2>&1
        echo "consan: exit $?"; tail -n 20 "$results/consan.log" ;;
    triton-configs)  # benchmarks/triton_configs.py: every kernel under every tile config
        timeout "${CONFIGS_S:-540}" python3 benchmarks/triton_configs.py --out "$results" \
            --budget "$(( ${CONFIGS_S:-540} - 90 ))" > "$results/triton-configs.log" 2>&1
        echo "triton-configs: exit $?" ;;
    triton-tuned)
        # shellcheck disable=SC2086  # TUNED_ARGS: e.g. "--shape 1,32,16384,64,0", split
        timeout "${TUNED_S:-150}" python3 benchmarks/triton_configs.py --out "$results" \
            --tuned-only ${TUNED_ARGS:-} > "$results/triton-tuned.log" 2>&1
        echo "triton-tuned: exit $?"; grep -E "^\(|autotune" "$results/triton-tuned.log" ;;
    triton-kernel)
        timeout "${KERNEL_S:-240}" python3 benchmarks/triton_kernel.py --out "$results" \
            --budget "$(( ${KERNEL_S:-240} - 30 ))" > "$results/triton-kernel.log" 2>&1
        echo "triton-kernel: exit $?"; tail -n 30 "$results/triton-kernel.log" ;;
    fwd-bwd-gap)  # benchmarks/fwd_bwd_gap.py: triton's fwd+bwd kernels against autograd
        timeout "${GAP_S:-150}" python3 benchmarks/fwd_bwd_gap.py --out "$results" \
            > "$results/fwd-bwd-gap.log" 2>&1
        echo "fwd-bwd-gap: exit $?"; grep -E "_ms\"|\"seq\"|causal" "$results/fwd-bwd-gap.log" ;;
    host-overhead)
        timeout 150 python3 benchmarks/host_overhead.py --out "$results" --ab-fast-launch --engine --profile triton \
            > "$results/host-overhead.log" 2>&1
        echo "host-overhead: exit $?"; cat "$results/host-overhead.log" ;;
    triton-registers)
        for args in "--head-dim 64" "--head-dim 64 --causal" "" "--causal" "--causal --grouped" \
                "--kernel fwd --tma" "--kernel fwd --tma --causal"; do
            # shellcheck disable=SC2086
            timeout 120 python3 benchmarks/triton_registers.py $args
        done > "$results/triton-registers.log" 2>&1
        cat "$results/triton-registers.log" ;;
    decode)  # benchmarks/decode.py: decoding steps against long caches, K/V bandwidth
        timeout "${DECODE_S:-240}" python3 benchmarks/decode.py --out "$results" \
            > "$results/decode.log" 2>&1
        echo "decode: exit $?"; cat "$results/decode.log" ;;
    decode-splits)  # decode.py --splits: the triton forward under each key-range count
        timeout "${DECODE_S:-240}" python3 benchmarks/decode.py --out "$results" \
            --splits "${SPLITS:-1,2,3,4,6,8,12,16}" > "$results/decode-splits.log" 2>&1
        echo "decode-splits: exit $?"; cat "$results/decode-splits.log" ;;
    kernel-variants)  # benchmarks/kernel_variants.py: code variants of triton, A/B in turns
        # shellcheck disable=SC2086  # VARIANTS_ARGS: the --variant switches (at least
        # two), e.g. "--variant a:_SWITCH=0 --variant b:_SWITCH=1 --backward", split
        timeout "${VARIANTS_S:-300}" python3 benchmarks/kernel_variants.py --out "$results" \
            ${VARIANTS_ARGS:-} > "$results/kernel-variants.log" 2>&1
        echo "kernel-variants: exit $?"; cat "$results/kernel-variants.log" ;;
    gluon-forward)  # benchmarks/gluon_forward.py: checks, then the A/B against Triton's
        # shellcheck disable=SC2086  # GLUON_ARGS: e.g. "--shape 4,16,4096,128,1", split
        timeout "${GLUON_S:-300}" python3 benchmarks/gluon_forward.py --out "$results" \
            ${GLUON_ARGS:-} > "$results/gluon-forward.log" 2>&1
        echo "gluon-forward: exit $?"; grep -v "^ok" "$results/gluon-forward.log" ;;
    gluon-dq|gluon-dkdv)  # benchmarks/gluon_dq.py, gluon_dkdv.py: checks, then the A/B
        # shellcheck disable=SC2086  # GLUON_ARGS: e.g. "--config 64,3", split
        timeout "${GLUON_S:-300}" python3 "benchmarks/${step/-/_}.py" --out "$results" \
            ${GLUON_ARGS:-} > "$results/$step.log" 2>&1
        echo "$step: exit $?"; grep -v "^ok" "$results/$step.log" ;;
    module-time)  # benchmarks/module_time.py: host and GPU time per module call, apart
        for preset in notebook bert; do
            timeout "${MODULE_S:-150}" python3 benchmarks/module_time.py --preset "$preset" \
                --out "$results" > "$results/module-time-$preset.log" 2>&1
            echo "module-time $preset: exit $?"; grep -v "^  \|Warning" "$results/module-time-$preset.log"
        done ;;
    gpu-tests)  # the GPU-only tests of triton (pytest -m gpu), decode key ranges among them
        # shellcheck disable=SC2086  # GPU_TESTS_ARGS: e.g. "-k hopper", split on purpose
        timeout "${GPU_TESTS_S:-480}" python3 -m pytest -v -m gpu tests/test_triton.py \
            ${GPU_TESTS_ARGS:-} > "$results/pytest-gpu.log" 2>&1
        echo "gpu-tests: exit $?"
        grep -E "PASSED|FAILED|ERROR|passed|failed" "$results/pytest-gpu.log" | tail -n 20 ;;
    verify-fp16)
        timeout "${VERIFY_S:-330}" python3 -m attnkit.cli verify --no-progress --impl triton \
            --dtype float16 --out "$results/$prefix-verify-fp16-triton" \
            > "$results/verify-fp16.log" 2>&1
        echo "verify-fp16: exit $?"; tail -n 3 "$results/verify-fp16.log" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
    esac
    echo "$step: $((SECONDS - started)) s"
    pack
done
ls -R "$results" | head -60
