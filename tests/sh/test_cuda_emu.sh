#!/usr/bin/env bash
# tests/sh/test_cuda_emu.sh: the CUDA plugin's own kernels, run on the CPU by the CUDA emulator
# (tests/cuda_emu: kernels/cuda/*.cu compiled by g++ against an emulated runtime, cuBLAS and
# cuBLASLt, into build/libnemo_cuda_emu.so, loaded through NEMO_CUDA_LIB). Where
# tests/sh/test_fake_cuda.sh checks the engine's device plumbing with the CPU kernels, this runs
# the CUDA kernels, launchers and cuBLAS calls themselves, with the scripts a GPU run uses:
#   tests/lua/test_cuda.lua, test_cuda_kernels.lua   the device layer and every kernel's entry
#                               checks, with a device present (NEMO_EXPECT_CUDA=1, as on a GPU)
#   tests/gpu/check_ops.lua     every CUDA kernel against the CPU kernel and copies between 2
#                               devices (NEMO_CUDA_EMU=1: "large" shapes of 65539 elements, no
#                               throughput lines)
#   tests/gpu/check_golden.lua  the golden FLUX and Wan cases on the emulated device
#   tests/gpu/check_train.lua   FLUX training steps on cuda:1 of 2 emulated devices vs the CPU
#   tests/fake/device_streams.lua  streams, events, non_blocking copies, record_stream and the
#                               pinned-block guard, with each stream's work deferred until the
#                               host must see it, so a missing wait shows in the values
#   coverage                    every __global__ function of kernels/cuda ran at least once
#                               (NEMO_EMU_CUDA_TRACE), except the ones listed below with why
# A kernel that breaks a CUDA rule (a barrier not reached by the whole block, a shuffle with
# lanes missing, a launch over the device's limits, a copy past an allocation) fails its case,
# and host code that reads device memory faults (x86 protection keys); either prints
# "cuda emulator: ..." on stderr. Every script runs with the emulator's deferred execution:
# work waits in its stream's queue until a synchronize, a copy to pageable memory or a free
# needs it, so a read that does not wait for its writer (on another stream, or on the host)
# sees stale bytes. What this cannot check: timing, kernels of two streams interleaving, the
# PTX of the flash kernels' mma (tests/gpu/run.sh on a real GPU does).
set -u
cd "$(dirname "$0")/../.." || exit 1
N="$(pwd)/nemo-lua"
LIB="$(pwd)/build/libnemo_cuda_emu.so"
if [ ! -x "$N" ] || [ ! -f "$LIB" ]; then echo "Bail out! $N or $LIB is not built (run make test)"; exit 1; fi
unset NEMO_LIB LUA_PATH LUA_CPATH LUA_INIT NEMO_GPU_DEVICE WORLD_SIZE RANK LOCAL_RANK NEMO_FAKE_CUDA
export NEMO_CUDA_LIB="$LIB"

source tests/sh/lib/tap.sh
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
export NEMO_EMU_CUDA_TRACE="$T/trace"

# sub LABEL ENV... -- FILE: runs FILE under ENV and relays its TAP lines
sub() {
    local label=$1; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    local out rc
    out=$(env "${envs[@]}" timeout 900 "$N" "$1" 2> "$T/err")
    rc=$?
    ERR_TAIL=$(grep "cuda emulator" "$T/err" | head -n 20; tail -n 20 "$T/err") relay "cuda emu" "$label" "$rc" "$out"
}

sub "test_cuda.lua with a device (as tests/gpu/run.sh runs it)" NEMO_EXPECT_CUDA=1 -- tests/lua/test_cuda.lua
sub "test_cuda_kernels.lua with a device" NEMO_EXPECT_CUDA=1 -- tests/lua/test_cuda_kernels.lua
sub "check_ops.lua on 2 emulated devices: every CUDA kernel against the CPU" NEMO_CUDA_EMU=1 NEMO_EMU_CUDA_DEVICES=2 \
    -- tests/gpu/check_ops.lua
sub "check_golden.lua on the emulated device" NEMO_EXPECT_CUDA=1 -- tests/gpu/check_golden.lua
sub "check_train.lua on cuda:1 of 2 emulated devices" NEMO_EMU_CUDA_DEVICES=2 NEMO_GPU_DEVICE=cuda:1 \
    NEMO_EXPECT_CUDA=1 -- tests/gpu/check_train.lua
sub "streams, events, non_blocking copies and record_stream on 2 emulated devices" NEMO_EMU_CUDA_DEVICES=2 \
    -- tests/fake/device_streams.lua

# ==== coverage: which kernels never ran ====
# Not reachable through the engine, on purpose:
#   scale_one   blas.cu's k = 0 product of one matrix (C = beta C); its one caller, the
#               grouped convolution, never has zero input channels per group (the front-end
#               refuses them)
UNREACHED="scale_one"
all=$( { grep -hoE "__global__ +(void|[A-Za-z_]+) +[A-Za-z_0-9]+" kernels/cuda/*.cu | awk '{print $NF}';
         grep -hoE "^FL_GLOBAL void [a-z_0-9]+" kernels/cuda/flash.cuh | awk '{print $NF}'; } | sort -u)
ran=$(sed -E 's/^[0-9]+ //; s/[<(].*//; s/^.* //' "$T/trace" 2> /dev/null | sort -u)
missing=$(comm -23 <(printf '%s\n' "$all") <(printf '%s\n' "$ran" $UNREACHED | sort -u) | tr '\n' ' ')
nall=$(printf '%s\n' "$all" | wc -l)
if [ "$nall" -gt 60 ] && [ -z "$missing" ]; then
    pass "all $nall __global__ functions of kernels/cuda ran on the emulator (but: $UNREACHED)"
else
    fail "every __global__ function of kernels/cuda ran on the emulator" "never launched: $missing" \
        "found $nall kernels in kernels/cuda"
fi
echo "1..$n"
