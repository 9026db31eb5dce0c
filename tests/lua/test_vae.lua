-- tests/lua/test_vae.lua: AutoencoderKL against diffusers' golden case vae_tiny (found by
-- tests/lua/golden.lua): parameter names, order, shapes and count; float32 and float64 encode
-- (moments, mean, logvar, std, var, kl), the posterior sample with the stored noise, the cached
-- latent (z - shift) * scale, decode, the reconstruction loss, every decoder parameter gradient
-- and the latent's gradient, against case.safetensors / case_f64exact.safetensors; then
-- forward / sampling / slicing / gradient checkpointing behaviour, save_pretrained /
-- from_pretrained round trips, deprecated attention names, config errors, a FLUX.1-shaped config
-- (shapes only) and the registry. Golden comparisons FAIL when the case is absent.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local F = nemo.F
local json = require "nemo.json"
local models = require "nemo.models"
local vae = require "nemo.models.vae"
local golden = require "golden"
local VAE = vae.AutoencoderKL
local shape_str = nemo.Tensor.shape_str

-- ==== helpers ====

local close = T.close   -- (it fails on a missing tensor and on differing shapes)
local bitwise = T.same_values
local tmpdir = T.tmpdir
local rmtree = T.rmtree

local function scalar(t) return t:double():reshape{-1}:tolist()[1] end

local TINY = {block_out_channels = {2, 4}, in_channels = 3, out_channels = 3,
              down_block_types = {"DownEncoderBlock2D", "DownEncoderBlock2D"},
              up_block_types = {"UpDecoderBlock2D", "UpDecoderBlock2D"}, latent_channels = 4, norm_num_groups = 2,
              use_quant_conv = false, use_post_quant_conv = false, scaling_factor = 0.3611, shift_factor = 0.1159}

local function with(cfg, changes)
    local c = {}
    for k, v in pairs(cfg) do c[k] = v end
    for k, v in pairs(changes) do c[k] = v end
    return c
end

-- ==== the golden case ====

local dir, why = golden.case("vae_tiny", "config.json")
local meta
if not dir then
    T.ok(false, "vae_tiny golden comparisons: " .. why)
else
    meta = json.read_file(dir .. "/golden.json")
end

-- the gradients that are exactly zero in exact arithmetic (compared with an atol only)
local function zero_grads()
    local z = {}
    local obs = meta.tolerances_observed.f32_vs_f64exact["grad.* exactly zero in exact arithmetic"]
    for k in pairs(obs) do z[k:gsub("^grad%.", "")] = true end
    return z
end

