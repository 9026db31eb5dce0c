-- bench/mp4.lua: writing a generated video as MP4 (nemo.mp4): seconds and bytes per clip for the
-- default coding (IDR then P pictures, deblocking filter on) at a few QPs, without the deblocking
-- filter, for intra pictures only (keyint 1) and for I_PCM, with the luma PSNR over every decoded
-- picture (the encoder's reconstructions, which are what FFmpeg decodes; the time includes
-- keeping them). Prints a table; asserts nothing.
--   nemo-lua bench/mp4.lua [--quick] [--frames N] [--size WxH]
-- The clip: smooth moving colour fields with a little texture, integer arithmetic only (so the
-- same on every machine); default 81 frames of 832 x 480 (Wan 2.1's 480p), --quick 9 frames of
-- 208 x 120.
local ffi = require "ffi"
local mp4 = require "nemo.mp4"
local clock = os.clock

local o = {frames = 81, w = 832, h = 480}
local argv = arg or {}
local i = 1
while i <= #argv do
    local a = argv[i]
    if a == "--quick" then o.frames, o.w, o.h = 9, 208, 120
    elseif a == "--frames" then o.frames = tonumber(argv[i + 1]); i = i + 1
    elseif a == "--size" then
        local w, h = tostring(argv[i + 1]):match("^(%d+)x(%d+)$")
        o.w, o.h = tonumber(w), tonumber(h)
        i = i + 1
    else error("mp4 bench: unknown argument '" .. tostring(a) .. "' (--quick, --frames N, --size WxH)", 0) end
    i = i + 1
end
if not (o.frames and o.w and o.h) or o.w % 2 ~= 0 or o.h % 2 ~= 0 then
    error("mp4 bench: --frames N and an even --size WxH", 0)
end

-- a smooth field: a triangle wave in x and y that moves with the frame, plus a 0..7 hash texture
local function tri(v, p) v = v % (2 * p); return v < p and v or 2 * p - v end
local frames = {}
for f = 1, o.frames do
    local buf = ffi.new("uint8_t[?]", o.w * o.h * 3)
    for y = 0, o.h - 1 do
        for x = 0, o.w - 1 do
            local k = (y * o.w + x) * 3
            local tex = (x * 7 + y * 13 + f * 5) % 8
            buf[k] = 30 + tri(x + 3 * f, 180) + tex
            buf[k + 1] = 40 + tri(y * 2 + x + f, 170) + tex
            buf[k + 2] = 60 + tri(x + y + 5 * f, 150)
        end
    end
    frames[f] = ffi.string(buf, o.w * o.h * 3)
end

-- luma PSNR of every decoded frame against its source (recon: the encoder's reconstructions,
-- yuv420p bytes per frame, what FFmpeg decodes)
local function psnr(recon)
    local se, n = 0, 0
    local mbw, mbh = math.ceil(o.w / 16), math.ceil(o.h / 16)
    for f, r in ipairs(recon) do
        local Y = mp4._planes(frames[f], o.w, o.h, 3, mbw * 16, mbh * 16)
        local R = ffi.cast("const uint8_t *", r)
        for y = 0, o.h - 1 do
            for x = 0, o.w - 1 do local d = Y[y * mbw * 16 + x] - R[y * o.w + x]; se = se + d * d end
        end
        n = n + o.w * o.h
    end
    return 10 * math.log10(255 * 255 / math.max(se / n, 1e-9))
end

print(string.format("MP4 of %d frames of %d x %d (nemo.mp4, H.264, CPU)", o.frames, o.w, o.h))
print(string.format("%-16s %10s %10s %12s %12s", "coding", "MB", "s", "ms/frame", "PSNR-Y dB"))
for _, c in ipairs { {"qp 16", {qp = 16}}, {"qp 20", {qp = 20}}, {"qp 26", {qp = 26}}, {"qp 32", {qp = 32}},
                     {"qp 26 no deblock", {qp = 26, deblock = false}}, {"qp 32 no deblock", {qp = 32, deblock = false}},
                     {"qp 20 intra", {qp = 20, keyint = 1}}, {"I_PCM", {pcm = true}} } do
    local recon = {}
    c[2]._recon = not c[2].pcm and recon or nil
    local t0 = clock()
    local bytes = mp4.encode(frames, o.w, o.h, 3, c[2])
    local s = clock() - t0
    print(string.format("%-16s %10.2f %10.2f %12.1f %12s", c[1], #bytes / 2 ^ 20, s, 1000 * s / o.frames,
        c[2].pcm and "lossless" or string.format("%.2f", psnr(recon))))
end
