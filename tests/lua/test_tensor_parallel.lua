-- tests/lua/test_tensor_parallel.lua: tensor parallelism (lua/nemo/parallel/tensor.lua, Wan's plan
-- in WanTransformer3DModel:enable_tensor_parallel, nemo-lua's FLUX plan, fsdp.tp_size in the FSDP2
-- manager). Runs on one process (prove: the option checks) and under mpirun with 2, 4 and 8 ranks
-- (tests/sh/test_mpi.sh; on 8, HSDP 2 replicas x 2 shards x tp 2).
-- Every check is decided on all ranks; rank 0 prints TAP. Every rank computes the one-process
-- reference itself.
--
-- The key tests, float64, relative to the largest reference value:
-- - column- then row-parallel Linear pairs (an MLP), a gathered column-parallel layer and a
--   row-parallel layer on a whole input == the unsharded layers, forward and input / weight
--   gradients (1e-12);
-- - the tiny Wan and FLUX transformers with enable_tensor_parallel: output and every gradient (the
--   sharded ones gathered) == one process (1e-10), for Wan 2.1 T2V and I2V and FLUX;
-- - FSDP2 with tp_size: N ranks == one process after two AdamW steps with gradient clipping
--   (losses, gradient norms and weights within 1e-6), tp 2 x dp N/2, tp 2 x cp 2 and tp 4 (Wan),
--   tp 2 x dp N/2 and tp 2 x cp 2 (FLUX);
-- - sharded checkpoints of a tp run load into another dp / tp layout and into whole tensors
--   (bitwise), and resume bitwise.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local dist = require "nemo.dist"
local parallel = require "nemo.parallel"
local tpm = require "nemo.parallel.tensor"

local F = nemo.F

dist.init_process_group{timeout = 60}
local rank, world = dist.get_rank(), dist.get_world_size()
local R = require("dist_tap").new(T, dist)
local ok, raises = R.ok, R.raises
local rel_diff = R.rel_diff

local function create(o) return parallel._create_parallel_manager(o) end

-- ==== options (any world size) ====

raises(function() create{_manager_type = "ddp", tp_size = 2} end, "ddp does not support tp_size",
    "ddp: tp_size > 1 is refused (Automodel too)")
raises(function() parallel.DeviceMesh{tp_size = 2, manager = "ddp", world_size = 2, rank = 0, create_groups = false} end,
    "tensor parallelism runs under FSDP2", "DeviceMesh for ddp with tp_size > 1: an error")
raises(function() create{tp_size = 2, sequence_parallel = true} end, "sequence_parallel",
    "fsdp2: sequence_parallel is refused with a reason (activations stay whole between the sharded layers)")
raises(function() create{tp_size = 2, tp_plan = {}} end, "custom tensor-parallel plans are not supported yet",
    "fsdp2: a custom tp_plan is refused (the model's own plan is used)")
do
    local m = parallel.DeviceMesh{tp_size = 2, cp_size = 2, world_size = 8, rank = 5, create_groups = false}
    ok(m:size("tp") == 2 and m:size("dp") == 2 and m:get_local_rank("tp") == 1 and m:get_local_rank("cp") == 0 and
       m:get_local_rank("dp") == 1, "DeviceMesh{tp 2, cp 2} of 8: dp 2 inferred; rank 5 is tp 1, cp 0, dp 1 (tp fastest)")
end

local WAN_CFG = {attention_head_dim = 12, cross_attn_norm = true, eps = 1e-6, ffn_dim = 32, freq_dim = 256,
                 in_channels = 4, num_attention_heads = 4, num_layers = 2, out_channels = 4, patch_size = {1, 2, 2},
                 qk_norm = "rms_norm_across_heads", rope_max_seq_len = 32, text_dim = 16}
local wan = require "nemo.models.wan"
local flux = require "nemo.models.flux"

if world == 1 then
    R.skip("the multi-rank checks", "one process (tests/sh/test_mpi.sh runs this file on 2 and 4 ranks)")
    R.done()
end

-- the layer- and model-level checks run over tp groups of 2
local mesh2 = parallel.DeviceMesh{tp_size = 2}
local group = mesh2:get_group("tp")
local P, trank = group:size(), group:rank()