-- tol: {out = rtol, grad = rtol, zero_atol = atol for the exactly-zero gradients, atol = atol}
local function golden_run(dtype, file, tol)
    local tag = "vae_tiny " .. (dtype == "float32" and "f32" or "f64")
    local m = VAE.from_pretrained(dir, {torch_dtype = dtype})
    T.is(m.encoder.conv_in.weight.dtype, dtype, tag .. ": from_pretrained torch_dtype=" .. dtype)
    local c = nemo.load_file(dir .. "/" .. file)
    local x = c["input.sample"]
    local rt, at = tol.out, tol.atol
    local sfx = string.format(" [rtol %g, atol %g]", rt, at)

    -- encode
    local post = m:encode(x).latent_dist
    close(post.parameters, c["posterior.moments"], rt, at, tag .. " posterior.moments" .. sfx)
    for _, k in ipairs {"mean", "logvar", "std", "var"} do
        close(post[k], c["posterior." .. k], rt, at, tag .. " posterior." .. k .. sfx)
    end
    close(post:kl(), c["posterior.kl"], rt, at, tag .. " posterior.kl" .. sfx)
    T.is(post.mean.dtype, dtype, tag .. ": the posterior is " .. dtype)

    -- z = mean + std * noise (the stored torch draw), and the cached latent
    local z = post:sample{noise = c["rng.noise"]}
    close(z, c["latent.z"], rt, at, tag .. " latent.z = mean + std * rng.noise" .. sfx)
    local manual = post.mean + post.std * c["rng.noise"]
    T.ok(bitwise(z, manual), tag .. ": sample{noise=} is exactly mean + std * noise")
    local cached = (z - m.config.shift_factor) * m.config.scaling_factor
    close(cached, c["latent.cached"], rt, at, tag .. " latent.cached = (z - shift_factor) * scaling_factor" .. sfx)

    -- decode the stored z (detached, a leaf), the reconstruction loss, backward
    local zin = c["latent.z"]:to{dtype = dtype, copy = true}:requires_grad_(true)
    m:zero_grad()
    local dec = m:decode(zin).sample
    close(dec, c["decode.sample"], rt, at, tag .. " decode.sample" .. sfx)
    local loss = F.mse_loss(dec, x)
    local lv, lref = loss:item(), scalar(c.loss)
    T.ok(math.abs(lv - lref) <= rt * math.abs(lref), string.format("%s loss %.12g vs %.12g: rel %.3g <= %g", tag, lv,
        lref, math.abs(lv - lref) / math.abs(lref), rt))
    loss:backward()
    close(zin.grad, c["grad_input.z"], tol.grad, at, tag .. string.format(" grad_input.z [rtol %g, atol %g]", tol.grad, at))

    local zeros = zero_grads()
    local all_ok, n, worst, worst_name, worst_zero = true, 0, 0, "", 0
    for _, k in ipairs(meta.decoder_param_names) do
        local p = m:get_parameter(k)
        local ref = c["grad." .. k]
        n = n + 1
        if p.grad == nil or ref == nil then
            all_ok = false
            T.ok(false, string.format("%s grad.%s: %s", tag, k, p.grad == nil and "no gradient" or "no reference"))
        else
            local d, r = T.maxdiff(p.grad, ref)
            local lim = zeros[k] and tol.zero_atol or (tol.grad * r + at)
            if not (d <= lim) then
                all_ok = false
                T.ok(false, string.format("%s grad.%s: max_abs %.3g <= %.3g%s", tag, k, d, lim,
                    zeros[k] and " (exactly zero in exact arithmetic)" or ""))
            end
            if zeros[k] then
                if d > worst_zero then worst_zero = d end
            elseif r > 0 and d / r > worst then
                worst, worst_name = d / r, k
            end
        end
    end
    local nzero = 0
    for _ in pairs(zeros) do nzero = nzero + 1 end
    T.ok(all_ok and n == #meta.decoder_param_names and n > 0, string.format("%s: all %d decoder parameter gradients " ..
        "within rtol %g * max|ref| + atol %g; worst rel %.3g (%s); the %d exactly-zero ones within atol %g (worst %.3g)",
        tag, n, tol.grad, at, worst, worst_name, nzero, tol.zero_atol, worst_zero))
    local enc_grads = 0
    for name, p in m:named_parameters() do
        if name:match("^encoder%.") and p.grad ~= nil then enc_grads = enc_grads + 1 end
    end
    T.is(enc_grads, 0, tag .. ": the encoder gets no gradient (z is detached)")
    return m
end

