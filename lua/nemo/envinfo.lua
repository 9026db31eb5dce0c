-- lua/nemo/envinfo.lua: what nemo-lua finds on this machine, for `nemo-lua --info` and bug
-- reports (PyTorch's collect_env):
--   local info = require("nemo.envinfo").collect()   -- a table (fields below)
--   io.write(require("nemo.envinfo").report())        -- the same as lines of text
-- Nothing here raises: a part that cannot be probed says why instead. Probing CUDA loads the
-- plugin (and the CUDA runtime) once; probing MPI and NCCL only asks libnemo what was linked.
local ffi = require "ffi"

local M = {}

local function try(fn, ...)
    local ok, a, b = pcall(fn, ...)
    if ok then return a, b end
    return nil, tostring(a)
end

local function gib(bytes) return string.format("%.1f GiB", bytes / 2^30) end
local function version(v) return v and v > 0 and string.format("%d.%d", math.floor(v / 1000), v % 1000 / 10) or "?" end

-- collect() -> {nemo = version, luajit, lib (libnemo's path), abi, lua (the package's folder),
--   threads, amx, cuda = {available, reason, devices = {{index, name, total_memory, major, minor,
--   multi_processor_count, emulated}, ...}, runtime_version, driver_version}, nccl = {available,
--   reason}, mpi = {available, reason}, launcher = nemo.dist.env(), caches = {hub = {...},
--   demo}, env = {name = value for the variables that change nemo-lua's behaviour}}
function M.collect()
    local nemo = require "nemo"
    local nffi = require "nemo.ffi"
    local C = nffi.C
    local info = {nemo = nemo.version, luajit = jit and jit.version or "?", lib = nffi.lib_path,
                  abi = tonumber(C.nemo_abi_version())}
    local src = debug.getinfo(1, "S").source:match("^@(.*)/envinfo%.lua$")
    info.lua = src or "?"
    info.threads = try(function() return tonumber(C.nemo_get_num_threads()) end)
    info.amx = try(function() return C.nemo_cpu_has_amx() ~= 0 end)
    local cuda = {devices = {}}
    local cm = nemo.cuda
    if cm then
        cuda.available = cm.is_available()
        cuda.reason = not cuda.available and cm.unavailable_reason() or nil
        for i = 0, cm.device_count() - 1 do
            local p, why = try(cm.get_device_properties, i)
            local d = p or {name = "? (" .. tostring(why) .. ")"}
            d.index = i
            cuda.devices[#cuda.devices + 1] = d
            cuda.runtime_version = cuda.runtime_version or (p and p.runtime_version)
            cuda.driver_version = cuda.driver_version or (p and p.driver_version)
        end
    else
        cuda.available, cuda.reason = false, "nemo-lua was built without CUDA"
    end
    info.cuda = cuda
    local dist = require "nemo.dist"
    local ok, why = try(dist.is_nccl_available)
    info.nccl = {available = ok == true, reason = ok ~= true and why or nil}
    ok, why = try(dist.is_mpi_available)
    info.mpi = {available = ok == true, reason = ok ~= true and why or nil}
    info.launcher = dist.env()
    info.caches = {hub = require("nemo.hub").cache_dirs(), demo = require("nemo.train").demo_root({})}
    info.env = {}
    for _, k in ipairs { "OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "NEMO_CUDA_LIB", "NEMO_FAKE_CUDA",
                         "NEMO_AMX", "CUDA_VISIBLE_DEVICES", "NEMO_MPIRUN", "HF_HOME", "HF_HUB_CACHE",
                         "XDG_CACHE_HOME" } do
        local v = os.getenv(k)
        if v and v ~= "" then info.env[k] = v end
    end
    return info
end

-- report([info]) -> the text `nemo-lua --info` prints.
function M.report(info)
    info = info or M.collect()
    local fs = require "nemo.fs"
    local out = {}
    local function line(k, v) out[#out + 1] = string.format("%-10s %s", k, v) end
    line("nemo-lua", string.format("%s (%s)", tostring(info.nemo), tostring(info.luajit)))
    line("libnemo", string.format("%s (ABI %s)", tostring(info.lib), tostring(info.abi)))
    line("package", tostring(info.lua))
    line("CPU", string.format("%s threads (nemo.set_num_threads, OMP_NUM_THREADS); bfloat16 on AMX tiles: %s",
        tostring(info.threads or "?"), info.amx and "yes" or "no"))
    local cu = info.cuda
    if cu.available then
        local emulated = cu.devices[1] and cu.devices[1].emulated
        line("CUDA", string.format("%d device%s; %s", #cu.devices, #cu.devices == 1 and "" or "s", emulated and
            "emulated (NEMO_FAKE_CUDA)" or string.format("runtime %s, driver %s", version(cu.runtime_version),
            version(cu.driver_version))))
        for _, d in ipairs(cu.devices) do
            out[#out + 1] = string.format("  cuda:%d  %s%s", d.index, d.name, d.major and
                (d.emulated and "" or string.format(", %s, compute capability %d.%d, %d multiprocessors",
                    gib(d.total_memory or 0), d.major, d.minor, d.multi_processor_count or 0)) or "")
        end
    else
        line("CUDA", "no device: " .. tostring(cu.reason))
    end
    line("NCCL", info.nccl.available and "available" or ("not available: " .. tostring(info.nccl.reason)))
    line("MPI", info.mpi.available and "available" or ("not available: " .. tostring(info.mpi.reason)))
    local l = info.launcher
    line("launcher", l.launcher == "none" and "none (one process; --nproc-per-node N, mpirun, srun or torchrun " ..
        "start several)" or string.format("%s: rank %d of %d, local rank %d of %d", l.launcher, l.rank, l.world_size,
        l.local_rank, l.local_world_size))
    local hubs = {}
    for _, d in ipairs(info.caches.hub) do hubs[#hubs + 1] = d .. (fs.isdir(d) and "" or " (absent)") end
    line("hub cache", table.concat(hubs, ", "))
    line("demo", info.caches.demo .. (fs.isdir(info.caches.demo) and "" or " (not made yet)"))
    local keys = {}
    for k in pairs(info.env) do keys[#keys + 1] = k end
    table.sort(keys)
    for _, k in ipairs(keys) do out[#out + 1] = string.format("  %s=%s", k, info.env[k]) end
    return table.concat(out, "\n") .. "\n"
end

return M
