#!/usr/bin/env bash
# One call on a lent GPU machine: install, the GPU tests, then the benchmark groups in order
# of value, each under its own time cap, everything written under $OUT as it goes.
#
#   bash bench/device_run.sh [SECONDS]      # default 540: fits one 600 s device call
#   STEPS="install crossover" bash bench/device_run.sh 300   # a later call: the rest
#   PRESET=smoke ...                        # bench.report --preset (default: gpu on CUDA)
#
# Steps (each is cut at its cap or at what is left of SECONDS, whichever is first; a cut
# step keeps what it wrote: pytest's log and junit file, the report's JSON and markdown,
# which bench.report rewrites after every measurement):
#   1. env: nvidia-smi, python, torch, triton, numpy versions
#   2. install: pip install --no-deps --no-build-isolation -e . (the device has no network)
#   3. tests: the kernel, dispatch, compile, integration and mixed-precision tests and the
#      bench agreement checks, on CUDA (untuned, see conftest; the CUDA autotune tests tune)
#   4. bench.report --only layers tradeoffs init (the layer cases, the chain's bias and
#      ranks past the on-chip limit, building a layer from scratch); then regularizer (every
#      precision), step and inference in one process (the regularizer's share of a step
#      needs both); then crossover with whatever time is left
# Caps (seconds): install 60, tests 150, layers 180, models 150, crossover the rest; they
# sum to the default 540. A case that fails is recorded and the group goes on.
# The last lines printed are the benchmark tables, the failed tests and then a summary (each
# step's exit code and seconds, the test tally), so the device tool's output tail shows them.
# The script exits with the worst step's exit code (0 only if every step ran and passed).
# Copy $OUT/results/*.json and *.md into bench/results/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-540}
out=${OUT:-$PWD/device-out}
mkdir -p "$out/results"
start=$SECONDS
summary="$out/summary.txt"
: > "$summary"
worst=0

steps=" ${STEPS:-install tests layers models crossover} "

left() { echo $(( budget - (SECONDS - start) )); }
wanted() { [[ $steps == *" $1 "* ]]; }

step() {  # step NAME CAP_SECONDS COMMAND...: run with a cap, log to $out/NAME.log
    local name=$1 cap=$2 t0=$SECONDS rc
    shift 2
    local limit
    limit=$(left)
    (( cap < limit )) && limit=$cap
    if (( limit < 20 )); then
        echo "$name: skipped, ${limit}s left" | tee -a "$summary"
        (( worst == 0 )) && worst=1
        return
    fi
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    (( rc > worst )) && worst=$rc
    local note=""
    (( rc == 124 || rc == 130 || rc == 137 )) && note=" (cut at ${limit}s)"
    echo "$name: rc=$rc $((SECONDS - t0))s$note" | tee -a "$summary"
}

{
    nvidia-smi
    python3 -c 'import sys, numpy, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton",
      triton.__version__, "| numpy", numpy.__version__)
print("device:", torch.cuda.get_device_name(0), "| SMs:",
      torch.cuda.get_device_properties(0).multi_processor_count)'
} > "$out/env.log" 2>&1
tail -3 "$out/env.log" | tee -a "$summary"

wanted install && step install 60 python3 -m pip install --no-deps --no-build-isolation -e .
if wanted tests; then
    step tests 150 python3 -m pytest -q -rfEs -p no:cacheprovider --benchmark-disable \
        --junitxml="$out/tests.xml" tests/kernels/test_svd_linear.py \
        tests/kernels/test_regularizers.py tests/test_dispatch.py tests/test_compile.py \
        tests/test_integration.py tests/test_mixed_precision.py bench/test_layers.py \
        bench/test_models.py
    [ -e "$out/tests.log" ] && tail -1 "$out/tests.log" | sed 's/^/tests: /' | tee -a "$summary"
fi
report() {  # report NAME CAP GROUP...: one bench.report process for these groups
    local name=$1 cap=$2
    shift 2
    step "bench-$name" "$cap" python3 -m bench.report --only "$@" \
        ${PRESET:+--preset "$PRESET"} --out "$out/results"
}
wanted layers && report layers 180 layers tradeoffs init
wanted models && report models 150 regularizer step inference
wanted crossover && report crossover 600 crossover

for md in "$out"/results/*.md; do
    [ -e "$md" ] && { echo; cat "$md"; }
done
echo
grep -h "^FAILED\|^ERROR" "$out/tests.log" 2>/dev/null | head -20
cat "$summary"
exit "$worst"