if dir then
    -- names, order, shapes and count
    local m = VAE.from_pretrained(dir)
    local sd, keys = m:state_dict()
    local order_ok = #keys == #meta.state_dict_keys
    for i, k in ipairs(meta.state_dict_keys) do order_ok = order_ok and keys[i] == k end
    T.ok(order_ok, string.format("vae_tiny: %d state_dict keys in diffusers' order", #keys))
    local wf = nemo.load_file(dir .. "/diffusion_pytorch_model.safetensors")
    local shapes_ok, nfile = true, 0
    for k, t in pairs(wf) do
        nfile = nfile + 1
        if sd[k] == nil or shape_str(sd[k].shape) ~= shape_str(t.shape) then
            shapes_ok = false
            T.diag("shape or name mismatch: " .. k)
        end
    end
    T.ok(shapes_ok and nfile == #keys, "vae_tiny: parameter names and shapes equal the golden weight file's")
    T.is(m:num_parameters(), 3353, "vae_tiny: 3,353 parameters (diffusers' count)")
    T.is(meta.num_params, 3353, "vae_tiny: golden.json num_params agrees")
    T.ok(m.quant_conv == nil and m.post_quant_conv == nil, "use_quant_conv / use_post_quant_conv false: no quant convs")
    T.ok(m.config.scaling_factor == 0.3611 and m.config.shift_factor == 0.1159 and m.config.latents_mean == json.null,
        "config passthrough: scaling_factor, shift_factor, latents_mean null")

    golden_run("float32", "case.safetensors", {out = 2e-5, grad = 5e-5, atol = 1e-7, zero_atol = 1e-7})
    golden_run("float64", "case_f64exact.safetensors", {out = 1e-9, grad = 1e-9, atol = 0, zero_atol = 1e-15})

    -- save_pretrained / from_pretrained round trip
    local out = tmpdir()
    m:save_pretrained(out)
    local saved, ref = json.read_file(out .. "/config.json"), json.read_file(dir .. "/config.json")
    local same, nk = true, 0
    for k, v in pairs(ref) do
        nk = nk + 1
        if k ~= "_diffusers_version" and json.encode(saved[k]) ~= json.encode(v) then
            same = false
            T.diag(string.format("config.json %s: saved %s vs diffusers %s", k, json.encode(saved[k]), json.encode(v)))
        end
    end
    for k in pairs(saved) do if ref[k] == nil then same = false; T.diag("extra config key " .. k) end end
    T.ok(same and nk > 0, "save_pretrained: config.json has diffusers' keys and values (lists as arrays, nulls)")
    local m2 = VAE.from_pretrained(out)
    local sd2 = m2:state_dict()
    local eq = true
    for _, k in ipairs(keys) do eq = eq and bitwise(sd[k], sd2[k]) end
    T.ok(eq, "round trip: every tensor equal")
    local c = nemo.load_file(dir .. "/case.safetensors")
    local x = c["input.sample"]:narrow(0, 0, 2)
    local r1 = nemo.no_grad(function() return m(x).sample end)
    local r2 = nemo.no_grad(function() return m2(x).sample end)
    T.ok(bitwise(r1, r2), "round trip: same reconstruction (bitwise)")

    -- old checkpoints naming the attention projections query/key/value/proj_attn
    local old = {}
    for k, t in pairs(nemo.load_file(dir .. "/diffusion_pytorch_model.safetensors")) do
        local k2 = k:gsub("attentions%.0%.to_q%.", "attentions.0.query."):gsub("attentions%.0%.to_k%.", "attentions.0.key.")
            :gsub("attentions%.0%.to_v%.", "attentions.0.value."):gsub("attentions%.0%.to_out%.0%.", "attentions.0.proj_attn.")
        old[k2] = t
    end
    T.ok(old["encoder.mid_block.attentions.0.proj_attn.weight"] ~= nil, "(deprecated names written)")
    nemo.save_file(old, out .. "/diffusion_pytorch_model.safetensors", {format = "pt"})
    local m3 = VAE.from_pretrained(out)
    T.ok(bitwise(nemo.no_grad(function() return m3(x).sample end), r1),
        "deprecated attention names (query/key/value/proj_attn) load as to_q/to_k/to_v/to_out.0")
    rmtree(out)

    -- forward: mode by default; sample_posterior with a generator; return_dict=false
    local post = nemo.no_grad(function() return m:encode(x).latent_dist end)
    local via_mode = nemo.no_grad(function() return m:decode(post:mode()).sample end)
    T.ok(bitwise(r1, via_mode), "vae(x) = decode(encode(x).latent_dist:mode()) (bitwise)")
    local s1 = nemo.no_grad(function() return m(x, {sample_posterior = true, generator = nemo.Generator(5)}).sample end)
    local s2 = nemo.no_grad(function() return m(x, {sample_posterior = true, generator = nemo.Generator(5)}) end)
    T.ok(bitwise(s1, s2.sample) and not bitwise(s1, r1), "sample_posterior with a generator: reproducible, not the mode")
    local tup = nemo.no_grad(function() return m(x, {return_dict = false}) end)
    T.ok(bitwise(tup[1], r1), "return_dict=false returns {sample}")
    T.raises(function() return m(x, {sample_posteriour = true}) end, "unknown option 'sample_posteriour'",
        "an unknown forward option is an error naming it")
    T.raises(function() return m:decode(x) end, "expected latents %(B, 4, H, W%)", "decode of an image: error with shapes")
    T.raises(function() return post:sample{noise = nemo.zeros(1, 4, 16, 16)} end, "noise must have the mean's shape",
        "sample with noise of the wrong shape: error")

    -- slicing: one sample at a time, the same values
    m:enable_slicing()
    local sl = nemo.no_grad(function() return m(x).sample end)
    m:disable_slicing()
    close(sl, r1, 1e-6, 0, "enable_slicing: same reconstruction")
    -- tiling: tests/lua/test_vae_tiling.lua

    -- gradient checkpointing: bitwise equal gradients (encoder and decoder)
    local function grads(ckpt)
        if ckpt then m:enable_gradient_checkpointing() else m:disable_gradient_checkpointing() end
        m:zero_grad()
        local xx = x:clone():requires_grad_(true)
        local loss = F.mse_loss(m(xx).sample, x)
        loss:backward()
        local g = {}
        for name, p in m:named_parameters() do g[name] = p.grad end
        return loss:item(), g, xx.grad
    end
    local l0, g0, gx0 = grads(false)
    local l1, g1, gx1 = grads(true)
    local all, n = l0 == l1 and bitwise(gx0, gx1), 0
    for name, g in pairs(g0) do
        n = n + 1
        if not bitwise(g, g1[name]) then all = false; T.diag("differs: " .. name) end
    end
    T.ok(all and n == #keys, string.format("gradient checkpointing: loss, input gradient and all %d parameter " ..
        "gradients bitwise equal", n))
    m:disable_gradient_checkpointing()

    -- bf16
    local mb = VAE.from_pretrained(dir, {torch_dtype = "bfloat16"})
    local rb = nemo.no_grad(function() return mb(x:to{dtype = "bfloat16"}).sample end)
    T.is(rb.dtype, "bfloat16", "bf16 VAE: bf16 output")
    -- diffusers' own bf16 run of this model is 0.129 (4.5% of max|ref|) off its float32 one
    close(rb, r1, 0.1, 0, "bf16 reconstruction vs float32 (bf16 tolerance)")
end

-- ==== pieces ====

do  -- Downsample2D's (0, 1, 0, 1) padding done in the conv = F.pad then the conv
    nemo.manual_seed(3)
    local d = vae.Downsample2D(3, {padding = 0})
    local x = nemo.randn(2, 3, 8, 7)
    local ref = F.conv2d(F.pad(x, {0, 1, 0, 1}), d.conv.weight, d.conv.bias, {stride = 2})
    local y = nemo.no_grad(function() return d(x) end)
    T.is(shape_str(y.shape), "(2, 3, 4, 3)", "Downsample2D padding 0: (8, 7) -> (4, 3)")
    close(y, ref, 1e-6, 0, "Downsample2D padding 0 = F.pad(x, (0,1,0,1)) then the stride-2 conv")
end

do  -- DiagonalGaussianDistribution
    local g = nemo.Generator(4)
    local moments = nemo.randn({2, 6, 3, 3}, {generator = g})
    local d = vae.DiagonalGaussianDistribution(moments)
    close(d:kl(d), nemo.zeros(2), 0, 1e-12, "kl(self, self) = 0")
    local dd = vae.DiagonalGaussianDistribution(moments:detach() * 0 + 50)
    T.ok(dd.logvar:max():item() == 20, "logvar clamped to 20")
    local det = vae.DiagonalGaussianDistribution(moments, true)
    T.ok(det.std:abs():max():item() == 0 and bitwise(det:sample(g), det.mean) and scalar(det:kl()) == 0,
        "deterministic: std 0, sample = mean, kl 0")
    T.raises(function() return vae.DiagonalGaussianDistribution(nemo.zeros(2, 5, 3, 3)) end, "even channel count",
        "odd channel count: error")
end

-- ==== config ====

do
    local m = VAE{}
    T.ok(m.config.block_out_channels[1] == 64 and m.config.norm_num_groups == 32 and m.config.latent_channels == 4 and
        m.config.scaling_factor == 0.18215 and m.config.shift_factor == json.null and m.config.force_upcast == true and
        m.quant_conv ~= nil and m.post_quant_conv ~= nil and m.config.layers_per_block == 1,
        "defaults as diffusers: block_out_channels {64}, 32 groups, latent 4, scaling 0.18215, shift null, quant convs")
    local function bad(changes, pattern, name) T.raises(function() return VAE(with(TINY, changes)) end, pattern, name) end
    bad({block_out_channels = 4}, "config key 'block_out_channels' must be a non%-empty list",
        "block_out_channels not a list: error names the key")
    bad({norm_num_groups = 3}, "config key 'norm_num_groups' %(3%) must divide", "groups not dividing the channels: error")
    bad({down_block_types = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"}},
        "'down_block_types' entry 2: block type 'AttnDownEncoderBlock2D' is not supported", "unsupported block type: error")
    bad({up_block_types = {"UpDecoderBlock2D"}}, "config key 'up_block_types' has 1 entries but block_out_channels has 2",
        "block list lengths differ: error")
    bad({act_fn = "mish"}, "config key 'act_fn' must be one of", "unsupported act_fn: error names the key")
    bad({scaling_factor = "0.3"}, "config key 'scaling_factor' must be a number", "scaling_factor a string: error")
    bad({shift_factor = true}, "config key 'shift_factor' must be a number or null", "shift_factor a boolean: error")
    bad({use_quant_conv = 0}, "config key 'use_quant_conv' must be a boolean", "use_quant_conv not a boolean: error")
    bad({latents_mean = {0.1, 0.2}}, "config key 'latents_mean' has 2 entries but latent_channels is 4",
        "latents_mean of the wrong length: error")
    bad({layers_per_block = 0}, "config key 'layers_per_block' must be at least 1", "layers_per_block 0: error")
    local m2 = VAE(with(TINY, {latents_mean = {1, 2, 3, 4}, latents_std = {5, 6, 7, 8}, sample_size = {32, 48},
        _class_name = "AutoencoderKL", _use_default_values = {"x"}}))
    T.ok(m2.config.latents_mean[4] == 4 and m2.config.latents_std[1] == 5 and m2.config.sample_size[2] == 48 and
        m2.config._class_name == nil, "latents_mean/std and a list sample_size pass through; _ keys dropped")
    local out = tmpdir()
    m2:save_pretrained(out)
    local cj = json.read_file(out .. "/config.json")
    T.ok(cj.latents_std[4] == 8 and cj.sample_size[1] == 32 and cj._class_name == "AutoencoderKL",
        "save_pretrained writes latents_mean/std and sample_size lists")
    rmtree(out)
end

-- ==== a FLUX.1-shaped VAE (random weights, shapes only) ====

do
    local cfg = {block_out_channels = {128, 256, 512, 512}, latent_channels = 16, layers_per_block = 2,
        norm_num_groups = 32, down_block_types = {"DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
        "DownEncoderBlock2D"}, up_block_types = {"UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
        "UpDecoderBlock2D"}, use_quant_conv = false, use_post_quant_conv = false, scaling_factor = 0.3611,
        shift_factor = 0.1159, sample_size = 1024}
    nemo.manual_seed(0)
    local m = VAE(cfg)
    local n, nt = 0, 0
    for _, p in ipairs(m:parameters()) do n = n + p:numel(); nt = nt + 1 end
    T.ok(n == 83819683 and nt == 244, string.format("FLUX.1 VAE config: %d parameters in %d tensors " ..
        "(diffusers: 83,819,683 in 244)", n, nt))
    T.is(m.vae_scale_factor, 8, "FLUX.1 VAE: vae_scale_factor 8")
    local x = nemo.rand({1, 3, 16, 16}, {generator = nemo.Generator(1)}) * 2 - 1
    local post = nemo.no_grad(function() return m:encode(x).latent_dist end)
    T.is(shape_str(post.parameters.shape), "(1, 32, 2, 2)", "FLUX.1 VAE: moments (1, 2*16, 16/8, 16/8)")
    T.is(shape_str(post.mean.shape), "(1, 16, 2, 2)", "FLUX.1 VAE: latent (1, 16, 2, 2)")
    local dec = nemo.no_grad(function() return m:decode(post:sample(nemo.Generator(2))).sample end)
    T.is(shape_str(dec.shape), "(1, 3, 16, 16)", "FLUX.1 VAE: decode back to (1, 3, 16, 16)")
    local finite = dec:abs():max():item()
    T.ok(finite == finite and finite < math.huge, "FLUX.1 VAE: finite output")
end

-- ==== registry ====

T.ok(models.AutoencoderKL == VAE and models.get("AutoencoderKL") == VAE and
    require("nemo.pipeline")._import_diffusers_class("AutoencoderKL") == VAE,
    "AutoencoderKL is in the model registry (models.get, pipeline class import)")

T.done()
