-- tests/lua/test_flow_matching.lua: nemo.flow_matching against Automodel's FlowMatchingPipeline:
-- configuration, sigma sampling statistics and formulas, loss weights, Flux packing and ids,
-- the draw order, and the golden training steps (golden/flow_flux_tiny, golden/flow_wan_tiny)
-- replayed from their stored draws (the golden folder is found by tests/lua/golden.lua; without
-- it those checks fail).
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local FM = require "nemo.flow_matching"
local fs = require "nemo.fs"
local golden = require "golden"

local F = nemo.F

local function list(t) return t:double():contiguous():reshape{-1}:tolist() end
local function mean_of(v) local s = 0 for _, x in ipairs(v) do s = s + x end return s / #v end
local function max_abs_diff(a, b)
    local m = 0
    for i = 1, #a do local d = math.abs(a[i] - b[i]); if d > m or d ~= d then m = d end end
    return m
end

-- ==== configuration ====

do
    local fm = FM.FlowMatching()
    local ok = true
    for k, v in pairs(FM.DEFAULTS) do if fm[k] ~= v then ok = false end end
    T.ok(ok and fm.adapter_type == "simple" and fm.timestep_sampling == "logit_normal" and fm.flow_shift == 3.0
        and fm.mix_uniform_ratio == 0.1 and fm.cfg_dropout_prob == 0.1 and fm.mode_scale == 1.29,
        "defaults are Automodel's recipe defaults (simple, logit_normal, shift 3, mix 0.1, cfg 0.1, mode_scale 1.29)")
    local flux = FM.FlowMatching{adapter_type = "flux"}
    T.is(flux.guidance_scale, 3.5, "flux adapter default guidance_scale 3.5 (FluxAdapter.__init__)")
    T.is(FM.FlowMatching{adapter_type = "flux", adapter_kwargs = {guidance_scale = 1, use_guidance_embeds = false}}
        .guidance_scale, 1, "adapter_kwargs.guidance_scale from the flux YAML is taken")
    T.raises(function() FM.FlowMatching{flow_shfit = 3} end, "unknown key 'flow_shfit'", "unknown key is an error naming it")
    T.raises(function() FM.FlowMatching{timestep_sampling = "logitnormal"} end,
        "unknown timestep_sampling 'logitnormal' (valid: uniform, logit_normal, lognorm, mix, mode, beta)",
        "unknown timestep_sampling is an error listing the valid modes (no silent uniform fallback)")
    T.raises(function() FM.FlowMatching{adapter_type = "hunyuan"} end, "not implement",
        "an Automodel adapter nemo-lua lacks is named as such")
    T.raises(function() FM.FlowMatching{loss_weighting_scheme = "cosine"} end, "valid: linear, bsmntw",
        "unknown loss_weighting_scheme lists the valid ones")
    T.raises(function() FM.FlowMatching{flow_shift = "3"} end, "flow_shift must be a number", "wrong type names the key")
    T.raises(function() FM.FlowMatching{sigma_min = 0.8, sigma_max = 0.2} end, "sigma_min (0.8) must not exceed sigma_max",
        "sigma_min > sigma_max is an error")
    T.raises(function() FM.FlowMatching{num_train_timesteps = 10.5} end, "num_train_timesteps must be an integer",
        "num_train_timesteps must be an integer")
    T.raises(function() FM.FlowMatching{adapter_type = "flux", adapter_kwargs = {guidance = 3}} end,
        "adapter_kwargs.guidance is not a setting of the flux adapter", "unknown adapter_kwargs key is an error")
    T.raises(function() FM.FlowMatching{adapter_kwargs = {guidance_scale = 3}} end, "it takes none",
        "the simple adapter takes no adapter_kwargs")
    T.raises(function() FM.FlowMatching{adapter_type = "flux", guidance_scale = 2, adapter_kwargs = {guidance_scale = 3}} end,
        "disagree", "guidance_scale and adapter_kwargs.guidance_scale must agree")
end

-- ==== sigma sampling ====

local N = 100000
do -- uniform, no shift: mean 1/2, variance 1/12
    local fm = FM.FlowMatching{timestep_sampling = "uniform", flow_shift = 1.0}
    local u, sigma, t, info = fm:sample_sigmas(N, nemo.Generator(1))
    local s = list(sigma)
    local m = mean_of(s)
    local var = 0
    for _, x in ipairs(s) do var = var + (x - m) ^ 2 end
    var = var / N
    T.near(m, 0.5, 0.005, "uniform: mean sigma over 1e5 draws")
    T.near(var, 1 / 12, 0.003, "uniform: variance 1/12")
    T.is(info.method, "uniform", "uniform: method name")
    T.ok(info.normal == nil and info.mix_uniform == nil and info.uniform ~= nil, "uniform: only the uniform draw (no mix draw)")
    T.close(t, F.mul(sigma, 1000), 0, 0, "timesteps = sigma * 1000 exactly")
    T.close(u:clamp_min(1e-5), sigma, 0, 1e-6, "shift 1: sigma = max(u, 1e-5) (float32 rounding)")
