-- tests/lua/test_wan_vae.lua: AutoencoderKLWan (nemo.models.wan_vae, the Wan 2.1 video VAE)
-- against diffusers' golden case wan_vae_tiny (tests/golden/wan_vae_tiny/make_golden.py, found
-- by tests/lua/golden.lua): parameter names, order, shapes and count; encode (posterior mean,
-- logvar) and decode (of the reference mean, clamped) of a 5-frame and a 9-frame batch-2 video in
-- float32 (vs diffusers float32), float64 (vs diffusers float64 without WanUpsample's float32
-- round trip) and bf16 (vs diffusers bf16 with the MATH SDPA backend); the causal conv's cache
-- rule; errors (frame counts that are not 1 + 4k, sizes, channels, the Wan 2.2 config, attn_scales);
-- save_pretrained / from_pretrained round trip; the default (Wan 2.1) config's parameter names and
-- shapes. Golden comparisons FAIL when the case is absent.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local F = nemo.F
local json = require "nemo.json"
local common = require "nemo.models.common"
local wv = require "nemo.models.wan_vae"
local golden = require "golden"
local VAE = wv.AutoencoderKLWan
local shape_str = nemo.Tensor.shape_str

-- ==== helpers ====

local function flat(t) return t:detach():double():contiguous():reshape{-1}:tolist() end

local close = T.close   -- (it fails on a missing tensor and on differing shapes)
local bitwise = T.same_values

-- the fraction of elements of a and b that are exactly equal
local function equal_fraction(a, b)
    local fa, fb = flat(a), flat(b)
    local k = 0
    for i = 1, #fa do if fa[i] == fb[i] then k = k + 1 end end
    return k / #fa
end

local tmpdir = T.tmpdir
local rmtree = T.rmtree

local function ng(fn) return nemo.no_grad(fn) end

local CASES = {v5 = {latent = "(1, 4, 2, 2, 2)", video = "(1, 3, 5, 16, 16)"},
               v9 = {latent = "(2, 4, 3, 1, 2)", video = "(2, 3, 9, 8, 16)"}}
local ORDER = {"v5", "v9"}

-- ==== the golden case ====

local dir, why = golden.case("wan_vae_tiny", "case.safetensors")
local meta
if not dir then
    T.ok(false, "wan_vae_tiny golden comparisons: " .. why)
else
    meta = json.read_file(dir .. "/golden.json")
end

