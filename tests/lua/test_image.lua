-- tests/lua/test_image.lua: nemo.image's PNG reader and writer. The reader against PIL's files
-- (tests/golden/png: every 8-bit color type, adaptive filters, dynamic and fixed Huffman blocks,
-- palettes with and without transparency): the pixels equal PIL's decoding byte for byte. The
-- writer: what it writes reads back identical (also through PIL's files' sizes), save() of the
-- sampling's uint8 images and of float [C, H, W] images, load() ranges, and clear errors for
-- damaged, 16-bit and non-PNG files. A missing golden folder FAILS.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local fs = require "nemo.fs"
local golden = require "golden"
local image = require "nemo.image"

local root, why = golden.case("png", "rgb.png")
local CASES = {rgb = 3, rgba = 4, gray = 1, gray_alpha = 2, rgb_fast = 3, noise = 3, palette = 3, palette_trns = 4}
local names = {}
for k in pairs(CASES) do names[#names + 1] = k end
table.sort(names)
if not root then
    T.ok(false, "PNG golden cases: " .. tostring(why))
else
    for _, name in ipairs(names) do
        local ok, im = pcall(image.read_png, root .. "/" .. name .. ".png")
        local raw = fs.read(root .. "/" .. name .. ".raw")
        T.ok(ok and im.channels == CASES[name] and im.pixels == raw,
            string.format("read_png %s (PIL-written): %d channels, every pixel byte equals PIL's decoding", name, CASES[name]),
            not ok and tostring(im) or string.format("channels %s, %d bytes vs %d", tostring(im.channels), #im.pixels, #raw))
    end
end

local tmp = os.tmpname()
-- write -> read round trip, every channel count, a size over one stored block
for _, c in ipairs{1, 2, 3, 4} do
    local W, H = 131, 97 + c   -- 131 * 98 * 4 > 65535: several stored blocks
    local bytes = {}
    for i = 1, W * H * c do bytes[i] = string.char((i * 37 + c) % 256) end
    local px = table.concat(bytes)
    image.write_png(tmp, px, W, H, c)
    local back = image.read_png(tmp)
    T.ok(back.width == W and back.height == H and back.channels == c and back.pixels == px,
        string.format("write_png then read_png: %d x %d x %d identical", W, H, c))
end
-- save() of a sampling-style uint8 image [1, H, W, 3] and of floats [3, H, W]
do
    local u = nemo.tensor({{{{0, 128, 255}, {10, 20, 30}}, {{255, 255, 255}, {1, 2, 3}}}}, {dtype = "int32"})
    image.save(tmp, u)
    local back = image.read_png(tmp)
    T.ok(back.width == 2 and back.height == 2 and back.pixels == string.char(0, 128, 255, 10, 20, 30, 255, 255, 255, 1, 2, 3),
        "save() of a [1, H, W, 3] 0..255 tensor (sampling.to_uint8's)")
    local f = nemo.tensor({{{0, 1}, {0.5, 2}}, {{-1, 0.25}, {1, 0}}, {{0.1, 0.2}, {0.3, 0.4}}})
    image.save(tmp, f)
    back = image.read_png(tmp)
    T.ok(back.pixels == string.char(0, 0, 26, 255, 64, 51, 128, 255, 77, 255, 0, 102),
        "save() of a float [3, H, W] image: clamped to [0, 1], x 255, rounded")
    local l = image.load(tmp, {range = "-1_1"})
    T.ok(l.shape[1] == 3 and l.shape[2] == 2 and l.shape[3] == 2 and math.abs(l[0][0][0]:item() + 1) < 1e-6 and
        math.abs(l[0][0][1]:item() - 1) < 1e-6, "load() gives float32 [3, H, W] in [-1, 1]")
    if root then
        local g = image.load(root .. "/gray.png")
        T.ok(g.shape[1] == 3 and T.same_bits(g[0], g[2]), "load() repeats a gray image over 3 channels")
    end
end
-- an animated PNG: frame 0 is what a plain PNG reader sees; one fcTL per frame, fdAT for the others
do
    local frames = {}
    for f = 1, 4 do
        local t = {}
        for k = 1, 20 * 10 * 3 do t[k] = string.char((k * 7 + f * 60) % 256) end
        frames[f] = table.concat(t)
    end
    image.write_apng(tmp, frames, 20, 10, 3, {fps = 8})
    local s = fs.read(tmp)
    local _, nfc = s:gsub("fcTL", "")
    local _, nfd = s:gsub("fdAT", "")
    local back = image.read_png(tmp)
    T.ok(back.pixels == frames[1] and nfc == 4 and nfd == 3 and s:find("acTL", 1, true),
        "write_apng: 4 frames (acTL, 4 fcTL, IDAT + 3 fdAT); a PNG reader sees the first (PIL plays all 4, checked by hand)")
    T.raises(function() image.write_apng(tmp, {"ab"}, 20, 10, 3) end, "frame 1 must be", "write_apng with a short frame")
end
-- image.read / load dispatch on the first bytes: a JPEG goes to nemo.jpeg
do
    local jd = golden.case("jpeg", "b444_q75_37x23.jpg")
    if jd then
        local im = image.read(jd .. "/b444_q75_37x23.jpg")
        T.ok(im.width == 37 and im.height == 23 and im.pixels == fs.read(jd .. "/b444_q75_37x23.raw"),
            "image.read of a JPEG decodes it (nemo.jpeg, PIL's pixels)")
        local t = image.load(jd .. "/b444_q75_37x23.jpg")
        T.ok(t.shape[1] == 3 and t.shape[2] == 23 and t.shape[3] == 37, "image.load of a JPEG: [3, H, W]")
    else
        T.ok(false, "jpeg golden case missing")
    end
    local f = io.open(tmp, "wb"); f:write("GIF89a......"); f:close()
    T.raises(function() image.read(tmp) end, "neither a PNG nor a JPEG", "image.read of another format")
end
-- errors
do
    local f = io.open(tmp, "wb"); f:write("not a png at all"); f:close()
    T.raises(function() image.read_png(tmp) end, "is not a PNG file", "a file that is not a PNG")
    if root then
        local s = fs.read(root .. "/rgb.png")
        f = io.open(tmp, "wb"); f:write(s:sub(1, #s - 400)); f:close()
        T.raises(function() image.read_png(tmp) end, "cut", "a truncated PNG is a clear error")
        local s16 = s:sub(1, 24) .. string.char(16) .. s:sub(26)
        f = io.open(tmp, "wb"); f:write(s16); f:close()
        T.raises(function() image.read_png(tmp) end, "16-bit samples", "a 16-bit PNG is a clear error")
    end
    T.raises(function() image.write_png(tmp, "abc", 2, 2, 3) end, "expected 2 x 2 x 3 = 12 bytes", "write_png with too few bytes")
    T.raises(function() image.save(tmp, nemo.zeros({5, 4, 4})) end, "C in 1..4", "save() of a 5-channel float image")
    T.raises(function() image.read_png(tmp .. "-missing") end, "cannot read", "a missing file")
end
os.remove(tmp)
T.done()
