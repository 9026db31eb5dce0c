-- lua/nemo/safetensors.lua: load_file / safe_open / save_file over engine/safetensors.c
-- (exposed as nemo.load_file, nemo.safe_open, nemo.save_file).
--
-- Loaded CPU tensors are zero-copy views of the memory-mapped file: loading a 24 GB file does
-- not allocate 24 GB, and the mapping lives as long as the file object or any tensor from it.
-- Writing into such a tensor is copy-on-write (the file never changes). opts.device = "cuda:0"
-- copies each tensor to the device as it is read.
--
--   local sd = nemo.load_file("model.safetensors")               -- {name = tensor}
--   local f = nemo.safe_open("model.safetensors")
--   for _, k in ipairs(f:keys()) do print(k, f:get_tensor(k).shape) end  -- keys(): sorted
--   f:offset_keys()   -- file order;  f:metadata() -> {format = "pt"} or nil;  f:close()
--   nemo.save_file({w = t}, "out.safetensors", {format = "pt"})
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"

local C = nffi.C
local M = {}

local async_jobs   -- the jobs of the running M.in_background (nil outside one)

local function raise(level)
    error(ffi.string(C.nemo_last_error()), level + 1)
end

-- ==== metadata JSON (the engine re-serialises it compactly; values are strings) ====

