-- tests/lua/test_sampling.lua: nemo.sampling.flux against diffusers 0.40 FluxPipeline.__call__ on the
-- golden case flux_sampling (tests/golden/flux_sampling/make_golden.py: a tiny seeded transformer,
-- VAE and FLUX.1-dev's scheduler config, 4 steps, batch 2, 32x32 pixels, stored initial latents).
-- Loads the pipeline folder with NeMoAutoDiffusionPipeline.from_pretrained (float32), compares the
-- schedule, every step's latents, the final latents, the VAE input, the decoded image, the [0, 1]
-- postprocessed image and its uint8 conversion; then unpacked initial latents, output_type
-- "latent", the generator path (shapes, determinism) and the option errors. The golden
-- comparisons FAIL when the case is absent.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local json = require "nemo.json"
local golden = require "golden"
local sampling = require "nemo.sampling"
local shape_str = nemo.Tensor.shape_str

local close = T.close   -- (it fails on a missing tensor and on differing shapes)

-- pcall(fn) must fail with a message containing `pat` (plain text)
local function raises(fn, pat, name)
    local ok, e = pcall(fn)
    if ok then return T.ok(false, name .. ": no error raised") end
    local found = tostring(e):find(pat, 1, true) ~= nil
    T.ok(found, name .. (found and "" or (": got '" .. tostring(e) .. "'")))
end

local dir, why = golden.case("flux_sampling", "case.safetensors")
if not dir then
    T.ok(false, "flux_sampling golden case: " .. why)
    T.done()
    return
end

local meta = json.read_file(dir .. "/case.json")
local ref = nemo.load_file(dir .. "/case.safetensors")
local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(dir, {torch_dtype = "float32", device = "cpu",
    enable_gradient_checkpointing = false})
local tr, sc, vae = pipe.components.transformer, pipe.components.scheduler, pipe.components.vae
T.ok(tr ~= nil and sc ~= nil and vae ~= nil, "from_pretrained loads transformer, scheduler and vae")
T.is(sampling.flux_vae_scale_factor(vae), meta.vae_scale_factor, "vae_scale_factor = 2^(#block_out_channels - 1)")

local NIL = {}   -- base_opts{key = NIL} removes key (a nil value in a table constructor removes nothing)
local function base_opts(extra)
    local o = {transformer = tr, scheduler = sc, vae = vae, prompt_embeds = ref.prompt_embeds,
               pooled_prompt_embeds = ref.pooled_prompt_embeds, height = meta.height, width = meta.width,
               num_inference_steps = meta.num_inference_steps, guidance_scale = meta.guidance_scale,
               latents = ref.latents_init, output_type = "image"}
    for k, v in pairs(extra or {}) do if v == NIL then o[k] = nil else o[k] = v end end
    return o
end

-- ==== the golden run ====
local steps = {}
local t0 = os.clock()
local out = sampling.flux(base_opts{callback = function(i, t, lat) steps[#steps + 1] = {i = i, t = t, lat = lat} end})
T.ok(os.clock() - t0 < 10, string.format("4 steps + decode run in %.2f s", os.clock() - t0))
T.is(#steps, meta.num_inference_steps, "callback called once per step")
T.is(steps[1] and steps[1].i, 0, "callback's step index is 0-based")
T.ok(math.abs(out.mu - meta.mu) < 1e-12, string.format("mu = calculate_shift(%d) = %.12g (ref %.12g)",
    meta.image_seq_len, out.mu, meta.mu))
close(out.timesteps, ref.timesteps, 0, 0, "timesteps bitwise (float32) as diffusers' retrieve_timesteps")
close(out.sigmas, ref.sigmas, 0, 0, "sigmas bitwise (float32, with the terminal 0)")
for i = 1, meta.num_inference_steps do
    local s = steps[i]
    T.is(s and s.t, meta.timesteps[i], "step " .. i .. " timestep")
    close(s and s.lat, ref["latents_step" .. i], 1e-5, 1e-5, string.format("latents after step %d (rtol 1e-5, atol 1e-5)", i))
end
close(out.latents, ref.latents_final, 1e-5, 1e-5, "final packed latents (rtol 1e-5, atol 1e-5)")
close(out.latents_unpacked, ref.latents_unpacked, 1e-5, 1e-5,
    "unpacked latents / scaling_factor + shift_factor (rtol 1e-5, atol 1e-5)")
close(out.image, ref.image, 1e-5, 1e-5, "decoded image in [-1, 1] (rtol 1e-5, atol 1e-5)")
close(sampling.postprocess(out.image), ref.image_pt, 1e-5, 1e-5, "postprocess = diffusers' output_type pt (rtol 1e-5, atol 1e-5)")

-- uint8: the reference's own conversion of image_pt, compared allowing 1 level (rounding near .5)
do
    local u8, bytes = sampling.to_uint8(out.image)
    local s = ref.image.shape
    T.is(shape_str(u8.shape), shape_str({s[1], s[3], s[4], s[2]}), "to_uint8 gives NHWC")
    T.is(#bytes, s[1] * s[2] * s[3] * s[4], "to_uint8 bytes string has B*H*W*C bytes")
    local rv = (ref.image_pt:permute{0, 2, 3, 1}:contiguous() * 255):double():reshape{-1}:tolist()
    local uv = u8:double():reshape{-1}:tolist()
    local worst, mism = 0, 0
    for i = 1, #rv do
        local want = math.max(0, math.min(255, math.floor(rv[i] + 0.5)))
        local d = math.abs(uv[i] - want)
        if d > worst then worst = d end
        if bytes:byte(i) ~= uv[i] then mism = mism + 1 end
    end
    T.ok(worst <= 1, "to_uint8 matches round(image_pt * 255) within 1 level (max diff " .. worst .. ")")
    T.is(mism, 0, "to_uint8's bytes string equals its tensor")
end

-- ==== unpacked initial latents, output_type latent ====
do
    local o = sampling.flux(base_opts{latents = ref.latents_init_unpacked, output_type = "latent"})
    close(o.latents, ref.latents_final, 1e-5, 1e-5, "unpacked initial latents are packed as FluxPipeline (rtol 1e-5, atol 1e-5)")
    T.ok(rawequal(o.image, o.latents), "output_type latent: image is the packed latents (as diffusers)")
    -- without a vae FluxPipeline's vae_scale_factor is 8 (not 2): 4x the pixels for the same latents
    local o2 = sampling.flux(base_opts{vae = NIL, output_type = "latent", sigmas = meta.sigmas_in, num_inference_steps = NIL,
        height = meta.height * 4, width = meta.width * 4})
    T.is(o2.vae_scale_factor, 8, "no vae: vae_scale_factor 8 (as FluxPipeline)")
    close(o2.latents, ref.latents_final, 1e-5, 1e-5,
        "explicit sigmas = linspace(1, 1/N, N), no vae, 4x pixels: same latents (rtol 1e-5, atol 1e-5)")
end

-- height / width not divisible by vae_scale_factor * 2: resized down with a warning, as diffusers
do
    local o = sampling.flux(base_opts{height = meta.height + 2, width = meta.width + 3, output_type = "latent"})
    close(o.latents, ref.latents_final, 1e-5, 1e-5, "34x35 pixels round down to the 32x32 latents (rtol 1e-5, atol 1e-5)")
end

-- ==== the generator path ====
do
    local function run(seed)
        return sampling.flux(base_opts{latents = NIL, generator = nemo.Generator(seed), output_type = "latent",
            num_inference_steps = 2}).latents
    end
    local a, b, c = run(7), run(7), run(8)
    T.is(shape_str(a.shape), shape_str(ref.latents_init.shape), "generator path: packed latents shape")
    T.close(a, b, 0, 0, "generator path: the same seed gives the same latents")
    local differ = (a - c):abs():max():item() > 0
    T.ok(differ, "generator path: another seed gives other latents")
    T.ok(not a.requires_grad, "sampling runs under no_grad")
end

-- ==== errors ====
raises(function() sampling.flux(base_opts{num_steps = 4}) end, "unknown option 'num_steps'", "unknown option named")
raises(function() sampling.flux(base_opts{transformer = false}) end, "transformer is required", "missing transformer")
raises(function() sampling.flux(base_opts{scheduler = NIL}) end, "scheduler is required", "missing scheduler")
raises(function() sampling.flux(base_opts{prompt_embeds = NIL}) end, "prompt_embeds is required", "missing prompt_embeds")
raises(function() sampling.flux(base_opts{pooled_prompt_embeds = ref.pooled_prompt_embeds:narrow(0, 0, 1)}) end,
    "same batch size", "batch mismatch")
raises(function() sampling.flux(base_opts{prompt_embeds = nemo.zeros({2, 8, 5})}) end, "joint_attention_dim",
    "wrong text width")
raises(function() sampling.flux(base_opts{output_type = "pil"}) end, "output_type must be", "bad output_type")
raises(function() sampling.flux(base_opts{vae = NIL}) end, "needs a vae", "image without vae")
raises(function() sampling.flux(base_opts{height = 64}) end, "packed latents must be", "latents of the wrong size")
raises(function() sampling.flux(base_opts{latents = nemo.zeros({2, 4, 8, 8})}) end, "unpacked latents must be",
    "unpacked latents of the wrong size")
raises(function() sampling.flux(base_opts{height = 0}) end, "height must be a positive integer", "bad height")
raises(function() sampling.flux(base_opts{height = 2}) end, "too small", "height below one patch")
raises(function() sampling.flux(base_opts{num_inference_steps = 0}) end, "num_inference_steps must be",
    "bad num_inference_steps")
raises(function() sampling.flux(base_opts{sigmas = {1, 0.5}}) end, "sigmas has 2 values but num_inference_steps is 4",
    "sigmas count mismatch")
raises(function() sampling.flux(base_opts{generator = 3, latents = NIL}) end, "generator must be a nemo.Generator",
    "bad generator")
raises(function() sampling.flux(base_opts{guidance_scale = "x"}) end, "guidance_scale must be a number", "bad guidance")
raises(function() sampling.flux(42) end, "expected a table of options", "non-table opts")

-- ==== from prompts: tokenizers + CLIP + T5 (tests/golden/flux_prompt: diffusers' FluxPipeline
-- with its text encoders, on flux_sampling's transformer / VAE / scheduler and the tokenizers of
-- tests/golden/tokenizers) ====
do
    local fs = require "nemo.fs"
    local g, gwhy = golden.case("flux_prompt", "case.safetensors")
    local src = golden.case("flux_sampling")
    local toks = golden.case("tokenizers")
    if not (g and src and toks) then
        T.ok(false, "flux_prompt golden case: " .. tostring(gwhy))
    else
        local root = os.tmpname()
        os.remove(root)
        golden.tiny_flux_pipeline(root)
        local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32", device = "cpu"})
        T.ok(pipe.components.text_encoder and pipe.components.text_encoder_2 and pipe.components.tokenizer and
            pipe.components.tokenizer_2 and next(pipe.skipped) == nil,
            "a FluxPipeline folder with its text encoders and tokenizers loads every component")
        local gc = nemo.load_file(g .. "/case.safetensors")
        local cj = json.read_file(g .. "/case.json")
        local c = pipe.components
        local enc = sampling.flux_encode_prompt{prompt = cj.prompts, tokenizer = c.tokenizer, text_encoder = c.text_encoder,
            tokenizer_2 = c.tokenizer_2, text_encoder_2 = c.text_encoder_2, max_sequence_length = cj.max_sequence_length}
        T.ok(T.same_bits(enc.clip_input_ids, gc.clip_input_ids) and T.same_bits(enc.t5_input_ids, gc.t5_input_ids),
            "encode_prompt tokenizes as diffusers (CLIP to 77, T5 to max_sequence_length), ids equal")
        T.close(enc.prompt_embeds, gc.prompt_embeds, 2e-6, 0, "encode_prompt: T5 prompt_embeds vs diffusers (rtol 2e-6)")
        T.close(enc.pooled_prompt_embeds, gc.pooled_prompt_embeds, 2e-6, 0,
            "encode_prompt: CLIP pooled_prompt_embeds vs diffusers (rtol 2e-6)")
        local out = sampling.flux{pipe = pipe, prompt = cj.prompts, max_sequence_length = cj.max_sequence_length,
            height = cj.height, width = cj.width, num_inference_steps = cj.num_inference_steps,
            guidance_scale = cj.guidance_scale, latents = gc.latents_init}
        T.close(out.latents, gc.latents_final, 3e-6, 0, "flux{pipe =, prompt =}: final latents vs FluxPipeline(prompt=) (rtol 3e-6)")
        T.close(out.image, gc.image, 3e-6, 0, "flux{pipe =, prompt =}: the decoded image vs diffusers (rtol 3e-6)")
        local cfg_out = sampling.flux{pipe = pipe, prompt = cj.prompts, negative_prompt = cj.negative_prompts,
            true_cfg_scale = cj.true_cfg_scale, max_sequence_length = cj.max_sequence_length, height = cj.height,
            width = cj.width, num_inference_steps = cj.num_inference_steps, guidance_scale = cj.guidance_scale,
            latents = gc.latents_init, output_type = "latent"}
        T.close(cfg_out.latents, gc.latents_final_true_cfg, 3e-6, 0,
            "true CFG (negative prompts, true_cfg_scale 2.5): final latents vs diffusers (rtol 3e-6)")
        raises(function() sampling.flux{pipe = pipe, prompt = "a", negative_prompt = "b",
            negative_prompt_embeds = gc.prompt_embeds} end, "not both", "negative_prompt with its embeddings is an error")
        raises(function() sampling.flux{pipe = pipe, prompt = "a", prompt_embeds = gc.prompt_embeds} end,
            "not both", "prompt and prompt_embeds together is an error")
        raises(function() sampling.flux_encode_prompt{prompt = "a", tokenizer = c.tokenizer} end,
            "text_encoder is required", "encoding without a text encoder names it")
        raises(function() sampling.flux_encode_prompt{prompt = "a", tokenizer = c.tokenizer, text_encoder = c.text_encoder,
            tokenizer_2 = c.tokenizer_2, text_encoder_2 = c.text_encoder_2, max_sequence_length = 1000} end,
            "max_sequence_length must be", "max_sequence_length above 512")
        -- the command-line tool writes one PNG per prompt
        local out_png = root .. "/img.png"
        local log, rc = T.sh("./nemo-lua tools/flux_sample.lua --model " .. root .. " --prompt 'a photo of a cat' " ..
            "--prompt 'a dog' --height 32 --width 32 --steps 2 --dtype float32 --device cpu --seed 1 " ..
            "--max-sequence-length 16 --vae-tiling --out " .. out_png .. " 2>&1")
        local im0 = fs.isfile(root .. "/img_0.png") and nemo.image.read_png(root .. "/img_0.png")
        T.ok(rc == 0 and im0 and im0.width == 32 and im0.height == 32 and im0.channels == 3 and
            fs.isfile(root .. "/img_1.png") and log:find("VAE tiling on", 1, true),
            "tools/flux_sample.lua writes a 32 x 32 PNG per prompt (--vae-tiling taken)", log)
        local _, brc = T.sh("./nemo-lua tools/flux_sample.lua --model " .. root .. " 2>&1")
        T.ok(brc ~= 0, "tools/flux_sample.lua without --prompt is an error")
        fs.remove_tree(root)
    end
end

-- ==== Wan from prompts (tests/golden/wan_prompt: diffusers' WanPipeline with its UMT5 text
-- encoder, UniPC scheduler and AutoencoderKLWan; its tokenizer is tests/golden/tokenizers/t5) ====
do
    local fs = require "nemo.fs"
    local g, gwhy = golden.case("wan_prompt", "case.safetensors")
    local toks = golden.case("tokenizers")
    if not (g and toks) then
        T.ok(false, "wan_prompt golden case: " .. tostring(gwhy))
    else
        local root = os.tmpname()
        os.remove(root)
        golden.tiny_wan_pipeline(root)
        local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32", device = "cpu"})
        local c = pipe.components
        T.ok(c.transformer and c.vae and c.scheduler and c.text_encoder and c.tokenizer and next(pipe.skipped) == nil,
            "a WanPipeline folder loads transformer, vae (AutoencoderKLWan), UniPC scheduler, UMT5 and its tokenizer")
        T.ok(c.scheduler and tostring(c.scheduler):find("UniPCMultistepScheduler", 1, true), "the scheduler is UniPC",
            tostring(c.scheduler))
        local gc = nemo.load_file(g .. "/case.safetensors")
        local cj = json.read_file(g .. "/case.json")
        local pe = sampling.wan_encode_prompt{prompt = cj.prompts, tokenizer = c.tokenizer, text_encoder = c.text_encoder,
            max_sequence_length = cj.max_sequence_length}
        T.close(pe, gc.prompt_embeds, 3e-6, 0, "wan_encode_prompt: UMT5 prompt_embeds (padding zeroed) vs diffusers (rtol 3e-6)")
        local steps = 0
        local out = sampling.wan{pipe = pipe, prompt = cj.prompts, negative_prompt = cj.negative_prompts,
            height = cj.height, width = cj.width, num_frames = cj.num_frames, num_inference_steps = cj.num_inference_steps,
            guidance_scale = cj.guidance_scale, max_sequence_length = cj.max_sequence_length, latents = gc.latents_init,
            callback = function() steps = steps + 1 end}
        T.is(table.concat(out.timesteps:tolist(), ","), table.concat(cj.timesteps, ","),
            "UniPC's timesteps equal WanPipeline's (flow_shift from the scheduler config)")
        T.is(steps, cj.num_inference_steps, "callback called once per step")
        T.close(out.latents, gc.latents_final, 5e-6, 0, "wan{pipe =, prompt =}: final latents vs WanPipeline (CFG 5, rtol 5e-6)")
        T.close(out.video, gc.video, 5e-6, 0, "wan: the decoded video [B, 3, F, H, W] vs diffusers (rtol 5e-6)")
        local lat = sampling.wan{pipe = pipe, prompt_embeds = gc.prompt_embeds, height = cj.height, width = cj.width,
            num_frames = cj.num_frames, num_inference_steps = 2, guidance_scale = 1, latents = gc.latents_init,
            output_type = "latent"}
        T.ok(lat.video == nil and lat.negative_prompt_embeds == nil and shape_str(lat.latents.shape) ==
            shape_str(gc.latents_init.shape), "guidance_scale 1 with prompt_embeds: no negative pass, latents only")
        T.is(sampling.wan_prompt_clean("  a &amp;amp; b\n\t c  "), "a & b c",
            "wan_prompt_clean: html unescaped twice, white space collapsed and stripped")
        raises(function() sampling.wan{pipe = pipe, prompt = "a", num_frames = 6} end, "num_frames must be 4k + 1",
            "num_frames not 4k + 1")
        raises(function() sampling.wan{pipe = pipe, prompt = "a", height = 40} end, "multiples of 16", "height not a multiple of 16")
        raises(function() sampling.wan{pipe = pipe, prompt = "a", prompt_embeds = gc.prompt_embeds} end, "not both",
            "prompt and prompt_embeds together")
        raises(function() sampling.wan{pipe = pipe, prompt = {"a", "b"}, negative_prompt = {"c"}} end,
            "negative_prompt has 1 prompts, prompt 2", "negative prompt count mismatch")
        raises(function() sampling.wan{pipe = pipe, prompt = "a", latents = gc.latents_init} end, "latents must be",
            "latents of the wrong shape")
        raises(function() sampling.wan{pipe = pipe, prompt = "a", steps = 3} end, "unknown option 'steps'", "unknown option")
        -- frames and the animated PNG
        local frames = sampling.video_frames(out.video, 2)
        T.is(#frames, cj.num_frames, "video_frames: one image per frame")
        local apng = root .. "/v.png"
        nemo.image.save_video(apng, frames, {fps = 8})
        local bytes = T.read_bytes(apng)
        local first = nemo.image.read_png(apng)
        local ref0 = sampling.to_uint8(out.video:narrow(0, 1, 1):select(2, 0):contiguous())
        T.ok(bytes:find("acTL", 1, true) and first.width == cj.width and first.height == cj.height and first.channels == 3,
            "image.save_video writes an animated PNG whose default image is the first frame")
        local px = {}
        for k = 1, #first.pixels do px[k] = first.pixels:byte(k) end
        T.ok(table.concat(px, ",") == table.concat(ref0:reshape{-1}:tolist(), ","), "the APNG's first frame holds frame 1's pixels")
        raises(function() nemo.image.save_video(apng, {frames[1], frames[1]:narrow(1, 0, 8):narrow(2, 0, 8)}) end,
            "frame 2 is 8 x 8 x 3", "frames of different sizes")
        -- the command-line tool
        local log, rc = T.sh("./nemo-lua tools/wan_sample.lua --model " .. root .. " --prompt 'a cat' --prompt 'a dog' " ..
            "--height 32 --width 32 --frames 5 --steps 2 --dtype float32 --device cpu --seed 1 " ..
            "--max-sequence-length 16 --vae-tiling --out " .. root .. "/vid.png 2>&1")
        local v0 = fs.isfile(root .. "/vid_0.png") and nemo.image.read_png(root .. "/vid_0.png")
        T.ok(rc == 0 and v0 and v0.width == 32 and v0.height == 32 and fs.isfile(root .. "/vid_1.png"),
            log:find("VAE tiling on", 1, true), "tools/wan_sample.lua writes an animated 32 x 32 PNG per prompt " ..
            "(--vae-tiling taken)", log)
        local _, brc = T.sh("./nemo-lua tools/wan_sample.lua --model " .. root .. " --prompt a --out x.gif 2>&1")
        T.ok(brc ~= 0, "tools/wan_sample.lua with a non-PNG --out is an error")
        fs.remove_tree(root)
    end
end

-- ==== Wan 2.2's modes (tests/golden/wan22_prompt: diffusers' WanPipeline with transformer_2 and
-- boundary_ratio 0.875, and with expand_timesteps, on wan_prompt's tiny pipeline) ====
do
    local fs = require "nemo.fs"
    local g, gwhy = golden.case("wan22_prompt", "case.safetensors")
    if not g then
        T.ok(false, "wan22_prompt golden case: " .. tostring(gwhy))
    else
        local root = os.tmpname()
        os.remove(root)
        golden.tiny_wan_pipeline(root)
        fs.copy_tree(g .. "/transformer_2", root .. "/transformer_2")
        fs.copy_file(g .. "/model_index_two_stage.json", root .. "/model_index.json")
        local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32", device = "cpu"})
        local gc = nemo.load_file(g .. "/case.safetensors")
        local cj = json.read_file(g .. "/case.json")
        T.ok(pipe.components.transformer_2 ~= nil and pipe.config.boundary_ratio == cj.boundary_ratio,
            "a Wan 2.2 pipeline folder loads transformer_2 and keeps boundary_ratio")
        local used = {}
        local function hook(name, m)   -- counts the module's forward calls (an instance field shadows the class's)
            local f = m.forward
            m.forward = function(self, ...) used[#used + 1] = name; return f(self, ...) end
            return m
        end
        local common = {pipe = pipe, prompt = cj.prompts, negative_prompt = cj.negative_prompts, height = cj.height,
            width = cj.width, num_frames = cj.num_frames, num_inference_steps = cj.num_inference_steps,
            max_sequence_length = cj.max_sequence_length, latents = gc.latents_init, output_type = "latent"}
        local function with(extra)
            local t = {}
            for k, v in pairs(common) do t[k] = v end
            for k, v in pairs(extra) do t[k] = v end
            return t
        end
        local out = sampling.wan(with{guidance_scale = cj.guidance_scale, guidance_scale_2 = cj.guidance_scale_2})
        T.close(out.latents, gc.latents_final_two_stage, 5e-6, 0,
            "two stages (boundary 875: transformer at 999, 900 with CFG 5, transformer_2 at 750, 500 with CFG 3) vs diffusers (rtol 5e-6)")
        sampling.wan(with{guidance_scale = cj.guidance_scale, num_inference_steps = 4,
            transformer = hook("high", pipe.components.transformer), transformer_2 = hook("low", pipe.components.transformer_2)})
        pipe.components.transformer.forward, pipe.components.transformer_2.forward = nil, nil
        T.is(table.concat(used, ","), "high,high,high,high,low,low,low,low",
            "timesteps >= boundary_ratio * 1000 go to transformer, the rest to transformer_2 (two passes each with CFG)")
        local one = sampling.wan(with{guidance_scale = cj.guidance_scale, boundary_ratio = json.null})
        local ref1 = nemo.load_file(golden.case("wan_prompt") .. "/case.safetensors").latents_final
        T.close(one.latents, ref1, 5e-6, 0, "boundary_ratio = json.null overrides the pipeline's: Wan 2.1's single transformer")
        local ex = sampling.wan(with{guidance_scale = cj.guidance_scale_expand, boundary_ratio = json.null, expand_timesteps = true})
        T.close(ex.latents, gc.latents_final_expand, 5e-6, 0,
            "expand_timesteps (a timestep per token, Wan 2.2 TI2V) vs diffusers (CFG 4, rtol 5e-6)")
        raises(function() sampling.wan(with{boundary_ratio = json.null, guidance_scale_2 = 2}) end,
            "guidance_scale_2 is only used with boundary_ratio", "guidance_scale_2 without boundary_ratio")
        raises(function() sampling.wan(with{transformer_2 = false, pipe = {components = {transformer = pipe.components.transformer,
            scheduler = pipe.components.scheduler, vae = pipe.components.vae, tokenizer = pipe.components.tokenizer,
            text_encoder = pipe.components.text_encoder}, config = pipe.config}}) end,
            "boundary_ratio 0.875 needs transformer_2", "boundary_ratio without transformer_2")
        raises(function() sampling.wan(with{boundary_ratio = 2}) end, "boundary_ratio must be a number in (0, 1]", "bad boundary_ratio")
        raises(function() sampling.wan(with{expand_timesteps = "yes"}) end, "expand_timesteps must be true or false",
            "bad expand_timesteps")
        pipe:save_pretrained(root .. "/saved")
        local idx = json.read_file(root .. "/saved/model_index.json")
        T.ok(idx.boundary_ratio == cj.boundary_ratio and idx.transformer_2[2] == "WanTransformer3DModel" and
            fs.isfile(root .. "/saved/transformer_2/config.json"), "save_pretrained keeps transformer_2 and boundary_ratio")
        local log, rc = T.sh("./nemo-lua tools/wan_sample.lua --model " .. root .. " --prompt 'a cat' --height 32 " ..
            "--width 32 --frames 5 --steps 2 --guidance 4 --guidance-2 2 --dtype float32 --device cpu " ..
            "--max-sequence-length 16 --keyint 2 --out " .. root .. "/v22.mp4 2>&1")
        local v22 = rc == 0 and fs.isfile(root .. "/v22.mp4") and T.read_bytes(root .. "/v22.mp4") or ""
        T.ok(v22:sub(5, 8) == "ftyp" and v22:find("stss", 1, true), "tools/wan_sample.lua runs a Wan 2.2 two-expert " ..
            "folder (--guidance-2) and writes an MP4 with IDR pictures every --keyint 2 frames (an stss box)", log)

        -- training one expert (Automodel's model.stage): active_transformer, the sigma window, the export
        local P = nemo.NeMoAutoDiffusionPipeline
        local low = P.from_pretrained(root, {torch_dtype = "float32", device = "cpu", components_to_load = {"transformer"},
            active_transformer = "transformer_2"})
        local ref2 = nemo.load_file(root .. "/transformer_2/diffusion_pytorch_model.safetensors")
        local same = true
        for name, p in low.transformer:named_parameters() do
            if not T.same_bits(p, ref2[name]) then same = false end
        end
        T.ok(same and low.components.transformer_2 == nil, "active_transformer = transformer_2: that expert is loaded " ..
            "as pipe.transformer, the other slot empty")
        raises(function() P.from_pretrained(root, {active_transformer = "transformer_3"}) end,
            "active_transformer must be", "a bad active_transformer")
        local one = golden.tiny_wan_pipeline(root .. "/one")
        raises(function() P.from_pretrained(one, {active_transformer = "transformer_2", components_to_load = {"transformer"}}) end,
            "not a Wan 2.2 two-expert pipeline", "transformer_2 on a pipeline without one")
        local Wan = require("nemo.models.wan").WanTransformer3DModel
        local seen = {}
        local fwd = Wan.forward
        Wan.forward = function(self, a, ...)
            for _, v in ipairs(a.timestep:double():reshape{-1}:tolist()) do seen[#seen + 1] = v end
            return fwd(self, a, ...)
        end
        local function train(stage, dir)
            seen = {}
            return require("nemo.train").run({seed = 3, model = {pretrained_model_name_or_path = root, mode = "finetune",
                    torch_dtype = "float32", stage = stage},
                optimizer = {_target_ = "torch.optim.AdamW", lr = 1e-3},
                flow_matching = {adapter_type = "simple", mix_uniform_ratio = 0},
                step_scheduler = {num_epochs = 1, local_batch_size = 2, global_batch_size = 2, max_steps = 6},
                data = {dataloader = {_target_ = "nemo.data.MockDataLoader", latent_shape = {4, 2, 4, 4}, text_len = 8,
                    text_dim = 32, length = 12}},
                checkpoint = {enabled = true, checkpoint_dir = dir, save_consolidated = "final"}},
                {log = function() end, progress = false})
        end
        local ok, sum = pcall(train, "low_noise", root .. "/ck_low")
        local lo, hi = math.huge, -math.huge
        for _, v in ipairs(seen) do lo, hi = math.min(lo, v), math.max(hi, v) end
        T.ok(ok and #seen == 12 and hi <= 875 + 1e-3 and lo >= 0, string.format("stage low_noise: every timestep in " ..
            "[0, 875] (sigma window [0, boundary_ratio 0.875]; seen %d in [%.1f, %.1f])", #seen, lo, hi), tostring(sum))
        local exp = ok and sum.diffusers
        local idx = exp and json.read_file(exp .. "/model_index.json")
        T.ok(idx and idx.boundary_ratio == 0.875 and idx.transformer_2[2] == "WanTransformer3DModel" and
            T.read_bytes(exp .. "/transformer/diffusion_pytorch_model.safetensors") ==
            T.read_bytes(root .. "/transformer/diffusion_pytorch_model.safetensors") and
            T.read_bytes(exp .. "/transformer_2/diffusion_pytorch_model.safetensors") ~=
            T.read_bytes(root .. "/transformer_2/diffusion_pytorch_model.safetensors"),
            "the export is the whole Wan 2.2 pipeline: the trained transformer_2 in its slot, transformer copied as it was")
        ok, sum = pcall(train, "high_noise", root .. "/ck_high")
        lo, hi = math.huge, -math.huge
        for _, v in ipairs(seen) do lo, hi = math.min(lo, v), math.max(hi, v) end
        T.ok(ok and #seen == 12 and lo >= 875 - 1e-3 and hi <= 1000, string.format("stage high_noise: every timestep in " ..
            "[875, 1000] (seen %d in [%.1f, %.1f])", #seen, lo, hi), tostring(sum))
        Wan.forward = fwd
        raises(function() train("mid_noise", root .. "/ck_x") end, "model.stage must be high_noise or low_noise", "a bad stage")
        local ok2, e2 = pcall(require("nemo.train").run, {seed = 3, model = {pretrained_model_name_or_path = one,
                mode = "finetune", torch_dtype = "float32", stage = "high_noise"},
            optimizer = {_target_ = "torch.optim.AdamW", lr = 1e-3}, flow_matching = {adapter_type = "simple"},
            step_scheduler = {num_epochs = 1, local_batch_size = 2, global_batch_size = 2, max_steps = 1},
            data = {dataloader = {_target_ = "nemo.data.MockDataLoader", latent_shape = {4, 2, 4, 4}, text_len = 8,
                text_dim = 32, length = 4}},
            checkpoint = {enabled = false, checkpoint_dir = root .. "/ck_y"}}, {log = function() end, progress = false})
        T.ok(not ok2 and tostring(e2):find("needs a boundary_ratio in (0, 1)", 1, true),
            "stage on a pipeline without boundary_ratio (and none in the YAML) is an error", tostring(e2))
        fs.remove_tree(root)
    end
end

T.done()
