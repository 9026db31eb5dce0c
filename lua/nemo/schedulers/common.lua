-- lua/nemo/schedulers/common.lua: what the schedulers share (flow_match_euler.lua's
-- FlowMatchEulerDiscreteScheduler, unipc.lua's UniPCMultistepScheduler): float32 rounding and
-- numpy's linspace, the checks of a config table (value kinds, null, unknown keys),
-- from_pretrained / save_pretrained of a scheduler_config.json, timesteps and lists of numbers
-- taken from Lua values or tensors, and the step index as diffusers keeps it (index_for_timestep,
-- _init_step_index, set_begin_index). Each scheduler passes its class name, its module (for
-- CONFIG_KEYS, DEFAULTS, CONFIG_NAME, DIFFUSERS_VERSION) and what differs between them; the
-- messages are the ones each scheduler printed before they shared this code.
local json = require "nemo.json"
local fs = require "nemo.fs"
local ffi = require "ffi"

local M = {}

local function tensor_lib() return require "nemo.tensor" end

-- ==== float helpers ====

local f32buf = ffi.new("float[1]")
-- the float32 nearest to x (round to nearest even), as a Lua number
function M.f32(x) f32buf[0] = x; return f32buf[0] end
-- float64 "rounding" (the identity), where a computation is parametrised by its precision
function M.f64(x) return x end

-- numpy.linspace(start, stop, num) in float64, operation for operation: step = (stop-start)/(num-1),
-- y[i] = i*step + start, the last value exactly stop.
function M.linspace(start, stop, num)
    local out = {}
    if num <= 0 then return out end
    if num == 1 then out[1] = start; return out end
    local div = num - 1
    local step = (stop - start) / div
    if step == 0 then
        for i = 0, num - 1 do out[i + 1] = (i / div) * (stop - start) + start end
    else
        for i = 0, num - 1 do out[i + 1] = i * step + start end
    end
    out[num] = stop
    return out
end

-- ==== config ====

-- what a value of each kind must be, as the messages name it; a "?" kind may be null / absent.
-- count: a positive integer; integers: a list (maybe empty); numbers?: a non-empty list or null
M.WANT = {count = "positive integer", integer = "integer", number = "number", ["number?"] = "number or null",
    ["numbers?"] = "list of numbers or null", integers = "list of integers", ["scheduler?"] = "scheduler object or null",
    boolean = "boolean", string = "string"}

function M.in_list(v, list)
    for _, x in ipairs(list) do if x == v then return true end end
    return false
end

-- 'a', 'b', 'c' (the allowed values of an enum, for a message)
function M.quoted(list)
    local out = {}
    for i, v in ipairs(list) do out[i] = "'" .. v .. "'" end
    return table.concat(out, ", ")
end

-- whether v (json.null already turned into nil) is a value of config key k's kind
function M.check_value(k, kind, v)
    if v == nil then return kind:sub(-1) == "?" end
    if kind == "count" then return type(v) == "number" and v % 1 == 0 and v >= 1 end
    if kind == "integer" then return type(v) == "number" and v % 1 == 0 end
    if kind == "number" or kind == "number?" then return type(v) == "number" and v == v end
    if kind == "numbers?" or kind == "integers" then
        if type(v) ~= "table" or getmetatable(v) ~= nil and getmetatable(v).__name ~= "json.array" then return false end
        local n = 0
        for key in pairs(v) do
            if type(key) ~= "number" then return false end
            n = n + 1
        end
        if n ~= #v then return false end
        for i = 1, #v do
            if type(v[i]) ~= "number" or v[i] ~= v[i] or (kind == "integers" and v[i] % 1 ~= 0) then return false end
        end
        return kind == "integers" or #v > 0
    end
    if kind == "scheduler?" then return type(v) == "table" and type(v.step) == "function" end
    return type(v) == kind
end

-- check_keys(name, mod, kinds, tbl, opts, level) -> a config table: mod.DEFAULTS for every key of
-- mod.CONFIG_KEYS (a table default copied, so that schedulers never share it), then tbl's values,
-- each checked against kinds[key] (a list copied). Keys starting with "_" (_class_name,
-- _diffusers_version, _use_default_values) are metadata and skipped; other unknown keys are an
-- error, or a warning with opts.unknown = "warn" (from_pretrained: diffusers ignores them).
-- Errors are raised at `level` (counted from here). The checks between values are the caller's.
function M.check_keys(name, mod, kinds, tbl, opts, level)
    opts = opts or {}
    if tbl ~= nil and type(tbl) ~= "table" then
        error(name .. ": expected a config table, got " .. type(tbl), level)
    end
    local cfg = {}
    for _, k in ipairs(mod.CONFIG_KEYS) do
        local d = mod.DEFAULTS[k]
        if type(d) == "table" then
            local copy = {}
            for i = 1, #d do copy[i] = d[i] end
            d = copy
        end
        cfg[k] = d
    end
    local unknown = {}
    for k, v in pairs(tbl or {}) do
        if type(k) ~= "string" then
            error(name .. ": config keys must be strings, got " .. tostring(k), level)
        end
        local kind = kinds[k]
        if kind == nil then
            if k:sub(1, 1) ~= "_" then unknown[#unknown + 1] = k end
        else
            if v == json.null then
                if kind:sub(-1) ~= "?" then
                    error(string.format("%s: config '%s' is null; it must be a %s", name, k, M.WANT[kind]), level)
                end
                v = nil
            end
            if not M.check_value(k, kind, v) then
                error(string.format("%s: config '%s' must be a %s, got %s (%s)", name, k, M.WANT[kind], type(v),
                    tostring(v)), level)
            end
            if v ~= nil and (kind == "numbers?" or kind == "integers") then
                local copy = {}
                for i = 1, #v do copy[i] = v[i] end
                v = copy
            end
            cfg[k] = v
        end
    end
    if #unknown > 0 then
        table.sort(unknown)
        local msg = string.format("%s: unknown config key%s %s (known keys: %s)", name, #unknown > 1 and "s" or "",
            table.concat(unknown, ", "), table.concat(mod.CONFIG_KEYS, ", "))
        if opts.unknown == "warn" then
            io.stderr:write("nemo: warning: ", msg, "; ignored, as diffusers does\n")
        else
            error(msg, level)
        end
    end
    return cfg
end

-- ==== scheduler_config.json ====

-- from_pretrained(Scheduler, name, mod) -> Scheduler.from_pretrained(path[, {subfolder=,
-- revision=}]): path is a scheduler_config.json file, a folder holding one, a pipeline folder
-- (its scheduler/ subfolder is used when the folder itself has no scheduler_config.json), or an
-- "org/name" id in the Hugging Face cache. Keys diffusers does not know are skipped with a
-- warning, as diffusers does; a config of another _class_name is an error.
function M.from_pretrained(Scheduler, name, mod)
    return function(path, opts, more)
        if rawequal(path, Scheduler) then path, opts = opts, more end   -- Scheduler:from_pretrained(...)
        opts = opts or {}
        if type(path) ~= "string" or path == "" then
            error(name .. ".from_pretrained: expected a folder or a scheduler_config.json path, got " .. tostring(path), 2)
        end
        if type(opts) ~= "table" then error(name .. ".from_pretrained: opts must be a table", 2) end
        for k in pairs(opts) do
            -- torch_dtype / device: passed by the pipeline loader to every component; a scheduler
            -- holds its schedules on the CPU whatever they say
            if k ~= "subfolder" and k ~= "revision" and k ~= "torch_dtype" and k ~= "device" then
                error(name .. ".from_pretrained: unknown option '" .. tostring(k) .. "'", 2)
            end
        end
        local config_name = mod.CONFIG_NAME
        local file
        if fs.isfile(path) then
            file = path
        else
            local root
            if fs.isdir(path) then root = path
            else
                local ok, r = pcall(require("nemo.hub").resolve, path, {revision = opts.revision})
                if not ok then error(name .. ".from_pretrained: " .. tostring(r), 2) end
                root = r
            end
            local tried, cands = {}, {}
            if opts.subfolder and opts.subfolder ~= "" then cands[1] = root .. "/" .. opts.subfolder .. "/" .. config_name
            else cands = {root .. "/" .. config_name, root .. "/scheduler/" .. config_name} end
            for _, c in ipairs(cands) do
                if fs.isfile(c) then file = c; break end
                tried[#tried + 1] = c
            end
            if not file then
                error(name .. ".from_pretrained: no " .. config_name .. "; looked for " .. table.concat(tried, ", "), 2)
            end
        end
        local cfg = json.read_file(file)
        if type(cfg) ~= "table" then
            error(string.format("%s.from_pretrained: %s does not hold a JSON object", name, file), 2)
        end
        if type(cfg._class_name) == "string" and cfg._class_name ~= name then
            error(string.format("%s.from_pretrained: %s describes a %s, not a %s", name, file, cfg._class_name, name), 2)
        end
        local ok, s = pcall(Scheduler, cfg, {unknown = "warn"})
        if not ok then error(string.format("%s (in %s)", tostring(s), file), 2) end
        s.config_path = file
        return s
    end
end

-- save_pretrained(name, mod[, check]) -> Scheduler:save_pretrained(folder): folder/
-- scheduler_config.json as diffusers writes it (every key of mod.CONFIG_KEYS, sorted,
-- _class_name, _diffusers_version, null for unset values, lists as JSON arrays). check(self),
-- when given, refuses a config that cannot be written (raising at level 3: save_pretrained's caller).
function M.save_pretrained(name, mod, check)
    return function(self, folder)
        if type(folder) ~= "string" or folder == "" then
            error(name .. ":save_pretrained: expected a folder path", 2)
        end
        if check then check(self) end
        fs.mkdirs(folder)
        local out = {_class_name = name, _diffusers_version = mod.DIFFUSERS_VERSION}
        for _, k in ipairs(mod.CONFIG_KEYS) do
            local v = self.config[k]
            if v == nil then v = json.null
            elseif type(v) == "table" then
                local copy = {}
                for i = 1, #v do copy[i] = v[i] end
                v = json.array(copy)
            end
            out[k] = v
        end
        json.write_file(folder .. "/" .. mod.CONFIG_NAME, out, {indent = 2})
        return folder
    end
end

-- ==== timesteps and lists of numbers ====

-- number_list(v, what[, numeric_only]): a Lua list of numbers from a list or a 1-D tensor (nil
-- and json.null give nil); what names v in the messages ("set_timesteps: sigmas"), raised at
-- the level of the caller's caller. numeric_only: a tensor must be floating point, int64 or int32.
function M.number_list(v, what, numeric_only)
    if v == nil or v == json.null then return nil end
    local Tensor = tensor_lib()
    if Tensor.is_tensor(v) then
        if numeric_only and not v:is_floating_point() and v.dtype ~= "int64" and v.dtype ~= "int32" then
            error(string.format("%s must be numbers, got a %s tensor", what, v.dtype), 3)
        end
        return v:detach():to{device = "cpu"}:double():contiguous():reshape{-1}:tolist()
    end
    if type(v) ~= "table" then
        error(string.format("%s must be a list of numbers or a tensor, got %s", what, type(v)), 3)
    end
    local out = {}
    for i = 1, #v do
        if type(v[i]) ~= "number" then
            error(string.format("%s[%d] is not a number (%s)", what, i, tostring(v[i])), 3)
        end
        out[i] = v[i]
    end
    return out
end

-- timestep_number(t, who[, refuse_int]): a timestep as a number (a Lua number, or a
-- one-element tensor); refuse_int: integer tensors are refused as diffusers' flow-matching
-- schedulers refuse them (an index from enumerate(), not a timestep). Raised at the level of
-- the caller's caller, the messages starting with who.
function M.timestep_number(t, who, refuse_int)
    local Tensor = tensor_lib()
    if type(t) == "number" then return t end
    if Tensor.is_tensor(t) then
        if refuse_int and not t:is_floating_point() then
            error(who .. ": passing integer indices (e.g. a loop counter) as timesteps is not supported; pass one of " ..
                "scheduler.timesteps as the timestep (got a " .. t.dtype .. " tensor)", 3)
        end
        if t:numel() ~= 1 then
            error(string.format("%s: expected one timestep, got a tensor of %d values", who, t:numel()), 3)
        end
        return t:detach():to{device = "cpu"}:double():item()
    end
    error(who .. ": expected a timestep (a number or a one-element tensor), got " .. type(t), 3)
end

-- [a, b, ...] of the first max (8) values, for a message
local function fmt_list(l, max)
    local out = {}
    for i = 1, math.min(#l, max or 8) do out[i] = string.format("%.9g", l[i]) end
    if #l > (max or 8) then out[#out + 1] = "..." end
    return "[" .. table.concat(out, ", ") .. "]"
end
M.fmt_list = fmt_list

-- ==== the step index ====

-- index_for_timestep(name, o) -> Scheduler:index_for_timestep(t[, schedule]): the 0-based index
-- of t in the schedule (self._ts unless given): its second match when there are several. Not in
-- the schedule: an error. o.round: t is compared after it (f32: as torch's float32
-- `schedule_timesteps == timestep`; f64: as it is); o.schedule: what a bad schedule is called
-- in messages; o.refuse_int / o.numeric_only: as timestep_number / number_list.
function M.index_for_timestep(name, o)
    local round = o.round
    return function(self, timestep, schedule)
        local t = M.timestep_number(timestep, "index_for_timestep", o.refuse_int)
        local ts = schedule and M.number_list(schedule, o.schedule, o.numeric_only) or self._ts
        local tr = round(t)
        local first, second
        for i = 1, #ts do
            if ts[i] == tr then
                if first == nil then first = i elseif second == nil then second = i; break end
            end
        end
        if first == nil then
            error(string.format("%s: timestep %.9g is not in the schedule (%d timesteps: %s); pass one of " ..
                "scheduler.timesteps (and call set_timesteps first)", name, t, #ts, fmt_list(ts)), 2)
        end
        return (second or first) - 1
    end
end

-- the step index from the first step()'s timestep, or the begin index when one was set
function M._init_step_index(self, timestep)
    if self._begin_index == nil then
        local ok, r = pcall(self.index_for_timestep, self, timestep)
        if not ok then error(r, 0) end
        self._step_index = r
    else
        self._step_index = self._begin_index
    end
end

function M.step_index(self) return self._step_index end
function M.begin_index(self) return self._begin_index end
-- set_begin_index([i]): the first step's index (0 when not given), as pipelines that start part
-- way into the schedule (img2img, inpainting) set it
function M.set_begin_index(self, i)
    i = i == nil and 0 or i
    if type(i) ~= "number" or i < 0 or i % 1 ~= 0 then
        error("set_begin_index: expected a non-negative integer, got " .. tostring(i), 2)
    end
    self._begin_index = i
end

-- schedule_indices(self, tvals, who): the sigma index of each timestep for add_noise /
-- scale_noise: index_for_timestep of each before the first step, unless set_begin_index() was
-- called: then the current step index, or the begin index before the first step. Errors are
-- raised at the level of the caller's caller, prefixed with who.
function M.schedule_indices(self, tvals, who)
    local idx = {}
    for k, t in ipairs(tvals) do
        if self._begin_index == nil then
            local ok, r = pcall(self.index_for_timestep, self, t)
            if not ok then error(who .. ": " .. tostring(r), 3) end
            idx[k] = r
        elseif self._step_index ~= nil then idx[k] = self._step_index
        else idx[k] = self._begin_index end
    end
    return idx
end

return M
