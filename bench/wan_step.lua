-- bench/wan_step.lua: seconds per Wan training step on the CPU, beside the PyTorch anchors of
-- ../shared/notes/anchors.md (diffusers + torch 1.13, 2 threads, tuned environment), in the same
-- table as bench/flux_step.lua so the two read side by side.
--   nemo-lua bench/wan_step.lua [small] [block] [--ckpt on|off|both] [--steps N] [--warmup N]
--                               [--threads N] [--quick] [--flux]
-- A step is what the anchors timed: out = model{...}; loss = F.mse_loss(out, target);
-- loss:backward(); AdamW(lr 1e-4, weight_decay 0.01):step(); zero_grad; then one full collection
-- of the Lua garbage (the training loop's once-per-iteration collection), timed as part of the
-- step. float32, random init after manual_seed(0), inputs that do not require grad.
--   small   the anchors' wan_small: D 256 (4 heads x 64), 4 blocks, ffn 1024, in/out 16, text 512,
--           patch (1,2,2), batch 1, latents [1,16,5,16,16] = 320 tokens, 64 text tokens
--           (4,976,960 parameters; forward 2.956 GFLOP of matmuls)
--   block   Wan2.1-1.3B width: D 1536 (12 x 128), 1 block, ffn 8960, text 4096, batch 1,
--           latents [1,16,4,16,16] = 256 tokens, 226 text tokens (no anchor)
-- --flux also runs `bench/flux_step.lua small` afterwards (same options) for the Flux rows.
-- Memory: "peak MiB" is nemo.memory_stats().peak over the timed steps; "RSS GiB" is the process's
-- peak resident set (VmHWM), the figure the anchors report (theirs includes ~0.26 GiB of Python).
local ffi = require "ffi"
local nemo = require "nemo"
local wan = require "nemo.models.wan"
local F = nemo.F

ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } wan_bench_timespec;
int clock_gettime(int clk, wan_bench_timespec *ts);
]]
local ts = ffi.new("wan_bench_timespec")
local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end

-- ==== configurations and anchors ====

local CONFIGS = {
    small = {
        config = {patch_size = {1, 2, 2}, num_attention_heads = 4, attention_head_dim = 64, in_channels = 16,
                  out_channels = 16, text_dim = 512, freq_dim = 256, ffn_dim = 1024, num_layers = 4,
                  rope_max_seq_len = 1024},
        latents = {1, 16, 5, 16, 16}, txt = 64, params = 4976960,
        anchor = {off = {s = 0.145, fwd = 0.045, bwd = 0.083, opt = 0.015, rss = 0.43},
                  on = {s = 0.164, fwd = 0.039, bwd = 0.102, opt = 0.015, rss = 0.41}},
    },
    block = {
        config = {patch_size = {1, 2, 2}, num_attention_heads = 12, attention_head_dim = 128, in_channels = 16,
                  out_channels = 16, text_dim = 4096, freq_dim = 256, ffn_dim = 8960, num_layers = 1,
                  rope_max_seq_len = 1024},
        latents = {1, 16, 4, 16, 16}, txt = 226,
    },
}
local ORDER = {"small", "block"}

-- ==== arguments ====

