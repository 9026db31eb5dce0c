-- lua/nemo/dist.lua: nemo.dist, the process group (torch.distributed's names):
--   dist.init_process_group{backend = "mpi"|"nccl"|"self", timeout_minutes = 1}
--   dist.get_rank(), dist.get_world_size(), dist.get_local_rank(), dist.is_initialized()
--   dist.all_reduce(t, {op = "avg", group = g, async_op = true}) -> Work (or nil when blocking)
--   dist.reduce_scatter_tensor(out, input, opts), dist.all_gather_into_tensor(out, input, opts)
--   dist.all_to_all_single(out, input, opts) (equal splits)
--   dist.broadcast(t, {src = 0, group = g}), dist.barrier(opts), dist.new_subgroup(color, key, name)
--   dist.destroy_process_group(), dist.abort(code), dist.stats()
--
-- Where ranks come from (dist.env()): Open MPI (OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK /
-- _LOCAL_SIZE, set by mpirun and by `nemo-lua --nproc-per-node N`), Slurm job steps (SLURM_PROCID,
-- SLURM_STEP_NUM_TASKS, SLURM_LOCALID: srun), or torchrun-style variables (RANK, WORLD_SIZE,
-- LOCAL_RANK, LOCAL_WORLD_SIZE). Bytes always travel through MPI (NCCL between GPUs, bootstrapped
-- over MPI), so torchrun-style variables with WORLD_SIZE > 1 but no MPI launcher are an error that
-- says how to launch; one process with no launcher runs the "self" backend without MPI.
--
-- Non-obvious rules:
-- - Every rank of a group must issue the same collectives in the same order (MPI matches them
--   by order). The C side polls with a deadline (timeout_minutes): a dead or stuck rank makes
--   the others fail with a message instead of hanging, and the job is then aborted at exit.
-- - src / ranks given with a group are ranks inside that group.
-- - Tensors handed to collectives must be contiguous; results are written in place.
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"

local C = nffi.C
local check = nffi.check

local M = {}

M.ReduceOp = {SUM = "sum", AVG = "avg", MAX = "max", MIN = "min"}
local OPS = {sum = C.NEMO_COLL_SUM, avg = C.NEMO_COLL_AVG, mean = C.NEMO_COLL_AVG, max = C.NEMO_COLL_MAX,
             min = C.NEMO_COLL_MIN}

-- ==== the launcher's environment ====

local function envnum(k)
    local v = os.getenv(k)
    if v == nil or v == "" then return nil end
    local n = tonumber(v)
    if n == nil or n % 1 ~= 0 or n < 0 then
        error(string.format("dist: environment variable %s=%q is not a non-negative integer", k, v), 0)
    end
    return n
end

-- {rank, world_size, local_rank, local_world_size, launcher = "openmpi"|"slurm"|"torchrun"|"none"}
function M.env()
    local ws = envnum("OMPI_COMM_WORLD_SIZE")
    if ws then
        return {launcher = "openmpi", world_size = ws, rank = envnum("OMPI_COMM_WORLD_RANK") or 0,
                local_rank = envnum("OMPI_COMM_WORLD_LOCAL_RANK") or 0,
                local_world_size = envnum("OMPI_COMM_WORLD_LOCAL_SIZE") or ws}
    end
    ws = envnum("SLURM_STEP_NUM_TASKS")   -- set inside srun job steps only (not in the batch script)
    if ws and envnum("SLURM_PROCID") then
        local per = tonumber((os.getenv("SLURM_STEP_TASKS_PER_NODE") or ""):match("^(%d+)")) or ws
        return {launcher = "slurm", world_size = ws, rank = envnum("SLURM_PROCID"),
                local_rank = envnum("SLURM_LOCALID") or 0, local_world_size = per}
    end
    ws = envnum("WORLD_SIZE")
    if ws then
        return {launcher = "torchrun", world_size = ws, rank = envnum("RANK") or 0,
                local_rank = envnum("LOCAL_RANK") or 0, local_world_size = envnum("LOCAL_WORLD_SIZE") or ws}
    end
    return {launcher = "none", world_size = 1, rank = 0, local_rank = 0, local_world_size = 1}
end

-- ==== availability ====

-- true, or false and the reason
function M.is_mpi_available()
    if C.nemo_coll_mpi_available() ~= 0 then return true end
    return false, ffi.string(C.nemo_coll_mpi_reason())
end

function M.is_nccl_available()
    local r = C.nemo_coll_nccl_unavailable_reason()
    if r == nil then return true end
    return false, ffi.string(r)
end

-- ==== groups ====

local Group = {}
Group.__index = Group
M.Group = Group

local function wrap_group(c, name, owned)
    return setmetatable({_c = c, name = name, owned = owned}, Group)
end
function Group:rank() return C.nemo_comm_rank(self._c) end
function Group:size() return C.nemo_comm_size(self._c) end
function Group:__tostring()
    return string.format("nemo.dist.Group('%s', rank %d of %d)", self.name, self:rank(), self:size())
end
-- Free a subgroup (every rank of it should do so; the world cannot be destroyed this way).
function Group:destroy()
    if self.owned and self._c ~= nil then C.nemo_comm_free(self._c) end
    self._c = nil
end

local state = {initialized = false}
local world

local function require_init(what, lvl)
    if not state.initialized then
        error(what .. ": the process group is not initialized; call nemo.dist.init_process_group() first", lvl or 3)
    end
end

local function group_of(opts, what)
    local g = opts and opts.group or world
    if g == nil then require_init(what, 4) end
    if getmetatable(g) ~= Group or g._c == nil then
        error(what .. ": group must be a nemo.dist.Group (from new_subgroup or a DeviceMesh)", 3)
    end
    return g
end

-- ==== init / destroy ====

local function auto_backend(env)
    if env.launcher == "none" then return "self" end
    local cuda = package.loaded["nemo.cuda"] or require("nemo.cuda")
    if cuda.is_available() then return "nccl" end
    return "mpi"
end

-- init_for_device(device, {backend =, timeout_minutes = 10}): the recipes' process group, unless
-- one is up already: itself for one process; between processes NCCL on CUDA devices (unless the
-- backend is "gloo"), MPI on the CPU (where "nccl", Automodel's default, means MPI).
function M.init_for_device(device, o)
    if state.initialized then return world end
    o = o or {}
    local backend = "self"
    if M.env().world_size > 1 then
        backend = (device ~= "cpu" and (o.backend or "nccl") ~= "gloo") and "nccl" or "mpi"
    end
    return M.init_process_group{backend = backend, timeout_minutes = o.timeout_minutes or 10}
end

-- init_process_group{backend=, timeout_minutes=, timeout=(seconds), device=(CUDA index for nccl)}
-- Returns the world group. Calling it again with the same backend returns the same group.
function M.init_process_group(opts)
    opts = opts or {}
    if type(opts) == "string" then opts = {backend = opts} end
    for k in pairs(opts) do
        if k ~= "backend" and k ~= "timeout_minutes" and k ~= "timeout" and k ~= "device" and
           k ~= "init_method" then
            error("init_process_group: unknown option '" .. tostring(k) .. "' (known: backend, timeout_minutes, " ..
                  "timeout, device, init_method)", 2)
        end
    end
    local env = M.env()
    local backend = opts.backend or auto_backend(env)
    if backend == "gloo" then backend = "mpi" end   -- torch's CPU backend name: MPI plays its role here
    if backend ~= "mpi" and backend ~= "nccl" and backend ~= "self" then
        error("init_process_group: backend '" .. tostring(backend) .. "' is not known (mpi, nccl, self)", 2)
    end
    local timeout = opts.timeout or (opts.timeout_minutes and opts.timeout_minutes * 60)
    if timeout ~= nil and (type(timeout) ~= "number" or timeout <= 0) then
        error("init_process_group: timeout must be a positive number of seconds (timeout_minutes: minutes)", 2)
    end
    if state.initialized then
        if state.backend ~= backend then
            error(string.format("init_process_group: already initialized with backend '%s', not '%s'",
                state.backend, backend), 2)
        end
        if timeout then check(C.nemo_coll_set_timeout(timeout)) end
        return world
    end
    if backend == "nccl" then   -- before MPI starts, so a CPU machine fails fast
        local ok, why = M.is_nccl_available()
        if not ok then
            error("init_process_group: backend 'nccl' is not available: " .. why .. " (use backend 'mpi' for CPU " ..
                  "training)", 2)
        end
    end
    if backend == "self" then
        if env.world_size > 1 then
            error(string.format("init_process_group: backend 'self' runs one process, but %s reports a world " ..
                "of %d", env.launcher, env.world_size), 2)
        end
        check(C.nemo_coll_init(C.NEMO_COLL_SELF, timeout or 0))
    else
        if env.launcher == "torchrun" and env.world_size > 1 then
            error(string.format("init_process_group: WORLD_SIZE=%d came from torchrun-style variables, but nemo-lua's " ..
                "collectives start through MPI; launch with `nemo-lua --nproc-per-node %d script.lua`, " ..
                "`mpirun -np %d nemo-lua script.lua` or srun", env.world_size, env.world_size, env.world_size), 2)
        end
        local ok, why = M.is_mpi_available()
        if not ok then error("init_process_group: backend '" .. backend .. "' needs MPI: " .. why, 2) end
        check(C.nemo_coll_init(C.NEMO_COLL_MPI, timeout or 0))
    end
    local w = C.nemo_comm_world()
    local size = C.nemo_comm_size(w)
    if env.launcher ~= "none" and size ~= env.world_size then
        error(string.format("init_process_group: the %s launcher says the world has %d processes, but MPI " ..
            "started %d; is this nemo-lua launched by mpirun/srun with an MPI that matches libmpi.so.40?",
            env.launcher, env.world_size, size), 2)
    end
    world = wrap_group(w, "world", false)
    state.initialized = true
    state.backend = backend
    state.env = env
    if backend == "nccl" then
        local cuda = require "nemo.cuda"
        local dev = opts.device or (env.local_rank % math.max(1, cuda.device_count()))
        check(C.nemo_comm_enable_nccl(w, dev))
        state.device = dev
    end
    return world
end

function M.is_initialized() return state.initialized end
function M.get_backend() require_init("get_backend"); return state.backend end

-- The world group (the default of every collective).
function M.group_world() require_init("group_world"); return world end

function M.get_rank(group)
    if group then return group:rank() end
    if not state.initialized then return M.env().rank end
    return C.nemo_comm_rank(world._c)
end
function M.get_world_size(group)
    if group then return group:size() end
    if not state.initialized then return M.env().world_size end
    return C.nemo_comm_size(world._c)
end
function M.get_local_rank() return (state.env or M.env()).local_rank end
function M.get_local_world_size() return (state.env or M.env()).local_world_size end
function M.is_main_process() return M.get_rank() == 0 end

function M.set_timeout(seconds) check(C.nemo_coll_set_timeout(seconds)) end
function M.get_timeout() return C.nemo_coll_get_timeout() end
function M.library_version() return ffi.string(C.nemo_coll_library_version()) end

-- Leave the process group (waits for every rank; MPI_Finalize). MPI cannot start again in
-- this process afterwards. Scripts that end without calling it are finalized at exit.
function M.destroy_process_group()
    if not state.initialized then return end
    check(C.nemo_coll_finalize())
    state.initialized = false
    world = nil
end

-- End every rank of the job now (MPI_Abort). For fatal errors on one rank.
function M.abort(code)
    io.stdout:flush()
    io.stderr:flush()
    C.nemo_coll_abort(code or 1)
end

-- guard(fn, ...): run fn; if it raises while a multi-rank group is up, print the error with its
-- traceback (prefixed by the rank) and abort the whole job at once, instead of leaving the other
-- ranks waiting in a collective until their timeout. Otherwise returns fn's results. For the
-- top level of training scripts (until the launcher aborts on errors by itself).
function M.guard(fn, ...)
    local res = {xpcall(fn, debug.traceback, ...)}
    if res[1] then return unpack(res, 2, table.maxn(res)) end
    if state.initialized and state.backend ~= "self" and M.get_world_size() > 1 then
        io.stdout:flush()
        io.stderr:write(string.format("nemo-lua (rank %d of %d): %s\naborting the job\n", M.get_rank(),
            M.get_world_size(), tostring(res[2])))
        io.stderr:flush()
        C.nemo_coll_abort(1)
    end
    error(res[2], 0)
end

-- A new group of the ranks of `parent` (default: the world) that pass the same color, ordered by
-- key. Every rank of parent must call it, in the same order as the others.
function M.new_subgroup(color, key, name, parent)
    require_init("new_subgroup")
    parent = parent or world
    local c = C.nemo_comm_split(parent._c, color, key or 0, name or "group")
    if c == nil then nffi.raise() end
    local g = wrap_group(c, name or "group", true)
    -- under NCCL a subgroup needs its own NCCL communicator (bootstrapped over the subgroup's MPI
    -- communicator, collectively), or collectives on its CUDA tensors would have none
    if state.backend == "nccl" and state.device ~= nil then check(C.nemo_comm_enable_nccl(c, state.device)) end
    return g
end

-- ==== works ====

local Work = {}
Work.__index = Work
M.Work = Work

local work_free = C.nemo_coll_work_free
-- Block until the collective is done (raises on a failure or a timeout).
function Work:wait()
    local rc = C.nemo_coll_wait(self._w)
    if rc < 0 then error(ffi.string(C.nemo_last_error()), 2) end
    return true
end
function Work:is_completed()
    local r = C.nemo_coll_test(self._w)
    if r < 0 then error(ffi.string(C.nemo_last_error()), 2) end
    return r == 1
end

-- Test every collective in flight once (lets MPI move bytes while compute runs); returns how
-- many are still running.
function M.progress()
    local r = C.nemo_coll_progress()
    if r < 0 then error(ffi.string(C.nemo_last_error()), 2) end
    return r
end

-- ==== collectives ====

local function parse_opts(opts, what)
    if opts == nil then return {} end
    if type(opts) == "string" then return {op = opts} end
    if type(opts) ~= "table" then error(what .. ": options must be a table or an op name", 3) end
    return opts
end

local function op_code(op, what)
    local c = OPS[op or "sum"]
    if c == nil then
        error(what .. ": op '" .. tostring(op) .. "' is not known (sum, avg, max, min)", 3)
    end
    return c
end

-- Called (not tail-called) by the collectives below, so level 3 is the user's line.
local function finish(p, opts)
    if p == nil then error(ffi.string(C.nemo_last_error()), 3) end
    local w = setmetatable({_w = ffi.gc(p, work_free)}, Work)
    if opts.async_op then return w end
    if C.nemo_coll_wait(w._w) < 0 then error(ffi.string(C.nemo_last_error()), 3) end
    return nil
end

local function tensor_arg(t, what, name)
    if not Tensor.is_tensor(t) then error(string.format("%s: %s must be a tensor", what, name), 3) end
    return t
end

-- all_reduce(t, {op = "sum"|"avg"|"max"|"min", group =, async_op =}) in place.
function M.all_reduce(t, opts)
    opts = parse_opts(opts, "all_reduce")
    tensor_arg(t, "all_reduce", "tensor")
    local g = group_of(opts, "all_reduce")
    local w = finish(C.nemo_coll_all_reduce_async(g._c, t._c, op_code(opts.op, "all_reduce")), opts)
    return w
end

-- reduce_scatter_tensor(out, input, opts): input holds group-size blocks of out's size; rank r
-- gets the reduction of block r.
function M.reduce_scatter_tensor(out, input, opts)
    opts = parse_opts(opts, "reduce_scatter_tensor")
    tensor_arg(out, "reduce_scatter_tensor", "output"); tensor_arg(input, "reduce_scatter_tensor", "input")
    local g = group_of(opts, "reduce_scatter_tensor")
    local w = finish(C.nemo_coll_reduce_scatter_async(g._c, out._c, input._c, op_code(opts.op, "reduce_scatter_tensor")), opts)
    return w
end

-- all_gather_into_tensor(out, input, opts): out holds every rank's input, in rank order.
function M.all_gather_into_tensor(out, input, opts)
    opts = parse_opts(opts, "all_gather_into_tensor")
    tensor_arg(out, "all_gather_into_tensor", "output"); tensor_arg(input, "all_gather_into_tensor", "input")
    local g = group_of(opts, "all_gather_into_tensor")
    local w = finish(C.nemo_coll_all_gather_async(g._c, out._c, input._c), opts)
    return w
end

-- all_to_all_single(out, input, opts): input and out hold the same number of elements N, a multiple
-- of the group size P; block j of input (elements [j N/P, (j+1) N/P)) goes to rank j, and block i
-- of out receives what rank i sent to this rank. Equal splits only: torch's output_split_sizes /
-- input_split_sizes are refused.
function M.all_to_all_single(out, input, opts)
    opts = parse_opts(opts, "all_to_all_single")
    tensor_arg(out, "all_to_all_single", "output"); tensor_arg(input, "all_to_all_single", "input")
    if opts.output_split_sizes ~= nil or opts.input_split_sizes ~= nil then
        error("all_to_all_single: output_split_sizes / input_split_sizes are not supported (equal splits only)", 2)
    end
    local g = group_of(opts, "all_to_all_single")
    local w = finish(C.nemo_coll_all_to_all_async(g._c, out._c, input._c), opts)
    return w
end

-- broadcast(t, {src = 0, group =, async_op =}) (or broadcast(t, src)): src is a rank in the group.
function M.broadcast(t, opts)
    if type(opts) == "number" then opts = {src = opts} end
    opts = parse_opts(opts, "broadcast")
    tensor_arg(t, "broadcast", "tensor")
    local g = group_of(opts, "broadcast")
    local w = finish(C.nemo_coll_broadcast_async(g._c, t._c, opts.src or 0), opts)
    return w
end

function M.barrier(opts)
    opts = parse_opts(opts, "barrier")
    local g = group_of(opts, "barrier")
    local w = finish(C.nemo_coll_barrier_async(g._c), opts)
    return w
end

-- Reduce plain Lua numbers: all_reduce_numbers({a, b}, "avg" [, group]) -> {a', b'} (float64).
-- Works before init too (then it is the identity), which keeps logging code simple.
function M.all_reduce_numbers(values, op, group)
    if not state.initialized and group == nil then
        local out = {}
        for i, v in ipairs(values) do out[i] = v end
        return out
    end
    local t = Tensor.tensor(values, {dtype = "float64"})
    M.all_reduce(t, {op = op or "sum", group = group})
    return t:tolist()
end
function M.all_reduce_number(v, op, group) return M.all_reduce_numbers({v}, op, group)[1] end

-- ==== statistics ====

local stats_buf = ffi.new("nemo_coll_stats[1]")
-- {calls, bytes, seconds}: collectives started, their payload bytes, and time spent inside
-- collective calls (what communication compute did not hide), since the last reset.
function M.stats()
    C.nemo_coll_get_stats(stats_buf)
    return {calls = tonumber(stats_buf[0].calls), bytes = tonumber(stats_buf[0].bytes),
            seconds = tonumber(stats_buf[0].seconds)}
end
function M.reset_stats() C.nemo_coll_reset_stats() end
-- Seconds on a monotonic clock.
function M.wtime() return C.nemo_coll_wtime() end

return M
