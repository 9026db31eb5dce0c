-- lua/nemo/data/encode.lua: a latent cache from a folder of images and captions, as Automodel's
-- `preprocessing_multiprocess image --processor flux` computes it, without Python
-- (tools/encode_images.lua is the command line):
--   encode.buckets(max_pixels, q)  Automodel's MultiTierBucketCalculator: for 14 aspect ratios the
--                                  largest w x h (multiples of q) within max_pixels, sorted by w/h
--   encode.bucket_for(buckets, w, h)   the bucket whose aspect ratio is nearest the image's
--   encode.resize_crop(rgb, w, h, tw, th)  "cover" Lanczos resize (PIL's Image.LANCZOS: a = 3,
--                                  antialiased by the scale; two 8-bit passes) and a center crop
--   encode.captions(dir, files, {captions = jsonl})  per image: <stem>.txt beside it, else the
--                                  JSONL line naming it (caption, internvl, usr, text or prompt),
--                                  else the stem with "_" -> " " (Automodel's fallback)
--   encode.flux_cache{images =, out =, pipe =, ...}   the whole job (see the function)
--
-- Per image (FLUX): RGB (gray repeated, alpha dropped) -> its bucket -> resize + crop -> x / 255
-- * 2 - 1 -> the VAE's latent distribution -> a sample (Automodel's default, from the seeded
-- generator) or its mean (mean = true) -> (z - shift_factor) * scaling_factor -> float16
-- latents [16, th/8, tw/8]; the caption -> T5 last_hidden_state [512, 4096] and CLIP
-- pooler_output [768] as FluxPipeline.encode_prompt (sampling.flux_encode_prompt), stored in
-- bfloat16. Written by data.CacheWriter (complete or not at all).
--
-- Where it differs from Automodel: images must be PNG or JPEG files (nemo.image, nemo.jpeg; WebP,
-- GIF, BMP, TIFF are skipped with a note), EXIF orientation is not applied (PIL does not either
-- unless asked); the resize uses floating-point Lanczos
-- coefficients where PIL uses 22-bit fixed point, so a pixel may differ by one level, and always
-- runs the horizontal pass first, as PIL's C source says, while PIL 13 runs the vertical one
-- first for some shapes (then pixels differ by a few levels: tests/lua/test_encode.lua); the VAE
-- sample's noise is nemo's, not torch's; the cache is nemo-lua's format (docs/data.md).
local ffi = require "ffi"
local nemo = require "nemo"
local json = require "nemo.json"
local fs = require "nemo.fs"
local image = require "nemo.image"

local M = {}

-- ==== buckets ====

M.ASPECT_RATIOS = {{1, 2}, {9, 16}, {2, 3}, {3, 4}, {4, 5}, {1, 1}, {5, 4}, {4, 3}, {3, 2}, {16, 10}, {5, 3},
                   {16, 9}, {2, 1}, {21, 9}}

local round_half_even = require("nemo.sampling").round_half_even   -- Python's round()

