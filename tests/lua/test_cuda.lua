-- tests/lua/test_cuda.lua: the CUDA device layer seen from Lua: nemo.cuda, tensors asked for on a
-- CUDA device, and libnemo_cuda.so itself (loaded through the FFI and called through its plugin
-- table, as libnemo does): the kernels it registers (fill, copy, the pointwise, reduce and
-- linalg families) and how each refuses bad input with a status and the plugin's error text,
-- all without needing a device. tests/gpu/check_ops.lua checks what the kernels compute.
--
-- Which branch runs: a machine whose /dev/nvidia0 exists is expected to have a usable GPU (the
-- positive checks); any other machine must report no CUDA device cleanly (the negative checks).
-- NEMO_EXPECT_CUDA=1 or 0 overrides the guess. Plugin checks are skipped when the build has no
-- libnemo_cuda.so (NO_CUDA=1 or no nvcc).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/?.lua;" .. package.path
local T = require "tap"
local ffi = require "ffi"

local nemo = package.searchpath("nemo", package.path) and require "nemo" or require "nemo.tensor"
local cuda = require "nemo.cuda"
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

-- where libnemo looks (engine/core.c cuda_load): $NEMO_CUDA_LIB, then beside libnemo.so
local plugin_path = os.getenv("NEMO_CUDA_LIB")
if not (plugin_path and file_exists(plugin_path)) then
    local lib = os.getenv("NEMO_LIB")
    local dir = lib and lib:match("^(.*)/[^/]*$") or (here .. "/../../build")
    plugin_path = dir .. "/libnemo_cuda.so"
end
local have_plugin = file_exists(plugin_path)
local NEMO_ECUDA, NEMO_EDEVICE, NEMO_EINVAL = C.NEMO_ECUDA, C.NEMO_EDEVICE, C.NEMO_EINVAL

-- ==== nemo.cuda ====

T.ok(nemo.cuda == nil or rawequal(nemo.cuda, cuda), "require 'nemo' exposes this module as nemo.cuda")
local ok_avail, avail = pcall(cuda.is_available)
T.ok(ok_avail, "cuda.is_available() does not raise", tostring(avail))
T.is(avail, expect_gpu, "cuda.is_available() is " .. tostring(expect_gpu) .. " on this machine")

