#!/usr/bin/env bash
# Everything for the GPU machine in one command (GPU.md "One command, everything in it"):
#
#   scripts/gpu_all.sh                      # build tests quant linear e2e, in that order
#   scripts/gpu_all.sh tests quant          # only these stages (the build runs first whenever chosen)
#   QUANT_ARGS="--quick" scripts/gpu_all.sh quant
#
# Stages: build (compile the CUDA kernel once), tests (pytest -m gpu), quant (scripts/bench_quant.py),
# linear (scripts/bench_linear.py), e2e (scripts/bench_e2e.py); a benchmark whose script does not exist
# is skipped. Each stage runs under `timeout`, a failed stage does not stop the next, and the whole run
# ends within GPU_ALL_BUDGET_S seconds (default 530, under the machine's 10-minute command limit).
# Logs go to $OUT (default ./gpu-out): env.log, build.log, gpu-tests.log, bench-quant.log (+ bench_quant.csv
# and .md), bench-linear.log, bench-e2e.log, summary.txt. The summary table prints last.
#
# Extra arguments per benchmark: QUANT_ARGS, LINEAR_ARGS, E2E_ARGS; extra pytest arguments: TEST_ARGS.
# Stage limits (build 240s, tests 300s, quant 330s, linear 240s, e2e 240s) are cut to what is left of the
# budget, and a stage with under 20s left is skipped: when every stage is slow they do not all fit one
# call, so split the run, e.g. `scripts/gpu_all.sh build tests quant` then `scripts/gpu_all.sh linear e2e`.

set -u
set -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
BUDGET=${GPU_ALL_BUDGET_S:-530}
START=$SECONDS
KILL_GRACE=10  # seconds between timeout's SIGTERM and SIGKILL

ALL_STAGES=(build tests quant linear e2e)
if [ $# -eq 0 ]; then
    STAGES=("${ALL_STAGES[@]}")
else
    STAGES=()
    for s in "$@"; do
        case " ${ALL_STAGES[*]} " in
            *" $s "*) STAGES+=("$s") ;;
            *) echo "gpu_all.sh: unknown stage '$s'; expected any of: ${ALL_STAGES[*]}" >&2; exit 2 ;;
        esac
    done
fi
wants() { case " ${STAGES[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# -- environment --------------------------------------------------------------------------------
if [ -f .gpu/deep_gemm.tar.xz ]; then
    mkdir -p /tmp/dg && tar xJf .gpu/deep_gemm.tar.xz -C /tmp/dg \
        || echo "warning: unpacking .gpu/deep_gemm.tar.xz failed; DeepGEMM backends will be missing" >&2
else
    echo "warning: .gpu/deep_gemm.tar.xz not found (../shared/tools/get-deep-gemm .gpu); DeepGEMM backends will be missing" >&2
fi
export PYTHONPATH=/tmp/dg:$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0  # NVLink multicast off on the lent multi-GPU machines (device tool's KINDS.md)
# The bf16 all-MiniLM-L6-v2 copy that travels in .gpu/ (GPU.md): the real-weight tests and bench_minilm.
if [ -d .gpu/minilm-bf16 ] && [ -z "${FP8LINEAR_MINILM_DIR:-}" ]; then export FP8LINEAR_MINILM_DIR=$REPO/.gpu/minilm-bf16; fi
export FP8LINEAR_CACHE_DIR=${FP8LINEAR_CACHE_DIR:-/tmp/fp8linear}

{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC')  commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" \
         "$( [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo '(+ uncommitted changes)')"
    echo "== stages: ${STAGES[*]}; budget ${BUDGET}s; logs in $OUT"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv \
        || echo "nvidia-smi failed or is missing"
    timeout 60 python3 - <<'EOF' || echo "python3/torch import failed"
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as e:
    print(f"triton not importable: {e}")
try:
    import transformers
    print(f"transformers {transformers.__version__}")
except ImportError as e:
    print(f"transformers not importable: {e}")
try:
    import deep_gemm
    print(f"deep_gemm from {deep_gemm.__file__}")
except Exception as e:  # noqa: BLE001
    print(f"deep_gemm not importable: {type(e).__name__}: {e}")
EOF
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo missing)"
} 2>&1 | tee "$OUT/env.log"

