-- lua/nemo/parallel/init.lua: nemo.parallel, the parallel managers behind a pipeline's
-- parallel_scheme (Automodel's _create_parallel_manager / _apply_parallelization):
--
--   local parallel = require "nemo.parallel"
--   local mgr = parallel._create_parallel_manager{_manager_type = "ddp", bucket_cap_mb = 25}
--   mgr:parallelize(model)
--   local managers = parallel._apply_parallelization(pipe, {transformer = {_manager_type = "ddp"}})
--
-- Manager types: "ddp" (DistributedDataParallel, nemo.parallel.ddp) and "fsdp2" (the default,
-- as in Automodel: fully sharded data parallelism and HSDP, nemo.parallel.fsdp2). Options are checked: an unknown
-- key, a `backend` key (it belongs to dist_env / init_process_group) or a size that nemo-lua
-- cannot run (pp/ep > 1; tp/cp > 1 under ddp) is an error naming it. Unlike Automodel, unknown FSDP2 keys are
-- not dropped silently.
local mesh = require "nemo.parallel.mesh"
local ddp = require "nemo.parallel.ddp"
local fsdp2 = require "nemo.parallel.fsdp2"

local M = {}
M.DeviceMesh = mesh.DeviceMesh
M.DDPManager = ddp.DDPManager
M.FSDP2Manager = fsdp2.FSDP2Manager
M.mesh, M.ddp, M.fsdp2 = mesh, ddp, fsdp2

-- FSDP2Config's keys (Automodel) plus the recipe-level ones the fsdp block carries.
M.FSDP2_OPTIONS = fsdp2.OPTIONS

local function sorted_keys(t)
    local k = {}
    for n in pairs(t) do k[#k + 1] = n end
    table.sort(k)
    return k
end

-- _create_parallel_manager(args) -> a manager with :parallelize(model) (returns the model).
function M._create_parallel_manager(args)
    args = args or {}
    if type(args) ~= "table" then error("_create_parallel_manager: expected a table of manager options", 2) end
    if args.backend ~= nil then
        error("_create_parallel_manager: 'backend' is not a manager option: the process group's backend comes from " ..
              "dist_env.backend (nemo.dist.init_process_group{backend=})", 2)
    end
    local kind = args._manager_type
    if kind == nil then kind = "fsdp2" end
    local opts = {}
    for k, v in pairs(args) do if k ~= "_manager_type" then opts[k] = v end end
    if kind == "ddp" then
        for k in pairs(opts) do
            if ddp.OPTIONS[k] == nil then
                error(string.format("_create_parallel_manager: unknown ddp option '%s' (known: %s)", tostring(k),
                    table.concat(sorted_keys(ddp.OPTIONS), ", ")), 2)
            end
        end
        for _, k in ipairs { "tp_size", "cp_size", "pp_size", "ep_size" } do
            if type(opts[k]) == "number" and opts[k] > 1 then
                error(string.format("_create_parallel_manager: ddp does not support %s > 1 (got %d)", k, opts[k]), 2)
            end
        end
        local ok, mgr = pcall(ddp.DDPManager, opts)
        if not ok then error(mgr, 2) end
        return mgr
    elseif kind == "fsdp2" then
        for k in pairs(opts) do
            if not M.FSDP2_OPTIONS[k] then
                error(string.format("_create_parallel_manager: unknown fsdp2 option '%s' (known: %s)", tostring(k),
                    table.concat(sorted_keys(M.FSDP2_OPTIONS), ", ")), 2)
            end
        end
        local ok, mgr = pcall(fsdp2.FSDP2Manager, opts)
        if not ok then error(mgr, 2) end
        return mgr
    else
        error(string.format("_create_parallel_manager: _manager_type must be 'fsdp2' or 'ddp', got '%s'",
            tostring(kind)), 2)
    end
end

-- _apply_parallelization(pipe, scheme) -> {component_name = manager}: for each component named in
-- the scheme (in name order, the same on every rank), create its manager, record the component's
-- pre-shard state_dict keys on the manager (pre_shard_keys, what a consolidated export names
-- tensors by), parallelize it and put the result back into the pipeline.
function M._apply_parallelization(pipe, scheme)
    if scheme == nil or next(scheme) == nil then return {} end
    if type(scheme) ~= "table" then error("parallel_scheme: expected a table of component -> manager options", 2) end
    local dist = require "nemo.dist"
    if not dist.is_initialized() then
        -- one process without a launcher: its process group is itself; with a launcher the
        -- caller must choose the backend and timeout
        if dist.env().world_size == 1 then
            dist.init_process_group{backend = "self"}
        else
            error("parallel_scheme needs an initialized process group: call nemo.dist.init_process_group() first " ..
                  "(the training recipe does)", 2)
        end
    end
    local names = sorted_keys(scheme)
    local managers = {}
    for _, name in ipairs(names) do
        local comps = rawget(pipe, "components") or {}
        local comp = comps[name]
        if comp == nil then
            error(string.format("parallel_scheme names component '%s', which the pipeline does not have (it has: %s)",
                name, table.concat(sorted_keys(comps), ", ")), 2)
        end
        local args = scheme[name]
        if type(args) ~= "table" then
            error(string.format("parallel_scheme.%s: expected a table of manager options, got %s", name, type(args)), 2)
        end
        local ok, mgr = pcall(M._create_parallel_manager, args)
        if not ok then error("parallel_scheme." .. name .. ": " .. tostring(mgr), 2) end
        local keys = {}
        if comp.state_dict then
            local _, ordered = comp:state_dict()   -- keys in registration order
            keys = ordered or keys
        end
        mgr.pre_shard_keys = keys
        local wrapped = mgr:parallelize(comp)
        comps[name] = wrapped
        if name == "transformer" then rawset(pipe, "transformer", wrapped) end
        managers[name] = mgr
    end
    return managers
end

return M
