-- lua/nemo/data/encode.lua: a latent cache from a folder of images (or of videos as frame
-- folders) and captions, as Automodel's `preprocessing_multiprocess image --processor flux`
-- (`video --processor wan`) computes it, without Python (tools/encode_images.lua and
-- tools/encode_videos.lua are the command lines):
--   encode.buckets(max_pixels, q)  Automodel's MultiTierBucketCalculator: for 14 aspect ratios the
--                                  largest w x h (multiples of q) within max_pixels, sorted by w/h
--   encode.bucket_for(buckets, w, h)   the bucket whose aspect ratio is nearest the image's
--   encode.resize(rgb, w, h, nw, nh, filter)   PIL's resize ("lanczos": Image.LANCZOS, a = 3;
--                                  "bicubic": Image.BICUBIC; antialiased by the scale; two 8-bit passes)
--   encode.resize_crop(rgb, w, h, tw, th)  "cover" Lanczos resize and a center crop
--   encode.captions(dir, files, {captions = jsonl})  per image: <stem>.txt beside it, else the
--                                  JSONL line naming it (caption, internvl, usr, text or prompt),
--                                  else the stem with "_" -> " " (Automodel's fallback)
--   encode.flux_cache{images =, out =, pipe =, ...}   the whole job (see the function)
--   encode.resize_bilinear(rgb, w, h, nw, nh)   cv2.resize's INTER_LINEAR (half-pixel centers,
--                                  no antialiasing, 11-bit fixed-point weights), for video frames
--   encode.wan_cache{videos =, out =, pipe =, ...}   a Wan cache from videos given as folders
--                                  of frames (see the function)
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
-- unless asked); the resize is PIL's (22-bit fixed-point weights, the same bytes) and always
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

-- ==== PIL's resize (ImagingResample for 8-bit images: Lanczos, bicubic) ====

local function sinc(x)
    if x == 0 then return 1 end
    x = x * math.pi
    return math.sin(x) / x
end
local FILTERS = {
    lanczos = {support = 3, fn = function(x)
        if x >= -3 and x < 3 then return sinc(x) * sinc(x / 3) end
        return 0
    end},
    bicubic = {support = 2, fn = function(x)   -- a = -0.5
        if x < 0 then x = -x end
        if x < 1 then return (1.5 * x - 2.5) * x * x + 1 end
        if x < 2 then return (((x - 5) * x + 8) * x - 4) * -0.5 end
        return 0
    end},
}
M.FILTERS = FILTERS

local PREC = 4194304   -- 2^22: PIL's PRECISION_BITS for 8-bit images
local function trunc(v) return v < 0 and math.ceil(v) or math.floor(v) end   -- C's (int) cast

-- coefficients of one axis, as PIL's precompute_coeffs + normalize_coeffs_8bpc: for each output
-- index its first input index and the weights in 22-bit fixed point
local function coeffs(insize, outsize, filter)
    local f = FILTERS[filter]
    local scale = insize / outsize
    local filterscale = scale < 1 and 1 or scale
    local support = f.support * filterscale
    local ss = 1.0 / filterscale
    local out = {}
    for xx = 0, outsize - 1 do
        local center = (xx + 0.5) * scale
        local xmin = trunc(center - support + 0.5)
        if xmin < 0 then xmin = 0 end
        local xmax = trunc(center + support + 0.5)
        if xmax > insize then xmax = insize end
        local w, ww = {}, 0
        for x = 0, xmax - xmin - 1 do
            local v = f.fn((x + xmin - center + 0.5) * ss)
            w[x + 1] = v
            ww = ww + v
        end
        for i = 1, #w do
            local v = (ww ~= 0 and w[i] / ww or w[i]) * PREC
            w[i] = v < 0 and trunc(-0.5 + v) or trunc(0.5 + v)
        end
        out[xx] = {xmin, w}
    end
    return out
end

-- PIL's clip8 of a fixed-point sum that started at 2^21: floor(s / 2^22) clamped to 0..255
local function clip8(s)
    local v = math.floor(s / PREC)
    if v < 0 then return 0 elseif v > 255 then return 255 end
    return v
end

