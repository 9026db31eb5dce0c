-- tests/lua/test_vae_tiling.lua: tiled VAE encode / decode (enable_tiling) against diffusers'
-- golden case vae_tiling (tests/golden/vae_tiling/make_golden.py): AutoencoderKL (vae_tiny,
-- 32-pixel tiles from its config.sample_size) and AutoencoderKLWan (wan_vae_tiny, 32 x 32 tiles
-- with strides 24 x 16), in float32 and float64; then what tiling must and must not change
-- (inputs within one tile, slicing with tiling, the peak memory of a large decode), bf16, the
-- options and their errors. Golden comparisons FAIL when the case is absent.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local json = require "nemo.json"
local golden = require "golden"
local VAE = require("nemo.models.vae").AutoencoderKL
local WanVAE = require("nemo.models.wan_vae").AutoencoderKLWan

local close = T.close
local WAN_TILES = {32, 32, 24, 16}   -- make_golden.py's enable_tiling(32, 32, 24, 16)

local dir, why = golden.case("vae_tiling", "case.safetensors")
local kl_dir, kl_why = golden.case("vae_tiny", "config.json")
local wan_dir, wan_why = golden.case("wan_vae_tiny", "config.json")
if not (dir and kl_dir and wan_dir) then
    T.ok(false, "vae_tiling golden comparisons: " .. tostring(why or kl_why or wan_why))
    T.done()
end
local meta = json.read_file(dir .. "/golden.json")
local case = nemo.load_file(dir .. "/case.safetensors")
local c64 = nemo.load_file(dir .. "/case_f64.safetensors")

local function kl(dtype) return VAE.from_pretrained(kl_dir, {torch_dtype = dtype or "float32"}) end
local function wan(dtype) return WanVAE.from_pretrained(wan_dir, {torch_dtype = dtype or "float32"}) end
local function maxdiff(a, b) return (T.maxdiff(a, b)) end

-- ==== the golden case ====

-- Tolerances. float64: the tiling itself (slices, blend weights, crops) must agree to rounding,
-- rtol 1e-12. float32: diffusers' own float32 run differs from float64 by up to 1.5e-6 (AutoencoderKL)
-- and 1.5e-5 (the Wan decode; its conv_out is scaled up) relative to max|ref| (golden.json
-- f32_vs_f64); nemo's float32 convolutions round differently again, so rtol 1e-5 and 4e-5.
for _, dt in ipairs {"float32", "float64"} do
    local ref = dt == "float64" and c64 or case
    local f64 = dt == "float64"
    nemo.no_grad(function()
        local m = kl(dt):enable_tiling()
        local post = m:encode(case["kl.image"]:to{dtype = dt}).latent_dist
        close(post.mean, ref["kl.image.mean"], f64 and 1e-12 or 1e-5, 0, "AutoencoderKL tiled encode " .. dt .. ": mean")
        close(post.logvar, ref["kl.image.logvar"], f64 and 1e-12 or 1e-5, 0, "AutoencoderKL tiled encode " .. dt .. ": logvar")
        close(m:decode(case["kl.latent"]:to{dtype = dt}).sample, ref["kl.latent.decode"], f64 and 1e-12 or 1e-5, 0,
            "AutoencoderKL tiled decode " .. dt)

        local w = wan(dt):enable_tiling(unpack(WAN_TILES))
        post = w:encode(case["wan.video"]:to{dtype = dt}).latent_dist
        close(post.mean, ref["wan.video.mean"], f64 and 1e-12 or 1e-5, 0, "AutoencoderKLWan tiled encode " .. dt .. ": mean")
        close(post.logvar, ref["wan.video.logvar"], f64 and 1e-12 or 1e-5, 0, "AutoencoderKLWan tiled encode " .. dt .. ": logvar")
        close(w:decode(case["wan.latent"]:to{dtype = dt}).sample, ref["wan.latent.decode"], f64 and 1e-12 or 4e-5, 0,
            "AutoencoderKLWan tiled decode " .. dt)
    end)
end

-- ==== what tiling changes and what it does not ====

