-- bench/flux_step.lua: seconds per FLUX training step on the CPU, beside the PyTorch anchors of
-- ../shared/notes/anchors.md (diffusers + torch 1.13, 2 threads, tuned environment).
--   nemo-lua bench/flux_step.lua [small] [medium] [dev_block] [--ckpt on|off|both] [--steps N]
--                                [--warmup N] [--threads N] [--quick] [--dtype float32|bfloat16]
-- A step is what the anchors timed: out = model{...}; loss = F.mse_loss(out, target);
-- loss:backward(); AdamW(lr 1e-4, weight_decay 0.01):step(); zero_grad (set to none); then one
-- full collection of the Lua garbage (the training loop's once-per-iteration collection), timed
-- as part of the step. float32, diffusers' random init after manual_seed(0), inputs that do not
-- require grad. The configurations reproduce the anchors' parameter counts and forward FLOPs:
--   small      D 256 (4 heads x 64), 2 double + 4 single blocks, in 64, joint 512, pooled 256,
--              guidance, batch 2, 256 image + 64 text tokens            (9,369,152 parameters)
--   medium     D 768 (12 x 64), 2 + 4 blocks, in 64, joint 1024, pooled 768, guidance, batch 1,
--              1024 + 128 tokens                                         (82,762,304 parameters)
--   dev_block  FLUX.1-dev width: D 3072 (24 x 128), 1 + 1 blocks, in 64, joint 4096, pooled 768,
--              guidance, batch 1, 256 + 64 tokens                        (545,548,096 parameters)
-- Memory: "peak MiB" is nemo.memory_stats().peak over the timed steps (bytes held by tensors,
-- after nemo.reset_peak_memory_stats()); "RSS GiB" is the process's peak resident set (VmHWM),
-- the figure the anchors report (theirs includes about 0.26 GiB of Python, torch and diffusers).
-- "other" is the CPU the rest of the machine used meanwhile (cores, from /proc/stat minus this
-- process): on a shared 2-core machine a row with other > 0.1 is disturbed, as in the anchors;
-- "min" is then the better guide.
local ffi = require "ffi"
local nemo = require "nemo"
local flux = require "nemo.models.flux"
local F = nemo.F

ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } flux_bench_timespec;
int clock_gettime(int clk, flux_bench_timespec *ts);
]]
local ts = ffi.new("flux_bench_timespec")
local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end

-- ==== configurations and anchors ====

local CONFIGS = {
    small = {
        config = {in_channels = 64, num_layers = 2, num_single_layers = 4, attention_head_dim = 64,
                  num_attention_heads = 4, joint_attention_dim = 512, pooled_projection_dim = 256,
                  guidance_embeds = true, axes_dims_rope = {8, 28, 28}},
        batch = 2, img = 256, txt = 64, params = 9369152,
        anchor = {off = {s = 0.250, fwd = 0.088, bwd = 0.136, opt = 0.025, rss = 0.63},
                  on = {s = 0.337, fwd = 0.087, bwd = 0.225, opt = 0.024, rss = 0.54}},
    },
    medium = {
        config = {in_channels = 64, num_layers = 2, num_single_layers = 4, attention_head_dim = 64,
                  num_attention_heads = 12, joint_attention_dim = 1024, pooled_projection_dim = 768,
                  guidance_embeds = true, axes_dims_rope = {8, 28, 28}},
        batch = 1, img = 1024, txt = 128, params = 82762304,
        anchor = {off = {s = 2.885, fwd = 0.933, bwd = 1.838, opt = 0.148, rss = 3.25},
                  on = {s = 4.019, fwd = 0.953, bwd = 2.948, opt = 0.145, rss = 3.09}},
    },
    dev_block = {
        config = {in_channels = 64, num_layers = 1, num_single_layers = 1, attention_head_dim = 128,
                  num_attention_heads = 24, joint_attention_dim = 4096, pooled_projection_dim = 768,
                  guidance_embeds = true, axes_dims_rope = {16, 56, 56}},
        batch = 1, img = 256, txt = 64, params = 545548096,
        anchor = {off = {s = 3.724, fwd = 0.976, bwd = 1.860, opt = 0.962, rss = 9.53},
                  on = {s = 4.642, fwd = 0.999, bwd = 2.857, opt = 0.826, rss = 9.40}},
    },
}
local ORDER = {"small", "medium", "dev_block"}

-- ==== arguments ====

