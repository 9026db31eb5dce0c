-- tests/lua/test_context_parallel.lua: context parallelism (lua/nemo/parallel/context.lua,
-- Ulysses): the sequence split over the cp ranks, attention through all-to-alls, the output
-- gathered. Runs on one process (prove: the option checks and the one-rank paths) and under
-- mpirun with 2, 4 and 8 ranks (tests/sh/test_mpi.sh; on 8, cp groups of 4 and HSDP with cp). Every check is decided on all ranks; rank 0
-- prints TAP. Every rank computes the one-process reference itself.
--
-- The key tests, all float64 and within 1e-10 (1e-6 after AdamW steps) relative:
-- - Ulysses attention of each rank's slice of q, k, v == the slice of attention over the whole
--   sequence, and its gradients == the slices of the whole gradients;
-- - the tiny FLUX and Wan transformers with enable_context_parallel: the output == the model on one
--   process, and the parameter gradients summed over the group == the one-process gradients;
-- - FSDP2 with cp_size (sharding over dp_shard_cp): N ranks == one process, losses and weights after
--   two AdamW steps, with dp x cp = 1 x 2, 2 x 2 and 4 x 2 (FLUX), 1 x N (Wan) and on 8 ranks HSDP
--   2 replicas x 2 shards x cp 2 (Wan).
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local dist = require "nemo.dist"
local parallel = require "nemo.parallel"
local cp = require "nemo.parallel.context"

local F = nemo.F

dist.init_process_group{timeout = 60}
local rank, world = dist.get_rank(), dist.get_world_size()
local main = rank == 0
local R = require("dist_tap").new(T, dist)
local ok, raises = R.ok, R.raises
local rel_diff = R.rel_diff

local function create(o) return parallel._create_parallel_manager(o) end

-- ==== options (any world size) ====

raises(function() create{cp_size = 2, cp_ring_degree = 2} end, "ring attention is not supported",
    "fsdp2: cp_ring_degree > 1 is refused (Automodel too): context parallelism is Ulysses")
raises(function() create{cp_size = 2, cp_ulysses_degree = 4} end, "must equal cp_size = 2",
    "fsdp2: cp_ring_degree x cp_ulysses_degree must equal cp_size")
raises(function() create{_manager_type = "ddp", cp_size = 2} end, "ddp does not support cp_size",
    "ddp: cp_size > 1 is refused (Automodel too)")
raises(function() parallel.DeviceMesh{cp_size = world + 1, create_groups = false} end, "is not divisible by tp_size x cp_size",
    "DeviceMesh: cp_size that does not divide the world is an error")
do
    local m = parallel.DeviceMesh{cp_size = world, create_groups = false}
    ok(m:size("cp") == world and m:size("dp") == 1 and m:size("dp_shard_cp") == world,
        string.format("DeviceMesh{cp_size = %d}: cp %d, dp inferred 1, dp_shard_cp %d", world, m:size("cp"),
            m:size("dp_shard_cp")))
end

-- one rank: split and gather are the identity, attention is SDPA
do
    local g = nemo.Generator(3)
    local q, k, v = nemo.randn({1, 2, 6, 4}, {generator = g}), nemo.randn({1, 2, 6, 4}, {generator = g}),
        nemo.randn({1, 2, 6, 4}, {generator = g})
    local self_group = dist.new_subgroup(rank, 0, "self")
    ok(rawequal(cp.split(q, 2, self_group), q) and rawequal(cp.gather(q, 2, self_group), q) and
       rel_diff(cp.attention(q, k, v, self_group), F.scaled_dot_product_attention(q, k, v)) == 0,
        "a cp group of one rank: split and gather are the identity, attention is SDPA")
    self_group:destroy()
end

if world == 1 then
    R.skip("the multi-rank checks", "one process (tests/sh/test_mpi.sh runs this file on 2 and 4 ranks)")
    R.done()
end

