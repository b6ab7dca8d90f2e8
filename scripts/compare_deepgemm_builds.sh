#!/usr/bin/env bash
# DeepGEMM 0.1.4 (sgl-kernel build, fp8linear's C++ relaunch) against DeepGEMM 2.x (deepinfer-gemm 2.8.2
# sdist, built on the GPU machine). Compares both builds through fp8linear's deepgemm backend. Run on the GPU machine from the repo root, .gpu/ carried:
#     bash scripts/compare_deepgemm_builds.sh        # logs under $OUT
# .gpu/ holds deep_gemm.tar.xz (../shared/tools/get-deep-gemm), deep_gemm_src.tar.gz
# (../shared/tools/get-deep-gemm-source) and elfutils/*.deb (the headers 2.x's build needs; build_dg2).
# DG2_BUILD_ONLY=1 builds 2.x and stops; DG2_REUSE=1 then skips the build (step a).
# Steps, each under its own timeout (cut to what is left of DEADLINE_S), a failed step not stopping the next:
#   a) build 2.x into /tmp/dg2 (in the background, while fp8linear's kernels build and the 0.1.4 bench runs);
#      import check with /tmp/dg2 alone on PYTHONPATH; d) the grouped GEMMs' signatures;
#   b) 0.1.4: bench_linear --quick (deepgemm cublaslt, bf16 beside); c) 2.x: the same bench;
#   then profile_linear 7168x7168 M 1 64 2048 (host time) on each build, pytest -m gpu
#   tests/test_backends_gpu.py -k deepgemm on 2.x (a short DEADLINE_S cuts these first);
#   last, if time is left: the 0.1.4 bench again, with nothing building beside it.
# Files back (8 at most): dg2-build.log run.log linear-dg014.{md,json} linear-dg2.{md,json} profile-dg014.log
# profile-dg2.log.
set -u -o pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
REPO=$PWD
START=$SECONDS
DEADLINE=${DEADLINE_S:-490}
export PYTHONUNBUFFERED=1 FP8LINEAR_CACHE_DIR=/tmp/fp8linear
P014=/tmp/dg:$REPO
P2=/tmp/dg2:$REPO
# libdw for 2.x's extension at import, where .gpu/elfutils supplied it (build_dg2)
export LD_LIBRARY_PATH=/tmp/elf/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
RUNLOG=$OUT/run.log

# step NAME LIMIT LOG CMD...: CMD under timeout min(LIMIT, time left), output appended to $OUT/LOG.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$(( DEADLINE - (SECONDS - START) ))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 15 ]; then
        echo "== $name: skipped (${left}s left)" | tee -a "$RUNLOG"
        return
    fi
    echo "== $name (timeout ${limit}s, t=$(( SECONDS - START ))s): $*" | tee -a "$OUT/$log"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc in $(( SECONDS - t0 ))s" | tee -a "$OUT/$log"
    [ "$log" = run.log ] || echo "== $name: rc=$rc in $(( SECONDS - t0 ))s (log $log)" >> "$RUNLOG"
}

