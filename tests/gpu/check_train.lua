-- tests/gpu/check_train.lua: FLUX training steps on a CUDA device against the same steps on the
-- CPU (run by tests/gpu/run.sh; TAP).
--
--   1. A small FLUX (1 double + 2 single blocks, 4 heads x 32, guidance) built on the device from
--      the seed has bitwise the CPU-built parameters (the Philox draws are device-neutral).
--   2. Five steps (forward, mse loss, backward, clip_grad_norm_ 1.0, AdamW lr 1e-3) on the device
--      and on the CPU from the same seed and data: the step-1 gradient norms within 1e-5
--      relative; every loss within 1e-4 relative; the loss falls; parameters and optimizer state
--      stay on the device. Why 1e-4: step 1 differs only by float32 summation order (~1e-6); each
--      AdamW step then moves a parameter by about lr * sign(g), so a gradient within float32 noise
--      of zero can move the two runs' copies up to 2 lr apart; such parameters barely affect the
--      loss (their gradient is ~0), which keeps five-step losses ~1e-5 apart; 1e-4 leaves a margin
--      and still fails on a wrong kernel (O(1)) or TF32 / bf16 products (1e-3 .. 1e-2).
--   3. Determinism on the device: the same five steps again give bitwise the same losses and
--      parameters (the CUDA kernels use no floating-point atomics).
--   4. Gradient checkpointing on the device: loss and every gradient within 1e-6 of the run
--      without it, reported as bitwise or not (the recomputation runs the same kernels on the same
--      inputs; only a differently aligned view could make cuBLAS choose another algorithm).
--   5. bfloat16 on the device: (a) the model in bf16: one step with a finite loss within 5e-2
--      relative of float32's and finite gradients; (b) FSDP2's mixed precision (bf16 compute,
--      float32 master weights and reduction) on one process: three steps with finite losses
--      within 2e-2 of the float32 device run (bf16 rounds activations to 8 bits: ~4e-3 each).
--   6. The recipe: `nemo-lua recipes/flux_finetune.lua --device cuda:0` (the shipped demo config,
--      3 steps) as a separate process exits 0 with 3 finite losses in metrics.jsonl and the final
--      diffusers export; the same command with --device cpu gives losses within 1e-4 relative.
-- Without a usable CUDA device: a SKIP plan and exit 0 (a "Bail out!" and exit 1 when
-- NEMO_EXPECT_CUDA=1, as run.sh sets). NEMO_GPU_DEVICE=cpu runs the script with "cpu" as the
-- device (a dry run of the script itself).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/?.lua;" .. here .. "/../lua/?.lua;" .. package.path
local T = require "tap"
local ffi = require "ffi"
local nemo = require "nemo"
local F = nemo.F
local C = require("nemo.ffi").C
local json = require "nemo.json"

local DEV, ON_CUDA = require("gpu_device")(nemo)
local ROOT = here .. "/../.."
local flux = require "nemo.models.flux"
local Flux = flux.FluxTransformer2DModel

-- ==== helpers ====

local function host(t) return t:detach():to{device = "cpu"} end
local bitwise = T.same_bits
local function rel(a, ref)
    local x, r = host(a):double():reshape{-1}, host(ref):double():reshape{-1}
    local d, m = (x - r):abs():max():item(), r:abs():max():item()
    if d ~= d then return math.huge end
    return m > 0 and d / m or d
end
local function finite(v) return v == v and math.abs(v) ~= math.huge end
local function guarded(label, fn, ...)
    local ok, err = pcall(fn, ...)
    if not ok then T.ok(false, label .. ": raised an error", tostring(err)) end
end
local function sync() if ON_CUDA then nemo.cuda.synchronize(DEV) end end

-- ==== the model and data ====

local CFG = {in_channels = 64, num_layers = 1, num_single_layers = 2, attention_head_dim = 32, num_attention_heads = 4,
             joint_attention_dim = 128, pooled_projection_dim = 64, guidance_embeds = true, axes_dims_rope = {8, 12, 12}}
