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
#   tests/gpu/check_streams.lua streams, events, non_blocking copies, record_stream and the
#                               pinned-block guard, with each stream's work deferred until the
#                               host must see it, so a missing wait shows in the values
#   tests/fake/dist_nccl.lua    nemo.dist's collectives through the plugin's NCCL backend
#                               (kernels/cuda/nccl.cu) on the emulator's NCCL (ranks are mpirun
#                               processes sharing memory), on 2 and 3 ranks (all-to-all: a
#                               group of ncclSend / ncclRecv); ranks that issue different
#                               collectives, or all-to-alls of different sizes, fail with a message
#   the recipe on cuda          FSDP2, DDP, HSDP (4 ranks), mixed precision and a bitwise resume
#                               over nccl.cu, each against one CPU process (tests/sh/lib/train.sh)
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
    -- tests/gpu/check_streams.lua
sub "check_streams.lua on 1 emulated device, as on a GPU (NEMO_EXPECT_CUDA=1)" NEMO_EXPECT_CUDA=1 \
    -- tests/gpu/check_streams.lua

# the host's cost of a step: kernels not run (NEMO_EMU_CUDA_NOEXEC), the benchmark says so
out=$(NEMO_EMU_CUDA_NOEXEC=1 timeout 300 "$N" bench/gpu_block.lua --small --no-cublas --steps 2 2>&1)
rc=$?
if [ "$rc" = 0 ] && grep -q "host cost of a FLUX.1-dev double block fwd+bwd bfloat16 (CUDA emulator, kernels not run)" <<< "$out"
then pass "bench/gpu_block.lua on the emulator with NEMO_EMU_CUDA_NOEXEC=1 reports the host's cost per step"
else fail "bench/gpu_block.lua with NEMO_EMU_CUDA_NOEXEC=1 reports the host's cost" "exit $rc" "$out"; fi

# a GPU the build has no code for (the emulator reports compute capability 8.0, the plugin was
# built for 9.0): no device, and the reason says how to rebuild
out=$(NEMO_EMU_CUDA_CC=80 timeout 60 "$N" -e 'local c = require("nemo").cuda
print(tostring(c.is_available()) .. " " .. tostring(c.device_count()) .. " " .. tostring(c.unavailable_reason()))
print(select(2, pcall(require("nemo").zeros, {2}, {device = "cuda"})))' 2>&1)
rc=$?
if [ "$rc" = 0 ] && grep -q '^false 0 .*compute capability 8\.0.*CUDA_ARCH="90".*make CUDA_ARCH=80' <<< "$out" &&
   grep -q 'no CUDA device: .*make CUDA_ARCH=80' <<< "$out"; then
    pass "a GPU of compute capability 8.0 with a plugin built for sm_90: no device, and a reason naming CUDA_ARCH=80"
else fail "a GPU the plugin was not built for: no device, and a reason naming the rebuild" "exit $rc" "$out"; fi

# ==== several ranks: the plugin's NCCL backend (kernels/cuda/nccl.cu) on the emulator's NCCL ====
if command -v mpirun > /dev/null 2>&1; then
    export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader}" XDG_CACHE_HOME="$T/cache"
    if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
    for np in 2 3; do
        out=$(NEMO_EMU_CUDA_DEVICES=$np timeout 300 mpirun -np $np --oversubscribe -x NEMO_CUDA_LIB \
              -x NEMO_EMU_CUDA_DEVICES "$N" tests/fake/dist_nccl.lua 2> "$T/err")
        rc=$?
        ERR_TAIL=$(tail -n 30 "$T/err") relay "cuda emu" "nemo.dist's collectives over nccl.cu on $np ranks" "$rc" "$out"
    done
    # ranks that issue different collectives: an error naming it on every rank, not a hang
    cat > "$T/mismatch.lua" <<'LUA'
local nemo, dist = require "nemo", require "nemo.dist"
dist.init_process_group{backend = "nccl", timeout = 60}
local r = dist.get_rank()
local ok, err = pcall(dist.all_reduce, nemo.ones({4 + r}, {device = "cuda:" .. r}))
io.write(string.format("rank %d: %s %s\n", r, tostring(ok), tostring(err)))
os.exit(ok and 0 or 3)
LUA
    start=$SECONDS
    out=$(NEMO_EMU_CUDA_DEVICES=2 timeout 120 mpirun -np 2 -x NEMO_CUDA_LIB -x NEMO_EMU_CUDA_DEVICES "$N" "$T/mismatch.lua" \
          2> "$T/err")
    rc=$?
    if [ "$rc" != 0 ] && [ $((SECONDS - start)) -lt 60 ] && grep -q "rank 0: false .*NCCL.*different collectives" <<< "$out" &&
       grep -q "the ranks must issue the same collectives" "$T/err"; then
        pass "ranks issuing different collectives over nccl: an NCCL error naming it, after $((SECONDS - start)) s"
    else
        fail "ranks issuing different collectives over nccl: an error, not a hang" "exit $rc" "$out" "$(tail -n 20 "$T/err")"
    fi
    # an all-to-all whose sizes differ between the ranks: the sends and receives do not match
    cat > "$T/a2a_mismatch.lua" <<'LUA'
local nemo, dist = require "nemo", require "nemo.dist"
dist.init_process_group{backend = "nccl", timeout = 60}
local r = dist.get_rank()
local D = "cuda:" .. r
local ok, err = pcall(dist.all_to_all_single, nemo.zeros({2 * (2 + r)}, {device = D}), nemo.ones({2 * (2 + r)}, {device = D}))
io.write(string.format("rank %d: %s %s\n", r, tostring(ok), tostring(err)))
os.exit(ok and 0 or 3)
LUA
    start=$SECONDS
    out=$(NEMO_EMU_CUDA_DEVICES=2 timeout 120 mpirun -np 2 -x NEMO_CUDA_LIB -x NEMO_EMU_CUDA_DEVICES "$N" \
          "$T/a2a_mismatch.lua" 2> "$T/err")
    rc=$?
    if [ "$rc" != 0 ] && [ $((SECONDS - start)) -lt 60 ] && grep -q "rank 0: false .*all_to_all.*NCCL" <<< "$out" &&
       grep -q "ncclRecv of 2 elements of type 7 from rank 1 on rank 0: the matching ncclSend has 3 elements" "$T/err"; then
        pass "an all-to-all of different sizes on the ranks over nccl: an NCCL error naming the unmatched ncclRecv, after $((SECONDS - start)) s"
    else
        fail "an all-to-all of different sizes over nccl: an error, not a hang" "exit $rc" "$out" "$(tail -n 20 "$T/err")"
    fi
    source tests/sh/lib/train.sh
    TRAIN_ON_CUDA_EMU="$LIB"
    device_recipe_cases
    left=$(ls /dev/shm 2> /dev/null | grep -c '^nemo-emu-nccl' || true)
    if [ "$left" = 0 ]; then pass "the emulated NCCL left nothing in /dev/shm"
    else fail "the emulated NCCL left nothing in /dev/shm" "$left objects: $(ls /dev/shm | grep '^nemo-emu-nccl' | head -n 5)"; fi
else
    skip "several ranks on the emulator" "mpirun not found"
fi

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
