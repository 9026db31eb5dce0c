#!/usr/bin/env bash
# tests/sh/test_mpi.sh: distributed training and generation on several processes:
# tests/lua/test_dist.lua, test_fsdp.lua, test_context_parallel.lua, test_tensor_parallel.lua and
# test_generate_dist.lua under
# `mpirun -np 2` and `mpirun -np 4 --oversubscribe` (its TAP lines renumbered into this file's
# stream, prefixed with [np N]); engine/coll.c's Open MPI declarations checked against mpi.h;
# libnemo without a link to libmpi; `nemo-lua --nproc-per-node N`; the launcher's variables;
# and that a stuck, dead or failing rank ends the job with a message instead of a hang.
# Prints TAP; skips everything with a SKIP line when mpirun is absent. Every run is under
# `timeout`, so a bug cannot hang prove.
set -u
cd "$(dirname "$0")/../.." || exit 1
ROOT=$(pwd)
N="$ROOT/nemo-lua"
if ! command -v mpirun > /dev/null 2>&1; then
    echo "1..0 # SKIP mpirun not found (install openmpi-bin to run the multi-process tests)"
    exit 0
fi
if [ ! -x "$N" ]; then echo "Bail out! $N is not built (run make)"; exit 1; fi

T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
unset NEMO_LIB LUA_PATH LUA_CPATH LUA_INIT WORLD_SIZE RANK LOCAL_RANK LOCAL_WORLD_SIZE SLURM_STEP_NUM_TASKS
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader}"   # loopback: shared memory only
MPIRUN=(mpirun)
if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

source tests/sh/lib/tap.sh
like() { if [[ "$1" =~ $2 ]]; then pass "$3"; else fail "$3" "got:" "$1" "expected to match: $2"; fi; }

# run SECONDS CMD...: sets OUT (stdout), ERR (stderr), RC, SECS (wall seconds)
run() {
    local limit=$1; shift
    local t0; t0=$(date +%s.%N)
    timeout "$limit" "$@" > "$T/out" 2> "$T/err"
    RC=$?
    SECS=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    OUT=$(cat "$T/out"); ERR=$(cat "$T/err")
}

# ==== the multi-rank Lua tests, renumbered ====
# sub FILE NP ARGS...: runs tests/lua/FILE under mpirun and copies its TAP lines into this stream.
sub() {
    local file=$1 np=$2; shift 2
    run 300 "${MPIRUN[@]}" -np "$np" "$@" "$N" "tests/lua/$file"
    ERR_TAIL=$(printf '%s' "$ERR" | tail -n 30) relay "np $np" "[np $np] $file (${SECS%.*} s)" "$RC" "$OUT"
}
sub test_dist.lua 2
sub test_dist.lua 4 --oversubscribe
sub test_fsdp.lua 2
sub test_fsdp.lua 4 --oversubscribe
sub test_context_parallel.lua 2
sub test_context_parallel.lua 4 --oversubscribe
sub test_context_parallel.lua 8 --oversubscribe
sub test_tensor_parallel.lua 2
sub test_tensor_parallel.lua 4 --oversubscribe
sub test_tensor_parallel.lua 8 --oversubscribe
sub test_generate_dist.lua 2
sub test_generate_dist.lua 4 --oversubscribe

# ==== build: Open MPI's ABI, no link to libmpi ====
if command -v mpicc > /dev/null 2>&1; then
    if ABI=$(mpicc -std=gnu11 -fopenmp -fsyntax-only -Wall -Wextra -Werror -Wno-unused-parameter \
             -DNEMO_COLL_ABI_CHECK -Iengine/include -Iengine engine/coll.c 2>&1); then
        pass "engine/coll.c's Open MPI types, constants and function types match mpi.h (mpicc -DNEMO_COLL_ABI_CHECK)"
    else
        fail "engine/coll.c's Open MPI declarations match mpi.h" "$ABI"
    fi
else
    skip "engine/coll.c's Open MPI declarations match mpi.h" "no mpicc (libopenmpi-dev)"