# -- stages ---------------------------------------------------------------------------------------
SUMMARY=()

# run_stage NAME DEFAULT_LIMIT_S LOG CMD...: run CMD under timeout, tee'd to $OUT/LOG, record rc and time.
run_stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$(( BUDGET - (SECONDS - START) - KILL_GRACE - 5 ))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 20 ]; then
        echo "== $name: skipped, ${left}s of the ${BUDGET}s budget left" | tee "$OUT/$log"
        SUMMARY+=("$(printf '%-8s %-10s %6s  %s' "$name" "no time" "-" "$log")")
        return
    fi
    echo
    echo "== $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout -k "$KILL_GRACE" "$limit" "$@" 2>&1 | tee "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAIL($rc)"; fi
    echo "== $name: $status in $(( SECONDS - t0 ))s"
    SUMMARY+=("$(printf '%-8s %-10s %5ss  %s' "$name" "$status" "$(( SECONDS - t0 ))" "$log")")
}

# The remaining budget goes to bench_quant as --budget-s, so it stops itself and prints its tables
# before `timeout` would kill it.
quant_budget() {
    local left=$(( BUDGET - (SECONDS - START) - KILL_GRACE - 5 ))
    local limit=$(( left < 330 ? left : 330 ))
    echo $(( limit > 90 ? limit - 45 : limit / 2 ))
}

if wants build || wants tests || wants quant; then
    run_stage build 240 build.log python3 -c \
        "import time, fp8linear._build as b; t = time.time(); b.ensure_loaded(); print(f'fp8linear kernel built and loaded in {time.time() - t:.1f}s (cache {b.cache_dir()})')"
fi

if wants tests; then
    # shellcheck disable=SC2086
    run_stage tests 300 gpu-tests.log python3 -m pytest -q -m gpu tests -p no:cacheprovider ${TEST_ARGS:-}
fi

if wants quant; then
    if [ -f scripts/bench_quant.py ]; then
        # shellcheck disable=SC2086
        run_stage quant 330 bench-quant.log python3 scripts/bench_quant.py --budget-s "$(quant_budget)" \
            --out "$OUT/bench_quant.csv" ${QUANT_ARGS:-}
    else
        SUMMARY+=("$(printf '%-8s %-10s %6s  %s' quant "absent" "-" "scripts/bench_quant.py")")
    fi
fi

if wants linear; then
    if [ -f scripts/bench_linear.py ]; then
        # shellcheck disable=SC2086
        run_stage linear 240 bench-linear.log python3 scripts/bench_linear.py ${LINEAR_ARGS:-}
    else
        SUMMARY+=("$(printf '%-8s %-10s %6s  %s' linear "absent" "-" "scripts/bench_linear.py")")
    fi
fi

if wants e2e; then
    if [ -f scripts/bench_e2e.py ]; then
        # shellcheck disable=SC2086
        run_stage e2e 420 bench-e2e.log python3 scripts/bench_e2e.py ${E2E_ARGS:-}
    else
        SUMMARY+=("$(printf '%-8s %-10s %6s  %s' e2e "absent" "-" "scripts/bench_e2e.py")")
    fi
fi

# -- summary --------------------------------------------------------------------------------------
{
    echo
    echo "== summary ($(( SECONDS - START ))s of ${BUDGET}s; logs in $OUT)"
    printf '%-8s %-10s %6s  %s\n' stage status time log
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    if [ -f "$OUT/gpu-tests.log" ]; then
        echo "tests: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/gpu-tests.log" | tail -1)"
    fi
} | tee "$OUT/summary.txt"

case " ${SUMMARY[*]} " in
    *FAIL*|*TIMEOUT*) exit 1 ;;
    *) exit 0 ;;
esac
