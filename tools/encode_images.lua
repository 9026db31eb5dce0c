-- tools/encode_images.lua: a FLUX latent cache (docs/data.md) from a folder of PNG / JPEG images and
-- captions, as Automodel's `preprocessing_multiprocess image --processor flux` makes one; no Python.
--   nemo-lua tools/encode_images.lua --images DIR --model black-forest-labs/FLUX.1-dev --out CACHE
--       [--resolution 256] [--quantization 64] [--captions captions.jsonl] [--mean] [--seed 0]
--       [--dtype bfloat16] [--device auto] [--max-sequence-length 512] [--shard-size 256] [--force]
-- Captions: <image stem>.txt beside each image, else the --captions JSONL line whose file_name is
-- the image (keys caption, internvl, usr, text or prompt), else the file name with _ -> space.
-- --resolution R: the pixel budget R x R of Automodel's buckets (256p, 512p, 1024p presets: 256,
-- 512, 1024); images go to the bucket of the nearest aspect ratio, resized to cover it
-- (Lanczos) and center-cropped. --mean stores the VAE posterior's mean instead of a sample.
-- The result trains with recipes/flux_finetune.lua or flux_lora.lua (--data.dataloader.cache_dir).
local nemo = require "nemo"

local cli = require "nemo.cliargs"
local spec = {name = "encode_images", usage = {
    "usage: nemo-lua tools/encode_images.lua --images DIR --model DIR_OR_ID --out CACHE [--resolution 256]",
    "       [--quantization 64] [--captions FILE.jsonl] [--mean] [--seed N] [--dtype bfloat16|float32]",
    "       [--device auto|cpu|cuda:N] [--max-sequence-length 512] [--shard-size 256] [--force]"},
    defaults = {resolution = 256, quantization = 64, seed = 0, dtype = "bfloat16", device = "auto", msl = 512,
                shard_size = 256},
    strings = {["--images"] = "images", ["--model"] = "model", ["--out"] = "out", ["--captions"] = "captions",
               ["--dtype"] = "dtype", ["--device"] = "device"},
    numbers = {["--seed"] = "seed"},
    counts = {["--resolution"] = "resolution", ["--quantization"] = "quantization",
              ["--max-sequence-length"] = "msl", ["--shard-size"] = "shard_size"},
    flags = {["--mean"] = "mean", ["--force"] = "force"}}
local o = cli.parse(arg, spec)
for _, k in ipairs{"images", "model", "out"} do if not o[k] then cli.usage(spec, "--" .. k .. " is required") end end

cli.main("encode_images", function()
    local device = o.device == "auto" and nemo.pipeline._choose_device() or o.device
    local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(o.model, {torch_dtype = o.dtype, device = device,
        components_to_load = {"vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}})
    local t0 = os.time()
    local r = require("nemo.data.encode").flux_cache{images = o.images, out = o.out, pipe = pipe,
        max_pixels = o.resolution * o.resolution, quantization = o.quantization, captions = o.captions, mean = o.mean,
        generator = nemo.Generator(o.seed), max_sequence_length = o.msl, shard_size = o.shard_size, force = o.force,
        log = function(msg) io.stdout:write(msg, "\n"); io.stdout:flush() end}
    local parts = {}
    for k, n in pairs(r.buckets) do parts[#parts + 1] = k .. ": " .. n end
    table.sort(parts)
    io.stdout:write(string.format("wrote %s: %d samples (%s) in %d s\n", r.out, r.samples, table.concat(parts, ", "),
        os.time() - t0))
end)
