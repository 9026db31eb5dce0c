-- tests/gpu/check_ops.lua: every CUDA kernel and device path that exists, checked against the
-- CPU on a machine with a GPU (run by tests/gpu/run.sh, never by `make test`). Prints TAP, then a
-- summary table and a few bandwidth figures as TAP comments; exits non-zero on any failure.
--
-- What is compared: bytes. Every case runs the same operation on a CPU tensor and on a CUDA
-- tensor holding the same bytes, copies the CUDA result back and requires the two buffers to be
-- equal bit for bit (NaN patterns included): fill writes one converted value and copies move
-- bytes, so there is no rounding to tolerate. A failure prints the first mismatching element.
--
-- The fill kernel is called two ways: directly (its pointer comes from the plugin's
-- register_kernels, the way libnemo receives it), and through the engine (nemo.full /
-- t:fill_ on CUDA tensors), which uses the kernel once libnemo routes fills to it.
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

local DTYPES = {"float32", "bfloat16", "float16", "float64", "int64", "int32", "bool"}
local LARGE = 1048576 + 3       -- several blocks, a 16-byte vector body and a tail

-- ==== helpers ====

local results = {}              -- results[row][dtype] = {pass=, total=}
local row_order = {}
local function record(row, dt, ok)
    if not results[row] then results[row] = {}; row_order[#row_order + 1] = row end
    local r = results[row][dt] or {pass = 0, total = 0}
    results[row][dt] = r
    r.total = r.total + 1
    if ok then r.pass = r.pass + 1 end
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

ffi.cdef [[
typedef struct nemo_cuda_plugin {
    int abi;
    int (*device_count)(int *count);
    int (*malloc)(int dev, size_t nbytes, void **p);
    int (*free)(int dev, void *p);
    int (*memcpy)(void *dst, const void *src, size_t nbytes, int kind, int dev);
    int (*memset)(int dev, void *p, int value, size_t nbytes);
    int (*synchronize)(int dev);
    const char *(*error_text)(void);
    void (*register_kernels)(void (*reg)(const char *name, int devtype, void (*fn)(void)));
} nemo_cuda_plugin;
const nemo_cuda_plugin *nemo_cuda_plugin_get(void);
typedef struct { long tv_sec; long tv_nsec; } nemo_gpu_timespec;
int clock_gettime(int clk, nemo_gpu_timespec *ts);
]]

local plugin_path = os.getenv("NEMO_CUDA_LIB")
if not plugin_path or plugin_path == "" then
    local lib = os.getenv("NEMO_LIB")
    plugin_path = (lib and lib:match("^(.*)/[^/]*$") or (here .. "/../../build")) .. "/libnemo_cuda.so"
end
local plugin = ffi.load(plugin_path).nemo_cuda_plugin_get()
local kernels = {}
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
T.diag("summary: cases passed / run, CUDA vs CPU, bitwise")
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
