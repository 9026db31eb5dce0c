#!/usr/bin/env bash
# tests/sh/test_fake_cuda.sh: the device paths of the engine and the Lua package, run on
# emulated CUDA devices (NEMO_FAKE_CUDA, engine/fake_cuda.c: host memory, the CPU kernels)
# so that CI covers them without a GPU:
#   tests/fake/device_basics.lua   placement, copies within and between 2 devices, memory
#                                  stats, errors, a training step equal to the CPU's
#   tests/gpu/check_streams.lua    streams, events, non_blocking copies, record_stream and the
#                                  allocator's per-stream caching
#   tests/gpu/check_offload.lua    FSDP2 cpu_offload: host shards, gradients and AdamW state, lower
#                                  device memory, the same weights bit for bit
#   tests/fake/device_memory.lua   the caching allocator on a 16 MiB device: reuse, empty_cache,
#                                  release-and-retry, a clear out-of-memory error
#   tests/gpu/check_train.lua      FLUX steps on cuda:1 vs the CPU, determinism, checkpointing,
#                                  bf16, FSDP2 mixed precision, the recipe with --device cuda:1
#   tests/gpu/check_ops.lua        every engine-level case of the GPU kernel check (a dry run of
#                                  the script: both sides run the CPU kernels)
#   bench/gpu_block.lua --small    the GPU run's block benchmark, shrunk, without cuBLAS
#   tests/gpu/check_golden.lua     the golden FLUX and Wan cases and Automodel's flow step on the device
#                                  (tests/golden, or where tests/lua/golden.lua finds them; fails
#                                  without them)
#   tests/fake/dist_nccl.lua       (mpirun; skipped without it) nemo.dist's collectives on cuda
#                                  tensors over the emulated nccl backend on 2 ranks: every NCCL
#                                  call (all-to-all included) carried out by MPI over the same bytes
#   the recipe on 2 and 4 ranks    (mpirun; skipped without it) with --device cuda: each rank on
#                                  cuda:LOCAL_RANK, the nccl backend (emulated over MPI), FSDP2,
#                                  DDP and HSDP (NCCL subgroups): float64 losses and final weights
#                                  within 1e-6 of one CPU process with the whole batch; an FSDP2
#                                  run stopped and resumed on the devices equals the whole run;
#                                  FSDP2 mixed precision (bf16 compute) across 2 ranks
# Their TAP lines are renumbered into this file's stream, prefixed with [fake cuda]. The GPU
# scripts are the ones tests/gpu/run.sh runs on a real device; here they check the plumbing,
# not the CUDA kernels. Every run is under `timeout`.
set -u
cd "$(dirname "$0")/../.." || exit 1
N="$(pwd)/nemo-lua"
if [ ! -x "$N" ]; then echo "Bail out! $N is not built (run make)"; exit 1; fi
unset NEMO_LIB LUA_PATH LUA_CPATH LUA_INIT NEMO_CUDA_LIB NEMO_GPU_DEVICE WORLD_SIZE RANK LOCAL_RANK

source tests/sh/lib/tap.sh

# sub LABEL ENV... -- FILE: runs FILE under ENV and relays its TAP lines
sub() {
    local label=$1; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    local err out rc
    err=$(mktemp)
    out=$(env "${envs[@]}" timeout 900 "$N" "$1" 2> "$err")
    rc=$?
    ERR_TAIL=$(tail -n 30 "$err") relay "fake cuda" "$label" "$rc" "$out"
    rm -f "$err"
}

sub "device basics on 2 emulated devices" NEMO_FAKE_CUDA=2 -- tests/fake/device_basics.lua
sub "streams and events on 2 emulated devices" NEMO_FAKE_CUDA=2 -- tests/gpu/check_streams.lua
sub "the caching allocator on a 16 MiB emulated device" NEMO_FAKE_CUDA=1 NEMO_FAKE_CUDA_MEM=16777216 \
    -- tests/fake/device_memory.lua
sub "FSDP2 CPU offload on an emulated device" NEMO_FAKE_CUDA=1 NEMO_EXPECT_CUDA=1 -- tests/gpu/check_offload.lua
sub "check_train.lua on cuda:1 of 2 emulated devices" NEMO_FAKE_CUDA=2 NEMO_GPU_DEVICE=cuda:1 NEMO_EXPECT_CUDA=1 \
    -- tests/gpu/check_train.lua
sub "check_ops.lua (a dry run: the engine-level cases, CPU kernels on both sides)" NEMO_FAKE_CUDA=1 \
    -- tests/gpu/check_ops.lua
sub "check_golden.lua on an emulated device" NEMO_FAKE_CUDA=1 NEMO_EXPECT_CUDA=1 -- tests/gpu/check_golden.lua

# bench/gpu_block.lua (the GPU run's block benchmark) as a dry run: shrunk sizes, no cuBLAS
out=$(NEMO_FAKE_CUDA=1 timeout 300 "$N" bench/gpu_block.lua --device cuda:0 --small --no-cublas --steps 2 2>&1)
rc=$?
if [ "$rc" = 0 ] && grep -q "bench: FLUX.1-dev double block fwd+bwd float32 on cuda:0" <<< "$out" &&
   grep -q "bench: FLUX.1-dev double block fwd+bwd bfloat16 (32-row flash kernels) on cuda:0" <<< "$out" &&
   grep -q "bench: FLUX.1-dev double block fwd+bwd bfloat16 (16-row flash kernels) on cuda:0" <<< "$out"; then
    pass "bench/gpu_block.lua --small runs on an emulated device (float32 and bf16 block lines, both flash kernel families)"
else
    fail "bench/gpu_block.lua --small runs on an emulated device" "exit $rc" "$out"
fi

# ==== the recipe on several ranks, each on its emulated device, over the emulated nccl backend ====
if command -v mpirun > /dev/null 2>&1; then
    T=$(mktemp -d)
    trap 'rm -rf "$T"' EXIT
    export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader}" XDG_CACHE_HOME="$T/cache"
    if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
    out=$(NEMO_FAKE_CUDA=2 timeout 300 mpirun -np 2 --oversubscribe -x NEMO_FAKE_CUDA "$N" tests/fake/dist_nccl.lua \
          2> "$T/err")
    rc=$?
    ERR_TAIL=$(tail -n 30 "$T/err") relay "fake cuda" "nemo.dist's collectives over the emulated nccl backend on 2 ranks" \
        "$rc" "$out"
    source tests/sh/lib/train.sh
    TRAIN_ON_FAKE_CUDA=1

    device_recipe_cases
else
    pass "# SKIP mpirun not found: the multi-rank device runs"
fi

# NEMO_FAKE_CUDA=0 (or unset) emulates nothing
out=$(NEMO_FAKE_CUDA=0 timeout 60 "$N" -e 'local c = require("nemo").cuda print(c.device_count())' 2>&1)
real=$(timeout 60 "$N" -e 'local c = require("nemo").cuda print(c.device_count())' 2>&1)
if [ "$out" = "$real" ]; then pass "NEMO_FAKE_CUDA=0 emulates nothing ($out devices, as without it)"
else fail "NEMO_FAKE_CUDA=0 emulates nothing" "got $out, without it $real"; fi

echo "1..$n"