local function leaf(t) local c = t:clone(); c.requires_grad = true; return c end
local function whole(p) local info = tpm.info(p); return info and tpm.full(p, info, group) or p end

-- ==== Linear layers ====

do
    local nn = nemo.nn
    local g = nemo.Generator(3)
    local o = {generator = g, dtype = "float64"}
    local x = nemo.randn({3, 5, 8}, o)
    local w = nemo.randn({3, 5, 8}, o)
    local function mlp() nemo.manual_seed(7); return nn.Linear(8, 12):double(), nn.Linear(12, 8):double() end
    local a, b = mlp()
    local xr = leaf(x)
    local yr = b(F.gelu(a(xr), {approximate = "tanh"}))
    F.sum(yr * w):backward()
    local ta, tb = mlp()
    tpm.colwise(ta, group)
    tpm.rowwise(tb, group)
    local xt = leaf(x)
    local yt = tb(F.gelu(ta(xt), {approximate = "tanh"}))
    F.sum(yt * w):backward()
    local df, dx = rel_diff(yt, yr), rel_diff(xt.grad, xr.grad)
    local function gfull(p) return tpm.full(p.grad, tpm.info(p), group) end
    local dw = math.max(rel_diff(gfull(ta.weight), a.weight.grad), rel_diff(gfull(ta.bias), a.bias.grad),
        rel_diff(gfull(tb.weight), b.weight.grad), rel_diff(tb.bias.grad, b.bias.grad))
    ok(df <= 1e-12 and dx <= 1e-12 and dw <= 1e-12 and ta.weight.shape[1] == 12 / P and tb.weight.shape[2] == 12 / P,
        string.format("column- then row-parallel Linear over %d ranks (an MLP 8 -> 12 -> 8): output %.1e, input " ..
            "gradient %.1e, gathered weight and bias gradients %.1e == the whole layers (float64, tolerance 1e-12); " ..
            "the weights hold 12 / %d rows / columns", P, df, dx, dw, P))
    ok(rel_diff(whole(ta.weight), a.weight) == 0 and tpm.info(ta.weight).dim == 0 and tpm.info(tb.weight).dim == 1 and
       tpm.info(tb.bias) == nil, "the ranks' slices gathered are the whole weights, bitwise; the row-parallel bias " ..
       "stays whole")

    local function lin(i, o_) nemo.manual_seed(9); return nn.Linear(i, o_):double() end
    local c, cr = lin(8, 6), lin(8, 6)
    tpm.colwise(cr, group, {gather_output = true})
    local x1, x2 = leaf(x), leaf(x)
    local y1, y2 = c(x1), cr(x2)
    F.sum(y1 * nemo.ones({6}, {dtype = "float64"})):backward()
    F.sum(y2 * nemo.ones({6}, {dtype = "float64"})):backward()
    ok(rel_diff(y2, y1) <= 1e-12 and rel_diff(x2.grad, x1.grad) <= 1e-12,
        "colwise with gather_output: the whole output on every rank, and the input gradient, == the whole layer")

    local d, dr = lin(8, 4), lin(8, 4)
    tpm.rowwise(dr, group, {input_is_parallel = false})
    local x3, x4 = leaf(x), leaf(x)
    local y3, y4 = d(x3), dr(x4)
    F.sum(y3 * y3):backward()
    F.sum(y4 * y4):backward()
    ok(rel_diff(y4, y3) <= 1e-12 and rel_diff(x4.grad, x3.grad) <= 1e-12,
        "rowwise on a whole input (input_is_parallel = false): output and the whole input gradient == the whole layer")

    raises(function() tpm.colwise(nn.Linear(8, 5):double(), group) end, "cannot split evenly",
        "a Linear whose out_features the tp group does not divide: an error saying so")
    local peft = require "nemo.peft"
    local holder = nn.Sequential(nn.Linear(8, 4))
    local lora = peft.LoRALinear(holder:get(1), {dim = 2, alpha = 2})
    raises(function() tpm.colwise(lora, group) end, "a LoRA adapter's layer cannot be split",
        "a LoRA layer is refused by colwise, saying why")
    ok(not tpm.splittable(nn.Linear(2, 2), lora) and tpm.splittable(nn.Linear(2, 2), nil, nn.RMSNorm(2)),
        "splittable: false when a unit holds a LoRA layer (the plans then leave the unit whole)")