end

do -- logit_normal(0, 1): E[sigmoid(z)] = 1/2 by symmetry; median of logit(u) = median z = 0
    local fm = FM.FlowMatching{timestep_sampling = "logit_normal", flow_shift = 1.0, mix_uniform_ratio = 0}
    local u, sigma, _, info = fm:sample_sigmas(N, nemo.Generator(2))
    T.near(mean_of(list(sigma)), 0.5, 0.005, "logit_normal(0,1): mean sigma")
    local lg = {}
    for i, x in ipairs(list(u)) do lg[i] = math.log(x / (1 - x)) end
    table.sort(lg)
    T.near(lg[N / 2], 0, 0.02, "logit_normal(0,1): median of logit(u)")
    local z = list(info.normal)
    local zm = mean_of(z)
    local zv = 0
    for _, x in ipairs(z) do zv = zv + (x - zm) ^ 2 end
    T.near(math.sqrt(zv / N), 1, 0.01, "logit_normal(0,1): std of the normal draw")
    T.close(u, F.sigmoid(info.normal), 0, 0, "u = sigmoid(draw) exactly")

    local fm2 = FM.FlowMatching{timestep_sampling = "logit_normal", logit_mean = 0.5, logit_std = 2.0, mix_uniform_ratio = 0}
    local _, _, _, info2 = fm2:sample_sigmas(N, nemo.Generator(3))
    local z2 = list(info2.normal)
    T.near(mean_of(z2), 0.5, 0.03, "logit_normal(0.5, 2): mean of the draw")
    local fm3 = FM.FlowMatching{timestep_sampling = "lognorm", logit_mean = 3.0, logit_std = 2.0, mix_uniform_ratio = 0}
    local _, _, _, info3 = fm3:sample_sigmas(N, nemo.Generator(4))
    T.near(mean_of(list(info3.normal)), 0, 0.02, "lognorm ignores logit_mean/std: N(0,1) draw")
end

