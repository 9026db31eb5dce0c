-- tools/flux_sample.lua: images from prompts with a FLUX pipeline folder (or hub id), optionally
-- with a LoRA adapter trained by recipes/flux_lora.lua; no Python.
--   nemo-lua tools/flux_sample.lua --model black-forest-labs/FLUX.1-dev --prompt "a photo of a cat" \
--       [--prompt "..."]... [--out sample.png] [--height 1024] [--width 1024] [--steps 28]
--       [--guidance 3.5] [--seed 0] [--max-sequence-length 512] [--dtype bfloat16] [--device auto]
--       [--lora runs/flux_lora/epoch_0_step_299/model] [--lora-scale 1.0]
--       [--negative-prompt TEXT --true-cfg 4.0]   (FluxPipeline's true CFG: two passes per step)
--       [--vae-tiling]   (decode large images in overlapping tiles: the memory of one tile)
-- One PNG per prompt: --out itself for one prompt, else <out without .png>_<i>.png (i from 0).
-- The pipeline must hold its text encoders and tokenizers (text_encoder, tokenizer, text_encoder_2,
-- tokenizer_2) and its VAE. The initial noise comes from nemo's generator (--seed), so the images
-- differ from diffusers' for the same seed; everything after that is FluxPipeline's computation.
local nemo = require "nemo"

local cli = require "nemo.cliargs"
local spec = {name = "flux_sample", usage = {
    "usage: nemo-lua tools/flux_sample.lua --model DIR_OR_ID --prompt TEXT [--prompt TEXT]... [--out FILE.png]",
    "       [--height N] [--width N] [--steps N] [--guidance X] [--seed N] [--max-sequence-length N]",
    "       [--dtype bfloat16|float16|float32] [--device auto|cpu|cuda:N] [--lora DIR] [--lora-scale X]",
    "       [--negative-prompt TEXT --true-cfg X] [--vae-tiling]"},
    flags = {["--vae-tiling"] = "vae_tiling"},
    defaults = {prompts = {}, out = "sample.png", height = 1024, width = 1024, steps = 28, guidance = 3.5, seed = 0,
                msl = 512, dtype = "bfloat16", device = "auto", lora_scale = 1.0},
    strings = {["--model"] = "model", ["--out"] = "out", ["--dtype"] = "dtype", ["--device"] = "device",
               ["--lora"] = "lora", ["--negative-prompt"] = "negative"},
    lists = {["--prompt"] = "prompts"},
    numbers = {["--guidance"] = "guidance", ["--seed"] = "seed", ["--lora-scale"] = "lora_scale", ["--true-cfg"] = "true_cfg"},
    counts = {["--height"] = "height", ["--width"] = "width", ["--steps"] = "steps", ["--max-sequence-length"] = "msl"}}
local o = cli.parse(arg, spec)
local function say(msg) io.stdout:write(msg, "\n") end
if not o.model then cli.usage(spec, "--model is required") end
if #o.prompts == 0 then cli.usage(spec, "at least one --prompt is required") end
if not o.out:match("%.png$") then cli.usage(spec, "--out must name a .png file, got '" .. o.out .. "'") end

cli.main("flux_sample", function()
    local pipe = nemo.sampling.open_pipeline(o.model, {dtype = o.dtype, device = o.device})
    for _, k in ipairs{"transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"} do
        if pipe.components[k] == nil then
            error(string.format("%s has no loadable %s (FLUX sampling needs transformer, vae, scheduler and both text " ..
                "encoders and tokenizers)", o.model, k), 0)
        end
    end
    nemo.sampling.ready_pipeline(pipe, {lora = o.lora, lora_scale = o.lora_scale, log = say})
    if o.vae_tiling then pipe.components.vae:enable_tiling(); say("VAE tiling on (tiled decode of large outputs)") end
    local t0 = os.clock()
    local out = nemo.sampling.flux{pipe = pipe, prompt = o.prompts, height = o.height, width = o.width,
        num_inference_steps = o.steps, guidance_scale = o.guidance, max_sequence_length = o.msl,
        negative_prompt = o.negative and (function()
            local t = {}
            for k = 1, #o.prompts do t[k] = o.negative end
            return t
        end)() or nil, true_cfg_scale = o.true_cfg,
        generator = nemo.Generator(o.seed), callback = function(k)
            io.stdout:write(string.format("\rstep %d/%d", k + 1, o.steps)); io.stdout:flush()
        end}
    io.stdout:write("\n")
    local u8 = nemo.sampling.to_uint8(out.image)
    for b = 1, #o.prompts do
        local path = #o.prompts == 1 and o.out or (o.out:gsub("%.png$", "") .. "_" .. (b - 1) .. ".png")
        nemo.image.save(path, u8:narrow(0, b - 1, 1))
        io.stdout:write(string.format("wrote %s (%d x %d): %s\n", path, o.width, o.height, o.prompts[b]))
    end
    io.stdout:write(string.format("%.1f s of CPU time\n", os.clock() - t0))
end)
