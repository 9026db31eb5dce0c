-- tests/lua/tap.lua: TAP output for Lua tests, run under prove.
--   local T = require "tap"      (tests put tests/lua on package.path via the first line below)
--   T.plan(n) or T.done() at the end (prints the plan then); T.ok(cond, name); T.is(a, b, name);
--   T.near(a, b, tol, name) for numbers; T.raises(fn, pattern, name) checks an error message;
--   T.close(t, ref, rtol, atol, name) compares two tensors of one shape (a scalar may be () or
--   (1); or a tensor and a Lua table) by max|a-ref| <= rtol*max|ref| + atol and prints the
--   numbers. T.same_bits(a, b): whether two tensors (on any device) have one dtype, one size and
--   the same bytes. T.sh(cmd): a shell command's stdout and stderr together, and its exit
--   status. T.read_bytes(path), T.write_bytes(path, s) -> path. T.scratch() -> tmp, cleanup:
--   tmp(name) gives a unique scratch path, cleanup() removes every one given out. T.tmpdir(),
--   T.rmtree(path): scratch folders. T.same_values(a, b): one shape, equal values.
-- Accidental globals make the test fail (luafun's rule).
local T = {}
local n, failed, planned = 0, 0, nil

local function report(ok, name, diag)
    n = n + 1
    if not ok then failed = failed + 1 end
    io.write(ok and "ok " or "not ok ", n, " - ", (tostring(name or ""):gsub("\n", " ")), "\n")
    if diag and not ok then
        io.stdout:flush()   -- on stderr, where prove shows it, after the "not ok" line
        for line in tostring(diag):gmatch("[^\n]+") do io.stderr:write("# ", line, "\n") end
    end
    io.flush()
    return ok
end

function T.plan(k) planned = k; io.write("1..", k, "\n") end
function T.ok(cond, name, diag) return report(not not cond, name, diag) end
function T.is(a, b, name)
    return report(a == b, name, string.format("got:      %s\nexpected: %s", tostring(a), tostring(b)))
end
function T.near(a, b, tol, name)
    local d = math.abs(a - b)
    return report(d <= tol, string.format("%s: |%.9g - %.9g| = %.3g <= %.3g", name or "near", a, b, d, tol))
end
function T.raises(fn, pattern, name)
    local ok, err = pcall(fn)
    if ok then return report(false, name, "no error raised") end
    err = tostring(err)
    local hit = (pattern == nil) or err:find(pattern, 1, false) ~= nil or err:find(pattern, 1, true) ~= nil
    return report(hit, name, "error was: " .. err .. "\nexpected pattern: " .. tostring(pattern))
end
function T.same_bits(a, b)
    local ffi = require "ffi"
    local C = require("nemo.ffi").C
    local x, y = a:detach():to{device = "cpu"}:contiguous(), b:detach():to{device = "cpu"}:contiguous()
    if x.dtype ~= y.dtype or x:numel() ~= y:numel() then return false end
    local k = x:numel() * x:element_size()
    return ffi.string(C.nemo_tensor_data(x._c), k) == ffi.string(C.nemo_tensor_data(y._c), k)
end
function T.sh(cmd)
    local p = io.popen(cmd .. " 2>&1; echo \"__rc=$?\"")
    local out = p:read("*a")
    p:close()
    local rc = tonumber(out:match("__rc=(%d+)%s*$"))
    return (out:gsub("__rc=%d+%s*$", "")), rc
end
function T.read_bytes(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
end
function T.write_bytes(path, s)
    local f = assert(io.open(path, "wb"))
    f:write(s)
    f:close()
    return path
end
function T.scratch()
    local base = os.tmpname()          -- a unique prefix; every scratch file is base .. "_<name>"
    local created = {base}
    local function tmp(name)
        local p = base .. "_" .. name
        created[#created + 1] = p
        return p
    end
    local function cleanup() for _, p in ipairs(created) do os.remove(p) end end
    return tmp, cleanup
end
-- T.tmpdir() -> a new empty folder; T.rmtree(path) removes a folder and what it holds
function T.tmpdir()
    local p = os.tmpname()
    os.remove(p)
    os.execute("mkdir -p '" .. p .. "'")
    return p
end
function T.rmtree(p) os.execute("rm -rf '" .. p .. "'") end
function T.skip(name, why) n = n + 1; io.write("ok ", n, " - ", name, " # SKIP ", why, "\n") end
function T.diag(msg) for line in tostring(msg):gmatch("[^\n]+") do io.write("# ", line, "\n") end end

local function flat(x)
    if type(x) == "number" then return {x} end
    if type(x) == "table" and x._c == nil then
        local out = {}
        local function walk(v) if type(v) == "table" then for _, u in ipairs(v) do walk(u) end else out[#out + 1] = v end end
        walk(x)
        return out
    end
    -- a nemo tensor
    local l = x:double():contiguous():reshape{-1}:tolist()
    return l
end

-- max|a - ref| and max|ref| over flattened values (tensors, numbers or nested tables); math.huge
-- for a NaN difference; math.huge, 0 and a reason when the sizes differ.
function T.maxdiff(a, ref)
    local fa, fr = flat(a), flat(ref)
    if #fa ~= #fr then return math.huge, 0, string.format("sizes differ: %d vs %d elements", #fa, #fr) end
    local maxd, maxr = 0, 0
    for i = 1, #fr do
        local d = math.abs(fa[i] - fr[i])
        if d ~= d then d = math.huge end
        if d > maxd then maxd = d end
        if math.abs(fr[i]) > maxr then maxr = math.abs(fr[i]) end
    end
    return maxd, maxr
end

-- same_values(a, b): two tensors of one shape (a scalar may be () or (1)) whose values are equal
-- (compared as float64, so of any dtypes); false when either is missing
function T.same_values(a, b)
    if a == nil or b == nil then return false end
    local sa, sb = table.concat(a.shape, ", "), table.concat(b.shape, ", ")
    local fa, fb = flat(a), flat(b)
    if #fa ~= #fb or (sa ~= sb and #fa ~= 1) then return false end
    for i = 1, #fa do if fa[i] ~= fb[i] then return false end end
    return true
end

-- max|a - ref| <= rtol * max|ref| + atol, element by element over flattened values; tensors
-- of different shapes fail.
function T.close(a, ref, rtol, atol, name)
    atol = atol or 0
    if a == nil or ref == nil then
        return report(false, name, a == nil and "no tensor computed" or "no reference tensor")
    end
    if type(a.shape) == "table" and type(ref.shape) == "table" then
        local sa, sr = table.concat(a.shape, ", "), table.concat(ref.shape, ", ")
        local function numel(sh) local k = 1; for _, d in ipairs(sh) do k = k * d end; return k end
        if sa ~= sr and not (numel(a.shape) == 1 and numel(ref.shape) == 1) then   -- a scalar may be () or (1)
            return report(false, name, string.format("shapes differ: (%s) vs (%s)", sa, sr))
        end
    end
    local maxd, maxr, why = T.maxdiff(a, ref)
    if why then return report(false, name, why) end
    local tol = rtol * maxr + atol
    return report(maxd <= tol, string.format("%s: max_abs %.3g <= %.3g (rtol %.1g * %.3g + atol %.1g)",
        name or "close", maxd, tol, rtol, maxr, atol))
end

function T.done()
    if planned == nil then io.write("1..", n, "\n") end
    if failed > 0 then io.stderr:write(string.format("# %d of %d tests failed\n", failed, n)) end
    os.exit(failed == 0 and (planned == nil or planned == n) and 0 or 1)
end

-- fail on accidental globals
setmetatable(_G, {__newindex = function(_, k) error("test created a global: " .. tostring(k), 2) end})

return T