do -- the shift formula, exactly for given u (float64 replay)
    local s = 3.0
    local fm = FM.FlowMatching{timestep_sampling = "uniform", flow_shift = s}
    local uvals = {0, 1e-6, 1e-5, 0.1, 0.25, 0.5, 0.75, 0.999, 1 - 2 ^ -40}
    local u = nemo.tensor(uvals, {dtype = "float64"})
    local _, sigma = fm:sample_sigmas(#uvals, {draws = {uniform = u}, dtype = "float64"})
    local want = {}
    for i, x in ipairs(uvals) do
        local uc = math.max(x, 1e-5)
        want[i] = s * uc / (1 + (s - 1) * uc)
    end
    T.close(sigma, want, 1e-12, 0, "flow_shift 3: sigma = s*u/(1+(s-1)u) with u >= 1e-5, float64")
    local _, s32 = fm:sample_sigmas(#uvals, {draws = {uniform = u}})
    T.close(s32, want, 1e-6, 0, "flow_shift 3: float32 sigma within 1e-6")
    T.is(s32.dtype, "float32", "sigma is float32 by default")
end

do -- mode: u = 1 - r - scale (cos^2(pi r / 2) - 1 + r), clamped to [0, 1]
    for _, scale in ipairs {1.29, 2.5} do
        local fm = FM.FlowMatching{timestep_sampling = "mode", flow_shift = 1.0, mix_uniform_ratio = 0, mode_scale = scale}
        local rv = {0, 0.05, 0.2, 0.5, 0.8, 0.95, 0.999}
        local u = fm:sample_sigmas(#rv, {draws = {uniform = nemo.tensor(rv, {dtype = "float64"})}, dtype = "float64"})
        local want = {}
        for i, r in ipairs(rv) do
            local v = 1 - r - scale * (math.cos(math.pi * r / 2) ^ 2 - 1 + r)
            want[i] = math.min(1, math.max(0, v))
        end
        T.close(u, want, 1e-12, 0, string.format("mode (scale %.2f): formula and clamp to [0,1], float64", scale))
    end
end

do -- clamping piles mass at the bounds
    local fm = FM.FlowMatching{timestep_sampling = "uniform", flow_shift = 1.0, sigma_min = 0.2, sigma_max = 0.7}
    local _, sigma = fm:sample_sigmas(N, nemo.Generator(5))
    local lo, hi, outside = 0, 0, 0
    for _, x in ipairs(list(sigma)) do
        if x == 0.2 or math.abs(x - 0.2) < 1e-7 then lo = lo + 1 end
        if math.abs(x - 0.7) < 1e-7 then hi = hi + 1 end
        if x < 0.2 - 1e-7 or x > 0.7 + 1e-7 then outside = outside + 1 end
    end
    T.is(outside, 0, "clamp: every sigma in [sigma_min, sigma_max]")
    T.near(lo / N, 0.2, 0.01, "clamp: P(sigma = sigma_min) = P(u < 0.2)")
    T.near(hi / N, 0.3, 0.01, "clamp: P(sigma = sigma_max) = P(u > 0.7)")
end

do -- mix_uniform_ratio: one draw per batch decides for the whole batch
    local fm = FM.FlowMatching{timestep_sampling = "logit_normal", mix_uniform_ratio = 0.3, flow_shift = 1.0}
    local g = nemo.Generator(6)
    local B, nb, uni, whole = 8, 2000, 0, true
    for _ = 1, nb do
        local before = g:get_state().offset
        local _, _, _, info = fm:sample_sigmas(B, g)
        local used = g:get_state().offset - before
        if type(info.mix_uniform) ~= "number" or used ~= 1 + B then whole = false end
        if info.method == "uniform" then
            uni = uni + 1
            if info.normal ~= nil or info.mix_uniform >= 0.3 then whole = false end
        elseif info.uniform ~= nil or info.mix_uniform < 0.3 then whole = false end
    end
    T.ok(whole, "mix: each batch draws 1 mix number then B values, all uniform or all logit_normal")
    T.near(uni / nb, 0.3, 0.04, "mix: fraction of uniform batches = mix_uniform_ratio")
    local fm0 = FM.FlowMatching{timestep_sampling = "uniform", mix_uniform_ratio = 0.3}
    local g0 = nemo.Generator(6)
    local _, _, _, i0 = fm0:sample_sigmas(B, g0)
    T.ok(i0.mix_uniform == nil and g0:get_state().offset == B, "mix: no mix draw when the mode is already uniform")
end

do -- use_sigma_noise = false, and beta
    local fm = FM.FlowMatching{use_sigma_noise = false, flow_shift = 5.0, sigma_max = 0.9}
    local rv = {0.1, 0.5, 0.95}
    local _, sigma, _, info = fm:sample_sigmas(3, {draws = {uniform = nemo.tensor(rv)}})
    T.is(info.method, "uniform_no_shift", "use_sigma_noise=false: method uniform_no_shift")
    T.close(sigma, {0.1, 0.5, 0.9}, 1e-7, 0, "use_sigma_noise=false: sigma = clamp(U) without the shift")
    local fb = FM.FlowMatching{timestep_sampling = "beta", beta_alpha = 2.5, beta_beta = 1.5}
    local _, sb = fb:sample_sigmas(4000, nemo.Generator(7))
    local v = list(sb)
    local m = mean_of(v)
    local var = 0
    for _, x in ipairs(v) do var = var + (x - m) ^ 2 end
    T.near(m, 2.5 / 4, 0.015, "beta(2.5, 1.5): mean a/(a+b) over 4000 draws")
    T.near(var / #v, 2.5 * 1.5 / (16 * 5), 0.006, "beta(2.5, 1.5): variance ab/((a+b)^2(a+b+1))")
    -- data parallelism: a global batch's Beta values, sliced per rank, replay one process's
    local g1, g2 = nemo.Generator(21), nemo.Generator(21)
    local u1, s1 = fb:sample_sigmas(6, g1)
    local gd = fb:global_draws(6, {2, 3}, {generator = g2})
    local half = FM.slice_draws(gd, 3, 3)
    local g3 = nemo.Generator(99)
    local u2, s2, _, i2 = fb:sample_sigmas(3, {generator = g3, draws = half})
    local l1, ls1 = list(u1), list(s1)
    T.ok(max_abs_diff(list(gd.beta), l1) == 0 and max_abs_diff(list(u2), {l1[4], l1[5], l1[6]}) == 0 and
         max_abs_diff(list(s2), {ls1[4], ls1[5], ls1[6]}) == 0 and i2.method == "beta" and
         g3:get_state().offset == 0,
        "beta with data parallelism: global_draws holds the global batch's Beta values (draws.beta); a rank's slice " ..
        "replays exactly one process's samples 4..6 without touching its generator")
end

do -- the generator: same seed, same numbers; replayed draws do not advance it
    local fm = FM.FlowMatching{}
    local _, a = fm:sample_sigmas(16, nemo.Generator(11))
    local _, b = fm:sample_sigmas(16, nemo.Generator(11))
    local _, c = fm:sample_sigmas(16, nemo.Generator(12))
    T.ok(max_abs_diff(list(a), list(b)) == 0 and max_abs_diff(list(a), list(c)) > 0, "same seed same sigmas, other seed other")
    local g = nemo.Generator(3)
    fm:sample_sigmas(4, {generator = g, draws = {normal = nemo.zeros(4), mix_uniform = 0.5}})
    T.is(g:get_state().offset, 0, "replayed draws leave the generator untouched")
    T.raises(function() fm:sample_sigmas(4, {draws = {normal = nemo.zeros(5), mix_uniform = 0.5}}) end,
        "draws.normal has shape (5,), the step needs (4,)", "a replayed draw of the wrong shape is an error")
end

-- ==== loss weights ====

do
    local sig = nemo.tensor({0, 0.25, 0.5, 0.9995, 1})
    local lin = FM.FlowMatching{flow_shift = 3.0}
    T.close(lin:loss_weights(sig), {1, 1.75, 2.5, 1 + 3 * 0.9995, 4}, 1e-7, 0, "linear: w = 1 + 3 sigma")
    T.close(FM.FlowMatching{use_loss_weighting = false}:loss_weights(sig), {1, 1, 1, 1, 1}, 0, 0, "no weighting: w = 1")
    local tbl = FM.bsmntw_table(1000)
    local sum, lo, top = 0, math.huge, 1
    for k = 1, 1000 do
        sum = sum + tbl[k]
        lo = math.min(lo, tbl[k])
        if tbl[k] > tbl[top] then top = k end
    end
    T.near(sum, 1000, 1e-9, "bsmntw table sums to T")
    T.near(lo, 0, 0, "bsmntw table minimum is 0")
    T.is(top - 1, 500, "bsmntw table peaks at k = T/2")
    local bs = FM.FlowMatching{loss_weighting_scheme = "bsmntw"}
    T.close(bs:loss_weights(sig), {tbl[1], tbl[251], tbl[501], tbl[1000], tbl[1000]}, 1e-6, 0,
        "bsmntw: w = table[clamp(floor(sigma T), 0, T-1)]")
end

-- ==== Flux packing and ids ====

do
    local x = nemo.randn({2, 3, 4, 6}, {generator = nemo.Generator(9)})
    local p = FM.pack_latents(x)
    T.is(nemo.Tensor.shape_str(p.shape), "(2, 6, 12)", "pack: [2,3,4,6] -> [2, 6, 12]")
    T.close(FM.unpack_latents(p, 4, 6), x, 0, 0, "unpack(pack(x)) == x exactly")
    -- hand-made: x[b,c,h,w] = 1000 b + 100 c + 10 h + w
    local vals = {}
    for b = 0, 1 do vals[b + 1] = {}
        for c = 0, 2 do vals[b + 1][c + 1] = {}
            for h = 0, 3 do vals[b + 1][c + 1][h + 1] = {}
                for w = 0, 5 do vals[b + 1][c + 1][h + 1][w + 1] = 1000 * b + 100 * c + 10 * h + w end end end end
    local packed = FM.pack_latents(nemo.tensor(vals, {dtype = "float64"})):tolist()
    local ok = true
    for b = 0, 1 do for i = 0, 1 do for j = 0, 2 do for c = 0, 2 do for dy = 0, 1 do for dx = 0, 1 do
        local got = packed[b + 1][i * 3 + j + 1][c * 4 + dy * 2 + dx + 1]
        if got ~= 1000 * b + 100 * c + 10 * (2 * i + dy) + (2 * j + dx) then ok = false end
    end end end end end end
    T.ok(ok, "pack: token i*(W/2)+j, channel c*4+dy*2+dx holds x[b, c, 2i+dy, 2j+dx]")
    local ids = FM.latent_image_ids(4, 6)
    T.close(ids, {{0, 0, 0}, {0, 0, 1}, {0, 0, 2}, {0, 1, 0}, {0, 1, 1}, {0, 1, 2}}, 0, 0,
        "img_ids of a 4x6 latent: [6, 3] rows (0, row, col), row-major")
    T.raises(function() FM.pack_latents(nemo.zeros(1, 2, 3, 4)) end, "must be even", "pack: odd size is an error")
end

-- ==== the step: draw order, adapters, dtypes ====

-- A stand-in transformer: records its inputs and returns a prediction derived from them.
local function stub(kind, opts)
    opts = opts or {}
    local rec = {}
    local w = nemo.tensor({0.5}, {requires_grad = true})
    local model = setmetatable({config = {guidance_embeds = opts.guidance}, rec = rec, w = w}, {__call = function(self, a)
        for k, v in pairs(a) do rec[k] = v end
        rec.n = (rec.n or 0) + 1
        return F.mul(a.hidden_states, self.w:to{dtype = a.hidden_states.dtype})
    end})
    return model, rec
end

do
    local fm = FM.FlowMatching{adapter_type = "flux", timestep_sampling = "logit_normal", logit_mean = 0.3, logit_std = 1.2,
                               mix_uniform_ratio = 0.25, cfg_dropout_prob = 0.5, guidance_scale = 2.0,
                               use_loss_weighting = false}
    local B = 3
    local batch = {image_latents = nemo.randn({B, 4, 4, 6}, {generator = nemo.Generator(1)}),
                   text_embeddings = nemo.randn({B, 5, 8}, {generator = nemo.Generator(2)}),
                   pooled_prompt_embeds = nemo.randn({B, 7}, {generator = nemo.Generator(3)}), data_type = "image"}
    local model, rec = stub("flux", {guidance = true})
    local loss, out = fm:step(model, batch, {generator = nemo.Generator(42), compute_dtype = "float32"})
    -- the same draws by hand, in the documented order: mix [1], u [B], noise, cfg [B]
    local g = nemo.Generator(42)
    local mix = nemo.empty({1}):uniform_(0, 1, {generator = g}):item()
    local want_u
    if mix < 0.25 then want_u = nemo.empty({B}):uniform_(0, 1, {generator = g})
    else want_u = nemo.empty({B}):normal_(0.3, 1.2, {generator = g}) end
    local noise = nemo.empty({B, 4, 4, 6}):normal_(0, 1, {generator = g})
    local cfgu = nemo.empty({B}):uniform_(0, 1, {generator = g})
    T.near(out.draws.mix_uniform, mix, 0, "draw order 1: the mix draw comes first")
    T.close(out.draws.uniform or out.draws.normal, want_u, 0, 0, "draw order 2: then u [B]")
    T.close(out.noise, noise, 0, 0, "draw order 3: then the noise")
    T.close(out.draws.cfg_uniform, cfgu, 0, 0, "draw order 4: then the flux cfg-dropout uniform [B]")
    T.is(loss.ndim, 0, "loss is 0-dim")
    T.ok(loss.requires_grad, "loss requires grad")
    local sv = out.sigma:reshape{B, 1, 1, 1}
    T.close(out.x_t, F.add(F.mul(F.sub(1.0, sv), batch.image_latents), F.mul(sv, noise)), 0, 0, "x_t = (1-sigma) x0 + sigma eps")
    T.close(out.target, F.sub(noise, batch.image_latents), 0, 0, "target = eps - x0")
    T.close(rec.hidden_states, FM.pack_latents(out.x_t), 0, 0, "flux: the model gets the packed x_t")
    T.close(rec.timestep, F.div(out.timesteps, 1000), 0, 0, "flux: timestep = t / 1000")
    T.close(rec.guidance, {2, 2, 2}, 0, 0, "flux: guidance = full(B, guidance_scale)")
    T.is(nemo.Tensor.shape_str(out.model_input.txt_ids.shape), "(3, 5, 3)", "flux: txt_ids zeros [B, L, 3] (Automodel's form)")
    T.is(nemo.Tensor.shape_str(rec.txt_ids.shape), "(5, 3)", "flux: the model gets txt_ids[0] (diffusers' 2-D form, no deprecation warning)")
    T.close(rec.img_ids, FM.latent_image_ids(4, 6), 0, 0, "flux: img_ids [(H/2)(W/2), 3]")
    local mask = list(cfgu)
    local te, pe = rec.encoder_hidden_states:tolist(), rec.pooled_projections:tolist()
    local src_te, src_pe = batch.text_embeddings:tolist(), batch.pooled_prompt_embeds:tolist()
    local ok = true
    for b = 1, B do
        local dropped = mask[b] < 0.5
        for l = 1, 5 do for d = 1, 8 do if te[b][l][d] ~= (dropped and 0 or src_te[b][l][d]) then ok = false end end end
        for d = 1, 7 do if pe[b][d] ~= (dropped and 0 or src_pe[b][d]) then ok = false end end
    end
    T.ok(ok, "flux: cfg dropout zeroes text and pooled of exactly the samples with u < p")
    local pred = list(out.pred)
    local want_loss = 0
    for i, t in ipairs(list(out.target)) do want_loss = want_loss + (pred[i] - t) ^ 2 end
    T.near(loss:item(), want_loss / #pred, 1e-6 * want_loss / #pred, "unweighted flux loss = mean((pred - target)^2), rel 1e-6")
    loss:backward()
    T.ok(model.w.grad ~= nil, "backward reaches the model's parameters")

    local l2 = fm:step(model, batch, {generator = nemo.Generator(42), compute_dtype = "float32"})
    T.near(l2:item(), loss:item(), 0, "same generator seed: same loss")

    -- guidance only with guidance embeddings
    local m2, rec2 = stub("flux", {guidance = false})
    fm:step(m2, batch, {generator = nemo.Generator(1)})
    T.ok(rec2.guidance == nil, "flux: a model without guidance_embeds gets no guidance (Automodel crashes here)")

    -- bf16 compute
    local _, ob = fm:step(model, batch, {generator = nemo.Generator(42), compute_dtype = "bfloat16"})
    T.is(ob.x_t.dtype .. "/" .. rec.timestep.dtype .. "/" .. ob.sigma.dtype, "bfloat16/bfloat16/float32",
        "bf16: x_t and timestep in bf16, sigma float32")
    T.close(rec.timestep, F.div(ob.timesteps:bfloat16(), 1000), 0, 0, "bf16: timestep = bf16(t) / 1000 in bf16")

    T.raises(function() fm:step(model, {text_embeddings = batch.text_embeddings}) end, "'video_latents' or 'image_latents'",
        "a batch without latents is an error")
    T.raises(function() fm:step(model, {image_latents = nemo.zeros(1, 4, 2, 4, 4), text_embeddings = nemo.zeros(1, 2, 8)}) end,
        "expects 4-D image latents", "flux with video latents is an error")
    T.raises(function() fm:step(model, batch, {generatr = 1}) end, "unknown option 'generatr'", "unknown step option")
    T.raises(function() fm:step(model, batch, {draws = {nois = 1}}) end, "unknown draw 'nois'", "unknown draw name")
    local bad = setmetatable({}, {__call = function() return nemo.zeros(B, 6, 7) end})
    T.raises(function() fm:step(bad, batch, {guidance = false}) end, "cannot be unpacked", "a model output of the wrong shape is an error")
end

-- the validation loss's options: a given sigma (no draw, no shift) and no cfg dropout
do
    local fm = FM.FlowMatching{adapter_type = "flux", timestep_sampling = "logit_normal", flow_shift = 3.0,
                               cfg_dropout_prob = 0.5, use_loss_weighting = true, loss_weighting_scheme = "linear"}
    local B = 3
    local batch = {image_latents = nemo.randn({B, 4, 4, 6}, {generator = nemo.Generator(1)}),
                   text_embeddings = nemo.randn({B, 5, 8}, {generator = nemo.Generator(2)}), data_type = "image"}
    local noise = nemo.randn({B, 4, 4, 6}, {generator = nemo.Generator(4)})
    local model, rec = stub("flux")
    local g = nemo.Generator(42)
    local loss, out = fm:step(model, batch, {generator = g, sigma = 0.3, cfg_dropout = false, draws = {noise = noise}})
    T.ok(g:get_state().offset == 0 and out.cfg_drop_mask == nil and out.method == "given",
        "step{sigma = 0.3, cfg_dropout = false}: nothing drawn, no text dropped")
    T.close(out.sigma, nemo.full({B}, 0.3), 0, 0, "step{sigma}: the sigma as given (no shift)")
    T.close(rec.encoder_hidden_states, batch.text_embeddings, 0, 0, "step{cfg_dropout = false}: the text as it is")
    local per = fm:sample_losses(out.pred, out.target, out.sigma, out.timesteps)
    T.near(per:mean():item(), loss:item(), 1e-7 * loss:item(), "sample_losses: their mean is the step's loss (rtol 1e-7)")
    local one = fm:step(model, {image_latents = batch.image_latents:narrow(0, 1, 1),
        text_embeddings = batch.text_embeddings:narrow(0, 1, 1), data_type = "image"},
        {sigma = 0.3, cfg_dropout = false, draws = {noise = noise:narrow(0, 1, 1)}})
    T.near(per:tolist()[2], one:item(), 1e-7 * one:item(), "sample_losses[2] == the step on sample 2 alone (rtol 1e-7)")
    T.raises(function() fm:step(model, batch, {sigma = nemo.ones({2})}) end, "opts.sigma must be a number or a %[3%] " ..
        "tensor, got %(2,%)", "step{sigma}: a tensor of the wrong length is an error")
end

do -- simple (Wan): t undivided, no cfg dropout draw, linear weighting
    local fm = FM.FlowMatching{adapter_type = "simple", timestep_sampling = "uniform", flow_shift = 3.0, cfg_dropout_prob = 0.1}
    local batch = {video_latents = nemo.randn({2, 4, 3, 4, 4}, {generator = nemo.Generator(1)}),
                   text_embeddings = nemo.randn({2, 6, 16}, {generator = nemo.Generator(2)})}
    local model, rec = stub("simple")
    local g = nemo.Generator(5)
    local loss, out = fm:step(model, batch, {generator = g})
    T.is(g:get_state().offset, 2 + 2 * 4 * 3 * 4 * 4, "simple: draws u [B] and the noise only (no mix, no cfg dropout)")
    T.close(rec.timestep, out.timesteps, 0, 0, "simple: timestep = sigma * 1000, not divided")
    T.close(rec.hidden_states, out.x_t, 0, 0, "simple: hidden_states = x_t unpacked")
    T.close(out.loss_weight, F.add(F.mul(out.sigma, 3), 1), 0, 0, "simple: linear weights 1 + 3 sigma")
    local pred, tgt, w = list(out.pred), list(out.target), list(out.loss_weight)
    local acc, per = 0, #pred / 2
    for i = 1, #pred do acc = acc + (pred[i] - tgt[i]) ^ 2 * w[math.floor((i - 1) / per) + 1] end
    T.near(loss:item(), acc / #pred, 1e-6 * acc / #pred, "weighted loss = mean(w * (pred - target)^2), rel 1e-6")
    T.is(out.data_type, "video", "data_type defaults to video")
    local big = setmetatable({}, {__call = function(_, a) return nemo.F.add(a.hidden_states, 1e3) end})
    T.raises(function() fm:step(big, batch, {generator = nemo.Generator(1), check_loss = true}) end, "loss exploded",
        "check_loss: a loss above 100 is an error")
    local called
    fm:step(model, batch, {call = function(m, inputs, kind) called = kind; return m(inputs) end})
    T.is(called, "simple", "opts.call replaces the model call")
end

-- ==== golden training steps ====

local function keys_of(path)
    local h = nemo.safe_open(path)
    local k = h:keys()
    h:close()
    return k
end

-- compare per key: max|a - ref| <= rtol * max|ref| + atol
local function check_keys(out, st, keys, rtol, atol, label)
    for _, k in ipairs(keys) do
        local ref = st[k]
        if ref == nil then T.ok(false, label .. ": key " .. k .. " missing in the golden file")
        else T.close(out[k], ref, rtol, atol, label .. " " .. k) end
    end
end

local function run_golden_stub(case, file, cfg, compute_dtype, rtol, atol, label, extra_draws)
    local st = nemo.load_file(case .. "/" .. file)
    st._keys = keys_of(case .. "/" .. file)
    local fm = FM.FlowMatching(cfg)
    local rec = {}
    local leaf
    local model = setmetatable({config = {guidance_embeds = true}}, {__call = function(_, a)
        for k, v in pairs(a) do rec["model_input." .. k] = v end
        leaf = (st.model_output or st.model_pred):clone()
        leaf.requires_grad = true
        return leaf
    end})
    local batch = {data_type = st["batch.image_latents"] and "image" or "video",
                   image_latents = st["batch.image_latents"], video_latents = st["batch.video_latents"],
                   text_embeddings = st["batch.text_embeddings"], pooled_prompt_embeds = st["batch.pooled_prompt_embeds"]}
    local draws = {normal = st["rng.normal"], uniform = st["rng.uniform"], noise = st["rng.noise"],
                   cfg_uniform = st["rng.cfg_uniform"]}
    for k, v in pairs(extra_draws or {}) do draws[k] = v end
    local loss, out = fm:step(model, batch, {compute_dtype = compute_dtype, draws = draws})
    local got = {u = out.u, sigma = out.sigma, timesteps = out.timesteps, x_t = out.x_t, target = out.target,
                 loss_weight = out.loss_weight, loss = loss, loss_unweighted = out.loss_unweighted}
    for k, v in pairs(out.model_input) do got["model_input." .. k] = v end
    local keys = {"u", "sigma", "timesteps", "x_t", "target", "loss_weight", "loss", "loss_unweighted"}
    for _, k in ipairs(st._keys) do if k:match("^model_input%.") then keys[#keys + 1] = k end end
    check_keys(got, st, keys, rtol, atol, label)
    if st.cfg_drop_mask then
        T.close(out.cfg_drop_mask:double(), st.cfg_drop_mask, 0, 0, label .. " cfg_drop_mask")
    end
    loss:backward()
    local gpred = (st.model_output and FM.unpack_latents(leaf.grad, st.x_t.shape[3], st.x_t.shape[4])) or leaf.grad
    T.close(gpred, st.grad_model_pred, rtol, atol, label .. " grad_model_pred")
    -- the same prediction scored with the other weighting schemes
    for _, scheme in ipairs {"linear", "bsmntw"} do
        local c2 = {}
        for k, v in pairs(cfg) do c2[k] = v end
        c2.use_loss_weighting, c2.loss_weighting_scheme = true, scheme
        local l2, o2 = FM.FlowMatching(c2):compute_loss(out.pred:detach(), out.target, out.sigma, out.timesteps)
        T.close(l2, st["loss_variant." .. scheme], rtol, atol, label .. " loss_variant." .. scheme)
        T.close(o2.loss_weight, st["loss_weight_variant." .. scheme], rtol, atol, label .. " loss_weight_variant." .. scheme)
    end
    return st, fm, batch, draws
end

local FLUX_CFG = {adapter_type = "flux", adapter_kwargs = {guidance_scale = 1.0, use_guidance_embeds = false},
                  timestep_sampling = "logit_normal", logit_mean = 0.0, logit_std = 1.0, flow_shift = 1.0,
                  mix_uniform_ratio = 0.0, sigma_min = 0.0, sigma_max = 1.0, num_train_timesteps = 1000,
                  i2v_prob = 0.0, use_loss_weighting = false, cfg_dropout_prob = 0.0}
local WAN_CFG = {adapter_type = "simple", timestep_sampling = "uniform", flow_shift = 3.0, mix_uniform_ratio = 0.1,
                 use_loss_weighting = true, loss_weighting_scheme = "linear"}

local flux_case, flux_why = golden.case("flow_flux_tiny")
local wan_case, wan_why = golden.case("flow_wan_tiny")

if flux_case then
    run_golden_stub(flux_case, "step.safetensors", FLUX_CFG, "float32", 1e-6, 1e-7, "flux golden f32")
    run_golden_stub(flux_case, "step_f64exact.safetensors", FLUX_CFG, "float64", 1e-12, 0, "flux golden f64exact")
    local cd = {}
    for k, v in pairs(FLUX_CFG) do cd[k] = v end
    cd.cfg_dropout_prob = 0.1
    run_golden_stub(flux_case, "step_cfgdrop.safetensors", cd, "float32", 1e-6, 1e-7, "flux golden cfgdrop")
else
    T.ok(false, "flux golden steps: " .. flux_why)
end
if wan_case then
    run_golden_stub(wan_case, "step.safetensors", WAN_CFG, "float32", 1e-6, 1e-7, "wan golden f32")
    run_golden_stub(wan_case, "step_f64exact.safetensors", WAN_CFG, "float64", 1e-12, 0, "wan golden f64exact")
else
    T.ok(false, "wan golden steps: " .. wan_why)
end

-- The full golden step with the real transformer: loss and every parameter gradient.
local function full_step(case, module, clsname, cfg)
    local st = nemo.load_file(case .. "/step.safetensors")
    local mod = require(module)
    local Cls = mod[clsname] or mod
    local model = Cls.from_pretrained(case, {torch_dtype = "float32"})
    local fm = FM.FlowMatching(cfg)
    local batch = {data_type = st["batch.image_latents"] and "image" or "video",
                   image_latents = st["batch.image_latents"], video_latents = st["batch.video_latents"],
                   text_embeddings = st["batch.text_embeddings"], pooled_prompt_embeds = st["batch.pooled_prompt_embeds"]}
    local loss, out = fm:step(model, batch, {compute_dtype = "float32",
        draws = {normal = st["rng.normal"], uniform = st["rng.uniform"], noise = st["rng.noise"]}})
    T.close(loss, st.loss, 1e-5, 0, clsname .. " full golden step: loss (rel 1e-5)")
    T.close(out.pred, st.model_pred, 2e-5, 1e-7, clsname .. " full golden step: model_pred")
    loss:backward()
    local worst, worst_name, missing, n = 0, nil, 0, 0
    local bad = {}
    for name, p in model:named_parameters() do
        local ref = st["grad." .. name]
        if ref == nil then missing = missing + 1
        else
            n = n + 1
            local rtol = name:match("embedder%.linear_1%.weight$") and 2e-3 or 5e-5
            local a, r = list(p.grad or nemo.zeros_like(p)), list(ref)
            local d, m = 0, 0
            for i = 1, #r do d = math.max(d, math.abs(a[i] - r[i])); m = math.max(m, math.abs(r[i])) end
            local rel = d / math.max(m, 1e-30)
            if d > rtol * m + 1e-7 then bad[#bad + 1] = string.format("%s rel %.2g", name, rel) end
            if rel > worst and not name:match("embedder%.linear_1%.weight$") then worst, worst_name = rel, name end
        end
    end
    T.ok(missing == 0 and n > 0, string.format("%s full golden step: every parameter has a golden grad (%d)", clsname, n))
    T.ok(#bad == 0, string.format("%s full golden step: %d parameter grads within rtol 5e-5 (2e-3 for the " ..
        "embedder linear_1 weights); worst other %.2g (%s)", clsname, n, worst, tostring(worst_name)), table.concat(bad, "\n"))
end

if not fs.isfile("lua/nemo/models/flux.lua") then
    T.skip("flux full golden step", "lua/nemo/models/flux.lua is absent")
elseif not flux_case then
    T.ok(false, "flux full golden step: " .. flux_why)
else
    local ok, err = pcall(full_step, flux_case, "nemo.models.flux", "FluxTransformer2DModel", FLUX_CFG)
    if not ok then T.ok(false, "flux full golden step ran", err) end
end
if not fs.isfile("lua/nemo/models/wan.lua") then
    T.skip("wan full golden step", "lua/nemo/models/wan.lua is absent")
elseif not wan_case then
    T.ok(false, "wan full golden step: " .. wan_why)
else
    local ok, err = pcall(full_step, wan_case, "nemo.models.wan", "WanTransformer3DModel", WAN_CFG)
    if not ok then T.ok(false, "wan full golden step ran", err) end
end

T.done()
