#!/usr/bin/env bash
# tests/sh/test_bench.sh: the benchmark programs under bench/ run and print their tables (quick
# settings; the numbers themselves are not checked: speed is measured by running bench/, never
# by tests). Prints TAP.
set -u
cd "$(dirname "$0")/../.." || exit 1
source tests/sh/lib/tap.sh
N=./nemo-lua
if [ ! -x "$N" ]; then echo "Bail out! $N is not built (run make)"; exit 1; fi

# bench ARGS...: runs ./nemo-lua ARGS with a time limit; sets OUT and RC
bench() { OUT=$(timeout 300 "$N" "$@" 2>&1); RC=$?; }
num='[0-9]+\.[0-9]+'

bench bench/ops.lua --quick
if [ "$RC" = 0 ]; then pass "bench/ops.lua --quick exits 0"; else fail "bench/ops.lua --quick exits 0" "rc $RC" "$OUT"; fi
for row in "256x256x256 +$num +$num +$num" "layer_norm \(1024, 768\) +$num +$num" "attention B=1 H=4 S=256 D=64"; do
    if [[ "$OUT" =~ $row ]]; then pass "bench/ops.lua prints a row matching '$row'"
    else fail "bench/ops.lua prints a row matching '$row'" "$OUT"; fi
done

bench bench/wan_step.lua small --quick --flux
if [ "$RC" = 0 ]; then pass "bench/wan_step.lua small --quick --flux exits 0"
else fail "bench/wan_step.lua small --quick --flux exits 0" "rc $RC" "$OUT"; fi
rows=$(printf '%s\n' "$OUT" | grep -cE "^ +(wan_)?small +(on|off) +[0-9]+ +$num")
if [ "$rows" -ge 4 ]; then pass "wan_step and flux_step print their small rows with and without checkpointing ($rows rows)"
else fail "wan_step and flux_step print their small rows with and without checkpointing" "$rows rows" "$OUT"; fi

bench bench/vae.lua --quick
if [ "$RC" = 0 ]; then pass "bench/vae.lua --quick exits 0"; else fail "bench/vae.lua --quick exits 0" "rc $RC" "$OUT"; fi
rows=$(printf '%s\n' "$OUT" | grep -cE "^Autoencoder.* (whole|tiled) +\(.*\) +$num s +$num MiB")
if [ "$rows" -eq 4 ]; then pass "bench/vae.lua prints whole and tiled rows for both VAEs"
else fail "bench/vae.lua prints whole and tiled rows for both VAEs" "$rows rows" "$OUT"; fi

bench bench/checkpoint.lua --quick
if [ "$RC" = 0 ] && [[ "$OUT" =~ "sync: training waits "\ +$num ]] && [[ "$OUT" =~ "async: training waits (copies) "\ +$num ]]; then
    pass "bench/checkpoint.lua --quick prints the sync and async stalls"
else
    fail "bench/checkpoint.lua --quick prints the sync and async stalls" "rc $RC" "$OUT"
fi

bench bench/mp4.lua --quick
if [ "$RC" = 0 ]; then pass "bench/mp4.lua --quick exits 0"; else fail "bench/mp4.lua --quick exits 0" "rc $RC" "$OUT"; fi
rows=$(printf '%s\n' "$OUT" | grep -cE "^(qp [0-9]+( intra| no deblock)?|I_PCM) +$num +$num +$num +($num|lossless)$")
if [ "$rows" -eq 8 ]; then pass "bench/mp4.lua prints a row per coding (4 QPs, 2 without deblocking, intra only, I_PCM)"
else fail "bench/mp4.lua prints a row per coding" "$rows rows" "$OUT"; fi

# the distributed step (it starts its own mpirun per rank count): DDP, and FSDP2 + tensor parallel
if command -v mpirun > /dev/null 2>&1; then
    export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader}"
    if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
    for args in "--ranks 1,2 --steps 1 --warmup 1 --batch 8" "--model wan --tp --ranks 1,2 --steps 1 --warmup 1 --batch 8"; do
        bench bench/dist_step.lua $args
        rows=$(printf '%s\n' "$OUT" | grep -cE "^ +[12] +[0-9]+ +$num +$num +$num +$num%")
        if [ "$RC" = 0 ] && [ "$rows" -eq 2 ]; then pass "bench/dist_step.lua $args prints a row per rank count"
        else fail "bench/dist_step.lua $args prints a row per rank count" "rc $RC, $rows rows" "$OUT"; fi
    done
else
    skip "bench/dist_step.lua" "mpirun not found"
fi

echo "1..$n"