end

-- ==== the Wan transformer ====

local function grads_match(ref, model)
    local worst, wname = 0, ""
    local rp = {}
    for n, p in ref:named_parameters() do rp[n] = p end
    for n, p in model:named_parameters() do
        local gr = p.grad or nemo.zeros(p.shape, {dtype = p.dtype})
        local info = tpm.info(p)
        if info then gr = tpm.full(gr, info, group) end
        local d = rel_diff(gr, rp[n].grad)
        if d > worst then worst, wname = d, n end
    end
    return worst, wname
end

do
    local g = nemo.Generator(13)
    local o = {generator = g, dtype = "float64"}
    local x, e = nemo.randn({2, 4, 2, 8, 8}, o), nemo.randn({2, 6, 16}, o)
    local y = nemo.randn({2, 4, 2, 8, 8}, o)
    local tt = nemo.rand({2}, o) * 1000
    local function build() nemo.manual_seed(3); return wan.WanTransformer3DModel(WAN_CFG):double() end
    local ref, model = build(), build()
    local rout = ref{hidden_states = x, timestep = tt, encoder_hidden_states = e}
    F.mse_loss(rout, y):backward()
    model:enable_tensor_parallel(group)
    local out = model{hidden_states = x, timestep = tt, encoder_hidden_states = e}
    F.mse_loss(out, y):backward()
    local df = rel_diff(out, rout)
    local dg, gname = grads_match(ref, model)
    local ffn = model.blocks:get(1).ffn.net:get(1).proj.weight
    local a1 = model.blocks:get(1).attn1
    ok(df <= 1e-10 and dg <= 1e-10 and ffn.shape[1] == 32 / P and a1.heads == 4 / P and a1.norm_q.weight.shape[1] ==
        48 / P, string.format("tiny Wan with enable_tensor_parallel over %d ranks (ffn, condition embedders, " ..
        "time_proj, proj_out, and the attentions by heads with their q / k norms across heads, sharded): output == " ..
        "one process (%.1e), every gradient (sharded ones gathered) == one process (%.1e at %s), float64, tolerance " ..
        "1e-10", P, df, dg, gname))
    raises(function() model:enable_tensor_parallel(group) end, "tensor-parallel already",
        "enable_tensor_parallel twice is an error")
    raises(function() model:save_pretrained(os.tmpname() .. "_never") end, "the model is tensor-parallel",
        "save_pretrained of a tensor-parallel model (slices) is an error pointing to summon_full_params")
    local odd = {}
    for k, v in pairs(WAN_CFG) do odd[k] = v end
    odd.ffn_dim = 33
    raises(function() wan.WanTransformer3DModel(odd):enable_tensor_parallel(group) end, "has 33 rows",
        "a ffn_dim that tp_size does not divide: an error naming the size")

    -- Wan 2.1 I2V (image embedder and added K/V projections stay replicated)
    local i2v = {added_kv_proj_dim = 32, attention_head_dim = 8, cross_attn_norm = true, eps = 1e-6, ffn_dim = 24,
                 freq_dim = 16, image_dim = 12, in_channels = 12, num_attention_heads = 4, num_layers = 2,
                 out_channels = 4, patch_size = {1, 2, 2}, qk_norm = "rms_norm_across_heads", rope_max_seq_len = 16,
                 text_dim = 8}
    local xi, ei, ii = nemo.randn({1, 12, 2, 8, 8}, o), nemo.randn({1, 512, 8}, o), nemo.randn({1, 5, 12}, o)
    local yi = nemo.randn({1, 4, 2, 8, 8}, o)
    local function bi() nemo.manual_seed(4); return wan.WanTransformer3DModel(i2v):double() end
    ref, model = bi(), bi()
    local args = {hidden_states = xi, timestep = tt:narrow(0, 0, 1), encoder_hidden_states = ei,
                  encoder_hidden_states_image = ii}
    rout = ref(args)
    F.mse_loss(rout, yi):backward()
    model:enable_tensor_parallel(group)
    out = model(args)
    F.mse_loss(out, yi):backward()
    df = rel_diff(out, rout)
    dg, gname = grads_match(ref, model)
    ok(df <= 1e-10 and dg <= 1e-10, string.format("tiny Wan 2.1 I2V with enable_tensor_parallel over %d ranks " ..
        "(attn2's image K / V projections and norm_added_k split too): output (%.1e) and gradients (%.1e at %s) == " ..
        "one process, float64, tolerance 1e-10", P, df, dg, gname))
    do
        local odd = {}
        for k, v in pairs(WAN_CFG) do odd[k] = v end
        odd.num_attention_heads, odd.attention_head_dim = 3, 16
        local m = wan.WanTransformer3DModel(odd):enable_tensor_parallel(group)
        local m4 = wan.WanTransformer3DModel(WAN_CFG):enable_tensor_parallel(group, {cp_size = 4})
        ok(m.blocks:get(1).attn1.heads == 3 and rawget(m, "_tp_attention") == false and
           m.blocks:get(1).ffn.net:get(3).weight.shape[2] == 32 / P and m4.blocks:get(1).attn1.heads == 4 and
           rawget(m4, "_tp_attention") == false, "Wan: heads that tp_size (x cp_size) does not divide: the " ..
           "attention stays whole (Automodel's plan), the rest is split")
    end
    -- the split RMSNorm in bfloat16 (computed in float32 like the whole norm) is close to it
    local nn = nemo.nn
    local xb = nemo.randn({3, 5, 16}, {generator = g}):to{dtype = "bfloat16"}
    local nw, ns = nn.RMSNorm(16, {eps = 1e-6}), nn.RMSNorm(16, {eps = 1e-6})
    tpm.rms_norm(ns, group)
    local want = nw(xb):to{dtype = "float32"}:narrow(2, trank * 16 / P, 16 / P)
    local dbf = rel_diff(ns(xb:narrow(2, trank * 16 / P, 16 / P):contiguous()):to{dtype = "float32"}, want)
    ok(dbf <= 1e-2, string.format("the split RMSNorm on bfloat16 input == this rank's part of the whole norm within " ..
        "1e-2 (%.1e)", dbf))
