#!/usr/bin/env bash
# tests/gpu/run.sh: the GPU checks, for a machine with an NVIDIA GPU (never part of `make test`).
# Builds everything (the CUDA plugin included), then runs:
#   tests/lua/test_cuda.lua   the device layer (nemo.cuda, plugin table) in its "GPU present" branch
#   tests/lua/test_cuda_kernels.lua  every training-step CUDA kernel is registered under its CPU twin's
#                             name and refuses CPU tensors cleanly (also runs without a GPU)
#   tests/gpu/check_ops.lua   every CUDA kernel and copy path against the CPU (bitwise where the
#                             kernel is exact, else within stated tolerances), with a summary
#                             table, the worst error per kernel and throughput figures
#   tests/gpu/check_e2e.lua   the golden FLUX cases on the GPU, training steps against the CPU,
#                             FSDP2 mixed precision, the recipe with --device cuda:0
#   bench/gpu_block.lua       the FLUX.1-dev double block fwd+bwd as a fraction of the matmul rate
# The "# bench: ..." lines of check_ops.lua are appended to bench/RESULTS.md under a dated
# heading naming the host, the GPU and the commit (set NO_RESULTS=1 to skip that).
# Exits non-zero when the build or any check fails, and when no GPU is usable.
#   JOBS=16 (make -j), SKIP_BUILD=1 (use the build that is there).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | sed 's/^/# gpu /'
else
    echo "# nvidia-smi not found"
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    start=$(date +%s)
    if ! make -j"${JOBS:-16}" all; then echo "Bail out! make all failed"; exit 1; fi
    echo "# build: $(( $(date +%s) - start )) s"
fi
if [ ! -f build/libnemo_cuda.so ]; then echo "Bail out! build/libnemo_cuda.so was not built (no nvcc?)"; exit 1; fi

# ./nemo-lua when it exists; plain luajit with the build tree's paths otherwise.
if [ -x ./nemo-lua ]; then
    RUN=(./nemo-lua)
else
    RUN=(env NEMO_LIB=build/libnemo.so "LUA_PATH=lua/?.lua;lua/?/init.lua;;" luajit)
fi

status=0
log=$(mktemp)
# each step under a timeout, so one hang cannot eat the GPU budget (8 minutes in all)
for t in tests/lua/test_cuda.lua:60 tests/lua/test_cuda_kernels.lua:60 tests/gpu/check_ops.lua:180 \
         tests/gpu/check_e2e.lua:90 bench/gpu_block.lua:120; do
    limit=${t##*:}; t=${t%:*}
    echo "# ==== $t (at most ${limit} s)"
    NEMO_EXPECT_CUDA=1 timeout "$limit" "${RUN[@]}" "$t" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [ $rc -ne 0 ]; then echo "# FAILED: $t (exit $rc)"; status=1; fi
done

if [ "${NO_RESULTS:-0}" != 1 ] && grep -q '^# bench: ' "$log"; then
    [ -f bench/RESULTS.md ] || printf '%s\n' "# Benchmark results" "" \
        "Measured numbers, newest last. GPU sections are appended by tests/gpu/run.sh." > bench/RESULTS.md
    {
        echo ""
        echo "## tests/gpu/run.sh (check_ops.lua, gpu_block.lua), $(date -u +%Y-%m-%d) on $(hostname)"
        echo ""
        gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
        echo "GPU: ${gpu:-unknown}; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$( [ -n "$(git status --porcelain 2>/dev/null)" ] && echo ' (with local changes)'); checks $( [ $status -eq 0 ] && echo passed || echo FAILED)."
        echo ""
        grep '^# bench: ' "$log" | sed 's/^# bench: /- /'
    } >> bench/RESULTS.md
    echo "# bench lines appended to bench/RESULTS.md"
fi
rm -f "$log"

if [ $status -eq 0 ]; then echo "# all GPU checks passed"; else echo "# some GPU checks FAILED"; fi
exit $status
