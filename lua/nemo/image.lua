-- lua/nemo/image.lua: PNG files without libraries (nemo.image).
--   image.write_png(path, pixels, width, height, channels)   pixels: a string of H*W*C bytes
--                                                          (row-major, C = 1 gray, 3 RGB, 4 RGBA)
--   image.save(path, t)      t: a [H, W, C] or [1, H, W, C] tensor of 0..255 values (what
--                            nemo.sampling.to_uint8 gives), or [C, H, W] / [1, C, H, W] floats
--                            in [0, 1]; written as an 8-bit PNG
--   image.save_video(path, frames, {fps = 16})   a list of such images as one video: an MP4
--                            (H.264, nemo.mp4; {qp =, keyint =} pass to it) for a .mp4 path, else an
--                            animated PNG (image.write_apng); nemo.sampling.video_frames gives
--                            the frames
--   image.read_png(path) -> {width =, height =, channels =, pixels = string}   8-bit gray, gray +
--                            alpha, RGB, RGBA and palette images, any filter, not interlaced
--   image.read(path)         a PNG (read_png) or a JPEG (nemo.jpeg.read), by its first bytes
--   image.load(path, {range = "0_1" | "-1_1"}) -> a float32 [3, H, W] tensor (alpha dropped,
--                            gray repeated), in [0, 1] or [-1, 1] (the VAE's input range)
--
-- Writing stores the image data in uncompressed deflate blocks (valid zlib, larger files: no
-- compressor is needed); reading implements inflate (stored, fixed and dynamic Huffman blocks),
-- so the PNGs of other programs load. Not supported (a clear error): 16-bit samples, interlaced
-- (Adam7) images. The file is written to "<path>.tmp" and renamed, so a failure leaves no
-- half-written image.
local bit = require "bit"
local ffi = require "ffi"

local M = {}

-- ==== CRC-32 and Adler-32 ====

local crc_table = {}
for n = 0, 255 do
    local c = n
    for _ = 1, 8 do
        if bit.band(c, 1) == 1 then c = bit.bxor(0xEDB88320, bit.rshift(c, 1)) else c = bit.rshift(c, 1) end
    end
    crc_table[n] = c
end
local function crc32(s, crc)
    crc = bit.bnot(crc or 0)
    for i = 1, #s do crc = bit.bxor(crc_table[bit.band(bit.bxor(crc, s:byte(i)), 0xFF)], bit.rshift(crc, 8)) end
    return bit.bnot(crc)
end
local function adler32(s, a, b)
    a, b = a or 1, b or 0
    local n, i = #s, 1
    while i <= n do
        local j = math.min(n, i + 3800)
        for k = i, j do a = a + s:byte(k); b = b + a end
        a, b = a % 65521, b % 65521
        i = j + 1
    end
    return a, b
end
local function be32(v)
    v = v % 4294967296
    return string.char(math.floor(v / 16777216) % 256, math.floor(v / 65536) % 256, math.floor(v / 256) % 256, v % 256)
end
local function chunk(kind, data)
    local c = crc32(kind .. data)
    return be32(#data) .. kind .. data .. be32(c < 0 and c + 4294967296 or c)
end

-- ==== writing ====

-- the zlib stream (stored deflate blocks) of the filter-0 scanlines of pixels
local function zlib_scanlines(pixels, width, height, channels)
    local stride = width * channels
    local rows = {}
    for y = 0, height - 1 do rows[#rows + 1] = "\0" .. pixels:sub(y * stride + 1, (y + 1) * stride) end
    local raw = table.concat(rows)
    local parts = {"\120\1"}   -- CMF 0x78 (deflate, 32K window), FLG 0x01 (check bits)
    local pos, n = 1, #raw
    repeat
        local len = math.min(65535, n - pos + 1)
        local final = (pos + len > n) and 1 or 0
        parts[#parts + 1] = string.char(final, len % 256, math.floor(len / 256), (65535 - len) % 256,
            math.floor((65535 - len) / 256))
        parts[#parts + 1] = raw:sub(pos, pos + len - 1)
        pos = pos + len
    until pos > n
    local a, b = adler32(raw)
    parts[#parts + 1] = be32(b * 65536 + a)
    return table.concat(parts)
end

local function write_atomic(path, data, who)
    local tmp = path .. ".tmp"
    local f, err = io.open(tmp, "wb")
    if not f then error(who .. ": cannot write '" .. path .. "': " .. tostring(err), 3) end
    f:write(data)
    f:close()
    local ok, rerr = os.rename(tmp, path)
    if not ok then os.remove(tmp); error(who .. ": cannot write '" .. path .. "': " .. tostring(rerr), 3) end
    return path
end

function M.write_png(path, pixels, width, height, channels)
    local ctype = ({[1] = 0, [2] = 4, [3] = 2, [4] = 6})[channels]
    if not ctype then error("image.write_png: channels must be 1, 2, 3 or 4, got " .. tostring(channels), 2) end
    if type(width) ~= "number" or type(height) ~= "number" or width < 1 or height < 1 or width % 1 ~= 0 or height % 1 ~= 0 then
        error("image.write_png: width and height must be positive integers", 2)
    end
    if type(pixels) ~= "string" or #pixels ~= width * height * channels then
        error(string.format("image.write_png: expected %d x %d x %d = %d bytes of pixels, got %s", width, height,
            channels, width * height * channels, type(pixels) == "string" and tostring(#pixels) or type(pixels)), 2)
    end
    local ihdr = be32(width) .. be32(height) .. string.char(8, ctype, 0, 0, 0)
    local data = "\137PNG\r\n\26\n" .. chunk("IHDR", ihdr) .. chunk("IDAT", zlib_scanlines(pixels, width, height, channels)) ..
        chunk("IEND", "")
    return write_atomic(path, data, "image.write_png")
end

-- write_apng(path, frames, width, height, channels, {fps = 16, loops = 0}): an animated PNG (each
-- frame a string of H*W*C bytes), which browsers and most image viewers play; loops 0 = forever.
function M.write_apng(path, frames, width, height, channels, o)
    local ctype = ({[1] = 0, [2] = 4, [3] = 2, [4] = 6})[channels]
    if not ctype then error("image.write_apng: channels must be 1, 2, 3 or 4, got " .. tostring(channels), 2) end
    if type(frames) ~= "table" or #frames == 0 then error("image.write_apng: expected a non-empty list of frames", 2) end
    for i, f in ipairs(frames) do
        if type(f) ~= "string" or #f ~= width * height * channels then
            error(string.format("image.write_apng: frame %d must be %d x %d x %d bytes", i, width, height, channels), 2)
        end
    end
    local fps = (o and o.fps) or 16
    if type(fps) ~= "number" or fps <= 0 or fps > 65535 then error("image.write_apng: fps must be in (0, 65535]", 2) end
    local loops = (o and o.loops) or 0
    local num, den = math.floor(1000 / fps + 0.5), 1000   -- each frame's delay in milliseconds
    local parts = {"\137PNG\r\n\26\n", chunk("IHDR", be32(width) .. be32(height) .. string.char(8, ctype, 0, 0, 0)),
                   chunk("acTL", be32(#frames) .. be32(loops))}
    local seq = 0
    for i, f in ipairs(frames) do
        parts[#parts + 1] = chunk("fcTL", be32(seq) .. be32(width) .. be32(height) .. be32(0) .. be32(0) ..
            string.char(math.floor(num / 256), num % 256, math.floor(den / 256), den % 256, 0, 0))
        seq = seq + 1
        local z = zlib_scanlines(f, width, height, channels)
        if i == 1 then parts[#parts + 1] = chunk("IDAT", z)
        else parts[#parts + 1] = chunk("fdAT", be32(seq) .. z); seq = seq + 1 end
    end
    parts[#parts + 1] = chunk("IEND", "")
    return write_atomic(path, table.concat(parts), "image.write_apng")
end

-- write_mp4(path, frames, width, height, channels, {fps = 16}): an MP4 (H.264, nemo.mp4) of the
-- frames (strings of H*W*C bytes); width and height even.
function M.write_mp4(path, frames, width, height, channels, o)
    local ok, data = pcall(require("nemo.mp4").encode, frames, width, height, channels, o)
    if not ok then error((tostring(data):gsub("^mp4%.encode", "image.write_mp4")), 2) end
    return write_atomic(path, data, "image.write_mp4")
end

-- (t) -> pixels as a string of H*W*C bytes, W, H, C: an image tensor as save takes it
local function image_bytes(t, who)
    local Tensor = require "nemo.tensor"
    if not Tensor.is_tensor(t) then error(who .. ": expected an image tensor, got " .. type(t), 3) end
    local s = t.shape
    if #s == 4 then
        if s[1] ~= 1 then error(who .. ": a batch of " .. s[1] .. " images: save them one by one (t[i])", 3) end
        t = t:reshape{s[2], s[3], s[4]}
        s = t.shape
    end
    if #s ~= 3 then error(who .. ": expected [H, W, C] 0..255 or [C, H, W] floats in [0, 1], got " .. Tensor.shape_str(s), 3) end
    local hwc
    if t:is_floating_point() then
        if s[1] < 1 or s[1] > 4 then error(who .. ": a float image must be [C, H, W] with C in 1..4, got " .. Tensor.shape_str(s), 3) end
        hwc = require("nemo.autograd").no_grad(function()
            return (t:detach():to{device = "cpu"}:float():clamp(0, 1) * 255):permute{1, 2, 0}:contiguous()
        end)
    else
        if s[3] < 1 or s[3] > 4 then error(who .. ": an integer image must be [H, W, C] with C in 1..4, got " .. Tensor.shape_str(s), 3) end
        hwc = t:to{device = "cpu"}:contiguous()
    end
    local H, W, C = hwc.shape[1], hwc.shape[2], hwc.shape[3]
    local vals = hwc:double():reshape{-1}:tolist()
    local half = t:is_floating_point() and 0.5 or 0   -- floats round to nearest, 0..255 values are taken as they are
    local bytes = {}
    for i, v in ipairs(vals) do
        v = math.floor(v + half)
        if v < 0 then v = 0 elseif v > 255 then v = 255 end
        bytes[i] = string.char(v)
    end
    return table.concat(bytes), W, H, C
end

-- save(path, t): see the header
function M.save(path, t)
    local pixels, W, H, C = image_bytes(t, "image.save")
    return M.write_png(path, pixels, W, H, C)
end

-- save_video(path, frames, {fps = 16, loops = 0, format =}): a list of image tensors (each as
-- save takes it, all the same size; sampling.video_frames gives them) as one video: an MP4
-- (H.264, nemo.mp4) when path ends in .mp4 or format is "mp4", else an animated PNG (loops: its
-- repeat count, 0 = forever).
function M.save_video(path, frames, o)
    if type(frames) ~= "table" or #frames == 0 then error("image.save_video: expected a non-empty list of frames", 2) end
    local strs, W0, H0, C0 = {}
    for i, f in ipairs(frames) do
        local pixels, W, H, C = image_bytes(f, "image.save_video")
        if i > 1 and (W ~= W0 or H ~= H0 or C ~= C0) then
            error(string.format("image.save_video: frame %d is %d x %d x %d, frame 1 %d x %d x %d", i, W, H, C, W0, H0, C0), 2)
        end
        W0, H0, C0 = W, H, C
        strs[i] = pixels
    end
    local fmt = o and o.format or (path:lower():match("%.mp4$") and "mp4" or "apng")
    if fmt == "mp4" then return M.write_mp4(path, strs, W0, H0, C0, o) end
    if fmt ~= "apng" then error("image.save_video: format must be mp4 or apng, got " .. tostring(fmt), 2) end
    return M.write_apng(path, strs, W0, H0, C0, o)
end

-- ==== inflate (RFC 1951) ====

local function inflate(data, start)
    local src = ffi.cast("const uint8_t *", data)
    local n = #data
    local pos = start        -- byte index (0-based) into data
    local bitbuf, bitcnt = 0, 0
    local out = {}
    local win = ffi.new("uint8_t[?]", 1)   -- grown below
    local cap, len = 0, 0
    local function need(k)
        if len + k > cap then
            local nc = math.max(cap * 2, len + k, 65536)
            local nw = ffi.new("uint8_t[?]", nc)
            if len > 0 then ffi.copy(nw, win, len) end
            win, cap = nw, nc
        end
    end
    local function getbits(k)
        while bitcnt < k do
            if pos >= n then error("image.read_png: the compressed image data ends early", 0) end
            bitbuf = bitbuf + src[pos] * 2 ^ bitcnt
            pos = pos + 1
            bitcnt = bitcnt + 8
        end
        local v = bitbuf % 2 ^ k
        bitbuf = (bitbuf - v) / 2 ^ k
        bitcnt = bitcnt - k
        return v
    end
    -- canonical Huffman decoding tables: counts per length and symbols in order
    local function build(lengths, nsym)
        local count, offs, syms = {}, {}, {}
        for l = 0, 15 do count[l] = 0 end
        for s = 0, nsym - 1 do count[lengths[s] or 0] = count[lengths[s] or 0] + 1 end
        offs[1] = 0
        for l = 1, 14 do offs[l + 1] = offs[l] + count[l] end
        for s = 0, nsym - 1 do
            local l = lengths[s] or 0
            if l > 0 then syms[offs[l]] = s; offs[l] = offs[l] + 1 end
        end
        return {count = count, syms = syms}
    end
    local function decode(h)
        local code, first, index = 0, 0, 0
        for l = 1, 15 do
            code = code + getbits(1)
            local c = h.count[l]
            if code - c < first then return h.syms[index + (code - first)] end
            index = index + c
            first = (first + c) * 2
            code = code * 2
        end
        error("image.read_png: bad Huffman code in the image data", 0)
    end
    local LBASE = {3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163,
                   195, 227, 258}
    local LEXT = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0}
    local DBASE = {1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049,
                   3073, 4097, 6145, 8193, 12289, 16385, 24577}
    local DEXT = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13}
    local fixed_l, fixed_d
    repeat
        local final = getbits(1)
        local btype = getbits(2)
        if btype == 0 then
            bitbuf, bitcnt = 0, 0
            if pos + 4 > n then error("image.read_png: a stored block's header is cut", 0) end
            local l = src[pos] + src[pos + 1] * 256
            pos = pos + 4
            if pos + l > n then error("image.read_png: a stored block is cut", 0) end
            need(l)
            ffi.copy(win + len, src + pos, l)
            len = len + l
            pos = pos + l
        elseif btype == 1 or btype == 2 then
            local hl, hd
            if btype == 1 then
                if not fixed_l then
                    local ll = {}
                    for s = 0, 143 do ll[s] = 8 end
                    for s = 144, 255 do ll[s] = 9 end
                    for s = 256, 279 do ll[s] = 7 end
                    for s = 280, 287 do ll[s] = 8 end
                    local dl = {}
                    for s = 0, 29 do dl[s] = 5 end
                    fixed_l, fixed_d = build(ll, 288), build(dl, 30)
                end
                hl, hd = fixed_l, fixed_d
            else
                local hlit, hdist, hclen = getbits(5) + 257, getbits(5) + 1, getbits(4) + 4
                local order = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15}
                local cl = {}
                for i = 1, hclen do cl[order[i]] = getbits(3) end
                local hc = build(cl, 19)
                local lens, i = {}, 0
                while i < hlit + hdist do
                    local sym = decode(hc)
                    if sym < 16 then lens[i] = sym; i = i + 1
                    elseif sym == 16 then
                        if i == 0 then error("image.read_png: bad code lengths", 0) end
                        local prev = lens[i - 1]
                        for _ = 1, 3 + getbits(2) do lens[i] = prev; i = i + 1 end
                    elseif sym == 17 then for _ = 1, 3 + getbits(3) do lens[i] = 0; i = i + 1 end
                    else for _ = 1, 11 + getbits(7) do lens[i] = 0; i = i + 1 end end
                end
                local ll, dl = {}, {}
                for s = 0, hlit - 1 do ll[s] = lens[s] end
                for s = 0, hdist - 1 do dl[s] = lens[hlit + s] end
                hl, hd = build(ll, hlit), build(dl, hdist)
            end
            while true do
                local sym = decode(hl)
                if sym < 256 then
                    need(1)
                    win[len] = sym
                    len = len + 1
                elseif sym == 256 then
                    break
                else
                    local li = sym - 256
                    if li > 29 then error("image.read_png: bad length code", 0) end
                    local l = LBASE[li] + getbits(LEXT[li])
                    local di = decode(hd) + 1
                    if di > 30 then error("image.read_png: bad distance code", 0) end
                    local d = DBASE[di] + getbits(DEXT[di])
                    if d > len then error("image.read_png: a back reference before the start of the data", 0) end
                    need(l)
                    for k = 0, l - 1 do win[len + k] = win[len - d + k] end
                    len = len + l
                end
            end
        else
            error("image.read_png: bad deflate block type 3", 0)
        end
    until final == 1
    return ffi.string(win, len)
end

-- ==== reading ====

local function u32(s, i) return ((s:byte(i) * 256 + s:byte(i + 1)) * 256 + s:byte(i + 2)) * 256 + s:byte(i + 3) end

function M.read_png(path)
    local f, err = io.open(path, "rb")
    if not f then error("image.read_png: cannot read '" .. tostring(path) .. "': " .. tostring(err), 2) end
    local s = f:read("*a")
    f:close()
    if s:sub(1, 8) ~= "\137PNG\r\n\26\n" then error("image.read_png: '" .. path .. "' is not a PNG file", 2) end
    local pos, idat, palette, trns = 9, {}, nil, nil
    local W, H, depth, ctype, interlace
    while pos + 8 <= #s do
        local len, kind = u32(s, pos), s:sub(pos + 4, pos + 7)
        local data = s:sub(pos + 8, pos + 7 + len)
        if #data ~= len then error("image.read_png: '" .. path .. "' is cut inside its " .. kind .. " chunk", 2) end
        if kind == "IHDR" then
            W, H, depth, ctype, interlace = u32(data, 1), u32(data, 5), data:byte(9), data:byte(10), data:byte(13)
        elseif kind == "PLTE" then palette = data
        elseif kind == "tRNS" then trns = data
        elseif kind == "IDAT" then idat[#idat + 1] = data
        elseif kind == "IEND" then break end
        pos = pos + 12 + len
    end
    if not W then error("image.read_png: '" .. path .. "' has no IHDR chunk", 2) end
    if depth ~= 8 then error(string.format("image.read_png: '%s' has %d-bit samples; only 8-bit PNGs are supported", path, depth), 2) end
    if interlace ~= 0 then error("image.read_png: '" .. path .. "' is interlaced (Adam7); only non-interlaced PNGs are supported", 2) end
    local C = ({[0] = 1, [2] = 3, [3] = 1, [4] = 2, [6] = 4})[ctype]
    if not C then error(string.format("image.read_png: '%s' has the unknown color type %d", path, ctype), 2) end
    local z = table.concat(idat)
    if #z < 2 or (z:byte(1) % 16) ~= 8 then error("image.read_png: '" .. path .. "': the image data is not zlib/deflate", 2) end
    local ok, raw = pcall(inflate, z, 2)
    if not ok then error(tostring(raw):gsub("image.read_png:", "image.read_png: '" .. path .. "':"), 2) end
    local stride = W * C
    if #raw < H * (stride + 1) then error(string.format("image.read_png: '%s': %d bytes of image data for %d x %d x %d", path, #raw, W, H, C), 2) end
    -- undo the filters
    local img = ffi.new("uint8_t[?]", W * H * C)
    local r = ffi.cast("const uint8_t *", raw)
    for y = 0, H - 1 do
        local ft = r[y * (stride + 1)]
        local line = r + y * (stride + 1) + 1
        local cur, prev = img + y * stride, y > 0 and (img + (y - 1) * stride) or nil
        for x = 0, stride - 1 do
            local a = x >= C and cur[x - C] or 0
            local b = prev and prev[x] or 0
            local c = (prev and x >= C) and prev[x - C] or 0
            local v = line[x]
            if ft == 1 then v = v + a
            elseif ft == 2 then v = v + b
            elseif ft == 3 then v = v + math.floor((a + b) / 2)
            elseif ft == 4 then
                local p = a + b - c
                local pa, pb, pc = math.abs(p - a), math.abs(p - b), math.abs(p - c)
                v = v + ((pa <= pb and pa <= pc) and a or (pb <= pc and b or c))
            elseif ft ~= 0 then error(string.format("image.read_png: '%s': unknown filter %d on row %d", path, ft, y), 2) end
            cur[x] = v % 256
        end
    end
    local pixels = ffi.string(img, W * H * C)
    if ctype == 3 then   -- palette -> RGB(A)
        if not palette then error("image.read_png: '" .. path .. "' is a palette image without a PLTE chunk", 2) end
        local outC = trns and 4 or 3
        local out = {}
        for i = 1, #pixels do
            local k = pixels:byte(i)
            local rgb = palette:sub(3 * k + 1, 3 * k + 3)
            if #rgb ~= 3 then error("image.read_png: '" .. path .. "': a palette index past the palette", 2) end
            out[i] = trns and (rgb .. string.char(trns:byte(k + 1) or 255)) or rgb
        end
        return {width = W, height = H, channels = outC, pixels = table.concat(out)}
    end
    return {width = W, height = H, channels = C, pixels = pixels}
end

-- read(path): a PNG or a JPEG (nemo.jpeg), told apart by their first bytes -> {width =, height =,
-- channels =, pixels =}
function M.read(path)
    local f, err = io.open(path, "rb")
    if not f then error("image.read: cannot read '" .. tostring(path) .. "': " .. tostring(err), 2) end
    local head = f:read(8) or ""
    f:close()
    if head:sub(1, 2) == "\255\216" then return require("nemo.jpeg").read(path) end
    if head == "\137PNG\r\n\26\n" then return M.read_png(path) end
    error("image.read: '" .. path .. "' is neither a PNG nor a JPEG file", 2)
end

-- load(path, {range = "0_1"}) -> float32 [3, H, W] (PNG or JPEG)
function M.load(path, o)
    local Tensor = require "nemo.tensor"
    local range = o and o.range or "0_1"
    if range ~= "0_1" and range ~= "-1_1" then error("image.load: range must be '0_1' or '-1_1', got " .. tostring(range), 2) end
    local im = M.read(path)
    local W, H, C = im.width, im.height, im.channels
    local t = Tensor.empty({3, H, W}, {dtype = "float32"})
    local p = ffi.cast("float *", t:data_ptr())
    local px = ffi.cast("const uint8_t *", im.pixels)
    local gray = C <= 2
    local scale, shift = 1 / 255, 0
    if range == "-1_1" then scale, shift = 2 / 255, -1 end
    for y = 0, H - 1 do
        for x = 0, W - 1 do
            local base = (y * W + x) * C
            for ch = 0, 2 do
                local v = px[base + (gray and 0 or ch)]
                p[(ch * H + y) * W + x] = v * scale + shift
            end
        end
    end
    return t
end

M._inflate, M._crc32 = inflate, crc32
return M
