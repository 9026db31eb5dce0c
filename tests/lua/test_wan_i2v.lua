-- tests/lua/test_wan_i2v.lua: Wan 2.1 image-to-video (diffusers' WanImageToVideoPipeline without
-- expand_timesteps) against tests/golden/wan_i2v (made by its make_golden.py): the CLIP image
-- processor (PIL's bicubic resize, byte for byte; the pixel values), the image encoder's
-- penultimate tokens, and the whole sampling loop (the mask + first-frame condition channels, the
-- image tokens in every cross-attention) to the final latents and the decoded video, and FLF2V's
-- first-and-last-frame run; a pipeline
-- folder with image_encoder / image_processor components; generate's inference.input_images and
-- wan_sample --image on it; the errors. Golden comparisons FAIL when the case is absent.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local fs = require "nemo.fs"
local json = require "nemo.json"
local golden = require "golden"
local clip = require "nemo.models.clip"
local enc = require "nemo.data.encode"

local dir, why = golden.case("wan_i2v", "case.json")
local vdir = golden.case("clip_vision_tiny", "config.json")
if not (dir and vdir) then
    T.ok(false, "wan_i2v golden comparisons: " .. tostring(why))
    T.done()
end
local cj = json.read_file(dir .. "/case.json")
local case = nemo.load_file(dir .. "/case.safetensors")

-- ==== the image side ====

do
    local rgb, w, h = enc.read_rgb(dir .. "/image.png")
    for _, s in ipairs(cj.bicubic) do
        local o = enc.resize(rgb, w, h, s[1], s[2], "bicubic")
        local ref = fs.read(string.format("%s/bicubic_%dx%d.raw", dir, s[1], s[2]))
        local worst = #ref == s[1] * s[2] * 3 and 0 or math.huge
        for k = 0, #ref - 1 do worst = math.max(worst, math.abs(o[k] - ref:byte(k + 1))) end
        T.ok(worst == 0, string.format("bicubic resize %dx%d -> %dx%d: PIL's bytes (max diff %s)", w, h, s[1], s[2],
            tostring(worst)))
    end
    local ip = clip.CLIPImageProcessor.from_pretrained(dir .. "/image_processor")
    local px = ip:preprocess(dir .. "/image.png").pixel_values
    -- transformers computes the rescale and normalisation in float64 and rounds once; here the
    -- rescale rounds to float32 first: within 1 ulp of the values (~2 in magnitude)
    T.close(px, case.pixel_values, 0, 5e-7, "CLIPImageProcessor: pixel values of the shortest-edge resize and center crop")
    local ie = clip.CLIPVisionModel.from_pretrained(vdir)
    local out = nemo.no_grad(function() return ie{pixel_values = px, output_hidden_states = true} end)
    T.close(out.hidden_states[#out.hidden_states - 1], case.image_embeds, 2e-6, 0,
        "the image encoder's penultimate hidden states (Wan's image tokens)")
    T.raises(function() clip.CLIPImageProcessor{resample = 2} end, "resample 2 is not supported",
        "an unsupported resample filter: error")
end

-- ==== the pipeline ====

local tmp = T.tmpdir()
local root = golden.tiny_wan_pipeline(tmp .. "/i2v")
fs.remove_tree(root .. "/transformer")
fs.copy_tree(dir .. "/transformer", root .. "/transformer")
fs.copy_tree(dir .. "/image_processor", root .. "/image_processor")
fs.mkdirs(root .. "/image_encoder")
fs.copy_file(vdir .. "/config.json", root .. "/image_encoder/config.json")
fs.copy_file(vdir .. "/model.safetensors", root .. "/image_encoder/model.safetensors")
local mi = json.read_file(root .. "/model_index.json")
mi._class_name = "WanImageToVideoPipeline"
mi.image_encoder = {"transformers", "CLIPVisionModel"}
mi.image_processor = {"transformers", "CLIPImageProcessor"}
json.write_file(root .. "/model_index.json", mi)
local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(root, {torch_dtype = "float32"})
T.ok(pipe.components.image_encoder ~= nil and pipe.components.image_processor ~= nil,
    "a WanImageToVideoPipeline folder loads its image_encoder and image_processor")

local args = {pipe = pipe, prompt = cj.prompts, negative_prompt = cj.negative_prompts, image = dir .. "/image.png",
    latents = case.latents_init, height = cj.height, width = cj.width, num_frames = cj.num_frames,
    num_inference_steps = cj.num_inference_steps, guidance_scale = cj.guidance_scale,
    max_sequence_length = cj.max_sequence_length}
local r = nemo.sampling.wan(args)
-- tolerance: the float32 sampling loop of the other Wan cases (rtol 5e-6 on latents; 2e-5 video)
T.close(r.latents, case.latents_final, 5e-6, 0, "Wan I2V: final latents vs diffusers' WanImageToVideoPipeline")
T.close(r.video, case.video, 2e-5, 0, "Wan I2V: decoded video vs diffusers")

-- FLF2V: first and last frames (a transformer with pos_embed_seq_len: both images' tokens)
do
    local tflf = require("nemo.models.wan").WanTransformer3DModel.from_pretrained(dir .. "/transformer_flf2v")
    local a = {}
    for k, v in pairs(args) do a[k] = v end
    a.transformer, a.last_image, a.output_type = tflf, dir .. "/last_image.png", "latent"
    local rf = nemo.sampling.wan(a)
    T.close(rf.latents, case.latents_final_flf2v, 5e-6, 0, "Wan FLF2V (last_image =): final latents vs diffusers")
end

-- errors
local function raises(changes, pat, name)
    local a = {}
    for k, v in pairs(args) do a[k] = v end
    for k, v in pairs(changes) do a[k] = v end
    a.output_type = "latent"
    T.raises(function() nemo.sampling.wan(a) end, pat, name)
end
raises({image = false}, "image must be a tensor", "image of the wrong type: error")
local args_no_image = {}
for k, v in pairs(args) do args_no_image[k] = v end
args_no_image.image = nil
T.raises(function() nemo.sampling.wan(args_no_image) end, "give image =", "an image-to-video transformer without image: error")
raises({image = nemo.rand(1, 3, 32, 32)}, "must be a PNG / JPEG path", "a tensor image with a CLIP encoder: error")
raises({image_encoder = false}, "needs image_encoder", "no image encoder: error")

-- generate's inference.input_images and wan_sample --image on this pipeline
do
    local gen = require "nemo.generate"
    local g = gen.run({seed = 3, device = "cpu", model = {pretrained_model_name_or_path = root},
        inference = {dtype = "float32", prompts = {"a cat"}, num_inference_steps = 2, guidance_scale = 2.0,
            height = 32, width = 32, input_images = {dir .. "/image.png"},
            pipeline_kwargs = {num_frames = 5, max_sequence_length = 512}},
        output = {output_dir = tmp .. "/gen", video_format = "apng"}}, {log = function() end})
    local im = g.files[1] and nemo.image.read_png(g.files[1])
    T.ok(im and im.width == 32 and im.height == 32, "generate: inference.input_images on a Wan I2V pipeline")
    local log, rc = T.sh("./nemo-lua tools/wan_sample.lua --model " .. root .. " --prompt 'a cat' --height 32 " ..
        "--width 32 --frames 5 --steps 2 --dtype float32 --device cpu --image " .. dir .. "/image.png --out " .. tmp ..
        "/i2v.png 2>&1")
    T.ok(rc == 0 and fs.isfile(tmp .. "/i2v.png"), "tools/wan_sample.lua --image on a Wan I2V pipeline", log)
end
T.rmtree(tmp)
T.done()
