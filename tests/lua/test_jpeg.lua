-- tests/lua/test_jpeg.lua: nemo.jpeg, the JPEG decoder, against PIL (libjpeg-turbo) on the files of
-- tests/golden/jpeg (see its make_golden.py): baseline 4:4:4 / 4:2:2 / 4:2:0 at several qualities,
-- 4:4:0, 4:1:1 and mixed sampling, sizes that are not multiples of the MCU (down to 1x1), gray,
-- progressive, optimized Huffman tables, restart intervals (also progressive), Adobe RGB, RGB told
-- by the component ids, SOF1 with 16-bit quantization tables, one scan per component, no DHT
-- (the standard tables), EXIF/ICC/COM segments. Every case must equal PIL's pixels byte for
-- byte (the decoder implements libjpeg's islow IDCT, fancy upsampling and color tables exactly;
-- the tolerance is 0 for gray, 4:4:4 and subsampled files alike). A 1024x768 4:2:0 file is timed
-- (reported, not asserted) and checked by the CRC-32 of PIL's pixels. Then the errors: not a
-- JPEG, truncated data, arithmetic coding, 12-bit, lossless, 4 components, a DNL height, each
-- naming the file. A missing golden folder or case FAILS.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local ffi = require "ffi"
local bit = require "bit"
local golden = require "golden"
local jpeg = require "nemo.jpeg"

