-- bench/gpu_block.lua: issue #6's goal benchmark on a GPU. A FLUX.1-dev-shaped double block
-- (D 3072, 24 heads x 128, 4096 image + 512 text tokens, batch 1) forward + backward, timed on
-- cuda:0 in float32 and bfloat16, as TFLOP/s and as a fraction of a large square matmul's rate
-- measured in the same run in the same dtype; peak memory; and matmul TFLOP/s against size.
--   nemo-lua bench/gpu_block.lua [--device cuda:0] [--steps N] [--small]
-- --small (and --device cpu) shrink everything for a dry run of the script on a CPU. Without a
-- usable GPU it prints one line saying so and exits 0. Prints numbers; asserts nothing.
--
-- FLOPs counted (multiply-add = 2): per token of each stream 2 x 12 D^2 for q/k/v/out and the
-- 4x MLP, attention 4 N^2 D over the joint sequence N; backward = 2 x forward.
local nemo = require "nemo"
local F = nemo.F

local opts = {device = "cuda:0", steps = 5, small = false}
local argv = arg or {}
local i = 1
while i <= #argv do
    local a = argv[i]
    if a == "--device" then opts.device = argv[i + 1]; i = i + 1
    elseif a == "--steps" then opts.steps = tonumber(argv[i + 1]); i = i + 1
    elseif a == "--small" then opts.small = true
    else error("gpu_block: unknown argument '" .. tostring(a) .. "' (--device D, --steps N, --small)", 0) end
    i = i + 1
end
local dev = opts.device
local on_gpu = dev:match("^cuda") ~= nil
if on_gpu and not (nemo.cuda and nemo.cuda.is_available()) then
    print("gpu_block: no CUDA device (" .. tostring(nemo.cuda and nemo.cuda.unavailable_reason() or "no plugin") ..
          "); nothing measured")
    os.exit(0)
end

local function sync() if on_gpu then nemo.cuda.synchronize(dev) end end
local clock = require("nemo.dist").wtime
local function median(t)
    local s = {}
    for k, v in ipairs(t) do s[k] = v end
    table.sort(s)
    return s[math.floor((#s + 1) / 2)]
end

local D, H, HD, NI, NT = 3072, 24, 128, 4096, 512
if opts.small then D, H, HD, NI, NT = 128, 2, 64, 64, 16 end
print(string.format("gpu_block on %s: D %d (%d x %d), %d image + %d text tokens, %d timed steps", dev, D, H, HD, NI,
    NT, opts.steps))

-- ==== matmul rate ====
local rates = {}
for _, dt in ipairs {"float32", "bfloat16"} do
    for _, n in ipairs(opts.small and {64, 128} or {1024, 2048, 4096, 8192}) do
        local ok, err = pcall(function()
            local a = nemo.randn({n, n}):to{dtype = dt, device = dev}
            local b = nemo.randn({n, n}):to{dtype = dt, device = dev}
            local c = a:matmul(b)
            sync()
            local reps = opts.small and 3 or math.max(3, math.floor(2 ^ 33 / n ^ 3))
            local t0 = clock()
            for _ = 1, reps do c:free(); c = a:matmul(b) end
            sync()
            local tf = 2 * n ^ 3 * reps / (clock() - t0) / 1e12
            rates[dt] = math.max(rates[dt] or 0, tf)
            print(string.format("# bench: matmul %s %dx%d on %s: %.1f TFLOP/s", dt, n, n, dev, tf))
        end)
        if not ok then print(string.format("# bench: matmul %s %dx%d on %s: failed: %s", dt, n, n, dev, tostring(err))) end
    end
end

-- ==== the double block ====
local flux = require "nemo.models.flux"
local function run(dt)
    nemo.manual_seed(0)
    local cfg = {in_channels = 64, num_layers = 1, num_single_layers = 0, attention_head_dim = HD,
                 num_attention_heads = H, joint_attention_dim = opts.small and 64 or 4096, pooled_projection_dim = 768,
                 guidance_embeds = true, axes_dims_rope = opts.small and {16, 24, 24} or {16, 56, 56}}
    local model = flux.FluxTransformer2DModel(cfg):to{dtype = dt, device = dev}
    local block = model.transformer_blocks:get(1)
    local o = {dtype = dt}
    local hs = nemo.randn({1, NI, D}):to{dtype = dt, device = dev}:requires_grad_(true)
    local ehs = nemo.randn({1, NT, D}):to{dtype = dt, device = dev}:requires_grad_(true)
    local temb = nemo.randn({1, D}):to{dtype = dt, device = dev}
    local ids = nemo.zeros(NT + NI, 3)
    local side = math.floor(math.sqrt(NI))
    for r = 0, NI - 1 do ids[{NT + r, 1}] = math.floor(r / side); ids[{NT + r, 2}] = r % side end
    local cos, sin = model.pos_embed(ids:to{device = dev})
    local rope = {cos:to(o), sin:to(o)}
    if nemo.cuda and on_gpu then nemo.cuda.reset_peak_memory_stats(dev) end
    local times = {}
    for s = 1, opts.steps + 1 do
        sync()
        local t0 = clock()
        local eo, ho = block(hs, ehs, temb, rope)
        local loss = F.add(ho:float():pow(2):mean(), eo:float():pow(2):mean())
        loss:backward()
        sync()
        if s > 1 then times[#times + 1] = clock() - t0 end
        block:zero_grad(); hs.grad = nil; ehs.grad = nil
    end
    local N = NI + NT
    local flops = 3 * (24 * D * D * N + 4 * N * N * D)
    local t = median(times)
    local tf = flops / t / 1e12
    local peak = on_gpu and nemo.cuda.memory_stats(dev).peak or nemo.memory_stats().peak
    print(string.format("# bench: FLUX.1-dev double block fwd+bwd %s on %s: %.1f ms, %.1f TFLOP/s = %.0f%% of the " ..
        "%s matmul rate (%.1f TFLOP/s), peak %.2f GiB", dt, dev, t * 1e3, tf, 100 * tf / (rates[dt] or 0 / 0), dt,
        rates[dt] or 0 / 0, peak / 2 ^ 30))
end
for _, dt in ipairs {"float32", "bfloat16"} do
    local ok, err = pcall(run, dt)
    if not ok then print(string.format("# bench: FLUX.1-dev double block %s on %s: failed: %s", dt, dev, tostring(err))) end
end