end

-- ==== FSDP2 with tp_size: N ranks == one process ====

local gd = nemo.Generator(31)
local od = {generator = gd, dtype = "float64"}
local GB = 4
local X, E = nemo.randn({GB, 4, 2, 8, 8}, od), nemo.randn({GB, 6, 16}, od)
local TT, Y = nemo.rand({GB}, od) * 1000, nemo.randn({GB, 4, 2, 8, 8}, od)
local function build_wan(first)
    nemo.manual_seed(first and 3 or 30 + rank)
    return wan.WanTransformer3DModel(WAN_CFG):double()
end
local function loss_of(model, lo, len)
    return F.mse_loss(model{hidden_states = X:narrow(0, lo, len), timestep = TT:narrow(0, lo, len),
        encoder_hidden_states = E:narrow(0, lo, len)}, Y:narrow(0, lo, len))
end

local function train_ref(steps)
    local ref = build_wan(true)
    local ropt = nemo.optim.AdamW(ref:parameters(), {lr = 1e-3})
    local rl, rn = {}, {}
    for s = 1, steps do
        ropt:zero_grad()
        local loss = loss_of(ref, 0, GB)
        loss:backward()
        rn[s] = nemo.optim.clip_grad_norm_(ref:parameters(), 0.05)
        rl[s] = loss:item()
        ropt:step()
    end
    return ref, rl, rn
end

