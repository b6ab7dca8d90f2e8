#!/usr/bin/env bash
# Build and run scripts/kernel_microbench.cu, the shipped kernels and variants under test (-D switches).
#
#   scripts/kernel_microbench.sh build DIR [NAME ...]   # here (nvcc, no GPU): one binary per variant in DIR
#   scripts/kernel_microbench.sh run DIR OUT [--quick]  # on the GPU: every binary in DIR, CSV + summary in OUT
#
# The binaries need only the CUDA driver (the runtime links statically), so DIR travels to the GPU machine
# in `.gpu/` (ignored by git) and nothing is compiled there. The summary (scripts/kernel_microbench_summary.py)
# prints each kernel's median microseconds and % of the copy and stream baselines timed in the same binary.
set -euo pipefail
cd "$(dirname "$0")/.."

# name -> extra nvcc flags; "default" is what the sources ship. To time a variant, put it behind a temporary
# switch in the kernel's header (#ifdef), add its flags here, and keep the winner as plain code: the numbers of
# the knobs timed so far are in docs/runs/2026-11-25-kernel-microbench-*-h100.md.
declare -A VARIANTS=(
  [default]=""
)

cmd=${1:-}
case "$cmd" in
  build)
    dir=${2:?usage: $0 build DIR [NAME ...]}
    shift 2
    names=("$@")
    [ ${#names[@]} -gt 0 ] || names=("${!VARIANTS[@]}")
    mkdir -p "$dir"
    pids=()
    for name in "${names[@]}"; do
      [ -n "${VARIANTS[$name]+x}" ] || { echo "unknown variant: $name (known: ${!VARIANTS[*]})" >&2; exit 2; }
      # shellcheck disable=SC2086  # the flags are words
      nvcc -O3 -std=c++17 -arch=sm_90a -Ikernels -DFP8L_VARIANT="\"$name\"" ${VARIANTS[$name]} \
        scripts/kernel_microbench.cu -o "$dir/microbench-$name" &
      pids+=($!)
      # two builds at a time: nvcc takes ~8 s and a core each
      if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    ls "$dir"
    ;;
  run)
    dir=${2:?usage: $0 run DIR OUT [--quick]}
    out=${3:?usage: $0 run DIR OUT [--quick]}
    mkdir -p "$out"
    csv="$out/kernel_microbench.csv"
    : > "$csv"
    for bin in "$dir"/microbench-*; do
      echo "# $(basename "$bin")" >&2
      if [ -s "$csv" ]; then "$bin" ${4:-} | tail -n +2 >> "$csv"; else "$bin" ${4:-} >> "$csv"; fi
    done
    python3 scripts/kernel_microbench_summary.py "$csv" | tee "$out/kernel_microbench.md"
    ;;
  *)
    sed -n '2,9p' "$0" >&2
    exit 2
    ;;
esac