-- resize(src (uint8 RGB, w x h), w, h, nw, nh, filter = "lanczos") -> uint8 RGB nw x nh, as PIL's
-- Image.resize with Image.LANCZOS ("bicubic": Image.BICUBIC): horizontal pass first, then
-- vertical, each rounded to 8 bits, with PIL's fixed-point weights (the same bytes); an axis
-- whose size does not change is not resampled.
function M.resize(src, w, h, nw, nh, filter)
    filter = filter or "lanczos"
    if not FILTERS[filter] then error("resize: unknown filter '" .. tostring(filter) .. "' (lanczos, bicubic)", 2) end
    local tmp, tw = src, w
    if nw ~= w then
        tmp = ffi.new("uint8_t[?]", nw * h * 3)
        tw = nw
        local cx = coeffs(w, nw, filter)
        for y = 0, h - 1 do
            for xx = 0, nw - 1 do
                local c = cx[xx]
                local x0, wt = c[1], c[2]
                for ch = 0, 2 do
                    local s = 2097152
                    for k = 1, #wt do s = s + src[((y * w) + x0 + k - 1) * 3 + ch] * wt[k] end
                    tmp[(y * nw + xx) * 3 + ch] = clip8(s)
                end
            end
        end
    end
    if nh == h then
        if rawequal(tmp, src) then
            local c = ffi.new("uint8_t[?]", w * h * 3)
            ffi.copy(c, src, w * h * 3)
            return c
        end
        return tmp
    end
    local out = ffi.new("uint8_t[?]", tw * nh * 3)
    local cy = coeffs(h, nh, filter)
    for yy = 0, nh - 1 do
        local c = cy[yy]
        local y0, wt = c[1], c[2]
        for xx = 0, tw - 1 do
            for ch = 0, 2 do
                local s = 2097152
                for k = 1, #wt do s = s + tmp[((y0 + k - 1) * tw + xx) * 3 + ch] * wt[k] end
                out[(yy * tw + xx) * 3 + ch] = clip8(s)
            end
        end
    end
    return out
end

-- resize_crop(src, w, h, tw, th, resize = M.resize) -> uint8 RGB tw x th, the crop's (left, top)
function M.resize_crop(src, w, h, tw, th, resize)
    local scale = math.max(tw / w, th / h)
    local nw, nh = math.floor(w * scale), math.floor(h * scale)
    if nw < tw then nw = tw end   -- float error in w * scale must not leave less than the crop
    if nh < th then nh = th end
    local r = (nw == w and nh == h) and src or (resize or M.resize)(src, w, h, nw, nh)
    local left, top = math.floor((nw - tw) / 2), math.floor((nh - th) / 2)
    local out = ffi.new("uint8_t[?]", tw * th * 3)
    for y = 0, th - 1 do ffi.copy(out + y * tw * 3, r + ((y + top) * nw + left) * 3, tw * 3) end
    return out, left, top
end

