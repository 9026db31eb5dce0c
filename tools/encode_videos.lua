-- tools/encode_videos.lua: a Wan latent cache (docs/data.md) from videos given as folders of frames,
-- as Automodel's `preprocessing_multiprocess video --processor wan` makes one; no Python.
--   nemo-lua tools/encode_videos.lua --videos DIR --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --out CACHE
--       [--resolution 512] [--quantization 16 (32 with Wan 2.2's VAE)] [--num-frames 81] [--captions captions.jsonl]
--       [--dtype bfloat16] [--device auto] [--max-sequence-length 226] [--shard-size 256] [--force]
-- Each video is a subfolder of DIR with its frames as PNG or JPEG files in name order; make them
-- with e.g. `ffmpeg -i clip.mp4 DIR/clip/%05d.png`. --num-frames (4k + 1) frames are taken evenly
-- spaced (default: all of them, down to the largest 4k + 1). Captions: <name>.txt beside the
-- folder, else the --captions JSONL line whose file_name is the folder or its video file (keys
-- caption, internvl, usr, text or prompt), else the folder name with _ -> space. --resolution R:
-- the pixel budget R x R of Automodel's buckets (Wan quantizes to 16). The latents are the VAE
-- posterior's mean normalised by latents_mean / latents_std (Automodel's deterministic default).
-- The result trains with recipes/wan_finetune.lua or wan_lora.lua (--data.dataloader.cache_dir).
local nemo = require "nemo"

local cli = require "nemo.cliargs"
local spec = {name = "encode_videos", usage = {
    "usage: nemo-lua tools/encode_videos.lua --videos DIR --model DIR_OR_ID --out CACHE [--resolution 512]",
    "       [--quantization 16 (32 with Wan 2.2's VAE)] [--num-frames N] [--captions FILE.jsonl] [--dtype bfloat16|float32]",
    "       [--device auto|cpu|cuda:N] [--max-sequence-length 226] [--shard-size 256] [--force]"},
    defaults = {resolution = 512, dtype = "bfloat16", device = "auto", msl = 226, shard_size = 256},
    strings = {["--videos"] = "videos", ["--model"] = "model", ["--out"] = "out", ["--captions"] = "captions",
               ["--dtype"] = "dtype", ["--device"] = "device"},
    counts = {["--resolution"] = "resolution", ["--quantization"] = "quantization", ["--num-frames"] = "num_frames",
              ["--max-sequence-length"] = "msl", ["--shard-size"] = "shard_size"},
    flags = {["--force"] = "force"}}
local o = cli.parse(arg, spec)
for _, k in ipairs{"videos", "model", "out"} do if not o[k] then cli.usage(spec, "--" .. k .. " is required") end end

cli.main("encode_videos", function()
    local device = o.device == "auto" and nemo.pipeline._choose_device() or o.device
    local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(o.model, {torch_dtype = o.dtype, device = device,
        components_to_load = {"vae", "text_encoder", "tokenizer"}})
    local t0 = os.time()
    local r = require("nemo.data.encode").wan_cache{videos = o.videos, out = o.out, pipe = pipe,
        max_pixels = o.resolution * o.resolution, quantization = o.quantization, num_frames = o.num_frames,
        captions = o.captions, max_sequence_length = o.msl, shard_size = o.shard_size, force = o.force,
        log = function(msg) io.stdout:write(msg, "\n"); io.stdout:flush() end}
    local parts = {}
    for k, n in pairs(r.buckets) do parts[#parts + 1] = k .. ": " .. n end
    table.sort(parts)
    io.stdout:write(string.format("wrote %s: %d videos (%s) in %d s\n", r.out, r.samples, table.concat(parts, ", "),
        os.time() - t0))
end)