local names, ckpt_modes, steps, warmup, with_flux = {}, {false, true}, 10, 2, false
local passthrough = {}
local i = 1
local argv = arg or {}
while i <= #argv do
    local a = argv[i]
    if a == "--ckpt" then
        local v = argv[i + 1]
        ckpt_modes = v == "on" and {true} or v == "off" and {false} or v == "both" and {false, true} or
            error("--ckpt takes on, off or both, got " .. tostring(v))
        passthrough[#passthrough + 1] = a .. " " .. v
        i = i + 1
    elseif a == "--steps" then steps = tonumber(argv[i + 1]); passthrough[#passthrough + 1] = a .. " " .. argv[i + 1]; i = i + 1
    elseif a == "--warmup" then warmup = tonumber(argv[i + 1]); passthrough[#passthrough + 1] = a .. " " .. argv[i + 1]; i = i + 1
    elseif a == "--threads" then
        nemo.set_num_threads(tonumber(argv[i + 1]))
        passthrough[#passthrough + 1] = a .. " " .. argv[i + 1]
        i = i + 1
    elseif a == "--quick" then steps, warmup = 3, 1; passthrough[#passthrough + 1] = a
    elseif a == "--flux" then with_flux = true
    elseif CONFIGS[a] then names[#names + 1] = a
    else error("wan_step: unknown argument '" .. tostring(a) .. "' (configs: small, block; " ..
        "--ckpt on|off|both, --steps N, --warmup N, --threads N, --quick, --flux)") end
    i = i + 1
end
if #names == 0 then names = {"small"} end

-- ==== helpers ====

local function peak_rss_gib()
    local f = io.open("/proc/self/status", "r")
    if not f then return nil end
    local text = f:read("*a")
    f:close()
    local kb = text:match("VmHWM:%s*(%d+)")
    return kb and tonumber(kb) / 2^20 or nil
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
    local l = c.latents
    return {
        hidden_states = nemo.randn(l, {generator = g}),
        timestep = nemo.rand({l[1]}, {generator = g}) * 1000,
        encoder_hidden_states = nemo.randn({l[1], c.txt, c.config.text_dim}, {generator = g}),
    }, nemo.randn(l, {generator = g})
end

local function tokens(c)
    local p = c.config.patch_size
    local l = c.latents
    return l[1] * (l[3] / p[1] * l[4] / p[2] * l[5] / p[3] + c.txt)
end

-- ==== run ====

local function run(name, ckpt)
    local c = CONFIGS[name]
    nemo.manual_seed(0)
    local model = wan.WanTransformer3DModel(c.config)
    local nparams = model:num_parameters()
    if ckpt then model:enable_gradient_checkpointing() end
    local args, target = inputs(c)
    local opt = nemo.optim.AdamW(model:parameters(), {lr = 1e-4, weight_decay = 0.01})
    local fwd, bwd, upd, tot = {}, {}, {}, {}
    collectgarbage()
    for s = 1, warmup + steps do
        if s == warmup + 1 then nemo.reset_peak_memory_stats() end
        local t0 = now()
        local out = model(args)
        local loss = F.mse_loss(out, target)
        local t1 = now()
        loss:backward()
        local t2 = now()
        opt:step()
        opt:zero_grad()
        out, loss = nil, nil
        collectgarbage()
        local t3 = now()
        if s > warmup then
            fwd[#fwd + 1], bwd[#bwd + 1], upd[#upd + 1], tot[#tot + 1] = t1 - t0, t2 - t1, t3 - t2, t3 - t0
        end
    end
    local peak = nemo.memory_stats().peak
    model, opt = nil, nil
    collectgarbage()
    return {params = nparams, s = median(tot), min = math.min(unpack(tot)), max = math.max(unpack(tot)),
            fwd = median(fwd), bwd = median(bwd), opt = median(upd), peak = peak, rss = peak_rss_gib(),
            tokens = tokens(c)}
end

print(string.format("nemo %s, %d threads, %d timed steps after %d warm-up, float32, CPU", nemo.version,
    nemo.get_num_threads(), steps, warmup))
print("PyTorch anchors: diffusers 58eb52c0 + torch 1.13, 2 threads, tuned (../shared/notes/anchors.md)")
print()
local W = {10, 4, 12, 9, 9, 9, 9, 8, 10, 9, 9, 9, 9, 9, 9}
local function row(cols)
    local parts = {}
    for k, v in ipairs(cols) do parts[k] = string.format("%" .. W[k] .. "s", tostring(v)) end
    print(table.concat(parts, " "))
end
row({"config", "ckpt", "params", "s/step", "min", "max", "fwd", "bwd", "optim", "tok/s", "peak MiB", "RSS GiB",
     "torch s", "torch RSS", "speedup"})
for _, name in ipairs(names) do
    for _, ckpt in ipairs(ckpt_modes) do
        local r = run(name, ckpt)
        local c = CONFIGS[name]
        local a = c.anchor and c.anchor[ckpt and "on" or "off"]
        if c.params and r.params ~= c.params then
            io.stderr:write(string.format("warning: wan_%s has %d parameters, the anchor %d\n", name, r.params, c.params))
        end
        row({"wan_" .. name, ckpt and "on" or "off", r.params, string.format("%.3f", r.s), string.format("%.3f", r.min),
             string.format("%.3f", r.max), string.format("%.3f", r.fwd), string.format("%.3f", r.bwd),
             string.format("%.3f", r.opt), string.format("%.0f", r.tokens / r.s),
             string.format("%.0f", r.peak / 2^20), r.rss and string.format("%.2f", r.rss) or "?",
             a and string.format("%.3f", a.s) or "-", a and string.format("%.2f", a.rss) or "-",
             a and string.format("%.2fx", a.s / r.s) or "-"})
        io.stdout:flush()
    end
end
print()
print("fwd includes the loss; optim is the AdamW step + zero_grad + one Lua collection. RSS is the process's peak so " ..
    "far (it only grows across rows). tok/s counts latent + text tokens.")
print("torch anchor phases (fwd/bwd/adamw, s): wan_small 0.045/0.083/0.015 (ckpt 0.039/0.102/0.015); " ..
    "flux_small 0.250 s/step (ckpt 0.337), see bench/flux_step.lua")
if with_flux then
    print()
    local exe = (arg and arg[-1]) or "nemo-lua"
    local cmd = exe .. " bench/flux_step.lua small " .. table.concat(passthrough, " ")
    print("$ " .. cmd)
    io.stdout:flush()
    os.execute(cmd)
end
