-- Tensors: constructors, dtypes, devices, properties, conversion, printing, random numbers.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"

local function shp(t) return table.concat(t.shape, ",") end

-- constructors
local t = nemo.tensor({{1, 2, 3}, {4, 5, 6}})
T.is(shp(t), "2,3", "tensor from nested table: shape")
T.is(t.dtype, "int64", "integers give int64 (as torch.tensor)")
T.is(nemo.tensor({1.5, 2}).dtype, "float32", "non-integers give float32")
T.is(nemo.tensor({true, false}).dtype, "bool", "booleans give bool")
T.is(nemo.tensor(3.5):item(), 3.5, "0-dim tensor item")
T.is(nemo.tensor(3.5):dim(), 0, "0-dim tensor dim()")
T.is(nemo.tensor({1, 2}, {dtype = "float64"}).dtype, "float64", "dtype option")
T.is(nemo.tensor({}, {dtype = "float32"}):numel(), 0, "empty tensor")
T.raises(function() nemo.tensor({{1, 2}, {3}}) end, "ragged", "ragged table is an error")
T.raises(function() nemo.tensor({1, "a"}) end, "expected numbers", "strings are an error")
T.raises(function() nemo.tensor({1}, {dtype = "float8"}) end, "unknown dtype 'float8'", "unknown dtype is an error")
T.raises(function() nemo.zeros(2, {device = "tpu"}) end, "unknown device 'tpu'", "unknown device is an error")
T.raises(function() nemo.zeros(-1) end, "non%-negative", "negative size is an error")

T.is(shp(nemo.zeros(2, 3)), "2,3", "zeros varargs")
T.is(shp(nemo.zeros({2, 3})), "2,3", "zeros table")
T.is(nemo.ones({2}, {dtype = "bfloat16"}).dtype, "bfloat16", "ones with dtype")
T.is(nemo.full({2, 2}, 7):tolist()[2][2], 7, "full")
T.is(nemo.full({2}, true).dtype, "bool", "full with a boolean gives bool")
T.is(nemo.empty(4):numel(), 4, "empty")
T.is(table.concat(nemo.arange(5):tolist(), ","), "0,1,2,3,4", "arange(n)")
T.is(table.concat(nemo.arange(2, 8, 2):tolist(), ","), "2,4,6", "arange(a, b, step)")
T.is(nemo.arange(0, 1, 0.25).dtype, "float32", "fractional arange is float32")
T.is(nemo.arange(0, 1, 0.25):numel(), 4, "fractional arange length")
T.raises(function() nemo.arange(0, 1, 0) end, "step must be nonzero", "arange step 0")
T.close(nemo.linspace(-1, 1, 5), {-1, -0.5, 0, 0.5, 1}, 0, 1e-7, "linspace")
T.is(nemo.zeros_like(t, {dtype = "float32"}).dtype, "float32", "zeros_like with dtype")
T.is(shp(nemo.ones_like(t)), "2,3", "ones_like shape")

-- properties
local x = nemo.randn(2, 3, 4)
T.is(x:size(0), 2, "size(0)")
T.is(x:size(-1), 4, "size(-1)")
T.is(x.shape[3], 4, "shape is a 1-based Lua table")
T.is(x:dim(), 3, "dim")
T.is(x:numel(), 24, "numel")
T.is(x.device, "cpu", "device")
T.is(table.concat(x:stride(), ","), "12,4,1", "stride")
T.raises(function() return x:size(3) end, "out of range", "size(3) of a 3-d tensor")
T.raises(function() x.shape = {1} end, "read%-only", "shape is read-only")
T.ok(x:is_contiguous() and not x:transpose(0, 2):is_contiguous(), "is_contiguous")