if not expect_gpu then
    T.is(cuda.device_count(), 0, "cuda.device_count() == 0")
    local reason = cuda.unavailable_reason()
    T.ok(type(reason) == "string" and #reason > 0, "cuda.unavailable_reason() explains: " .. tostring(reason))
    if have_plugin then
        T.ok(reason and reason:find("cudaGetDeviceCount", 1, true),
             "the reason carries the CUDA runtime's own text from the plugin", reason)
    else
        T.ok(reason and reason:find("without CUDA", 1, true), "the reason says the build has no CUDA plugin", reason)
    end

    T.raises(function() return nemo.empty({2, 3}, {device = "cuda:0"}) end, "no CUDA device",
             "nemo.empty on cuda:0 raises 'no CUDA device'")
    T.raises(function() return nemo.zeros({4}, {device = "cuda"}) end, "no CUDA device",
             "nemo.zeros on cuda raises 'no CUDA device'")
    T.raises(function() return nemo.zeros({4}, {dtype = "bfloat16", device = "cuda:1"}) end, "no CUDA device",
             "nemo.zeros bf16 on cuda:1 raises 'no CUDA device'")
    local x = nemo.zeros({3, 2})
    T.raises(function() return x:to{device = "cuda"} end, "no CUDA device", "cpu tensor :to{device='cuda'} raises")
    T.raises(function() return x:to{device = "cuda:0", dtype = "float16"} end, "no CUDA device",
             "cpu tensor :to{device='cuda:0', dtype='float16'} raises")
    T.raises(function() return x:cuda() end, "no CUDA device", "cpu tensor :cuda() raises")
    T.raises(cuda.synchronize, "no CUDA device", "cuda.synchronize() raises 'no CUDA device'")
    T.raises(function() cuda.synchronize(0) end, "no CUDA device", "cuda.synchronize(0) raises 'no CUDA device'")
    T.raises(cuda.current_device, "no CUDA device", "cuda.current_device() raises 'no CUDA device'")
    T.raises(function() cuda.set_device(0) end, "no CUDA device", "cuda.set_device(0) raises 'no CUDA device'")
    T.raises(function() cuda.get_device_properties(0) end, "no CUDA device",
             "cuda.get_device_properties(0) raises 'no CUDA device'")

    local st = cuda.memory_stats()
    T.ok(st.current == 0 and st.peak == 0 and st.cached == 0,
         string.format("memory_stats() after failed cuda allocations: current %s peak %s cached %s, all 0",
                       tostring(st.current), tostring(st.peak), tostring(st.cached)))
    st = cuda.memory_stats("cuda:1")
    T.ok(type(st.current) == "number" and st.current == 0, "memory_stats('cuda:1') gives counters without a device")
    T.is(cuda.memory_allocated(0), 0, "memory_allocated(0) == 0")
    T.is(x:tolist()[3][2], 0, "cpu tensors still work after the failed cuda requests")
else
    local n = cuda.device_count()
    T.ok(n >= 1, "cuda.device_count() = " .. n .. " >= 1")
    T.is(cuda.unavailable_reason(), nil, "cuda.unavailable_reason() is nil")
    T.is(cuda.current_device(), 0, "cuda.current_device() == 0 by default")
    local before = cuda.memory_stats(0).current
    local z = nemo.zeros({7, 33}, {device = "cuda:0"})
    T.is(z.device, "cuda:0", "nemo.zeros on cuda:0 lives on cuda:0")
    local after = cuda.memory_stats(0).current
    T.ok(after - before >= 7 * 33 * 4, string.format("memory_stats current grew by %d >= %d bytes", after - before, 7 * 33 * 4))
    cuda.synchronize()
    T.ok(true, "cuda.synchronize() returns")
    local back = z:to{device = "cpu"}
    T.is(back:tolist()[7][33], 0, "zeros copied back to cpu read 0")
    T.raises(function() cuda.synchronize(n) end, "does not exist", "cuda.synchronize(" .. n .. ") names a missing device")
    local p = cuda.get_device_properties(0)
    T.ok(type(p.name) == "string" and #p.name > 0 and cuda.get_device_name() == p.name and type(p.emulated) == "boolean",
         "cuda.get_device_properties(0) / get_device_name(): " .. tostring(p.name))
    T.raises(function() cuda.get_device_properties(n) end, "does not exist",
             "cuda.get_device_properties(" .. n .. ") names a missing device")
end

T.raises(function() cuda.memory_stats("cpu") end, "expected a CUDA device", "cuda.memory_stats('cpu') is a usage error")
T.raises(function() cuda.memory_stats(-1) end, "non%-negative integer", "cuda.memory_stats(-1) is a usage error")
T.raises(function() cuda.memory_stats(99) end, "does not exist", "cuda.memory_stats(99) names a missing device")

-- ==== libnemo_cuda.so through its plugin table ====

local PLUGIN_TESTS = 34
if not have_plugin then
    for _ = 1, PLUGIN_TESTS do T.skip("libnemo_cuda.so checks", "built without CUDA (no " .. plugin_path .. ")") end
    T.done()
end


local PLUGIN = require "cuda_plugin"   -- the plugin struct (tests/lua/cuda_plugin.lua)
local okl, lib = pcall(ffi.load, plugin_path)
T.ok(okl, "ffi.load(" .. plugin_path .. ") pulls in libcudart and loads", tostring(lib))
if not okl then
    for _ = 2, PLUGIN_TESTS do T.skip("libnemo_cuda.so checks", "the plugin does not load") end
    T.done()
end
local okg, p = pcall(function() return lib.nemo_cuda_plugin_get() end)
T.ok(okg and p ~= nil and p.abi == PLUGIN.ABI, "nemo_cuda_plugin_get() is exported and returns plugin ABI " .. PLUGIN.ABI,
     okg and (p ~= nil and "abi " .. p.abi or "NULL") or tostring(p))
local function text() return ffi.string(p.error_text()) end

local count = ffi.new("int[1]", -7)
local rc = p.device_count(count)
if expect_gpu then
    T.ok(rc == 0 and count[0] >= 1, string.format("plugin device_count: rc %d, %d devices", rc, count[0]))
else
    T.ok(count[0] == 0 and (rc == NEMO_ECUDA or rc == 0) and text():find("cudaGetDeviceCount", 1, true),
         string.format("plugin device_count without a GPU: rc %d, count %d, text '%s'", rc, count[0], text()))
end

-- the kernel list, through the same callback libnemo passes
local kernels = {}
local reg = ffi.cast("void (*)(const char *, int, void (*)(void))", function(name, devtype, fn)
    kernels[ffi.string(name)] = {devtype = devtype, fn = fn}
end)
p.register_kernels(reg)
reg:free()
T.ok(kernels.fill and kernels.fill.devtype == 1 and kernels.fill.fn ~= nil,
     "register_kernels registers 'fill' for device type NEMO_CUDA")
local fill = kernels.fill and ffi.cast("int (*)(nemo_tensor *, double)", kernels.fill.fn)

-- a tensor header over a fake storage: the kernel must refuse or finish before touching memory
local function fake(devtype, n)
    local s = ffi.new("nemo_storage")
    s.data = ffi.cast("void *", 0); s.nbytes = 4 * n; s.refcount = 1; s.devtype = devtype
    local t = ffi.new("nemo_tensor")
    t.refcount = 1; t.dtype = C.NEMO_F32; t.devtype = devtype; t.ndim = 1
    t.shape[0] = n; t.stride[0] = 1; t.storage = s
    return t, s
end
local tc, sc = fake(0, 4)
rc = fill and fill(tc, 1.5) or -999
T.ok(rc == NEMO_EDEVICE and text():find("cpu tensor", 1, true),
     string.format("fill kernel on a cpu tensor: rc %d == NEMO_EDEVICE, '%s'", rc, text()))
local te, se = fake(1, 0)
rc = fill and fill(te, 1.5) or -999
T.is(rc, 0, "fill kernel on an empty cuda tensor is a no-op returning 0")
assert(sc and se)

-- every kernel the CUDA files register, with the C signature libnemo's front-ends call it by
local KERNELS = {
    fill = "int (*)(nemo_tensor *, double)",
    copy = "int (*)(nemo_tensor *, const nemo_tensor *, const int64_t *)",
    unary = "int (*)(nemo_tensor *, const nemo_tensor *, int, double, double)",
    unary_backward = "int (*)(nemo_tensor *, const nemo_tensor *, const nemo_tensor *, int, double, double)",
    binary = "int (*)(nemo_tensor *, const nemo_tensor *, const nemo_tensor *, const int64_t *, const int64_t *, int, double)",
    where = "int (*)(nemo_tensor *, const nemo_tensor *, const nemo_tensor *, const nemo_tensor *, const int64_t *const *)",
    reduce = "int (*)(nemo_tensor *, const nemo_tensor *, int64_t, int64_t, int64_t, int, double)",
    reduce_backward = "int (*)(nemo_tensor *, const nemo_tensor *, const nemo_tensor *, int64_t, int64_t, int64_t, int, double)",
    argreduce = "int (*)(nemo_tensor *, nemo_tensor *, const nemo_tensor *, int64_t, int64_t, int64_t, int)",
    max_dim_backward = "int (*)(nemo_tensor *, const nemo_tensor *, const nemo_tensor *, int64_t, int64_t, int64_t)",
    softmax = "int (*)(nemo_tensor *, const nemo_tensor *, int64_t, int64_t, int64_t, int)",
    softmax_backward = "int (*)(nemo_tensor *, const nemo_tensor *, const nemo_tensor *, int64_t, int64_t, int64_t, int)",
    cumsum = "int (*)(nemo_tensor *, const nemo_tensor *, int64_t, int64_t, int64_t, int)",
    gemm = "int (*)(int, int, int, int64_t, int64_t, int64_t, double, const void *, int64_t, const void *, int64_t, double, void *, int64_t, int64_t, const int64_t *, int)",
    gemm_lp = "int (*)(int, int, int, int64_t, int64_t, int64_t, double, const void *, int64_t, const void *, int64_t, double, void *, int64_t, int64_t, const int64_t *, int)",
    gemm_lp_out = "int (*)(int, int, int, int64_t, int64_t, int64_t, double, const void *, int64_t, const void *, int64_t, const void *, void *, int64_t, int64_t, const int64_t *)",
    colsum = "int (*)(int, int64_t, int64_t, const void *, int64_t, void *)",
}
local names, missing = {}, {}
for name in pairs(KERNELS) do
    names[#names + 1] = name
    if not (kernels[name] and kernels[name].devtype == 1 and kernels[name].fn ~= nil) then missing[#missing + 1] = name end
end
table.sort(names)
T.ok(#missing == 0, "register_kernels registers " .. #names .. " CUDA kernels: " .. table.concat(names, ", "),
     "missing: " .. table.concat(missing, ", "))
local k = {}
for name, sig in pairs(KERNELS) do if kernels[name] then k[name] = ffi.cast(sig, kernels[name].fn) end end
local function call(name, ...)
    if not k[name] then return -999 end
    return k[name](...)
end

-- A tensor-taking kernel given cpu tensors refuses before touching any memory (the fake
-- tensors point at address 0) and leaves its reason in error_text().
local st = ffi.new("int64_t[1]", 1)
local strides4 = ffi.new("const int64_t *[4]", {st, st, st, st})
local CPU_CALLS = {
    {"copy", function() return call("copy", tc, tc, st) end},
    {"unary", function() return call("unary", tc, tc, 0, 0, 0) end},
    {"unary_backward", function() return call("unary_backward", tc, tc, tc, 0, 0, 0) end},
    {"binary", function() return call("binary", tc, tc, tc, st, st, 0, 1) end},
    {"where", function() return call("where", tc, tc, tc, tc, strides4) end},
    {"reduce", function() return call("reduce", tc, tc, 1, 4, 1, 0, 0) end},
    {"reduce_backward", function() return call("reduce_backward", tc, tc, tc, 1, 4, 1, 0, 0) end},
    {"argreduce", function() return call("argreduce", tc, tc, tc, 1, 4, 1, 0) end},
    {"max_dim_backward", function() return call("max_dim_backward", tc, tc, tc, 1, 4, 1) end},
    {"softmax", function() return call("softmax", tc, tc, 1, 4, 1, 0) end},
    {"softmax_backward", function() return call("softmax_backward", tc, tc, tc, 1, 4, 1, 0) end},
    {"cumsum", function() return call("cumsum", tc, tc, 1, 4, 1, 0) end},
}
for _, c in ipairs(CPU_CALLS) do
    rc = c[2]()
    T.ok(rc == NEMO_EDEVICE and text():find("cpu tensor", 1, true),
         string.format("%s kernel on cpu tensors: rc %d == NEMO_EDEVICE, '%s'", c[1], rc, text()))
end

-- gemm / colsum take raw pointers: a dtype they do not compute in is refused first, an empty
-- product is a no-op
rc = call("gemm", C.NEMO_I64, 0, 0, 2, 2, 2, 1.0, nil, 2, nil, 2, 0.0, nil, 2, 1, nil, 1)
T.ok(rc == C.NEMO_EDTYPE and text():find("int64", 1, true),
     string.format("gemm kernel refuses int64: rc %d == NEMO_EDTYPE, '%s'", rc, text()))
rc = call("gemm", C.NEMO_F32, 0, 0, 0, 5, 3, 1.0, nil, 3, nil, 5, 0.0, nil, 5, 1, nil, 1)
T.is(rc, 0, "gemm kernel with m = 0 is a no-op returning 0")
rc = call("gemm_lp", C.NEMO_F32, 0, 0, 2, 2, 2, 1.0, nil, 2, nil, 2, 0.0, nil, 2, 1, nil, 1)
T.ok(rc == C.NEMO_EDTYPE and text():find("float32", 1, true),
     string.format("gemm_lp kernel refuses float32 operands: rc %d == NEMO_EDTYPE, '%s'", rc, text()))
rc = call("gemm_lp_out", C.NEMO_F32, 0, 0, 2, 2, 2, 1.0, nil, 2, nil, 2, nil, nil, 2, 1, nil)
T.ok(rc == C.NEMO_EDTYPE and text():find("float32", 1, true),
     string.format("gemm_lp_out kernel refuses float32 operands: rc %d == NEMO_EDTYPE, '%s'", rc, text()))
rc = call("gemm_lp_out", C.NEMO_BF16, 0, 0, 0, 5, 3, 1.0, nil, 3, nil, 5, nil, nil, 5, 1, nil)
T.is(rc, 0, "gemm_lp_out kernel with m = 0 is a no-op returning 0")
rc = call("colsum", C.NEMO_I64, 4, 4, nil, 4, nil)
T.ok(rc == C.NEMO_EDTYPE and text():find("int64", 1, true),
     string.format("colsum kernel refuses int64: rc %d == NEMO_EDTYPE, '%s'", rc, text()))

-- streams (ABI 3): an id outside 0..32 is refused before any CUDA call
rc = p.set_stream(0, 40)
T.ok(rc == C.NEMO_EINVAL and text():find("stream id 40 out of range", 1, true),
     string.format("plugin set_stream(0, 40): rc %d == NEMO_EINVAL, '%s'", rc, text()))
rc = p.stream_synchronize(0, -1)
T.ok(rc == C.NEMO_EINVAL and text():find("stream id -1", 1, true),
     string.format("plugin stream_synchronize(0, -1): rc %d == NEMO_EINVAL, '%s'", rc, text()))

-- the error text is emptied when a kernel starts: a failure above, then a successful no-op
rc = fill and fill(te, 2.5) or -999
T.ok(rc == 0 and text() == "", string.format("a kernel that succeeds leaves error_text() empty: rc %d, '%s'", rc, text()))

if not expect_gpu then
    -- a cuda-typed tensor on a machine without a device: the runtime's own text comes back
    local tg = fake(1, 4)
    rc = call("unary", tg, tg, 0, 0, 0)
    T.ok(rc == NEMO_ECUDA and text():find("cudaSetDevice", 1, true),
         string.format("unary kernel without a device: rc %d == NEMO_ECUDA, '%s'", rc, text()))
    rc = call("copy", tg, tg, st)
    T.ok(rc == NEMO_ECUDA and text():find("cudaSetDevice", 1, true),
         string.format("copy kernel without a device: rc %d == NEMO_ECUDA, '%s'", rc, text()))
    local h = ffi.new("float[4]")
    rc = call("gemm", C.NEMO_F32, 0, 0, 2, 2, 2, 1.0, h, 2, h, 2, 0.0, h, 2, 1, nil, 1)
    T.ok(rc == NEMO_ECUDA or rc == NEMO_EDEVICE,
         string.format("gemm kernel without a device fails cleanly: rc %d, '%s'", rc, text()))
else
    for _ = 1, 3 do T.skip("kernels without a device", "this machine has a GPU") end
end

if expect_gpu then
    local q = ffi.new("void *[1]")
    rc = p.malloc(0, 256, q)
    T.ok(rc == 0 and q[0] ~= nil, "plugin malloc(256) on cuda:0 returns memory")
    rc = rc == 0 and p.free(0, q[0]) or rc
    T.is(rc, 0, "plugin free returns 0")
else
    local q = ffi.new("void *[1]")
    q[0] = ffi.cast("void *", 1)
    rc = p.malloc(0, 256, q)
    T.ok(rc == NEMO_ECUDA and q[0] == nil and #text() > 0,
         string.format("plugin malloc without a device fails cleanly: rc %d, NULL pointer, '%s'", rc, text()))
    rc = p.synchronize(0)
    T.ok(rc == NEMO_ECUDA and text():find("cuda", 1, true) ~= nil,
         string.format("plugin synchronize without a device fails cleanly: rc %d, '%s'", rc, text()))
end
rc = p.memcpy(nil, nil, 16, 7, 0)
T.ok(rc == NEMO_EINVAL and text():find("kind 7", 1, true),
     string.format("plugin memcpy rejects kind 7: rc %d, '%s'", rc, text()))

T.done()
