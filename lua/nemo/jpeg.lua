-- lua/nemo/jpeg.lua: JPEG files without libraries (nemo.jpeg), LuaJIT and ffi arrays only.
--   jpeg.read(path) -> {width =, height =, channels = 1 | 3, pixels = string}   8-bit, row-major:
--                      gray (1 channel) for 1-component files, RGB (3) for 3-component ones
--   jpeg.decode(bytes [, name]) -> the same from a string of JPEG bytes (name: for the errors)
--
-- Supported: baseline (SOF0), extended sequential 8-bit (SOF1: 16-bit quantization tables, four
-- Huffman tables) and progressive (SOF2) Huffman-coded files; 1 component (gray) or 3 (YCbCr,
-- or RGB as stored when an Adobe APP14 segment says transform 0, or, without JFIF/Adobe
-- segments, when the component ids are 'R','G','B' -- libjpeg's rules); any sampling factors
-- 1..4 whose ratios to the largest are integers (4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1, ...); one
-- scan per component or interleaved; restart intervals (DRI, RST0..7); any image size (the
-- MCU padding is cropped); baseline files without DHT segments (Motion-JPEG frames: the
-- standard tables of Annex K, as libjpeg-turbo). APPn (EXIF, ICC, ...) and COM segments are
-- skipped: the EXIF orientation is ignored (the pixels are as stored, as PIL's Image.open).
-- Not supported (an error saying so): arithmetic coding (SOF9-15, DAC), 12-bit samples,
-- lossless (SOF3) and hierarchical (SOF5-7) files, 2 or 4 components (CMYK, YCCK), a height
-- given by a DNL marker. A file cut short is an error ("truncated"); a file that only lacks
-- the final EOI marker is accepted when it is sequential and every component was decoded.
--
-- The numbers are libjpeg-turbo's with its defaults, which PIL uses, so the pixels equal PIL's:
--  * the accurate integer IDCT (jidctint.c "islow": 13-bit constants, 2 extra bits between the
--    passes, the 1024-entry range-limit table that wraps values beyond +-512),
--  * "fancy" upsampling (jdsample.c): h2v1 = 3/4, 1/4 triangle with biases 1, 2; h2v2 = 9/16,
--    3/16, 3/16, 1/16 with biases 8, 7; h1v2 (4:4:0) = 3/4, 1/4 with biases 1, 2; the edges
--    repeat the first / last sample; for h2v1 and h2v2 a component only 1 or 2 samples wide is
--    replicated instead (as libjpeg does); other integer ratios (4:1:1) replicate samples. No
--    merged upsampling (libjpeg uses it only when fancy upsampling is off),
--  * jdcolor.c's YCbCr -> RGB with 16-bit fixed-point tables (ONE_HALF rounding).
-- Corrupt entropy data is decoded as libjpeg does (a marker inside the data gives zero bits, a
-- bad Huffman code gives symbol 0, garbage before a marker is skipped) rather than refused; only
-- running out of data is an error. Interleaved scans of more than 10 blocks per MCU (invalid,
-- libjpeg refuses them) are decoded anyway. Speed: about 0.03 s for a 1024x768 4:2:0 file, 0.1 s
-- for a 1.9 MP one (coefficients are decoded into int16 arrays, then IDCT, upsampling, color).
local bit = require "bit"
local ffi = require "ffi"

local band, bor, lshift, rshift, arshift = bit.band, bit.bor, bit.lshift, bit.rshift, bit.arshift

local M = {}

-- zigzag position -> natural (row-major) index; 16 extra entries so that corrupt run lengths
-- past 63 land on 63 (libjpeg's jpeg_natural_order does the same)
local ZZ = ffi.new("int32_t[80]", {0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48,
    41, 34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52,
    45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63})

-- the standard Huffman tables (ITU T.81 Annex K.3): {counts of codes of length 1..16, symbols}
local function hexbytes(h)
    local t = {}
    for i = 1, #h, 2 do t[#t + 1] = tonumber(h:sub(i, i + 1), 16) end
    return t
end
local STD_DC = {
    [0] = {{0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}},
    [1] = {{0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}},
}
local STD_AC = {
    [0] = {{0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d}, hexbytes(
        "01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435" ..
        "363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a92939495969798" ..
        "999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4" ..
        "f5f6f7f8f9fa")},
    [1] = {{0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77}, hexbytes(
        "000102031104052131061241510761711322328108144291a1b1c109233352f0156272d10a162434e125f11718191a262728292a" ..
        "35363738393a434445464748494a535455565758595a636465666768696a737475767778797a82838485868788898a9293949596" ..
        "9798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae2e3e4e5e6e7e8e9eaf2f3f4" ..
        "f5f6f7f8f9fa")},
}

-- IDCT output: value v (centered on 0) -> sample, indexed by v & 1023 (jdmaster.c's post-IDCT
-- range-limit table: clamp to 0..255 for |v| <= 512, wrapping beyond)
local IDCT_LIMIT = ffi.new("uint8_t[1024]")
for i = 0, 1023 do
    local v = (i < 512 and i or i - 1024) + 128
    IDCT_LIMIT[i] = v < 0 and 0 or (v > 255 and 255 or v)
end
-- clamp for the color conversion: CLAMP[v + 384] for v in -384..639
local CLAMP = ffi.new("uint8_t[1024]")
for i = 0, 1023 do
    local v = i - 384
    CLAMP[i] = v < 0 and 0 or (v > 255 and 255 or v)
end
-- jdcolor.c's tables: SCALEBITS 16, FIX(x) = floor(x * 65536 + 0.5), ONE_HALF = 32768
local CR_R, CB_B = ffi.new("int32_t[256]"), ffi.new("int32_t[256]")
local CR_G, CB_G = ffi.new("int32_t[256]"), ffi.new("int32_t[256]")
do
    local function FIX(x) return math.floor(x * 65536 + 0.5) end
    for i = 0, 255 do
        local x = i - 128
        CR_R[i] = arshift(FIX(1.40200) * x + 32768, 16)
        CB_B[i] = arshift(FIX(1.77200) * x + 32768, 16)
        CR_G[i] = -FIX(0.71414) * x
        CB_G[i] = -FIX(0.34414) * x + 32768
    end
end

-- ==== Huffman tables: a 16-bit lookahead table, entry = length << 8 | symbol (0: no code) ====

local function build_huffman(counts, symbols, fail, what)
    local lut = ffi.new("uint16_t[65536]")
    local code, k = 0, 0
    for len = 1, 16 do
        for _ = 1, counts[len] do
            if code >= lshift(1, len) then fail("bad Huffman table (%s): the code lengths overflow", what) end
            local span = lshift(1, 16 - len)
            local first = code * span
            local e = len * 256 + symbols[k + 1]
            for j = first, first + span - 1 do lut[j] = e end
            code, k = code + 1, k + 1
        end
        code = code * 2
    end
    return lut
end

local std_luts = {}
local function std_table(kind, slot, fail)
    local key = kind .. slot
    if not std_luts[key] then
        local t = (kind == "DC" and STD_DC or STD_AC)[slot]
        std_luts[key] = build_huffman(t[1], t[2], fail, "standard " .. key)
    end
    return std_luts[key]
end

-- ==== the IDCT (jidctint.c's jpeg_idct_islow) ====

local ws = ffi.new("int32_t[64]")
-- coef[off .. off+63] (natural order) times q[0..63] -> 8x8 samples at out[o], row stride `stride`
local function idct_islow(coef, off, q, out, o, stride)
    for col = 0, 7 do
        local i = off + col
        local c1, c2, c3, c4 = coef[i + 8], coef[i + 16], coef[i + 24], coef[i + 32]
        local c5, c6, c7 = coef[i + 40], coef[i + 48], coef[i + 56]
        if c1 == 0 and c2 == 0 and c3 == 0 and c4 == 0 and c5 == 0 and c6 == 0 and c7 == 0 then
            local dc = coef[i] * q[col] * 4
            ws[col], ws[col + 8], ws[col + 16], ws[col + 24] = dc, dc, dc, dc
            ws[col + 32], ws[col + 40], ws[col + 48], ws[col + 56] = dc, dc, dc, dc
        else
            -- even part
            local z2, z3 = c2 * q[col + 16], c6 * q[col + 48]
            local z1 = (z2 + z3) * 4433                 -- FIX(0.541196100)
            local tmp2 = z1 - z3 * 15137                -- FIX(1.847759065)
            local tmp3 = z1 + z2 * 6270                 -- FIX(0.765366865)
            z2, z3 = coef[i] * q[col], c4 * q[col + 32]
            local tmp0, tmp1 = (z2 + z3) * 8192, (z2 - z3) * 8192
            local tmp10, tmp13, tmp11, tmp12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
            -- odd part
            local t0, t1, t2, t3 = c7 * q[col + 56], c5 * q[col + 40], c3 * q[col + 24], c1 * q[col + 8]
            z1, z2, z3 = t0 + t3, t1 + t2, t0 + t2
            local z4 = t1 + t3
            local z5 = (z3 + z4) * 9633                 -- FIX(1.175875602)
            t0, t1, t2, t3 = t0 * 2446, t1 * 16819, t2 * 25172, t3 * 12299
            z1, z2 = z1 * -7373, z2 * -20995
            z3, z4 = z3 * -16069 + z5, z4 * -3196 + z5
            t0, t1, t2, t3 = t0 + z1 + z3, t1 + z2 + z4, t2 + z2 + z3, t3 + z1 + z4
            -- DESCALE(x, CONST_BITS - PASS1_BITS = 11)
            ws[col] = arshift(tmp10 + t3 + 1024, 11)
            ws[col + 56] = arshift(tmp10 - t3 + 1024, 11)
            ws[col + 8] = arshift(tmp11 + t2 + 1024, 11)
            ws[col + 48] = arshift(tmp11 - t2 + 1024, 11)
            ws[col + 16] = arshift(tmp12 + t1 + 1024, 11)
            ws[col + 40] = arshift(tmp12 - t1 + 1024, 11)
            ws[col + 24] = arshift(tmp13 + t0 + 1024, 11)
            ws[col + 32] = arshift(tmp13 - t0 + 1024, 11)
        end
    end
    for row = 0, 7 do
        local b = row * 8
        local w0, w1, w2, w3 = ws[b], ws[b + 1], ws[b + 2], ws[b + 3]
        local w4, w5, w6, w7 = ws[b + 4], ws[b + 5], ws[b + 6], ws[b + 7]
        local r = o + row * stride
        if w1 == 0 and w2 == 0 and w3 == 0 and w4 == 0 and w5 == 0 and w6 == 0 and w7 == 0 then
            local v = IDCT_LIMIT[band(arshift(w0 + 16, 5), 1023)]   -- DESCALE(x, PASS1_BITS + 3)
            out[r], out[r + 1], out[r + 2], out[r + 3] = v, v, v, v
            out[r + 4], out[r + 5], out[r + 6], out[r + 7] = v, v, v, v
        else
            local z1 = (w2 + w6) * 4433
            local tmp2 = z1 - w6 * 15137
            local tmp3 = z1 + w2 * 6270
            local tmp0, tmp1 = (w0 + w4) * 8192, (w0 - w4) * 8192
            local tmp10, tmp13, tmp11, tmp12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
            local t0, t1, t2, t3 = w7, w5, w3, w1
            local z2, z3 = t1 + t2, t0 + t2
            local z4 = t1 + t3
            z1 = t0 + t3
            local z5 = (z3 + z4) * 9633
            t0, t1, t2, t3 = t0 * 2446, t1 * 16819, t2 * 25172, t3 * 12299
            z1, z2 = z1 * -7373, z2 * -20995
            z3, z4 = z3 * -16069 + z5, z4 * -3196 + z5
            t0, t1, t2, t3 = t0 + z1 + z3, t1 + z2 + z4, t2 + z2 + z3, t3 + z1 + z4
            -- DESCALE(x, CONST_BITS + PASS1_BITS + 3 = 18), then the range limit
            out[r] = IDCT_LIMIT[band(arshift(tmp10 + t3 + 131072, 18), 1023)]
            out[r + 7] = IDCT_LIMIT[band(arshift(tmp10 - t3 + 131072, 18), 1023)]
            out[r + 1] = IDCT_LIMIT[band(arshift(tmp11 + t2 + 131072, 18), 1023)]
            out[r + 6] = IDCT_LIMIT[band(arshift(tmp11 - t2 + 131072, 18), 1023)]
            out[r + 2] = IDCT_LIMIT[band(arshift(tmp12 + t1 + 131072, 18), 1023)]
            out[r + 5] = IDCT_LIMIT[band(arshift(tmp12 - t1 + 131072, 18), 1023)]
            out[r + 3] = IDCT_LIMIT[band(arshift(tmp13 + t0 + 131072, 18), 1023)]
            out[r + 4] = IDCT_LIMIT[band(arshift(tmp13 - t0 + 131072, 18), 1023)]
        end
    end
end

-- ==== one scan's entropy-coded data ====

-- Decodes the scan that starts at byte pos (0-based) into the components' coefficients and
-- returns the position after its data. sc: the scan's components {comp =, dc =, ac = (LUTs)}.
local function decode_scan(p, n, pos, frame, sc, ss, se, ah, al, ri, fail, scan_no)
    local bitbuf, bitcnt = 0, 0
    local pad = 0                  -- zero bits supplied after the data stopped (a marker or the end)
    local at_marker, at_end = false, false
    local eobrun = 0

    local function fill()          -- to 25..32 bits in the buffer
        while bitcnt <= 24 do
            local b = 0
            if at_marker then
                pad = pad + 8
            elseif pos >= n then
                at_marker, at_end, pad = true, true, pad + 8
            else
                b = p[pos]
                if b == 0xFF then   -- FF 00 is a data byte FF (FF FF ... 00 too); FF xx a marker
                    local q = pos + 1
                    while q < n and p[q] == 0xFF do q = q + 1 end
                    if q < n and p[q] == 0 then
                        pos = q + 1
                    else
                        b, at_marker, at_end, pad = 0, true, q >= n, pad + 8
                    end
                else
                    pos = pos + 1
                end
            end
            bitbuf = bor(lshift(bitbuf, 8), b)
            bitcnt = bitcnt + 8
        end
    end
    local function huff(lut)
        if bitcnt < 16 then fill() end
        local e = lut[band(rshift(bitbuf, bitcnt - 16), 0xFFFF)]
        if e == 0 then bitcnt = bitcnt - 16; return 0 end   -- not a code: libjpeg's "symbol 0"
        bitcnt = bitcnt - rshift(e, 8)
        return band(e, 0xFF)
    end
    local function bits(s)         -- the next s (0..16) bits as an unsigned number
        if bitcnt < s then fill() end
        bitcnt = bitcnt - s
        return band(rshift(bitbuf, bitcnt), lshift(1, s) - 1)
    end
    local function extended(s)     -- s bits, then the sign rule of F.2.2.1 (EXTEND)
        local v = bits(s)
        if v < lshift(1, s - 1) then v = v - lshift(1, s) + 1 end
        return v
    end
    local function check_end(where)
        if pad > bitcnt and at_end then
            fail("truncated: the data ends inside scan %d (%s)", scan_no, where)
        end
    end

    -- the block decoders: (scan component, offset of the block's coefficients)
    local decode_block
    if not frame.progressive then
        decode_block = function(c, off)
            local coef = c.comp.coef
            local s = huff(c.dc)
            if s > 16 then fail("corrupt data in scan %d: DC difference category %d", scan_no, s) end
            local dc = c.pred
            if s ~= 0 then dc = dc + extended(s) end
            c.pred = dc
            coef[off] = dc
            local ac, k = c.ac, 1
            while k < 64 do
                local rs = huff(ac)
                local r, sz = rshift(rs, 4), band(rs, 15)
                if sz ~= 0 then
                    k = k + r
                    coef[off + ZZ[k]] = extended(sz)
                    k = k + 1
                elseif r == 15 then
                    k = k + 16
                else
                    break
                end
            end
        end
    elseif ss == 0 and ah == 0 then          -- DC, first scan
        decode_block = function(c, off)
            local s = huff(c.dc)
            if s > 16 then fail("corrupt data in scan %d: DC difference category %d", scan_no, s) end
            local dc = c.pred
            if s ~= 0 then dc = dc + extended(s) end
            c.pred = dc
            c.comp.coef[off] = lshift(dc, al)
        end
    elseif ss == 0 then                      -- DC, refinement: one bit
        decode_block = function(c, off)
            if bits(1) ~= 0 then
                local coef = c.comp.coef
                coef[off] = bor(coef[off], lshift(1, al))
            end
        end
    elseif ah == 0 then                      -- AC, first scan (band ss..se)
        decode_block = function(c, off)
            if eobrun > 0 then eobrun = eobrun - 1; return end
            local coef, ac, k = c.comp.coef, c.ac, ss
            while k <= se do
                local rs = huff(ac)
                local r, s = rshift(rs, 4), band(rs, 15)
                if s ~= 0 then
                    k = k + r
                    coef[off + ZZ[k]] = lshift(extended(s), al)
                elseif r == 15 then
                    k = k + 15
                else
                    eobrun = lshift(1, r)
                    if r ~= 0 then eobrun = eobrun + bits(r) end
                    eobrun = eobrun - 1
                    break
                end
                k = k + 1
            end
        end
    else                                     -- AC, refinement (jdphuff.c's decode_mcu_AC_refine)
        local p1, m1 = lshift(1, al), lshift(-1, al)
        decode_block = function(c, off)
            local coef, ac, k = c.comp.coef, c.ac, ss
            if eobrun == 0 then
                while k <= se do
                    local rs = huff(ac)
                    local r, s = rshift(rs, 4), band(rs, 15)
                    if s ~= 0 then           -- a new coefficient of magnitude 1 (s should be 1)
                        s = bits(1) ~= 0 and p1 or m1
                    elseif r ~= 15 then      -- an end-of-band run
                        eobrun = lshift(1, r)
                        if r ~= 0 then eobrun = eobrun + bits(r) end
                        break
                    end
                    -- skip r zero coefficients, refining the nonzero ones on the way
                    repeat
                        local idx = off + ZZ[k]
                        local v = coef[idx]
                        if v ~= 0 then
                            if bits(1) ~= 0 and band(v, p1) == 0 then
                                coef[idx] = v >= 0 and v + p1 or v + m1
                            end
                        else
                            r = r - 1
                            if r < 0 then break end
                        end
                        k = k + 1
                    until k > se
                    if s ~= 0 then coef[off + ZZ[k]] = s end
                    k = k + 1
                end
            end
            if eobrun > 0 then              -- in an end-of-band run: refine the nonzero ones only
                while k <= se do
                    local idx = off + ZZ[k]
                    local v = coef[idx]
                    if v ~= 0 and bits(1) ~= 0 and band(v, p1) == 0 then
                        coef[idx] = v >= 0 and v + p1 or v + m1
                    end
                    k = k + 1
                end
                eobrun = eobrun - 1
            end
        end
    end

    local function restart(rst_no)
        check_end("before restart marker " .. rst_no)
        bitbuf, bitcnt, pad = 0, 0, 0
        -- the buffered bytes all came before the marker: find it (skipping garbage, as libjpeg)
        while pos + 1 < n and not (p[pos] == 0xFF and p[pos + 1] ~= 0 and p[pos + 1] ~= 0xFF) do pos = pos + 1 end
        at_marker, at_end = false, false
        if pos + 1 >= n then
            at_marker, at_end = true, true
        elseif p[pos + 1] >= 0xD0 and p[pos + 1] <= 0xD7 then
            pos = pos + 2
        else
            at_marker = true              -- another marker: the interval's data is missing (zeros)
        end
        for i = 1, #sc do sc[i].pred = 0 end
        eobrun = 0
    end

    local left, rst_no = ri, 0            -- MCUs left in this restart interval
    if #sc == 1 then                      -- one component: its blocks one by one, no MCU padding
        local c = sc[1]
        local comp = c.comp
        local bw = comp.bw
        for by = 0, comp.nbh - 1 do
            for bx = 0, comp.nbw - 1 do
                if ri > 0 then
                    if left == 0 then restart(rst_no); rst_no, left = rst_no + 1, ri end
                    left = left - 1
                end
                decode_block(c, (by * bw + bx) * 64)
            end
        end
    else                                  -- interleaved: MCUs of h x v blocks of each component
        for my = 0, frame.mcuy - 1 do
            for mx = 0, frame.mcux - 1 do
                if ri > 0 then
                    if left == 0 then restart(rst_no); rst_no, left = rst_no + 1, ri end
                    left = left - 1
                end
                for i = 1, #sc do
                    local c = sc[i]
                    local comp = c.comp
                    local h, v, bw = comp.h, comp.v, comp.bw
                    for yy = 0, v - 1 do
                        local row = (my * v + yy) * bw + mx * h
                        for xx = 0, h - 1 do decode_block(c, (row + xx) * 64) end
                    end
                end
            end
        end
    end
    check_end("its last MCU")
    return pos
end

-- ==== upsampling (jdsample.c with fancy upsampling) ====

-- A component's samples (plane, row stride ps, dw x dh real samples) at full size: returns a
-- buffer and its row stride, covering at least W x H.
local function upsample(plane, ps, dw, dh, hs, vs, W, H)
    if hs == 1 and vs == 1 then return plane, ps end
    local os = dw * hs
    local out = ffi.new("uint8_t[?]", os * H + 8)
    if hs == 2 and vs == 1 and dw > 2 then                    -- h2v1 fancy
        for y = 0, H - 1 do
            local s, o = y * ps, y * os
            local prev, cur = plane[s], plane[s]
            for i = 0, dw - 1 do
                local nxt = plane[s + (i < dw - 1 and i + 1 or i)]
                local c3 = cur * 3
                out[o + 2 * i] = rshift(c3 + prev + 1, 2)
                out[o + 2 * i + 1] = rshift(c3 + nxt + 2, 2)
                prev, cur = cur, nxt
            end
        end
    elseif hs == 1 and vs == 2 then                           -- h1v2 fancy (4:4:0)
        for y = 0, H - 1 do
            local r = rshift(y, 1)
            local r1, bias
            if band(y, 1) == 0 then r1, bias = (r > 0 and r - 1 or 0), 1
            else r1, bias = (r < dh - 1 and r + 1 or dh - 1), 2 end
            local s0, s1, o = r * ps, r1 * ps, y * os
            for x = 0, dw - 1 do out[o + x] = rshift(plane[s0 + x] * 3 + plane[s1 + x] + bias, 2) end
        end
    elseif hs == 2 and vs == 2 and dw > 2 then                -- h2v2 fancy
        for y = 0, H - 1 do
            local r = rshift(y, 1)
            local r1 = band(y, 1) == 0 and (r > 0 and r - 1 or 0) or (r < dh - 1 and r + 1 or dh - 1)
            local s0, s1, o = r * ps, r1 * ps, y * os
            local cur = plane[s0] * 3 + plane[s1]
            local prev = cur
            for i = 0, dw - 1 do
                local nxt = cur
                if i < dw - 1 then nxt = plane[s0 + i + 1] * 3 + plane[s1 + i + 1] end
                local c3 = cur * 3
                out[o + 2 * i] = rshift(c3 + prev + 8, 4)
                out[o + 2 * i + 1] = rshift(c3 + nxt + 7, 4)
                prev, cur = cur, nxt
            end
        end
    else                                                      -- replication (box), any integer ratio
        for y = 0, H - 1 do
            local s, o = math.floor(y / vs) * ps, y * os
            for i = 0, dw - 1 do
                local v = plane[s + i]
                for j = 0, hs - 1 do out[o + i * hs + j] = v end
            end
        end
    end
    return out, os
end

-- ==== the file ====

local function u16(p, i) return p[i] * 256 + p[i + 1] end

local SOF_NAMES = {[0xC3] = "lossless (SOF3)", [0xC5] = "hierarchical differential sequential (SOF5)",
    [0xC6] = "hierarchical differential progressive (SOF6)", [0xC7] = "hierarchical differential lossless (SOF7)",
    [0xC9] = "arithmetic-coded sequential (SOF9)", [0xCA] = "arithmetic-coded progressive (SOF10)",
    [0xCB] = "arithmetic-coded lossless (SOF11)", [0xCC] = "arithmetic-coded (it has a DAC segment)",
    [0xCD] = "arithmetic-coded differential sequential (SOF13)",
    [0xCE] = "arithmetic-coded differential progressive (SOF14)",
    [0xCF] = "arithmetic-coded differential lossless (SOF15)"}

local function decode(s, who)
    local function fail(fmt, ...) error(who .. ": " .. string.format(fmt, ...), 0) end
    local n = #s
    local p = ffi.cast("const uint8_t *", s)
    if n < 2 or p[0] ~= 0xFF or p[1] ~= 0xD8 then
        fail("not a JPEG file (expected the SOI marker FF D8 at the start, got %s)",
            n >= 2 and string.format("%02X %02X", p[0], p[1]) or (n .. " bytes"))
    end
    local pos = 2
    local qts, dcs, acs = {}, {}, {}
    local frame, ri, jfif, adobe = nil, 0, false, nil
    local scans = 0
    while true do
        -- the next marker: skip anything that is not FF (garbage, as libjpeg), then FF fill bytes
        while pos < n and p[pos] ~= 0xFF do pos = pos + 1 end
        while pos < n and p[pos] == 0xFF do pos = pos + 1 end
        if pos >= n then
            local complete = frame and not frame.progressive and scans > 0
            if complete then for _, c in ipairs(frame.comps) do complete = complete and c.qt ~= nil end end
            if complete then break end   -- a sequential file that only lacks its EOI marker
            fail("truncated: the data ends before the EOI marker (after %d scan%s)", scans, scans == 1 and "" or "s")
        end
        local m = p[pos]
        pos = pos + 1
        if m == 0xD9 then break end                                   -- EOI
        if m == 0xD8 then fail("a second SOI marker at byte %d", pos - 2) end
        if m ~= 0 and m ~= 0x01 and not (m >= 0xD0 and m <= 0xD7) then    -- not FF 00, TEM or RSTn
            if pos + 2 > n then fail("truncated: the data ends inside the marker FF %02X", m) end
            local len = u16(p, pos)
            if len < 2 then fail("bad length %d of the segment FF %02X at byte %d", len, m, pos - 2) end
            if pos + len > n then
                fail("truncated: the segment FF %02X at byte %d needs %d bytes, %d are left", m, pos - 2, len, n - pos)
            end
            local a, e = pos + 2, pos + len                          -- the payload: [a, e)
            pos = e
            if SOF_NAMES[m] then
                fail("%s JPEG files are not supported (only baseline, extended sequential and progressive " ..
                    "Huffman-coded ones)", SOF_NAMES[m])
            elseif m == 0xC0 or m == 0xC1 or m == 0xC2 then           -- SOF0/1/2: the frame header
                if frame then fail("a second frame header (SOF) at byte %d", a - 4) end
                if e - a < 6 then fail("bad frame header (SOF): %d bytes", e - a) end
                local precision, H, W, nf = p[a], u16(p, a + 1), u16(p, a + 3), p[a + 5]
                if precision ~= 8 then
                    fail("%d-bit samples are not supported (only 8-bit JPEG files are)", precision)
                end
                if nf == 4 then fail("4-component (CMYK or YCCK) JPEG files are not supported (only gray and 3-component)") end
                if nf ~= 1 and nf ~= 3 then fail("%d-component JPEG files are not supported (only 1 or 3)", nf) end
                if e - a < 6 + 3 * nf then fail("bad frame header (SOF): %d bytes for %d components", e - a, nf) end
                if W == 0 then fail("bad frame header (SOF): width 0") end
                if H == 0 then fail("a height given by a DNL marker (0 in the frame header) is not supported") end
                if W * H > 2 ^ 28 then fail("%d x %d pixels is more than this decoder takes (2^28)", W, H) end
                frame = {width = W, height = H, progressive = m == 0xC2, comps = {}}
                local maxh, maxv = 1, 1
                for i = 0, nf - 1 do
                    local b = a + 6 + 3 * i
                    local c = {id = p[b], h = rshift(p[b + 1], 4), v = band(p[b + 1], 15), tq = p[b + 2]}
                    if c.h < 1 or c.h > 4 or c.v < 1 or c.v > 4 then
                        fail("bad sampling factors %dx%d of component %d (expected 1..4)", c.h, c.v, i + 1)
                    end
                    if c.tq > 3 then fail("bad quantization table number %d of component %d", c.tq, i + 1) end
                    maxh, maxv = math.max(maxh, c.h), math.max(maxv, c.v)
                    frame.comps[i + 1] = c
                end
                frame.maxh, frame.maxv = maxh, maxv
                frame.mcux, frame.mcuy = math.ceil(W / (8 * maxh)), math.ceil(H / (8 * maxv))
                for i, c in ipairs(frame.comps) do
                    if maxh % c.h ~= 0 or maxv % c.v ~= 0 then
                        fail("sampling factors %dx%d of component %d against a largest %dx%d (not an integer ratio) " ..
                            "are not supported", c.h, c.v, i, maxh, maxv)
                    end
                    c.dw, c.dh = math.ceil(W * c.h / maxh), math.ceil(H * c.v / maxv)   -- real samples
                    c.nbw, c.nbh = math.ceil(c.dw / 8), math.ceil(c.dh / 8)             -- blocks that hold them
                    c.bw, c.bh = frame.mcux * c.h, frame.mcuy * c.v                     -- with the MCU padding
                    c.coef = ffi.new("int16_t[?]", c.bw * c.bh * 64)
                end
            elseif m == 0xC4 then                                     -- DHT
                while a < e do
                    if a + 17 > e then fail("bad Huffman table segment (DHT): cut") end
                    local tc, th = rshift(p[a], 4), band(p[a], 15)
                    if tc > 1 or th > 3 then fail("bad Huffman table class/number %d/%d", tc, th) end
                    local counts, total = {}, 0
                    for l = 1, 16 do counts[l] = p[a + l]; total = total + counts[l] end
                    if total > 256 or a + 17 + total > e then fail("bad Huffman table segment (DHT): %d codes", total) end
                    local syms = {}
                    for k = 1, total do syms[k] = p[a + 16 + k] end
                    local what = (tc == 0 and "DC " or "AC ") .. th
                    ;(tc == 0 and dcs or acs)[th] = build_huffman(counts, syms, fail, what)
                    a = a + 17 + total
                end
            elseif m == 0xDB then                                     -- DQT
                while a < e do
                    local pq, tq = rshift(p[a], 4), band(p[a], 15)
                    if pq > 1 or tq > 3 then fail("bad quantization table precision/number %d/%d", pq, tq) end
                    if a + 1 + 64 * (pq + 1) > e then fail("bad quantization table segment (DQT): cut") end
                    local q = ffi.new("int32_t[64]")
                    for k = 0, 63 do
                        q[ZZ[k]] = pq == 0 and p[a + 1 + k] or u16(p, a + 1 + 2 * k)
                    end
                    qts[tq] = q
                    a = a + 1 + 64 * (pq + 1)
                end
            elseif m == 0xDD then                                     -- DRI
                if e - a < 2 then fail("bad restart interval segment (DRI)") end
                ri = u16(p, a)
            elseif m == 0xE0 then                                     -- APP0: JFIF means YCbCr
                if e - a >= 14 and ffi.string(p + a, 5) == "JFIF\0" then jfif = true end
            elseif m == 0xEE then                                     -- APP14: Adobe's color transform
                if e - a >= 12 and ffi.string(p + a, 5) == "Adobe" then adobe = p[a + 11] end
            elseif m == 0xDA then                                     -- SOS: a scan
                if not frame then fail("a scan (SOS) before the frame header (SOF)") end
                local ns = p[a]
                if ns < 1 or ns > 4 or e - a < 4 + 2 * ns then fail("bad scan header (SOS)") end
                local sc = {}
                for i = 0, ns - 1 do
                    local id, t = p[a + 1 + 2 * i], p[a + 2 + 2 * i]
                    local comp
                    for _, c in ipairs(frame.comps) do if c.id == id then comp = c end end
                    if not comp then fail("scan %d names component id %d, which the frame lacks", scans + 1, id) end
                    sc[i + 1] = {comp = comp, td = rshift(t, 4), ta = band(t, 15), pred = 0}
                end
                local b = a + 1 + 2 * ns
                local ss, se, ah, al = p[b], p[b + 1], rshift(p[b + 2], 4), band(p[b + 2], 15)
                if frame.progressive then
                    if (ss == 0 and se ~= 0) or (ss > 0 and (ns ~= 1 or se < ss or se > 63)) or al > 13 then
                        fail("bad progressive scan %d: spectral band %d..%d, %d components, Al %d", scans + 1, ss, se, ns, al)
                    end
                else
                    ss, se, ah, al = 0, 63, 0, 0
                end
                for _, c in ipairs(sc) do
                    local comp = c.comp
                    if not comp.qt then      -- latched at the component's first scan, as libjpeg
                        comp.qt = qts[comp.tq] or fail("quantization table %d is not defined", comp.tq)
                    end
                    if ss == 0 and ah == 0 then
                        c.dc = dcs[c.td] or (c.td <= 1 and std_table("DC", c.td, fail)) or
                            fail("Huffman table DC %d is not defined", c.td)
                    end
                    if se > 0 then
                        c.ac = acs[c.ta] or (c.ta <= 1 and std_table("AC", c.ta, fail)) or
                            fail("Huffman table AC %d is not defined", c.ta)
                    end
                end
                scans = scans + 1
                pos = decode_scan(p, n, e, frame, sc, ss, se, ah, al, ri, fail, scans)
            end
            -- anything else (APPn, COM, DNL, JPGn, ...) is skipped
        end
    end
    if not frame then fail("no frame header (SOF) before the EOI marker") end
    if scans == 0 then fail("no scan (SOS) before the EOI marker") end

    -- the samples of each component
    local W, H = frame.width, frame.height
    local bufs, strides = {}, {}
    for i, c in ipairs(frame.comps) do
        local ps = c.nbw * 8
        local plane = ffi.new("uint8_t[?]", ps * c.nbh * 8)
        local q = c.qt or qts[c.tq]
        if q then
            local coef, bw = c.coef, c.bw
            for by = 0, c.nbh - 1 do
                for bx = 0, c.nbw - 1 do
                    idct_islow(coef, (by * bw + bx) * 64, q, plane, by * 8 * ps + bx * 8, ps)
                end
            end
        else
            ffi.fill(plane, ps * c.nbh * 8, 128)   -- a component no scan carried
        end
        bufs[i], strides[i] = upsample(plane, ps, c.dw, c.dh, frame.maxh / c.h, frame.maxv / c.v, W, H)
    end

    if #frame.comps == 1 then
        local b, st = bufs[1], strides[1]
        if st == W then return {width = W, height = H, channels = 1, pixels = ffi.string(b, W * H)} end
        local out = ffi.new("uint8_t[?]", W * H)
        for y = 0, H - 1 do ffi.copy(out + y * W, b + y * st, W) end
        return {width = W, height = H, channels = 1, pixels = ffi.string(out, W * H)}
    end
    local rgb
    if jfif then rgb = false
    elseif adobe ~= nil then rgb = adobe == 0
    else
        local c = frame.comps
        rgb = c[1].id == 82 and c[2].id == 71 and c[3].id == 66   -- 'R', 'G', 'B'
    end
    local out = ffi.new("uint8_t[?]", W * H * 3)
    local b0, b1, b2 = bufs[1], bufs[2], bufs[3]
    local s0, s1, s2 = strides[1], strides[2], strides[3]
    for y = 0, H - 1 do
        local o, r0, r1, r2 = y * W * 3, y * s0, y * s1, y * s2
        if rgb then
            for x = 0, W - 1 do
                out[o], out[o + 1], out[o + 2] = b0[r0 + x], b1[r1 + x], b2[r2 + x]
                o = o + 3
            end
        else
            for x = 0, W - 1 do
                local yy, cb, cr = b0[r0 + x] + 384, b1[r1 + x], b2[r2 + x]
                out[o] = CLAMP[yy + CR_R[cr]]
                out[o + 1] = CLAMP[yy + arshift(CB_G[cb] + CR_G[cr], 16)]
                out[o + 2] = CLAMP[yy + CB_B[cb]]
                o = o + 3
            end
        end
    end
    return {width = W, height = H, channels = 3, pixels = ffi.string(out, W * H * 3)}
end

-- decode(bytes [, name]): see the header
function M.decode(bytes, name)
    if type(bytes) ~= "string" then error("jpeg.decode: expected a string of JPEG bytes, got " .. type(bytes), 2) end
    local ok, res = pcall(decode, bytes, name and ("jpeg.decode: '" .. tostring(name) .. "'") or "jpeg.decode")
    if not ok then error(res, 2) end
    return res
end

-- read(path): see the header
function M.read(path)
    local f, err = io.open(path, "rb")
    if not f then error("jpeg.read: cannot read '" .. tostring(path) .. "': " .. tostring(err), 2) end
    local s = f:read("*a")
    f:close()
    local ok, res = pcall(decode, s, "jpeg.read: '" .. path .. "'")
    if not ok then error(res, 2) end
    return res
end

return M