local escape_out = {['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f', ['\n'] = '\\n',
                    ['\r'] = '\\r', ['\t'] = '\\t'}
local function json_string(s)
    return '"' .. s:gsub('[%c"\\]', function(c)
        return escape_out[c] or string.format("\\u%04x", c:byte())
    end) .. '"'
end

local function utf8_char(cp)
    if cp < 0x80 then return string.char(cp) end
    if cp < 0x800 then return string.char(0xc0 + math.floor(cp / 64), 0x80 + cp % 64) end
    if cp < 0x10000 then
        return string.char(0xe0 + math.floor(cp / 4096), 0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
    end
    return string.char(0xf0 + math.floor(cp / 262144), 0x80 + math.floor(cp / 4096) % 64,
        0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
end

local escape_in = {['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f', n = '\n', r = '\r', t = '\t'}

-- Decode the engine's compact {"key":"value",...} text into a Lua table.
local function decode_metadata(s)
    local pos = 1
    local function fail() error("safetensors: cannot decode metadata text: " .. s, 0) end
    local function expect(ch)
        if s:sub(pos, pos) ~= ch then fail() end
        pos = pos + 1
    end
    local function str()
        expect('"')
        local parts = {}
        while true do
            local j = s:find('["\\]', pos)
            if not j then fail() end
            parts[#parts + 1] = s:sub(pos, j - 1)
            pos = j + 1
            if s:sub(j, j) == '"' then return table.concat(parts) end
            local e = s:sub(pos, pos)
            if e == "u" then
                local cp = tonumber(s:sub(pos + 1, pos + 4), 16) or fail()
                pos = pos + 5
                if cp >= 0xd800 and cp <= 0xdbff and s:sub(pos, pos + 1) == "\\u" then
                    local lo = tonumber(s:sub(pos + 2, pos + 5), 16) or fail()
                    cp = 0x10000 + (cp - 0xd800) * 1024 + (lo - 0xdc00)
                    pos = pos + 6
                end
                parts[#parts + 1] = utf8_char(cp)
            else
                parts[#parts + 1] = escape_in[e] or fail()
                pos = pos + 1
            end
        end
    end
    local out = {}
    expect("{")
    if s:sub(pos, pos) == "}" then return out end
    while true do
        local k = str()
        expect(":")
        out[k] = str()
        local c = s:sub(pos, pos)
        pos = pos + 1
        if c == "}" then return out end
        if c ~= "," then fail() end
    end
end

local function encode_metadata(meta, what)
    if meta == nil then return nil end
    if type(meta) ~= "table" then
        error(string.format("%s: metadata must be a table of string -> string, got %s", what, type(meta)), 3)
    end
    local keys = {}
    for k, v in pairs(meta) do
        if type(k) ~= "string" then
            error(string.format("%s: metadata key %s is a %s, expected a string", what, tostring(k), type(k)), 3)
        end
        if type(v) ~= "string" then
            error(string.format("%s: metadata value for key '%s' is a %s, expected a string", what, k, type(v)), 3)
        end
        keys[#keys + 1] = k
    end
    table.sort(keys)
    local parts = {}
    for i, k in ipairs(keys) do parts[i] = json_string(k) .. ":" .. json_string(meta[k]) end
    return "{" .. table.concat(parts, ",") .. "}"
end

-- ==== safe_open ====

local SafeOpen = {}
SafeOpen.__index = SafeOpen

-- opts.device checked once, before anything is read; nil means "stay on the CPU".
local function device_of(opts, what)
    local dev = opts and opts.device
    if dev == nil or dev == "cpu" or dev == "cpu:0" then return nil end
    if type(dev) ~= "string" or not (dev == "cuda" or dev:match("^cuda:%d+$")) then
        error(string.format("%s: unknown device '%s' (expected 'cpu', 'cuda' or 'cuda:N')", what, tostring(dev)), 3)
    end
    return dev
end

-- nemo.safe_open(path[, {device = "cpu"}]): a lazily-reading view of the file.
function M.safe_open(path, opts)
    if type(path) ~= "string" then error("safe_open: path must be a string, got " .. type(path), 2) end
    local device = device_of(opts, "safe_open")
    local f = C.nemo_st_open(path)
    if f == nil then raise(2) end
    return setmetatable({_f = ffi.gc(f, C.nemo_st_close), path = path, device = device}, SafeOpen)
end

local function handle(self, what)
    local f = rawget(self, "_f")
    if f == nil then error(string.format("%s: file '%s' is closed", what, self.path), 3) end
    return f
end

-- Tensor names in file order (by data offset), as safetensors' offset_keys().
function SafeOpen:offset_keys()
    local f = handle(self, "offset_keys")
    local out = {}
    for i = 0, C.nemo_st_count(f) - 1 do out[i + 1] = ffi.string(C.nemo_st_name(f, i)) end
    return out
end

-- Tensor names sorted bytewise, as safetensors' keys().
function SafeOpen:keys()
    handle(self, "keys")
    local out = self:offset_keys()
    table.sort(out)
    return out
end

function SafeOpen:has(name)
    return C.nemo_st_find(handle(self, "has"), tostring(name)) >= 0
end

-- The file's dtype string of a tensor ("F32", "BF16", "F8_E4M3", ...), or nil if absent.
function SafeOpen:dtype_of(name)
    local f = handle(self, "dtype_of")
    local i = C.nemo_st_find(f, tostring(name))
    if i < 0 then return nil end
    return ffi.string(C.nemo_st_dtype_name(f, i))
end

local function get(self, f, i)
    local p = C.nemo_st_tensor(f, i)
    if p == nil then raise(3) end
    local t = Tensor.wrap(p)
    if self.device then t = t:to{device = self.device} end
    return t
end

function SafeOpen:get_tensor(name)
    local f = handle(self, "get_tensor")
    if type(name) ~= "string" then error("get_tensor: name must be a string, got " .. type(name), 2) end
    local i = C.nemo_st_find(f, name)
    if i < 0 then
        error(string.format("get_tensor: no tensor named '%s' in file '%s'", name, self.path), 2)
    end
    return get(self, f, i)
end

-- The "__metadata__" table (string -> string), or nil when the file has none.
function SafeOpen:metadata()
    local m = C.nemo_st_metadata(handle(self, "metadata"))
    if m == nil then return nil end
    return decode_metadata(ffi.string(m))
end

-- Release the file now. Tensors already taken stay valid (they keep the mapping alive).
function SafeOpen:close()
    local f = rawget(self, "_f")
    if f ~= nil then
        ffi.gc(f, nil)
        C.nemo_st_close(f)
        self._f = nil
    end
end

function SafeOpen:__tostring()
    local f = rawget(self, "_f")
    if f == nil then return string.format("safe_open('%s', closed)", self.path) end
    return string.format("safe_open('%s', %d tensors)", self.path, C.nemo_st_count(f))
end

-- ==== load_file / save_file ====

-- nemo.load_file(path[, {device = "cpu"}]) -> {name = tensor}.
function M.load_file(path, opts)
    if type(path) ~= "string" then error("load_file: path must be a string, got " .. type(path), 2) end
    local device = device_of(opts, "load_file")
    local f = C.nemo_st_open(path)
    if f == nil then raise(2) end
    local self = {path = path, device = device}
    local out = {}
    local ok, err = pcall(function()
        for i = 0, C.nemo_st_count(f) - 1 do
            out[ffi.string(C.nemo_st_name(f, i))] = get(self, f, i)
        end
    end)
    C.nemo_st_close(f)
    if not ok then error(err, 2) end
    return out
end

-- nemo.save_file({name = tensor}, path[, metadata]): metadata is a table of string -> string.
-- A failed save leaves an existing file at path untouched.
function M.save_file(tensors, path, metadata)
    if type(tensors) ~= "table" then
        error("save_file: expected a table of name -> tensor, got " .. type(tensors), 2)
    end
    if type(path) ~= "string" then error("save_file: path must be a string, got " .. type(path), 2) end
    local names = {}
    for k, v in pairs(tensors) do
        if type(k) ~= "string" then
            error(string.format("save_file: tensor key %s is a %s, expected a string", tostring(k), type(k)), 2)
        end
        if not Tensor.is_tensor(v) then
            error(string.format("save_file: value for key '%s' is a %s, expected a tensor", k, type(v)), 2)
        end
        if rawget(v, "_c") == nil then error(string.format("save_file: tensor '%s' was freed", k), 2) end
        names[#names + 1] = k
    end
    table.sort(names)
    local json = encode_metadata(metadata, "save_file")
    local n = #names
    local cnames = ffi.new("const char *[?]", n > 0 and n or 1)
    local ctensors = ffi.new("nemo_tensor *[?]", n > 0 and n or 1)
    for i, k in ipairs(names) do
        cnames[i - 1] = k          -- the Lua strings stay alive in `names`
        ctensors[i - 1] = tensors[k]._c
    end
    if async_jobs then   -- inside M.in_background: copies now, the file written by a thread
        local job = C.nemo_st_save_async(path, n, cnames, ctensors, json)
        if job == nil then raise(2) end
        async_jobs[#async_jobs + 1] = {job = job, path = path}
        return nil
    end
    if C.nemo_st_save(path, n, cnames, ctensors, json) < 0 then raise(2) end
    return nil
end

-- in_background(fn, ...) -> jobs: fn(...) runs with every save_file in it written in the
-- background (nemo_st_save_async: the tensors are copied at the call, a thread writes the file);
-- wait(jobs) joins them, raising the first failure. If fn raises, the jobs it started are
-- joined before the error goes on.
function M.in_background(fn, ...)
    if async_jobs then error("safetensors.in_background: already inside one", 2) end
    async_jobs = {}
    local res = {pcall(fn, ...)}
    local jobs = async_jobs
    async_jobs = nil
    if not res[1] then
        pcall(M.wait, jobs)
        error(res[2], 0)
    end
    return jobs
end

-- wait(jobs): joins every job of in_background's list; the first failure is raised after all
-- are joined.
function M.wait(jobs)
    local first
    for _, j in ipairs(jobs or {}) do
        if j.job ~= nil then
            if C.nemo_st_job_wait(j.job) < 0 and not first then first = ffi.string(C.nemo_last_error()) end
            j.job = nil
        end
    end
    if first then error("save_file (in the background): " .. first, 2) end
end

return M
