-- bench/dist_step.lua: a DDP or FSDP2 training step on 1, 2 and 4 CPU ranks: step time split
-- into compute and communication, and the bytes the collectives move per step.
--   nemo-lua bench/dist_step.lua [--manager ddp|fsdp2] [--ranks 1,2,4] [--model mlp|flux|wan]
--                                [--steps N] [--warmup N] [--batch B] [--bucket-mb X]
--                                [--cp [--tokens N]] [--tp] [--probs-mb X]
-- Run without a launcher, it starts itself under mpirun once per rank count (as
-- `nemo-lua --nproc-per-node N` does: --bind-to none, OMP_NUM_THREADS = cores / N, and
-- --oversubscribe beyond the core count) and prints one table; under mpirun it is one worker.
-- Weak scaling: every rank trains on its own local batch B, so the global batch is N x B.
--
-- Columns, per step (medians over the timed steps; the slowest rank's figure):
--   step      wall time of zero_grad + forward + backward + the final gradient wait + AdamW step
--   comm      time spent inside collective calls (starting buckets, driving MPI's progress from
--             the gradient hooks, the final wait): communication that compute did not hide
--   compute   step - comm
--   payload   DDP: bytes each rank hands to all-reduce (float32 gradients + DDP's bookkeeping);
--             FSDP2: bytes of the all-gather outputs + reduce-scatter inputs (+ HSDP all-reduce);
--             with --cp also the attention's all-to-alls and the output's all-gather; with --tp
--             the tensor-parallel all-reduces and all-gathers
--   wire      bytes each rank sends: ring all-reduce 2 (N-1)/N x payload; all-gather and
--             reduce-scatter (N-1)/N x their full size
--   early     DDP: buckets started while backward still ran, of all buckets; FSDP2: units
--   samples/s N x B / step
--   peak MiB  the largest tensor memory a rank held during the timed steps (parameters, gradients,
--             AdamW state, activations): FSDP2 shards the first three
-- On a machine with fewer cores than ranks x threads, ranks share cores: more ranks do not
-- add compute there, and the table shows what the collectives cost on top.
--
-- --cp (FSDP2, --model flux): context parallelism instead: every rank trains the same batch of
-- --tokens image tokens (default 1024) with the sequence split over the N ranks (cp_size N,
-- Ulysses attention), so the rows show how step time and peak memory per rank fall as the
-- tokens spread (strong scaling over the sequence; samples/s counts each sample once).
-- --tp (FSDP2, --model wan): tensor parallelism instead: every rank trains the same batch with
-- the Wan plan's layers (FFNs, condition embedders, output projection) split over the N ranks
-- (tp_size N), so the rows show what the split saves per rank in time and memory and what its
-- all-reduces cost (strong scaling over the layers; samples/s counts each sample once).
-- --probs-mb X: the budget of attention probabilities kept for backward per process
-- (F.set_attention_probs_budget; default 512): 0 shows the activations alone.
local nemo = require "nemo"
local dist = require "nemo.dist"
local json = require "nemo.json"
local parallel = require "nemo.parallel"

local F = nemo.F

-- ==== arguments ====

local opts = {ranks = {1, 2, 4}, model = "mlp", steps = 8, warmup = 2, batch = 32, bucket_mb = 25, worker = false,
              manager = "ddp", cp = false, tp = false, tokens = 1024}
local argv = arg or {}
local i = 1
while i <= #argv do
    local a, v = argv[i], argv[i + 1]
    if a == "--ranks" then
        opts.ranks = {}
        for x in v:gmatch("%d+") do opts.ranks[#opts.ranks + 1] = tonumber(x) end
        i = i + 1
    elseif a == "--model" then opts.model = v; i = i + 1
    elseif a == "--manager" then opts.manager = v; i = i + 1
    elseif a == "--steps" then opts.steps = tonumber(v); i = i + 1
    elseif a == "--warmup" then opts.warmup = tonumber(v); i = i + 1
    elseif a == "--batch" then opts.batch = tonumber(v); i = i + 1
    elseif a == "--bucket-mb" then opts.bucket_mb = tonumber(v); i = i + 1
    elseif a == "--worker" then opts.worker = true
    elseif a == "--cp" then opts.cp = true
    elseif a == "--tp" then opts.tp = true
    elseif a == "--tokens" then opts.tokens = tonumber(v); i = i + 1
    elseif a == "--probs-mb" then opts.probs_mb = tonumber(v); i = i + 1
    else
        error("dist_step: unknown argument '" .. tostring(a) .. "' (--manager ddp|fsdp2, --ranks 1,2,4, " ..
              "--model mlp|flux, --steps N, " ..
              "--warmup N, --batch B, --bucket-mb X, --cp, --tokens N, --tp, --probs-mb X)", 0)
    end
    i = i + 1
end
if opts.model ~= "mlp" and opts.model ~= "flux" and opts.model ~= "wan" then
    error("dist_step: --model is mlp, flux or wan", 0)
end
if opts.model == "wan" then opts.manager = "fsdp2" end
if opts.tp then
    if opts.model ~= "wan" or opts.cp then error("dist_step: --tp runs --model wan (without --cp)", 0) end
end
if opts.manager ~= "ddp" and opts.manager ~= "fsdp2" then error("dist_step: --manager is ddp or fsdp2", 0) end
if opts.cp then
    if opts.model ~= "flux" then error("dist_step: --cp runs --model flux", 0) end
    opts.manager = "fsdp2"
    local side = math.floor(math.sqrt(opts.tokens) + 0.5)
    if side * side ~= opts.tokens or opts.tokens % 4 ~= 0 then
        error("dist_step: --tokens must be a square and a multiple of 4 (e.g. 1024)", 0)
    end
end

local function median(t)
    local s = {}
    for k, x in ipairs(t) do s[k] = x end
    table.sort(s)
    local n = #s
    if n == 0 then return 0 / 0 end
    if n % 2 == 1 then return s[(n + 1) / 2] end
    return (s[n / 2] + s[n / 2 + 1]) / 2
end

-- ==== the models ====

local function mlp_model()
    local nn = nemo.nn
    local layers = {}
    local width = 1024
    layers[#layers + 1] = nn.Linear(256, width)
    for _ = 1, 3 do layers[#layers + 1] = nn.GELU(); layers[#layers + 1] = nn.Linear(width, width) end
    layers[#layers + 1] = nn.Linear(width, 256)
    local model = nn.Sequential(unpack(layers))
    local g = nemo.Generator(1000 + dist.get_rank())
    local x = nemo.randn({opts.batch, 256}, {generator = g})
    local y = nemo.randn({opts.batch, 256}, {generator = g})
    return model, function() return F.mse_loss(model(x), y) end, "MLP 256-1024x4-256"
end

local function flux_model()
    local flux = require "nemo.models.flux"
    local cfg = {in_channels = 64, num_layers = 1, num_single_layers = 2, attention_head_dim = 32,
                 num_attention_heads = 4, joint_attention_dim = 256, pooled_projection_dim = 128,
                 guidance_embeds = true, axes_dims_rope = {8, 12, 12}}
    local model = flux.FluxTransformer2DModel(cfg)
    local B, img, txt = math.max(1, math.floor(opts.batch / 16)), 64, 16
    -- context parallel: one batch for all ranks (the cp ranks share it), a longer sequence
    if opts.cp then img, txt = opts.tokens, 64 end
    local side = math.floor(math.sqrt(img) + 0.5)
    local g = nemo.Generator(opts.cp and 1000 or 1000 + dist.get_rank())
    local ids = nemo.zeros(img, 3)
    for r = 0, img - 1 do ids[{r, 1}] = math.floor(r / side); ids[{r, 2}] = r % side end
    local args = {
        hidden_states = nemo.randn({B, img, 64}, {generator = g}),
        encoder_hidden_states = nemo.randn({B, txt, 256}, {generator = g}),
        pooled_projections = nemo.randn({B, 128}, {generator = g}),
        timestep = nemo.rand({B}, {generator = g}), guidance = nemo.full({B}, 3.5),
        img_ids = ids, txt_ids = nemo.zeros(txt, 3),
    }
    local target = nemo.randn({B, img, 64}, {generator = g})
    opts.batch = B
    return model, function() return F.mse_loss(model(args), target) end,
        string.format("FLUX (D 128, 1 + 2 blocks, %d image + %d text tokens)", img, txt)
end

local function wan_model()
    local wan = require "nemo.models.wan"
    local cfg = {attention_head_dim = 32, cross_attn_norm = true, eps = 1e-6, ffn_dim = 1024, freq_dim = 64,
                 in_channels = 16, num_attention_heads = 8, num_layers = 2, out_channels = 16,
                 patch_size = {1, 2, 2}, qk_norm = "rms_norm_across_heads", rope_max_seq_len = 64, text_dim = 128}
    local model = wan.WanTransformer3DModel(cfg)
    local B = math.max(1, math.floor(opts.batch / 8))
    -- tensor parallel: one batch for all ranks (the tp ranks share it)
    local g = nemo.Generator(opts.tp and 1000 or 1000 + dist.get_rank())
    local args = {hidden_states = nemo.randn({B, 16, 2, 32, 32}, {generator = g}),
                  encoder_hidden_states = nemo.randn({B, 64, 128}, {generator = g}),
                  timestep = nemo.rand({B}, {generator = g}) * 1000}
    local target = nemo.randn({B, 16, 2, 32, 32}, {generator = g})
    opts.batch = B
    return model, function() return F.mse_loss(model(args), target) end,
        "Wan (D 256, ffn 1024, 2 blocks, 512 patch + 64 text tokens)"
end

-- ==== one worker (a rank) ====

local function worker()
    dist.init_process_group{backend = "mpi", timeout = 300}
    if opts.probs_mb then F.set_attention_probs_budget(opts.probs_mb * 2 ^ 20) end
    local rank, world = dist.get_rank(), dist.get_world_size()
    nemo.manual_seed(0)
    local model, loss_fn, desc
    if opts.model == "mlp" then model, loss_fn, desc = mlp_model()
    elseif opts.model == "wan" then model, loss_fn, desc = wan_model()
    else model, loss_fn, desc = flux_model() end
    local fsdp = opts.manager == "fsdp2"
    local mgr = fsdp and parallel._create_parallel_manager{cp_size = opts.cp and world or nil,
                                                           tp_size = opts.tp and world or nil} or
        parallel._create_parallel_manager{_manager_type = "ddp", bucket_cap_mb = opts.bucket_mb}
    mgr:parallelize(model)
    local opt = nemo.optim.AdamW(mgr.parameters and mgr:parameters() or model:parameters(), {lr = 1e-4, weight_decay = 0.01})
    local bytes, wire = {}, {}
    local steps, comms, early = {}, {}, {}
    for s = 1, opts.warmup + opts.steps do
        if s == opts.warmup + 1 then nemo.reset_peak_memory_stats() end
        collectgarbage()
        dist.barrier()
        local c0, b0 = dist.stats().seconds, dist.stats().bytes
        if fsdp then mgr:reset_stats() end
        local t0 = dist.wtime()
        opt:zero_grad()
        local loss = loss_fn()
        loss:backward()
        mgr:finish_gradient_synchronization()
        opt:step()
        local t1 = dist.wtime()
        local c1 = dist.stats().seconds
        loss = nil
        if s > opts.warmup then
            steps[#steps + 1] = t1 - t0
            comms[#comms + 1] = c1 - c0
            if fsdp then
                local st = mgr:info().stats
                local f = (world - 1) / world
                bytes[#bytes + 1] = st.all_gather_bytes + st.reduce_scatter_bytes + st.all_reduce_bytes
                wire[#wire + 1] = f * (st.all_gather_bytes + st.reduce_scatter_bytes) + 2 * f * st.all_reduce_bytes
                if opts.cp or opts.tp then   -- plus cp's all-to-alls / tp's all-reduces (every collective's bytes)
                    local extra = dist.stats().bytes - b0 - bytes[#bytes]
                    bytes[#bytes] = bytes[#bytes] + extra
                    wire[#wire] = wire[#wire] + f * extra
                end
                early[#early + 1] = mgr:info().units
            else
                early[#early + 1] = (mgr:info().last.early or 0)
            end
        end
    end
    local step = dist.all_reduce_number(median(steps), "max")
    local comm = dist.all_reduce_number(median(comms), "max")
    local info = mgr:info()
    local peak = dist.all_reduce_number(nemo.memory_stats().peak, "max")
    if rank == 0 then
        io.write("RESULT ", json.encode({ranks = world, model = desc, params = model:num_parameters(),
            batch = opts.batch, threads = nemo.get_num_threads(), step = step, comm = comm, cp = opts.cp or opts.tp,
            payload = fsdp and median(bytes) or info.bytes_per_step, wire = fsdp and median(wire) or nil,
            buckets = fsdp and info.units or info.buckets, early = median(early), peak = peak,
            library = dist.library_version()}), "\n")
        io.stdout:flush()
    end
end

if opts.worker or dist.env().launcher ~= "none" then
    worker()
    return
end

-- ==== the driver: one mpirun per rank count ====

-- the interpreter as invoked (arg[-1]); a bare name is looked up on PATH
local nemo_lua = (arg and arg[-1]) or "nemo-lua"
if not nemo_lua:find("/") then
    local p = io.popen("command -v " .. nemo_lua .. " 2>/dev/null")
    nemo_lua = (p and p:read("*l")) or nemo_lua
    if p then p:close() end
end
local script = arg and arg[0] or "bench/dist_step.lua"
local cores = 1
do
    local p = io.popen("nproc 2>/dev/null")
    cores = tonumber(p and p:read("*l") or "1") or 1
    if p then p:close() end
end
local root = io.popen("id -u"):read("*l") == "0"

print(string.format("%s step on CPU ranks (%s%s, %d timed steps after %d warmup; %d cores)",
    opts.cp and "FSDP2 + context parallel (cp_size = ranks)" or opts.tp and "FSDP2 + tensor parallel (tp_size = ranks)"
        or (opts.manager == "fsdp2" and "FSDP2" or "DDP"),
    opts.cp and "strong scaling over the sequence: one batch, its tokens split" or
        opts.tp and "strong scaling over the layers: one batch, the plan's layers split" or "weak scaling",
    opts.manager == "ddp" and string.format(", bucket_cap_mb %g", opts.bucket_mb) or "", opts.steps, opts.warmup,
    cores))
local rows = {}
for _, n in ipairs(opts.ranks) do
    local threads = math.max(1, math.floor(cores / n))
    local cmd = string.format("OMP_NUM_THREADS=%d OMPI_MCA_btl=${OMPI_MCA_btl:-self,vader} mpirun -np %d %s%s" ..
        "--bind-to none -x OMP_NUM_THREADS %s %s --worker --manager %s --model %s --steps %d --warmup %d --batch %d " ..
        "--bucket-mb %g%s 2>&1", threads, n, n > cores and "--oversubscribe " or "",
        root and "--allow-run-as-root " or "", nemo_lua, script, opts.manager, opts.model, opts.steps, opts.warmup,
        opts.batch, opts.bucket_mb, (opts.cp and (" --cp --tokens " .. opts.tokens) or "") .. (opts.tp and " --tp" or "") ..
        (opts.probs_mb and (" --probs-mb " .. opts.probs_mb) or ""))
    local p = io.popen(cmd)
    local out = p:read("*a")
    p:close()
    local line = out:match("RESULT (%b{})")
    if not line then
        io.stderr:write("dist_step: the run with " .. n .. " ranks failed:\n" .. out .. "\n")
    else
        rows[#rows + 1] = json.decode(line)
    end
end
if #rows == 0 then os.exit(1) end
print(string.format("model: %s, %d parameters, local batch %d; %s", rows[1].model, rows[1].params, rows[1].batch,
    rows[1].library or ""))
print(string.format("%5s %7s %9s %9s %9s %6s %10s %10s %7s %10s %9s", "ranks", "threads", "step ms", "compute", "comm",
    "comm%", "payload MB", "wire MB", "early", "samples/s", "peak MiB"))
for _, r in ipairs(rows) do
    local n = r.ranks
    local wire = n > 1 and (r.wire or 2 * (n - 1) / n * r.payload) or 0
    local payload = n > 1 and r.payload or 0
    print(string.format("%5d %7d %9.1f %9.1f %9.1f %5.1f%% %10.2f %10.2f %3d/%-3d %10.1f %9.1f", n, r.threads,
        r.step * 1e3, (r.step - r.comm) * 1e3, r.comm * 1e3, 100 * r.comm / r.step, payload / 2 ^ 20, wire / 2 ^ 20,
        math.floor(r.early + 0.5), r.buckets, (r.cp and 1 or n) * r.batch / r.step, (r.peak or 0) / 2 ^ 20))
end
