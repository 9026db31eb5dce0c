-- bench/vae.lua: the VAEs' decode with and without tiling (enable_tiling): seconds and peak
-- memory of one decode, on the CPU or a device. Prints a table; asserts nothing.
--   nemo-lua bench/vae.lua [--quick] [--device cpu|cuda:N] [--size PIXELS] [--dtype float32|bfloat16]
-- Default: FLUX.1's AutoencoderKL (block_out_channels 128/256/512/512, random weights) decoding a
-- 512 x 512 image, tiles of 256 pixels (so tiling splits it 3 x 3); and Wan 2.1's AutoencoderKLWan
-- (base_dim 96) decoding 5 frames of 256 x 256 with 128-pixel tiles. --quick: narrow VAEs
-- (channels / 4) and half the sizes, for a dry run.
local nemo = require "nemo"
local vae = require "nemo.models.vae"
local wv = require "nemo.models.wan_vae"
local common = require "nemo.models.common"
local clock = require("nemo.dist").wtime

local o = {device = "cpu", dtype = "float32", quick = false}
local argv = arg or {}
local i = 1
while i <= #argv do
    local a = argv[i]
    if a == "--quick" then o.quick = true
    elseif a == "--device" then o.device = argv[i + 1]; i = i + 1
    elseif a == "--dtype" then o.dtype = argv[i + 1]; i = i + 1
    elseif a == "--size" then o.size = tonumber(argv[i + 1]); i = i + 1
    else error("vae bench: unknown argument '" .. tostring(a) .. "' (--quick, --device D, --size N, --dtype T)", 0) end
    i = i + 1
end
local q = o.quick and 4 or 1
local function sync() if o.device:match("^cuda") then nemo.cuda.synchronize(o.device) end end

local function measure(model, z, tiled, tile)
    if tiled then tile(model) else model:disable_tiling() end
    collectgarbage(); collectgarbage()
    sync()
    nemo.reset_peak_memory_stats(o.device)
    local base = nemo.memory_stats(o.device).current
    local t0 = clock()
    local out = nemo.no_grad(function() return model:decode(z).sample end)
    sync()
    local secs = clock() - t0
    local peak = nemo.memory_stats(o.device).peak - base
    local shape = nemo.Tensor.shape_str(out.shape)
    out:free()
    return secs, peak, shape
end

local function row(name, model, z, tile)
    for _, tiled in ipairs {false, true} do
        local secs, peak, shape = measure(model, z, tiled, tile)
        print(string.format("%-34s %-7s %-22s %8.2f s %10.1f MiB", name, tiled and "tiled" or "whole", shape, secs,
            peak / 2 ^ 20))
    end
end

print(string.format("# bench/vae.lua on %s (%s)%s", o.device, o.dtype, o.quick and ", --quick" or ""))
print(string.format("%-34s %-7s %-22s %10s %14s", "model", "mode", "output", "time", "peak memory"))

local size = o.size or (o.quick and 256 or 512)
nemo.manual_seed(0)
local kl = vae.AutoencoderKL({block_out_channels = {128 / q, 256 / q, 512 / q, 512 / q}, latent_channels = 16,
    layers_per_block = 2, norm_num_groups = 32 / q, use_quant_conv = false, use_post_quant_conv = false,
    down_block_types = {"DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"},
    up_block_types = {"UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"},
    sample_size = 1024}, {dtype = o.dtype, device = o.device})
local z = nemo.randn({1, 16, size / 8, size / 8}):to{dtype = o.dtype, device = o.device}
row(string.format("AutoencoderKL (FLUX.1%s)", o.quick and " / 4" or ""), kl, z,
    function(m) m:enable_tiling{tile_sample_min_size = size / 2} end)

local wsize = size / 2
local wan = common.without_init(function() return wv.AutoencoderKLWan({base_dim = 96 / q, z_dim = 16},
    {dtype = o.dtype, device = o.device}) end)
for _, p in ipairs(wan:parameters()) do
    nemo.no_grad(function() p:copy_(nemo.randn(p.shape):mul(0.05):to{dtype = p.dtype, device = p.device}) end)
end
local zw = nemo.randn({1, 16, 2, wsize / 8, wsize / 8}):to{dtype = o.dtype, device = o.device}
row(string.format("AutoencoderKLWan (Wan 2.1%s)", o.quick and " / 4" or ""), wan, zw,
    function(m) m:enable_tiling(wsize / 2, wsize / 2, wsize / 4 + wsize / 8, wsize / 4 + wsize / 8) end)
