#!/usr/bin/env bash
# tests/gpu/run.sh: the GPU checks, for a machine with an NVIDIA GPU (never part of `make test`).
# Builds everything (the CUDA plugin included), then runs, each under its own timeout and all
# inside one overall budget (BUDGET seconds, default 450 = 7.5 minutes, build included):
#   step                               at most  expected on an H200   what
#   build (make -j$JOBS all)            150 s    60-90 s              skipped with SKIP_BUILD=1
#   tests/lua/test_cuda.lua              30 s    < 5 s                the device layer (nemo.cuda, plugin table)
#   tests/lua/test_cuda_kernels.lua      30 s    < 5 s                every CUDA kernel registered, refuses CPU tensors
#   tests/gpu/check_streams.lua          30 s    < 5 s                streams, events, non_blocking copies and
#                                                                     record_stream with real concurrency
#   tests/gpu/check_offload.lua          30 s    < 5 s                FSDP2 CPU offload: pinned host shards, a lower
#                                                                       device peak, the weights of the run without it
#   tests/gpu/check_golden.lua           60 s    ~10 s                golden FLUX cases (diffusers, torch AdamW,
#                                                                     Automodel's step) with everything on cuda:0
#   tests/gpu/check_train.lua            90 s    ~20-30 s             training steps on cuda:0 vs the CPU, determinism,
#                                                                     checkpointing, bf16, the recipe --device cuda:0
#   tests/gpu/check_ops.lua             150 s    ~40-90 s             every CUDA kernel against the CPU, bench lines
#   bench/gpu_block.lua                 120 s    ~30-60 s             FLUX.1-dev double block fwd+bwd vs matmul rates
# Expected total: about 2.5 minutes without the build, 4 with it; the caps add up to 660 s, so
# the overall budget is what keeps the script under 8 minutes: a step starts only with at least
# 15 s of budget left and never runs past it (a step cut short counts as failed).
# Cheap, valuable checks run first, so a short budget still gives the correctness answers.
#
# check_golden.lua needs the golden cases: tests/lua/golden.lua finds them ($NEMO_GOLDEN, else
# tests/golden, committed with the checkout, else ../shared/golden), and they fail without them.
#
# It prints TAP, then a summary table (per step: exit status, seconds, ok / not ok / skip), and
# appends the "# bench: ..." lines of check_ops.lua and gpu_block.lua plus that summary to
# bench/RESULTS.md under a dated heading naming the host, the GPU and the commit (NO_RESULTS=1
# skips that). Exits non-zero when the build or any check fails or times out, and when no GPU is
# usable.
#   JOBS=16 (make -j), SKIP_BUILD=1 (use the build that is there), BUDGET=450 (seconds).
#
# Two more modes, for the lent device machine (which gets only the checkout and the paths a call
# carries, and has CUDA 13 but none of openblas, libyaml or LuaJIT):
#   tests/gpu/run.sh --stage    here, no GPU needed: builds a portable copy of the tree
#                               (PORTABLE=1 NO_NCCL=1, in $STAGE_SRC, default /tmp/nemo-gpustage)
#                               and fills build/gpurun/ (ignored, ~15 MB): libnemo.so,
#                               libnemo_cuda.so, nemo-lua, _cdef.lua, the non-system shared
#                               libraries they load (libs.tar.gz) and the golden cases
#                               (golden.tar.gz: flux_tiny, flux_tiny_guidance, flow_flux_tiny and,
#                               for FLUX and Wan from prompts, flux_sampling, flux_prompt, wan_prompt and tokenizers
#                               from $NEMO_GOLDEN, else tests/golden, else ../shared/golden); then
#                               prints the device call to make.
#                               STAGE_BUILD=0 stages ./build as it is instead.
#   tests/gpu/run.sh --staged   there (carry build/gpurun): installs those files into the
#                               checkout, puts the libraries on LD_LIBRARY_PATH, points
#                               NEMO_GOLDEN at the cases and runs the checks with SKIP_BUILD=1.
# bench/RESULTS.md is appended on that machine: copy it to $OUT to bring it back.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

mode=${1:-}