-- conversion
local f = nemo.tensor({1.5, -2.25, 3})
T.is(f:double().dtype, "float64", "double()")
T.is(f:bfloat16().dtype, "bfloat16", "bfloat16()")
T.is(f:half().dtype, "float16", "half()")
T.close(f:half():float(), {1.5, -2.25, 3}, 0, 0, "half round trip exact for representable values")
T.close(f:bfloat16():float(), {1.5, -2.25, 3}, 0, 0, "bf16 round trip exact for representable values")
T.is(table.concat(f:long():tolist(), ","), "1,-2,3", "float -> int64 truncates toward zero")
T.is(f:to{dtype = "float64"}.dtype, "float64", "to{dtype=}")
T.is(f:to("float16").dtype, "float16", "to('float16')")
T.ok(rawequal(f:to{dtype = "float32"}, f), "to() with nothing to do returns the same tensor")
local big = nemo.tensor({65504, 70000, 1e-8}):half():float():tolist()
T.ok(big[1] == 65504 and big[2] == math.huge and big[3] == 0, "float16 max, overflow to inf, underflow to 0")
local sub = nemo.tensor({6e-8}):half():float():item()
T.ok(math.abs(sub - 5.960464477539063e-08) < 1e-20, "float16 subnormal")
local subs = nemo.tensor({2^-24, 3 * 2^-24, 6.103515625e-05 / 2, 2^-25, 1.5 * 2^-24}, {dtype = "float64"}):half():double():tolist()
T.ok(subs[1] == 2^-24 and subs[2] == 3 * 2^-24 and subs[3] == 6.103515625e-05 / 2 and subs[4] == 0 and subs[5] == 2 * 2^-24,
    "float16 subnormals exact, ties to even (2^-25 -> 0, 1.5*2^-24 -> 2^-23)")
T.raises(function() f:to{device = "cuda:0"} end, "no CUDA device", "cuda request without a GPU is a clear error")
if not nemo.cuda.is_available() then
    T.raises(function() return f:pin_memory() end, "pin_memory: no CUDA device",
        "pin_memory without a GPU is a clear error (as in torch)")
end
T.ok(not f:is_pinned(), "an ordinary CPU tensor is not pinned")

-- clone, contiguous, copy_, fill_, zero_
local c = f:clone()
c:fill_(9)
T.close(f, {1.5, -2.25, 3}, 0, 0, "clone does not share storage")
T.close(c, {9, 9, 9}, 0, 0, "fill_")
c:zero_()
T.close(c, {0, 0, 0}, 0, 0, "zero_")
c:copy_(nemo.tensor({1, 2, 3}))
T.close(c, {1, 2, 3}, 0, 0, "copy_ converts dtype")
local m = nemo.zeros(2, 3)
m:copy_(nemo.tensor({1, 2, 3}))
T.close(m, {{1, 2, 3}, {1, 2, 3}}, 0, 0, "copy_ broadcasts the source")
T.raises(function() m:copy_(nemo.ones(4)) end, "cannot be broadcast", "copy_ shape mismatch")
local tr = nemo.arange(6, {dtype = "float32"}):reshape{2, 3}:t()
T.ok(not tr:is_contiguous() and tr:contiguous():is_contiguous(), "contiguous() of a transpose")
T.close(tr:contiguous(), {{0, 3}, {1, 4}, {2, 5}}, 0, 0, "contiguous() values")

-- item / tolist
T.raises(function() nemo.ones(2):item() end, "2 elements", "item of a 2-element tensor")
T.is(nemo.tensor({true}):item(), true, "bool item")
T.is(nemo.arange(6):reshape{2, 3}:tolist()[2][1], 3, "tolist nested")

-- printing
local s = tostring(nemo.tensor({{1.5, 2}, {3, 4}}))
T.ok(s:find("1.5000", 1, true) and s:find("shape=(2, 2)", 1, true) and s:find("dtype=float32", 1, true)
    and s:find("device=cpu", 1, true), "tostring shows values, shape, dtype, device", s)