-- run the two videos through a model of `dtype`; compare with the case file's tensors.
-- tol = {enc = rtol for mean / logvar, dec = rtol for the decode, decode_f32_mean = decode the
-- float32 <v>.mean cast to dtype (what the bf16 case did) instead of the file's own <v>.mean};
-- the inputs come from case.safetensors (float32) cast to dtype.
local function golden_run(dtype, file, tol, tag)
    local m = VAE.from_pretrained(dir, {torch_dtype = dtype})
    T.is(m:dtype(), dtype, tag .. ": from_pretrained torch_dtype=" .. dtype)
    local c32 = nemo.load_file(dir .. "/case.safetensors")
    local c = nemo.load_file(dir .. "/" .. file)
    local res = {}
    for _, v in ipairs(ORDER) do
        local x = c32[v .. ".input"]:to{dtype = dtype}
        local post = ng(function() return m:encode(x).latent_dist end)
        T.is(shape_str(post.mean.shape), CASES[v].latent, string.format("%s %s: latent shape %s", tag, v,
            CASES[v].latent))
        T.is(post.mean.dtype, dtype, tag .. " " .. v .. ": the posterior is " .. dtype)
        local sfx = string.format(" [rtol %g]", tol.enc)
        close(post.mean, c[v .. ".mean"], tol.enc, 0, tag .. " " .. v .. " encode mean" .. sfx)
        close(post.logvar, c[v .. ".logvar"], tol.enc, 0, tag .. " " .. v .. " encode logvar" .. sfx)
        local z = tol.decode_f32_mean and c32[v .. ".mean"]:to{dtype = dtype} or c[v .. ".mean"]
        local dec = ng(function() return m:decode(z).sample end)
        T.is(shape_str(dec.shape), CASES[v].video, string.format("%s %s: decoded shape %s", tag, v, CASES[v].video))
        close(dec, c[v .. ".decode"], tol.dec, 0, tag .. " " .. v .. " decode(mean)" ..
            string.format(" [rtol %g]", tol.dec))
        res[v] = {post = post, dec = dec, x = x, m = m, ref = c}
    end
    return m, res
end

if dir then
    -- names, order, shapes and count
    local m = VAE.from_pretrained(dir)
    local sd, keys = m:state_dict()
    local order_ok = #keys == #meta.state_dict_keys
    for i, k in ipairs(meta.state_dict_keys) do order_ok = order_ok and keys[i] == k end
    T.ok(order_ok, string.format("wan_vae_tiny: %d state_dict keys in diffusers' order", #keys))
    local wf = nemo.load_file(dir .. "/diffusion_pytorch_model.safetensors")
    local shapes_ok, nfile = true, 0
    for k, t in pairs(wf) do
        nfile = nfile + 1
        if sd[k] == nil or shape_str(sd[k].shape) ~= shape_str(t.shape) then
            shapes_ok = false
            T.diag("shape or name mismatch: " .. k)
        end
    end
    T.ok(shapes_ok and nfile == #keys, string.format("wan_vae_tiny: the %d parameter names and shapes equal the " ..
        "golden weight file's", nfile))
    T.is(m:num_parameters(), meta.num_params, string.format("wan_vae_tiny: %d parameters (diffusers' count)",
        meta.num_params))
    T.is(sd["encoder.mid_block.attentions.0.norm.gamma"] and shape_str(sd["encoder.mid_block.attentions.0.norm.gamma"].shape),
        "(6, 1, 1)", "the attention's RMS gamma is (C, 1, 1); the resnets' are (C, 1, 1, 1)")

    -- float32: diffusers' f32 vs its f64 run differs by up to 4.9e-6 * max|ref| (golden.json)
    local _, r32 = golden_run("float32", "case.safetensors", {enc = 2e-5, dec = 2e-5}, "f32")
    for _, v in ipairs(ORDER) do
        local dec, c = r32[v].dec, r32[v].ref
        local hi, lo = dec:max():item(), dec:min():item()
        local nclamp = dec:abs():eq(1):double():sum():item()
        local nref = c[v .. ".decode"]:abs():eq(1):double():sum():item()
        T.ok(hi <= 1 and lo >= -1 and nclamp > 0 and math.abs(nclamp - nref) <= 2, string.format(
            "f32 %s: decode clamped to [-1, 1] (%d values at +-1, diffusers %d)", v, nclamp, nref))
        -- encode -> mode -> decode in one call
        local rec = ng(function() return r32[v].m(r32[v].x).sample end)
        close(rec, c[v .. ".decode"], 1e-4, 0, "f32 " .. v .. " vae(x) = decode(encode(x).mode()) vs diffusers [rtol 1e-4]")
        local post = r32[v].post
        close(post.std, (0.5 * c[v .. ".logvar"]):exp(), 2e-5, 0, "f32 " .. v .. " posterior std = exp(logvar / 2)")
    end

    -- float64: vs diffusers in float64 (WanUpsample's float32 round trip removed); measured 6e-15
    golden_run("float64", "case_f64exact.safetensors", {enc = 1e-12, dec = 1e-12}, "f64")

    -- bf16: vs diffusers bf16 with the MATH SDPA (then every op rounds as nemo's: measured
    -- bitwise but for 0.1% of one decode, max 0.002). The tolerances leave room for rounding
    -- flips from another CPU's float32 accumulation order; a wrongly rounded op shows up larger
    -- (diffusers' default flash SDPA alone moves the decode by 0.07-0.1, golden.json
    -- bf16_flash_vs_math; bf16 vs float32 is 0.07-0.13).
    local mb, rb = golden_run("bfloat16", "case_bf16.safetensors", {enc = 2e-2, dec = 5e-2,
        decode_f32_mean = true}, "bf16")
    local fr = {}
    for _, v in ipairs(ORDER) do
        fr[#fr + 1] = string.format("%s mean %.3f decode %.3f", v, equal_fraction(rb[v].post.mean, rb[v].ref[v .. ".mean"]),
            equal_fraction(rb[v].dec, rb[v].ref[v .. ".decode"]))
    end
    T.ok(rb.v5.dec.dtype == "bfloat16" and mb.encoder.conv_in.weight.dtype == "bfloat16",
        "bf16 model: bf16 weights and output; bitwise-equal fractions vs diffusers: " .. table.concat(fr, ", "))

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
    T.ok(same and nk > 0, "save_pretrained: config.json has diffusers' keys and values (attn_scales [], nulls)")
    local text = T.read_bytes(out .. "/config.json")
    T.ok(text:find('"attn_scales": %[%]') ~= nil, "save_pretrained: an empty attn_scales is written as []")
    local m2 = VAE.from_pretrained(out)
    local sd2 = m2:state_dict()
    local eq = true
    for _, k in ipairs(keys) do eq = eq and bitwise(sd[k], sd2[k]) end
    T.ok(eq, "round trip: every tensor equal")
    local x5 = r32.v5.x
    T.ok(bitwise(ng(function() return m2(x5).sample end), ng(function() return m(x5).sample end)),
        "round trip: same reconstruction (bitwise)")
    rmtree(out)

    -- forward options, sampling, slicing
    local x9 = r32.v9.x
    local post = ng(function() return m:encode(x9).latent_dist end)
    T.ok(rawequal(post:mode(), post.mean), "posterior:mode() is the mean")
    local noise = nemo.randn({2, 4, 3, 1, 2}, {generator = nemo.Generator(7)})
    T.ok(bitwise(post:sample{noise = noise}, post.mean + post.std * noise), "posterior:sample{noise=} = mean + std * noise")
    local s1 = ng(function() return m(x9, {sample_posterior = true, generator = nemo.Generator(5)}).sample end)
    local s2 = ng(function() return m(x9, {sample_posterior = true, generator = nemo.Generator(5)}).sample end)
    local r1 = ng(function() return m(x9).sample end)
    T.ok(bitwise(s1, s2) and not bitwise(s1, r1), "sample_posterior with a generator: reproducible, not the mode")
    T.ok(bitwise(ng(function() return m(x9, {return_dict = false}) end)[1], r1), "return_dict=false returns {sample}")
    T.ok(bitwise(ng(function() return m:encode(x9, {return_dict = false}) end)[1].mean, post.mean),
        "encode{return_dict=false} returns {posterior}")
    T.raises(function() return m(x9, {sample_posteriour = true}) end, "unknown option 'sample_posteriour'",
        "an unknown forward option is an error naming it")
    m:enable_slicing()
    local sl = ng(function() return m(x9).sample end)
    local slp = ng(function() return m:encode(x9).latent_dist end)
    m:disable_slicing()
    close(slp.mean, post.mean, 1e-6, 0, "enable_slicing: the same posterior mean, one video at a time")
    close(sl, r1, 1e-6, 0, "enable_slicing: the same reconstruction")
    -- tiling: tests/lua/test_vae_tiling.lua

    -- errors: frame counts, sizes, channels
    local function vid(f, h, w, c) return nemo.zeros(1, c or 3, f, h or 16, w or 16) end
    T.raises(function() return m:encode(vid(4)) end, "expected F = 1 %+ 4k frames .-got F = 4",
        "encode of 4 frames (not 1 + 4k): a clear error")
    T.raises(function() return m:encode(vid(6)) end, "got F = 6", "encode of 6 frames: a clear error")
    T.raises(function() return m:encode(vid(5, 12, 16)) end, "H and W to be positive multiples of 8, got 12x16",
        "H not a multiple of 8: error")
    T.raises(function() return m:encode(vid(5, 16, 16, 4)) end, "expected a video %(B, 3, F, H, W%)",
        "4 input channels: error with the shapes")
    T.raises(function() return m:encode(nemo.zeros(1, 3, 16, 16)) end, "expected a video %(B, 3, F, H, W%), got shape",
        "an image (4-D) to encode: error")
    T.raises(function() return m:decode(nemo.zeros(1, 3, 2, 2, 2)) end, "expected latents %(B, 4, T, h, w%)",
        "decode of latents with the wrong channel count: error")
    T.raises(function() return m:decode("z") end, "expected a tensor", "decode of a non-tensor: error")
    local one = ng(function() return m:encode(vid(1)).latent_dist.mean end)
    T.is(shape_str(one.shape), "(1, 4, 1, 2, 2)", "a single frame encodes to one latent frame")
    T.is(shape_str(ng(function() return m:decode(one).sample end).shape), "(1, 3, 1, 16, 16)",
        "one latent frame decodes to one frame")
end

-- ==== the causal conv and its cache ====

do  -- conv of a whole clip = conv of chunk 1, then chunk 2 with chunk 1's last 2 frames as cache
    nemo.manual_seed(11)
    local conv = wv.WanCausalConv3d(3, 5, 3, {padding = 1})
    local x = nemo.randn(2, 3, 7, 6, 5)
    local full = ng(function() return conv(x) end)
    local ref = ng(function() return F.conv3d(F.pad(x, {1, 1, 1, 1, 2, 0}), conv.weight, conv.bias) end)
    close(full, ref, 1e-6, 0, "WanCausalConv3d = F.pad(x, (1, 1, 1, 1, 2, 0)) then conv3d (time padded on the left only)")
    local a, b = x:narrow(2, 0, 3), x:narrow(2, 3, 4)
    local y = ng(function() return F.cat({conv(a), conv(b, a:narrow(2, 1, 2))}, 2) end)
    close(y, full, 1e-6, 0, "a 2-frame cache in front replaces the zero padding (chunked = whole)")
    local y1 = ng(function() return conv(b, a:narrow(2, 2, 1)) end)
    local ref1 = ng(function() return F.conv3d(F.pad(F.cat({a:narrow(2, 2, 1), b}, 2), {1, 1, 1, 1, 1, 0}), conv.weight,
        conv.bias) end)
    close(y1, ref1, 1e-6, 0, "a 1-frame cache: one zero frame, then the cache, then x")
    local p = wv.WanCausalConv3d(3, 3, 1)
    local z = ng(function() return p(x, x:narrow(2, 0, 2)) end)
    T.is(shape_str(z.shape), shape_str(x.shape), "a 1x1x1 conv ignores the cache (no time padding to replace)")
end

do  -- RMS norm
    nemo.manual_seed(12)
    local n = wv.WanRMS_norm(4, {images = false})
    local x = nemo.randn(2, 4, 3, 2, 2)
    local ref = x / (x:pow(2):sum(1, true):sqrt()) * 2.0
    close(ng(function() return n(x) end), ref, 1e-6, 0, "WanRMS_norm: x / ||x||_channels * sqrt(4) * gamma (gamma 1)")
    T.is(shape_str(n.gamma.shape), "(4, 1, 1, 1)", "WanRMS_norm(images=false): gamma (C, 1, 1, 1)")
    local nb = wv.WanRMS_norm(4, {images = true, bias = true})
    T.ok(shape_str(nb.gamma.shape) == "(4, 1, 1)" and nb.bias ~= nil, "WanRMS_norm(images=true, bias=true): gamma and bias (C, 1, 1)")
end

-- ==== configs ====

do
    local TINY = {base_dim = 3, z_dim = 4, dim_mult = {1, 2, 2, 2}, num_res_blocks = 1}
    local function with(changes)
        local c = {}
        for k, v in pairs(TINY) do c[k] = v end
        for k, v in pairs(changes) do c[k] = v end
        return c
    end
    local function bad(changes, pattern, name) T.raises(function() return VAE(with(changes)) end, pattern, name) end
    -- (Wan 2.2's is_residual / patch_size: tests/lua/test_wan22_vae.lua)
    bad({patch_size = 2}, "'in_channels' %(3%) must be a multiple of patch_size%^2 = 4",
        "patch_size 2 with 3 input channels: error names the key")
    bad({scale_factor_spatial = 16}, "'scale_factor_spatial' is 16 but the model downsamples by 8",
        "scale_factor_spatial that disagrees with dim_mult: error")
    bad({temperal_downsample = {true, true}}, "'temperal_downsample' must have one entry per downsample, #dim_mult %- 1 = 3, got 2",
        "temperal_downsample of the wrong length: error")
    bad({base_dim = "96"}, "config key 'base_dim' must be a non%-negative integer", "base_dim a string: error names the key")
    bad({dim_mult = {1, 0, 2, 2}}, "'dim_mult' entry 2 must be at least 1", "dim_mult entry 0: error")
    bad({temperal_downsample = {1, 0, 0}}, "'temperal_downsample' must be a list of booleans", "non-boolean temperal_downsample: error")
    local m1 = VAE(with({patch_size = 1, _class_name = "AutoencoderKLWan"}))
    T.ok(m1.config.patch_size == 1 and m1.config._class_name == nil, "patch_size 1 (no patchify) is accepted; _ keys dropped")

    -- decoder_base_dim: the decoder's own width
    local md = VAE(with({decoder_base_dim = 4}))
    T.ok(shape_str(md.decoder.conv_in.weight.shape) == "(8, 4, 3, 3, 3)" and
        shape_str(md.encoder.conv_in.weight.shape) == "(3, 3, 3, 3, 3)", "decoder_base_dim sets the decoder's width only")
    local x = nemo.randn({1, 3, 5, 8, 8}, {generator = nemo.Generator(3)})
    local rec = ng(function() return md(x).sample end)
    T.is(shape_str(rec.shape), "(1, 3, 5, 8, 8)", "decoder_base_dim: a round trip keeps the video's shape")

    -- attn_scales: diffusers builds attention blocks into the encoder's down_blocks but cannot run them
    local ma = VAE(with({attn_scales = {1.0}}))
    local names = {}
    for name in ma:named_parameters() do names[name] = true end
    T.ok(names["encoder.down_blocks.1.norm.gamma"] and names["encoder.down_blocks.1.to_qkv.weight"] and
        names["encoder.down_blocks.1.proj.bias"], "attn_scales {1.0}: encoder.down_blocks.1 is an attention block (diffusers' names)")
    T.raises(function() return ma:encode(x) end, "attn_scales = {1} puts attention blocks .-not supported",
        "attn_scales non-empty: encode is a clear not-supported error (diffusers raises a TypeError)")
    local z = nemo.randn({1, 4, 2, 1, 1}, {generator = nemo.Generator(4)})
    T.is(shape_str(ng(function() return ma:decode(z).sample end).shape), "(1, 3, 5, 8, 8)",
        "attn_scales non-empty: decode works (the decoder has no such blocks)")
end

do  -- the default config: the Wan 2.1 VAE's parameter names and shapes (built without init, bf16)
    local m = common.without_init(function() return VAE({}, {dtype = "bfloat16"}) end)
    T.ok(m.config.base_dim == 96 and m.config.z_dim == 16 and #m.config.latents_mean == 16 and
        m.config.latents_std[16] == 1.9160 and m.spatial_compression_ratio == 8 and m.temporal_compression_ratio == 4,
        "defaults: base_dim 96, z_dim 16, latents_mean/std of 16, compression 8 (space) and 4 (time)")
    if meta then
        golden.param_shapes(T, m, meta.default_config_params, "default config (diffusers' AutoencoderKLWan())")
    else
        T.ok(false, "default config: no golden.json to compare with")
    end
end

T.done()
