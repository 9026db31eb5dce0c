-- lua/nemo/cuda.lua: nemo.cuda, the CUDA side of the device API (torch.cuda's names):
--   is_available(), device_count(), unavailable_reason(), current_device(), set_device(i),
--   synchronize([device]), memory_stats([device]) -> {current=, peak=, cached=} (bytes),
--   reset_peak_memory_stats([device]), memory_allocated([device]), max_memory_allocated([device]);
--   streams and events: Stream([device]), default_stream([device]), current_stream([device]),
--   set_stream(s), stream(s, fn, ...), Event{enable_timing=, device=} (methods below);
--   get_device_properties([device]), get_device_name([device]).
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

-- get_device_properties([device]) -> {name, total_memory (bytes), major, minor (compute
-- capability), multi_processor_count, runtime_version, driver_version (13000 = 13.0),
-- emulated (NEMO_FAKE_CUDA's host-memory devices)}, as torch.cuda.get_device_properties.
function M.get_device_properties(d)
    local idx = existing_device(d, "cuda.get_device_properties")
    local info = ffi.new("nemo_cuda_device_info")
    check(C.nemo_cuda_get_device_info(idx, info), "cuda.get_device_properties")
    return {name = ffi.string(info.name), total_memory = tonumber(info.total_memory), major = info.major,
            minor = info.minor, multi_processor_count = info.multi_processor_count,
            runtime_version = info.runtime_version, driver_version = info.driver_version,
            emulated = info.emulated ~= 0}
end
function M.get_device_name(d) return M.get_device_properties(d).name end

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

-- ==== streams and events ====
-- Streams are ids per device: 0 the default stream, 1..32 a pool of streams that run
-- concurrently with it (libnemo, engine/cuda_stream.c). cuda.Stream() hands out the pool's
-- streams in turn, as PyTorch's stream pool does: a 33rd Stream shares a stream with the 1st.

local MAX_STREAMS = 32
local next_sid = {}

local Stream = {}
Stream.__index = Stream
local Event = {}
Event.__index = Event

local function is_stream(s) return getmetatable(s) == Stream end
local function stream_of(s, what)
    if not is_stream(s) then
        error(string.format("%s: expected a cuda.Stream, got %s", what, type(s)), 3)
    end
    return s
end

-- cuda.Stream([device]): a stream of the pool on device (default: the current device).
function M.Stream(d)
    if type(d) == "table" and getmetatable(d) == nil and d.device ~= nil then d = d.device end
    local idx = existing_device(d, "cuda.Stream")
    local sid = (next_sid[idx] or 0) % MAX_STREAMS + 1
    next_sid[idx] = sid
    return setmetatable({device = idx, id = sid}, Stream)
end

-- The default stream (id 0) and the current stream of a device.
function M.default_stream(d)
    return setmetatable({device = existing_device(d, "cuda.default_stream"), id = 0}, Stream)
end
function M.current_stream(d)
    local idx = existing_device(d, "cuda.current_stream")
    local sid = C.nemo_cuda_current_stream(idx)
    check(sid)
    return setmetatable({device = idx, id = tonumber(sid)}, Stream)
end

-- Makes s the current stream of its device: kernels and copies on that device go to it.
function M.set_stream(s)
    stream_of(s, "cuda.set_stream")
    check(C.nemo_cuda_set_stream(s.device, s.id))
end

local function pack(...) return {n = select("#", ...), ...} end

-- cuda.stream(s, fn, ...): fn(...) with s the current stream of its device; the previous
-- stream is current again afterwards, also when fn raises. Returns fn's results.
function M.stream(s, fn, ...)
    stream_of(s, "cuda.stream")
    if type(fn) ~= "function" then error("cuda.stream: expected a function to run on the stream, got " .. type(fn), 2) end
    local prev = M.current_stream(s.device)
    M.set_stream(s)
    local res = pack(pcall(fn, ...))
    M.set_stream(prev)
    if not res[1] then error(res[2], 0) end
    return unpack(res, 2, res.n)
end

function Stream:synchronize() check(C.nemo_cuda_stream_synchronize(self.device, self.id)) end
function Stream:query()
    local r = C.nemo_cuda_stream_query(self.device, self.id)
    check(r)
    return r == 1
end
-- Work queued on this stream from now on waits for event e (or for stream s as it is now).
function Stream:wait_event(e) Event.wait(e, self) end
function Stream:wait_stream(s) self:wait_event(stream_of(s, "Stream:wait_stream"):record_event()) end
function Stream:record_event(e)
    e = e or M.Event{device = self.device}
    e:record(self)
    return e
end
function Stream.__eq(a, b) return a.device == b.device and a.id == b.id end
function Stream.__tostring(s) return string.format("cuda.Stream(cuda:%d, id %d)", s.device, s.id) end
M.is_stream = is_stream

-- cuda.Event{enable_timing = false, device = current}: a CUDA event of that device.
function M.Event(opts)
    opts = opts or {}
    if type(opts) ~= "table" then error("cuda.Event: expected a table of options, got " .. type(opts), 2) end
    for k in pairs(opts) do
        if k ~= "enable_timing" and k ~= "device" then
            error("cuda.Event: unknown option '" .. tostring(k) .. "' (enable_timing, device)", 2)
        end
    end
    local idx = existing_device(opts.device, "cuda.Event")
    local h = C.nemo_cuda_event_new(idx, opts.enable_timing and 1 or 0)
    if h == nil then check(-1) end
    return setmetatable({device = idx, timing = opts.enable_timing and true or false,
                         _h = ffi.gc(h, C.nemo_cuda_event_free)}, Event)
end
local function event_of(e, what)
    if getmetatable(e) ~= Event then error(string.format("%s: expected a cuda.Event, got %s", what, type(e)), 3) end
    return e
end
-- Captures the work queued on stream s (default: the current stream of the event's device).
function Event:record(s)
    event_of(self, "Event:record")
    s = s and stream_of(s, "Event:record") or M.current_stream(self.device)
    check(C.nemo_cuda_event_record(self._h, s.device, s.id))
end
-- Work queued on stream s (default: the current stream of the event's device) from now on
-- waits for this event.
function Event:wait(s)
    event_of(self, "Event:wait")
    s = s and stream_of(s, "Event:wait") or M.current_stream(self.device)
    check(C.nemo_cuda_event_wait(self._h, s.device, s.id))
end
function Event:query()
    local r = C.nemo_cuda_event_query(event_of(self, "Event:query")._h)
    check(r)
    return r == 1
end
function Event:synchronize() check(C.nemo_cuda_event_synchronize(event_of(self, "Event:synchronize")._h)) end
-- Milliseconds from this event to end (both made with enable_timing = true, both recorded and
-- complete: synchronize end first).
function Event:elapsed_time(e)
    local ms = ffi.new("double[1]")
    check(C.nemo_cuda_event_elapsed(event_of(self, "Event:elapsed_time")._h, event_of(e, "Event:elapsed_time")._h, ms))
    return ms[0]
end
function Event.__tostring(e) return string.format("cuda.Event(cuda:%d%s)", e.device, e.timing and ", timing" or "") end

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
