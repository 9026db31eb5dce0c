-- lua/nemo/ffi.lua: the one place that declares the C API to LuaJIT and loads libnemo.
-- The declarations come from engine/include/nemo.h through the generated _cdef.lua, so they
-- cannot drift from the header. check(rc) / own(ptr) turn engine failures into Lua errors.
local ffi = require "ffi"

local M = {}

-- LuaJIT's allocation sinking is turned off while nemo is loaded. The LuaJIT that Debian 12
-- ships (2.1.0-beta3, a 2022 snapshot) corrupts its own heap when a trace sinks a
-- variable-length cdata (`ffi.new("double[?]", n)`) that escapes to C only on another path:
-- tests/gpu/check_ops.lua crashed in LuaJIT's allocator, in about half the runs, once it
-- compared zero-size results (its buffer went to C only when n > 0); every variant stopped
-- crashing with `-sink` and with the JIT off. Sinking saves little here (the work is in C;
-- the Lua-heavy tests time the same without it). NEMO_JIT_SINK=1 leaves the option alone.
if jit and jit.opt and os.getenv("NEMO_JIT_SINK") ~= "1" then jit.opt.start("-sink") end

ffi.cdef(require "nemo._cdef")

local function find_lib()
    local tried = {}
    local env = os.getenv("NEMO_LIB")
    if env and env ~= "" then
        local ok, lib = pcall(ffi.load, env)
        if ok then return lib, env end
        tried[#tried + 1] = env .. " (" .. tostring(lib) .. ")"
    end
    local path = package.searchpath("libnemo", package.cpath)
    if path then
        local ok, lib = pcall(ffi.load, path)
        if ok then return lib, path end
        tried[#tried + 1] = path .. " (" .. tostring(lib) .. ")"
    end
    -- beside this file in a build tree: <root>/lua/nemo/ffi.lua -> <root>/build/libnemo.so
    local here = debug.getinfo(1, "S").source:match("^@(.*)/nemo/ffi%.lua$")
    if here then
        for _, cand in ipairs { here .. "/../build/libnemo.so",               -- build tree (<root>/lua)
                                here .. "/../../../lib/lua/5.1/libnemo.so",   -- luarocks tree (<tree>/share/lua/5.1)
                                here .. "/../../../lib/libnemo.so" } do       -- make install (<prefix>/share/lua/5.1)
            local f = io.open(cand, "rb")
            if f then
                f:close()
                local ok, lib = pcall(ffi.load, cand)
                if ok then return lib, cand end
                tried[#tried + 1] = cand .. " (" .. tostring(lib) .. ")"
            end
        end
    end
    local ok, lib = pcall(ffi.load, "nemo")
    if ok then return lib, "libnemo.so (the system's library path)" end
    tried[#tried + 1] = "libnemo.so on the system path (" .. tostring(lib) .. ")"
    error("nemo: cannot load libnemo.so; tried: " .. table.concat(tried, "; ") ..
          ". Run `make` in the nemo-lua folder, or set NEMO_LIB=/path/to/libnemo.so", 0)
end

local C, lib_path = find_lib()
M.C = C
M.lib_path = lib_path      -- where libnemo.so was loaded from (nemo-lua --info)

if C.nemo_abi_version() ~= C.NEMO_ABI_EXPECTED then
    error(string.format("nemo: libnemo ABI %d does not match the Lua package's ABI %d; rebuild with make",
        C.nemo_abi_version(), C.NEMO_ABI_EXPECTED), 0)
end

local last_error = C.nemo_last_error

-- Raise the engine's last error (level 0: the message already names the op; the traceback
-- shows the user's line).
function M.raise()
    error(ffi.string(last_error()), 3)
end

function M.check(rc)
    if rc < 0 then error(ffi.string(last_error()), 3) end
    return rc
end

-- A new (+1) tensor pointer from the engine: NULL is an error; otherwise it gets its finalizer.
local release = C.nemo_tensor_release
local gc = ffi.gc
function M.own(p)
    if p == nil then error(ffi.string(last_error()), 3) end
    return gc(p, release)
end

M.int64_array = ffi.typeof("int64_t[?]")
M.double_array = ffi.typeof("double[?]")

return M
