#!/usr/bin/env bash
# tests/sh/test_fake_cuda.sh: the device paths of the engine and the Lua package, run on
# emulated CUDA devices (NEMO_FAKE_CUDA, engine/fake_cuda.c: host memory, the CPU kernels)
# so that CI covers them without a GPU:
#   tests/fake/device_basics.lua   placement, copies within and between 2 devices, memory
#                                  stats, errors, a training step equal to the CPU's
#   tests/gpu/check_train.lua      FLUX steps on cuda:1 vs the CPU, determinism, checkpointing,
#                                  bf16, FSDP2 mixed precision, the recipe with --device cuda:1
#   tests/gpu/check_golden.lua     the golden FLUX cases and Automodel's flow step on the device
#                                  (skips without ../shared/golden)
# Their TAP lines are renumbered into this file's stream, prefixed with [fake cuda]. The GPU
# scripts are the ones tests/gpu/run.sh runs on a real device; here they check the plumbing,
# not the CUDA kernels. Every run is under `timeout`.
set -u
cd "$(dirname "$0")/../.." || exit 1
N="$(pwd)/nemo-lua"
if [ ! -x "$N" ]; then echo "Bail out! $N is not built (run make)"; exit 1; fi
unset NEMO_LIB LUA_PATH LUA_CPATH LUA_INIT NEMO_CUDA_LIB NEMO_GPU_DEVICE WORLD_SIZE RANK LOCAL_RANK

n=0
pass() { n=$((n + 1)); echo "ok $n - $1"; }
fail() {
    n=$((n + 1)); echo "not ok $n - $1"; shift
    for l in "$@"; do printf '%s\n' "$l" | sed 's/^/#   /'; done
}

# sub LABEL ENV... -- FILE: runs FILE under ENV, passes its TAP lines on, then one summary line
sub() {
    local label=$1; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    local file=$1 out err rc plan count=0 bad=0 skip
    err=$(mktemp)
    out=$(env "${envs[@]}" timeout 300 "$N" "$file" 2> "$err")
    rc=$?
    plan=$(printf '%s\n' "$out" | sed -n 's/^1\.\.\([0-9][0-9]*\).*$/\1/p' | head -n 1)
    skip=$(printf '%s\n' "$out" | sed -n 's/^1\.\.0 # SKIP \(.*\)$/\1/p' | head -n 1)
    while IFS= read -r line; do
        if [[ "$line" =~ ^(not\ )?ok\ [0-9]+\ -\ (.*)$ ]]; then
            count=$((count + 1))
            n=$((n + 1))
            if [ -n "${BASH_REMATCH[1]}" ]; then echo "not ok $n - [fake cuda] ${BASH_REMATCH[2]}"; bad=$((bad + 1))
            else echo "ok $n - [fake cuda] ${BASH_REMATCH[2]}"; fi
        elif [[ "$line" =~ ^# ]]; then
            echo "$line"
        fi
    done <<< "$out"
    if [ -n "$skip" ] && [ "$rc" = 0 ]; then
        pass "# SKIP $label: $skip"
    elif [ "$rc" = 0 ] && [ -n "$plan" ] && [ "$plan" = "$count" ] && [ "$bad" = 0 ]; then
        pass "$label: the whole run passed ($count checks, exit 0)"
    else
        fail "$label: the whole run passed (exit $rc, plan '${plan}', $count lines, $bad failed)" \
            "stderr:" "$(tail -n 30 "$err")"
    fi
    rm -f "$err"
}

sub "device basics on 2 emulated devices" NEMO_FAKE_CUDA=2 -- tests/fake/device_basics.lua
sub "check_train.lua on cuda:1 of 2 emulated devices" NEMO_FAKE_CUDA=2 NEMO_GPU_DEVICE=cuda:1 NEMO_EXPECT_CUDA=1 \
    -- tests/gpu/check_train.lua
sub "check_golden.lua on an emulated device" NEMO_FAKE_CUDA=1 NEMO_EXPECT_CUDA=1 -- tests/gpu/check_golden.lua

# NEMO_FAKE_CUDA=0 (or unset) emulates nothing
out=$(NEMO_FAKE_CUDA=0 timeout 60 "$N" -e 'local c = require("nemo").cuda print(c.device_count())' 2>&1)
real=$(timeout 60 "$N" -e 'local c = require("nemo").cuda print(c.device_count())' 2>&1)
if [ "$out" = "$real" ]; then pass "NEMO_FAKE_CUDA=0 emulates nothing ($out devices, as without it)"
else fail "NEMO_FAKE_CUDA=0 emulates nothing" "got $out, without it $real"; fi

echo "1..$n"