-- rgb_of(im) -> an RGB uint8 buffer, width, height of an image table {width, height, channels,
-- pixels} (nemo.image.read's): gray repeated, alpha dropped.
function M.rgb_of(im)
    local W, H, C = im.width, im.height, im.channels or 3
    local px = ffi.cast("const uint8_t *", im.pixels)
    local out = ffi.new("uint8_t[?]", W * H * 3)
    for i = 0, W * H - 1 do
        for ch = 0, 2 do out[i * 3 + ch] = px[i * C + ((C <= 2) and 0 or ch)] end
    end
    return out, W, H
end

-- An RGB uint8 buffer of a PNG or JPEG (gray repeated, alpha dropped).
function M.read_rgb(path) return M.rgb_of(image.read(path)) end

-- to_tensor(buf, tw, th, range) -> [1, 3, th, tw] float32 from an RGB buffer: range "-1_1" (the
-- default) (x / 255 - 0.5) / 0.5, as Automodel; "0_1" x / 255 (diffusers' image processors, which
-- then take 2 x - 1 themselves)
local function to_tensor(buf, tw, th, range)
    local t = nemo.empty({1, 3, th, tw})
    local p = ffi.cast("float *", t:data_ptr())
    local unit = range == "0_1"
    for y = 0, th - 1 do
        for x = 0, tw - 1 do
            for ch = 0, 2 do
                local v = buf[(y * tw + x) * 3 + ch] / 255
                p[(ch * th + y) * tw + x] = unit and v or (v - 0.5) / 0.5
            end
        end
    end
    return t
end
M.to_tensor = to_tensor

local f32box = ffi.new("float[1]")
local function f32(x) f32box[0] = x; return f32box[0] end

-- resize_bilinear(src (uint8 RGB, w x h), w, h, nw, nh) -> uint8 RGB nw x nh: cv2.resize with
-- INTER_LINEAR as its C code computes it: source x = (dx + 0.5) * w / nw - 0.5, clamped to the
-- edges; weights rounded to 11 bits (2048 = 1); the horizontal pass kept in integers, the
-- vertical one in cv2's SIMD form (((r0 >> 4) * b0 >> 16) + ((r1 >> 4) * b1 >> 16) + 2) >> 2.
-- Against opencv 5.0 (tests/golden/cv2_resize): downscales exact, upscales within one level
-- on under 1% of the values (its IPP / HAL path rounds some otherwise).
function M.resize_bilinear(src, w, h, nw, nh)
    local function axis(insize, outsize)
        local scale = 1 / (outsize / insize)   -- as cv2: 1 / inv_scale in double, then float math
        local idx, a0 = ffi.new("int32_t[?]", outsize), ffi.new("int32_t[?]", outsize)
        for d = 0, outsize - 1 do
            local f = f32((d + 0.5) * scale - 0.5)
            local i = math.floor(f)
            f = f32(f - i)
            if i < 0 then i, f = 0, 0 end
            if i >= insize - 1 then i, f = insize - 1, 0 end
            idx[d], a0[d] = i, round_half_even(f32(f32(1 - f) * 2048))
        end
        return idx, a0
    end
    local xi, xa = axis(w, nw)
    local yi, ya = axis(h, nh)
    local rows = ffi.new("int32_t[?]", nw * h * 3)
    for y = 0, h - 1 do
        for x = 0, nw - 1 do
            local i0, a = xi[x], xa[x]
            local i1 = i0 + 1 < w and i0 + 1 or i0
            for ch = 0, 2 do
                rows[(y * nw + x) * 3 + ch] = src[(y * w + i0) * 3 + ch] * a + src[(y * w + i1) * 3 + ch] * (2048 - a)
            end
        end
    end
    local out = ffi.new("uint8_t[?]", nw * nh * 3)
    for y = 0, nh - 1 do
        local j0, b = yi[y], ya[y]
        local j1 = j0 + 1 < h and j0 + 1 or j0
        for x = 0, nw - 1 do
            for ch = 0, 2 do
                local r0, r1 = math.floor(rows[(j0 * nw + x) * 3 + ch] / 16), math.floor(rows[(j1 * nw + x) * 3 + ch] / 16)
                local v = math.floor((math.floor(r0 * b / 65536) + math.floor(r1 * (2048 - b) / 65536) + 2) / 4)
                out[(y * nw + x) * 3 + ch] = v < 0 and 0 or (v > 255 and 255 or v)
            end
        end
    end
    return out
end

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
                if type(name) == "string" and cap then
                    from_jsonl[fs.basename(name)] = cap
                    local stem = fs.basename(name):gsub("%.[^.]*$", "")
                    if from_jsonl[stem] == nil then from_jsonl[stem] = cap end   -- clip.mp4 names the folder clip
                end
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

-- ==== the jobs ====

-- list_images(dir) -> sorted PNG / JPEG names, other image names (skipped)
local function list_images(dir)
    local files, skipped = {}, {}
    for _, n in ipairs(fs.list(dir)) do
        local low = n:lower()
        if low:match("%.png$") or low:match("%.jpe?g$") then files[#files + 1] = n
        elseif low:match("%.webp$") or low:match("%.bmp$") or low:match("%.gif$") or low:match("%.tiff?$") then
            skipped[#skipped + 1] = n
        end
    end
    table.sort(files)
    return files, skipped
end

-- need(pipe, keys, what): an error naming the first component of keys the pipeline lacks
local function need(pipe, keys, what)
    for _, k in ipairs(keys) do
        if not (pipe and pipe.components and pipe.components[k]) then
            error("encode: the pipeline has no loadable " .. k .. " (" .. what .. ")", 3)
        end
    end
end

-- write_cache(writer, fn): fn adds the samples, then the cache is finished; on an error the
-- writer's temporary folder is removed (nothing half-written) and the error raised again
local function write_cache(writer, fn)
    local ok, err = pcall(function()
        fn()
        writer:finish()
    end)
    if not ok then
        pcall(writer.abort, writer)
        error(err, 0)
    end
end

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
    need(pipe, {"vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"},
        "a FLUX pipeline folder with its VAE, text encoders and tokenizers is needed")
    local files, skipped = list_images(o.images)
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
    write_cache(writer, function()
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
    end)
    return {samples = #files, skipped = skipped, buckets = counts, out = o.out}
end

-- frame_indices(total, n) -> n 0-based indices evenly spaced over 0 .. total - 1 (rounded), as
-- np.linspace(0, total - 1, n) rounded half to even
function M.frame_indices(total, n)
    local out = {}
    if n == 1 then return {0} end
    for k = 0, n - 1 do out[k + 1] = round_half_even(k * (total - 1) / (n - 1)) end
    return out
end

-- wan_cache{videos = dir, out = cache dir, pipe = a Wan pipeline with vae (AutoencoderKLWan),
-- text_encoder and tokenizer, max_pixels = 262144 (512p), quantization = 16 (2 x the VAE's
-- spatial compression: 32 with Wan 2.2's VAE; must be a multiple of that), num_frames = nil,
-- captions = jsonl path, max_sequence_length = 226, shard_size = 256, force = false,
-- log = fn(msg)} -> {samples =, buckets = {"WxH" -> count}, out =}
-- Each video is a subfolder of `videos` holding its frames as PNG / JPEG files in name order
-- (ffmpeg -i clip.mp4 clip/%05d.png makes one). Per video, as Automodel's `--processor wan`:
-- num_frames frames evenly spaced (default: as many as there are, down to the largest 4k + 1;
-- a given num_frames must be 4k + 1), the bucket of the first frame's aspect ratio, each frame
-- resized to cover it (cv2's bilinear) and center-cropped, x / 255 * 2 - 1 -> the VAE's
-- posterior mean (Automodel's deterministic default) -> (z - latents_mean) / latents_std ->
-- float16 latents [z_dim, (F - 1) / 4 + 1, th / r, tw / r] (r: the VAE's spatial compression, 8;
-- 16 for Wan 2.2's VAE); the caption (<name>.txt beside the
-- folder, the JSONL line naming it or its video file, else the name) -> UMT5 with its mask,
-- padding zeroed (sampling.wan_encode_prompt), [max_sequence_length, D] bfloat16.
function M.wan_cache(o)
    local log = o.log or function() end
    if type(o.videos) ~= "string" or not fs.isdir(o.videos) then
        error("encode: videos must be a folder of frame folders (one per video), got '" .. tostring(o.videos) .. "'", 2)
    end
    local pipe = o.pipe
    need(pipe, {"vae", "text_encoder", "tokenizer"}, "a Wan pipeline folder with its VAE, text encoder and tokenizer is needed")
    local vae = pipe.components.vae
    if type(vae.config) ~= "table" or type(vae.config.latents_mean) ~= "table" then
        error("encode: the pipeline's vae is not an AutoencoderKLWan (no latents_mean in its config)", 2)
    end
    local nf = o.num_frames
    if nf ~= nil and (type(nf) ~= "number" or nf < 1 or nf % 1 ~= 0 or (nf - 1) % 4 ~= 0) then
        error("encode: num_frames must be 4k + 1 (1, 5, 9, ..., 81), got " .. tostring(nf), 2)
    end
    local videos = {}
    for _, n in ipairs(fs.list(o.videos)) do
        if fs.isdir(o.videos .. "/" .. n) then videos[#videos + 1] = n end
    end
    table.sort(videos)
    if #videos == 0 then
        error(string.format("encode: no video folders in '%s' (each video is a folder of its frames as PNG or JPEG " ..
            "files, e.g. ffmpeg -i clip.mp4 clip/%%05d.png)", o.videos), 2)
    end
    local plan = {}
    for _, v in ipairs(videos) do
        local frames = list_images(o.videos .. "/" .. v)
        local want = nf or (#frames >= 1 and (#frames - (#frames - 1) % 4) or 0)
        if #frames == 0 then error(string.format("encode: the video folder %s/%s has no PNG or JPEG frames", o.videos, v), 2) end
        if want > #frames then
            error(string.format("encode: %s/%s has %d frames, fewer than num_frames %d", o.videos, v, #frames, want), 2)
        end
        local pick = {}
        for k, i in ipairs(M.frame_indices(#frames, want)) do pick[k] = frames[i + 1] end
        plan[#plan + 1] = {name = v, frames = pick, total = #frames}
    end
    local caps, how = M.captions(o.videos, videos, {captions = o.captions})
    log(string.format("%d videos; captions: %d from .txt files, %d from %s, %d from folder names", #videos, how.txt,
        how.jsonl, o.captions or "a JSONL file", how.stem))
    -- frame sizes must divide into the VAE's latent pixels and the transformer's 2 x 2 patches
    local ratio = vae.spatial_compression_ratio or 8
    local q = o.quantization or 2 * ratio
    if q % (2 * ratio) ~= 0 then
        error(string.format("encode: quantization %d is not a multiple of %d (the VAE's spatial compression %d x the " ..
            "transformer's 2 x 2 patches)", q, 2 * ratio, ratio), 2)
    end
    local buckets = M.buckets(o.max_pixels or 262144, q)
    local c = pipe.components
    local vdt, vdev = vae:dtype(), "cpu"
    for _, p in vae:named_parameters() do vdev = p.device; break end
    local zc = vae.config.z_dim or #vae.config.latents_mean
    local msl = o.max_sequence_length or 226
    local writer = require("nemo.data").CacheWriter(o.out, {model_type = "wan", shard_size = o.shard_size, force = o.force})
    local counts = {}
    local sampling = require "nemo.sampling"
    write_cache(writer, function()
        for i, v in ipairs(plan) do
            local dir = o.videos .. "/" .. v.name
            local tw, th, W0, H0
            local per = {}
            for k, f in ipairs(v.frames) do
                local rgb, W, H = M.read_rgb(dir .. "/" .. f)
                if k == 1 then
                    W0, H0 = W, H
                    local b = M.bucket_for(buckets, W, H)
                    tw, th = b[1], b[2]
                elseif W ~= W0 or H ~= H0 then
                    error(string.format("encode: %s/%s is %d x %d, the video's first frame %d x %d", dir, f, W, H, W0, H0), 0)
                end
                per[k] = to_tensor((M.resize_crop(rgb, W, H, tw, th, M.resize_bilinear)), tw, th)   -- [1, 3, th, tw]
            end
            local x = nemo.stack(per, 2):to{dtype = vdt, device = vdev}   -- [1, 3, F, th, tw]
            local z = nemo.no_grad(function()
                local m = vae:encode(x).latent_dist:mode()
                local mean = nemo.tensor(vae.config.latents_mean, {dtype = m.dtype, device = m.device}):view(1, zc, 1, 1, 1)
                local std = nemo.tensor(vae.config.latents_std, {dtype = m.dtype, device = m.device}):view(1, zc, 1, 1, 1)
                return ((m - mean) / std):to{dtype = "float16", device = "cpu"}
            end)
            local pe = sampling.wan_encode_prompt{prompt = caps[i], tokenizer = c.tokenizer, text_encoder = c.text_encoder,
                max_sequence_length = msl}
            writer:add{id = string.format("%08d", i - 1), caption = caps[i], latents = z[0],
                text_embeddings = pe[0]:to{dtype = "bfloat16", device = "cpu"}}
            local key = tw .. "x" .. th
            counts[key] = (counts[key] or 0) + 1
            log(string.format("[%d/%d] %s (%d of %d frames, %d x %d) -> %s: %s", i, #plan, v.name, #v.frames, v.total,
                W0, H0, key, caps[i]))
        end
    end)
    return {samples = #plan, buckets = counts, out = o.out}
end

return M
