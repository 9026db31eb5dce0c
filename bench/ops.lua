-- bench/ops.lua: CPU op throughput, printed as tables.
--   nemo-lua bench/ops.lua [--quick]
-- matmul GFLOP/s through nemo.matmul next to raw OpenBLAS cblas_sgemm on the same sizes;
-- elementwise GB/s; ms per call of layer_norm / rms_norm / attention (forward and
-- forward+backward) at transformer shapes.
local ffi = require "ffi"
local nemo = require "nemo"
local F = nemo.F

local quick = arg and arg[1] == "--quick"

ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } nemo_bench_timespec;
int clock_gettime(int clk, nemo_bench_timespec *ts);
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc);
]]
local ts = ffi.new("nemo_bench_timespec")
local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end

-- median seconds of fn over enough repetitions to fill ~budget seconds
local function time(fn, budget)
    budget = budget or (quick and 0.2 or 1.0)
    fn(); collectgarbage()
    local times = {}
    local start = now()
    repeat
        local t0 = now()
        fn()
        times[#times + 1] = now() - t0
        collectgarbage("step", 1000)
    until now() - start > budget and #times >= 3
    table.sort(times)
    return times[math.floor((#times + 1) / 2)]
end

local blas = ffi.load("openblas")
local function row(cols, widths)
    local parts = {}
    for i, c in ipairs(cols) do parts[i] = string.format("%" .. widths[i] .. "s", tostring(c)) end
    print(table.concat(parts, "  "))
end

print(string.format("nemo %s, %d threads", nemo.version, nemo.get_num_threads()))
print()
print("matmul (float32), GFLOP/s")
local W = {18, 12, 14, 8}
row({"M x K x N", "nemo", "openblas", "ratio"}, W)
local sizes = quick and {{256, 256, 256}, {1024, 1024, 1024}} or
    {{256, 256, 256}, {512, 512, 512}, {1024, 1024, 1024}, {2048, 2048, 2048}, {4096, 3072, 3072}}
for _, s in ipairs(sizes) do
    local m, k, n = s[1], s[2], s[3]
    local a, b = nemo.randn(m, k), nemo.randn(k, n)
    local flops = 2 * m * k * n
    local tn = time(function() return nemo.matmul(a, b) end)
    local c = nemo.empty(m, n)
    local pa, pb, pc = ffi.cast("float*", a:data_ptr()), ffi.cast("float*", b:data_ptr()), ffi.cast("float*", c:data_ptr())
    local tb = time(function() blas.cblas_sgemm(101, 111, 111, m, n, k, 1, pa, k, pb, n, 0, pc, n) end)
    row({m .. "x" .. k .. "x" .. n, string.format("%.1f", flops / tn / 1e9), string.format("%.1f", flops / tb / 1e9),
         string.format("%.2f", tb / tn)}, W)
end

print()
print("elementwise (float32), GB/s (bytes read + written)")
W = {22, 10}
row({"op, elements", "GB/s"}, W)
local n = quick and 1048576 or 8388608
local x, y = nemo.randn(n), nemo.randn(n)
for _, case in ipairs {
    {"add", function() return x + y end, 12},
    {"mul by number", function() return x * 1.5 end, 8},
    {"gelu tanh", function() return F.gelu(x, {approximate = "tanh"}) end, 8},
    {"silu", function() return F.silu(x) end, 8},
    {"copy to bf16", function() return x:bfloat16() end, 6},
} do
    local t = time(case[2])
    row({case[1] .. ", " .. n, string.format("%.1f", case[3] * n / t / 1e9)}, W)
end

print()
print("transformer ops (float32), ms per call")
W = {44, 10, 12}
row({"op, shape", "forward", "fwd+bwd"}, W)
local function fb(fn, inputs)
    local tf = time(function() return nemo.no_grad(fn) end)
    local tb = time(function()
        for _, t in ipairs(inputs) do t.grad = nil end
        local out = fn()
        out:backward(nemo.ones_like(out))
    end)
    return tf, tb
end
local tokens = quick and 1024 or 4096
local D = quick and 768 or 3072
local xs = nemo.randn({tokens, D}, {requires_grad = true})
local w, b = nemo.randn({D}, {requires_grad = true}), nemo.randn({D}, {requires_grad = true})
if F.layer_norm then
    local tf, tb = fb(function() return F.layer_norm(xs, {D}, w, b, 1e-6) end, {xs, w, b})
    row({"layer_norm (" .. tokens .. ", " .. D .. ")", string.format("%.2f", tf * 1e3), string.format("%.2f", tb * 1e3)}, W)
end
if F.rms_norm then
    local tf, tb = fb(function() return F.rms_norm(xs, {D}, w, 1e-6) end, {xs, w})
    row({"rms_norm (" .. tokens .. ", " .. D .. ")", string.format("%.2f", tf * 1e3), string.format("%.2f", tb * 1e3)}, W)
end
if F.scaled_dot_product_attention then
    for _, s in ipairs(quick and {{1, 4, 256, 64}} or {{1, 4, 1024, 64}, {1, 2, 2048, 128}}) do
        local B, H, S, Dh = s[1], s[2], s[3], s[4]
        local q = nemo.randn({B, H, S, Dh}, {requires_grad = true})
        local k = nemo.randn({B, H, S, Dh}, {requires_grad = true})
        local v = nemo.randn({B, H, S, Dh}, {requires_grad = true})
        local tf, tb = fb(function() return F.scaled_dot_product_attention(q, k, v) end, {q, k, v})
        local flops = 4 * B * H * S * S * Dh
        row({string.format("attention B=%d H=%d S=%d D=%d (%.0f GF/s fwd)", B, H, S, Dh, flops / tf / 1e9),
             string.format("%.2f", tf * 1e3), string.format("%.2f", tb * 1e3)}, W)
    end
end