# ==== --stage: prepare build/gpurun here ====
if [ "$mode" = --stage ]; then
    set -e
    root=$(pwd)
    out=build/gpurun
    if [ "${STAGE_BUILD:-1}" = 1 ]; then
        src=${STAGE_SRC:-/tmp/nemo-gpustage}
        echo "# portable build (PORTABLE=1 NO_NCCL=1) in $src"
        mkdir -p "$src"
        tar -C "$root" --exclude=./build --exclude=./.git --exclude=./runs --exclude=./nemo-lua -cf - . | tar -C "$src" -xf -
        make -C "$src" -j"${JOBS:-$(nproc)}" PORTABLE=1 NO_NCCL=1 all
    else
        src=$root
        echo "# staging ./build as it is (built with -march=native unless PORTABLE=1: it may not run there)"
    fi
    [ -f "$src/build/libnemo_cuda.so" ] || { echo "Bail out! $src/build/libnemo_cuda.so missing (no nvcc?)"; exit 1; }
    rm -rf "$out"
    mkdir -p "$out/lib"
    for f in libnemo.so libnemo_cuda.so; do cp "$src/build/$f" "$out/"; strip --strip-debug "$out/$f"; done
    cp "$src/nemo-lua" "$out/"
    cp "$src/lua/nemo/_cdef.lua" "$out/"
    # every shared library they load that is not the C runtime or CUDA's own
    ldd "$src/build/libnemo.so" "$src/nemo-lua" | awk '/=> \// {print $3}' | sort -u | while read -r lib; do
        case "$(basename "$lib")" in
            libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libgcc_s.so*|libstdc++.so*|ld-linux*) ;;
            libcuda*|libcublas*|libnccl*) ;;
            *) cp -L "$lib" "$out/lib/" ;;
        esac
    done
    tar -C "$out/lib" -czf "$out/libs.tar.gz" .
    rm -rf "$out/lib"
    # the golden cases check_golden.lua reads, in the order of tests/lua/golden.lua
    if [ -n "${NEMO_GOLDEN:-}" ]; then gold=$NEMO_GOLDEN
    elif [ -d "$root/tests/golden" ]; then gold=$root/tests/golden
    else gold=$root/../shared/golden; fi
    for c in flux_tiny flux_tiny_guidance flow_flux_tiny flux_sampling flux_prompt wan_prompt tokenizers; do
        [ -d "$gold/$c" ] ||
            { echo "Bail out! no golden case $c in $gold (searched: NEMO_GOLDEN, tests/golden, ../shared/golden)"; exit 1; }
    done
    echo "# golden cases from $gold"
    tar -C "$gold" --exclude=activations.safetensors --exclude=case_f64.safetensors -czf "$out/golden.tar.gz" \
        flux_tiny flux_tiny_guidance flow_flux_tiny flux_sampling flux_prompt wan_prompt tokenizers
    ls -la "$out"
    echo "# staged $(du -sh "$out" | cut -f1) in $out (the whole call may carry 64 MiB with the checkout)"
    echo "# device call: carry [\"build/gpurun\"], timeout_s 540, command:"
    echo '#   tests/gpu/run.sh --staged 2>&1 | tee $OUT/gpu_run.log; cp bench/RESULTS.md $OUT/'
    exit 0
fi

# ==== --staged: install build/gpurun (on the device machine) ====
if [ "$mode" = --staged ]; then
    st=build/gpurun
    [ -f "$st/libnemo.so" ] || { echo "Bail out! --staged: no $st/libnemo.so (run --stage and carry build/gpurun)"; exit 1; }
    cp "$st/libnemo.so" "$st/libnemo_cuda.so" build/
    cp "$st/nemo-lua" ./nemo-lua
    cp "$st/_cdef.lua" lua/nemo/_cdef.lua
    mkdir -p "$st/lib"
    tar -C "$st/lib" -xzf "$st/libs.tar.gz"
    export LD_LIBRARY_PATH="$(pwd)/$st/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    if [ -f "$st/golden.tar.gz" ]; then
        mkdir -p "$st/golden"
        tar -C "$st/golden" -xzf "$st/golden.tar.gz"
        export NEMO_GOLDEN="$(pwd)/$st/golden"
    fi
    export SKIP_BUILD=1
    echo "# staged build installed; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
elif [ -n "$mode" ]; then
    echo "usage: tests/gpu/run.sh [--stage | --staged]" >&2
    exit 2
fi

t_begin=$(date +%s)
budget=${BUDGET:-450}
deadline=$(( t_begin + budget ))
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname), budget ${budget} s"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | sed 's/^/# gpu /'
else
    echo "# nvidia-smi not found"
fi

status=0
summary=()            # "step|exit|seconds|ok|not ok|skip" rows
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    start=$(date +%s)
    timeout -k 10 150 make -j"${JOBS:-16}" all
    rc=$?
    secs=$(( $(date +%s) - start ))
    echo "# build: ${secs} s (exit ${rc})"
    summary+=("build|${rc}|${secs}|-|-|-")
    if [ $rc -ne 0 ]; then echo "Bail out! make all failed (exit ${rc})"; exit 1; fi
