-- nemo-lua recipes/generate.lua -c recipes/generate_flux.yaml | generate_wan.yaml | generate_wan22.yaml
--     [--model.checkpoint runs/flux_finetune/LATEST] [--model.lora_weights <checkpoint>/model]
--     [--inference.prompts '["a photo of a cat"]'] [--section.key value ...]
-- Images (FLUX) or animated PNGs (Wan) from a pretrained pipeline, a training checkpoint or a LoRA
-- adapter, with NeMo Automodel's generate configs (lua/nemo/generate.lua says which keys).
local ok, err = pcall(require("nemo.generate").main, arg)
if not ok then
    io.stderr:write("nemo-lua: ", tostring(err), "\n")
    os.exit(1)
end