-- the model-level checks run over the world, or over cp groups of 4 beyond 4 ranks (the tiny
-- models have 4 heads)
local cp_mesh = world > 4 and parallel.DeviceMesh{cp_size = 4} or nil
local group = cp_mesh and cp_mesh:get_group("cp") or dist.group_world()
local P = group:size()
local crank = group:rank()

-- ==== the collectives and the attention ====

do   -- gather's gradient is this rank's slice; split's lands at its place
    local g = nemo.Generator(5)
    local full = nemo.randn({2, 4 * P, 3}, {generator = g, dtype = "float64"})
    local w = nemo.randn({2, 4 * P, 3}, {generator = g, dtype = "float64"})
    local x = full:clone()
    x.requires_grad = true
    local xl = cp.split(x, 1, group)
    local y = cp.gather(xl * 2, 1, group)
    ok(rel_diff(y, full * 2) == 0, "gather(split(x)) == x on every rank, in rank order")
    F.sum(y * w):backward()
    local want = nemo.zeros({2, 4 * P, 3}, {dtype = "float64"})
    want:narrow(1, 4 * crank, 4):copy_((w * 2):narrow(1, 4 * crank, 4))
    ok(rel_diff(x.grad, want) == 0, "the gradient through split and gather is this rank's slice of the output's, " ..
        "zeros elsewhere (so the sum over ranks is the whole gradient)")
    raises(function() cp.split(nemo.zeros(2, 4 * P + 1), 1, group, "the test's tokens") end,
        "the test's tokens has " .. (4 * P + 1) .. " tokens", "split of a length that is not a multiple of cp_size " ..
        "is an error naming the tensor")
end

do   -- Ulysses attention == attention over the whole sequence, forward and backward
    local g = nemo.Generator(7)
    local o = {generator = g, dtype = "float64"}
    local B, H, S, Dh = 2, 2 * P, 3 * P, 8
    local q, k, v, w = nemo.randn({B, H, S, Dh}, o), nemo.randn({B, H, S, Dh}, o), nemo.randn({B, H, S, Dh}, o),
        nemo.randn({B, H, S, Dh}, o)
    local function leaf(t) local c = t:clone(); c.requires_grad = true; return c end
    local rq, rk, rv = leaf(q), leaf(k), leaf(v)
    local ro = F.scaled_dot_product_attention(rq, rk, rv)
    F.sum(ro * w):backward()
    local s = S / P
    local function mine(t) return t:narrow(2, crank * s, s):contiguous() end
    local lq, lk, lv = leaf(mine(q)), leaf(mine(k)), leaf(mine(v))
    local lo = cp.attention(lq, lk, lv, group)
    F.sum(lo * mine(w)):backward()
    local gk, gv = lk.grad:clone(), lv.grad:clone()
    ok(rel_diff(lo, mine(ro)) <= 1e-12, string.format("Ulysses attention over %d ranks == this rank's slice of " ..
        "attention over the whole sequence (float64, %.1e, tolerance 1e-12)", P, rel_diff(lo, mine(ro))))
    local dq, dk, dv = rel_diff(lq.grad, mine(rq.grad)), rel_diff(gk, mine(rk.grad)), rel_diff(gv, mine(rv.grad))
    ok(math.max(dq, dk, dv) <= 1e-12, string.format("its gradients for q, k, v == the slices of the whole " ..
        "gradients (%.1e %.1e %.1e, tolerance 1e-12)", dq, dk, dv))
    -- the view layout the models pass: (B, S, H, Dh) storage, transposed
    local q4, k4, v4 = mine(q):transpose(1, 2):contiguous(), mine(k):transpose(1, 2):contiguous(),
        mine(v):transpose(1, 2):contiguous()
    local lo2 = cp.attention(q4:transpose(1, 2), k4:transpose(1, 2), v4:transpose(1, 2), group)
    ok(rel_diff(lo2, mine(ro)) <= 1e-12, "Ulysses attention of transposed views (the models' layout) is the same")
    raises(function() cp.attention(nemo.zeros(1, P + 1, P, 4), nemo.zeros(1, P + 1, P, 4), nemo.zeros(1, P + 1, P, 4),
        group) end, "the head count must be a multiple of cp_size", "a head count that cp_size does not divide is " ..
        "an error saying so")