nemo.no_grad(function()
    -- the tiles are really blended: far from a whole pass (diffusers' own distance is in golden.json)
    local m = kl()
    local whole = m:decode(case["kl.latent"]).sample
    local d = maxdiff(whole, case["kl.latent.decode"])
    T.ok(d > 0.1, "AutoencoderKL: the tiled decode differs from the whole pass (blended tiles)",
        string.format("max diff %.3g; diffusers' %.3g", d, meta.max_abs_tiled_minus_untiled_f64["kl.latent.decode"]))
    local w = wan()
    local wwhole = w:decode(case["wan.latent"]).sample
    d = maxdiff(wwhole, case["wan.latent.decode"])
    T.ok(d > 0.1, "AutoencoderKLWan: the tiled decode differs from the whole pass", string.format("max diff %.3g", d))

    -- inputs that fit one tile go through the whole pass, bit for bit
    local small = case["kl.latent"]:narrow(2, 0, 16):narrow(3, 0, 16):contiguous()
    local a = m:decode(small).sample
    m:enable_tiling()
    T.ok(T.same_values(m:decode(small).sample, a), "AutoencoderKL: a latent within one tile (16 x 16) is not tiled")
    local img = case["kl.image"]:narrow(2, 0, 32):narrow(3, 0, 32):contiguous()
    m:disable_tiling()
    local e0 = m:encode(img).latent_dist.mean
    m:enable_tiling()
    T.ok(T.same_values(m:encode(img).latent_dist.mean, e0), "AutoencoderKL: an image within one tile (32 x 32) is not tiled")
    local wsmall = case["wan.latent"]:narrow(3, 0, 4):narrow(4, 0, 4):contiguous()
    local wa = w:decode(wsmall).sample
    w:enable_tiling(unpack(WAN_TILES))
    T.ok(T.same_values(w:decode(wsmall).sample, wa), "AutoencoderKLWan: a latent within one tile (4 x 4) is not tiled")
    w:disable_tiling()
    T.ok(T.same_values(w:decode(case["wan.latent"]).sample, wwhole), "AutoencoderKLWan: disable_tiling restores the whole pass")

    -- slicing and tiling together: each sample tiled alone
    local tiled = kl():enable_tiling()
    local batched = tiled:encode(case["kl.image"]).latent_dist.mean
    close(tiled:enable_slicing():encode(case["kl.image"]).latent_dist.mean, batched, 1e-6, 0,
        "AutoencoderKL: enable_slicing with tiling gives the batched tiled encode")

    -- bf16 models tile too (blends in float32, rounded once), near the float32 reference
    local b = kl("bfloat16"):enable_tiling()
    local db = b:decode(case["kl.latent"]:bfloat16()).sample
    T.is(db.dtype, "bfloat16", "AutoencoderKL bf16 tiled decode stays bf16")
    close(db, case["kl.latent.decode"], 3e-2, 0, "AutoencoderKL bf16 tiled decode near float32 (rtol 3e-2)")
    local wb = wan("bfloat16"):enable_tiling(unpack(WAN_TILES))
    close(wb:encode(case["wan.video"]:bfloat16()).latent_dist.mean, case["wan.video.mean"], 3e-2, 0,
        "AutoencoderKLWan bf16 tiled encode near float32 (rtol 3e-2)")
end)

-- the point of tiling: a large decode's peak memory is that of one tile (plus the output)
nemo.no_grad(function()
    -- the peak memory above what was live before one decode of z, with tiling (tile(model)) or without
    local function decode_peak(model, z, tile)
        if tile then tile(model) else model:disable_tiling() end
        collectgarbage(); collectgarbage()
        nemo.reset_peak_memory_stats()
        local base = nemo.memory_stats().current
        local out = model:decode(z).sample
        local p = nemo.memory_stats().peak - base
        out:free()
        return p
    end
    local m = kl()
    local z = nemo.randn({1, 4, 96, 96}, {generator = nemo.Generator(5)})
    local whole, tiled = decode_peak(m, z), decode_peak(m, z, function(v) v:enable_tiling() end)
    T.ok(tiled < 0.5 * whole, "AutoencoderKL: tiled decode of a 192 x 192 image peaks below half the whole pass",
        string.format("peak %.1f MiB tiled, %.1f MiB whole", tiled / 2 ^ 20, whole / 2 ^ 20))
    -- the Wan VAE too: its tiles' intermediates must not pile up across tiles (common.tiled
    -- collects after each tile; without that this peak was 9 tiles' garbage)
    local w = wan()
    local zw = nemo.randn({1, 4, 2, 24, 24}, {generator = nemo.Generator(6)})
    local ww, wt = decode_peak(w, zw), decode_peak(w, zw, function(v) v:enable_tiling(64, 64, 48, 48) end)
    T.ok(wt < 0.5 * ww, "AutoencoderKLWan: tiled decode of 2 latent frames of 24 x 24 peaks below half the whole pass",
        string.format("peak %.1f MiB tiled, %.1f MiB whole", wt / 2 ^ 20, ww / 2 ^ 20))
end)

-- ==== options and errors ====

do
    local m = kl()
    T.is(m.tile_sample_min_size, 32, "AutoencoderKL: image tiles of config.sample_size")
    T.is(m.tile_latent_min_size, 16, "AutoencoderKL: latent tiles of sample_size / vae_scale_factor")
    T.is(m.tile_overlap_factor, 0.25, "AutoencoderKL: a quarter overlap")
    m:enable_tiling{tile_sample_min_size = 64, tile_overlap_factor = 0.5}
    T.ok(m.use_tiling and m.tile_sample_min_size == 64 and m.tile_latent_min_size == 32 and m.tile_overlap_factor == 0.5,
        "AutoencoderKL:enable_tiling{...} sets the tile size (the latent tile follows) and the overlap")
    T.raises(function() m:enable_tiling{tile_size = 64} end, "unknown option 'tile_size'", "AutoencoderKL: an unknown option")
    T.raises(function() m:enable_tiling{tile_sample_min_size = 33} end, "positive multiple of 2",
        "AutoencoderKL: a tile that is not a multiple of the scale factor")
    T.raises(function() m:enable_tiling{tile_overlap_factor = 1} end, "in %[0, 1%)", "AutoencoderKL: overlap factor 1")
    local tiny = kl():enable_tiling{tile_sample_min_size = 2, tile_overlap_factor = 0.5}
    T.raises(function() nemo.no_grad(function() return tiny:decode(nemo.zeros(1, 4, 4, 4)) end) end,
        "tiles step by 0", "AutoencoderKL: tiles too small for their overlap are an error, not an endless loop")

    local w = wan()
    T.ok(w.tile_sample_min_height == 256 and w.tile_sample_min_width == 256 and w.tile_sample_stride_height == 192 and
        w.tile_sample_stride_width == 192, "AutoencoderKLWan: diffusers' default tiles (256, stride 192)")
    w:enable_tiling{tile_sample_min_height = 64, tile_sample_stride_height = 32, tile_sample_stride_width = 128}
    T.ok(w.tile_sample_min_height == 64 and w.tile_sample_min_width == 256 and w.tile_sample_stride_height == 32 and
        w.tile_sample_stride_width == 128, "AutoencoderKLWan:enable_tiling{...}: the keys given change, the rest stay")
    w = wan()
    T.raises(function() w:enable_tiling(32, 32, 48, 16) end, "tile_sample_stride_height %(48%) is larger than",
        "AutoencoderKLWan: a stride larger than its tile (gaps) is an error")
    T.raises(function() w:enable_tiling(30) end, "tile_sample_min_height must be a positive multiple of 8",
        "AutoencoderKLWan: a tile that is not a multiple of 8")
    T.raises(function() w:enable_tiling{tile_height = 32} end, "unknown option 'tile_height'",
        "AutoencoderKLWan: an unknown option")
    T.ok(not w.use_tiling and w.tile_sample_min_height == 256, "AutoencoderKLWan: a refused enable_tiling changes nothing")
    local pos = wan():enable_tiling(unpack(WAN_TILES))
    local tab = wan():enable_tiling{tile_sample_min_height = 32, tile_sample_min_width = 32,
        tile_sample_stride_height = 24, tile_sample_stride_width = 16}
    T.ok(pos.tile_sample_stride_width == 16 and tab.tile_sample_stride_width == 16 and tab.tile_sample_stride_height == 24,
        "AutoencoderKLWan: positional and table forms agree")
end

T.done()