build_dg2() {
    set -x
    rm -rf /tmp/dgsrc /tmp/dg2 && mkdir -p /tmp/dgsrc /tmp/dg2
    tar xzf .gpu/deep_gemm_src.tar.gz -C /tmp/dgsrc --strip-components=1 || return 1
    g++ --version | head -1
    nvcc --version | tail -2
    python3 -m pip --version
    python3 -c "import setuptools; print('setuptools', setuptools.__version__)"
    # setup.py imports wheel and packaging after setuptools, whose vendored copies then serve if none is installed
    if ! python3 -c "import setuptools, wheel.bdist_wheel, packaging.version; print('wheel and packaging importable')"; then
        local vendor
        vendor=$(python3 -c "import os, setuptools; print(os.path.join(os.path.dirname(setuptools.__file__), '_vendor'))")
        echo "wheel or packaging missing: setuptools' vendored copies ($vendor) go on PYTHONPATH"
        export PYTHONPATH=$vendor${PYTHONPATH:+:$PYTHONPATH}
    fi
    # 2.x's JIT includes elfutils/libdwfl.h (stack traces); the GPU machine has no elfutils headers (its
    # first build attempt stopped there), so they travel as Debian packages in .gpu/elfutils
    # (`apt-get download libdw-dev libdw1 libelf-dev libelf1`), unpacked under /tmp/elf.
    if [ ! -f /usr/include/elfutils/libdwfl.h ] && ls .gpu/elfutils/*.deb > /dev/null 2>&1; then
        mkdir -p /tmp/elf && for deb in .gpu/elfutils/*.deb; do dpkg -x "$deb" /tmp/elf || return 1; done
        export CPATH=/tmp/elf/usr/include${CPATH:+:$CPATH}
        export LIBRARY_PATH=/tmp/elf/usr/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}
        echo "elfutils headers and libraries from .gpu/elfutils under /tmp/elf"
    fi
    if [ -z "${CUDA_HOME:-}" ] && [ ! -x /usr/local/cuda/bin/nvcc ]; then
        export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    fi
    echo "CUDA_HOME=${CUDA_HOME:-unset (torch finds it)}"
    cd /tmp/dgsrc || return 1
    local t0=$SECONDS
    DG_FORCE_BUILD=1 python3 -m pip install -v --no-build-isolation --no-deps --no-cache-dir --target /tmp/dg2 .
    local rc=$?
    echo "pip install rc=$rc after $(( SECONDS - t0 ))s"
    ls -la /tmp/dg2 /tmp/dg2/deep_gemm | head -40
    return $rc
}
export -f build_dg2

{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') commit $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
    python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
    nproc
} 2>&1 | tee -a "$RUNLOG"

mkdir -p /tmp/dg && tar xJf .gpu/deep_gemm.tar.xz -C /tmp/dg

# a) 2.x build, in the background (DG2_BUILD_ONLY=1: only this, in the foreground; DG2_REUSE=1: keep a
#    /tmp/dg2 an earlier DG2_BUILD_ONLY run left, so that other benchmarks can run while it builds)
if [ "${DG2_BUILD_ONLY:-0}" = 1 ]; then
    timeout -k 5 "${DG2_BUILD_LIMIT_S:-420}" bash -c build_dg2 > "$OUT/dg2-build.log" 2>&1
    rc=$?
    echo "== dg2 build: rc=$rc" >> "$OUT/dg2-build.log"
    exit $rc
fi
if [ "${DG2_REUSE:-0}" = 1 ] && [ -d /tmp/dg2/deep_gemm ]; then
    ( echo "== dg2 build: reused /tmp/dg2" >> "$OUT/dg2-build.log" ) &
else
    ( timeout -k 5 330 bash -c build_dg2 > "$OUT/dg2-build.log" 2>&1; echo "== dg2 build: rc=$?" >> "$OUT/dg2-build.log" ) &
fi
BUILD_PID=$!

step ext-build 200 run.log env PYTHONPATH=$P014 python3 -c \
    "import time, fp8linear._build as b; t = time.time(); b.ensure_loaded(); print(f'fp8linear kernels built and loaded in {time.time() - t:.1f}s')"
# b) 0.1.4 bench (the 2.x build may still run beside it: one g++ on one core)
step bench-dg014 200 run.log env PYTHONPATH=$P014 DG_JIT_CACHE_DIR=/tmp/dgc014 \
    python3 scripts/bench_linear.py --quick --backends deepgemm cublaslt --rounds 1 --out "$OUT/linear-dg014.md"

echo "== waiting for the 2.x build (t=$(( SECONDS - START ))s)" | tee -a "$RUNLOG"
wait "$BUILD_PID"
tail -3 "$OUT/dg2-build.log" | tee -a "$RUNLOG"
echo "== 2.x build done (t=$(( SECONDS - START ))s)" | tee -a "$RUNLOG"

step dg2-import 40 run.log env PYTHONPATH=/tmp/dg2 python3 -c \
    "import deep_gemm; print(deep_gemm.__version__, [n for n in dir(deep_gemm) if 'gemm' in n])"

# d) the grouped GEMMs' contracts
step dg2-grouped 40 run.log env PYTHONPATH=/tmp/dg2 python3 - <<'EOF'
import inspect
import deep_gemm
for name in ("fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
             "m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked",
             "get_mk_alignment_for_contiguous_layout", "transform_sf_into_required_layout"):
    fn = getattr(deep_gemm, name, None)
    print(f"--- {name}: {'MISSING' if fn is None else 'present'}")
    if fn is None:
        continue
    try:
        print("signature:", inspect.signature(fn))
    except (TypeError, ValueError) as exc:
        print(f"inspect.signature: {type(exc).__name__}: {exc}")
    print("doc:", (fn.__doc__ or "").strip())
print("get_mk_alignment_for_contiguous_layout() =", deep_gemm.get_mk_alignment_for_contiguous_layout())
print("get_num_sms() =", deep_gemm.get_num_sms())
EOF

# c) 2.x: the same bench first (so that a short DEADLINE_S still compares the two builds), then host times
step bench-dg2 200 run.log env PYTHONPATH=$P2 DG_JIT_CACHE_DIR=/tmp/dgc2 \
    python3 scripts/bench_linear.py --quick --backends deepgemm cublaslt --rounds 1 --out "$OUT/linear-dg2.md"
step profile-dg014 100 profile-dg014.log env PYTHONPATH=$P014 DG_JIT_CACHE_DIR=/tmp/dgc014 \
    python3 scripts/profile_linear.py --N 7168 --K 7168 --M 1 64 2048 --backends deepgemm cublaslt
step profile-dg2 100 profile-dg2.log env PYTHONPATH=$P2 DG_JIT_CACHE_DIR=/tmp/dgc2 \
    python3 scripts/profile_linear.py --N 7168 --K 7168 --M 1 64 2048 --backends deepgemm cublaslt
step pytest-dg2 150 run.log env PYTHONPATH=$P2 DG_JIT_CACHE_DIR=/tmp/dgc2 \
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_backends_gpu.py -k deepgemm -x
# The 0.1.4 bench again, its JIT cache warm and nothing building beside it (table in run.log only).
step bench-dg014-again 80 run.log env PYTHONPATH=$P014 DG_JIT_CACHE_DIR=/tmp/dgc014 \
    python3 scripts/bench_linear.py --quick --backends deepgemm cublaslt --rounds 1

echo "== done at t=$(( SECONDS - START ))s" | tee -a "$RUNLOG"
grep -h "^== .*rc=" "$RUNLOG" "$OUT/dg2-build.log"