local B, IMG, TXT, STEPS = 2, 64, 16, 5
local data
do
    local g = nemo.Generator(3)
    data = {x = nemo.randn({B, IMG, 64}, {generator = g}), e = nemo.randn({B, TXT, 128}, {generator = g}),
            p = nemo.randn({B, 64}, {generator = g}), t = nemo.rand({B}, {generator = g}),
            y = nemo.randn({B, IMG, 64}, {generator = g})}
    local ids = nemo.zeros(IMG, 3)
    for r = 0, IMG - 1 do ids[{r, 1}] = math.floor(r / 8); ids[{r, 2}] = r % 8 end
    data.ids = ids
end
local function args_on(dev, dtype)
    local function d(t) return t:to{device = dev, dtype = dtype or t.dtype} end
    return {hidden_states = d(data.x), encoder_hidden_states = d(data.e), pooled_projections = d(data.p),
            timestep = d(data.t), guidance = d(nemo.full({B}, 3.5)), img_ids = d(data.ids), txt_ids = d(nemo.zeros(TXT, 3))}
end
local function new_model(dev, dtype)
    nemo.manual_seed(0)
    return Flux(CFG):to{device = dev, dtype = dtype}
end

-- n optimizer steps; returns losses, step-1 gradient norm, model, optimizer
local function train(dev, n, opts)
    opts = opts or {}
    local model = new_model(dev, opts.dtype)
    if opts.checkpointing then model:enable_gradient_checkpointing() end
    local params, mgr = model:parameters(), nil
    if opts.wrap then mgr = opts.wrap(model); params = mgr:parameters() end
    local opt = nemo.optim.AdamW(params, {lr = 1e-3})
    local args, y = args_on(dev, opts.dtype), data.y:to{device = dev}
    local losses, norm1 = {}, nil
    for s = 1, n do
        opt:zero_grad()
        local loss = F.mse_loss(model(args):float(), y)
        loss:backward()
        if mgr then mgr:finish_gradient_synchronization() end
        local norm = mgr and mgr:clip_grad_norm_(1.0) or nemo.optim.clip_grad_norm_(params, 1.0)
        norm1 = norm1 or norm
        opt:step()
        losses[s] = loss:item()
    end
    sync()
    return losses, norm1, model, opt
end

-- ==== 1. initialisation on the device ====