end

-- ==== the models: output and summed gradients == one process ====

local function grads_match(ref, model, what)
    local worst, wname = 0, ""
    local rp = {}
    for n, p in ref:named_parameters() do rp[n] = p end
    for n, p in model:named_parameters() do
        local gsum = p.grad and p.grad:clone() or nemo.zeros(p.shape, {dtype = p.dtype})
        dist.all_reduce(gsum, {group = group})
        local d = rel_diff(gsum, rp[n].grad)
        if d > worst then worst, wname = d, n end
    end
    return worst, wname
end

local FLUX_CFG = {in_channels = 16, num_layers = 2, num_single_layers = 2, attention_head_dim = 8,
                  num_attention_heads = 4, joint_attention_dim = 24, pooled_projection_dim = 12,
                  guidance_embeds = true, axes_dims_rope = {2, 2, 4}}
local flux = require "nemo.models.flux"
local function flux_inputs(GB, gen)
    local o = {generator = gen, dtype = "float64"}
    local IMG, TXT = 16, 8
    local ids = nemo.zeros(IMG, 3)
    for r = 0, IMG - 1 do ids[{r, 1}] = math.floor(r / 4); ids[{r, 2}] = r % 4 end
    local tids = nemo.zeros(TXT, 3)
    return {x = nemo.randn({GB, IMG, 16}, o), e = nemo.randn({GB, TXT, 24}, o), p = nemo.randn({GB, 12}, o),
            t = nemo.rand({GB}, o), y = nemo.randn({GB, IMG, 16}, o), ids = ids, tids = tids}
end
local function flux_out(model, d, lo, len)
    return model{hidden_states = d.x:narrow(0, lo, len), encoder_hidden_states = d.e:narrow(0, lo, len),
        pooled_projections = d.p:narrow(0, lo, len), timestep = d.t:narrow(0, lo, len),
        guidance = nemo.full({len}, 3.5, {dtype = "float64"}), img_ids = d.ids, txt_ids = d.tids}
end

do
    local d = flux_inputs(2, nemo.Generator(11))
    local function build() nemo.manual_seed(5); return flux.FluxTransformer2DModel(FLUX_CFG):double() end
    local ref, model = build(), build()
    local rout = flux_out(ref, d, 0, 2)
    F.mse_loss(rout, d.y):backward()
    model:enable_context_parallel(group)
    local out = flux_out(model, d, 0, 2)
    F.mse_loss(out, d.y):backward()
    local df = rel_diff(out, rout)
    local dg, gname = grads_match(ref, model)
    ok(df <= 1e-10 and dg <= 1e-10, string.format("tiny FLUX with enable_context_parallel over %d ranks (16 image " ..
        "and 8 text tokens split, 4 heads): output == one process (%.1e) and gradients summed over the ranks == " ..
        "one process (%.1e at %s), float64, tolerance 1e-10", P, df, dg, gname))
    model:enable_context_parallel(nil)
    ok(rel_diff(flux_out(model, d, 0, 2), rout) <= 1e-12 and cp.group_of(model) == nil,
        "enable_context_parallel(nil) turns it off again")
    model:enable_context_parallel(group)
    local bad = {}
    for k, v in pairs(d) do bad[k] = v end
    bad.e = d.e:narrow(1, 0, 8 - 1)
    bad.tids = d.tids:narrow(0, 0, 8 - 1)
    raises(function() flux_out(model, bad, 0, 2) end, "encoder_hidden_states (the text tokens) has 7 tokens",
        "FLUX: a text length that cp_size does not divide is an error naming encoder_hidden_states")
end

