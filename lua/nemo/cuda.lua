-- lua/nemo/cuda.lua: nemo.cuda, the CUDA side of the device API (torch.cuda's names):
--   is_available(), device_count(), unavailable_reason(), current_device(), set_device(i),
--   synchronize([device]), memory_stats([device]) -> {current=, peak=, cached=} (bytes),
--   reset_peak_memory_stats([device]), memory_allocated([device]), max_memory_allocated([device]).
-- A device argument is an index (0, 1, ...), "cuda", "cuda:N" or a tensor on a CUDA device;
-- nil means the current device.
--
-- Non-obvious rules: is_available() and device_count() never raise (a CPU-only machine, a build
-- without the plugin, a missing driver all give false / 0, and unavailable_reason() says why).
-- What needs a device (current_device, set_device, synchronize) raises "no CUDA device: <why>".
-- The memory counters are plain counters kept by libnemo, so memory_stats() works without a
-- device (all zeros), as torch.cuda.memory_stats does before CUDA is initialised.
-- The current device is this module's state: libnemo has none (every call names its device).
local ffi = require "ffi"
local nffi = require "nemo.ffi"

local C = nffi.C
local check = nffi.check

local M = {}

local CUDA = 1                     -- NEMO_CUDA
local MAX_DEVICES = 16             -- libnemo keeps memory counters for cuda:0 .. cuda:15
local current = 0

-- ==== availability ====

function M.device_count()
    local ok, n = pcall(C.nemo_device_count, CUDA)
    return ok and tonumber(n) or 0
end

function M.is_available()
    return M.device_count() > 0
end

-- Why CUDA cannot be used (a string), or nil when it can.
function M.unavailable_reason()
    local ok, r = pcall(C.nemo_cuda_unavailable_reason)
    if not ok then return "libnemo cannot probe CUDA: " .. tostring(r) end
    if r == nil then return nil end
    return ffi.string(r)
end

-- Helpers below take lvl: the error level of the user's call as seen from the helper.
local function require_cuda(what, lvl)
    if not M.is_available() then
        error(string.format("%s: no CUDA device: %s", what, M.unavailable_reason() or "unknown reason"), lvl)
    end
end

-- ==== device arguments ====

-- nil | index | "cuda" | "cuda:N" | tensor -> index (not yet range-checked).
local function device_index(d, what, lvl)
    if d == nil then return current end
    if type(d) == "table" and d.device ~= nil then d = d.device end
    if type(d) == "number" then
        if d % 1 ~= 0 or d < 0 then
            error(string.format("%s: device index must be a non-negative integer, got %s", what, tostring(d)), lvl)
        end
        return d
    end
    if type(d) == "string" then
        if d == "cuda" then return current end
        local idx = d:match("^cuda:(%d+)$")
        if idx then return tonumber(idx) end
    end
    error(string.format("%s: expected a CUDA device (an index, 'cuda', 'cuda:N' or a cuda tensor), got %s",
        what, type(d) == "string" and ("'" .. d .. "'") or type(d)), lvl)
end

-- An index of an existing device (raises "no CUDA device" or names the valid range).
local function existing_device(d, what)
    local idx = device_index(d, what, 4)
    require_cuda(what, 4)
    local n = M.device_count()
    if idx >= n then
        error(string.format("%s: device cuda:%d does not exist (%d CUDA device%s)", what, idx, n, n == 1 and "" or "s"), 3)
    end
    return idx
end

-- An index with memory counters: a real device when CUDA is available, any slot otherwise.
local function counter_device(d, what)
    local idx = device_index(d, what, 4)
    local n = M.device_count()
    local limit = n > 0 and n or MAX_DEVICES
    if idx >= limit then
        error(string.format("%s: device cuda:%d does not exist (%d CUDA device%s)", what, idx, n, n == 1 and "" or "s"), 3)
    end
    return idx
end

-- ==== current device ====

function M.current_device()
    require_cuda("cuda.current_device", 3)
    return current
end

function M.set_device(d)
    current = existing_device(d, "cuda.set_device")
end

-- The current index without any check (for tensor.lua to resolve a bare "cuda"); never raises.
function M._current_index() return current end

-- "cuda:N" for the current device (or index i).
function M.device(i)
    return "cuda:" .. existing_device(i, "cuda.device")
end

-- ==== synchronization ====

-- Waits until every kernel and copy queued on the device has finished.
function M.synchronize(d)
    local idx = existing_device(d, "cuda.synchronize")
    check(C.nemo_device_synchronize(CUDA, idx))
end

-- ==== memory ====

function M.memory_stats(d)
    local idx = counter_device(d, "cuda.memory_stats")
    return {
        current = tonumber(C.nemo_memory_current(CUDA, idx)),
        peak = tonumber(C.nemo_memory_peak(CUDA, idx)),
        cached = tonumber(C.nemo_memory_cached(CUDA, idx)),
    }
end

function M.memory_allocated(d)
    return tonumber(C.nemo_memory_current(CUDA, counter_device(d, "cuda.memory_allocated")))
end

function M.max_memory_allocated(d)
    return tonumber(C.nemo_memory_peak(CUDA, counter_device(d, "cuda.max_memory_allocated")))
end

function M.reset_peak_memory_stats(d)
    C.nemo_memory_reset_peak(CUDA, counter_device(d, "cuda.reset_peak_memory_stats"))
end

return M
