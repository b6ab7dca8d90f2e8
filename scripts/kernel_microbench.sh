#!/usr/bin/env bash
# Build and run scripts/kernel_microbench.cu in tuning variants (-DFP8L_* knobs of kernels/*.cuh).
#
#   scripts/kernel_microbench.sh build DIR [NAME ...]   # here (nvcc, no GPU): one binary per variant in DIR
#   scripts/kernel_microbench.sh run DIR OUT [--quick]  # on the GPU: every binary in DIR, CSV + summary in OUT
#
# The binaries need only the CUDA driver (the runtime links statically), so DIR travels to the GPU machine
# in `.gpu/` (ignored by git) and nothing is compiled there. The summary (scripts/kernel_microbench_summary.py)
# prints each kernel's median microseconds and % of the copy and stream baselines timed in the same binary.
set -euo pipefail
cd "$(dirname "$0")/.."

# name -> extra nvcc flags; "default" is what the sources ship.
declare -A VARIANTS=(
  [default]=""
  # the quant kernel (and the SiLU kernel's loads and stores): kernels/common.cuh, per_token_group_quant.cuh
  [ld_cs]="-DFP8L_LOAD_HINT=1"
  [ld_noL1]="-DFP8L_LOAD_HINT=2"
  [ld_noL1_pf256]="-DFP8L_LOAD_HINT=3"
  [st_cs]="-DFP8L_STORE_HINT=1"
  [loads1]="-DFP8L_LOADS_PER_THREAD=1"
  [loads4]="-DFP8L_LOADS_PER_THREAD=4"
  [t512]="-DFP8L_THREADS=512"
  [t128]="-DFP8L_THREADS=128"
  [cpl1]="-DFP8L_CHUNKS_PER_LANE=1"
  [cpl2_interleaved]="-DFP8L_LANE_CONTIGUOUS=0"
  # the SiLU kernel: kernels/fused_quant.cuh, silu_and_mul_quant.cuh
  [silu_plain_exp]="-DFP8L_SILU_FMA=0"
  [silu_ld0]="-DFP8L_SILU_LOAD_HINT=0"
  [silu_c1_u2]="-DFP8L_SILU_CHUNKS=1 -DFP8L_SILU_UNROLL=2"
  [silu_u2]="-DFP8L_SILU_UNROLL=2"
  [silu_mb6]="-DFP8L_SILU_MIN_BLOCKS=6"
  [silu_t512]="-DFP8L_SILU_THREADS=512"
  [silu_t128]="-DFP8L_SILU_THREADS=128"
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