guarded("init on " .. DEV, function()
    nemo.manual_seed(0)
    local on_dev = Flux(CFG, {device = DEV})
    local on_cpu = new_model("cpu")
    local sd_cpu, keys = on_cpu:state_dict()
    local sd_dev = on_dev:state_dict()
    local bad, misplaced = {}, 0
    for _, k in ipairs(keys) do
        if sd_dev[k].device ~= DEV then misplaced = misplaced + 1 end
        if not bitwise(sd_dev[k], sd_cpu[k]) then bad[#bad + 1] = k end
    end
    T.ok(#bad == 0 and misplaced == 0, string.format("a FLUX built on %s from the seed has the CPU-built parameters " ..
        "bit for bit (%d tensors, %d differ, %d not on the device)", DEV, #keys, #bad, misplaced), table.concat(bad, "\n"))
end)

-- ==== 2. device against CPU ====

local cpu_losses, cpu_norm, cpu_model = train("cpu", STEPS)
local dev_losses, dev_norm, dev_model, dev_opt
guarded("training on " .. DEV, function()
    dev_losses, dev_norm, dev_model, dev_opt = train(DEV, STEPS)
    local nr = math.abs(dev_norm - cpu_norm) / cpu_norm
    T.ok(nr <= 1e-5, string.format("step 1 gradient norm on %s %.9g vs the CPU's %.9g within 1e-5 (rel %.2e)", DEV,
        dev_norm, cpu_norm, nr))
    local worst, at = 0, 1
    for s = 1, STEPS do
        local r = math.abs(dev_losses[s] - cpu_losses[s]) / math.abs(cpu_losses[s])
        if not (r <= worst) then worst, at = r, s end
    end
    T.ok(worst <= 1e-4, string.format("%d AdamW steps on %s: every loss within 1e-4 of the CPU's (worst rel %.2e at " ..
        "step %d)", STEPS, DEV, worst, at), "device: " .. table.concat(dev_losses, ", ") .. "\ncpu:    " ..
        table.concat(cpu_losses, ", "))
    T.ok(dev_losses[STEPS] < 0.95 * dev_losses[1], string.format("the loss falls on %s: %.5f -> %.5f (by > 5%%)", DEV,
        dev_losses[1], dev_losses[STEPS]))
    local misplaced, pworst, pname = 0, 0, "-"
    local sd_cpu = cpu_model:state_dict()
    for name, p in dev_model:named_parameters() do
        local st = dev_opt.state[p]
        if p.device ~= DEV or (p.grad and p.grad.device ~= DEV) or not st or st.exp_avg.device ~= DEV or
            st.exp_avg_sq.device ~= DEV then misplaced = misplaced + 1 end
        local r = rel(p, sd_cpu[name])
        if r > pworst then pworst, pname = r, name end
    end
    T.ok(misplaced == 0, string.format("parameters, gradients and AdamW state all stay on %s (%d misplaced)", DEV,
        misplaced))
    T.diag(string.format("after %d steps the parameters differ from the CPU's by at most %.2e relative (%s)", STEPS,
        pworst, pname))
end)

-- ==== 3. determinism ====

guarded("determinism on " .. DEV, function()
    if not dev_losses then error("the device run above failed") end
    local again, _, model2 = train(DEV, STEPS)
    local same = true
    for s = 1, STEPS do same = same and again[s] == dev_losses[s] end
    local sd1, keys = dev_model:state_dict()
    local sd2 = model2:state_dict()
    local differ = 0
    for _, k in ipairs(keys) do if not bitwise(sd1[k], sd2[k]) then differ = differ + 1 end end
    T.ok(same and differ == 0, string.format("the same %d steps again on %s: bitwise equal losses and parameters " ..
        "(%d of %d tensors differ)", STEPS, DEV, differ, #keys))
end)

-- ==== 4. gradient checkpointing ====

guarded("gradient checkpointing on " .. DEV, function()
    local function grads(ckpt)
        local model = new_model(DEV)
        if ckpt then model:enable_gradient_checkpointing() end
        local loss = F.mse_loss(model(args_on(DEV)), data.y:to{device = DEV})
        loss:backward()
        local g = {}
        for name, p in model:named_parameters() do g[name] = p.grad end
        return loss, g
    end
    local l0, g0 = grads(false)
    local l1, g1 = grads(true)
    local differ, n, worst = 0, 0, rel(l1, l0)
    for name, g in pairs(g0) do
        n = n + 1
        if not (g1[name] and bitwise(g, g1[name])) then
            differ = differ + 1
            worst = math.max(worst, g1[name] and rel(g1[name], g) or math.huge)
        end
    end
    -- bitwise is what the design gives (and the CPU shows); the checkpoint hands the next block
    -- views at other offsets of one buffer, so cuBLAS may pick another algorithm for a
    -- differently aligned operand: allowed up to 1e-6, reported
    T.ok(n > 0 and worst <= 1e-6, string.format("gradient checkpointing on %s: the loss and all %d gradients within " ..
        "1e-6 of the run without it (%s)", DEV, n, (differ == 0 and bitwise(l0, l1)) and "bitwise equal" or
        string.format("%d tensors differ, worst rel %.2e", differ, worst)))
end)

-- ==== 5. bfloat16 ====

guarded("bf16 model on " .. DEV, function()
    local model = new_model(DEV, "bfloat16")
    local loss = F.mse_loss(model(args_on(DEV, "bfloat16")):float(), data.y:to{device = DEV})
    loss:backward()
    local lv, ref = loss:item(), cpu_losses[1]
    local bad = 0
    for _, p in ipairs(model:parameters()) do
        if not p.grad or p.grad.dtype ~= "bfloat16" or not finite(p.grad:float():abs():max():item()) then bad = bad + 1 end
    end
    local r = math.abs(lv - ref) / math.abs(ref)
    T.ok(finite(lv) and r <= 5e-2 and bad == 0, string.format("the model in bfloat16 on %s: loss %.5f within 5e-2 of " ..
        "float32's %.5f (rel %.2e), every gradient bf16 and finite (%d not)", DEV, lv, ref, r, bad))
end)

guarded("FSDP2 mixed precision on " .. DEV, function()
    if not dev_losses then error("the float32 device run above failed") end
    local dist = require "nemo.dist"
    if not dist.is_initialized() then dist.init_process_group{backend = "self"} end
    local mixed = train(DEV, 3, {wrap = function(model)
        local m = require("nemo.parallel")._create_parallel_manager{mp_policy = {param_dtype = "bfloat16"}}
        m:parallelize(model)
        return m
    end})
    local worst, ok = 0, true
    for s = 1, 3 do
        if not finite(mixed[s]) then ok = false end
        worst = math.max(worst, math.abs(mixed[s] - dev_losses[s]) / math.abs(dev_losses[s]))
    end
    T.ok(ok and worst <= 2e-2, string.format("FSDP2 mixed precision (bf16 compute, float32 master weights) on %s: 3 " ..
        "finite losses within 2e-2 of the float32 run (worst rel %.2e)", DEV, worst))
end)

-- ==== 6. the recipe as a separate process ====

local function launcher()
    local f = io.open(ROOT .. "/nemo-lua", "rb")
    if f then f:close(); return "'" .. ROOT .. "/nemo-lua'" end
    return string.format("env NEMO_LIB='%s/build/libnemo.so' LUA_PATH='%s/lua/?.lua;%s/lua/?/init.lua;;' luajit",
        ROOT, ROOT, ROOT)
end

local sh = T.sh

local function metrics(path)
    local out = {}
    local f = io.open(path, "r")
    if not f then return out end
    for line in f:lines() do out[#out + 1] = json.decode(line) end
    f:close()
    return out
end

guarded("recipe on " .. DEV, function()
    local tmp = os.tmpname()
    os.remove(tmp)
    local function run(dev)
        local ck = tmp .. "/" .. dev:gsub(":", "_")
        local out, rc = sh(string.format("cd '%s' && %s recipes/flux_finetune.lua --device %s " ..
            "--step_scheduler.max_steps 3 --demo.dir '%s/demo' --checkpoint.checkpoint_dir '%s' --logging.progress false",
            ROOT, launcher(), dev, tmp, ck))
        local m = metrics(ck .. "/metrics.jsonl")
        local latest = io.open(ck .. "/LATEST", "r")
        local exported = false
        if latest then
            local name = latest:read("*l")
            latest:close()
            local f = name and io.open(ck .. "/" .. name .. "/diffusers/model_index.json", "r")
            if f then f:close(); exported = true end
        end
        return rc, m, exported, out
    end
    local t0 = require("nemo.dist").wtime()
    local rc, m, exported, out = run(DEV)
    local secs = require("nemo.dist").wtime() - t0
    local losses, all_finite = {}, #m == 3
    for i, r in ipairs(m) do losses[i] = r.loss; all_finite = all_finite and finite(r.loss) end
    T.ok(rc == 0 and all_finite and exported, string.format("recipes/flux_finetune.lua --device %s: exits %s, %d steps " ..
        "with finite losses (%s), diffusers export written (%.1f s)", DEV, tostring(rc), #m,
        table.concat(losses, ", "), secs), out)
    if DEV ~= "cpu" then
        local crc, cm, _, cout = run("cpu")
        local worst = (crc == 0 and #cm == 3 and #m == 3) and 0 or math.huge
        for i = 1, math.min(#cm, #m) do
            worst = math.max(worst, math.abs(m[i].loss - cm[i].loss) / math.abs(cm[i].loss))
        end
        T.ok(worst <= 1e-4, string.format("the same recipe with --device cpu: losses within 1e-4 of the device's " ..
            "(worst rel %.2e)", worst), crc ~= 0 and cout or nil)
    end
    os.execute("rm -rf '" .. tmp .. "'")
end)

T.done()
