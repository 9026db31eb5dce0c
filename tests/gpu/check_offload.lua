-- tests/gpu/check_offload.lua: FSDP2's CPU offload (lua/nemo/parallel/fsdp2.lua) on one CUDA
-- device (run by tests/gpu/run.sh, and on an emulated device by tests/sh/test_fake_cuda.sh; TAP):
-- with cpu_offload the shards, their gradients and AdamW's state are page-locked host tensors, the
-- device keeps only what a step computes (the step's peak and what stays after it are lower), and
-- three training steps give the same weights as FSDP2 without offload: bit for bit on an emulated
-- device (the same CPU kernels either way), within 1e-6 relative on a GPU (AdamW then runs on the
-- CPU for one run and on the GPU for the other; reported as bitwise or not);
-- offload_policy = {pin_memory = false} keeps them in pageable memory; a model on the CPU is not
-- offloaded. The recipe across 2 ranks: tests/sh/lib/train.sh. Without a usable CUDA device: a
-- SKIP plan (tests/gpu/gpu_device.lua).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/?.lua;" .. here .. "/../lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local dist = require "nemo.dist"
local parallel = require "nemo.parallel"
local class = require "nemo.class"
local nn, F = nemo.nn, nemo.F

local D, ON_CUDA = require("gpu_device")(nemo)
if not ON_CUDA then
    io.write("1..0 # SKIP CPU offload needs a CUDA device (NEMO_GPU_DEVICE=", D, ")\n")
    os.exit(0)
end
local FAKE = os.getenv("NEMO_FAKE_CUDA") ~= nil and os.getenv("NEMO_FAKE_CUDA") ~= "0"
if not dist.is_initialized() then dist.init_process_group{backend = "self"} end

local Block, bparent = class("check_offload.Block", nn.Module)
function Block:__init(d)
    bparent.__init(self)
    self.fc = nn.Linear(d, 4 * d)
    self.proj = nn.Linear(4 * d, d)
end
function Block:forward(h) return h + self.proj(F.tanh(self.fc(h))) end
local Net, nparent = class("check_offload.Net", nn.Module)
function Net:__init()
    nparent.__init(self)
    nemo.manual_seed(5)
    self.blocks = nn.ModuleList{Block(64), Block(64), Block(64)}
    self.head = nn.Linear(64, 8)
end
function Net:forward(x)
    local h = x
    for _, b in self.blocks:iter() do h = b(h) end
    return self.head(h)
end

local gen = nemo.Generator(9)
local X = nemo.randn({3, 16, 64}, {generator = gen}):to{device = D}
local Y = nemo.randn({3, 16, 8}, {generator = gen}):to{device = D}

local function run(opts)
    collectgarbage(); collectgarbage()
    nemo.empty_cache(D)
    local base = nemo.memory_stats(D).current
    local model = Net():to{device = D}
    local mgr = parallel._create_parallel_manager(opts)
    mgr:parallelize(model)
    local params = mgr:parameters()
    local opt = nemo.optim.AdamW(params, {lr = 1e-2, weight_decay = 0.01})
    nemo.reset_peak_memory_stats(D)
    for s = 1, 3 do
        opt:zero_grad()
        local loss = F.mse_loss(model(X:narrow(0, s - 1, 1):squeeze(0)), Y:narrow(0, s - 1, 1):squeeze(0))
        loss:backward()
        mgr:finish_gradient_synchronization()
        mgr:clip_grad_norm_(1.0)
        opt:step()
    end
    collectgarbage(); collectgarbage()
    local st = nemo.memory_stats(D)
    local sd = mgr:full_state_dict()
    return {mgr = mgr, params = params, sd = sd, peak = st.peak - base, kept = st.current - base, opt = opt}
end

local plain = run{_manager_type = "fsdp2", dp_size = 1, mp_policy = {param_dtype = "float32"}}
local off = run{_manager_type = "fsdp2", dp_size = 1, cpu_offload = true}
T.ok(off.mgr.offload == true and not plain.mgr.offload, "cpu_offload = true turns offload on")
local all_host, all_pinned = true, true
for _, p in ipairs(off.params) do
    all_host = all_host and p.device == "cpu" and p.grad ~= nil and p.grad.device == "cpu"
    all_pinned = all_pinned and p:is_pinned()
end
T.ok(all_host, "with offload every shard and its gradient is a host tensor")
T.ok(all_pinned, "and the shards are page-locked (pin_memory, the default)")
local st = off.opt.state[off.params[1]]
T.ok(st and st.exp_avg and st.exp_avg.device == "cpu", "AdamW's state of an offloaded shard lives in host memory")
T.ok(plain.params[1].device == D, "without offload the shards stay on " .. D)
local same, n, worst = true, 0, 0
for name, t in pairs(plain.sd) do
    n = n + 1
    if not T.same_bits(t, off.sd[name]) then same = false end
    local d, m = T.maxdiff(off.sd[name], t)
    if m > 0 then worst = math.max(worst, d / m) end
end
if FAKE then
    T.ok(same and n > 0, string.format("3 steps with offload give the same %d weights, bit for bit", n))
else
    T.ok(n > 0 and worst <= 1e-6, string.format("3 steps with offload: the %d weights within 1e-6 relative of the " ..
        "run without (%s; worst %.3g)", n, same and "bitwise equal" or "not bitwise", worst))
end
T.ok(off.kept < plain.kept, string.format("device memory kept between steps: %d bytes with offload < %d without",
    off.kept, plain.kept))
T.ok(off.peak < plain.peak, string.format("a step's device peak: %d bytes with offload < %d without", off.peak,
    plain.peak))
T.ok(off.mgr.stats.offload_bytes > 0, "the host <-> device copies are counted (stats.offload_bytes)")

local unpinned = run{_manager_type = "fsdp2", dp_size = 1, offload_policy = {pin_memory = false}}
T.ok(unpinned.mgr.offload and unpinned.params[1].device == "cpu" and not unpinned.params[1]:is_pinned(),
    "offload_policy = {pin_memory = false}: host shards in pageable memory")
T.raises(function() parallel._create_parallel_manager{_manager_type = "fsdp2", offload_policy = {pinned = true}} end,
    "offload_policy: unknown key 'pinned'", "an unknown offload_policy key is an error")

-- a model on the CPU is not offloaded (its shards are host memory already)
local cpu_model = Net()
local m = parallel._create_parallel_manager{_manager_type = "fsdp2", dp_size = 1, cpu_offload = true}
m:parallelize(cpu_model)
T.ok(not m.offload and m.plain ~= nil, "cpu_offload on a CPU model: nothing to offload (one process shards nothing)")
T.done()