local WAN_CFG = {attention_head_dim = 12, cross_attn_norm = true, eps = 1e-6, ffn_dim = 32, freq_dim = 256,
                 in_channels = 4, num_attention_heads = 4, num_layers = 2, out_channels = 4, patch_size = {1, 2, 2},
                 qk_norm = "rms_norm_across_heads", rope_max_seq_len = 32, text_dim = 16}
local wan = require "nemo.models.wan"
do
    local g = nemo.Generator(13)
    local o = {generator = g, dtype = "float64"}
    local x, e = nemo.randn({2, 4, 2, 8, 8}, o), nemo.randn({2, 6, 16}, o)   -- 32 patch tokens, 6 text tokens
    local y = nemo.randn({2, 4, 2, 8, 8}, o)
    local tt = nemo.rand({2}, o) * 1000
    local tpt = nemo.rand({2, 32}, o) * 1000                                -- one timestep per token (Wan 2.2 TI2V)
    local function build() nemo.manual_seed(3); return wan.WanTransformer3DModel(WAN_CFG):double() end
    for _, case in ipairs { {"one timestep per sample", tt}, {"one timestep per token", tpt} } do
        local ref, model = build(), build()
        local rout = ref{hidden_states = x, timestep = case[2], encoder_hidden_states = e}
        F.mse_loss(rout, y):backward()
        model:enable_context_parallel(group)
        local out = model{hidden_states = x, timestep = case[2], encoder_hidden_states = e}
        F.mse_loss(out, y):backward()
        local df = rel_diff(out, rout)
        local dg, gname = grads_match(ref, model)
        ok(df <= 1e-10 and dg <= 1e-10, string.format("tiny Wan (%s) with enable_context_parallel over %d ranks " ..
            "(32 patch tokens split, 6 text tokens whole): output == one process (%.1e), summed gradients == one " ..
            "process (%.1e at %s), float64, tolerance 1e-10", case[1], P, df, dg, gname))
    end
    -- Wan 2.1 image-to-video: 257-like image tokens and 512 text tokens in the cross-attention, both whole
    local i2v = {added_kv_proj_dim = 32, attention_head_dim = 8, cross_attn_norm = true, eps = 1e-6, ffn_dim = 24,
                 freq_dim = 16, image_dim = 12, in_channels = 12, num_attention_heads = 4, num_layers = 2,
                 out_channels = 4, patch_size = {1, 2, 2}, qk_norm = "rms_norm_across_heads", rope_max_seq_len = 16,
                 text_dim = 8}
    local xi, ei, ii = nemo.randn({1, 12, 2, 8, 8}, o), nemo.randn({1, 512, 8}, o), nemo.randn({1, 5, 12}, o)
    local yi = nemo.randn({1, 4, 2, 8, 8}, o)
    local function bi() nemo.manual_seed(4); return wan.WanTransformer3DModel(i2v):double() end
    local ref, model = bi(), bi()
    local args = {hidden_states = xi, timestep = tt:narrow(0, 0, 1), encoder_hidden_states = ei,
                  encoder_hidden_states_image = ii}
    local rout = ref(args)
    F.mse_loss(rout, yi):backward()
    model:enable_context_parallel(group)
    local out = model(args)
    F.mse_loss(out, yi):backward()
    local df = rel_diff(out, rout)
    local dg, gname = grads_match(ref, model)
    ok(df <= 1e-10 and dg <= 1e-10, string.format("tiny Wan 2.1 I2V (5 image + 512 text tokens in attn2) with " ..
        "enable_context_parallel over %d ranks: output == one process (%.1e), summed gradients (%.1e at %s), " ..
        "float64, tolerance 1e-10", P, df, dg, gname))
    model = build()
    model:enable_context_parallel(group)
    local odd = nemo.randn({1, 4, 1, 6, 6}, o)   -- 9 patch tokens
    raises(function() model{hidden_states = odd, timestep = tt:narrow(0, 0, 1), encoder_hidden_states =
        e:narrow(0, 0, 1)} end, "the video's patch sequence has 9 tokens",
        "Wan: a patch count that cp_size does not divide is an error saying so")
