-- tools/flux_sample.lua: images from prompts with a FLUX pipeline folder (or hub id), optionally
-- with a LoRA adapter trained by recipes/flux_lora.lua; no Python.
--   nemo-lua tools/flux_sample.lua --model black-forest-labs/FLUX.1-dev --prompt "a photo of a cat" \
--       [--prompt "..."]... [--out sample.png] [--height 1024] [--width 1024] [--steps 28]
--       [--guidance 3.5] [--seed 0] [--max-sequence-length 512] [--dtype bfloat16] [--device auto]
--       [--lora runs/flux_lora/epoch_0_step_299/model] [--lora-scale 1.0]
--       [--negative-prompt TEXT --true-cfg 4.0]   (FluxPipeline's true CFG: two passes per step)
-- One PNG per prompt: --out itself for one prompt, else <out without .png>_<i>.png (i from 0).
-- The pipeline must hold its text encoders and tokenizers (text_encoder, tokenizer, text_encoder_2,
-- tokenizer_2) and its VAE. The initial noise comes from nemo's generator (--seed), so the images
-- differ from diffusers' for the same seed; everything after that is FluxPipeline's computation.
local nemo = require "nemo"

local function usage(msg)
    io.stderr:write((msg and ("flux_sample: " .. msg .. "\n") or ""),
        "usage: nemo-lua tools/flux_sample.lua --model DIR_OR_ID --prompt TEXT [--prompt TEXT]... [--out FILE.png]\n",
        "       [--height N] [--width N] [--steps N] [--guidance X] [--seed N] [--max-sequence-length N]\n",
        "       [--dtype bfloat16|float16|float32] [--device auto|cpu|cuda:N] [--lora DIR] [--lora-scale X]\n",
        "       [--negative-prompt TEXT --true-cfg X]\n")
    os.exit(msg and 2 or 0)
end

local o = {prompts = {}, out = "sample.png", height = 1024, width = 1024, steps = 28, guidance = 3.5, seed = 0,
           msl = 512, dtype = "bfloat16", device = "auto", lora_scale = 1.0}
local numeric = {["--height"] = "height", ["--width"] = "width", ["--steps"] = "steps", ["--guidance"] = "guidance",
                 ["--seed"] = "seed", ["--max-sequence-length"] = "msl", ["--lora-scale"] = "lora_scale",
                 ["--true-cfg"] = "true_cfg"}
local i = 1
while i <= #arg do
    local a, v = arg[i], arg[i + 1]
    if a == "-h" or a == "--help" then usage() end
    if v == nil then usage("option " .. a .. " needs a value") end
    if a == "--model" then o.model = v
    elseif a == "--prompt" then o.prompts[#o.prompts + 1] = v
    elseif a == "--out" then o.out = v
    elseif a == "--dtype" then o.dtype = v
    elseif a == "--device" then o.device = v
    elseif a == "--lora" then o.lora = v
    elseif a == "--negative-prompt" then o.negative = v
    elseif numeric[a] then
        local n = tonumber(v)
        if not n then usage(a .. " needs a number, got '" .. v .. "'") end
        o[numeric[a]] = n
    else usage("unknown option " .. a) end
    i = i + 2
end
if not o.model then usage("--model is required") end
if #o.prompts == 0 then usage("at least one --prompt is required") end
if not o.out:match("%.png$") then usage("--out must name a .png file, got '" .. o.out .. "'") end

local ok, err = pcall(function()
    local device = o.device == "auto" and nemo.pipeline._choose_device() or o.device
    local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(o.model, {torch_dtype = o.dtype, device = device,
        enable_gradient_checkpointing = false})
    for _, k in ipairs{"transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"} do
        if pipe.components[k] == nil then
            error(string.format("%s has no loadable %s (FLUX sampling needs transformer, vae, scheduler and both text " ..
                "encoders and tokenizers)", o.model, k), 0)
        end
    end
    if o.lora then
        nemo.peft.load_adapter(pipe.transformer, o.lora, {scale = o.lora_scale})
        io.stdout:write("applied the LoRA adapter ", o.lora, " (scale ", tostring(o.lora_scale), ")\n")
    end
    pipe.transformer:eval()
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
if not ok then
    io.stderr:write("flux_sample: ", tostring(err), "\n")
    os.exit(1)
end