-- name, width, height, channels: every case make_golden.py writes (.jpg and PIL's .raw)
local CASES = {
    {"b444_q75_37x23", 37, 23, 3}, {"b444_q100_16x16", 16, 16, 3}, {"b444_q30_64x48", 64, 48, 3},
    {"b422_q90_50x40", 50, 40, 3}, {"b422_q80_5x3", 5, 3, 3}, {"b422_q80_4x9", 4, 9, 3},
    {"b422_q60_127x31", 127, 31, 3}, {"b420_q75_37x23", 37, 23, 3}, {"b420_q50_127x31", 127, 31, 3},
    {"b420_q95_64x48", 64, 48, 3}, {"b420_q75_16x16", 16, 16, 3}, {"b420_q75_1x1", 1, 1, 3},
    {"b420_q80_3x5", 3, 5, 3}, {"b420_q85_50x40", 50, 40, 3},
    {"gray_q85_37x23", 37, 23, 1}, {"gray_q60_1x1", 1, 1, 1}, {"gray_q95_127x31", 127, 31, 1},
    {"prog420_q75_64x48", 64, 48, 3}, {"prog444_q90_37x23", 37, 23, 3}, {"prog422_q70_127x31", 127, 31, 3},
    {"prog_gray_q80_50x40", 50, 40, 1}, {"prog420_q50_1x1", 1, 1, 3},
    {"opt420_q75_50x40", 50, 40, 3},
    {"rst420_q75_37x23", 37, 23, 3}, {"rst444_rows_q80_50x40", 50, 40, 3}, {"rst_gray_q80_37x23", 37, 23, 1},
    {"prog_rst420_q75_64x48", 64, 48, 3},
    {"adobe_rgb_q90_37x23", 37, 23, 3}, {"sof1_q16bit_50x40", 50, 40, 3}, {"exif_icc_q80_37x23", 37, 23, 3},
    {"c440_q80_37x23", 37, 23, 3}, {"c440_rst_q85_50x40", 50, 40, 3}, {"c411_q80_50x40", 50, 40, 3},
    {"c411_q90_37x23", 37, 23, 3}, {"c420_sep_scans_q80_37x23", 37, 23, 3}, {"c_y22_c12_q80_37x23", 37, 23, 3},
    {"c_rgb_ids_q90_37x23", 37, 23, 3}, {"c_no_dht_q75_37x23", 37, 23, 3},
}
local BIG = "big420_q80_1024x768"

-- how many bytes differ, and the largest difference
local function compare(a, b)
    if #a ~= #b then return math.huge, math.huge end
    local pa, pb = ffi.cast("const uint8_t *", a), ffi.cast("const uint8_t *", b)
    local n, maxd = 0, 0
    for i = 0, #a - 1 do
        local d = math.abs(pa[i] - pb[i])
        if d > 0 then n = n + 1; if d > maxd then maxd = d end end
    end
    return n, maxd
end

local crc_table = ffi.new("uint32_t[256]")
for i = 0, 255 do
    local c = i
    for _ = 1, 8 do c = bit.band(c, 1) == 1 and bit.bxor(0xEDB88320, bit.rshift(c, 1)) or bit.rshift(c, 1) end
    crc_table[i] = bit.tobit(c) % 4294967296
end
local function crc32(s)
    local p, c = ffi.cast("const uint8_t *", s), bit.bnot(0)
    for i = 0, #s - 1 do c = bit.bxor(crc_table[bit.band(bit.bxor(c, p[i]), 0xFF)], bit.rshift(c, 8)) end
    return bit.bnot(c) % 4294967296
end

-- the offset (1-based) of the first segment with this marker byte, walking the segments
local function find_segment(s, marker)
    local pos = 3
    while pos + 3 <= #s do
        local m, len = s:byte(pos + 1), s:byte(pos + 2) * 256 + s:byte(pos + 3)
        if m == marker then return pos end
        if m == 0xDA then return nil end
        pos = pos + 2 + len
    end
end
local function patch(s, at, byte) return s:sub(1, at - 1) .. string.char(byte) .. s:sub(at + 1) end

local root, why = golden.case("jpeg", "cases.txt")
if not root then
    T.ok(false, "JPEG golden cases: " .. tostring(why))
    T.done()
end

-- ==== every golden case equals PIL's decoding ====
local exact = 0
for _, case in ipairs(CASES) do
    local name, W, H, C = case[1], case[2], case[3], case[4]
    local path = root .. "/" .. name .. ".jpg"
    local ok, im = pcall(jpeg.read, path)
    local rok, raw = pcall(T.read_bytes, root .. "/" .. name .. ".raw")
    if not ok or not rok then
        T.ok(false, name .. ": decoded and compared with PIL", not ok and tostring(im) or ("no PIL pixels: " .. tostring(raw)))
    else
        local n, maxd = compare(im.pixels, raw)
        if n == 0 then exact = exact + 1 end
        T.ok(im.width == W and im.height == H and im.channels == C and n == 0,
            string.format("%s: %dx%d, %d channel%s, every byte equals PIL's decoding", name, W, H, C, C == 1 and "" or "s"),
            string.format("got %sx%s x %s; %s of %d bytes differ, by at most %s", tostring(im.width), tostring(im.height),
                tostring(im.channels), tostring(n), #raw, tostring(maxd)))
    end
end
T.diag(string.format("%d of %d golden files decode exactly as PIL", exact, #CASES))

-- decode() from memory is read()
do
    local s = T.read_bytes(root .. "/prog420_q75_64x48.jpg")
    local a, b = jpeg.decode(s), jpeg.read(root .. "/prog420_q75_64x48.jpg")
    T.ok(a.width == b.width and a.height == b.height and a.channels == b.channels and a.pixels == b.pixels,
        "decode(bytes) gives what read(path) gives")
end

-- the large file: timed (not asserted), its pixels checked by the CRC-32 of PIL's
do
    local want
    for line in io.lines(root .. "/cases.txt") do
        local name, crc = line:match("^(%S+) .* crc32=(%d+)")
        if name == BIG then want = tonumber(crc) end
    end
    local ok, s = pcall(T.read_bytes, root .. "/" .. BIG .. ".jpg")
    if not ok or not want then
        T.ok(false, BIG .. ": the file and its CRC in cases.txt", tostring(s))
    else
        local best, im = math.huge, nil
        for _ = 1, 3 do
            local t0 = os.clock()
            im = jpeg.decode(s)
            best = math.min(best, os.clock() - t0)
        end
        T.diag(string.format("%s (%d bytes): decoded in %.3f s (best of 3, CPU time)", BIG, #s, best))
        T.ok(im.width == 1024 and im.height == 768 and im.channels == 3 and crc32(im.pixels) == want,
            BIG .. ": 1024x768 RGB, the CRC-32 of the pixels equals that of PIL's decoding",
            string.format("got %dx%d x %d, crc %d, want %d", im.width, im.height, im.channels, crc32(im.pixels), want))
    end
end

-- ==== markers and structure ====
do
    local s = T.read_bytes(root .. "/b420_q75_37x23.jpg")
    local ref = jpeg.decode(s).pixels
    -- FF fill bytes before a marker are allowed (B.1.1.2)
    local sos = find_segment(s, 0xDA)
    local filled = s:sub(1, sos - 1) .. "\255\255\255" .. s:sub(sos)
    T.ok(jpeg.decode(filled).pixels == ref, "fill bytes (FF FF FF) before a marker are skipped")
    -- a sequential file that lacks only its EOI marker decodes; a progressive one is truncated
    T.ok(s:sub(-2) == "\255\217" and jpeg.decode(s:sub(1, -3)).pixels == ref,
        "a baseline file without its EOI marker still decodes (every component was in a scan)")
    local p = T.read_bytes(root .. "/prog420_q75_64x48.jpg")
    T.raises(function() jpeg.decode(p:sub(1, -3), "p.jpg") end, "truncated", "a progressive file without EOI is truncated")
    -- restart markers: the golden rst* files have one every MCU / row
    local r = T.read_bytes(root .. "/rst420_q75_37x23.jpg")
    local nrst = 0
    for m in r:gmatch("\255([\208-\215])") do nrst = nrst + 1 end
    T.ok(find_segment(r, 0xDD) and nrst == 3 * 2 - 1, "rst420_q75_37x23 has a DRI segment and an RST marker between each two of its 3x2 MCUs",
        "RST markers: " .. nrst)
    -- a restart interval whose RST marker is replaced by garbage + the right marker decodes the same
    -- (libjpeg skips bytes before a marker); a missing RST gives zeros, not a crash
    local first = r:find("\255[\208-\215]")
    local garbage = r:sub(1, first - 1) .. "\1\2\3" .. r:sub(first)
    T.ok(jpeg.decode(garbage).pixels == jpeg.decode(r).pixels, "garbage bytes before an RST marker are skipped")
    local no_rst = r:sub(1, first - 1) .. r:sub(first + 2)
    T.ok(pcall(jpeg.decode, no_rst), "a missing RST marker: decoded (with damage) as libjpeg does, no error")
    -- EXIF orientation is ignored: the pixels are as stored (PIL's Image.open does the same)
    local e = T.read_bytes(root .. "/exif_icc_q80_37x23.jpg")
    T.ok(find_segment(e, 0xE1) and find_segment(e, 0xE2) and find_segment(e, 0xFE) and jpeg.decode(e).width == 37,
        "APP1 (EXIF, orientation 6), APP2 (ICC) and COM segments are skipped; the orientation is not applied")
end

-- ==== errors ====
do
    local tmp, cleanup = T.scratch()
    local s = T.read_bytes(root .. "/b420_q75_37x23.jpg")
    local sof = find_segment(s, 0xC0)
    T.ok(sof ~= nil, "the SOF0 segment of b420_q75_37x23 is found (for the patched files below)")
    sof = sof or 3
    local function file_with(name, bytes) return T.write_bytes(tmp(name), bytes) end

    local png = file_with("x.png", "\137PNG\r\n\26\n\0\0\0\13IHDR")
    T.raises(function() jpeg.read(png) end, "x.png': not a JPEG file", "a PNG is 'not a JPEG file', the message names it")
    T.raises(function() jpeg.decode("") end, "not a JPEG file", "empty data is not a JPEG")
    T.raises(function() jpeg.decode({}) end, "expected a string", "decode() of a table")
    T.raises(function() jpeg.read(tmp("missing.jpg")) end, "cannot read", "a missing file")

    local half = file_with("half.jpg", s:sub(1, find_segment(s, 0xDA) + 150))
    T.raises(function() jpeg.read(half) end, "half.jpg': truncated: the data ends inside scan 1",
        "a file cut in its entropy-coded data: truncated, naming the file")
    local head = file_with("head.jpg", s:sub(1, sof + 5))
    T.raises(function() jpeg.read(head) end, "head.jpg': truncated: the segment FF C0",
        "a file cut inside its frame header: truncated")
    local p = T.read_bytes(root .. "/prog420_q75_64x48.jpg")
    local cut = file_with("cut_prog.jpg", p:sub(1, #p - 300))
    T.raises(function() jpeg.read(cut) end, "cut_prog.jpg': truncated", "a progressive file cut in a later scan: truncated")

    local arith = file_with("arith.jpg", patch(s, sof + 1, 0xC9))
    T.raises(function() jpeg.read(arith) end, "arith.jpg': arithmetic-coded sequential (SOF9) JPEG files are not supported",
        "SOF9 (arithmetic coding): not supported, naming the file")
    T.raises(function() jpeg.decode(patch(s, sof + 1, 0xCA), "a.jpg") end, "arithmetic-coded progressive (SOF10)",
        "SOF10 (arithmetic progressive): not supported")
    local dac = s:sub(1, sof - 1) .. "\255\204\0\6\0\16\1\5" .. s:sub(sof)
    T.raises(function() jpeg.decode(dac) end, "arithmetic-coded (it has a DAC segment) JPEG files are not supported",
        "a DAC segment (arithmetic conditioning): not supported")
    local b12 = patch(patch(s, sof + 1, 0xC1), sof + 4, 12)
    T.raises(function() jpeg.decode(b12, "deep.jpg") end, "deep.jpg': 12-bit samples are not supported",
        "12-bit samples (SOF1, precision 12): not supported, naming the data")
    T.raises(function() jpeg.decode(patch(s, sof + 1, 0xC3)) end, "lossless (SOF3) JPEG files are not supported",
        "lossless (SOF3): not supported")
    T.raises(function() jpeg.decode(patch(s, sof + 1, 0xC5)) end, "hierarchical", "hierarchical (SOF5): not supported")
    -- a CMYK frame header: 4 components
    local cmyk = "\255\216" .. "\255\192\0\20\8\0\4\0\4\4\1\17\0\2\17\0\3\17\0\4\17\0" .. "\255\217"
    T.raises(function() jpeg.decode(cmyk, "cmyk.jpg") end, "cmyk.jpg': 4-component (CMYK or YCCK) JPEG files are not supported",
        "4 components (CMYK/YCCK): not supported")
    T.raises(function() jpeg.decode(patch(patch(s, sof + 5, 0), sof + 6, 0)) end, "DNL marker",
        "height 0 (DNL): not supported")
    T.raises(function() jpeg.decode(s:sub(1, sof - 1) .. "\255\217") end, "no frame header", "EOI before any frame")
    cleanup()
end

T.done()