local function train_tp(mopts, steps, mgr_model)
    local mgr, model = mgr_model and mgr_model[1], mgr_model and mgr_model[2]
    if not mgr then
        model = build_wan(rank == 0)
        mgr = create(mopts)
        mgr:parallelize(model)
    end
    local opt = mgr_model and mgr_model[3] or nemo.optim.AdamW(mgr:parameters(), {lr = 1e-3})
    local dm = mgr.mesh
    local dp, dp_rank = dm:size("dp"), dm:get_local_rank("dp")
    local B = GB / dp
    local losses, norms = {}, {}
    for s = 1, steps do
        opt:zero_grad()
        local loss = loss_of(model, dp_rank * B, B)
        loss:backward()
        mgr:finish_gradient_synchronization()
        norms[s] = mgr:clip_grad_norm_(0.05)
        opt:step()
        losses[s] = dist.all_reduce_number(loss:item(), "avg")
    end
    return mgr, model, opt, losses, norms
end

local ref, rl, rn = train_ref(2)
local rsd = ref:state_dict()
local function fsdp_case(name, mopts)
    local mgr, model, opt, losses, norms = train_tp(mopts, 2)
    local wl, wn = 0, 0
    for s = 1, 2 do
        wl = math.max(wl, math.abs(losses[s] - rl[s]) / math.abs(rl[s]))
        wn = math.max(wn, math.abs(norms[s] - rn[s]) / rn[s])
    end
    local sd, keys = mgr:full_state_dict()
    local ww = 0
    for _, k in ipairs(keys) do ww = math.max(ww, rel_diff(sd[k], rsd[k])) end
    local dm = mgr.mesh
    ok(wl <= 1e-6 and wn <= 1e-6 and ww <= 1e-6 and #keys == #ref:parameters(), string.format("FSDP2 %s: %d ranks " ..
        "(dp %d x cp %d x tp %d) == 1 process x batch %d within 1e-6 relative: losses %.2e, clipped gradient norms " ..
        "%.2e, weights after 2 AdamW steps %.2e", name, world, dm:size("dp"), dm:size("cp"), dm:size("tp"), GB, wl, wn,
        ww))
    return mgr, model, opt
end

local mgr_a, model_a, opt_a = fsdp_case("tiny Wan float64, tp 2", {tp_size = 2})
if world == 8 then   -- HSDP with tp: 2 replicas x 2 shards x tp 2
    fsdp_case("tiny Wan float64, HSDP (2 replicas x 2 shards) x tp 2", {tp_size = 2, dp_replicate_size = 2})
end
if world == 4 then
    fsdp_case("tiny Wan float64, tp 2 x cp 2, checkpointed blocks", {tp_size = 2, cp_size = 2,
        activation_checkpointing = true})
    fsdp_case("tiny Wan float64, tp 4", {tp_size = 4})
end
raises(function() create{tp_size = 2}:parallelize(nemo.nn.Sequential(nemo.nn.Linear(4, 4))) end,
    "has no tensor-parallel plan", "FSDP2 tp_size with a model that has no plan: an error saying so")