end

-- ==== FSDP2 with cp_size: N ranks == one process ====

-- train(build, loss_of, GB, opts) on the manager; reference on one process with batch GB
local function fsdp_case(name, build, loss_of, GB, mopts)
    local ref = build(true)
    local ropt = nemo.optim.AdamW(ref:parameters(), {lr = 1e-3})
    local rl = {}
    for s = 1, 2 do
        ropt:zero_grad()
        local loss = loss_of(ref, s, 0, GB)
        loss:backward()
        rl[s] = loss:item()
        ropt:step()
    end
    local model = build(rank == 0)
    local mgr = create(mopts)
    mgr:parallelize(model)
    local opt = nemo.optim.AdamW(mgr:parameters(), {lr = 1e-3})
    local cpn = mopts.cp_size
    local dp = world / cpn
    local dp_rank = math.floor(rank / cpn)    -- the mesh (pp, dp_replicate, dp_shard, cp, tp): cp next to last
    local B = GB / dp
    local wl = 0
    for s = 1, 2 do
        opt:zero_grad()
        local loss = loss_of(model, s, dp_rank * B, B)
        loss:backward()
        mgr:finish_gradient_synchronization()
        opt:step()
        wl = math.max(wl, math.abs(dist.all_reduce_number(loss:item(), "avg") - rl[s]) / math.abs(rl[s]))
    end
    local sd, keys = mgr:full_state_dict()
    local rsd = ref:state_dict()
    local ww = 0
    for _, k in ipairs(keys) do ww = math.max(ww, rel_diff(sd[k], rsd[k])) end
    ok(wl <= 1e-6 and ww <= 1e-6 and #keys == #ref:parameters(), string.format("FSDP2 %s, %d ranks (dp %d x cp %d, " ..
        "sharded over %d) x batch %d == 1 process x batch %d within 1e-6 relative: losses %.2e, weights after 2 AdamW " ..
        "steps %.2e", name, world, dp, cpn, mgr:info().shard, B, GB, wl, ww))
    return mgr
end

do   -- FLUX: cp 2 (dp = world / 2), checkpointed blocks
    local data = {flux_inputs(4, nemo.Generator(21)), flux_inputs(4, nemo.Generator(22))}
    fsdp_case("tiny FLUX float64, checkpointed blocks", function(first)
        nemo.manual_seed(first and 5 or 50 + rank)
        local m = flux.FluxTransformer2DModel(FLUX_CFG):double()
        m:enable_gradient_checkpointing()
        return m
    end, function(model, s, lo, len)
        return F.mse_loss(flux_out(model, data[s], lo, len), data[s].y:narrow(0, lo, len))
    end, 4, {cp_size = 2, activation_checkpointing = true})
end

do   -- Wan: cp = world; on 8 ranks HSDP: 2 replicas x 2 shards x cp 2
    local g = nemo.Generator(31)
    local o = {generator = g, dtype = "float64"}
    local GB = 4
    local x, e = nemo.randn({GB, 4, 2, 8, 8}, o), nemo.randn({GB, 6, 16}, o)
    local t, y = nemo.rand({GB}, o) * 1000, nemo.randn({GB, 4, 2, 8, 8}, o)
    fsdp_case(world == 8 and "(HSDP 2 replicas x 2 shards) tiny Wan float64" or "tiny Wan float64", function(first)
        nemo.manual_seed(first and 3 or 30 + rank)
        return wan.WanTransformer3DModel(WAN_CFG):double()
    end, function(model, _, lo, len)
        return F.mse_loss(model{hidden_states = x:narrow(0, lo, len), timestep = t:narrow(0, lo, len),
            encoder_hidden_states = e:narrow(0, lo, len)}, y:narrow(0, lo, len))
    end, GB, world == 8 and {cp_size = 2, dp_replicate_size = 2} or {cp_size = world})
end

R.done()
