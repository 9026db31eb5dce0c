-- tests/fake/dist_nccl.lua: nemo.dist's collectives over the nccl backend, through the CUDA
-- plugin's NCCL code (kernels/cuda/nccl.cu) on the CUDA emulator's NCCL (tests/cuda_emu/
-- nccl_emu.cc). Run by tests/sh/test_cuda_emu.sh under mpirun with 2 and 3 ranks, each process
-- with as many emulated devices as ranks (rank r on cuda:r); and by tests/sh/test_fake_cuda.sh
-- on 2 ranks with NEMO_FAKE_CUDA devices, where libnemo's emulated NCCL (engine/coll.c) carries
-- each NCCL call out as the MPI collective. Every check is decided on all ranks (over MPI, with
-- CPU tensors) and rank 0 prints TAP.
--
-- Each rank builds every rank's input itself, so the expected results need no communication:
-- small integers, exact in every dtype, for sum / avg / max / min, reduce-scatter, all-gather,
-- all-to-all, broadcast from every source, an async work, and a subgroup with its own
-- communicator.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local dist = require "nemo.dist"

if not (os.getenv("NEMO_EMU_CUDA_DEVICES") or os.getenv("NEMO_FAKE_CUDA")) or not os.getenv("OMPI_COMM_WORLD_SIZE") then
    io.write("1..0 # SKIP run under mpirun on the CUDA emulator (tests/sh/test_cuda_emu.sh) or on NEMO_FAKE_CUDA " ..
             "devices (tests/sh/test_fake_cuda.sh)\n")
    os.exit(0)
end

dist.init_process_group{backend = "nccl", timeout = 120}
local rank, world = dist.get_rank(), dist.get_world_size()
local D = "cuda:" .. rank
local R = require("dist_tap").new(T, dist)
local ok = R.ok
local function same(a, b)
    return a.dtype == b.dtype and T.same_bits(a:cpu():to{dtype = "float64"}, b:to{dtype = "float64"})
end

ok(dist.get_backend() == "nccl", "init_process_group{backend = 'nccl'} on the emulator: backend nccl")
ok(world >= 2 and nemo.cuda.device_count() == world, string.format("%d ranks, each process sees %d devices", world, world))

-- rank r's input: 8 * (r + 1) + i - 3 * (i % 4) for i = 0..n-1 (small integers)
local n = 37
local function input(r, dtype, len, off)
    local v = {}
    for i = 0, (len or n) - 1 do v[i + 1] = 8 * (r + 1) + (i + (off or 0)) - 3 * ((i + (off or 0)) % 4) end
    return nemo.tensor(v, {dtype = dtype})
end
local function fold(dtype, op, len, off)
    local acc = input(0, "float64", len, off)
    for r = 1, world - 1 do
        local x = input(r, "float64", len, off)
        if op == "max" then acc = nemo.maximum(acc, x)
        elseif op == "min" then acc = nemo.minimum(acc, x)
        else acc = acc + x end
    end
    if op == "avg" then acc = acc / world end
    return acc:to{dtype = dtype}
end

for _, dtype in ipairs{"float32", "float64", "bfloat16", "float16", "int64", "int32"} do
    for _, op in ipairs{"sum", "avg", "max", "min"} do
        if not (op == "avg" and dtype:match("^int")) then
            local t = input(rank, dtype):to(D)
            dist.all_reduce(t, op)
            ok(same(t, fold(dtype, op)), string.format("all_reduce %s of %s on %s", op, dtype, D))
        end
    end
end
do   -- avg of integers is refused before anything is sent (torch: not defined either)
    local t = input(rank, "int64"):to(D)
    local okk, err = pcall(dist.all_reduce, t, "avg")
    ok(not okk and tostring(err):find("avg of int64 values is not defined", 1, true) ~= nil,
       "all_reduce avg of int64 is an error on every rank, and the group goes on", tostring(err))
end

