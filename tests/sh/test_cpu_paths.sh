#!/usr/bin/env bash
# tests/sh/test_cpu_paths.sh: the CPU kernels' alternative paths that the machine running the
# tests would otherwise not take. make test runs the Lua tests once, on whatever this CPU has;
# here tests/lua/test_linalg.lua runs again with NEMO_AMX=0, so the bf16 products' widened
# float32 path is checked on AMX machines too (and on the others this is the path anyway).
# Prints TAP (the sub-run's lines relayed).
set -u
cd "$(dirname "$0")/../.." || exit 1
N="$(pwd)/nemo-lua"
if [ ! -x "$N" ]; then echo "Bail out! $N is not built (run make)"; exit 1; fi
unset NEMO_LIB LUA_PATH LUA_CPATH LUA_INIT NEMO_FAKE_CUDA
source tests/sh/lib/tap.sh

err=$(mktemp)
trap 'rm -f "$err"' EXIT
out=$(NEMO_AMX=0 timeout 300 "$N" tests/lua/test_linalg.lua 2> "$err")
rc=$?
ERR_TAIL=$(tail -n 30 "$err") relay "NEMO_AMX=0" "test_linalg.lua with AMX turned off" "$rc" "$out"
if grep -q "^# bf16 products on widened float32 sgemm" <<< "$out"; then
    pass "NEMO_AMX=0 turns the AMX tiles off (the run reports the widened float32 path)"
else
    fail "NEMO_AMX=0 turns the AMX tiles off" "$(grep '^# bf16' <<< "$out")"
fi
echo "1..$n"
