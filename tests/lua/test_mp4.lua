-- tests/lua/test_mp4.lua: nemo.mp4 (MP4 files of H.264).
-- - I_PCM ({pcm = true}) read back by an independent parser written here from the specifications
--   (ISO/IEC 14496-12 boxes, 14496-15 avcC, H.264 7.3 syntax): the box tree and its timing, the
--   SPS (size, cropping, BT.709 VUI) and every slice's macroblocks, whose samples must be the
--   BT.709 limited-range conversion of the frames (within one level: the encoder rounds
--   fixed-point weights), the padding the last column and row repeated.
-- - Intra_16x16 + CAVLC IDR pictures and P pictures (P_Skip, P_L0_16x16, Intra_16x16 in P
--   slices; the default, nemo.h264_intra) against tests/golden/h264: the encoder writes the
--   golden files' bytes, and its reconstruction of every frame equals FFmpeg's decoding of them
--   sample for sample (so a decoder sees what the encoder predicted from); the sync sample table
--   lists the IDR pictures; a still clip costs a fraction of its intra coding; on a smooth clip
--   the default qp keeps a luma PSNR above 40 dB in under a quarter of I_PCM's size.
-- - Emulation prevention, the errors, and image.save_video's .mp4.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local mp4 = require "nemo.mp4"
local bit = require "bit"

-- ==== a reader ====

local function be(s, pos, n)
    local v = 0
    for i = 0, n - 1 do v = v * 256 + s:byte(pos + i) end
    return v
end

