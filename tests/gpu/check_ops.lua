-- tests/gpu/check_ops.lua: every CUDA kernel and device path that exists, checked against the
-- CPU on a machine with a GPU (run by tests/gpu/run.sh, never by `make test`). Prints TAP, then a
-- summary table, the worst error per kernel and a few bandwidth / throughput figures as TAP
-- comments ("# bench: ..." lines, which run.sh appends to bench/RESULTS.md); exits non-zero on
-- any failure.
--
-- What is compared. Every case runs the same engine call on CPU tensors and on CUDA tensors
-- holding the same bytes (through the C API, so front-end + kernel are what is tested), copies
-- the CUDA result back and compares:
-- - bitwise (NaN patterns included) where the CUDA kernel is designed to be exact: fill, every
--   copy and dtype conversion, and the ops made only of IEEE-exact steps (add/sub/mul/div,
--   comparisons, where, neg/abs/relu/sign/square/reciprocal/sqrt/rsqrt/clamp/affine, argmax
--   indices, max values, max backward, cumsum). A failure prints the first mismatching element.
-- - otherwise by max|cuda - cpu| <= rtol * max|cpu| over the whole result (NaN and inf must sit
--   at the same places): rtol 1e-6 for float32 (CUDA's libm is within 1-4 ulp of glibc),
--   1e-5 for float32 products (cuBLASLt adds in another order than OpenBLAS; a matmul's error
--   is relative to max (|a| |b|) when that is larger, since a dot product may cancel), 1e-12 for
--   float64, 1e-2 for bfloat16 / float16 (computed in float32, rounded once: a 1-ulp float32
--   difference may flip the last bf16 bit).
-- Shapes are odd (7, 33, 1000, 5000, 1048579), inputs are often non-contiguous (transposed
-- views of a base tensor, so the strided copy kernel runs first) and broadcast.
--
-- The training-step kernels (norms, fused DiT ops, attention, conv, embedding, interpolation,
-- AdamW, sum of squares) are checked in their own section with their own tolerances (see
-- there): bitwise for the ops built from exact steps (rope, modulate, gated_add and their
-- elementwise gradients, embedding, nearest interpolation, AdamW), normwise 2e-5 / 5e-5 for the
-- float32 norms and attention forward / backward (their sums run in another order), 1e-11 to
-- 1e-12 for float64, 1e-2 for bf16 / f16. Attention runs at shapes that exercise several chunks
-- of heads and several query blocks; "bench:" lines add attention, layer_norm and modulate.
--
-- The fill kernel is also called directly (its pointer comes from the plugin's
-- register_kernels, the way libnemo receives it).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. package.path
local T = require "tap"
local ffi = require "ffi"
local nemo = require "nemo"
local cuda = require "nemo.cuda"
local nffi = require "nemo.ffi"
local C = nffi.C
local Tensor = nemo.Tensor

if not cuda.is_available() then
    io.write("1..0\nBail out! no CUDA device: ", tostring(cuda.unavailable_reason()), "\n")
    os.exit(1)
end
local ndev = cuda.device_count()
T.diag(string.format("%d CUDA device(s)", ndev))
-- what the devices are (cudaGetDeviceProperties): recorded in the run's log
for i = 0, ndev - 1 do
    local ok, p = pcall(cuda.get_device_properties, i)
    T.ok(ok and type(p.name) == "string" and p.name ~= "" and (p.emulated or (p.total_memory > 0 and p.major >= 7 and
        p.multi_processor_count > 0)), string.format("cuda.get_device_properties(%d): %s", i, ok and
        string.format("%s, %.1f GiB, compute capability %d.%d, %d multiprocessors, runtime %d, driver %d", p.name,
        p.total_memory / 2^30, p.major, p.minor, p.multi_processor_count, p.runtime_version, p.driver_version) or
        tostring(p)))
end

local DTYPES = {"float32", "bfloat16", "float16", "float64", "int64", "int32", "bool"}
-- NEMO_CUDA_EMU=1: the plugin is the CUDA emulator (tests/cuda_emu, run by tests/sh/test_cuda_emu.sh),
-- which runs every thread of every block on the CPU: smaller "large" shapes, no throughput lines.
local EMU = (os.getenv("NEMO_CUDA_EMU") or "0") ~= "0"
local LARGE = EMU and 65536 + 3 or 1048576 + 3   -- several blocks, a 16-byte vector body and a tail

-- ==== helpers ====

local results = {}              -- results[row][dtype] = {pass=, total=, err=}
local row_order = {}
local function record(row, dt, ok, err)
    if not results[row] then results[row] = {}; row_order[#row_order + 1] = row end
    local r = results[row][dt] or {pass = 0, total = 0}
    results[row][dt] = r
    r.total = r.total + 1
    if ok then r.pass = r.pass + 1 end
    if err and (not r.err or err > r.err) then r.err = err end
end

-- Raw bytes of a tensor's whole storage region it views (t must be contiguous), via the CPU.
local function host_bytes(t)
    local h = t
    if h.device ~= "cpu" then h = h:to{device = "cpu"} end
    if not h:is_contiguous() then h = h:clone() end
    local n = h:numel() * h:element_size()
    return ffi.string(C.nemo_tensor_data(h._c), n), h:element_size()
end

-- Compare the bytes of a (CUDA or CPU) result with a CPU reference; returns ok, diagnostic.
local function same_bytes(got, ref, dt)
    local gb, esz = host_bytes(got)
    local rb = host_bytes(ref)
    if #gb ~= #rb then return false, string.format("sizes differ: %d vs %d bytes", #gb, #rb) end
    if gb == rb then return true end
    local nbad, first = 0, nil
    for i = 0, #gb / esz - 1 do
        if gb:sub(i * esz + 1, (i + 1) * esz) ~= rb:sub(i * esz + 1, (i + 1) * esz) then
            nbad = nbad + 1
            first = first or i
        end
    end
    local function hex(s, i) return (s:sub(i * esz + 1, (i + 1) * esz):reverse():gsub(".", function(c)
        return string.format("%02x", c:byte()) end)) end
    return false, string.format("%d of %d %s elements differ; first at flat index %d: got 0x%s, expected 0x%s",
        nbad, #gb / esz, dt, first, hex(gb, first), hex(rb, first))
end

local function view(t, shape, stride, offset)
    return Tensor.wrap(C.nemo_tensor_view(t._c, #shape, Tensor.int64s(shape), Tensor.int64s(stride), offset))
end

-- Deterministic data: a float64 CPU tensor of n values (LCG), with special values when
-- specials is true (only for float dtypes: NaN and inf have no integer conversion).
local function source(n, shape, dt)
    local isfloat = dt == "float32" or dt == "bfloat16" or dt == "float16" or dt == "float64"
    local specials = {0, -0.0, 1 / 0, -1 / 0, 0 / 0, 65520, 3e-39, 1e-8, 1 / 3}
    local buf = ffi.new("double[?]", n > 0 and n or 1)
    local s = 12345
    for i = 0, n - 1 do
        s = (s * 1103515245 + 12345) % 2147483648
        local v = (s / 2147483648 - 0.5) * 2000
        if dt == "bool" then v = (s % 3 == 0) and 0 or 1
        elseif not isfloat then v = math.floor(v)
        elseif i < #specials then v = specials[i + 1] end
        buf[i] = v
    end
    local t = nemo.empty(shape, {dtype = "float64"})
    if n > 0 then nffi.check(C.nemo_write_f64(t._c, buf)) end
    return t:to{dtype = dt}
end

local function numel(shape) local n = 1; for _, v in ipairs(shape) do n = n * v end; return n end

-- ==== the fill kernel's pointer, from the plugin ====

require "cuda_plugin"   -- the plugin struct (tests/lua/cuda_plugin.lua)
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } nemo_gpu_timespec;
int clock_gettime(int clk, nemo_gpu_timespec *ts);
]]

local plugin_path = os.getenv("NEMO_CUDA_LIB")
if not plugin_path or plugin_path == "" then
    local lib = os.getenv("NEMO_LIB")
    plugin_path = (lib and lib:match("^(.*)/[^/]*$") or (here .. "/../../build")) .. "/libnemo_cuda.so"
end
-- On emulated devices (NEMO_FAKE_CUDA: tests/sh/test_fake_cuda.sh runs this script as a dry run)
-- the plugin's own kernels cannot run: the cases that call them directly are left out, and
-- every engine-level case runs with the CPU kernels on both sides.
local FAKE = (os.getenv("NEMO_FAKE_CUDA") or "0") ~= "0"
local plugin, plugin_lib, kernels = nil, nil, {}
if not FAKE then
    plugin_lib = ffi.load(plugin_path)   -- kept referenced: the kernel pointers live in it
    plugin = plugin_lib.nemo_cuda_plugin_get()
    local reg = ffi.cast("void (*)(const char *, int, void (*)(void))", function(name, _, fn)
        kernels[ffi.string(name)] = fn
    end)
    plugin.register_kernels(reg)
    reg:free()
    local names = {}
    for k in pairs(kernels) do names[#names + 1] = k end
    table.sort(names)
    T.diag("CUDA kernels registered by the plugin: " .. table.concat(names, ", "))
    T.ok(kernels.fill ~= nil, "the plugin registers 'fill'")
else
    T.diag("emulated devices: a dry run of the script (the plugin's kernels are not called directly)")
end
local fill_kernel = kernels.fill and ffi.cast("int (*)(nemo_tensor *, double)", kernels.fill)

-- ==== fill ====

local FLOAT_VALUES = {0, -0.0, 1, -1, 0.1, 1 / 3, -2.5, 65504, 65520, 1e30, -1e-8, 3e-39, 1 / 0, -1 / 0, 0 / 0}
local INT_VALUES = {0, 1, -1, 7, -123456, 2147483647, -2147483648}
local I64_VALUES = {0, 1, -1, 123456789012, -(2 ^ 53), 2 ^ 62}
local BOOL_VALUES = {0, 1, -2.5, 0.1, 0 / 0}
local function values_for(dt)
    if dt == "int32" then return INT_VALUES end
    if dt == "int64" then return I64_VALUES end
    if dt == "bool" then return BOOL_VALUES end
    return FLOAT_VALUES
end

-- Each layout: a base shape, and a view of it (shape, stride, offset) that gets filled; the
-- whole base is compared, so elements outside the view must keep their values.
local LAYOUTS = {
    {name = "contiguous (7, 33)", base = {7, 33}},
    {name = "scalar ()", base = {}},
    {name = "empty (0, 5)", base = {0, 5}},
    {name = "large (1048579,)", base = {LARGE}, few = true},
    {name = "offset 1, unaligned (7, 33)", base = {7 * 33 + 1}, shape = {7, 33}, stride = {33, 1}, offset = 1},
    {name = "transposed (33, 7)", base = {7, 33}, shape = {33, 7}, stride = {1, 33}, offset = 0},
    {name = "every other column (7, 17)", base = {7, 34}, shape = {7, 17}, stride = {34, 2}, offset = 0},
    {name = "expanded stride 0 (5, 7, 33)", base = {7, 33}, shape = {5, 7, 33}, stride = {0, 33, 1}, offset = 0},
}

local function run_fill(dt, lay, how)
    local vals = values_for(dt)
    if lay.few then vals = {vals[2], vals[1]} end
    local diags = {}
    for _, v in ipairs(vals) do
        local ref = source(numel(lay.base), lay.base, dt)
        local dev = ref:to{device = "cuda:0"}
        local rv, dv = ref, dev
        if lay.shape then rv = view(ref, lay.shape, lay.stride, lay.offset); dv = view(dev, lay.shape, lay.stride, lay.offset) end
        nffi.check(C.nemo_fill_(rv._c, v))
        local ok, err = pcall(function()
            if how == "kernel" then
                local rc = fill_kernel(dv._c, v)
                if rc ~= 0 then error(string.format("fill kernel returned %d: %s", rc, ffi.string(plugin.error_text()))) end
            else
                dv:fill_(v)
            end
        end)
        local same, diag = false, err
        if ok then same, diag = same_bytes(dev, ref, dt) end
        if not same then diags[#diags + 1] = string.format("value %.17g: %s", v, tostring(diag)) end
    end
    local name = string.format("fill (%s) %s %s x %d values: bytes equal to the cpu fill", how, dt, lay.name, #vals)
    if how == "engine" and #diags > 0 and diags[1]:find("strided cuda copy kernel", 1, true) then
        T.skip(name, "the engine's fill does not use the cuda kernel yet (no strided cuda copy)")
        return
    end
    local nbad = #diags
    if nbad > 4 then diags = {diags[1], diags[2], diags[3], diags[4], string.format("... and %d more values", nbad - 4)} end
    T.ok(nbad == 0, name, table.concat(diags, "\n"))
    record("fill (" .. how .. ")", dt, nbad == 0)
end

for _, dt in ipairs(DTYPES) do
    for _, lay in ipairs(LAYOUTS) do
        if fill_kernel then run_fill(dt, lay, "kernel") end
        run_fill(dt, lay, "engine")
    end
end

-- ==== copies ====

local COPY_SHAPES = {{7, 33}, {}, {0, 5}, {LARGE}}

local function check_copy(row, dt, name, fn)
    local ok, same, diag = pcall(fn)
    if not ok then same, diag = false, same end
    T.ok(same, string.format("%s %s: bytes equal", row, name), diag)
    record(row, dt, same)
end

for _, dt in ipairs(DTYPES) do
    for _, shape in ipairs(COPY_SHAPES) do
        local label = dt .. " " .. Tensor.shape_str(shape)
        local src = source(numel(shape), shape, dt)
        check_copy("copy cpu->cuda->cpu", dt, label, function()
            return same_bytes(src:to{device = "cuda:0"}:to{device = "cpu"}, src, dt)
        end)
        check_copy("copy cuda->cuda", dt, label, function()
            return same_bytes(src:to{device = "cuda:0"}:clone(), src, dt)
        end)
        if ndev >= 2 then
            check_copy("copy cuda:0->cuda:1", dt, label, function()
                local d1 = src:to{device = "cuda:0"}:to{device = "cuda:1"}
                assert(d1.device == "cuda:1", "result on " .. d1.device)
                return same_bytes(d1, src, dt)
            end)
        end
    end
    local label = dt .. " (7, 33)"
    local base = source(7 * 33, {7, 33}, dt)
    check_copy("copy strided cpu->cuda", dt, label .. " transposed source", function()
        local tv = view(base, {33, 7}, {1, 33}, 0)
        return same_bytes(tv:to{device = "cuda:0"}, tv:clone(), dt)
    end)
    check_copy("copy cuda->strided cpu", dt, label .. " into a transposed destination", function()
        local src = source(33 * 7, {33, 7}, dt)
        local dst, ref = nemo.zeros({7, 33}, {dtype = dt}), nemo.zeros({7, 33}, {dtype = dt})
        view(dst, {33, 7}, {1, 33}, 0):copy_(src:to{device = "cuda:0"})
        view(ref, {33, 7}, {1, 33}, 0):copy_(src)
        return same_bytes(dst, ref, dt)
    end)
    if dt ~= "float32" then
        local f = source(7 * 33, {7, 33}, "float32")
        check_copy("copy cpu f32->cuda dtype", dt, label, function()
            return same_bytes(f:to{device = "cuda:0", dtype = dt}, f:to{dtype = dt}, dt)
        end)
        check_copy("copy cuda dtype->cpu f32", dt, label, function()
            return same_bytes(base:to{device = "cuda:0"}:to{device = "cpu", dtype = "float32"},
                              base:to{dtype = "float32"}, "float32")
        end)
    end
end

-- item() and tolist() read CUDA tensors through the same copies
do
    local x = nemo.tensor({{1.5, -2}, {3, 4.25}}, {device = "cuda:0"})
    local l = x:tolist()
    T.ok(x.device == "cuda:0" and l[1][1] == 1.5 and l[2][2] == 4.25,
         "nemo.tensor(..., {device='cuda:0'}) reads back with tolist()")
end

-- ==== helpers for the op kernels ====

local DEV = "cuda:0"
local function wrap(p) return Tensor.wrap(p) end
local function dev(t) return t:to{device = DEV} end
local seed = 1000
-- Uniform values in [lo, hi) as a CPU tensor of dtype dt (drawn in float64, then converted).
local function uniform(shape, dt, lo, hi)
    seed = seed + 1
    local t = nemo.empty(shape, {dtype = "float64"})
    local g = ffi.new("nemo_generator", {seed, 0})
    nffi.check(C.nemo_rand_(t._c, g, lo or -4, hi or 4))
    return t:to{dtype = dt or "float32"}
end
-- The same values twice, on the CPU and on the GPU, as (shape) views: when nc is true each is
-- the transpose of a (reversed last two dims) base, so inputs are non-contiguous.
local function pair(shape, dt, lo, hi, nc)
    if nc and #shape >= 2 then
        local bs = {}
        for i = 1, #shape do bs[i] = shape[i] end
        bs[#shape - 1], bs[#shape] = shape[#shape], shape[#shape - 1]
        local base = uniform(bs, dt, lo, hi)
        local d = #shape - 2
        return base:transpose(d, d + 1), dev(base):transpose(d, d + 1)
    end
    local c = uniform(shape, dt, lo, hi)
    return c, dev(c)
end

local RTOL = {float32 = 1e-6, float64 = 1e-12, bfloat16 = 1e-2, float16 = 1e-2}
local GEMM_RTOL = {float32 = 1e-5, float64 = 1e-12, bfloat16 = 1e-2, float16 = 1e-2}

local function shape_of(t) local s = {}; for i = 0, t._c.ndim - 1 do s[#s + 1] = tonumber(t._c.shape[i]) end; return s end

-- Values of a (CPU or CUDA) tensor as float64 on the host.
local function values(t)
    local n = t:numel()
    local buf = ffi.new("double[?]", n > 0 and n or 1)
    if n > 0 then nffi.check(C.nemo_read_f64(t._c, buf)) end
    return buf, n
end

-- got (CUDA) against ref (CPU): ok, normwise error, diagnostic. scale (optional) is a floor for
-- max|cpu|: a product's error is relative to max (|a| |b|), not to a result that cancelled.
local function compare(got, ref, rtol, exact, scale)
    if Tensor.shape_str(shape_of(got)) ~= Tensor.shape_str(shape_of(ref)) or got.dtype ~= ref.dtype then
        return false, nil, string.format("got %s %s, expected %s %s", got.dtype, Tensor.shape_str(shape_of(got)),
                                         ref.dtype, Tensor.shape_str(shape_of(ref)))
    end
    if exact then
        local ok, diag = same_bytes(got, ref, ref.dtype)
        return ok, ok and 0 or nil, diag
    end
    local g, n = values(got)
    local r = values(ref)
    local maxref, maxerr, where = 0, 0, nil
    for i = 0, n - 1 do
        local a, b = g[i], r[i]
        if b ~= b or a ~= a or b == math.huge or b == -math.huge or a == math.huge or a == -math.huge then
            if not (a == b or (a ~= a and b ~= b)) then
                return false, nil, string.format("element %d: got %.9g, expected %.9g (non-finite mismatch)", i, a, b)
            end
        else
            if math.abs(b) > maxref then maxref = math.abs(b) end
            local e = math.abs(a - b)
            if e > maxerr then maxerr, where = e, i end
        end
    end
    if scale and scale > maxref then maxref = scale end
    local rel = maxref > 0 and maxerr / maxref or maxerr
    local ok = maxerr <= rtol * maxref
    return ok, rel, ok and nil or string.format("max|cuda - cpu| = %.3g at element %d (cuda %.9g, cpu %.9g), max|cpu| = %.3g, rtol %g",
                                                maxerr, where or -1, where and g[where] or 0, where and r[where] or 0, maxref, rtol)
end

-- One case: fn(side) runs the engine call with side = 1 (CPU tensors) or 2 (CUDA tensors) and
-- returns the result tensor(s) (a table of results for several outputs).
local function case(row, dt, name, rtol, exact, fn, scale)
    local ok, res = pcall(function()
        local ref = fn(1)
        local got = fn(2)
        if type(ref) ~= "table" or ref._c then ref, got = {ref}, {got} end
        local allok, worst, diags = true, 0, {}
        for i = 1, #ref do
            local o, e, d = compare(got[i], ref[i], rtol, exact, scale)
            if not o then allok = false; diags[#diags + 1] = string.format("output %d: %s", i, tostring(d)) end
            if e and e > worst then worst = e end
        end
        return {allok, worst, table.concat(diags, "\n")}
    end)
    local good, err, diag
    if ok then good, err, diag = res[1], res[2], res[3] else good, diag = false, tostring(res) end
    T.ok(good, string.format("%s %s %s: %s", row, dt, name,
                             exact and "bitwise equal" or string.format("normwise error <= %g", rtol)), diag)
    record(row, dt, good, good and err or nil)
end

local FLOATS = {"float32", "bfloat16", "float16", "float64"}

-- ==== pinned host memory (the plugin's host_alloc): copies to the device and back ====

do
    local ok, err = pcall(function()
        local x = uniform({257, 1031}, "float32", -1, 1):t()
        local p = x:pin_memory()
        local back = p:to{device = DEV}:to{device = "cpu"}
        return p:is_pinned() and T.same_bits(back, x)
    end)
    T.ok(ok and err, "pin_memory: a pinned copy goes to the device and back bit for bit", not ok and tostring(err) or nil)
end

-- ==== streams and events: work on a pool stream, ordering by events, non_blocking copies ====

do
    local ok, err = pcall(function()
        local a = dev(uniform({512, 512}, "float32", -1, 1))
        local ref = wrap(C.nemo_matmul(a._c, a._c, C.NEMO_MM_MM))
        local s = cuda.Stream()
        s:wait_stream(cuda.current_stream())      -- a was written on the default stream
        local got = cuda.stream(s, function() return wrap(C.nemo_matmul(a._c, a._c, C.NEMO_MM_MM)) end)
        got:record_stream(s)
        cuda.current_stream():wait_stream(s)      -- read it on the default stream
        local same = T.same_bits(got:cpu(), ref:cpu())
        local h = uniform({1024, 1024}, "float32", -1, 1)
        local hp = h:pin_memory()
        local d = cuda.stream(s, function() return hp:to{device = DEV, non_blocking = true} end)
        local e = s:record_event()
        e:synchronize()
        local back = d:to{device = "cpu", non_blocking = true}
        cuda.synchronize(0)
        return same and T.same_bits(back, h) and back:is_pinned()
    end)
    T.ok(ok and err, "streams: a product on a pool stream equals the default stream's; non_blocking copies round-trip",
         not ok and tostring(err) or nil)
end

-- ==== the copy kernel: every dtype pair, strided and broadcast ====

for _, sdt in ipairs(DTYPES) do
    local base = source(7 * 33, {33, 7}, sdt)
    local based = dev(base)
    for _, ddt in ipairs(DTYPES) do
        case("copy kernel", ddt, "from " .. sdt .. " transposed (7, 33)", 0, true, function(side)
            return (side == 1 and base or based):t():to{dtype = ddt}
        end)
        case("copy kernel", ddt, "from " .. sdt .. " broadcast into a strided (5, 7, 17) view", 0, true, function(side)
            local dst = nemo.zeros({5, 7, 34}, {dtype = ddt, device = side == 1 and "cpu" or DEV})
            local src = view(side == 1 and base or based, {7, 17}, {1, 7}, 0)
            view(dst, {5, 7, 17}, {238, 34, 2}, 0):copy_(src)
            return dst
        end)
    end
end
for _, pr in ipairs{{"float32", "bfloat16"}, {"bfloat16", "float32"}, {"float32", "float16"}, {"float64", "float32"}, {"int64", "float32"}} do
    local src = source(LARGE, {LARGE}, pr[1])
    local srcd = dev(src)
    case("copy kernel", pr[2], string.format("dense (%d,) from %s", LARGE, pr[1]), 0, true, function(side)
        return (side == 1 and src or srcd):to{dtype = pr[2]}
    end)
end

-- ==== unary and unary_backward ====

local U = {
    {"NEG", 0, 0, -4, 4, true}, {"ABS", 0, 0, -4, 4, true}, {"EXP", 0, 0, -4, 4}, {"LOG", 0, 0, 0.01, 4},
    {"SQRT", 0, 0, 0, 4, true}, {"RSQRT", 0, 0, 0.01, 4, true}, {"SIN", 0, 0, -10, 10}, {"COS", 0, 0, -10, 10},
    {"TANH", 0, 0, -4, 4}, {"SIGMOID", 0, 0, -8, 8}, {"SILU", 0, 0, -8, 8}, {"GELU", 0, 0, -5, 5},
    {"GELU_TANH", 0, 0, -5, 5}, {"RELU", 0, 0, -4, 4, true}, {"SIGN", 0, 0, -4, 4, true},
    {"RECIPROCAL", 0, 0, 0.05, 4, true}, {"SQUARE", 0, 0, -4, 4, true}, {"POW_SCALAR", 2, 0, -4, 4, true},
    {"POW_SCALAR", 0.5, 0, 0, 4, true}, {"POW_SCALAR", 3, 0, -3, 3}, {"POW_SCALAR", 1.7, 0, 0.01, 4},
    {"RPOW_SCALAR", 2.5, 0, -4, 4}, {"CLAMP", -1, 1, -4, 4, true}, {"CLAMP", 0 / 0, 0.5, -4, 4, true},
    {"AFFINE", 1.5, -0.25, -4, 4, true}, {"LOGICAL_NOT", 0, 0, -4, 4, true},
}
-- backward ops whose formula is IEEE-exact steps only
local UB_EXACT = {NEG = true, ABS = true, LOG = true, SQRT = true, RSQRT = true, RELU = true, SIGN = true,
                  RECIPROCAL = true, SQUARE = true, CLAMP = true, AFFINE = true}

for _, u in ipairs(U) do
    local opname, a, b, lo, hi, exact = u[1], u[2], u[3], u[4], u[5], u[6]
    local op = C["NEMO_UOP_" .. opname]
    local label = string.format("%s(a=%g, b=%g)", opname:lower(), a, b)
    for _, dt in ipairs(FLOATS) do
        local x, xd = pair({7, 33}, dt, lo, hi, true)
        if opname == "LOGICAL_NOT" then   -- zeros too
            x = wrap(C.nemo_unary(x._c, C.NEMO_UOP_RELU, 0, 0)); xd = dev(x)
        end
        case("unary", dt, label .. " (7, 33) transposed", RTOL[dt], exact, function(side)
            return wrap(C.nemo_unary((side == 1 and x or xd)._c, op, a, b))
        end)
        if opname ~= "LOGICAL_NOT" then
            local g, gd = pair({7, 33}, dt, -1, 1, false)
            local bexact = UB_EXACT[opname] or (opname == "POW_SCALAR" and a == 2)
            case("unary_backward", dt, label .. " (7, 33)", RTOL[dt], bexact, function(side)
                return wrap(C.nemo_unary_backward((side == 1 and g or gd)._c, (side == 1 and x or xd)._c, nil, op, a, b))
            end)
        end
    end
end
do   -- views that start 1 element into their storage: not 16-byte aligned, so the kernels take
     -- their one-element path (aligned dense operands take the 16-byte vector path above)
    for _, dt in ipairs(FLOATS) do
        local base, bb = uniform({1001}, dt, -4, 4), uniform({1001}, dt, -4, 4)
        local based, bbd = dev(base), dev(bb)
        local function view(t) return t:narrow(0, 1, 1000) end
        case("unary", dt, "exp of a (1000,) view 1 element into its storage", RTOL[dt], false, function(side)
            return wrap(C.nemo_unary(view(side == 1 and base or based)._c, C.NEMO_UOP_EXP, 0, 0))
        end)
        case("unary_backward", dt, "tanh of (1000,) views 1 element in", RTOL[dt], false, function(side)
            return wrap(C.nemo_unary_backward(view(side == 1 and bb or bbd)._c, view(side == 1 and base or based)._c,
                nil, C.NEMO_UOP_TANH, 0, 0))
        end)
        case("binary", dt, "mul of (1000,) views 1 element in", RTOL[dt], true, function(side)
            return wrap(C.nemo_binary(view(side == 1 and base or based)._c, view(side == 1 and bb or bbd)._c,
                C.NEMO_BOP_MUL, 1, -1))
        end)
    end
end
do   -- a large dense unary (tail past a multiple of the block and grid)
    local x = uniform({LARGE}, "float32", -4, 4)
    local xd = dev(x)
    case("unary", "float32", string.format("exp (%d,)", LARGE), RTOL.float32, false, function(side)
        return wrap(C.nemo_unary((side == 1 and x or xd)._c, C.NEMO_UOP_EXP, 0, 0))
    end)
end

-- ==== binary and where ====

local B = {"ADD", "SUB", "MUL", "DIV", "POW", "MAX", "MIN", "EQ", "NE", "LT", "LE", "GT", "GE", "AND", "OR"}
local BSHAPES = {   -- a shape, b shape, b non-contiguous, label
    {{7, 1, 33}, {5, 33}, true, "(7, 1, 33) op transposed (5, 33)"},
    {{7, 33}, {7, 33}, false, "(7, 33) op (7, 33) dense"},
    {{1000, 33}, {33}, false, "(1000, 33) op (33,) row broadcast"},
    {{7, 33}, {}, false, "(7, 33) op 0-dim"},
}
for _, opname in ipairs(B) do
    local op = C["NEMO_BOP_" .. opname]
    for _, dt in ipairs(FLOATS) do
        for _, bs in ipairs(BSHAPES) do
            local lo = opname == "POW" and 0.1 or -4
            local a, ad = pair(bs[1], dt, lo, 4, false)
            local b, bd = pair(bs[2], dt, opname == "POW" and -2 or -4, opname == "POW" and 2 or 4, bs[3])
            if opname == "EQ" or opname == "NE" or opname == "LE" or opname == "GE" or opname == "AND" or opname == "OR" then
                -- equal values and zeros do occur
                a = wrap(C.nemo_unary(a._c, C.NEMO_UOP_RELU, 0, 0)):to{dtype = "int32"}:to{dtype = dt}; ad = dev(a)
                b = wrap(C.nemo_unary(b._c, C.NEMO_UOP_RELU, 0, 0)):to{dtype = "int32"}:to{dtype = dt}; bd = dev(b)
            end
            for _, alpha in ipairs((opname == "ADD" or opname == "SUB") and {1, 0.5} or {1}) do
                case("binary", dt, string.format("%s alpha %g %s", opname:lower(), alpha, bs[4]), RTOL[dt],
                     opname ~= "POW", function(side)
                    return wrap(C.nemo_binary((side == 1 and a or ad)._c, (side == 1 and b or bd)._c, op, alpha, -1))
                end)
            end
        end
    end
end
do   -- mixed dtypes: bf16 tensor + f32 tensor promotes, in place into a strided bf16 view
    local a = uniform({7, 33}, "bfloat16"); local ad = dev(a)
    local b = uniform({33}, "float32"); local bd = dev(b)
    case("binary", "bfloat16", "add_ in place into a transposed bf16 view, f32 (33,) broadcast", 0, true, function(side)
        local base = (side == 1 and a or ad):clone()
        local v = view(base, {33, 7}, {1, 33}, 0)
        nffi.check(C.nemo_binary_(v._c, (side == 1 and b or bd):reshape{33, 1}._c, C.NEMO_BOP_ADD, 1))
        return base
    end)
end
for _, dt in ipairs(FLOATS) do
    local c = wrap(C.nemo_binary(uniform({7, 1, 33}, "float32")._c, nemo.zeros({})._c, C.NEMO_BOP_GT, 1, -1))
    local cd = dev(c)
    local a, ad = pair({5, 33}, dt, -4, 4, true)
    local b = uniform({}, dt); local bd = dev(b)
    case("where", dt, "bool (7, 1, 33), transposed (5, 33), 0-dim", 0, true, function(side)
        return wrap(C.nemo_where((side == 1 and c or cd)._c, (side == 1 and a or ad)._c, (side == 1 and b or bd)._c))
    end)
end
do   -- 64-bit index math: a broadcast sum of more than 2^31 elements, rows checked on the host
    local n1, n2 = 65537, 32769
    local a = uniform({n1, 1}, "float32"); local b = uniform({1, n2}, "float32")
    local ok, y = pcall(function() return wrap(C.nemo_binary(dev(a)._c, dev(b)._c, C.NEMO_BOP_ADD, 1, -1)) end)
    if not ok then
        T.skip("binary 64-bit index path", "no room for 8.6 GB: " .. tostring(y))
    else
        local good, diag = true, nil
        for _, r in ipairs{0, 40000, n1 - 1} do
            local row = view(y, {n2}, {1}, r * n2):to{device = "cpu"}
            local ref = wrap(C.nemo_binary(view(a, {1}, {1}, r)._c, b:reshape{n2}._c, C.NEMO_BOP_ADD, 1, -1))
            local o, d = same_bytes(row, ref, "float32")
            if not o then good, diag = false, string.format("row %d: %s", r, d) end
        end
        T.ok(good, string.format("binary add (%d, 1) + (1, %d) = %d elements (64-bit index path): rows 0, 40000, %d bitwise",
                                 n1, n2, n1 * n2, n1 - 1), diag)
        record("binary 64-bit index", "float32", good, 0)
        y:free()
    end
end

-- ==== reductions ====

local RSHAPES = {   -- shape, dims (nil: all), label; inputs are transposed views where 2-D
    {{7, 33}, {1}, "(7, 33) dim 1"}, {{7, 33}, {0}, "(7, 33) dim 0"}, {{7, 33}, nil, "(7, 33) all"},
    {{5, 1000}, {1}, "(5, 1000) dim 1"}, {{3, 5000}, {-1}, "(3, 5000) dim -1"},
    {{4096, 3}, {0}, "(4096, 3) dim 0"}, {{4, 7, 5}, {1}, "(4, 7, 5) dim 1"},
    {{6, 7, 33}, {0, 2}, "(6, 7, 33) dims 0, 2"}, {{LARGE}, nil, string.format("(%d,) all", LARGE)},
}
local ROPS = {{"SUM", 0}, {"MEAN", 0}, {"PROD", 0}, {"AMAX", 0}, {"AMIN", 0}, {"VAR", 1}, {"STD", 0},
              {"NORM", 2}, {"NORM", 1}, {"NORM", 3}, {"NORM", 1 / 0}, {"NORM", 0}, {"LOGSUMEXP", 0}}
for _, rs in ipairs(RSHAPES) do
    for _, ro in ipairs(ROPS) do
        local opname, param = ro[1], ro[2]
        local op = C["NEMO_RED_" .. opname]
        local big = rs[1][1] == LARGE
        for _, dt in ipairs(big and {"float32"} or {"float32", "bfloat16", "float64"}) do
            local lo, hi = -4, 4
            if opname == "PROD" then lo, hi = 0.9, 1.1 end
            local x, xd = pair(rs[1], dt, lo, hi, #rs[1] == 2)
            local nd = rs[2] and #rs[2] or 0
            local dims = rs[2] and Tensor.int64s(rs[2]) or nil
            local exact = opname == "AMAX" or opname == "AMIN" or (opname == "NORM" and param == 1 / 0)
            local label = string.format("%s(%g) %s", opname:lower(), param, rs[3])
            for _, keep in ipairs{0, 1} do
                case("reduce", dt, label .. (keep == 1 and " keepdim" or ""), RTOL[dt], exact, function(side)
                    return wrap(C.nemo_reduce((side == 1 and x or xd)._c, op, nd, dims, keep, -1, param))
                end)
            end
            if not big then
                local yshape = shape_of(wrap(C.nemo_reduce(x._c, op, nd, dims, 0, -1, param)))
                local g = uniform(yshape, dt, -1, 1); local gd = dev(g)
                local xs = Tensor.int64s(rs[1])
                case("reduce_backward", dt, label, RTOL[dt], false, function(side)
                    return wrap(C.nemo_reduce_backward((side == 1 and g or gd)._c, (side == 1 and x or xd)._c, #rs[1], xs,
                                                       x._c.dtype, op, nd, dims, 0, param))
                end)
            end
        end
    end
end

-- argmax / argmin / max(dim) / max backward: values on a grid of halves (many ties), one NaN
local function tied(shape, dt, nan_at)
    local n = 1; for _, v in ipairs(shape) do n = n * v end
    local buf = ffi.new("double[?]", n)
    local s = 7
    for i = 0, n - 1 do s = (s * 1103515245 + 12345) % 2147483648; buf[i] = math.floor(s / 2147483648 * 16) * 0.5 - 4 end
    if nan_at and nan_at < n then buf[nan_at] = 0 / 0 end
    local t = nemo.empty(shape, {dtype = "float64"})
    nffi.check(C.nemo_write_f64(t._c, buf))
    return t:to{dtype = dt}
end
for _, sh in ipairs{{{7, 33}, 1}, {{7, 33}, 0}, {{5, 1000}, 1}, {{3, 5000}, 1}, {{4, 7, 5}, 1}} do
    for _, dt in ipairs{"float32", "float64", "bfloat16"} do
        local x = tied(sh[1], dt, 40)
        local xd = dev(x)
        local label = string.format("%s dim %d", Tensor.shape_str(sh[1]), sh[2])
        for _, is_min in ipairs{0, 1} do
            case("argmax/argmin", dt, (is_min == 1 and "argmin " or "argmax ") .. label, 0, true, function(side)
                return wrap(C.nemo_argmax((side == 1 and x or xd)._c, 1, sh[2], 0, is_min))
            end)
            case("max(dim) values+indices", dt, (is_min == 1 and "min " or "max ") .. label, 0, true, function(side)
                local v, i = ffi.new("nemo_tensor *[1]"), ffi.new("nemo_tensor *[1]")
                nffi.check(C.nemo_max_dim((side == 1 and x or xd)._c, sh[2], 1, is_min, v, i))
                return {wrap(v[0]), wrap(i[0])}
            end)
            local i = ffi.new("nemo_tensor *[1]")
            nffi.check(C.nemo_max_dim(x._c, sh[2], 0, is_min, nil, i))
            local idx = wrap(i[0]); local idxd = dev(idx)
            local g = uniform(shape_of(idx), dt, -1, 1); local gd = dev(g)
            local xs = Tensor.int64s(sh[1])
            case("max_dim_backward", dt, label, 0, true, function(side)
                return wrap(C.nemo_max_dim_backward((side == 1 and g or gd)._c, (side == 1 and idx or idxd)._c, #sh[1], xs,
                                                    x._c.dtype, sh[2], 0))
            end)
        end
    end
    local x = tied(sh[1], "float32", nil)
    case("argmax/argmin", "float32", "argmax flattened " .. Tensor.shape_str(sh[1]), 0, true, function(side)
        return wrap(C.nemo_argmax((side == 1 and x or dev(x))._c, 0, 0, 0, 0))
    end)
end

-- softmax / log_softmax, forward and backward; cumsum
for _, sh in ipairs{{{7, 33}, 1}, {{7, 33}, 0}, {{5, 1000}, 1}, {{3, 5000}, 1}, {{4, 7, 5}, 1}, {{64, 7}, 1}} do
    for _, dt in ipairs{"float32", "float64", "bfloat16"} do
        local x, xd = pair(sh[1], dt, -8, 8, #sh[1] == 2)
        local label = string.format("%s dim %d", Tensor.shape_str(sh[1]), sh[2])
        for _, lg in ipairs{0, 1} do
            local name = lg == 1 and "log_softmax" or "softmax"
            case("softmax", dt, name .. " " .. label, RTOL[dt], false, function(side)
                return wrap(C.nemo_softmax((side == 1 and x or xd)._c, sh[2], lg, -1))
            end)
            local y = wrap(C.nemo_softmax(x._c, sh[2], lg, -1)); local yd = dev(y)
            local g, gd = pair(sh[1], dt, -1, 1, false)
            case("softmax_backward", dt, name .. " " .. label, RTOL[dt], false, function(side)
                return wrap(C.nemo_softmax_backward((side == 1 and g or gd)._c, (side == 1 and y or yd)._c, sh[2], lg))
            end)
        end
        for _, rev in ipairs{0, 1} do
            case("cumsum", dt, (rev == 1 and "reverse " or "") .. label, 0, true, function(side)
                return wrap(C.nemo_cumsum((side == 1 and x or xd)._c, sh[2], rev, -1))
            end)
        end
    end
end

-- ==== gemm (matmul, linear) and colsum ====

local MM = {   -- a shape, b shape, kind, a transposed view, b transposed view, label
    {{33, 65}, {65, 17}, "MM", false, false, "mm (33, 65) x (65, 17)"},
    {{33, 65}, {65, 17}, "MM", true, true, "mm transposed views"},
    {{3, 33, 65}, {3, 65, 17}, "BMM", false, true, "bmm (3, 33, 65) x (3, 65, 17)^T view"},
    {{4, 1, 33, 65}, {5, 65, 17}, "MATMUL", false, false, "matmul broadcast (4, 1, 33, 65) x (5, 65, 17)"},
    {{33, 65}, {65}, "MV", false, false, "mv (33, 65) x (65,)"},
    {{5, 0}, {0, 7}, "MM", false, false, "mm with k = 0"},
    {{1, 513}, {513, 1}, "MM", false, false, "mm (1, 513) x (513, 1)"},
    {{256, 1024}, {1024, 384}, "MM", false, false, "mm (256, 1024) x (1024, 384): bf16 / f16 on the tensor cores"},
}
for _, mm in ipairs(MM) do
    for _, dt in ipairs(FLOATS) do
        local a, ad = pair(mm[1], dt, -1, 1, mm[4])
        local b, bd = pair(mm[2], dt, -1, 1, mm[5])
        local kind = C["NEMO_MM_" .. mm[3]]
        local a64, b64 = a:to{dtype = "float64"}:abs(), b:to{dtype = "float64"}:abs()
        local bound = wrap(C.nemo_matmul(a64._c, b64._c, kind)):max():item()   -- max (|a| |b|)
        case("gemm (matmul)", dt, mm[6], GEMM_RTOL[dt], false, function(side)
            return wrap(C.nemo_matmul((side == 1 and a or ad)._c, (side == 1 and b or bd)._c, kind))
        end, bound)
        if mm[3] == "MATMUL" or mm[3] == "BMM" then
            local c = wrap(C.nemo_matmul(a._c, b._c, kind))
            local g = uniform(shape_of(c), dt, -1, 1); local gd = dev(g)
            case("gemm (matmul backward)", dt, mm[6], GEMM_RTOL[dt], false, function(side)
                local da, db = ffi.new("nemo_tensor *[1]"), ffi.new("nemo_tensor *[1]")
                nffi.check(C.nemo_matmul_backward((side == 1 and g or gd)._c, (side == 1 and a or ad)._c,
                                                  (side == 1 and b or bd)._c, da, db))
                return {wrap(da[0]), wrap(db[0])}
            end)
        end
    end
end
for _, dt in ipairs(FLOATS) do
    local x, xd = pair({3, 7, 65}, dt, -1, 1, false)
    local w, wd = pair({17, 65}, dt, -1, 1, false)
    local b = uniform({17}, dt, -1, 1); local bd = dev(b)
    case("gemm (linear)", dt, "(3, 7, 65) x (17, 65)^T + bias", GEMM_RTOL[dt], false, function(side)
        return wrap(C.nemo_linear((side == 1 and x or xd)._c, (side == 1 and w or wd)._c, (side == 1 and b or bd)._c))
    end)
    local g = uniform({3, 7, 17}, dt, -1, 1); local gd = dev(g)
    case("gemm+colsum (linear bwd)", dt, "dx, dw, db of (3, 7, 65) x (17, 65)^T", GEMM_RTOL[dt], false, function(side)
        local o = {ffi.new("nemo_tensor *[1]"), ffi.new("nemo_tensor *[1]"), ffi.new("nemo_tensor *[1]")}
        nffi.check(C.nemo_linear_backward((side == 1 and g or gd)._c, (side == 1 and x or xd)._c, (side == 1 and w or wd)._c,
                                          o[1], o[2], o[3]))
        return {wrap(o[1][0]), wrap(o[2][0]), wrap(o[3][0])}
    end)
end
do   -- a bias gradient over many rows: colsum's split into row chunks
    local x, xd = pair({20000, 65}, "float32", -1, 1, false)
    local w, wd = pair({33, 65}, "float32", -1, 1, false)
    local g = uniform({20000, 33}, "float32", -1, 1); local gd = dev(g)
    case("gemm+colsum (linear bwd)", "float32", "(20000, 65) x (33, 65)^T", GEMM_RTOL.float32, false, function(side)
        local o = {ffi.new("nemo_tensor *[1]"), ffi.new("nemo_tensor *[1]"), ffi.new("nemo_tensor *[1]")}
        nffi.check(C.nemo_linear_backward((side == 1 and g or gd)._c, (side == 1 and x or xd)._c, (side == 1 and w or wd)._c,
                                          o[1], o[2], o[3]))
        return {wrap(o[1][0]), wrap(o[2][0]), wrap(o[3][0])}
    end)
end

-- bf16 / f16 products that round their own result ("gemm_lp_out"): aligned operands take
-- cuBLASLt's bias epilogue with a bf16 / f16 output; a bias view at an odd element and
-- in_features 0 take the staged path (float32 scratch, one rounding kernel)
for _, dt in ipairs{"bfloat16", "float16"} do
    local x, xd = pair({2, 256, 1024}, dt, -1, 1, false)
    local w, wd = pair({768, 1024}, dt, -1, 1, false)
    local b = uniform({769}, dt, -1, 1); local bd = dev(b)
    local b0, b0d = b:slice(0, 0, 768), bd:slice(0, 0, 768)
    local b1, b1d = b:slice(0, 1, 769), bd:slice(0, 1, 769)
    local function lin(side, bias, biasd)
        return wrap(C.nemo_linear((side == 1 and x or xd)._c, (side == 1 and w or wd)._c,
                                  (side == 1 and bias or biasd)._c))
    end
    case("gemm (linear)", dt, "(2, 256, 1024) x (768, 1024)^T + bias: bias epilogue", GEMM_RTOL[dt], false,
         function(side) return lin(side, b0, b0d) end)
    case("gemm (linear)", dt, "(2, 256, 1024) x (768, 1024)^T + a bias at an odd element: staged", GEMM_RTOL[dt], false,
         function(side) return lin(side, b1, b1d) end)
    local g = uniform({2, 256, 768}, dt, -1, 1); local gd = dev(g)
    case("gemm+colsum (linear bwd)", dt, "dx, dw, db of (2, 256, 1024) x (768, 1024)^T", GEMM_RTOL[dt], false,
         function(side)
             local o = {ffi.new("nemo_tensor *[1]"), ffi.new("nemo_tensor *[1]"), ffi.new("nemo_tensor *[1]")}
             nffi.check(C.nemo_linear_backward((side == 1 and g or gd)._c, (side == 1 and x or xd)._c,
                                               (side == 1 and w or wd)._c, o[1], o[2], o[3]))
             return {wrap(o[1][0]), wrap(o[2][0]), wrap(o[3][0])}
         end)
    local x0 = nemo.zeros({16, 0}, {dtype = dt}); local x0d = dev(x0)
    local w0 = nemo.zeros({768, 0}, {dtype = dt}); local w0d = dev(w0)
    case("gemm (linear)", dt, "(16, 0) x (768, 0)^T + bias: k = 0, the bias in every row", 0, true, function(side)
        return wrap(C.nemo_linear((side == 1 and x0 or x0d)._c, (side == 1 and w0 or w0d)._c,
                                  (side == 1 and b0 or b0d)._c))
    end)
end

-- ==== training-step kernels: norms, fused DiT ops, attention, conv, embedding, interpolation ====
-- Each case runs the engine call (front-end + kernel) on both sides. Tolerances: the norms,
-- attention and the reductions of the fused backward sum in another order than the CPU (double
-- per lane and a fixed tree here, float vectors there), so float32 gets 2e-5 (forward) / 5e-5
-- (backward) normwise; the elementwise fused ops (rope, modulate, gated_add and their dx / da),
-- embedding (forward and backward) and nearest interpolation (forward and backward) are built
-- from the CPU's exact steps in the CPU's order and must be bitwise equal in every dtype.

local NORM_RTOL = {float32 = 2e-5, float64 = 1e-12, bfloat16 = 1e-2, float16 = 1e-2}
local NORM_BWD_RTOL = {float32 = 5e-5, float64 = 1e-11, bfloat16 = 1e-2, float16 = 1e-2}
local function outs(n) local o = {} for i = 1, n do o[i] = ffi.new("nemo_tensor *[1]") end return o end
-- The tensors behind the out-parameters that were asked for (the order of o).
local function took(o) local r = {} for i = 1, #o do r[#r + 1] = wrap(o[i][0]) end return r end
local function side_of(side, cpu, gpu) if cpu == nil then return nil end return side == 1 and cpu or gpu end
local function cp(t) return t and t._c or nil end
local int64s = Tensor.int64s
-- A tensor from a Lua function of the flat index (float64 values, then dtype dt).
local function from_fn(shape, dt, fn)
    local n = numel(shape)
    local buf = ffi.new("double[?]", n > 0 and n or 1)
    for i = 0, n - 1 do buf[i] = fn(i) end
    local t = nemo.empty(shape, {dtype = "float64"})
    if n > 0 then nffi.check(C.nemo_write_f64(t._c, buf)) end
    return t:to{dtype = dt}
end

-- layer_norm / rms_norm (kernels "norm_rows", "norm_rows_backward")
local NSHAPES = {   -- shape, nnorm, transposed input
    {{7, 33}, 1, true}, {{5, 1000}, 1, false}, {{3, 4096}, 1, true}, {{2, 3, 7, 9}, 2, false}, {{300, 64}, 1, false},
}
for _, sh in ipairs(NSHAPES) do
    local shape, nnorm = sh[1], sh[2]
    local ns = {}
    for i = #shape - nnorm + 1, #shape do ns[#ns + 1] = shape[i] end
    local label = string.format("%s over %s", Tensor.shape_str(shape), Tensor.shape_str(ns))
    for _, dt in ipairs(FLOATS) do
        local x, xd = pair(shape, dt, -3, 3, sh[3])
        local w, wd = pair(ns, dt, 0.5, 1.5, false)
        local b, bd = pair(ns, dt, -1, 1, false)
        local g, gd = pair(shape, dt, -1, 1, false)
        for _, aff in ipairs{true, false} do
            local lab = label .. (aff and " weight+bias" or " no affine")
            local W, Wd = aff and w or nil, aff and wd or nil
            local B, Bd = aff and b or nil, aff and bd or nil
            local function fwd(side)
                local o = outs(3)
                nffi.check(C.nemo_layer_norm(side_of(side, x, xd)._c, nnorm, int64s(ns), cp(side_of(side, W, Wd)),
                                             cp(side_of(side, B, Bd)), 1e-5, o[1], o[2], o[3]))
                return took(o)
            end
            case("norm_rows (layer_norm)", dt, lab, NORM_RTOL[dt], false, fwd)
            case("norm_rows_backward (ln)", dt, lab, NORM_BWD_RTOL[dt], false, function(side)
                local f = fwd(side)
                local o = outs(3)
                nffi.check(C.nemo_layer_norm_backward(side_of(side, g, gd)._c, side_of(side, x, xd)._c, nnorm, f[2]._c,
                                                      f[3]._c, cp(side_of(side, W, Wd)), aff and b._c.dtype or -1, o[1],
                                                      aff and o[2] or nil, aff and o[3] or nil))
                return aff and took(o) or {wrap(o[1][0])}
            end)
            local function rfwd(side)
                local o = outs(2)
                nffi.check(C.nemo_rms_norm(side_of(side, x, xd)._c, nnorm, int64s(ns), cp(side_of(side, W, Wd)), -1,
                                           o[1], o[2]))
                return took(o)
            end
            case("norm_rows (rms_norm)", dt, lab, NORM_RTOL[dt], false, rfwd)
            case("norm_rows_backward (rms)", dt, lab, NORM_BWD_RTOL[dt], false, function(side)
                local f = rfwd(side)
                local o = outs(2)
                nffi.check(C.nemo_rms_norm_backward(side_of(side, g, gd)._c, side_of(side, x, xd)._c, nnorm, f[2]._c,
                                                    cp(side_of(side, W, Wd)), o[1], aff and o[2] or nil))
                return aff and took(o) or {wrap(o[1][0])}
            end)
        end
    end
end
do   -- bf16 input with a float32 gradient (the kernel reads each row tensor in its own dtype)
    local x, xd = pair({9, 256}, "bfloat16", -3, 3, false)
    local g, gd = pair({9, 256}, "float32", -1, 1, false)
    local w, wd = pair({256}, "float32", 0.5, 1.5, false)
    case("norm_rows_backward (ln)", "bfloat16", "bf16 input, float32 gradient (9, 256)", NORM_BWD_RTOL.bfloat16, false,
         function(side)
        local f = outs(3)
        nffi.check(C.nemo_layer_norm(side_of(side, x, xd)._c, 1, int64s{256}, side_of(side, w, wd)._c, nil, 1e-5,
                                     f[1], f[2], f[3]))
        local o = outs(2)
        nffi.check(C.nemo_layer_norm_backward(side_of(side, g, gd)._c, side_of(side, x, xd)._c, 1, f[2][0], f[3][0],
                                              side_of(side, w, wd)._c, -1, o[1], o[2], nil))
        wrap(f[1][0]); wrap(f[2][0]); wrap(f[3][0])
        return took(o)
    end)
end

-- group_norm (kernels "group_norm", "group_norm_backward")
local GSHAPES = {{{2, 6, 5, 7}, 3}, {{2, 4, 9}, 2}, {{1, 64, 32, 32}, 32}, {{1, 8, 128, 128}, 2}, {{3, 6}, 6}}
for _, gs in ipairs(GSHAPES) do
    local shape, G = gs[1], gs[2]
    local label = string.format("%s groups %d", Tensor.shape_str(shape), G)
    for _, dt in ipairs(FLOATS) do
        local x, xd = pair(shape, dt, -3, 3, false)
        local w, wd = pair({shape[2]}, dt, 0.5, 1.5, false)
        local b, bd = pair({shape[2]}, dt, -1, 1, false)
        local g, gd = pair(shape, dt, -1, 1, false)
        for _, aff in ipairs{true, false} do
            local lab = label .. (aff and " weight+bias" or " no affine")
            local W, Wd = aff and w or nil, aff and wd or nil
            local B, Bd = aff and b or nil, aff and bd or nil
            local function fwd(side)
                local o = outs(3)
                nffi.check(C.nemo_group_norm(side_of(side, x, xd)._c, G, cp(side_of(side, W, Wd)), cp(side_of(side, B, Bd)),
                                             1e-5, o[1], o[2], o[3]))
                return took(o)
            end
            case("group_norm", dt, lab, NORM_RTOL[dt], false, fwd)
            case("group_norm_backward", dt, lab, NORM_BWD_RTOL[dt], false, function(side)
                local f = fwd(side)
                local o = outs(3)
                nffi.check(C.nemo_group_norm_backward(side_of(side, g, gd)._c, side_of(side, x, xd)._c, G, f[2]._c, f[3]._c,
                                                      cp(side_of(side, W, Wd)), aff and b._c.dtype or -1, o[1],
                                                      aff and o[2] or nil, aff and o[3] or nil))
                return aff and took(o) or {wrap(o[1][0])}
            end)
        end
    end
end

-- rope (kernel "rope", forward and backward): bitwise; head dim 6 (3 pairs) has no 16-byte vector
-- path in bf16 / f16 / f32 (the others have)
for _, rc in ipairs{{{2, 7, 3, 16}, 1}, {{2, 3, 7, 16}, 2}, {{7, 64}, 0}, {{2, 5, 3, 6}, 1}} do
    local shape, sd = rc[1], rc[2]
    local S, D = shape[sd + 1], shape[#shape]
    for _, dt in ipairs(FLOATS) do
        local x, xd = pair(shape, dt, -2, 2, false)
        local cs, csd = pair({S, D}, "float32", -1, 1, false)
        local sn, snd = pair({S, D}, "float32", -1, 1, false)
        local label = string.format("%s seq dim %d", Tensor.shape_str(shape), sd)
        case("rope", dt, label, 0, true, function(side)
            return wrap(C.nemo_rope(side_of(side, x, xd)._c, side_of(side, cs, csd)._c, side_of(side, sn, snd)._c, sd))
        end)
        case("rope backward", dt, label, 0, true, function(side)
            return wrap(C.nemo_rope_backward(side_of(side, x, xd)._c, side_of(side, cs, csd)._c, side_of(side, sn, snd)._c,
                                             sd, x._c.dtype))
        end)
    end
end

-- modulate / gated_add (kernels "modulate", "modulate_backward", "gated_add", "gated_add_backward")
local FUSED_RTOL = {float32 = 1e-6, float64 = 1e-12, bfloat16 = 1e-2, float16 = 1e-2}
for _, ms in ipairs{{{2, 7, 33}, 2}, {{2, 7, 33}, 1}, {{2, 4096, 64}, 1}, {{3, 1000, 48}, 3}} do
    local shape, vb = ms[1], ms[2]
    local vshape = {vb, shape[3]}
    local label = string.format("%s, vectors %s", Tensor.shape_str(shape), Tensor.shape_str(vshape))
    for _, dt in ipairs(FLOATS) do
        local x, xd = pair(shape, dt, -2, 2, false)
        local a, ad = pair(shape, dt, -2, 2, false)
        local g, gd = pair(shape, dt, -1, 1, false)
        local sc, scd = pair(vshape, dt, -0.5, 0.5, false)
        local sh, shd = pair(vshape, dt, -0.5, 0.5, false)
        for _, with_shift in ipairs{true, false} do
            case("modulate", dt, label .. (with_shift and " with shift" or " no shift"), 0, true, function(side)
                return wrap(C.nemo_modulate(side_of(side, x, xd)._c, side_of(side, sc, scd)._c,
                                            with_shift and side_of(side, sh, shd)._c or nil))
            end)
        end
        case("modulate_backward dx", dt, label, 0, true, function(side)
            local o = outs(1)
            nffi.check(C.nemo_modulate_backward(side_of(side, g, gd)._c, side_of(side, x, xd)._c, side_of(side, sc, scd)._c,
                                                -1, o[1], nil, nil))
            return took(o)
        end)
        case("modulate_backward dscale+dshift", dt, label, FUSED_RTOL[dt], false, function(side)
            local o = outs(2)
            nffi.check(C.nemo_modulate_backward(side_of(side, g, gd)._c, side_of(side, x, xd)._c, side_of(side, sc, scd)._c,
                                                sh._c.dtype, nil, o[1], o[2]))
            return took(o)
        end)
        case("gated_add", dt, label, 0, true, function(side)
            return wrap(C.nemo_gated_add(side_of(side, x, xd)._c, side_of(side, sc, scd)._c, side_of(side, a, ad)._c))
        end)
        case("gated_add_backward da", dt, label, 0, true, function(side)
            local o = outs(1)
            nffi.check(C.nemo_gated_add_backward(side_of(side, g, gd)._c, side_of(side, sc, scd)._c,
                                                 side_of(side, a, ad)._c, o[1], nil))
            return took(o)
        end)
        case("gated_add_backward dgate", dt, label, FUSED_RTOL[dt], false, function(side)
            local o = outs(1)
            nffi.check(C.nemo_gated_add_backward(side_of(side, g, gd)._c, side_of(side, sc, scd)._c,
                                                 side_of(side, a, ad)._c, nil, o[1]))
            return took(o)
        end)
    end
end

-- scaled_dot_product_attention (kernels "sdpa_fwd", "sdpa_bwd")
local ATT_RTOL = {float32 = 2e-5, float64 = 1e-12, bfloat16 = 1e-2, float16 = 1e-2}
local ATT_BWD_RTOL = {float32 = 5e-5, float64 = 1e-11, bfloat16 = 1e-2, float16 = 1e-2}
local bool_mask = from_fn({33, 40}, "bool", function(i) return (i < 40 or (i * 7919) % 5 == 0) and 0 or 1 end)
local float_mask = from_fn({2, 1, 17, 40}, "float32", function(i)
    local r = math.floor(i / 40) % 17
    if r == 3 or (i * 104729) % 7 == 0 then return -1 / 0 end
    return ((i * 7919) % 1000) / 500 - 1
end)
local ATT = {   -- q, k, v shapes, causal, mask, permuted layout, label, dtypes
    {{2, 3, 33, 16}, {2, 3, 33, 16}, {2, 3, 33, 16}, 0, nil, false, "(2, 3, 33, 16)", FLOATS},
    {{2, 3, 33, 16}, {2, 3, 33, 16}, {2, 3, 33, 16}, 1, nil, false, "(2, 3, 33, 16) causal", FLOATS},
    {{2, 3, 17, 16}, {2, 3, 40, 16}, {2, 3, 40, 24}, 0, nil, false, "Sq 17, Sk 40, D 16, Dv 24", FLOATS},
    {{2, 3, 33, 16}, {2, 3, 40, 16}, {2, 3, 40, 16}, 0, bool_mask, false, "bool mask (33, 40), row 0 empty", FLOATS},
    {{2, 3, 17, 16}, {2, 3, 40, 16}, {2, 3, 40, 8}, 0, float_mask, false, "float mask (2, 1, 17, 40) with -inf",
     {"float32", "float64"}},
    {{2, 3, 33, 16}, {2, 3, 33, 16}, {2, 3, 33, 16}, 1, nil, true, "(B, S, H, D) buffers seen as (B, H, S, D), causal",
     FLOATS},
    {{2, 3, 5, 16}, {2, 3, 0, 16}, {2, 3, 0, 8}, 0, nil, false, "no keys (Sk 0): zeros, lse -inf", FLOATS},
    {{2, 3, 5, 0}, {2, 3, 7, 0}, {2, 3, 7, 8}, 0, nil, false, "head dim 0 (D 0): uniform weights", FLOATS},
    {{8, 16, 512, 32}, {8, 16, 512, 32}, {8, 16, 512, 32}, 0, nil, false, "(8, 16, 512, 32): 2 chunks of heads",
     {"float32"}},
    {{1, 1, 4200, 32}, {1, 1, 4200, 32}, {1, 1, 4200, 32}, 0, nil, false, "(1, 1, 4200, 32): 2 query blocks",
     {"float32"}},
    {{1, 1, 4200, 32}, {1, 1, 4200, 32}, {1, 1, 4200, 32}, 1, nil, false, "(1, 1, 4200, 32) causal: 2 query blocks",
     {"float32"}},
}
-- q-like operand: a dense tensor, or with perm a (B, S, H, D) buffer transposed to (B, H, S, D)
local function att_operand(shape, dt, perm)
    if not perm then return pair(shape, dt, -1, 1, false) end
    local base = uniform({shape[1], shape[3], shape[2], shape[4]}, dt, -1, 1)
    return base:transpose(1, 2), dev(base):transpose(1, 2)
end
for _, at in ipairs(ATT) do
    for _, dt in ipairs(at[8]) do
        local q, qd = att_operand(at[1], dt, at[6])
        local k, kd = att_operand(at[2], dt, at[6])
        local v, vd = att_operand(at[3], dt, at[6])
        local oshape = {at[1][1], at[1][2], at[1][3], at[3][4]}
        local g, gd = pair(oshape, dt, -1, 1, false)
        local m, md = at[5], at[5] and dev(at[5]) or nil
        local causal = at[4]
        local function fwd(side)
            local o = outs(2)
            nffi.check(C.nemo_sdpa(side_of(side, q, qd)._c, side_of(side, k, kd)._c, side_of(side, v, vd)._c,
                                   cp(side_of(side, m, md)), causal, 0 / 0, o[1], o[2], nil))
            return took(o)
        end
        case("sdpa_fwd", dt, at[7], ATT_RTOL[dt], false, fwd)
        case("sdpa_bwd", dt, at[7], ATT_BWD_RTOL[dt], false, function(side)
            local f = fwd(side)
            local o = outs(3)
            nffi.check(C.nemo_sdpa_backward(side_of(side, g, gd)._c, side_of(side, q, qd)._c, side_of(side, k, kd)._c,
                                            side_of(side, v, vd)._c, cp(side_of(side, m, md)), f[1]._c, f[2]._c, nil,
                                            causal, 0 / 0, o[1], o[2], o[3]))
            return took(o)
        end)
    end
end

-- the fused low-precision attention (kernels "sdpa_flash_fwd", "sdpa_flash_bwd"): bf16 / f16,
-- head dim 64 or 128, no mask. The CPU side runs its twins (float32 computation, one rounding);
-- the GPU rounds P and dS to the input type before their products, hence 1e-2.
local FLASH = {   -- q shape, k (= v) shape, causal, layout, label
    {{2, 3, 77, 64}, {2, 3, 45, 64}, 0, nil, "Sq 77, Sk 45, D 64"},
    {{1, 2, 70, 128}, {1, 2, 130, 128}, 1, nil, "Sq 70, Sk 130, D 128, causal"},
    {{1, 3, 130, 64}, {1, 3, 70, 64}, 1, "perm", "Sq 130 > Sk 70, D 64, causal, (B, S, H, D) buffers"},
    {{2, 2, 65, 128}, {2, 2, 65, 128}, 0, "offset", "D 128, rows off 16-byte alignment (the front-end copies)"},
    {{1, 4, 1100, 128}, {1, 4, 1100, 128}, 1, nil, "(1, 4, 1100, 128) causal: 18 query tiles"},
}
-- NEMO_FLASH_WARP_ROWS (read by the CUDA launchers at each call): the kernel family, "16", "32"
-- or nil (the default, 32)
ffi.cdef[[int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);]]
local function set_warp_rows(rows)
    if rows then ffi.C.setenv("NEMO_FLASH_WARP_ROWS", rows, 1) else ffi.C.unsetenv("NEMO_FLASH_WARP_ROWS") end
end
local function flash_operand(shape, dt, layout)
    if layout == "perm" then return att_operand(shape, dt, true) end
    if layout ~= "offset" then return pair(shape, dt, -1, 1, false) end
    local base = uniform({shape[1], shape[2], shape[3], shape[4] + 4}, dt, -1, 1)
    return base:narrow(3, 4, shape[4]), dev(base):narrow(3, 4, shape[4])
end
for _, fc in ipairs(FLASH) do
    for _, dt in ipairs{"bfloat16", "float16"} do
        local q, qd = flash_operand(fc[1], dt, fc[4])
        local k, kd = flash_operand(fc[2], dt, fc[4])
        local v, vd = flash_operand(fc[2], dt, fc[4])
        local g, gd = pair(fc[1], dt, -1, 1, false)
        local causal = fc[3]
        T.ok(C.nemo_sdpa_uses_flash(qd._c, kd._c, vd._c, nil) ~= 0 and C.nemo_sdpa_uses_flash(q._c, k._c, v._c, nil) ~= 0,
             string.format("sdpa %s %s: takes the flash kernels on both sides", dt, fc[5]))
        local function fwd(side)
            local o = outs(2)
            nffi.check(C.nemo_sdpa(side_of(side, q, qd)._c, side_of(side, k, kd)._c, side_of(side, v, vd)._c, nil, causal,
                                   0 / 0, o[1], o[2], nil))
            return took(o)
        end
        for _, rows in ipairs{"32", "16"} do   -- the two kernel families (rows a warp owns)
            set_warp_rows(rows)
            local label = fc[5] .. ", " .. rows .. "-row kernels"
            case("sdpa_flash_fwd", dt, label, 1e-2, false, fwd)
            case("sdpa_flash_bwd", dt, label, 1e-2, false, function(side)
                local f = fwd(side)
                local o = outs(3)
                nffi.check(C.nemo_sdpa_backward(side_of(side, g, gd)._c, side_of(side, q, qd)._c, side_of(side, k, kd)._c,
                                                side_of(side, v, vd)._c, nil, f[1]._c, f[2]._c, nil, causal, 0 / 0, o[1],
                                                o[2], o[3]))
                return took(o)
            end)
        end
        set_warp_rows(nil)
    end
end

-- convolutions (kernels "conv_fwd", "conv_bwd")
local CONV = {   -- nsp, x, w, stride, pad_lo, pad_hi, dilation, groups, bias, algo, label
    {2, {2, 4, 9, 11}, {6, 2, 3, 3}, {2, 1}, {1, 1}, {1, 1}, {1, 2}, 2, true, 0, "2-D 3x3 stride (2, 1) dil (1, 2) groups 2"},
    {2, {2, 8, 5, 7}, {4, 8, 1, 1}, {1, 1}, {0, 0}, {0, 0}, {1, 1}, 1, true, 0, "2-D 1x1 (direct product)"},
    {2, {2, 8, 5, 7}, {4, 8, 1, 1}, {1, 1}, {0, 0}, {0, 0}, {1, 1}, 1, true, 1, "2-D 1x1 forced im2col"},
    {2, {1, 3, 8, 8}, {5, 3, 2, 2}, {2, 2}, {0, 0}, {0, 0}, {1, 1}, 1, false, 0, "2-D patchify 2x2 stride 2"},
    {2, {1, 3, 7, 6}, {4, 3, 2, 3}, {1, 2}, {0, 1}, {1, 0}, {1, 1}, 1, true, 0, "2-D asymmetric padding"},
    {3, {1, 2, 5, 6, 7}, {3, 2, 3, 3, 3}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, 1, true, 0, "3-D 3x3x3 pad 1"},
    {3, {1, 4, 3, 8, 8}, {6, 4, 1, 2, 2}, {1, 2, 2}, {0, 0, 0}, {0, 0, 0}, {1, 1, 1}, 1, true, 0, "3-D patchify (1, 2, 2)"},
    {1, {2, 3, 17}, {4, 3, 5}, {3}, {2}, {2}, {1}, 1, true, 0, "1-D k 5 stride 3 pad 2"},
    {2, {1, 16, 64, 64}, {16, 16, 3, 3}, {1, 1}, {1, 1}, {1, 1}, {1, 1}, 1, true, 0, "2-D (1, 16, 64, 64) 3x3"},
}
for _, cv in ipairs(CONV) do
    local nsp = cv[1]
    for _, dt in ipairs(FLOATS) do
        local x, xd = pair(cv[2], dt, -1, 1, false)
        local w, wd = pair(cv[3], dt, -1, 1, false)
        local b, bd = pair({cv[3][1]}, dt, -1, 1, false)
        local B, Bd = cv[9] and b or nil, cv[9] and bd or nil
        local function fwd(side)
            return wrap(C.nemo_conv(side_of(side, x, xd)._c, side_of(side, w, wd)._c, cp(side_of(side, B, Bd)), nsp,
                                    int64s(cv[4]), int64s(cv[5]), int64s(cv[6]), int64s(cv[7]), cv[8], cv[10]))
        end
        case("conv_fwd", dt, cv[11], GEMM_RTOL[dt], false, fwd)
        local y = fwd(1)
        local g, gd = pair(shape_of(y), dt, -1, 1, false)
        case("conv_bwd", dt, cv[11], GEMM_RTOL[dt], false, function(side)
            local o = outs(3)
            nffi.check(C.nemo_conv_backward(side_of(side, g, gd)._c, side_of(side, x, xd)._c, side_of(side, w, wd)._c, nsp,
                                            int64s(cv[4]), int64s(cv[5]), int64s(cv[6]), int64s(cv[7]), cv[8], cv[10],
                                            o[1], o[2], o[3]))
            return took(o)
        end)
    end
end

-- embedding (kernels "embedding_fwd", "embedding_bwd"): bitwise; a bad index is an error
local idx_small = from_fn({3, 5}, "int64", function(i) return (i * 7) % 10 end)
local idx_large = from_fn({20000}, "int64", function(i) return (i * 7919) % 1000 end)
for _, dt in ipairs{"float32", "bfloat16", "float16", "float64", "int32"} do
    local w, wd = pair({10, 7}, dt, -2, 2, false)
    for _, idt in ipairs{"int64", "int32"} do
        local ix = idx_small:to{dtype = idt}
        local ixd = dev(ix)
        case("embedding_fwd", dt, "(10, 7) by " .. idt .. " indices (3, 5)", 0, true, function(side)
            return wrap(C.nemo_embedding(side_of(side, ix, ixd)._c, side_of(side, w, wd)._c))
        end)
    end
end
for _, dt in ipairs(FLOATS) do
    local g, gd = pair({3, 5, 7}, dt, -1, 1, false)
    local ixd = dev(idx_small)
    for _, pad in ipairs{-1, 2} do
        case("embedding_bwd", dt, "(3, 5) indices into 10 rows, padding_idx " .. pad, 0, true, function(side)
            return wrap(C.nemo_embedding_backward(side_of(side, g, gd)._c, side_of(side, idx_small, ixd)._c, 10, pad))
        end)
    end
    local gl, gld = pair({20000, 64}, dt, -1, 1, false)
    local ild = dev(idx_large)
    case("embedding_bwd", dt, "20000 indices into 1000 rows of 64", 0, true, function(side)
        return wrap(C.nemo_embedding_backward(side_of(side, gl, gld)._c, side_of(side, idx_large, ild)._c, 1000, -1))
    end)
end
do
    local bad = dev(from_fn({4}, "int64", function(i) return i == 2 and 10 or i end))
    local w = dev(uniform({10, 3}, "float32"))
    local ok, err = pcall(function() return wrap(C.nemo_embedding(bad._c, w._c)) end)
    local good = not ok and tostring(err):find("out of range", 1, true) ~= nil and tostring(err):find("10", 1, true) ~= nil
    T.ok(good, "embedding_fwd on cuda: index 10 of a 10-row weight is an error naming it", tostring(err))
    record("embedding_fwd", "float32", good)
    ok, err = pcall(function() return wrap(C.nemo_embedding_backward(dev(uniform({4, 3}, "float32"))._c, bad._c, 10, -1)) end)
    good = not ok and tostring(err):find("out of range", 1, true) ~= nil
    T.ok(good, "embedding_bwd on cuda: index 10 for 10 rows is an error naming it", tostring(err))
    record("embedding_bwd", "float32", good)
    ok = pcall(cuda.synchronize, 0)
    T.ok(ok, "the device is usable after the index errors")
end

-- nearest interpolation (kernels "interp_nearest_fwd", "interp_nearest_bwd"): bitwise
local INTERP = {   -- nsp, x shape, out size, scales (nil: none), mode, label
    {2, {2, 3, 5, 7}, {10, 14}, nil, 0, "2-D x2"},
    {2, {2, 3, 5, 7}, {7, 9}, nil, 0, "2-D (5, 7) -> (7, 9)"},
    {2, {2, 3, 5, 7}, {3, 4}, nil, 0, "2-D down (5, 7) -> (3, 4)"},
    {2, {2, 3, 5, 7}, {7, 16}, {1.5, 2.3}, 0, "2-D scales (1.5, 2.3)"},
    {2, {2, 3, 5, 7}, {7, 9}, nil, 1, "2-D nearest-exact (7, 9)"},
    {1, {2, 3, 11}, {25}, nil, 0, "1-D 11 -> 25"},
    {3, {1, 2, 3, 4, 5}, {6, 8, 7}, nil, 1, "3-D nearest-exact"},
}
for _, ip in ipairs(INTERP) do
    local nsp = ip[1]
    local sc = ip[4] and ffi.new("double[?]", nsp, ip[4]) or nil
    for _, dt in ipairs{"float32", "bfloat16", "float16", "float64", "int64", "bool"} do
        local x = source(numel(ip[2]), ip[2], dt)
        local xd = dev(x)
        case("interp_nearest_fwd", dt, ip[6], 0, true, function(side)
            return wrap(C.nemo_interpolate(side_of(side, x, xd)._c, nsp, int64s(ip[3]), sc, ip[5]))
        end)
    end
    local oshape = {ip[2][1], ip[2][2]}
    for _, s in ipairs(ip[3]) do oshape[#oshape + 1] = s end
    for _, dt in ipairs(FLOATS) do
        local g, gd = pair(oshape, dt, -1, 1, false)
        case("interp_nearest_bwd", dt, ip[6], 0, true, function(side)
            return wrap(C.nemo_interpolate_backward(side_of(side, g, gd)._c, nsp, int64s(ip[2]), sc, ip[5]))
        end)
    end
end

-- adamw and sum_squares: the single-tensor kernels called directly (their pointers from the
-- plugin) and compared with the CPU engine call.
do
    local adamw_k = kernels.adamw and ffi.cast("int (*)(nemo_tensor *, const nemo_tensor *, nemo_tensor *, nemo_tensor *, "
        .. "double, double, double, double, double, int64_t)", kernels.adamw)
    local ssq_k = kernels.sum_squares and ffi.cast("int (*)(const nemo_tensor *, double *)", kernels.sum_squares)
    for _, dt in ipairs{"float32", "float64"} do
        if adamw_k then
            local p0 = uniform({1000, 33}, dt, -1, 1)
            local grads = {uniform({1000, 33}, dt, -1, 1), uniform({1000, 33}, dt, -1, 1), uniform({1000, 33}, dt, -1, 1)}
            case("adamw", dt, "3 steps on (1000, 33), lr 1e-2, wd 0.1", 0, true, function(side)
                local p = p0:clone()
                local m, v = nemo.zeros({1000, 33}, {dtype = dt}), nemo.zeros({1000, 33}, {dtype = dt})
                if side == 2 then p, m, v = dev(p), dev(m), dev(v) end
                for step = 1, 3 do
                    local g = grads[step]
                    if side == 1 then
                        nffi.check(C.nemo_adamw_step(p._c, g._c, m._c, v._c, 1e-2, 0.9, 0.999, 1e-8, 0.1, step))
                    else
                        local rc = adamw_k(p._c, dev(g)._c, m._c, v._c, 1e-2, 0.9, 0.999, 1e-8, 0.1, step)
                        if rc ~= 0 then error("adamw kernel: " .. ffi.string(plugin.error_text())) end
                    end
                end
                return {p, m, v}
            end)
        end
        if ssq_k then
            local t = uniform({LARGE}, dt, -1, 1)
            local td = dev(t)
            local ref, got = ffi.new("double[1]"), ffi.new("double[1]")
            nffi.check(C.nemo_sum_squares(t._c, ref))
            local rc = ssq_k(td._c, got)
            local rel = math.abs(got[0] - ref[0]) / ref[0]
            local good = rc == 0 and rel <= 1e-12
            T.ok(good, string.format("sum_squares %s (%d,): cuda %.17g, cpu %.17g, relative error %.2g <= 1e-12", dt, LARGE,
                                     got[0], ref[0], rel), rc ~= 0 and ffi.string(plugin.error_text()) or nil)
            record("sum_squares", dt, good, rel)
        end
    end
end

-- adamw_many and sum_squares_many through the engine (optim.c dispatches to the multi-tensor
-- kernels when every tensor is on one device): parameters of several sizes (one chunk, several,
-- an empty one) and both dtypes, different step counts, against the CPU engine call bit for bit.
do
    local shapes = {{1000, 33}, {40000}, {0}, {17}, {300, 300}}
    for _, dt in ipairs{"float32", "float64"} do
        local ps, gs = {}, {}
        for i, sh in ipairs(shapes) do ps[i], gs[i] = uniform(sh, dt, -1, 1), uniform(sh, dt, -1, 1) end
        case("adamw_many", dt, "5 parameters (one to several chunks, an empty one), steps 1..5", 0, true, function(side)
            local n = #shapes
            local P, G, M, V = {}, {}, {}, {}
            local pa, ga = ffi.new("nemo_tensor *[?]", n), ffi.new("const nemo_tensor *[?]", n)
            local ma, va, sa = ffi.new("nemo_tensor *[?]", n), ffi.new("nemo_tensor *[?]", n), ffi.new("int64_t[?]", n)
            for i, sh in ipairs(shapes) do
                P[i], G[i] = ps[i]:clone(), gs[i]
                M[i], V[i] = nemo.zeros(sh, {dtype = dt}), nemo.zeros(sh, {dtype = dt})
                if side == 2 then P[i], G[i], M[i], V[i] = dev(P[i]), dev(G[i]), dev(M[i]), dev(V[i]) end
                pa[i - 1], ga[i - 1], ma[i - 1], va[i - 1], sa[i - 1] = P[i]._c, G[i]._c, M[i]._c, V[i]._c, i
            end
            nffi.check(C.nemo_adamw_step_many(n, pa, ga, ma, va, 1e-2, 0.9, 0.999, 1e-8, 0.1, sa))
            local out = {}
            for i = 1, n do out[#out + 1] = P[i]; out[#out + 1] = M[i]; out[#out + 1] = V[i] end
            return out
        end)
        local ts = {uniform({LARGE}, dt, -1, 1), uniform({33, 7}, dt, -1, 1), uniform({0}, dt, -1, 1)}
        local arr, ref = ffi.new("const nemo_tensor *[?]", 3), ffi.new("double[3]")
        local arrd, got = ffi.new("const nemo_tensor *[?]", 3), ffi.new("double[3]")
        local keep = {}
        for i, t in ipairs(ts) do arr[i - 1] = t._c; keep[i] = dev(t); arrd[i - 1] = keep[i]._c end
        nffi.check(C.nemo_sum_squares_many(3, arr, ref))
        local ok = pcall(function() nffi.check(C.nemo_sum_squares_many(3, arrd, got)) end)
        local rel = 0
        for i = 0, 2 do if ref[i] > 0 then rel = math.max(rel, math.abs(got[i] - ref[i]) / ref[i]) elseif got[i] ~= 0 then rel = 1 end end
        local good = ok and rel <= 1e-12
        T.ok(good, string.format("sum_squares_many %s (3 tensors, one empty): worst relative error %.2g <= 1e-12", dt, rel))
        record("sum_squares_many", dt, good, rel)
    end
end

-- ==== bfloat16 operands stay bfloat16 ====
-- The CUDA kernels of the elementwise and fused DiT ops read bf16 operands and round their
-- result once (registered "<name>.lp", engine nemo_io_dtype): no float32 copies. Measured as
-- the peak device memory an op adds over its inputs: its bf16 result (2 MiB here); converting
-- first would add float32 copies of every input and of the result (4 MiB each).
if os.getenv("NEMO_FAKE_CUDA") == nil then
    local F = nemo.F
    local N, Dm = 1048576, 1024
    local function bf(shape, lo, hi)
        return nemo.rand(shape, {generator = nemo.Generator(7)}):mul(hi - lo):add(lo):to{device = DEV, dtype = "bfloat16"}
    end
    local x, a, g = bf({1, N / Dm, Dm}, -2, 2), bf({1, N / Dm, Dm}, -2, 2), bf({1, N / Dm, Dm}, -1, 1)
    local sc, sh = bf({1, Dm}, -0.5, 0.5), bf({1, Dm}, -0.5, 0.5)
    local cs, sn = nemo.rand({N / Dm, Dm}):to(DEV), nemo.rand({N / Dm, Dm}):to(DEV)
    local function added(fn)
        collectgarbage("collect"); collectgarbage("collect")
        cuda.synchronize(DEV)
        local base = cuda.memory_stats(0).current
        cuda.reset_peak_memory_stats(DEV)
        local out = {fn()}
        cuda.synchronize(DEV)
        local peak = cuda.memory_stats(0).peak - base
        for _, t in ipairs(out) do if Tensor.is_tensor(t) then t:free() end end
        return peak
    end
    local OUT = 2 * N
    local function kept(name, fn, outs)
        local p = added(fn)
        T.ok(p <= (outs or 1) * OUT + 65536, string.format("bf16 %s on %s: +%.2f MiB at peak for %.0f MiB of bf16 results "
             .. "(no float32 copies)", name, DEV, p / 1048576, (outs or 1) * OUT / 1048576))
    end
    kept("gelu (tanh)", function() return F.gelu(x, "tanh") end)
    kept("add", function() return F.add(x, a) end)
    kept("mul", function() return F.mul(x, a) end)
    kept("unary backward (gelu tanh)", function()
        return wrap(C.nemo_unary_backward(g._c, x._c, nil, C.NEMO_UOP_GELU_TANH, 0, 0))
    end)
    kept("modulate", function() return wrap(C.nemo_modulate(x._c, sc._c, sh._c)) end)
    kept("gated_add", function() return wrap(C.nemo_gated_add(x._c, sc._c, a._c)) end)
    kept("rope", function() return wrap(C.nemo_rope(x._c, cs._c, sn._c, 1)) end)
    kept("modulate backward (dx)", function()
        local o = outs(1)
        nffi.check(C.nemo_modulate_backward(g._c, x._c, sc._c, -1, o[1], nil, nil))
        return unpack(took(o))
    end)
    kept("gated_add backward (da)", function()
        local o = outs(1)
        nffi.check(C.nemo_gated_add_backward(g._c, sc._c, a._c, o[1], nil))
        return unpack(took(o))
    end)
    for _, t in ipairs{x, a, g, sc, sh, cs, sn} do t:free() end
end

-- ==== the caching allocator ====

do
    collectgarbage("collect"); collectgarbage("collect")
    collectgarbage("stop")
    local s0 = cuda.memory_stats(0)
    local x = nemo.empty({1000}, {device = DEV})            -- 4000 bytes: the 4096-byte class
    local s1 = cuda.memory_stats(0)
    x:free()
    local s2 = cuda.memory_stats(0)
    local y = nemo.empty({1024}, {device = DEV})            -- the same class: served from the cache
    local s3 = cuda.memory_stats(0)
    y:free()
    local z = nemo.empty({3 * 262144 + 1}, {device = DEV})   -- 3 MiB + 4 bytes: a 4 MiB class
    local s4 = cuda.memory_stats(0)
    z:free()
    C.nemo_memory_empty_cache(1, 0)
    local s5 = cuda.memory_stats(0)
    collectgarbage("restart")
    T.is(s1.current - s0.current, 4096, "allocator: 4000 bytes take a 4096-byte class")
    T.ok(s2.current == s0.current and s2.cached == s1.cached + 4096, "allocator: a freed block is cached",
        string.format("current %d -> %d -> %d, cached %d -> %d -> %d", s0.current, s1.current, s2.current, s0.cached,
                      s1.cached, s2.cached))
    T.ok(s3.current + s3.cached == s1.current + s1.cached, "allocator: the same class is reused (reserved bytes unchanged)")
    T.is(s4.current - s0.current, 4 * 1048576, "allocator: 3 MiB + 4 bytes take a 4 MiB class")
    T.is(s5.cached, 0, "allocator: empty_cache gives every cached block back")
    record("caching allocator", "float32", s1.current - s0.current == 4096 and s5.cached == 0)
end

-- ==== throughput (printed as "bench:" lines; run.sh keeps them in bench/RESULTS.md) ====

local function now_s()
    local ts = ffi.new("nemo_gpu_timespec")
    ffi.C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local function timeit(reps, fn)
    fn(); cuda.synchronize(0)
    local t0 = now_s()
    for _ = 1, reps do fn() end
    cuda.synchronize(0)
    return (now_s() - t0) / reps
end
if FAKE or EMU then T.diag("emulated devices: the throughput lines are left out (they would time the CPU)") end
if not FAKE and not EMU then
    local ok, err = pcall(function()
        local n = 64 * 1024 * 1024
        local x = nemo.empty({n}, {device = DEV}); x:fill_(1.25)
        local y = nemo.empty({n}, {device = DEV}); y:fill_(0.5)
        local t = timeit(10, function() x:to{dtype = "bfloat16"}:free() end)
        T.diag(string.format("bench: copy f32 -> bf16, 64M elements: %.3f ms, %.0f GB/s", t * 1e3, n * 6 / t / 1e9))
        t = timeit(10, function() wrap(C.nemo_binary(x._c, y._c, C.NEMO_BOP_ADD, 1, -1)):free() end)
        T.diag(string.format("bench: binary add f32, 64M elements: %.3f ms, %.0f GB/s", t * 1e3, n * 12 / t / 1e9))
        local xt = view(x, {8192, 8192}, {1, 8192}, 0)
        t = timeit(10, function() xt:contiguous():free() end)
        T.diag(string.format("bench: transpose copy f32 8192 x 8192: %.3f ms, %.0f GB/s", t * 1e3, n * 8 / t / 1e9))
        t = timeit(10, function() wrap(C.nemo_unary(x._c, C.NEMO_UOP_GELU_TANH, 0, 0)):free() end)
        T.diag(string.format("bench: gelu_tanh f32, 64M elements: %.3f ms, %.0f GB/s", t * 1e3, n * 8 / t / 1e9))
        t = timeit(10, function() wrap(C.nemo_reduce(x._c, C.NEMO_RED_SUM, 0, nil, 0, -1, 0)):free() end)
        T.diag(string.format("bench: sum f32, 64M elements: %.3f ms, %.0f GB/s", t * 1e3, n * 4 / t / 1e9))
        local m2 = view(x, {65536, 1024}, {1024, 1}, 0)
        local d0 = Tensor.int64s{0}
        t = timeit(10, function() wrap(C.nemo_reduce(m2._c, C.NEMO_RED_SUM, 1, d0, 0, -1, 0)):free() end)
        T.diag(string.format("bench: sum dim 0 of (65536, 1024) f32: %.3f ms, %.0f GB/s", t * 1e3, n * 4 / t / 1e9))
        t = timeit(10, function() wrap(C.nemo_softmax(m2._c, 1, 0, -1)):free() end)
        T.diag(string.format("bench: softmax rows (65536, 1024) f32: %.3f ms, %.0f GB/s", t * 1e3, n * 8 / t / 1e9))
        x:free(); y:free()
        for _, dt in ipairs{"float32", "bfloat16"} do
            local a = nemo.empty({4096, 4096}, {device = DEV, dtype = dt}); a:fill_(0.001)
            local b = nemo.empty({4096, 4096}, {device = DEV, dtype = dt}); b:fill_(0.002)
            t = timeit(5, function() wrap(C.nemo_matmul(a._c, b._c, C.NEMO_MM_MM)):free() end)
            T.diag(string.format("bench: matmul %s 4096^3 (float32 compute): %.3f ms, %.1f TFLOP/s", dt, t * 1e3,
                                 2 * 4096 ^ 3 / t / 1e12))
            a:free(); b:free()
        end
        do   -- FLUX.1-dev's MLP up-projection: (4608, 3072) x (12288, 3072)^T + bias in bf16
            local xb = nemo.empty({4608, 3072}, {device = DEV, dtype = "bfloat16"}); xb:fill_(0.01)
            local wb = nemo.empty({12288, 3072}, {device = DEV, dtype = "bfloat16"}); wb:fill_(0.02)
            local bb = nemo.empty({12288}, {device = DEV, dtype = "bfloat16"}); bb:fill_(0.5)
            t = timeit(5, function() wrap(C.nemo_linear(xb._c, wb._c, bb._c)):free() end)
            T.diag(string.format("bench: linear bf16 + bias (4608, 3072) x (12288, 3072)^T: %.3f ms, %.1f TFLOP/s", t * 1e3,
                                 2 * 4608 * 3072 * 12288 / t / 1e12))
            xb:free(); wb:free(); bb:free()
        end
    end)
    if not ok then T.diag("bench: failed: " .. tostring(err)) end
end

-- throughput of the training-step kernels ("bench:" lines)
if not FAKE and not EMU then
    local ok, err = pcall(function()
        local function attn(dt, S, H, D, causal)
            local q = dev(uniform({1, H, S, D}, dt, -1, 1))
            local k = dev(uniform({1, H, S, D}, dt, -1, 1))
            local v = dev(uniform({1, H, S, D}, dt, -1, 1))
            local function fwd()
                local o = outs(2)
                nffi.check(C.nemo_sdpa(q._c, k._c, v._c, nil, causal, 0 / 0, o[1], o[2], nil))
                return took(o)
            end
            local g = dev(uniform({1, H, S, D}, dt, -1, 1))
            local flops = 4 * S * S * D * H * (causal == 1 and 0.5 or 1)
            for _, rows in ipairs(dt == "float32" and {false} or {"32", "16"}) do   -- both flash kernel families
                set_warp_rows(rows or nil)
                local fam = rows and ", " .. rows .. "-row kernels" or ""
                local f = fwd()
                local t = timeit(3, function() local r = fwd(); r[1]:free(); r[2]:free() end)
                T.diag(string.format("bench: attention fwd %s (1, %d, %d, %d)%s%s: %.2f ms, %.1f TFLOP/s", dt, H, S, D,
                                     causal == 1 and " causal" or "", fam, t * 1e3, flops / t / 1e12))
                t = timeit(3, function()
                    local o = outs(3)
                    nffi.check(C.nemo_sdpa_backward(g._c, q._c, k._c, v._c, nil, f[1]._c, f[2]._c, nil, causal, 0 / 0, o[1],
                                                    o[2], o[3]))
                    for _, r in ipairs(took(o)) do r:free() end
                end)
                T.diag(string.format("bench: attention bwd %s (1, %d, %d, %d)%s%s: %.2f ms, %.1f TFLOP/s (2.5x fwd flops)",
                                     dt, H, S, D, causal == 1 and " causal" or "", fam, t * 1e3, 2.5 * flops / t / 1e12))
                f[1]:free(); f[2]:free()
            end
            set_warp_rows(nil)
        end
        -- host to device copies of 256 MiB from pageable and from pinned memory
        local h = uniform({64, 1024, 1024}, "float32", -1, 1)
        local hp = h:pin_memory()
        for _, src in ipairs{{"pageable", h}, {"pinned", hp}} do
            local tc = timeit(3, function() src[2]:to{device = DEV}:free() end)
            T.diag(string.format("bench: copy to device from %s memory, 256 MiB: %.2f ms, %.1f GB/s", src[1], tc * 1e3,
                                 256 * 2 ^ 20 / tc / 1e9))
        end
        -- a 256 MiB non_blocking upload on a pool stream while the default stream multiplies
        do
            local s = cuda.Stream()
            local a = nemo.empty({8192, 8192}, {device = DEV, dtype = "bfloat16"}); a:fill_(0.001)
            local d = nemo.empty({64, 1024, 1024}, {device = DEV})
            local function mm() wrap(C.nemo_matmul(a._c, a._c, C.NEMO_MM_MM)):free() end
            local function up() cuda.stream(s, function() d:copy_(hp, true) end) end
            local tm = timeit(3, mm)
            local tu = timeit(3, function() up(); s:synchronize() end)
            local both = timeit(3, function() up(); mm(); s:synchronize() end)
            T.diag(string.format("bench: overlap: matmul bf16 8192^3 %.2f ms, 256 MiB pinned upload on a pool stream %.2f ms, " ..
                                 "both at once %.2f ms (%.0f%% of the copy hidden)", tm * 1e3, tu * 1e3, both * 1e3,
                                 100 * math.max(0, math.min(1, (tm + tu - both) / math.min(tm, tu)))))
            a:free(); d:free()
        end
        h:free(); hp:free()
        attn("float32", 4608, 24, 128, 0)
        attn("bfloat16", 4608, 24, 128, 0)   -- the flash kernels from here on
        attn("bfloat16", 4608, 24, 128, 1)
        attn("bfloat16", 4608, 24, 64, 0)
        local x = dev(uniform({8192, 3072}, "bfloat16", -1, 1))
        local w = dev(uniform({3072}, "float32", 0.5, 1.5))
        local t = timeit(10, function()
            local o = outs(3)
            nffi.check(C.nemo_layer_norm(x._c, 1, int64s{3072}, w._c, nil, 1e-6, o[1], o[2], o[3]))
            for _, r in ipairs(took(o)) do r:free() end
        end)
        T.diag(string.format("bench: layer_norm bf16 (8192, 3072): %.3f ms, %.0f GB/s", t * 1e3, 8192 * 3072 * 4 / t / 1e9))
        local xm = dev(uniform({1, 8192, 3072}, "float32", -1, 1))
        local sc = dev(uniform({1, 3072}, "float32", -1, 1))
        t = timeit(10, function() wrap(C.nemo_modulate(xm._c, sc._c, sc._c)):free() end)
        T.diag(string.format("bench: modulate f32 (1, 8192, 3072): %.3f ms, %.0f GB/s", t * 1e3, 8192 * 3072 * 8 / t / 1e9))
    end)
    if not ok then T.diag("bench: training-step kernels failed: " .. tostring(err)) end
end

-- ==== memory accounting and synchronize ====

do
    collectgarbage("collect"); collectgarbage("collect")
    collectgarbage("stop")      -- no finalizer may free other tensors inside the window
    local before = cuda.memory_stats(0)
    local x = nemo.empty({1024, 1024}, {device = "cuda:0"})
    local mid = cuda.memory_stats(0)
    x:free()
    local after = cuda.memory_stats(0)
    collectgarbage("restart")
    T.ok(mid.current - before.current >= 4 * 1024 * 1024 and after.current == before.current and mid.peak >= mid.current,
         string.format("memory_stats: +%d bytes for a 4 MiB tensor, back to %d after free, peak %d",
                       mid.current - before.current, after.current, mid.peak))
    local ok, err = pcall(cuda.synchronize, 0)
    T.ok(ok, "cuda.synchronize(0) after all of the above", tostring(err))
end

-- ==== summary ====

local function now()
    local ts = ffi.new("nemo_gpu_timespec")
    ffi.C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

T.diag("")
T.diag("summary: cases passed / run, CUDA vs CPU (bitwise, or within the tolerances above)")
local head = string.format("%-26s", "kernel / path")
for _, dt in ipairs(DTYPES) do head = head .. string.format(" %8s", dt) end
T.diag(head)
for _, row in ipairs(row_order) do
    local line = string.format("%-26s", row)
    for _, dt in ipairs(DTYPES) do
        local r = results[row][dt]
        local cell = r and string.format("%d/%d%s", r.pass, r.total, r.pass == r.total and "" or "!") or "-"
        line = line .. string.format(" %8s", cell)
    end
    T.diag(line)
end

T.diag("")
T.diag("worst normwise error max|cuda - cpu| / max|cpu| per kernel (0 = bitwise equal)")
local HEAD2 = {"float32", "bfloat16", "float16", "float64"}
local head2 = string.format("%-26s", "kernel / path")
for _, dt in ipairs(HEAD2) do head2 = head2 .. string.format(" %9s", dt) end
T.diag(head2)
for _, row in ipairs(row_order) do
    local line, any = string.format("%-26s", row), false
    for _, dt in ipairs(HEAD2) do
        local r = results[row][dt]
        if r and r.err then any = true end
        line = line .. string.format(" %9s", (r and r.err) and string.format("%.1e", r.err) or "-")
    end
    if any then T.diag(line) end
end

-- bandwidth (measured, never asserted: bench/ owns speed)
do
    local n = 64 * 1024 * 1024
    local x = nemo.empty({n}, {dtype = "float32", device = "cuda:0"})
    local reps = 20
    if fill_kernel then
        fill_kernel(x._c, 1.5)
        cuda.synchronize(0)
        local t0 = now()
        for _ = 1, reps do fill_kernel(x._c, 1.5) end
        cuda.synchronize(0)
        local dt = now() - t0
        T.diag(string.format("fill kernel float32 256 MiB: %.0f GB/s", reps * n * 4 / dt / 1e9))
    end
    local h = nemo.empty({n}, {dtype = "float32"})
    h:fill_(2)
    local t0 = now()
    for _ = 1, 3 do x:copy_(h) end
    cuda.synchronize(0)
    local t1 = now()
    for _ = 1, 3 do h:copy_(x) end
    local t2 = now()
    T.diag(string.format("copy 256 MiB pageable host->device %.1f GB/s, device->host %.1f GB/s",
        3 * n * 4 / (t1 - t0) / 1e9, 3 * n * 4 / (t2 - t1) / 1e9))
    x:free(); h:free()
end

T.done()