-- ==== FLUX (nemo-lua's own plan: heads, MLPs, AdaLN linears) ====

local FLUX_CFG = {in_channels = 16, num_layers = 2, num_single_layers = 2, attention_head_dim = 8,
                  num_attention_heads = 4, joint_attention_dim = 24, pooled_projection_dim = 12,
                  guidance_embeds = true, axes_dims_rope = {2, 2, 4}}
local function flux_inputs(n, gen)
    local o = {generator = gen, dtype = "float64"}
    local IMG, TXT = 16, 8
    local ids = nemo.zeros(IMG, 3)
    for r = 0, IMG - 1 do ids[{r, 1}] = math.floor(r / 4); ids[{r, 2}] = r % 4 end
    return {x = nemo.randn({n, IMG, 16}, o), e = nemo.randn({n, TXT, 24}, o), p = nemo.randn({n, 12}, o),
            t = nemo.rand({n}, o), y = nemo.randn({n, IMG, 16}, o), ids = ids, tids = nemo.zeros(TXT, 3)}
end
local function flux_loss(model, d, lo, len)
    local out = model{hidden_states = d.x:narrow(0, lo, len), encoder_hidden_states = d.e:narrow(0, lo, len),
        pooled_projections = d.p:narrow(0, lo, len), timestep = d.t:narrow(0, lo, len),
        guidance = nemo.full({len}, 3.5, {dtype = "float64"}), img_ids = d.ids, txt_ids = d.tids}
    return F.mse_loss(out, d.y:narrow(0, lo, len)), out
end
local function build_flux(seed) nemo.manual_seed(seed); return flux.FluxTransformer2DModel(FLUX_CFG):double() end

do
    local d = flux_inputs(2, nemo.Generator(11))
    local ref, model = build_flux(5), build_flux(5)
    local rl, rout = flux_loss(ref, d, 0, 2)
    rl:backward()
    model:enable_tensor_parallel(group)
    local l, out = flux_loss(model, d, 0, 2)
    l:backward()
    local df = rel_diff(out, rout)
    local dg, gname = grads_match(ref, model)
    local a = model.transformer_blocks:get(1).attn
    ok(df <= 1e-10 and dg <= 1e-10 and a.heads == 4 / P and a.to_q.weight.shape[1] == 32 / P,
        string.format("tiny FLUX with enable_tensor_parallel over %d ranks (%d of 4 heads a rank; MLPs, AdaLN " ..
            "linears, single-block proj_out on cat(attention, mlp) split): output == one process (%.1e), every " ..
            "gradient (split ones gathered; the per-head norms' summed) == one process (%.1e at %s), float64, " ..
            "tolerance 1e-10", P, 4 / P, df, dg, gname))
    local odd = {}
    for k, v in pairs(FLUX_CFG) do odd[k] = v end
    odd.num_attention_heads, odd.attention_head_dim, odd.axes_dims_rope = 3, 8, {2, 2, 4}
    local m3 = flux.FluxTransformer2DModel(odd):double():enable_tensor_parallel(group)
    local s3 = m3.single_transformer_blocks:get(1)
    ok(m3.transformer_blocks:get(1).attn.heads == 3 and s3.proj_out.weight.shape[2] == 24 + 96 and
       m3.transformer_blocks:get(1).ff.net:get(3).weight.shape[2] == 96 / P and rawget(m3, "_tp_attention") == false,
       "FLUX: heads that tp_size does not divide: the attentions and single blocks stay whole, MLPs and AdaLN are split")
end

do   -- FSDP2: tp 2 (x dp world / 2), and on 4 ranks tp 2 x cp 2 with checkpointed blocks
    local data = {flux_inputs(4, nemo.Generator(21)), flux_inputs(4, nemo.Generator(22))}
    local function fcase(name, mopts)
        local ref = build_flux(5)
        local ropt = nemo.optim.AdamW(ref:parameters(), {lr = 1e-3})
        local rl = {}
        for s = 1, 2 do
            ropt:zero_grad()
            local loss = flux_loss(ref, data[s], 0, 4)
            loss:backward()
            nemo.optim.clip_grad_norm_(ref:parameters(), 0.05)
            rl[s] = loss:item()
            ropt:step()
        end
        local model = build_flux(rank == 0 and 5 or 50 + rank)
        if mopts.activation_checkpointing then model:enable_gradient_checkpointing() end
        local mgr = create(mopts)
        mgr:parallelize(model)
        local opt = nemo.optim.AdamW(mgr:parameters(), {lr = 1e-3})
        local dm = mgr.mesh
        local dp, dpr = dm:size("dp"), dm:get_local_rank("dp")
        local B = 4 / dp
        local wl = 0
        for s = 1, 2 do
            opt:zero_grad()
            local loss = flux_loss(model, data[s], dpr * B, B)
            loss:backward()
            mgr:finish_gradient_synchronization()
            mgr:clip_grad_norm_(0.05)
            opt:step()
            wl = math.max(wl, math.abs(dist.all_reduce_number(loss:item(), "avg") - rl[s]) / math.abs(rl[s]))
        end
        local sd, keys = mgr:full_state_dict()
        local rsd_ = ref:state_dict()
        local ww = 0
        for _, k in ipairs(keys) do ww = math.max(ww, rel_diff(sd[k], rsd_[k])) end
        ok(wl <= 1e-6 and ww <= 1e-6 and #keys == #ref:parameters(), string.format("FSDP2 %s: %d ranks (dp %d x " ..
            "cp %d x tp %d) == 1 process x batch 4 within 1e-6 relative: losses %.2e, weights after 2 clipped AdamW " ..
            "steps %.2e", name, world, dp, dm:size("cp"), dm:size("tp"), wl, ww))
    end
    fcase("tiny FLUX float64, tp 2", {tp_size = 2})
    if world == 4 then
        fcase("tiny FLUX float64, tp 2 x cp 2, checkpointed blocks", {tp_size = 2, cp_size = 2,
            activation_checkpointing = true})
    end
