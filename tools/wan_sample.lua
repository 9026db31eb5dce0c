-- tools/wan_sample.lua: videos from prompts with a Wan 2.1 pipeline folder (or hub id),
-- optionally with a LoRA adapter trained by recipes/wan_lora.lua; no Python.
--   nemo-lua tools/wan_sample.lua --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat walking" \
--       [--prompt "..."]... [--out sample.mp4] [--height 480] [--width 832] [--frames 81]
--       [--steps 50] [--guidance 5.0] [--guidance-2 X] [--negative-prompt TEXT] [--fps 16] [--qp 20] [--keyint 250]
--       [--seed 0]
--       [--max-sequence-length 512] [--dtype bfloat16] [--device auto]
--       [--lora runs/wan_lora/epoch_0_step_299/model] [--lora-scale 1.0] [--vae-tiling]
--       [--image first.png]   (image-to-video: a Wan I2V pipeline, or Wan 2.2 TI2V; the first frame)
-- One video per prompt: an MP4 (H.264 at quantizer --qp, an IDR picture every --keyint frames and P pictures
-- between, nemo.mp4) for --out *.mp4 (the default), an animated PNG
-- for --out *.png; --out itself for one prompt, else <out without extension>_<i>.<ext> (i from 0). The pipeline must hold its transformer, vae, scheduler,
-- text_encoder and tokenizer. The initial noise comes from nemo's generator (--seed), so the
-- videos differ from diffusers' for the same seed; everything after that is WanPipeline's.
-- Wan 2.2 A14B folders (transformer_2, boundary_ratio) run both experts; --guidance-2 is the
-- low-noise expert's guidance scale (default: --guidance).
local nemo = require "nemo"

local cli = require "nemo.cliargs"
local spec = {name = "wan_sample", usage = {
    "usage: nemo-lua tools/wan_sample.lua --model DIR_OR_ID --prompt TEXT [--prompt TEXT]... [--out FILE.mp4|FILE.png]",
    "       [--height N] [--width N] [--frames N] [--steps N] [--guidance X] [--guidance-2 X] [--negative-prompt TEXT]",
    "       [--fps N] [--qp N] [--keyint N] [--seed N] [--max-sequence-length N] [--dtype bfloat16|float16|float32]",
    "       [--device auto|cpu|cuda:N] [--lora DIR] [--lora-scale X] [--vae-tiling] [--image FIRST_FRAME.png]"},
    flags = {["--vae-tiling"] = "vae_tiling"},
    defaults = {prompts = {}, out = "sample.mp4", height = 480, width = 832, frames = 81, steps = 50, guidance = 5.0,
                fps = 16, qp = require("nemo.mp4").DEFAULT_QP, keyint = require("nemo.mp4").DEFAULT_KEYINT, seed = 0, msl = 512, dtype = "bfloat16", device = "auto", lora_scale = 1.0, negative = ""},
    strings = {["--model"] = "model", ["--out"] = "out", ["--dtype"] = "dtype", ["--device"] = "device",
               ["--lora"] = "lora", ["--negative-prompt"] = "negative", ["--image"] = "image"},
    lists = {["--prompt"] = "prompts"},
    numbers = {["--guidance"] = "guidance", ["--guidance-2"] = "guidance_2", ["--fps"] = "fps", ["--seed"] = "seed",
               ["--lora-scale"] = "lora_scale", ["--qp"] = "qp"},
    counts = {["--height"] = "height", ["--width"] = "width", ["--frames"] = "frames", ["--steps"] = "steps",
              ["--max-sequence-length"] = "msl", ["--keyint"] = "keyint"}}
local o = cli.parse(arg, spec)
local function say(msg) io.stdout:write(msg, "\n") end
if not o.model then cli.usage(spec, "--model is required") end
if #o.prompts == 0 then cli.usage(spec, "at least one --prompt is required") end
local qp_why = require("nemo.mp4").qp_problem(o.qp, "--qp")
if qp_why then cli.usage(spec, qp_why) end
local ext = o.out:lower():match("%.(mp4)$") or o.out:lower():match("%.(png)$")
if not ext then
    cli.usage(spec, "--out must name a .mp4 file (H.264) or a .png file (an animated PNG), got '" .. o.out .. "'")
end

cli.main("wan_sample", function()
    local pipe = nemo.sampling.open_pipeline(o.model, {dtype = o.dtype, device = o.device})
    local needed = {"transformer", "vae", "scheduler", "text_encoder", "tokenizer"}
    local br = pipe.config and pipe.config.boundary_ratio
    if type(br) == "number" then needed[#needed + 1] = "transformer_2" end
    if o.guidance_2 and type(br) ~= "number" then
        error(o.model .. " has no boundary_ratio (not a Wan 2.2 two-expert pipeline): --guidance-2 does not apply", 0)
    end
    for _, k in ipairs(needed) do
        if pipe.components[k] == nil then
            error(string.format("%s has no loadable %s (Wan sampling needs transformer, vae, scheduler, text_encoder " ..
                "and tokenizer; Wan 2.2 A14B also transformer_2)", o.model, k), 0)
        end
    end
    nemo.sampling.ready_pipeline(pipe, {lora = o.lora, lora_scale = o.lora_scale, log = say})
    if o.vae_tiling then pipe.components.vae:enable_tiling(); say("VAE tiling on (tiled decode of large outputs)") end
    local t0 = os.clock()
    local out = nemo.sampling.wan{pipe = pipe, prompt = o.prompts, negative_prompt = o.negative, height = o.height,
        width = o.width, num_frames = o.frames, num_inference_steps = o.steps, guidance_scale = o.guidance,
        guidance_scale_2 = o.guidance_2, max_sequence_length = o.msl, image = o.image,
        generator = nemo.Generator(o.seed), callback = function(k)
            io.stdout:write(string.format("\rstep %d/%d", k + 1, o.steps)); io.stdout:flush()
        end}
    io.stdout:write("\n")
    for b = 1, #o.prompts do
        local path = #o.prompts == 1 and o.out or (o.out:sub(1, -5) .. "_" .. (b - 1) .. "." .. ext)
        nemo.image.save_video(path, nemo.sampling.video_frames(out.video, b), {fps = o.fps, qp = o.qp, keyint = o.keyint})
        io.stdout:write(string.format("wrote %s (%d frames of %d x %d, %g fps): %s\n", path, out.video.shape[3],
            o.width, o.height, o.fps, o.prompts[b]))
    end
    io.stdout:write(string.format("%.1f s of CPU time\n", os.clock() - t0))
end)