fi
if [ ! -f build/libnemo_cuda.so ]; then echo "Bail out! build/libnemo_cuda.so was not built (no nvcc?)"; exit 1; fi

# ./nemo-lua when it exists; plain luajit with the build tree's paths otherwise.
if [ -x ./nemo-lua ]; then
    RUN=(./nemo-lua)
else
    RUN=(env NEMO_LIB=build/libnemo.so "LUA_PATH=lua/?.lua;lua/?/init.lua;;" luajit)
fi

# what nemo-lua finds here (libnemo, CUDA devices with their properties, NCCL, MPI), in the log
if [ -x ./nemo-lua ]; then ./nemo-lua --info 2>&1 | sed 's/^/# /'; fi

log=$(mktemp)
steplog=$(mktemp)
steps=(tests/lua/test_cuda.lua:30 tests/lua/test_cuda_kernels.lua:30 tests/gpu/check_streams.lua:30
       tests/gpu/check_golden.lua:60 tests/gpu/check_offload.lua:30
       tests/gpu/check_train.lua:90 tests/gpu/check_ops.lua:150 bench/gpu_block.lua:120)
args=()
if [ "${NEMO_FAKE_CUDA:-0}" != 0 ]; then
    # a dry run on emulated devices (tests/sh/test_gpu_stage.sh): the two tests of the plugin
    # itself need a real device, and the block benchmark runs shrunk, without cuBLAS
    echo "# NEMO_FAKE_CUDA=$NEMO_FAKE_CUDA: a dry run on emulated devices"
    steps=(tests/gpu/check_golden.lua:120 tests/gpu/check_offload.lua:60 tests/gpu/check_train.lua:180
           tests/gpu/check_ops.lua:900 bench/gpu_block.lua:120)
    args=(--small --no-cublas --steps 2)
fi
for t in "${steps[@]}"; do
    cap=${t##*:}; t=${t%:*}
    extra=()
    if [ "$t" = bench/gpu_block.lua ]; then extra=("${args[@]}"); fi
    left=$(( deadline - $(date +%s) ))
    if [ $left -lt 15 ]; then
        echo "# ==== $t: NOT RUN, ${left} s of the ${budget} s budget left"
        summary+=("$t|not run|0|-|-|-")
        status=1
        continue
    fi
    limit=$(( cap < left ? cap : left ))
    echo "# ==== $t (at most ${limit} s)"
    start=$(date +%s)
    NEMO_EXPECT_CUDA=1 timeout -k 5 "$limit" "${RUN[@]}" "$t" "${extra[@]}" 2>&1 | tee "$steplog"
    rc=${PIPESTATUS[0]}
    secs=$(( $(date +%s) - start ))
    cat "$steplog" >> "$log"
    nok=$(grep -c '^ok ' "$steplog")
    nskip=$(grep -c '^ok .* # SKIP' "$steplog")
    nfail=$(grep -c '^not ok ' "$steplog")
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "# TIMED OUT: $t after ${limit} s"; rc="timeout"; fi
    if [ "$rc" != 0 ]; then echo "# FAILED: $t (exit $rc)"; status=1; fi
    summary+=("$t|$rc|$secs|$(( nok - nskip ))|$nfail|$nskip")
done

total=$(( $(date +%s) - t_begin ))
table() {
    printf '| step | exit | seconds | ok | not ok | skip |\n| --- | --- | --- | --- | --- | --- |\n'
    for row in "${summary[@]}"; do echo "| ${row//|/ | } |"; done
}
echo "# summary (${total} s in all):"
table | sed 's/^/# /'

if [ "${NO_RESULTS:-0}" != 1 ] && grep -q '^# bench: ' "$log"; then
    [ -f bench/RESULTS.md ] || printf '%s\n' "# Benchmark results" "" \
        "Measured numbers, newest last. GPU sections are appended by tests/gpu/run.sh." > bench/RESULTS.md
    {
        echo ""
        echo "## tests/gpu/run.sh (check_ops.lua, gpu_block.lua), $(date -u +%Y-%m-%d) on $(hostname)"
        echo ""
        gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
        echo "GPU: ${gpu:-unknown}; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$( [ -n "$(git status --porcelain 2>/dev/null)" ] && echo ' (with local changes)'); checks $( [ $status -eq 0 ] && echo passed || echo FAILED); ${total} s in all."
        echo ""
        grep '^# bench: ' "$log" | sed 's/^# bench: /- /'
        echo ""
        table
    } >> bench/RESULTS.md
    echo "# bench lines and the summary appended to bench/RESULTS.md"
fi
rm -f "$log" "$steplog"

if [ $status -eq 0 ]; then echo "# all GPU checks passed"; else echo "# some GPU checks FAILED"; fi
exit $status