local sl = tostring(nemo.zeros(100, 100))
T.ok(sl:find("...", 1, true) ~= nil and #sl < 2000, "large tensors are summarised")
T.ok(tostring(nemo.randn({2}, {requires_grad = true})):find("requires_grad=true", 1, true), "tostring shows requires_grad")

-- random numbers: seeded, counter-based, independent of thread count
nemo.manual_seed(42)
local r1 = nemo.randn(1000):tolist()
nemo.manual_seed(42)
local r2 = nemo.randn(1000):tolist()
local same = true
for i = 1, 1000 do if r1[i] ~= r2[i] then same = false end end
T.ok(same, "manual_seed makes randn reproducible")
local g1, g2 = nemo.Generator(7), nemo.Generator(7)
local a1 = nemo.rand({500}, {generator = g1}):tolist()
local a2 = nemo.rand({300}, {generator = g2}):tolist()
local a3 = nemo.rand({200}, {generator = g2}):tolist()
local split_ok = true
for i = 1, 300 do if a1[i] ~= a2[i] then split_ok = false end end
for i = 1, 200 do if a1[300 + i] ~= a3[i] then split_ok = false end end
T.ok(split_ok, "one draw of 500 equals draws of 300 + 200 (counter-based)")
nemo.set_num_threads(1)
local one = nemo.randn({100000}, {generator = nemo.Generator(3)}):tolist()
nemo.set_num_threads(2)
local two = nemo.randn({100000}, {generator = nemo.Generator(3)}):tolist()
local thr_ok = true
for i = 1, 100000 do if one[i] ~= two[i] then thr_ok = false; break end end
T.ok(thr_ok, "randn is identical with 1 and 2 threads")
local n = nemo.randn({200000}, {generator = nemo.Generator(5), dtype = "float64"}):tolist()
local mean, sq = 0, 0
for i = 1, #n do mean = mean + n[i]; sq = sq + n[i] * n[i] end
mean = mean / #n
local var = sq / #n - mean * mean
T.near(mean, 0, 0.01, "randn mean")
T.near(var, 1, 0.02, "randn variance")
local u = nemo.rand({200000}, {generator = nemo.Generator(6)}):tolist()
local umin, umax, usum = 1, 0, 0
for i = 1, #u do umin = math.min(umin, u[i]); umax = math.max(umax, u[i]); usum = usum + u[i] end
T.ok(umin >= 0 and umax < 1, "rand in [0, 1)")
T.near(usum / #u, 0.5, 0.005, "rand mean")
local st = g1:get_state()
local d1 = nemo.rand({5}, {generator = g1}):tolist()
g1:set_state(st)
local d2 = nemo.rand({5}, {generator = g1}):tolist()
T.is(d1[5], d2[5], "generator state save/restore")
T.is(nemo.randn({3}, {dtype = "bfloat16"}).dtype, "bfloat16", "randn in bf16")
T.raises(function() nemo.randn({3}, {dtype = "int64"}) end, "floating", "randn of an integer dtype is an error")

-- memory accounting
collectgarbage(); collectgarbage()
local before = nemo.memory_stats().current
local blob = nemo.empty(1024, 1024)
T.ok(nemo.memory_stats().current - before >= 4 * 1024 * 1024, "memory_stats counts a new 4 MiB tensor")
blob:free()
T.ok(nemo.memory_stats().current - before < 4096, "free() returns it at once")
T.ok(tostring(blob):find("freed"), "a freed tensor says so")

-- LuaJIT's allocation sinking is off once nemo is loaded (lua/nemo/ffi.lua: Debian's LuaJIT
-- corrupts its heap when it sinks a variable-length cdata that escapes on another path)
do
    local flags = {select(2, jit.status())}
    local sink = false
    for _, f in ipairs(flags) do if f == "sink" then sink = true end end
    T.ok(not sink and #flags > 0, "require 'nemo' turns LuaJIT's allocation sinking off", table.concat(flags, " "))
end
T.done()