end

-- ==== checkpoints: a tp run's shards load anywhere ====

local fs = require "nemo.fs"
local fsdp2 = require "nemo.parallel.fsdp2"
local function scratch(tag)
    local base = os.getenv("TMPDIR") or "/tmp"
    local d = string.format("%s/nemo_tp_ck_%s_%d", base, tag, tonumber(dist.all_reduce_number(os.time() % 100000, "max")))
    if rank == 0 then fs.mkdirs(d .. "/model"); fs.mkdirs(d .. "/optim") end
    dist.barrier()
    return d
end
local function same_weights(a, b)
    local worst = 0
    for k, v in pairs(a) do worst = math.max(worst, b[k] and rel_diff(b[k], v) or math.huge) end
    return worst
end
-- a saved checkpoint loads into whole tensors and into FSDP2 without tp, bitwise
local function check_layouts(what, d, mgr, build)
    local sd = mgr:full_state_dict()
    ok(same_weights(sd, fsdp2.load_full(d)) == 0, string.format("%s: the sharded checkpoint (%d files) assembles " ..
        "into the whole weights (load_full), bitwise", what, #fs.list(d .. "/model")))
    local m = build()
    local mg = create({})
    mg:parallelize(m)
    local op = nemo.optim.AdamW(mg:parameters(), {lr = 1e-3})
    mg:load_sharded(d, op)
    ok(same_weights(sd, mg:full_state_dict()) == 0, string.format("%s: it loads into FSDP2 without tp (dp %d), " ..
        "bitwise", what, world))
end

do   -- Wan: tp 2, then resume with tp 2
    local d = scratch("wan")
    mgr_a:save_sharded(d, opt_a)
    dist.barrier()
    check_layouts("Wan tp 2", d, mgr_a, function() return build_wan(false) end)
    local m2 = build_wan(false)
    local mg2 = create({tp_size = 2})
    mg2:parallelize(m2)
    local op2 = nemo.optim.AdamW(mg2:parameters(), {lr = 1e-3})
    mg2:load_sharded(d, op2)
    local _, _, _, l2 = train_tp(nil, 1, {mg2, m2, op2})
    local _, _, _, la = train_tp(nil, 1, {mgr_a, model_a, opt_a})
    ok(l2[1] == la[1], string.format("resumed from it with tp 2, the next step's loss is the uninterrupted run's " ..
        "bitwise (%.17g)", la[1]))
    ok(same_weights(mgr_a:full_state_dict(), mg2:full_state_dict()) == 0,
        "and the weights after that step too (AdamW state restored from the shards)")
    dist.barrier()
    if rank == 0 then fs.remove_tree(d) end
end

do   -- FLUX: the single blocks' proj_out is split in two column pieces (attention | mlp)
    local d = scratch("flux")
    local model = build_flux(5)
    local mgr = create({tp_size = 2})
    mgr:parallelize(model)
    local opt = nemo.optim.AdamW(mgr:parameters(), {lr = 1e-3})
    local data = flux_inputs(4, nemo.Generator(23))
    local dp, dpr = mgr.mesh:size("dp"), mgr.mesh:get_local_rank("dp")
    local loss = flux_loss(model, data, dpr * 4 / dp, 4 / dp)
    loss:backward()
    mgr:finish_gradient_synchronization()
    opt:step()
    mgr:save_sharded(d, opt)
    dist.barrier()
    check_layouts("FLUX tp 2", d, mgr, function() return build_flux(5) end)
    dist.barrier()
    if rank == 0 then fs.remove_tree(d) end
end

R.done()