-- boxes of s[from, to): {kind = {start=, body=, stop=}} (the first of each kind), and their order
local function boxes(s, from, to)
    local out, order = {}, {}
    local pos = from
    while pos < to do
        local size, kind = be(s, pos, 4), s:sub(pos + 4, pos + 7)
        local body = pos + 8
        if size == 1 then size = be(s, pos + 8, 8); body = pos + 16 end
        out[kind] = out[kind] or {start = pos, body = body, stop = pos + size}
        order[#order + 1] = kind
        pos = pos + size
    end
    return out, order
end
local function child(s, b, path)
    for kind in path:gmatch("[^/]+") do
        local skip = ({stsd = 8, dref = 8, avc1 = 78})[kind] or 0
        local kids = boxes(s, b.body + (b.skip or 0), b.stop)
        b = kids[kind]
        if not b then return nil end
        b.skip = skip
    end
    return b
end

local function bitreader(s)
    local r = {pos = 0}
    function r.u(n)
        local v = 0
        for _ = 1, n do
            local byte = s:byte(math.floor(r.pos / 8) + 1)
            v = v * 2 + bit.band(bit.rshift(byte, 7 - r.pos % 8), 1)
            r.pos = r.pos + 1
        end
        return v
    end
    function r.ue()
        local z = 0
        while r.u(1) == 0 do z = z + 1 end
        return 2 ^ z - 1 + r.u(z)
    end
    function r.se() local k = r.ue(); return k % 2 == 1 and (k + 1) / 2 or -k / 2 end
    function r.aligned() return r.pos % 8 == 0 end
    return r
end

local function unescape(nal) return (nal:gsub("%z%z\3", "\0\0")) end   -- (a Lua 5.1 pattern: %z is a zero byte)

-- ==== the file ====

local W, H, N, FPS = 40, 24, 3, 8
local frames = {}
local function px(f, x, y) return (x * 6 + f * 40) % 256, (y * 10) % 256, ((x + y) * 3 + f * 20) % 256 end
for f = 1, N do
    local t = {}
    for y = 0, H - 1 do for x = 0, W - 1 do t[#t + 1] = string.char(px(f, x, y)) end end
    frames[f] = table.concat(t)
end
local data = mp4.encode(frames, W, H, 3, {fps = FPS, pcm = true})

local top, order = boxes(data, 1, #data + 1)
T.is(table.concat(order, ","), "ftyp,moov,mdat", "the boxes: ftyp, moov (first, for progressive playback), mdat")
T.is(data:sub(top.ftyp.body, top.ftyp.body + 3), "isom", "ftyp's major brand is isom")
local mvhd = child(data, top.moov, "mvhd")
T.ok(be(data, mvhd.body + 12, 4) == 1000 and be(data, mvhd.body + 16, 4) == 375,
    "mvhd: timescale 1000, duration 375 ms for 3 frames at 8 fps")
local stbl = child(data, top.moov, "trak/mdia/minf/stbl")
local mdhd = child(data, top.moov, "trak/mdia/mdhd")
T.ok(be(data, mdhd.body + 12, 4) == 8000 and be(data, mdhd.body + 16, 4) == 3000, "mdhd: 8000 units a second, 3000 long")
T.is(data:sub(child(data, top.moov, "trak/mdia/hdlr").body + 8, child(data, top.moov, "trak/mdia/hdlr").body + 11),
    "vide", "the track is video")
local stts = child(data, stbl, "stts")
T.ok(be(data, stts.body + 4, 4) == 1 and be(data, stts.body + 8, 4) == N and be(data, stts.body + 12, 4) == 1000,
    "stts: 3 samples of 1000 units each")
local stsz, stco = child(data, stbl, "stsz"), child(data, stbl, "stco")
local sizes, total = {}, 0
for i = 1, be(data, stsz.body + 8, 4) do
    sizes[i] = be(data, stsz.body + 12 + 4 * (i - 1), 4)
    total = total + sizes[i]
end
local off = be(data, stco.body + 8, 4) + 1
T.ok(#sizes == N and off == top.mdat.body and total == top.mdat.stop - top.mdat.body,
    "stsz / stco: the 3 samples fill mdat exactly, from the offset stco gives")
local avc1 = child(data, stbl, "stsd/avc1")
T.ok(avc1 and be(data, avc1.body + 24, 2) == W and be(data, avc1.body + 26, 2) == H, "stsd: an avc1 entry of 40 x 24")
local avcc = child(data, stbl, "stsd/avc1/avcC")
local a = avcc.body
T.ok(data:byte(a) == 1 and data:byte(a + 4) == 0xFF and data:byte(a + 5) == 0xE1,
    "avcC: version 1, 4-byte NAL lengths, one SPS")
local sps_len = be(data, a + 6, 2)
local sps = data:sub(a + 8, a + 8 + sps_len - 1)
local pps_len = be(data, a + 8 + sps_len + 1, 2)
local pps = data:sub(a + 8 + sps_len + 3, a + 8 + sps_len + 3 + pps_len - 1)
T.ok(sps:byte(1) == 0x67 and pps:byte(1) == 0x68 and data:byte(a + 1) == sps:byte(2) and data:byte(a + 3) == sps:byte(4),
    "avcC holds the SPS and PPS NAL units; its profile and level bytes are the SPS's")

-- the SPS
do
    local r = bitreader(unescape(sps:sub(2)))
    local prof, cons, level = r.u(8), r.u(8), r.u(8)
    local id, lmf, poc, refs, gaps = r.ue(), r.ue(), r.ue(), r.ue(), r.u(1)
    local mbw, mbh, fmo, d8 = r.ue() + 1, r.ue() + 1, r.u(1), r.u(1)
    local crop, cl, cr, ct, cb = r.u(1), r.ue(), r.ue(), r.ue(), r.ue()
    local vui, ar, ov, vst = r.u(1), r.u(1), r.u(1), r.u(1)
    local vf, full, cd, prim, trc, mat = r.u(3), r.u(1), r.u(1), r.u(8), r.u(8), r.u(8)
    T.ok(prof == 66 and cons == 0xC0 and id == 0 and poc == 2 and refs == 1 and gaps == 0 and lmf == 0,
        "SPS: Constrained Baseline, picture order = decoding order")
    T.ok(mbw == 3 and mbh == 2 and fmo == 1 and d8 == 1 and crop == 1 and cl == 0 and ct == 0 and
        48 - 2 * cr == W and 32 - 2 * cb == H, string.format("SPS: 3 x 2 macroblocks cropped to 40 x 24 (right %d, " ..
        "bottom %d)", cr, cb))
    T.ok(vui == 1 and ar == 0 and ov == 0 and vst == 1 and full == 0 and cd == 1 and prim == 1 and trc == 1 and mat == 1,
        "SPS VUI: limited range, BT.709 primaries, transfer and matrix")
    T.ok(level >= 10 and level <= 62, "SPS: a level (" .. level .. ")")
    local _ = vf
end

-- every slice: the header, then I_PCM macroblocks whose samples are the frame's BT.709 planes
local function round(v) return math.floor(v + 0.5) end
local KR, KB = 0.2126, 0.0722
local KG = 1 - KR - KB
local function want_y(r, g, b) return 16 + 219 * (KR * r + KG * g + KB * b) / 255 end
local function want_c(r, g, b)
    local y = KR * r + KG * g + KB * b
    return 128 + 224 * (b - y) / (255 * 2 * (1 - KB)), 128 + 224 * (r - y) / (255 * 2 * (1 - KR))
end
local worst, headers_ok, layout_ok = 0, true, true
local pos = top.mdat.body
for f = 1, N do
    local len = be(data, pos, 4)
    local nal = data:sub(pos + 4, pos + 4 + len - 1)
    if len + 4 ~= sizes[f] or nal:byte(1) ~= 0x65 then layout_ok = false end
    pos = pos + 4 + len
    local rb = unescape(nal:sub(2))
    local r = bitreader(rb)
    local first, stype, ppsid, fnum, idr = r.ue(), r.ue(), r.ue(), r.u(4), r.ue()
    local noout, lt, qpd, dbf = r.u(1), r.u(1), r.se(), r.ue()
    if not (first == 0 and stype == 7 and ppsid == 0 and fnum == 0 and idr == (f - 1) % 2 and noout == 0 and lt == 0 and
            qpd == 0 and dbf == 1) then headers_ok = false end
    local Y, Cb, Cr = {}, {}, {}
    for my = 0, 1 do
        for mx = 0, 2 do
            if r.ue() ~= 25 then layout_ok = false end
            while not r.aligned() do if r.u(1) ~= 0 then layout_ok = false end end
            local k = r.pos / 8 + 1
            for i = 0, 255 do Y[(my * 16 + math.floor(i / 16)) * 48 + mx * 16 + i % 16] = rb:byte(k + i) end
            for i = 0, 63 do
                Cb[(my * 8 + math.floor(i / 8)) * 24 + mx * 8 + i % 8] = rb:byte(k + 256 + i)
                Cr[(my * 8 + math.floor(i / 8)) * 24 + mx * 8 + i % 8] = rb:byte(k + 320 + i)
            end
            r.pos = r.pos + 384 * 8
        end
    end
    if rb:byte(r.pos / 8 + 1) ~= 0x80 or r.pos / 8 + 1 ~= #rb then layout_ok = false end
    for y = 0, 31 do
        for x = 0, 47 do
            local e = math.abs(Y[y * 48 + x] - round(want_y(px(f, math.min(x, W - 1), math.min(y, H - 1)))))
            if e > worst then worst = e end
        end
    end
    for y = 0, 15 do
        for x = 0, 23 do
            local sr, sg, sb = 0, 0, 0
            for dy = 0, 1 do for dx = 0, 1 do
                local r0, g0, b0 = px(f, math.min(2 * x + dx, W - 1), math.min(2 * y + dy, H - 1))
                sr, sg, sb = sr + r0 / 4, sg + g0 / 4, sb + b0 / 4
            end end
            local wcb, wcr = want_c(sr, sg, sb)
            worst = math.max(worst, math.abs(Cb[y * 24 + x] - round(wcb)), math.abs(Cr[y * 24 + x] - round(wcr)))
        end
    end
end
T.ok(layout_ok, "each sample is one IDR NAL unit (length-prefixed) of 6 I_PCM macroblocks, byte-aligned, then the " ..
    "trailing bits")
T.ok(headers_ok, "slice headers: an I slice, frame_num 0, idr_pic_id alternating 0 / 1, deblocking off")
T.ok(worst <= 1, string.format("the macroblocks' samples are the frames in BT.709 limited range (chroma: each 2 x 2 " ..
    "block's mean; padding: the last column and row repeated) within one level (largest difference %d)", worst))

-- ==== Intra_16x16 + CAVLC (the default): decoded by FFmpeg exactly as the encoder reconstructs ====

local golden = require "golden"
local gdir = golden.case("h264", "mix.yuv")
if not gdir then
    T.ok(false, "the golden case tests/golden/h264 is present")
else
    package.path = gdir .. "/?.lua;" .. package.path
    for _, c in ipairs(require("inputs").clips()) do
        local recon = {}
        local bytes = mp4.encode(c.frames, c.width, c.height, 3, {fps = 8, qp = c.qp, keyint = c.keyint,
            deblock = c.deblock, _recon = recon})
        T.ok(bytes == T.read_bytes(gdir .. "/" .. c.name .. ".mp4"), string.format("%s (%d x %d, %d frames, qp %d%s%s): " ..
            "the encoder writes the golden file's bytes", c.name, c.width, c.height, #c.frames, c.qp,
            c.keyint and ", keyint " .. c.keyint or "", c.deblock == false and ", no deblocking filter" or ""))
        T.ok(table.concat(recon) == T.read_bytes(gdir .. "/" .. c.name .. ".yuv"), string.format("%s: the encoder's " ..
            "reconstruction of every frame (I and P, after the deblocking filter) equals FFmpeg's decoding of " ..
            "that file, every sample (tests/golden/h264/make_golden.sh)", c.name))
    end
end

do   -- P pictures: the sync samples are the IDR pictures; a still clip is mostly skipped
    local t = {}
    for y = 0, 47 do for x = 0, 63 do t[#t + 1] = string.char((x * 7 + y * 3) % 256, (x * y) % 256, (y * 5) % 256) end end
    local fr = table.concat(t)
    local frames = {}
    for i = 1, 10 do frames[i] = fr end
    local s = mp4.encode(frames, 64, 48, 3, {keyint = 4})
    local b = boxes(s, 1, #s + 1)
    local ss = child(s, b.moov, "trak/mdia/minf/stbl/stss")
    local ids = {}
    if ss then for k = 1, be(s, ss.body + 4, 4) do ids[k] = be(s, ss.body + 4 + 4 * k, 4) end end
    T.is(table.concat(ids, ","), "1,5,9", "keyint 4: the sync sample table (stss) lists the IDR pictures 1, 5 and 9")
    local intra_only = mp4.encode(frames, 64, 48, 3, {keyint = 1})
    local bi = boxes(intra_only, 1, #intra_only + 1)
    T.ok(child(intra_only, bi.moov, "trak/mdia/minf/stbl/stss") == nil, "keyint 1 (every picture IDR): no stss, every " ..
        "sample is a sync sample")
    local p = mp4.encode(frames, 64, 48, 3)
    T.ok(#p * 5 < #intra_only, string.format("10 still frames: %d bytes with P pictures, under a fifth of the %d of " ..
        "intra pictures", #p, #intra_only))
end

do   -- a smooth clip: the quality and the size at the default qp
    local SW, SH = 64, 48
    local t = {}
    for y = 0, SH - 1 do
        for x = 0, SW - 1 do t[#t + 1] = string.char((x * 3 + y) % 256, (128 + y * 2) % 256, (200 - x) % 256) end
    end
    local fr = table.concat(t)
    local Y, Cb, Cr = mp4._planes(fr, SW, SH, 3, SW, SH)
    local _, RY = require("nemo.h264_intra").slice_rbsp(Y, Cb, Cr, 4, 3, mp4.DEFAULT_QP, function() end)
    local se = 0
    for i = 0, SW * SH - 1 do se = se + (Y[i] - RY[i]) ^ 2 end
    local psnr = 10 * math.log10(255 ^ 2 / math.max(se / (SW * SH), 1e-9))
    local n = #mp4.encode({fr, fr, fr}, SW, SH, 3)
    local pcm = #mp4.encode({fr, fr, fr}, SW, SH, 3, {pcm = true})
    T.ok(psnr > 40 and n * 4 < pcm, string.format("qp %d on a smooth clip: luma PSNR %.1f dB (> 40) in %d bytes, " ..
        "under a quarter of I_PCM's %d", mp4.DEFAULT_QP, psnr, n, pcm))
end

-- ==== the rest ====

T.is(mp4._escape("\0\0\1\0\0\0\0\0\3\7"), "\0\0\3\1\0\0\3\0\0\3\0\3\7",
    "emulation prevention: 0x03 after two zero bytes before a byte <= 3")
do
    local white = mp4.encode({string.rep("\255", 16 * 16)}, 16, 16, 1, {fps = 16, pcm = true})
    local b = boxes(white, 1, #white + 1)
    local ok = true
    local rb = unescape(white:sub(b.mdat.body + 5, b.mdat.stop - 1):sub(2))
    -- the first macroblock's luma starts at the first byte boundary after the header and mb_type
    ok = rb:find(string.rep("\235", 256), 1, true) ~= nil and rb:find(string.rep("\128", 128), 1, true) ~= nil
    T.ok(ok, "a white gray frame: luma 235 and chroma 128 (the top of the limited range, no colour)")
end
local function raises(fn, pat, name)
    local ok, e = pcall(fn)
    T.ok(not ok and tostring(e):find(pat, 1, true) ~= nil, name, tostring(e))
end
raises(function() mp4.encode({string.rep("\0", 15 * 8 * 3)}, 15, 8, 3) end, "width and height must be even",
    "an odd width is an error saying why (4:2:0)")
raises(function() mp4.encode({"abc"}, 16, 16, 3) end, "frame 1 must be 16 x 16 x 3 bytes", "a frame of the wrong size")
raises(function() mp4.encode({string.rep("\0", 768)}, 16, 16, 3, {fps = 0}) end, "fps must be in (0, 1000]",
    "fps 0 is an error")
raises(function() mp4.encode({string.rep("\0", 768)}, 16, 16, 3, {qp = 52}) end, "qp must be an integer in 0..51",
    "qp above 51 is an error (H.264's range)")
raises(function() mp4.encode({string.rep("\0", 768)}, 16, 16, 3, {keyint = 0}) end, "keyint must be an integer >= 1",
    "keyint 0 is an error")
raises(function() mp4.encode({string.rep("\0", 768)}, 16, 16, 3, {deblock = "yes"}) end,
    "deblock must be true or false", "deblock that is not a boolean is an error")

do   -- image.save_video: .mp4 by the path, tensors in
    local tmp = os.tmpname()
    local path = tmp .. ".mp4"
    local t = nemo.zeros({3, 16, 32})
    nemo.image.save_video(path, {t, t + 0.5}, {fps = 4})
    local s = T.read_bytes(path)
    local b = boxes(s, 1, #s + 1)
    local sz = child(s, b.moov, "trak/mdia/minf/stbl/stsz")
    T.ok(s:sub(5, 8) == "ftyp" and be(s, sz.body + 8, 4) == 2 and child(s, b.moov, "trak/mdia/minf/stbl/stsd/avc1"),
        "image.save_video to a .mp4 path writes an MP4 of the 2 frames")
    os.remove(path); os.remove(tmp)
end

T.done()