fi
NEEDED=$(readelf -d build/libnemo.so 2>/dev/null | grep NEEDED)
if [ -n "$NEEDED" ] && ! grep -q libmpi <<< "$NEEDED"; then
    pass "libnemo.so does not link libmpi (it is opened at run time), so it loads without Open MPI"
else
    fail "libnemo.so does not link libmpi" "$NEEDED"
fi
run 30 env NEMO_MPI_LIB=/nonexistent/libmpi.so.40 "$N" -e '
    local dist = require "nemo.dist"
    print(dist.is_mpi_available())
    local ok, err = pcall(dist.init_process_group, {backend = "mpi"})
    print(err)
    print(dist.init_process_group{backend = "self"} ~= nil, dist.get_world_size())'
like "$OUT" "^false	Open MPI's libmpi.so.40 cannot be loaded .*install Open MPI" \
    "without libmpi: is_mpi_available() is false and says how to install it"
like "$OUT" $'\n''true	1$' "without libmpi: the self backend still runs one process"
like "$OUT" "backend 'mpi' needs MPI: Open MPI's libmpi.so.40 cannot be loaded" \
    "without libmpi: init_process_group{backend = 'mpi'} is an error saying why"

# ==== the launcher ====
cat > "$T/ranks.lua" <<'EOF'
local dist = require "nemo.dist"
dist.init_process_group()
local e = dist.env()
print(string.format("rank %d of %d local %d launcher %s args %s", dist.get_rank(), dist.get_world_size(),
    e.local_rank, e.launcher, table.concat({...}, ",")))
EOF
run 60 "$N" --nproc-per-node 2 "$T/ranks.lua" a b
SORTED=$(printf '%s\n' "$OUT" | sort)
if [ "$RC" = 0 ] && [ "$SORTED" = "$(printf 'rank 0 of 2 local 0 launcher openmpi args a,b\nrank 1 of 2 local 1 launcher openmpi args a,b')" ]; then
    pass "--nproc-per-node 2 starts 2 ranks through mpirun; each sees its rank, the world and the script's args"
else
    fail "--nproc-per-node 2 starts 2 ranks" "rc $RC" "$OUT" "$ERR"
fi
run 60 "$N" --nproc-per-node=3 -e 'io.write(os.getenv("OMPI_COMM_WORLD_SIZE"), " ", os.getenv("OMP_NUM_THREADS"), "\n")'
NP=$(nproc)
THR=$(( NP / 3 > 0 ? NP / 3 : 1 ))
if [ "$RC" = 0 ] && [ "$(printf '%s\n' "$OUT" | sort -u)" = "3 $THR" ]; then
    pass "--nproc-per-node=3 (above $NP cores: --oversubscribe) runs -e on 3 ranks with OMP_NUM_THREADS = cores / 3"
else
    fail "--nproc-per-node=3 runs 3 ranks" "rc $RC" "$OUT" "$ERR"
fi
run 30 env NEMO_MPIRUN=/nonexistent/mpirun "$N" --nproc-per-node 2 -e 'print(1)'
like "$ERR" "starts the processes with Open MPI's mpirun, but '/nonexistent/mpirun' cannot be run" \
    "--nproc-per-node without mpirun: an error saying what to install"
run 30 env WORLD_SIZE=2 RANK=0 "$N" -e 'require("nemo.dist").init_process_group()'
like "$ERR" "WORLD_SIZE=2 came from torchrun-style variables.*--nproc-per-node 2" \
    "torchrun-style WORLD_SIZE=2 without an MPI launcher: an error that says how to launch"
run 30 env WORLD_SIZE=3 RANK=2 LOCAL_RANK=1 "$N" -e 'local e = require("nemo.dist").env(); io.write(e.launcher, e.rank, e.world_size, e.local_rank)'
like "$OUT" "^torchrun231$" "dist.env() reads torchrun-style RANK / WORLD_SIZE / LOCAL_RANK"
run 30 env SLURM_PROCID=5 SLURM_STEP_NUM_TASKS=8 SLURM_LOCALID=1 SLURM_STEP_TASKS_PER_NODE='4(x2)' "$N" -e \
    'local e = require("nemo.dist").env(); io.write(e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size)'