-- buckets(max_pixels = 65536, q = 64) -> {{w, h, ratio}, ...} sorted by w / h
function M.buckets(max_pixels, q)
    max_pixels, q = max_pixels or 65536, q or 64
    local seen, out = {}, {}
    for _, ar in ipairs(M.ASPECT_RATIOS) do
        local r = ar[1] / ar[2]
        local function roundq(v) return round_half_even(v / q) * q end
        local h = roundq(math.floor(math.sqrt(max_pixels / r)))
        local w = roundq(math.floor(h * r))
        while w * h > max_pixels do
            if w >= h then w = w - q else h = h - q end
        end
        if w >= q and h >= q and not seen[w .. "x" .. h] then
            seen[w .. "x" .. h] = true
            out[#out + 1] = {w, h, w / h}
        end
    end
    table.sort(out, function(a, b) return a[3] < b[3] end)
    return out
end

function M.bucket_for(buckets, w, h)
    local r, best, bd = w / h, nil, math.huge
    for _, b in ipairs(buckets) do
        local d = math.abs(b[3] - r)
        if d < bd then best, bd = b, d end
    end
    return best
end

-- ==== Lanczos resize (PIL's ImagingResample, float coefficients) ====

local function sinc(x)
    if x == 0 then return 1 end
    x = x * math.pi
    return math.sin(x) / x
end
local function lanczos(x)
    if x > -3 and x < 3 then return sinc(x) * sinc(x / 3) end
    return 0
end

-- coefficients of one axis: for each output index, its first input index, count and weights
local function coeffs(insize, outsize)
    local scale = insize / outsize
    local fs_ = math.max(scale, 1)
    local support = 3 * fs_
    local out = {}
    for xx = 0, outsize - 1 do
        local center = (xx + 0.5) * scale
        local xmin = math.max(math.floor(center - support + 0.5), 0)
        local xmax = math.min(math.floor(center + support + 0.5), insize)
        local w, total = {}, 0
        for x = xmin, xmax - 1 do
            local v = lanczos((x - center + 0.5) / fs_)
            w[#w + 1] = v
            total = total + v
        end
        if total ~= 0 then for i = 1, #w do w[i] = w[i] / total end end
        out[xx] = {xmin, w}
    end
    return out
end

local function clip8(v)
    v = math.floor(v + 0.5)
    if v < 0 then return 0 elseif v > 255 then return 255 end
    return v
end

-- resize(src (uint8 RGB, w x h), w, h, nw, nh) -> uint8 RGB nw x nh (horizontal pass first, then
-- vertical, each rounded to 8 bits, as PIL)
function M.resize(src, w, h, nw, nh)
    local tmp = ffi.new("uint8_t[?]", nw * h * 3)
    local cx = coeffs(w, nw)
    for y = 0, h - 1 do
        for xx = 0, nw - 1 do
            local c = cx[xx]
            local x0, wt = c[1], c[2]
            for ch = 0, 2 do
                local s = 0
                for k = 1, #wt do s = s + src[((y * w) + x0 + k - 1) * 3 + ch] * wt[k] end
                tmp[(y * nw + xx) * 3 + ch] = clip8(s)
            end
        end
    end
    local out = ffi.new("uint8_t[?]", nw * nh * 3)
    local cy = coeffs(h, nh)
    for yy = 0, nh - 1 do
        local c = cy[yy]
        local y0, wt = c[1], c[2]
        for xx = 0, nw - 1 do
            for ch = 0, 2 do
                local s = 0
                for k = 1, #wt do s = s + tmp[((y0 + k - 1) * nw + xx) * 3 + ch] * wt[k] end
                out[(yy * nw + xx) * 3 + ch] = clip8(s)
            end
        end
    end
    return out
end

-- resize_crop(src, w, h, tw, th) -> uint8 RGB tw x th, the crop's (left, top)
function M.resize_crop(src, w, h, tw, th)
    local scale = math.max(tw / w, th / h)
    local nw, nh = math.floor(w * scale), math.floor(h * scale)
    if nw < tw then nw = tw end   -- float error in w * scale must not leave less than the crop
    if nh < th then nh = th end
    local r = (nw == w and nh == h) and src or M.resize(src, w, h, nw, nh)
    local left, top = math.floor((nw - tw) / 2), math.floor((nh - th) / 2)
    local out = ffi.new("uint8_t[?]", tw * th * 3)
    for y = 0, th - 1 do ffi.copy(out + y * tw * 3, r + ((y + top) * nw + left) * 3, tw * 3) end
    return out, left, top
end

-- An RGB uint8 buffer of a PNG or JPEG (gray repeated, alpha dropped).
function M.read_rgb(path)
    local im = image.read(path)
    local W, H, C = im.width, im.height, im.channels
    local px = ffi.cast("const uint8_t *", im.pixels)
    local out = ffi.new("uint8_t[?]", W * H * 3)
    for i = 0, W * H - 1 do
        for ch = 0, 2 do out[i * 3 + ch] = px[i * C + ((C <= 2) and 0 or ch)] end
    end
    return out, W, H
end

-- [1, 3, th, tw] float32 in [-1, 1] from an RGB buffer (x / 255 - 0.5) / 0.5, as Automodel
local function to_tensor(buf, tw, th)
    local t = nemo.empty({1, 3, th, tw})
    local p = ffi.cast("float *", t:data_ptr())
    for y = 0, th - 1 do
        for x = 0, tw - 1 do
            for ch = 0, 2 do
                p[(ch * th + y) * tw + x] = (buf[(y * tw + x) * 3 + ch] / 255 - 0.5) / 0.5
            end
        end
    end
    return t
end
M.to_tensor = to_tensor

-- ==== captions ====

local CAPTION_KEYS = {"caption", "internvl", "usr", "text", "prompt"}

function M.captions(dir, files, o)
    local from_jsonl = {}
    if o and o.captions then
        local f, err = io.open(o.captions, "rb")
        if not f then error("captions: cannot read '" .. o.captions .. "': " .. tostring(err), 2) end
        local n = 0
        for line in f:lines() do
            n = n + 1
            if line:match("%S") then
                local ok, e = pcall(json.decode, line)
                if not ok or type(e) ~= "table" then
                    f:close()
                    error(string.format("captions: %s line %d is not a JSON object", o.captions, n), 2)
                end
                local name = e.file_name or e.image or e.file
                local cap
                for _, k in ipairs(CAPTION_KEYS) do if type(e[k]) == "string" then cap = e[k]; break end end
                if type(name) == "string" and cap then from_jsonl[fs.basename(name)] = cap end
            end
        end
        f:close()
    end
    local out, how = {}, {txt = 0, jsonl = 0, stem = 0}
    for i, file in ipairs(files) do
        local stem = file:gsub("%.[^.]*$", "")
        local txt = dir .. "/" .. stem .. ".txt"
        if fs.isfile(txt) then
            out[i] = (fs.read(txt):gsub("^%s+", ""):gsub("%s+$", ""))
            how.txt = how.txt + 1
        elseif from_jsonl[file] then
            out[i] = from_jsonl[file]
            how.jsonl = how.jsonl + 1
        else
            out[i] = (stem:gsub("_", " "))
            how.stem = how.stem + 1
        end
    end
    return out, how
end

-- ==== the job ====

-- flux_cache{images = dir, out = cache dir, pipe = a FLUX pipeline with vae, text_encoder,
-- tokenizer, text_encoder_2, tokenizer_2, max_pixels = 65536 (256p), quantization = 64,
-- captions = jsonl path, mean = false, generator = nemo.Generator, max_sequence_length = 512,
-- shard_size = 256, force = false, log = fn(msg)} -> {samples =, skipped = {non-PNG files},
-- buckets = {"WxH" -> count}, out =}
function M.flux_cache(o)
    local log = o.log or function() end
    if type(o.images) ~= "string" or not fs.isdir(o.images) then
        error("encode: images must be a folder of PNG files, got '" .. tostring(o.images) .. "'", 2)
    end
    local pipe = o.pipe
    for _, k in ipairs{"vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"} do
        if not (pipe and pipe.components and pipe.components[k]) then
            error("encode: the pipeline has no loadable " .. k .. " (a FLUX pipeline folder with its VAE, text " ..
                "encoders and tokenizers is needed)", 2)
        end
    end
    local files, skipped = {}, {}
    for _, n in ipairs(fs.list(o.images)) do
        local low = n:lower()
        if low:match("%.png$") or low:match("%.jpe?g$") then files[#files + 1] = n
        elseif low:match("%.webp$") or low:match("%.bmp$") or low:match("%.gif$") or low:match("%.tiff?$") then
            skipped[#skipped + 1] = n
        end
    end
    table.sort(files)
    if #files == 0 then
        error(string.format("encode: no PNG or JPEG file in '%s'%s", o.images, #skipped > 0 and string.format(
            " (%d other images: nemo-lua reads PNG and JPEG; convert them first, e.g. mogrify -format png *.webp)",
            #skipped) or ""), 2)
    end
    if #skipped > 0 then
        log(string.format("note: %d images that are neither PNG nor JPEG are skipped (convert them, " ..
            "e.g. mogrify -format png *.webp)", #skipped))
    end
    local caps, how = M.captions(o.images, files, {captions = o.captions})
    log(string.format("%d images; captions: %d from .txt files, %d from %s, %d from file names", #files, how.txt,
        how.jsonl, o.captions or "a JSONL file", how.stem))
    local buckets = M.buckets(o.max_pixels or 65536, o.quantization or 64)
    local c = pipe.components
    local vae = c.vae
    local vdt, vdev = vae:dtype(), "cpu"
    for _, p in vae:named_parameters() do vdev = p.device; break end
    local sf, shift = vae.config.scaling_factor, vae.config.shift_factor
    if shift == nil or shift == json.null then shift = 0 end
    local writer = require("nemo.data").CacheWriter(o.out, {model_type = "flux", shard_size = o.shard_size, force = o.force})
    local counts = {}
    local sampling = require "nemo.sampling"
    local ok, err = pcall(function()
        for i, file in ipairs(files) do
            local rgb, W, H = M.read_rgb(o.images .. "/" .. file)
            local b = M.bucket_for(buckets, W, H)
            local tw, th = b[1], b[2]
            local crop = M.resize_crop(rgb, W, H, tw, th)
            local x = to_tensor(crop, tw, th):to{dtype = vdt, device = vdev}
            local z = nemo.no_grad(function()
                local dist = vae:encode(x).latent_dist
                local s = o.mean and dist:mode() or dist:sample(o.generator)
                return ((s - shift) * sf):to{dtype = "float16", device = "cpu"}
            end)
            local enc = sampling.flux_encode_prompt{prompt = caps[i], tokenizer = c.tokenizer, text_encoder = c.text_encoder,
                tokenizer_2 = c.tokenizer_2, text_encoder_2 = c.text_encoder_2,
                max_sequence_length = o.max_sequence_length or 512}
            local id = string.format("%08d", i - 1)
            writer:add{id = id, caption = caps[i], latents = z:reshape{z.shape[2], z.shape[3], z.shape[4]},
                text_embeddings = enc.prompt_embeds[0]:to{dtype = "bfloat16", device = "cpu"},
                pooled = enc.pooled_prompt_embeds[0]:to{dtype = "bfloat16", device = "cpu"}}
            local key = tw .. "x" .. th
            counts[key] = (counts[key] or 0) + 1
            log(string.format("[%d/%d] %s (%d x %d) -> %s: %s", i, #files, file, W, H, key, caps[i]))
        end
        writer:finish()
    end)
    if not ok then
        pcall(writer.abort, writer)
        error(err, 0)
    end
    return {samples = #files, skipped = skipped, buckets = counts, out = o.out}
end

return M