for _, dtype in ipairs{"float32", "bfloat16"} do
    local inp = input(rank, dtype, n * world):to(D)
    local out = nemo.empty({n}, {dtype = dtype, device = D})
    dist.reduce_scatter_tensor(out, inp)
    ok(same(out, fold(dtype, "sum", n, n * rank)),
       string.format("reduce_scatter_tensor of %s: rank %d gets the sum of block %d", dtype, rank, rank))
    local g = nemo.empty({n * world}, {dtype = dtype, device = D})
    dist.all_gather_into_tensor(g, input(rank, dtype):to(D))
    local parts = {}
    for r = 0, world - 1 do parts[r + 1] = input(r, dtype) end
    ok(same(g, nemo.cat(parts, 0)), string.format("all_gather_into_tensor of %s: every rank's input in rank order", dtype))
end

-- all_to_all_single: block j of rank r's input (input(r) of n * world elements) goes to rank j, so
-- rank r receives block r of every rank's input, in rank order
for _, dtype in ipairs{"float32", "bfloat16", "float16", "int64"} do
    local out = nemo.empty({world, n}, {dtype = dtype, device = D})
    dist.all_to_all_single(out, input(rank, dtype, n * world):to(D))
    local parts = {}
    for r = 0, world - 1 do parts[r + 1] = input(r, dtype, n, n * rank) end
    ok(out.device == D and same(out:reshape{-1}, nemo.cat(parts, 0)),
       string.format("all_to_all_single of %s on cuda:RANK: block i of rank r's output is rank i's block r", dtype))
end
do   -- async, in a subgroup (ranks 0, 2, ... and 1, 3, ...): blocks of the members, by group rank
    local color = rank % 2
    local g = dist.new_subgroup(color, rank, "a2a_parity")
    local members = {}
    for r = color, world - 1, 2 do members[#members + 1] = r end
    local gs, gr = g:size(), g:rank()
    local out = nemo.empty({n * gs}, {device = D})
    local w = dist.all_to_all_single(out, input(rank, "float32", n * gs):to(D), {group = g, async_op = true})
    w:wait()
    local parts = {}
    for i = 1, gs do parts[i] = input(members[i], "float32", n, n * gr) end
    ok(gs == #members and same(out, nemo.cat(parts, 0)),
       "all_to_all_single{async_op = true} in the subgroups of even and odd ranks (group ranks, not world ranks)")
    g:destroy()
end
do   -- refused before anything is sent, on every rank: the group goes on
    local okk, err = pcall(dist.all_to_all_single, nemo.empty({n * world + 1}, {device = D}),
                           nemo.empty({n * world + 1}, {device = D}))
    ok(not okk and tostring(err):find("not divisible by group size " .. world, 1, true) ~= nil,
       "all_to_all_single of a size the group does not divide: an error naming it", tostring(err))
    okk, err = pcall(dist.all_to_all_single, nemo.empty({n * world}, {device = D}), nemo.empty({n * world}))
    ok(not okk and tostring(err):find("different devices", 1, true) ~= nil,
       "all_to_all_single of a cuda output and a cpu input: an error", tostring(err))
end

for src = 0, world - 1 do
    local t = input(rank, "float32"):to(D)
    dist.broadcast(t, {src = src})
    ok(same(t, input(src, "float32")), string.format("broadcast from rank %d", src))
end

do   -- async: the work completes on wait, and the tensor holds the sum then
    local t = input(rank, "float32"):to(D)
    local w = dist.all_reduce(t, {op = "sum", async_op = true})
    ok(w ~= nil, "all_reduce{async_op = true} returns a work")
    w:wait()
    ok(same(t, fold("float32", "sum")), "... whose result is there after wait()")
end

do   -- a subgroup has its own communicator: ranks 0, 2, ... and 1, 3, ...
    local color = rank % 2
    local g = dist.new_subgroup(color, rank, "parity")
    local t = nemo.full({5}, rank + 1, {device = D})
    dist.all_reduce(t, {op = "sum", group = g})
    local want = 0
    for r = color, world - 1, 2 do want = want + r + 1 end
    ok(same(t, nemo.full({5}, want)), string.format("all_reduce in subgroup %d (its own NCCL communicator): %g", color, want))
end

-- the world's collectives still work after the subgroup's
local t = input(rank, "float64"):to(D)
dist.all_reduce(t, "max")
ok(same(t, fold("float64", "max")), "the world's communicator after the subgroup's")

dist.destroy_process_group()
R.done()