like "$OUT" "^slurm5814$" "dist.env() reads a Slurm job step (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID)"
run 30 "$N" -e 'require("nemo.dist").init_process_group{backend = "nccl"}'
like "$ERR" "backend 'nccl' is not available: the nccl backend needs a CUDA device" \
    "backend 'nccl' on a machine without a GPU: a clear error (before MPI starts)"

# ==== a stuck, a dead and a failing rank end the job ====
cat > "$T/stuck.lua" <<'EOF'
local nemo = require "nemo"
local dist = require "nemo.dist"
dist.init_process_group{timeout = 1}
if dist.get_rank() == 1 then os.execute("sleep 20") end
dist.all_reduce(nemo.ones({4}))
EOF
run 60 "${MPIRUN[@]}" -np 2 "$N" "$T/stuck.lua"
if [ "$RC" != 0 ] && [ "${SECS%.*}" -lt 15 ] && [[ "$ERR" =~ "all_reduce on group 'world' (rank 0 of 2, 4 float32 elements): no completion after 1".*"another rank of the group has died, is stuck" ]]; then
    pass "a stuck rank: the others fail after the timeout (1 s) with a message naming the collective, and the job ends (${SECS%.*} s)"
else
    fail "a stuck rank ends the job with a clear message" "rc $RC after $SECS s" "$ERR"
fi
cat > "$T/dead.lua" <<'EOF'
local nemo = require "nemo"
local dist = require "nemo.dist"
dist.init_process_group{timeout = 60}
if dist.get_rank() == 1 then os.execute("kill -9 $PPID") end
dist.all_reduce(nemo.ones({4}))
EOF
run 60 "${MPIRUN[@]}" -np 2 "$N" "$T/dead.lua"
if [ "$RC" != 0 ] && [ "${SECS%.*}" -lt 30 ]; then
    pass "a dead rank (SIGKILL): mpirun ends the job (exit $RC after ${SECS%.*} s), nobody hangs"
else
    fail "a dead rank ends the job" "rc $RC after $SECS s" "$ERR"
fi
cat > "$T/fail.lua" <<'EOF'
local nemo = require "nemo"
local dist = require "nemo.dist"
dist.init_process_group{timeout = 2}
if arg[1] == "guard" then
    dist.guard(function()
        if dist.get_rank() == 1 then error("boom on rank 1") end
        dist.all_reduce(nemo.ones({4}))
    end)
else
    if dist.get_rank() == 1 then error("boom on rank 1") end
    dist.all_reduce(nemo.ones({4}))
end
EOF
run 60 "${MPIRUN[@]}" -np 2 "$N" "$T/fail.lua"
# the failing rank calls MPI_Abort (or exits first and mpirun ends the job): either way the job
# ends promptly, with the rank's error
if [ "$RC" != 0 ] && [ "${SECS%.*}" -lt 10 ] && [[ "$ERR" =~ "boom on rank 1" ]]; then
    pass "a Lua error on one rank: the job ends at once with the error (${SECS} s)"
else
    fail "a Lua error on one rank ends the job" "rc $RC after $SECS s" "$ERR"
fi
run 60 "${MPIRUN[@]}" -np 2 "$N" "$T/fail.lua" guard
if [ "$RC" != 0 ] && [ "${SECS%.*}" -lt 10 ] && [[ "$ERR" =~ "nemo-lua (rank 1 of 2): ".*"boom on rank 1" ]] && ! [[ "$ERR" =~ "no completion after" ]]; then
    pass "dist.guard: a Lua error on one rank aborts the job at once, without waiting for the timeout (${SECS%.*} s)"
else
    fail "dist.guard aborts the job at once" "rc $RC after $SECS s" "$ERR"
fi

echo "1..$n"
