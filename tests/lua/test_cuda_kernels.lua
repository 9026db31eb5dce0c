-- tests/lua/test_cuda_kernels.lua: the CUDA kernels added for a full training step on the GPU
-- (norms, fused DiT ops, attention, conv / embedding / interpolation, AdamW, sum of squares),
-- seen through libnemo_cuda.so's plugin table as libnemo sees them, on any machine: each one is
-- registered under its CPU twin's name for device type NEMO_CUDA, refuses CPU tensors with
-- NEMO_EDEVICE and a "cpu tensor" text before touching memory, and (on a machine without a GPU)
-- fails a CUDA-typed tensor with the runtime's own cudaSetDevice text instead of crashing.
-- tests/gpu/check_ops.lua checks what they compute. Run by tests/gpu/run.sh; also runnable
-- here: ./nemo-lua tests/lua/test_cuda_kernels.lua (make test runs it).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. package.path
local T = require "tap"
local ffi = require "ffi"
require "nemo"
local C = require("nemo.ffi").C

local function file_exists(p)
    local f = io.open(p, "rb")
    if f then f:close() return true end
    return false
end
local expect_env = os.getenv("NEMO_EXPECT_CUDA")
local expect_gpu
if expect_env == "1" or expect_env == "0" then expect_gpu = expect_env == "1"
else expect_gpu = file_exists("/dev/nvidia0") end

local plugin_path = os.getenv("NEMO_CUDA_LIB")
if not (plugin_path and file_exists(plugin_path)) then
    local lib = os.getenv("NEMO_LIB")
    plugin_path = (lib and lib:match("^(.*)/[^/]*$") or (here .. "/../../build")) .. "/libnemo_cuda.so"
end
if not file_exists(plugin_path) then
    io.write("1..0 # SKIP no ", plugin_path, " (built without CUDA)\n")
    os.exit(0)
end

