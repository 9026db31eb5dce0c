-- tests/gpu/check_e2e.lua: a FLUX training step end to end on cuda:0 (run by tests/gpu/run.sh):
--   1. the golden FLUX cases (../shared/golden/flux_tiny, flux_tiny_guidance) with the model and
--      inputs on the GPU: output, loss and every parameter gradient against diffusers' numbers,
--      float32 at 1e-4 relative of each tensor's largest entry (cuBLAS and the CUDA reductions
--      sum in another order than the CPU; no TF32) and float64 at 1e-9;
--   2. five AdamW steps of a small FLUX on cuda:0 against the same on the CPU (same seed and
--      data): losses within 1e-4 relative, and falling;
--   3. the FSDP2 manager on one process with mixed precision (bf16 compute, float32 master
--      weights) on cuda:0: three steps with finite losses within 2e-2 of the float32 GPU run;
--   4. the recipe (recipes/flux_finetune.yaml's demo) with --device cuda:0 for a few steps.
-- TAP. On a machine without a usable GPU it prints a SKIP plan and exits 0.
-- NEMO_E2E_DEVICE=cpu runs the same checks with "cpu" as the device (a dry run of this script).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local F = nemo.F
local json = require "nemo.json"

local DEV = os.getenv("NEMO_E2E_DEVICE") or "cuda:0"
if DEV ~= "cpu" and not (nemo.cuda and nemo.cuda.is_available()) then
    io.write("1..0 # SKIP no CUDA device: ", tostring(nemo.cuda and nemo.cuda.unavailable_reason() or "no plugin"), "\n")
    os.exit(0)
end
local GOLDEN = here .. "/../../../shared/golden"

local function exists(p)
    local f = io.open(p, "rb")
    if f then f:close(); return true end
    return false
end

-- max|a - ref| / max|ref| (on the CPU, float64)
local function rel(a, ref)
    local x = a:detach():to{device = "cpu"}:double()
    local r = ref:detach():to{device = "cpu"}:double()
    local m = r:abs():max():item()
    local d = (x - r):abs():max():item()
    if d ~= d then return math.huge end
    return m > 0 and d / m or d
end

-- ==== 1. golden cases on the GPU ====
local DIFF_INPUTS = {"hidden_states", "encoder_hidden_states", "pooled_projections"}
local function golden(name, dtype, file, tol)
    local dir = GOLDEN .. "/" .. name
    if not exists(dir .. "/config.json") then
        T.skip(name .. " " .. dtype .. " on " .. DEV, "no golden folder at " .. GOLDEN)
        return
    end
    local Flux = require("nemo.models.flux").FluxTransformer2DModel
    local model = Flux.from_pretrained(dir, {torch_dtype = dtype, device = DEV})
    local case = nemo.load_file(dir .. "/" .. file)
    local args = {}
    for k, v in pairs(case) do
        local n = k:match("^input%.(.+)$")
        if n then args[n] = v:to{dtype = dtype, device = DEV, copy = true} end
    end
    for _, k in ipairs(DIFF_INPUTS) do args[k]:requires_grad_(true) end
    local out = model(args)
    local loss = F.mse_loss(out, case.target:to{dtype = dtype, device = DEV})
    loss:backward()
    local worst, wname = rel(out, case.output), "output"
    local lr = math.abs(loss:item() - case.loss:reshape{-1}:tolist()[1]) / math.abs(case.loss:reshape{-1}:tolist()[1])
    if lr > worst then worst, wname = lr, "loss" end
    local _, keys = model:state_dict()
    for _, k in ipairs(keys) do
        local g = model:get_parameter(k).grad
        local ref = case["grad." .. k]
        -- the embedders' first weight sums tiny products of sinusoids; the CPU test allows 2e-3 there
        local scale = k:match("^time_text_embed%.%a+_embedder%.linear_1%.weight$") and 20 or 1
        local r = g and rel(g, ref) / scale or math.huge
        if r > worst then worst, wname = r, "grad." .. k end
    end
    for _, k in ipairs(DIFF_INPUTS) do
        local r = rel(args[k].grad, case["grad_input." .. k])
        if r > worst then worst, wname = r, "grad_input." .. k end
    end
    T.ok(worst <= tol, string.format("%s %s on %s: output, loss, every parameter and input gradient within %g " ..
        "relative of diffusers' (worst %.2e: %s)", name, dtype, DEV, tol, worst, wname))
end
for _, name in ipairs {"flux_tiny", "flux_tiny_guidance"} do
    local ok, err = pcall(golden, name, "float32", "case.safetensors", 1e-4)
    if not ok then T.ok(false, name .. " float32 on " .. DEV .. ": " .. tostring(err)) end
    ok, err = pcall(golden, name, "float64", "case_f64exact.safetensors", 1e-9)
    if not ok then T.ok(false, name .. " float64 on " .. DEV .. ": " .. tostring(err)) end
end

-- ==== 2. training steps, GPU against CPU ====
local flux = require "nemo.models.flux"
local CFG = {in_channels = 64, num_layers = 1, num_single_layers = 2, attention_head_dim = 32, num_attention_heads = 4,
             joint_attention_dim = 128, pooled_projection_dim = 64, guidance_embeds = true, axes_dims_rope = {8, 12, 12}}
local B, IMG, TXT = 2, 64, 16
local g = nemo.Generator(3)
local data = {x = nemo.randn({B, IMG, 64}, {generator = g}), e = nemo.randn({B, TXT, 128}, {generator = g}),
              p = nemo.randn({B, 64}, {generator = g}), t = nemo.rand({B}, {generator = g}),
              y = nemo.randn({B, IMG, 64}, {generator = g})}
local ids = nemo.zeros(IMG, 3)
for r = 0, IMG - 1 do ids[{r, 1}] = math.floor(r / 8); ids[{r, 2}] = r % 8 end
local function args_on(dev)
    local function d(t) return t:to{device = dev} end
    return {hidden_states = d(data.x), encoder_hidden_states = d(data.e), pooled_projections = d(data.p),
            timestep = d(data.t), guidance = d(nemo.full({B}, 3.5)), img_ids = d(ids), txt_ids = d(nemo.zeros(TXT, 3))}
end
local function train(dev, steps, wrap)
    nemo.manual_seed(0)
    local model = flux.FluxTransformer2DModel(CFG):to{device = dev}
    local params, mgr = model:parameters(), nil
    if wrap then mgr = wrap(model); params = mgr:parameters() end
    local opt = nemo.optim.AdamW(params, {lr = 1e-3})
    local args, y, losses = args_on(dev), data.y:to{device = dev}, {}
    for s = 1, steps do
        opt:zero_grad()
        local loss = F.mse_loss(model(args):float(), y)
        loss:backward()
        if mgr then mgr:finish_gradient_synchronization() end
        opt:step()
        losses[s] = loss:item()
    end
    return losses
end
local ok, cpu = pcall(train, "cpu", 5)
local gok, gpu = pcall(train, DEV, 5)
if ok and gok then
    local worst = 0
    for s = 1, 5 do worst = math.max(worst, math.abs(gpu[s] - cpu[s]) / math.abs(cpu[s])) end
    T.ok(worst <= 1e-4 and gpu[5] < gpu[1], string.format("5 AdamW steps of a small FLUX on %s equal the CPU's within " ..
        "1e-4 relative (worst %.2e; loss %.4f -> %.4f)", DEV, worst, gpu[1], gpu[5]))
else
    T.ok(false, "training steps on " .. DEV .. ": " .. tostring(ok and gpu or cpu))
end

-- ==== 3. FSDP2 mixed precision on one process, on the GPU ====
local dist = require "nemo.dist"
local mok, mixed = pcall(function()
    if not dist.is_initialized() then dist.init_process_group{backend = "self"} end
    return train(DEV, 3, function(model)
        local m = require("nemo.parallel")._create_parallel_manager{mp_policy = {param_dtype = "bfloat16"}}
        m:parallelize(model)
        return m
    end)
end)
if mok and gok then
    local worst, finite = 0, true
    for s = 1, 3 do
        if mixed[s] ~= mixed[s] or math.abs(mixed[s]) == math.huge then finite = false end
        worst = math.max(worst, math.abs(mixed[s] - gpu[s]) / math.abs(gpu[s]))
    end
    T.ok(finite and worst <= 2e-2, string.format("FSDP2 mixed precision (bf16 compute, float32 master) on %s: 3 " ..
        "finite losses within 2e-2 of the float32 run (worst %.2e)", DEV, worst))
else
    T.ok(false, "FSDP2 mixed precision on " .. DEV .. ": " .. tostring(mok and gpu or mixed))
end

-- ==== 4. the recipe on the GPU ====
local tmp = os.tmpname()
os.remove(tmp)
local rok, summary = pcall(function()
    local train_m = require "nemo.train"
    local cfg = train_m.load_config(here .. "/../../recipes/flux_finetune.yaml", {
        {key = "step_scheduler.max_steps", text = "5"}, {key = "checkpoint.checkpoint_dir", text = tmp},
        {key = "logging.progress", text = "false"}, {key = "demo.dir", text = tmp .. "-demo"},
        {key = "device", text = DEV}})
    return train_m.run(cfg, {log = function() end})
end)
T.ok(rok and summary and summary.steps == 5 and summary.last_loss == summary.last_loss,
    string.format("recipes/flux_finetune.yaml's demo trains 5 steps with device %s%s", DEV,
        rok and string.format(" (loss %.4f -> %.4f)", summary.first_loss or 0 / 0, summary.last_loss or 0 / 0)
        or (": " .. tostring(summary))))
os.execute("rm -rf '" .. tmp .. "' '" .. tmp .. "-demo'")

T.done()
