-- tests/lua/test_wan22_vae.lua: the Wan 2.2 VAE (AutoencoderKLWan with is_residual = true and
-- patch_size = 2, TI2V-5B's) against diffusers' golden case wan22_vae_tiny
-- (tests/golden/wan22_vae_tiny/make_golden.py): parameter names and order; encode (mean,
-- logvar) and decode of a 5-frame and a batch-2 9-frame video, and a tiled encode / decode
-- (patch_size changes the tile arithmetic), in float32 and float64; the real Wan 2.2 VAE's
-- parameter names, shapes and count; patchify / unpatchify; bf16; shapes and errors; a
-- save_pretrained round trip; a TI2V-shaped pipeline with this VAE, and TI2V image-to-video
-- sampling against diffusers' WanImageToVideoPipeline (tests/golden/wan_ti2v). Golden
-- comparisons FAIL when the case is absent.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local json = require "nemo.json"
local golden = require "golden"
local common = require "nemo.models.common"
local wv = require "nemo.models.wan_vae"
local VAE = wv.AutoencoderKLWan
local shape_str = nemo.Tensor.shape_str
local close = T.close

local dir, why = golden.case("wan22_vae_tiny", "case.safetensors")
if not dir then
    T.ok(false, "wan22_vae_tiny golden comparisons: " .. why)
    T.done()
end
local meta = json.read_file(dir .. "/golden.json")
local case = nemo.load_file(dir .. "/case.safetensors")
local c64 = nemo.load_file(dir .. "/case_f64exact.safetensors")
local function ng(fn) return nemo.no_grad(fn) end

-- ==== the golden case ====

do
    local m = VAE.from_pretrained(dir)
    local _, keys = m:state_dict()
    local same = #keys == #meta.state_dict_keys
    for i, k in ipairs(meta.state_dict_keys) do
        if keys[i] ~= k then same = false; T.diag(string.format("key %d: %s vs diffusers %s", i, tostring(keys[i]), k)) end
    end
    T.ok(same, string.format("the %d state_dict keys in diffusers' order (residual down / up blocks, avg_shortcut " ..
        "without parameters)", #meta.state_dict_keys))
    T.is(m:num_parameters(), meta.num_params, "parameter count equals diffusers'")
    T.ok(m.spatial_compression_ratio == 16 and m.patch_size == 2 and m.temporal_compression_ratio == 4,
        "spatial compression 16 (8 x patch 2), temporal 4")
end

-- Tolerances: float64 runs agree to rounding (rtol 1e-12: the same ops in the same order);
-- float32: diffusers' float32 run is within 1.5e-6 of float64 relative to max|ref| (golden.json
-- f32_vs_f64exact), nemo's float32 convolutions round differently again: rtol 1e-5.
for _, dt in ipairs {"float32", "float64"} do
    local f64 = dt == "float64"
    local ref = f64 and c64 or case
    local rtol = f64 and 1e-12 or 1e-5
    local m = VAE.from_pretrained(dir, {torch_dtype = dt})
    ng(function()
        for _, v in ipairs {"v5", "v9", "tl"} do
            local what = v == "tl" and "tiled " or ""
            if v == "tl" then m:enable_tiling(unpack(meta.tiling)) else m:disable_tiling() end
            local post = m:encode(case[v .. ".input"]:to{dtype = dt}).latent_dist
            close(post.mean, ref[v .. ".mean"], rtol, 0, string.format("%s %sencode %s: mean", v, what, dt))
            close(post.logvar, ref[v .. ".logvar"], rtol, 0, string.format("%s %sencode %s: logvar", v, what, dt))
            local d = m:decode(ref[v .. ".mean"]:to{dtype = dt}).sample
            close(d, ref[v .. ".decode"], rtol, 0, string.format("%s %sdecode %s (%.1f%% clamped)", v, what, dt,
                100 * meta.fraction_clamped[v .. ".decode"]))
        end
    end)
end

-- ==== pieces ====

do
    local x = nemo.randn({2, 3, 5, 8, 12}, {generator = nemo.Generator(1)})
    local p = wv.patchify(x, 2)
    T.is(shape_str(p.shape), "(2, 12, 5, 4, 6)", "patchify: 2 x 2 pixels -> 12 channels")
    -- diffusers' channel order: c * 4 + pw * 2 + ph
    local ok = true
    for _, c in ipairs {{0, 1, 0, 3, 2}, {2, 0, 1, 2, 5}} do   -- (channel, ph, pw, h, w)
        local ch, ph, pw, h, w = unpack(c)
        local a = p[{1, ch * 4 + pw * 2 + ph, 2, h, w}]:item()
        local b = x[{1, ch, 2, 2 * h + ph, 2 * w + pw}]:item()
        ok = ok and a == b
    end
    T.ok(ok, "patchify: channel c * 4 + pw * 2 + ph holds pixel (2h + ph, 2w + pw), as diffusers")
    T.ok(T.same_values(wv.unpatchify(p, 2), x), "unpatchify undoes patchify, bit for bit")

    local down = wv.AvgDown3D(2, 4, 2, 2)
    local y = down(nemo.ones(1, 2, 3, 4, 4))
    -- one frame of zeros in front (3 -> 4 frames); output channel 0 averages the even frames of
    -- input channel 0 (ft = 0), channel 1 its odd ones: frame 0 of channel 0 is the zero frame
    T.ok(shape_str(y.shape) == "(1, 4, 2, 2, 2)" and y[{0, 0, 0, 0, 0}]:item() == 0 and y[{0, 1, 0, 0, 0}]:item() == 1 and
        y[{0, 0, 1, 1, 1}]:item() == 1, "AvgDown3D: zero frames in front to a multiple of factor_t, then group means")
    local up = wv.DupUp3D(4, 2, 2, 2)
    local u = up(nemo.randn({1, 4, 2, 3, 3}, {generator = nemo.Generator(2)}), true)
    T.is(shape_str(u.shape), "(1, 2, 3, 6, 6)", "DupUp3D: x2 in time and space, the first frame dropped on the first chunk")
    T.raises(function() return wv.AvgDown3D(3, 4, 1, 1) end, "not a multiple of out_channels 4",
        "AvgDown3D with channels that do not group: error")
end

-- the real Wan 2.2 VAE (TI2V-5B): parameter names, shapes and count (built without init, bf16)
do
    local m = common.without_init(function()
        return VAE({base_dim = 160, decoder_base_dim = 256, z_dim = 48, dim_mult = {1, 2, 4, 4}, num_res_blocks = 2,
            temperal_downsample = {false, true, true}, is_residual = true, in_channels = 12, out_channels = 12,
            patch_size = 2, scale_factor_spatial = 16, latents_mean = {}, latents_std = {}}, {dtype = "bfloat16"})
    end)
    golden.param_shapes(T, m, meta.default_config_params, "the real Wan 2.2 VAE")
end

-- ==== bf16, shapes, errors, files ====

do
    local m = VAE.from_pretrained(dir, {torch_dtype = "bfloat16"})
    local post = ng(function() return m:encode(case["v5.input"]:bfloat16()).latent_dist end)
    close(post.mean, case["v5.mean"], 3e-2, 0, "bf16 encode near float32 (rtol 3e-2)")
    local d = ng(function() return m:decode(case["v5.mean"]:bfloat16()).sample end)
    T.is(d.dtype, "bfloat16", "bf16 decode stays bf16")
    close(d, case["v5.decode"], 5e-2, 0, "bf16 decode near float32 (rtol 5e-2)")

    local f = VAE.from_pretrained(dir)
    T.raises(function() return f:encode(nemo.zeros(1, 12, 5, 32, 32)) end, "expected a video %(B, 3, F, H, W%)",
        "encode takes 3-channel video (patchify makes the 12 channels)")
    T.raises(function() return f:encode(nemo.zeros(1, 3, 5, 24, 32)) end, "positive multiples of 16",
        "encode: H and W must be multiples of 16")
    T.raises(function() return f:enable_tiling(24) end, "multiple of 16", "enable_tiling: tiles are multiples of 16")

    local tmp = T.tmpdir()
    f:save_pretrained(tmp .. "/vae")
    local cfg = json.read_file(tmp .. "/vae/config.json")
    T.ok(cfg.is_residual == true and cfg.patch_size == 2 and cfg.scale_factor_spatial == 16,
        "save_pretrained writes is_residual, patch_size and scale_factor_spatial")
    local back = VAE.from_pretrained(tmp .. "/vae")
    local a = ng(function() return back:encode(case["v5.input"]).latent_dist.mean end)
    T.ok(T.same_values(a, ng(function() return f:encode(case["v5.input"]).latent_dist.mean end)),
        "save_pretrained -> from_pretrained: the same encoding, bit for bit")
    T.rmtree(tmp)
end

-- a TI2V-shaped pipeline: the tiny Wan pipeline with this VAE (z_dim 4, like its transformer)
-- loads through from_pretrained and samples with expand_timesteps at 16x compression
do
    local fs = require "nemo.fs"
    local tmp = T.tmpdir()
    local root = golden.tiny_wan_pipeline(tmp .. "/ti2v")
    fs.remove_tree(root .. "/vae")
    fs.copy_tree(dir, root .. "/vae")
    for _, n in ipairs {"case.safetensors", "case_f64exact.safetensors", "golden.json", "make_golden.py"} do
        os.remove(root .. "/vae/" .. n)
    end
    local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32"})
    local vae = pipe.components.vae
    T.ok(vae ~= nil and vae.config.is_residual == true and vae.spatial_compression_ratio == 16,
        "a pipeline folder with the Wan 2.2 VAE loads it (no longer skipped)")
    local out = nemo.sampling.wan{pipe = pipe, prompt_embeds = nemo.randn({1, 16, 32}, {generator = nemo.Generator(3)}),
        negative_prompt_embeds = nemo.zeros(1, 16, 32), height = 64, width = 32, num_frames = 5,
        num_inference_steps = 2, guidance_scale = 2.0, expand_timesteps = true, generator = nemo.Generator(4)}
    T.ok(shape_str(out.latents.shape) == "(1, 4, 2, 4, 2)" and shape_str(out.video.shape) == "(1, 3, 5, 64, 32)",
        "sampling.wan with the Wan 2.2 VAE: latents at 1/16 (1, 4, 2, 4, 2), video (1, 3, 5, 64, 32)",
        shape_str(out.latents.shape) .. " " .. shape_str(out.video.shape))
    T.raises(function() nemo.sampling.wan{pipe = pipe, prompt_embeds = nemo.zeros(1, 16, 32), height = 48, width = 32,
        num_frames = 5} end, "multiples of 32 and 32", "sampling.wan: sizes are multiples of 16 x the transformer's patch")

    -- TI2V image-to-video against diffusers' WanImageToVideoPipeline (expand_timesteps) on this
    -- pipeline (tests/golden/wan_ti2v/make_golden.py). Tolerance: the float32 sampling loop of
    -- tests/lua/test_sampling.lua's Wan cases (rtol 5e-6 on latents), 2e-5 on the decoded video.
    local tdir, twhy = golden.case("wan_ti2v", "case.json")
    if not tdir then
        T.ok(false, "wan_ti2v golden comparisons: " .. twhy)
    else
        local cj = json.read_file(tdir .. "/case.json")
        local tc = nemo.load_file(tdir .. "/case.safetensors")
        local args = {pipe = pipe, prompt = cj.prompts, negative_prompt = cj.negative_prompts, image = tc.image,
            latents = tc.latents_init, height = cj.height, width = cj.width, num_frames = cj.num_frames,
            num_inference_steps = cj.num_inference_steps, guidance_scale = cj.guidance_scale,
            max_sequence_length = cj.max_sequence_length, expand_timesteps = true}
        local r = nemo.sampling.wan(args)
        close(r.latents, tc.latents_final, 5e-6, 0, "TI2V image-to-video (image latent on frame 0, timestep 0 on its " ..
            "tokens): final latents vs diffusers' WanImageToVideoPipeline")
        close(r.video, tc.video, 2e-5, 0, "TI2V image-to-video: decoded video vs diffusers")
        -- the image as a PNG file of the same pixels (8-bit: the latents move a little)
        local u8 = nemo.sampling.to_uint8(tc.image * 2 - 1)
        nemo.image.save(tmp .. "/first.png", u8)
        args.image = tmp .. "/first.png"
        args.output_type = "latent"
        local rp = nemo.sampling.wan(args)
        args.image = (u8:float() / 255):permute(0, 3, 1, 2):contiguous()
        local rq = nemo.sampling.wan(args)
        T.ok(T.same_values(rp.latents, rq.latents), "image = a PNG path gives the same latents as its pixels / 255")
        args.image = tc.image
        args.expand_timesteps = false
        T.raises(function() nemo.sampling.wan(args) end, "needs a transformer with in_channels = 2 x the VAE's z_dim",
            "image = without expand_timesteps on a text-to-video transformer (in_channels 4): a clear error")
        args.expand_timesteps = true
        args.image = nemo.zeros(1, 3, 32, 32)
        T.raises(function() nemo.sampling.wan(args) end, "image must be %(1 or 2, 3, 64, 32%)", "an image of the wrong size")

        -- recipes/generate.lua: inference.input_images on a TI2V pipeline (expand_timesteps in model_index.json)
        local mi = json.read_file(root .. "/model_index.json")
        mi.expand_timesteps = true
        json.write_file(root .. "/model_index.json", mi)
        local gen = require "nemo.generate"
        local g = gen.run({seed = 3, device = "cpu", model = {pretrained_model_name_or_path = root},
            inference = {dtype = "float32", prompts = {"a cat"}, num_inference_steps = 2, guidance_scale = 2.0,
                height = 64, width = 32, input_images = {tmp .. "/first.png"},
                pipeline_kwargs = {num_frames = 5, max_sequence_length = 16}},
            output = {output_dir = tmp .. "/gen", video_format = "apng"}}, {log = function() end})
        local im = g.files[1] and nemo.image.read_png(g.files[1])
        T.ok(im and im.width == 32 and im.height == 64, "generate: inference.input_images samples TI2V image-to-video " ..
            "(an animated 32 x 64 PNG)")
        local log, rc = T.sh("./nemo-lua tools/wan_sample.lua --model " .. root .. " --prompt 'a cat' --height 64 " ..
            "--width 32 --frames 5 --steps 2 --dtype float32 --device cpu --max-sequence-length 16 --image " .. tmp ..
            "/first.png --out " .. tmp .. "/ti2v.png 2>&1")
        T.ok(rc == 0 and nemo.image.read_png(tmp .. "/ti2v.png").height == 64, "tools/wan_sample.lua --image: TI2V", log)

        -- a video cache through the 16x VAE (buckets of 32), and LoRA steps of the Wan recipe on it
        local enc = require "nemo.data.encode"
        fs.mkdirs(tmp .. "/vids/clip")
        for k = 0, 4 do
            local t = {}
            for i = 1, 64 * 40 * 3 do t[i] = string.char((i * 37 + k * 11 + math.floor(i / 192) * 5) % 256) end
            nemo.image.write_png(string.format("%s/vids/clip/%03d.png", tmp, k), table.concat(t), 64, 40, 3)
        end
        local cpipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32", device = "cpu",
            components_to_load = {"vae", "text_encoder", "tokenizer"}})
        T.raises(function() enc.wan_cache{videos = tmp .. "/vids", out = tmp .. "/c16", pipe = cpipe, quantization = 16,
            max_pixels = 64 * 32} end, "quantization 16 is not a multiple of 32",
            "a 16x VAE's cache needs buckets of 32 (latents even for the 2 x 2 patches)")
        local r2 = enc.wan_cache{videos = tmp .. "/vids", out = tmp .. "/cache", pipe = cpipe, max_pixels = 64 * 32,
            max_sequence_length = 16}
        local ds = nemo.data.Dataset(tmp .. "/cache", {model_type = "wan"})
        T.ok(r2.samples == 1 and r2.buckets["64x32"] == 1 and shape_str(ds:get(1).latents.shape) == "(4, 2, 2, 4)",
            "the Wan cache through the 16x VAE: a 64 x 32 bucket, latents (4, 2, 2, 4)")
        local sum = require("nemo.train").run({seed = 1, model = {pretrained_model_name_or_path = root, mode = "finetune",
                model_type = "wan", torch_dtype = "float32", compute_dtype = "float32"},
            peft = {dim = 2, alpha = 2, target_modules = {"*.to_q", "*.to_v"}},
            optimizer = {_target_ = "torch.optim.AdamW", lr = 1e-3}, flow_matching = {adapter_type = "simple"},
            step_scheduler = {num_epochs = 2, local_batch_size = 1, global_batch_size = 1, max_steps = 2},
            data = {dataloader = {_target_ = "nemo.data.build_dataloader", cache_dir = tmp .. "/cache"}},
            checkpoint = {enabled = false, checkpoint_dir = tmp .. "/ck"}}, {log = function() end, progress = false})
        T.ok(sum.steps == 2 and sum.last_loss == sum.last_loss, "the TI2V-shaped pipeline trains on that cache (2 LoRA steps)")
    end
    T.rmtree(tmp)
end

T.done()