require "cuda_plugin"   -- the plugin struct (tests/lua/cuda_plugin.lua)
-- the library stays referenced for the whole run: were it collected, dlclose would leave the
-- kernel pointers below dangling (a crash that depended on the collector's timing)
local plugin_lib = ffi.load(plugin_path)
local p = plugin_lib.nemo_cuda_plugin_get()
local function text() return ffi.string(p.error_text()) end

local kernels = {}
local reg = ffi.cast("void (*)(const char *, int, void (*)(void))", function(name, devtype, fn)
    kernels[ffi.string(name)] = {devtype = devtype, fn = fn}
end)
p.register_kernels(reg)
reg:free()

-- the C signatures libnemo's front-ends call them by (engine/ops/*.c, and the proposed
-- engine/optim.c lookup for adamw / sum_squares)
local T_ = "nemo_tensor *"
local CT = "const nemo_tensor *"
local SIGS = {
    norm_rows = "int (*)(" .. T_ .. ", " .. T_ .. ", " .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT ..
        ", int64_t, int64_t, double, int)",
    norm_rows_backward = "int (*)(" .. T_ .. ", " .. T_ .. ", " .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT ..
        ", " .. CT .. ", " .. CT .. ", int64_t, int64_t)",
    group_norm = "int (*)(" .. T_ .. ", " .. T_ .. ", " .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT ..
        ", int64_t, int64_t, int64_t, int64_t, double)",
    group_norm_backward = "int (*)(" .. T_ .. ", " .. T_ .. ", " .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT ..
        ", " .. CT .. ", " .. CT .. ", int64_t, int64_t, int64_t, int64_t)",
    rope = "int (*)(" .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT .. ", int64_t, int64_t, int64_t, int64_t, int)",
    modulate = "int (*)(" .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT .. ", int64_t, int64_t, int64_t, int64_t)",
    modulate_backward = "int (*)(" .. T_ .. ", " .. T_ .. ", " .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT ..
        ", int64_t, int64_t, int64_t, int64_t)",
    gated_add = "int (*)(" .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT .. ", int64_t, int64_t, int64_t, int64_t)",
    gated_add_backward = "int (*)(" .. T_ .. ", " .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT ..
        ", int64_t, int64_t, int64_t, int64_t)",
    sdpa_fwd = "int (*)(" .. T_ .. ", " .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT .. ", " .. CT .. ", int, double)",
    sdpa_bwd = "int (*)(" .. T_ .. ", " .. T_ .. ", " .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT .. ", " .. CT ..
        ", " .. CT .. ", " .. CT .. ", " .. CT .. ", int, double)",
    sdpa_flash_fwd = "int (*)(" .. T_ .. ", " .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT .. ", int, double)",
    sdpa_flash_bwd = "int (*)(" .. T_ .. ", " .. T_ .. ", " .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT .. ", " ..
        CT .. ", " .. CT .. ", " .. CT .. ", int, double)",
    conv_fwd = "int (*)(" .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT ..
        ", const int64_t *, const int64_t *, const int64_t *, int64_t, int)",
    conv_bwd = "int (*)(" .. T_ .. ", " .. T_ .. ", " .. T_ .. ", " .. CT .. ", " .. CT .. ", " .. CT ..
        ", const int64_t *, const int64_t *, const int64_t *, int64_t, int)",
    embedding_fwd = "int (*)(" .. T_ .. ", " .. CT .. ", " .. CT .. ")",
    embedding_bwd = "int (*)(" .. T_ .. ", " .. CT .. ", " .. CT .. ", int64_t)",
    interp_nearest_fwd = "int (*)(" .. T_ .. ", " .. CT .. ", const double *, int)",
    interp_nearest_bwd = "int (*)(" .. T_ .. ", " .. CT .. ", const double *, int)",
    adamw = "int (*)(" .. T_ .. ", " .. CT .. ", " .. T_ .. ", " .. T_ .. ", double, double, double, double, double, int64_t)",
    sum_squares = "int (*)(" .. CT .. ", double *)",
}
local names = {}
for name in pairs(SIGS) do names[#names + 1] = name end
table.sort(names)

local k = {}
for _, name in ipairs(names) do
    local e = kernels[name]
    T.ok(e and e.devtype == 1 and e.fn ~= nil, string.format("register_kernels registers '%s' for NEMO_CUDA", name))
    if e then k[name] = ffi.cast(SIGS[name], e.fn) end
end

-- tensor headers over fake storages (address 0): a kernel must refuse before touching memory
local keep = {}
local function fake(devtype, dtype, shape)
    local s = ffi.new("nemo_storage")
    local n = 1
    for _, v in ipairs(shape) do n = n * v end
    s.data = ffi.cast("void *", 0); s.nbytes = 8 * n; s.refcount = 1; s.devtype = devtype
    local t = ffi.new("nemo_tensor")
    t.refcount = 1; t.dtype = dtype; t.devtype = devtype; t.ndim = #shape; t.storage = s
    local st = 1
    for d = #shape, 1, -1 do t.shape[d - 1] = shape[d]; t.stride[d - 1] = st; st = st * shape[d] end
    keep[#keep + 1] = s
    return t
end

local I3 = ffi.new("int64_t[3]", {1, 1, 1})
local Z3 = ffi.new("int64_t[3]", {0, 0, 0})
local SC = ffi.new("double[3]", {0, 0, 0})
local OUT = ffi.new("double[1]")
-- one call per kernel on tensors of device type dev (the first tensor argument decides)
local function calls(dev)
    local F32, I64 = C.NEMO_F32, C.NEMO_I64
    local m = fake(dev, F32, {4, 8})               -- rows (4, 8)
    local r = fake(dev, F32, {4})
    local w = fake(dev, F32, {8})
    local x5 = fake(dev, F32, {1, 2, 1, 4, 4})
    local w5 = fake(dev, F32, {2, 2, 1, 1, 1})
    local q = fake(dev, F32, {2, 4, 8})
    local hq = fake(dev, C.NEMO_BF16, {2, 4, 64})
    local l = fake(dev, F32, {2, 4})
    local idx = fake(dev, I64, {4})
    local emb = fake(dev, F32, {10, 8})
    local y2 = fake(dev, F32, {4, 8})
    local gs = fake(dev, F32, {1, 8})
    local x3 = fake(dev, F32, {1, 4, 8})
    local rope_x = fake(dev, F32, {1, 4, 1, 8})
    local cs = fake(dev, F32, {4, 8})
    return {
        norm_rows = function() return k.norm_rows(m, nil, r, m, w, w, 4, 8, 1e-5, 1) end,
        norm_rows_backward = function() return k.norm_rows_backward(m, w, w, m, m, r, r, w, 4, 8) end,
        group_norm = function() return k.group_norm(x5, r, r, x5, nil, nil, 1, 2, 16, 2, 1e-5) end,
        group_norm_backward = function() return k.group_norm_backward(x5, nil, nil, x5, x5, r, r, nil, 1, 2, 16, 2) end,
        rope = function() return k.rope(rope_x, rope_x, cs, cs, 1, 4, 1, 8, 0) end,
        modulate = function() return k.modulate(x3, x3, gs, gs, 1, 4, 8, 8) end,
        modulate_backward = function() return k.modulate_backward(x3, gs, gs, x3, x3, gs, 1, 4, 8, 8) end,
        gated_add = function() return k.gated_add(x3, x3, gs, x3, 1, 4, 8, 8) end,
        gated_add_backward = function() return k.gated_add_backward(x3, gs, x3, gs, x3, 1, 4, 8, 8) end,
        sdpa_fwd = function() return k.sdpa_fwd(q, l, q, q, q, nil, 0, 0.5) end,
        sdpa_bwd = function() return k.sdpa_bwd(q, q, q, q, q, q, q, q, l, nil, 0, 0.5) end,
        sdpa_flash_fwd = function() return k.sdpa_flash_fwd(hq, l, hq, hq, hq, 0, 0.5) end,
        sdpa_flash_bwd = function() return k.sdpa_flash_bwd(hq, hq, hq, hq, hq, hq, hq, hq, l, 0, 0.5) end,
        conv_fwd = function() return k.conv_fwd(x5, x5, w5, nil, I3, Z3, I3, 1, 0) end,
        conv_bwd = function() return k.conv_bwd(x5, w5, nil, x5, x5, w5, I3, Z3, I3, 1, 0) end,
        embedding_fwd = function() return k.embedding_fwd(y2, idx, emb) end,
        embedding_bwd = function() return k.embedding_bwd(emb, y2, idx, -1) end,
        interp_nearest_fwd = function() return k.interp_nearest_fwd(x5, x5, SC, 0) end,
        interp_nearest_bwd = function() return k.interp_nearest_bwd(x5, x5, SC, 0) end,
        adamw = function() return k.adamw(w, w, w, w, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1) end,
        sum_squares = function() return k.sum_squares(w, OUT) end,
    }
end

local cpu = calls(0)
for _, name in ipairs(names) do
    if k[name] then
        local rc = cpu[name]()
        T.ok(rc == C.NEMO_EDEVICE and text():find("cpu tensor", 1, true),
             string.format("%s on cpu tensors: rc %d == NEMO_EDEVICE, '%s'", name, rc, text()))
    else
        T.skip(name .. " on cpu tensors", "not registered")
    end
end

if not expect_gpu then
    local dev = calls(1)
    for _, name in ipairs(names) do
        if k[name] then
            local rc = dev[name]()
            T.ok(rc == C.NEMO_ECUDA and text():find("cudaSetDevice", 1, true),
                 string.format("%s on cuda tensors without a device: rc %d == NEMO_ECUDA, '%s'", name, rc, text()))
        else
            T.skip(name .. " without a device", "not registered")
        end
    end
else
    for _, name in ipairs(names) do T.skip(name .. " without a device", "this machine has a GPU") end
end

-- after a failure, a kernel that succeeds leaves the text empty: sum_squares of an empty
-- tensor on the CPU is refused, so use the refusal, then check the text is set (not stale)
local rc = cpu.sum_squares()
T.ok(rc < 0 and #text() > 0, "a refused call leaves its reason in error_text()")

assert(plugin_lib)   -- alive to the end (see above)
T.done()