local names, ckpt_modes, steps, warmup, dtype = {}, {false, true}, 10, 2, "float32"
local i = 1
local argv = arg or {}
while i <= #argv do
    local a = argv[i]
    if a == "--ckpt" then
        local v = argv[i + 1]
        ckpt_modes = v == "on" and {true} or v == "off" and {false} or v == "both" and {false, true} or
            error("--ckpt takes on, off or both, got " .. tostring(v))
        i = i + 1
    elseif a == "--steps" then steps = tonumber(argv[i + 1]); i = i + 1
    elseif a == "--warmup" then warmup = tonumber(argv[i + 1]); i = i + 1
    elseif a == "--threads" then nemo.set_num_threads(tonumber(argv[i + 1])); i = i + 1
    elseif a == "--quick" then steps, warmup = 3, 1
    elseif a == "--dtype" then
        dtype = argv[i + 1]
        if dtype ~= "float32" and dtype ~= "bfloat16" then error("--dtype takes float32 or bfloat16, got " .. tostring(dtype)) end
        i = i + 1
    elseif CONFIGS[a] then names[#names + 1] = a
    else error("flux_step: unknown argument '" .. tostring(a) .. "' (configs: small, medium, dev_block; " ..
        "--ckpt on|off|both, --steps N, --warmup N, --threads N, --quick, --dtype float32|bfloat16)") end
    i = i + 1
end
if #names == 0 then names = ORDER end
if not F.mse_loss then error("flux_step: F.mse_loss is not available yet (the reduce op family has not landed)") end

-- ==== helpers ====

local function peak_rss_gib()
    local f = io.open("/proc/self/status", "r")
    if not f then return nil end
    local text = f:read("*a")
    f:close()
    local kb = text:match("VmHWM:%s*(%d+)")
    return kb and tonumber(kb) / 2^20 or nil
end

-- CPU seconds used by the whole machine and by this process so far (Linux; nil elsewhere).
local function cpu_seconds()
    local f = io.open("/proc/stat", "r")
    if not f then return nil end
    local line = f:read("*l")
    f:close()
    local v = {}
    for x in line:gmatch("%d+") do v[#v + 1] = tonumber(x) end
    -- user nice system idle iowait irq softirq steal: busy = all but idle and iowait
    local busy = v[1] + v[2] + v[3] + v[6] + v[7]
    local g = io.open("/proc/self/stat", "r")
    if not g then return nil end
    local st = g:read("*a")
    g:close()
    local rest = st:match("%) (.*)$")
    local fields = {}
    for x in rest:gmatch("%S+") do fields[#fields + 1] = x end
    local self_t = tonumber(fields[12]) + tonumber(fields[13])   -- utime + stime (fields 14, 15)
    return busy / 100, self_t / 100
end

local function median(t)
    local s = {}
    for k, v in ipairs(t) do s[k] = v end
    table.sort(s)
    local n = #s
    if n % 2 == 1 then return s[(n + 1) / 2] end
    return (s[n / 2] + s[n / 2 + 1]) / 2
end

local function inputs(c)
    local g = nemo.Generator(1234)
    local cfg = c.config
    local side = math.floor(math.sqrt(c.img))
    local ids = nemo.zeros(c.img, 3)
    for r = 0, c.img - 1 do ids[{r, 1}] = math.floor(r / side); ids[{r, 2}] = r % side end
    return {
        hidden_states = nemo.randn({c.batch, c.img, cfg.in_channels}, {generator = g}),
        encoder_hidden_states = nemo.randn({c.batch, c.txt, cfg.joint_attention_dim}, {generator = g}),
        pooled_projections = nemo.randn({c.batch, cfg.pooled_projection_dim}, {generator = g}),
        timestep = nemo.rand({c.batch}, {generator = g}),
        guidance = nemo.full({c.batch}, 3.5),
        img_ids = ids,
        txt_ids = nemo.zeros(c.txt, 3),
    }, nemo.randn({c.batch, c.img, cfg.in_channels}, {generator = g})
end

local function make_optimizer(model)
    if nemo.optim and nemo.optim.AdamW then
        return nemo.optim.AdamW(model:parameters(), {lr = 1e-4, weight_decay = 0.01}), "AdamW"
    end
    local params = model:parameters()
    local opt = {}
    function opt.step()
        nemo.no_grad(function()
            for _, p in ipairs(params) do if p.grad then p:sub_(p.grad, {alpha = 1e-4}) end end
        end)
    end
    function opt.zero_grad() model:zero_grad() end
    return opt, "p -= lr*g"
end

-- ==== run ====

local function run(name, ckpt)
    local c = CONFIGS[name]
    nemo.manual_seed(0)
    local model = flux.FluxTransformer2DModel(c.config)
    local nparams = model:num_parameters()
    if ckpt then model:enable_gradient_checkpointing() end
    local args, target = inputs(c)
    if dtype ~= "float32" then   -- the whole model and every float input in dtype (a bf16 finetune)
        model:to{dtype = dtype}
        for k, v in pairs(args) do if k ~= "img_ids" and k ~= "txt_ids" then args[k] = v:to{dtype = dtype} end end
        target = target:to{dtype = dtype}
    end
    local opt, opt_name = make_optimizer(model)
    local fwd, bwd, upd, tot = {}, {}, {}, {}
    local loss0
    local busy0, self0, wall0
    collectgarbage()
    for s = 1, warmup + steps do
        if s == warmup + 1 then
            nemo.reset_peak_memory_stats()
            busy0, self0 = cpu_seconds()
            wall0 = now()
        end
        local t0 = now()
        local out = model(args)
        local loss = F.mse_loss(out, target)
        local t1 = now()
        loss:backward()
        local t2 = now()
        opt:step()
        opt:zero_grad()
        loss0 = loss0 or loss:item()
        out, loss = nil, nil
        collectgarbage()
        local t3 = now()
        if s > warmup then
            fwd[#fwd + 1], bwd[#bwd + 1], upd[#upd + 1], tot[#tot + 1] = t1 - t0, t2 - t1, t3 - t2, t3 - t0
        end
    end
    local peak = nemo.memory_stats().peak
    local other
    if busy0 then
        local busy1, self1 = cpu_seconds()
        other = math.max(0, ((busy1 - busy0) - (self1 - self0)) / (now() - wall0))
    end
    model, opt = nil, nil
    collectgarbage()
    return {name = name, ckpt = ckpt, params = nparams, s = median(tot), min = math.min(unpack(tot)),
            max = math.max(unpack(tot)), fwd = median(fwd), bwd = median(bwd), opt = median(upd),
            peak = peak, rss = peak_rss_gib(), tokens = c.batch * (c.img + c.txt), opt_name = opt_name,
            expected_params = c.params, loss = loss0, other = other}
end

print(string.format("nemo %s, %d threads, %d timed steps after %d warm-up, %s, CPU", nemo.version,
    nemo.get_num_threads(), steps, warmup, dtype))
if dtype ~= "float32" then print("(the torch columns are the float32 anchors: torch was not measured in " .. dtype .. ")") end
print("PyTorch anchors: diffusers 58eb52c0 + torch 1.13, 2 threads, tuned (../shared/notes/anchors.md)")
print()
local W = {10, 4, 12, 9, 9, 9, 9, 8, 10, 9, 9, 9, 9, 9, 9, 7}
local function row(cols)
    local parts = {}
    for k, v in ipairs(cols) do parts[k] = string.format("%" .. W[k] .. "s", tostring(v)) end
    print(table.concat(parts, " "))
end
row({"config", "ckpt", "params", "s/step", "min", "max", "fwd", "bwd", "optim", "tok/s", "peak MiB", "RSS GiB",
     "torch s", "torch RSS", "speedup", "other"})
for _, name in ipairs(names) do
    for _, ckpt in ipairs(ckpt_modes) do
        local r = run(name, ckpt)
        local a = CONFIGS[name].anchor[ckpt and "on" or "off"]
        if r.params ~= r.expected_params then
            io.stderr:write(string.format("warning: %s has %d parameters, the anchor %d\n", name, r.params,
                r.expected_params))
        end
        row({name, ckpt and "on" or "off", r.params, string.format("%.3f", r.s), string.format("%.3f", r.min),
             string.format("%.3f", r.max), string.format("%.3f", r.fwd), string.format("%.3f", r.bwd),
             string.format("%.3f", r.opt), string.format("%.0f", r.tokens / r.s),
             string.format("%.0f", r.peak / 2^20), r.rss and string.format("%.2f", r.rss) or "?",
             string.format("%.3f", a.s), string.format("%.2f", a.rss), string.format("%.2fx", a.s / r.s),
             r.other and string.format("%.2f", r.other) or "?"})
        io.stdout:flush()
    end
end
print()
print("fwd includes the loss; optim is the " .. (nemo.optim and nemo.optim.AdamW and "AdamW step" or "p -= lr*g update") ..
    " + zero_grad + one Lua collection. RSS is the process's peak so far (it only grows across rows).")
print("other: cores the rest of the machine used during the timed steps (> 0.1: disturbed; trust min more).")
print("torch anchor phases (fwd/bwd/adamw, s): small 0.088/0.136/0.025 (ckpt 0.087/0.225/0.024), " ..
    "medium 0.933/1.838/0.148 (0.953/2.948/0.145), dev_block 0.976/1.860/0.962 (0.999/2.857/0.826)")
