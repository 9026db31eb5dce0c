-- bench/gpu_block.lua: issue #6's goal benchmark on a GPU. A FLUX.1-dev-shaped double block
-- (FluxTransformerBlock: D 3072, 24 heads x 128, 4096 image + 512 text tokens, batch 1) forward +
-- backward on cuda:0 in float32 and bfloat16 (with each family of flash kernels), as TFLOP/s and as a fraction of matmul rates
-- measured in the same run; peak device memory; and a matmul TFLOP/s table against shape (nemo's
-- F.linear next to cuBLAS called directly). Prints numbers ("# bench: ..." lines, which
-- tests/gpu/run.sh appends to bench/RESULTS.md); asserts nothing. About 30-60 s on an H200.
--   nemo-lua bench/gpu_block.lua [--device cuda:0] [--steps N] [--small] [--no-cublas]
-- --small shrinks every size for a dry run of the script (with --device cpu on a CPU). Without a
-- usable CUDA device it prints one line saying so and exits 0.
--
-- The host's share: on the CUDA emulator with NEMO_EMU_CUDA_NOEXEC=1 nothing runs on the
-- "device", so the block's ms/step is what the host (Lua, autograd, the engine, launches) spends
-- issuing one step, at the real sizes, on this machine's CPU; the script then prints it as a
-- "host cost" line instead of a rate (bench/RESULTS.md has the command). A GPU step faster than
-- that waits for the host.
--
-- The goal's denominator is the hardware's bf16 rate, so the script measures it with cuBLAS
-- itself (cublasGemmEx through the FFI, bf16 in and out, float32 accumulation, on the same
-- device memory), next to nemo's own bf16 products (the "gemm_lp_out" kernel: bf16 in and out,
-- float32 accumulation, the bias added in cuBLASLt's epilogue). float32 is reported against
-- cuBLAS float32 without TF32 (what nemo's float32 products use) and TF32 for reference.
--
-- FLOPs counted (multiply-add = 2), per step: forward = 24 D^2 N (q, k, v, out and the 4x MLP
-- of both streams over all N = 4608 tokens) + 4 N^2 D (the joint attention's QK^T and PV);
-- backward = 2 x forward (the usual model-FLOPs convention; recomputation and the AdaLN linears
-- on the single temb token are not counted).
local ffi = require "ffi"
local nemo = require "nemo"
local F = nemo.F
local C = require("nemo.ffi").C

local opts = {device = "cuda:0", steps = 5, small = false, cublas = true}
local argv = arg or {}
local i = 1
while i <= #argv do
    local a = argv[i]
    if a == "--device" then opts.device = argv[i + 1]; i = i + 1
    elseif a == "--steps" then opts.steps = tonumber(argv[i + 1]); i = i + 1
    elseif a == "--small" then opts.small = true
    elseif a == "--no-cublas" then opts.cublas = false
    else error("gpu_block: unknown argument '" .. tostring(a) .. "' (--device D, --steps N, --small, --no-cublas)", 0) end
    i = i + 1
end
local dev = opts.device
local on_gpu = dev:match("^cuda") ~= nil
if on_gpu and not (nemo.cuda and nemo.cuda.is_available()) then
    print("gpu_block: no CUDA device (" .. tostring(nemo.cuda and nemo.cuda.unavailable_reason() or "no nemo.cuda") ..
          "); nothing measured")
    os.exit(0)
end

local clock = require("nemo.dist").wtime
local function sync() if on_gpu then nemo.cuda.synchronize(dev) end end
local function median(t)
    local s = {}
    for k, v in ipairs(t) do s[k] = v end
    table.sort(s)
    return s[math.floor((#s + 1) / 2)]
end
local function bench(line) print("# bench: " .. line); io.stdout:flush() end

local D, H, HD, NI, NT = 3072, 24, 128, 4096, 512
if opts.small then D, H, HD, NI, NT = 128, 2, 64, 64, 16 end
local N = NI + NT
local t_start = clock()
print(string.format("# gpu_block on %s: D %d (%d heads x %d), %d image + %d text tokens, %d timed steps", dev, D, H, HD,
    NI, NT, opts.steps))

-- ==== cuBLAS, called directly ====

local cublas, handle, cublas_why
if on_gpu and opts.cublas then
    local ok, err = pcall(function()
        ffi.cdef [[
            typedef struct nemo_bench_cublas_ctx *nemo_bench_cublas_t;
            int cublasCreate_v2(nemo_bench_cublas_t *handle);
            int cublasGemmEx(nemo_bench_cublas_t h, int transa, int transb, int m, int n, int k, const void *alpha,
                             const void *A, int Atype, int lda, const void *B, int Btype, int ldb, const void *beta,
                             void *C, int Ctype, int ldc, int computeType, int algo);
        ]]
        local lib
        for _, name in ipairs {"libcublas.so.13", "libcublas.so.12", "libcublas.so",
                               "/usr/local/cuda/lib64/libcublas.so"} do
            local ok2, l = pcall(ffi.load, name)
            if ok2 then lib = l; break end
        end
        if not lib then error("libcublas.so not found") end
        local h = ffi.new("nemo_bench_cublas_t[1]")
        local st = lib.cublasCreate_v2(h)
        if st ~= 0 then error("cublasCreate_v2 returned status " .. st) end
        cublas, handle = lib, h[0]
    end)
    if not ok then cublas_why = tostring(err) end
end
local CUDA_R_32F, CUDA_R_16BF = 0, 14
local COMPUTE_32F, COMPUTE_32F_FAST_TF32 = 68, 77
local alpha, beta = ffi.new("float[1]", 1), ffi.new("float[1]", 0)

-- seconds per call of fn (after a warm-up call), repeated for about `budget` seconds
local function per_call(fn, budget)
    fn(); sync()
    local t0 = clock()
    fn(); sync()
    local one = math.max(clock() - t0, 1e-6)
    local reps = math.max(2, math.min(200, math.floor(budget / one)))
    t0 = clock()
    for _ = 1, reps do fn() end
    sync()
    return (clock() - t0) / reps
end

local function randn(shape, dt) return nemo.randn(shape):to{dtype = dt, device = dev} end

-- C (M, N) = A (M, K) @ B (K, N) with cuBLAS on the given device tensors (row-major C = A B is
-- column-major C^T = B^T A^T): kind "f32" (no TF32), "tf32" or "bf16"; TFLOP/s, or nil and why
local function cublas_rate(kind, a, b)
    if not cublas then return nil, cublas_why or "not on a GPU" end
    local M, K, Nn = a.shape[1], a.shape[2], b.shape[2]
    local c = nemo.empty({M, Nn}, {dtype = a.dtype, device = dev})
    local ty = kind == "bf16" and CUDA_R_16BF or CUDA_R_32F
    local ct = kind == "tf32" and COMPUTE_32F_FAST_TF32 or COMPUTE_32F
    local pa, pb, pc = C.nemo_tensor_data(a._c), C.nemo_tensor_data(b._c), C.nemo_tensor_data(c._c)
    local status = 0
    local t = per_call(function()
        local st = cublas.cublasGemmEx(handle, 0, 0, Nn, M, K, alpha, pb, ty, Nn, pa, ty, K, beta, pc, ty, Nn, ct, -1)
        if st ~= 0 then status = st end
    end, 0.15)
    c:free()
    if status ~= 0 then return nil, "cublasGemmEx status " .. status end
    return 2 * M * K * Nn / t / 1e12
end

-- nemo's F.linear as the model calls it: x (M, K) and a (N, K) weight (here the transposed view
-- of b, which BLAS reads without a copy); TFLOP/s
local function nemo_rate(a, b)
    local M, K, Nn = a.shape[1], a.shape[2], b.shape[2]
    local w = b:t()
    local t = per_call(function() F.linear(a, w):free() end, 0.15)
    return 2 * M * K * Nn / t / 1e12
end

local function fmt(v) return v and string.format("%.1f", v) or "-" end

-- ==== matmul rate against shape ====

local peak = {}          -- best measured rate per kind, over the square sizes
local shapes = {}
for _, n in ipairs(opts.small and {64, 128} or {2048, 4096, 8192}) do shapes[#shapes + 1] = {n, n, n, "square"} end
for _, s in ipairs {{NI, D, D, "image q/k/v/out"}, {NT, D, D, "text q/k/v/out"}, {NI, D, 4 * D, "image MLP up"},
                    {NI, 4 * D, D, "image MLP down"}} do shapes[#shapes + 1] = s end
for _, s in ipairs(shapes) do
    local M, K, Nn, what = s[1], s[2], s[3], s[4]
    local a32, b32 = randn({M, K}, "float32"), randn({K, Nn}, "float32")
    local a16, b16 = a32:to{dtype = "bfloat16"}, b32:to{dtype = "bfloat16"}
    local r = {}
    for _, kind in ipairs {"f32", "tf32", "bf16"} do
        local ok, v, why = pcall(cublas_rate, kind, kind == "bf16" and a16 or a32, kind == "bf16" and b16 or b32)
        if ok then r[kind] = v; cublas_why = cublas_why or why else cublas_why = tostring(v) end
        if what == "square" and r[kind] then peak[kind] = math.max(peak[kind] or 0, r[kind]) end
    end
    for _, dt in ipairs {"float32", "bfloat16"} do
        local ok, v = pcall(nemo_rate, dt == "float32" and a32 or a16, dt == "float32" and b32 or b16)
        r[dt] = ok and v or nil
        if not ok then print("# nemo linear " .. dt .. " failed: " .. tostring(v)) end
        if what == "square" and r[dt] then peak["nemo_" .. dt] = math.max(peak["nemo_" .. dt] or 0, r[dt]) end
    end
    a32:free(); b32:free(); a16:free(); b16:free()
    bench(string.format("matmul %dx%dx%d (%s) on %s, TFLOP/s: nemo linear f32 %s, bf16 %s | cuBLAS f32 %s, tf32 %s, " ..
        "bf16 %s", M, K, Nn, what, dev, fmt(r.float32), fmt(r.bfloat16), fmt(r.f32), fmt(r.tf32), fmt(r.bf16)))
end
if on_gpu and not peak.bf16 then print("# cuBLAS not measured: " .. tostring(cublas_why)) end

-- ==== the double block ====

local flux = require "nemo.models.flux"
local FLOPS = 3 * (24 * D * D * N + 4 * N * N * D)
print(string.format("# model FLOPs per fwd+bwd step: %.3g (%.0f%% attention)", FLOPS, 100 * 12 * N * N * D / FLOPS))

local block, rope
local function setup()
    nemo.manual_seed(0)
    local t0 = clock()
    block = flux.FluxTransformerBlock(D, H, HD, {device = dev})
    local side = math.floor(math.sqrt(NI))
    local ids = nemo.zeros(N, 3)
    for r = 0, NI - 1 do ids[{NT + r, 1}] = math.floor(r / side); ids[{NT + r, 2}] = r % side end
    local cos, sin = flux.FluxPosEmbed(10000, opts.small and {16, 24, 24} or {16, 56, 56})(ids:to{device = dev})
    rope = {cos, sin}         -- float32 tables, as the model hands them to its blocks in every dtype
    sync()
    print(string.format("# block built on %s in %.1f s (%d parameters)", dev, clock() - t0, (function()
        local n = 0
        for _, p in ipairs(block:parameters()) do n = n + p:numel() end
        return n
    end)()))
end

-- NEMO_FLASH_WARP_ROWS, which the CUDA attention reads at each call (docs/cuda.md: the two flash
-- kernel families); the bf16 block runs with both
ffi.cdef[[int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);]]
local function set_warp_rows(rows)
    if rows then ffi.C.setenv("NEMO_FLASH_WARP_ROWS", rows, 1) else ffi.C.unsetenv("NEMO_FLASH_WARP_ROWS") end
end

local function run(dt, family)
    if block.norm1.linear.weight.dtype ~= dt then block:to{dtype = dt} end
    local hs = randn({1, NI, D}, dt):requires_grad_(true)
    local ehs = randn({1, NT, D}, dt):requires_grad_(true)
    local temb = randn({1, D}, dt)
    collectgarbage(); collectgarbage()
    sync()
    nemo.reset_peak_memory_stats(dev)
    local base = nemo.memory_stats(dev).current
    local times = {}
    -- kernels not run: steps cost milliseconds, so run enough for LuaJIT's traces to settle
    local noexec = os.getenv("NEMO_EMU_CUDA_NOEXEC") == "1"
    local nsteps = noexec and math.max(opts.steps, 300) or opts.steps
    for s = 1, nsteps + 1 do
        sync()
        local t0 = clock()
        local eo, ho = block(hs, ehs, temb, rope)
        local loss = F.add(ho:float():square():mean(), eo:float():square():mean())
        loss:backward()
        sync()
        if s > 1 then times[#times + 1] = clock() - t0 end   -- the first step warms up caches and cuBLAS
        block:zero_grad(); hs.grad = nil; ehs.grad = nil
    end
    local pk = nemo.memory_stats(dev).peak - base
    local t = median(times)
    local tf = FLOPS / t / 1e12
    local ref_kind = dt == "bfloat16" and "bf16" or "f32"
    local vs = {}
    if peak[ref_kind] then
        vs[#vs + 1] = string.format("%.0f%% of cuBLAS %s %s TFLOP/s", 100 * tf / peak[ref_kind],
            dt == "bfloat16" and "bf16" or "f32 (no TF32)", fmt(peak[ref_kind]))
    end
    if dt == "float32" and peak.bf16 then
        vs[#vs + 1] = string.format("%.0f%% of cuBLAS bf16 %s", 100 * tf / peak.bf16, fmt(peak.bf16))
    end
    if peak["nemo_" .. dt] then
        vs[#vs + 1] = string.format("%.0f%% of nemo's own %s linear %s", 100 * tf / peak["nemo_" .. dt], dt,
            fmt(peak["nemo_" .. dt]))
    end
    if noexec then
        local first = {}
        for k = 1, math.min(5, #times) do first[k] = times[k] end
        bench(string.format("host cost of a FLUX.1-dev double block fwd+bwd %s (CUDA emulator, kernels not run): %.1f " ..
            "ms/step (median of %d; %.1f over the first %d, while LuaJIT compiles); the model FLOPs at 60%% of an " ..
            "H200's ~700 bf16 TFLOP/s would take %.1f ms", dt, t * 1e3, #times, median(first) * 1e3, #first,
            FLOPS / (0.6 * 700e12) * 1e3))
        hs:free(); ehs:free(); temb:free()
        return
    end
    bench(string.format("FLUX.1-dev double block fwd+bwd %s%s on %s: %.1f ms/step (median of %d), %.1f TFLOP/s = %s; " ..
        "peak %.2f GiB above the weights%s", dt, family and " (" .. family .. "-row flash kernels)" or "", dev, t * 1e3,
        #times, tf, table.concat(vs, ", "), pk / 2 ^ 30,
        dt == "bfloat16" and " (issue #6 goal: >= 60% of the cuBLAS bf16 rate)" or ""))
    hs:free(); ehs:free(); temb:free()
end

local ok, err = pcall(setup)
if not ok then
    bench(string.format("FLUX.1-dev double block on %s: setup failed: %s", dev, tostring(err)))
else
    for _, c in ipairs {{"float32"}, {"bfloat16", "32"}, {"bfloat16", "16"}} do
        local dt = c[1]
        set_warp_rows(c[2])
        local rok, rerr = pcall(run, dt, c[2])
        if not rok then bench(string.format("FLUX.1-dev double block fwd+bwd %s on %s: failed: %s", dt, dev, tostring(rerr))) end
    end
    set_warp_rows(nil)
end
print(string.format("# gpu_block done in %.1f s", clock() - t_start))
