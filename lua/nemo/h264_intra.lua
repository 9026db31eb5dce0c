-- lua/nemo/h264_intra.lua: H.264 slices that compress (nemo.mp4's default). I slices: every
-- macroblock Intra_16x16 (vertical, horizontal or DC prediction of the luma, whichever is closest;
-- DC prediction of the chroma). P slices (from the previous decoded picture): every macroblock
-- P_Skip, P_L0_16x16 (quarter-sample motion: diamonds of two and one samples from the best of
-- the skip, predicted and zero vectors, then the eight half and the eight quarter samples around;
-- the half samples come from planes of the reference interpolated once per picture, the quarter
-- samples are their means) or Intra_16x16. The 4x4 integer transform, flat quantization at one QP, CAVLC. The encoder
-- reconstructs each macroblock exactly as a decoder does (ITU-T H.264 8.3.3, 8.3.4, 8.4.1 -
-- 8.4.2, 8.5.10 - 8.5.12), so predictions come from the decoded pictures and nothing drifts.
--
--   local rbsp, RY, RCb, RCr = require("nemo.h264_intra").slice_rbsp(Y, Cb, Cr, mbw, mbh, qp, header[, ref])
--
-- Y: (16 mbw) x (16 mbh) bytes, Cb / Cr: (8 mbw) x (8 mbh), row-major (padded planes, nemo.mp4);
-- ref = {Y =, Cb =, Cr =}: the previous decoded picture (RY, RCb, RCr of its slice) for a P slice.
-- The slice header is nemo.mp4's, with slice_qp_delta = qp - 26 and the deblocking filter on
-- when slice_rbsp's deblock is (M.deblock filters the decoded planes as a decoder does, 8.7).
-- qp in 0..51, lower is better and larger; the chroma's QP follows Table 8-15 (equal up to 29).
local ffi = require "ffi"
local bit = require "bit"

local M = {}

local band, rshift, lshift, arshift = bit.band, bit.rshift, bit.lshift, bit.arshift
local abs = math.abs

-- ==== CAVLC tables (ITU-T H.264 Tables 9-5, 9-7, 9-8, 9-9, 9-10), as lengths and code values ====

local COEFF_TOKEN_LEN = {
    {1, 0, 0, 0, 6, 2, 0, 0, 8, 6, 3, 0, 9, 8, 7, 5, 10, 9, 8, 6, 11, 10, 9, 7, 13, 11, 10, 8, 13, 13, 11, 9,
     13, 13, 13, 10, 14, 14, 13, 11, 14, 14, 14, 13, 15, 15, 14, 14, 15, 15, 15, 14, 16, 15, 15, 15, 16, 16, 16, 15,
     16, 16, 16, 16, 16, 16, 16, 16},
    {2, 0, 0, 0, 6, 2, 0, 0, 6, 5, 3, 0, 7, 6, 6, 4, 8, 6, 6, 4, 8, 7, 7, 5, 9, 8, 8, 6, 11, 9, 9, 6,
     11, 11, 11, 7, 12, 11, 11, 9, 12, 12, 12, 11, 12, 12, 12, 11, 13, 13, 13, 12, 13, 13, 13, 13, 13, 14, 13, 13,
     14, 14, 14, 13, 14, 14, 14, 14},
    {4, 0, 0, 0, 6, 4, 0, 0, 6, 5, 4, 0, 6, 5, 5, 4, 7, 5, 5, 4, 7, 5, 5, 4, 7, 6, 6, 4, 7, 6, 6, 4,
     8, 7, 7, 5, 8, 8, 7, 6, 9, 8, 8, 7, 9, 9, 8, 8, 9, 9, 9, 8, 10, 9, 9, 9, 10, 10, 10, 10,
     10, 10, 10, 10, 10, 10, 10, 10},
}
local COEFF_TOKEN_BITS = {
    {1, 0, 0, 0, 5, 1, 0, 0, 7, 4, 1, 0, 7, 6, 5, 3, 7, 6, 5, 3, 7, 6, 5, 4, 15, 6, 5, 4, 11, 14, 5, 4,
     8, 10, 13, 4, 15, 14, 9, 4, 11, 10, 13, 12, 15, 14, 9, 12, 11, 10, 13, 8, 15, 1, 9, 12, 11, 14, 13, 8,
     7, 10, 9, 12, 4, 6, 5, 8},
    {3, 0, 0, 0, 11, 2, 0, 0, 7, 7, 3, 0, 7, 10, 9, 5, 7, 6, 5, 4, 4, 6, 5, 6, 7, 6, 5, 8, 15, 6, 5, 4,
     11, 14, 13, 4, 15, 10, 9, 4, 11, 14, 13, 12, 8, 10, 9, 8, 15, 14, 13, 12, 11, 10, 9, 12, 7, 11, 6, 8,
     9, 8, 10, 1, 7, 6, 5, 4},
    {15, 0, 0, 0, 15, 14, 0, 0, 11, 15, 13, 0, 8, 12, 14, 12, 15, 10, 11, 11, 11, 8, 9, 10, 9, 14, 13, 9,
     8, 10, 9, 8, 15, 14, 13, 13, 11, 14, 10, 12, 15, 10, 13, 12, 11, 14, 9, 12, 8, 10, 13, 8, 13, 7, 9, 12,
     9, 12, 11, 10, 5, 8, 7, 6, 1, 4, 3, 2},
}
local CHROMA_DC_TOKEN_LEN = {2, 0, 0, 0, 6, 1, 0, 0, 6, 6, 3, 0, 6, 7, 7, 6, 6, 8, 8, 7}
local CHROMA_DC_TOKEN_BITS = {1, 0, 0, 0, 7, 1, 0, 0, 4, 6, 1, 0, 3, 3, 2, 5, 2, 3, 2, 0}
local TOTAL_ZEROS_LEN = {
    {1, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 9}, {3, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 6, 6, 6, 6},
    {4, 3, 3, 3, 4, 4, 3, 3, 4, 5, 5, 6, 5, 6}, {5, 3, 4, 4, 3, 3, 3, 4, 3, 4, 5, 5, 5},
    {4, 4, 4, 3, 3, 3, 3, 3, 4, 5, 4, 5}, {6, 5, 3, 3, 3, 3, 3, 3, 4, 3, 6}, {6, 5, 3, 3, 3, 2, 3, 4, 3, 6},
    {6, 4, 5, 3, 2, 2, 3, 3, 6}, {6, 6, 4, 2, 2, 3, 2, 5}, {5, 5, 3, 2, 2, 2, 4}, {4, 4, 3, 3, 1, 3},
    {4, 4, 2, 1, 3}, {3, 3, 1, 2}, {2, 2, 1}, {1, 1},
}
local TOTAL_ZEROS_BITS = {
    {1, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 1}, {7, 6, 5, 4, 3, 5, 4, 3, 2, 3, 2, 3, 2, 1, 0},
    {5, 7, 6, 5, 4, 3, 4, 3, 2, 3, 2, 1, 1, 0}, {3, 7, 5, 4, 6, 5, 4, 3, 3, 2, 2, 1, 0},
    {5, 4, 3, 7, 6, 5, 4, 3, 2, 1, 1, 0}, {1, 1, 7, 6, 5, 4, 3, 2, 1, 1, 0}, {1, 1, 5, 4, 3, 3, 2, 1, 1, 0},
    {1, 1, 1, 3, 3, 2, 2, 1, 0}, {1, 0, 1, 3, 2, 1, 1, 1}, {1, 0, 1, 3, 2, 1, 1}, {0, 1, 1, 2, 1, 3},
    {0, 1, 1, 1, 1}, {0, 1, 1, 1}, {0, 1, 1}, {0, 1},
}
local CHROMA_DC_ZEROS_LEN = {{1, 2, 3, 3}, {1, 2, 2}, {1, 1}}
local CHROMA_DC_ZEROS_BITS = {{1, 1, 1, 0}, {1, 1, 0}, {1, 0}}
local RUN_LEN = {{1, 1}, {1, 2, 2}, {2, 2, 2, 2}, {2, 2, 2, 3, 3}, {2, 2, 3, 3, 3, 3}, {2, 3, 3, 3, 3, 3, 3},
                 {3, 3, 3, 3, 3, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11}}
local RUN_BITS = {{1, 0}, {1, 1, 0}, {3, 2, 1, 0}, {3, 2, 1, 1, 0}, {3, 2, 3, 2, 1, 0}, {3, 0, 1, 3, 2, 5, 4},
                  {7, 6, 5, 4, 3, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1}}

-- zig-zag scan of a 4x4 block (frame macroblocks): scan index -> row * 4 + column
local ZIGZAG = {0, 1, 4, 8, 5, 2, 3, 6, 9, 12, 13, 10, 7, 11, 14, 15}

-- quantization (forward, encoder's choice) and LevelScale (decoder, flat matrices: 16 x v)
local MF = {{13107, 5243, 8066}, {11916, 4660, 7490}, {10082, 4194, 6554}, {9362, 3647, 5825}, {8192, 3355, 5243},
            {7282, 2893, 4559}}
local V = {{10, 16, 13}, {11, 18, 14}, {13, 20, 16}, {14, 23, 18}, {16, 25, 20}, {18, 29, 23}}
local function pos_class(k)   -- k = row * 4 + col
    local r, c = rshift(k, 2), band(k, 3)
    if r % 2 == 0 and c % 2 == 0 then return 1 end
    if r % 2 == 1 and c % 2 == 1 then return 2 end
    return 3
end
local CLASS = {}
for k = 0, 15 do CLASS[k] = pos_class(k) end

-- ==== the bit writer (the slices' and nemo.mp4's parameter sets) ====

-- writer() -> w: w.u(nbits, v), w.ue(v) / w.se(v) (Exp-Golomb), w.align_zero(), w.trailing()
-- (rbsp_trailing_bits), w.string() (the whole bytes so far)
local function writer()
    local buf = ffi.new("uint8_t[?]", 65536)
    local w = {cap = 65536, len = 0, cur = 0, n = 0}
    local function put(byte)
        if w.len == w.cap then
            local nb = ffi.new("uint8_t[?]", w.cap * 2)
            ffi.copy(nb, buf, w.len)
            buf, w.cap = nb, w.cap * 2
        end
        buf[w.len] = byte
        w.len = w.len + 1
    end
    function w.u(nbits, v)
        for i = nbits - 1, 0, -1 do
            w.cur = w.cur * 2 + band(rshift(v, i), 1)
            w.n = w.n + 1
            if w.n == 8 then put(w.cur); w.cur, w.n = 0, 0 end
        end
    end
    function w.ue(v)
        local x = v + 1
        local len = 0
        while rshift(x, len + 1) > 0 do len = len + 1 end
        w.u(len, 0)
        w.u(len + 1, x)
    end
    function w.se(v) w.ue(v > 0 and 2 * v - 1 or -2 * v) end
    function w.align_zero() while w.n ~= 0 do w.u(1, 0) end end
    function w.trailing() w.u(1, 1); w.align_zero() end
    function w.string() return ffi.string(buf, w.len) end
    return w
end
M.writer = writer

-- ==== residual_block_cavlc (7.3.5.3.2, 9.2) ====

-- coeffs: Lua array [1..maxn] in scan order; nC: the coeff_token context (-1: chroma DC).
-- Returns TotalCoeff.
local idx, lev = {}, {}   -- scratch: positions and values of the non-zero coefficients, last first
local function residual_block(w, coeffs, maxn, nC)
    local total = 0
    for i = maxn, 1, -1 do
        local c = coeffs[i]
        if c ~= 0 then total = total + 1; idx[total] = i; lev[total] = c end
    end
    local t1 = 0
    for i = 1, math.min(3, total) do
        if lev[i] == 1 or lev[i] == -1 then t1 = t1 + 1 else break end
    end
    local k = 4 * total + t1 + 1
    if nC == -1 then
        w.u(CHROMA_DC_TOKEN_LEN[k], CHROMA_DC_TOKEN_BITS[k])
    elseif nC >= 8 then
        w.u(6, total == 0 and 3 or (lshift(total - 1, 2) + t1))   -- a 6-bit fixed-length code
    else
        local t = nC < 2 and 1 or nC < 4 and 2 or 3
        w.u(COEFF_TOKEN_LEN[t][k], COEFF_TOKEN_BITS[t][k])
    end
    if total == 0 then return 0 end
    for i = 1, t1 do w.u(1, lev[i] < 0 and 1 or 0) end
    local sl = (total > 10 and t1 < 3) and 1 or 0
    for i = t1 + 1, total do
        local v = lev[i]
        local code = v > 0 and 2 * v - 2 or -2 * v - 1
        if i == t1 + 1 and t1 < 3 then code = code - 2 end
        if sl == 0 then
            if code < 14 then
                w.u(code + 1, 1)
            elseif code < 30 then
                w.u(15, 1); w.u(4, code - 14)
            else
                w.u(16, 1); w.u(12, code - 30)
            end
        else
            if code < lshift(15, sl) then
                w.u(rshift(code, sl) + 1, 1); w.u(sl, band(code, lshift(1, sl) - 1))
            else
                w.u(16, 1); w.u(12, code - lshift(15, sl))
            end
        end
        if sl == 0 then sl = 1 end
        if math.abs(v) > lshift(3, sl - 1) and sl < 6 then sl = sl + 1 end
    end
    if total < maxn then
        local zeros = idx[1] - total            -- zeros below the last non-zero coefficient
        if nC == -1 then
            w.u(CHROMA_DC_ZEROS_LEN[total][zeros + 1], CHROMA_DC_ZEROS_BITS[total][zeros + 1])
        else
            w.u(TOTAL_ZEROS_LEN[total][zeros + 1], TOTAL_ZEROS_BITS[total][zeros + 1])
        end
        local left = zeros
        for i = 1, total - 1 do
            if left <= 0 then break end
            local run = idx[i] - idx[i + 1] - 1
            local t = math.min(left, 7)
            w.u(RUN_LEN[t][run + 1], RUN_BITS[t][run + 1])
            left = left - run
        end
    end
    return total
end

-- ==== transforms ====

-- forward core transform of a 4x4 residual (int array [0..15], row-major) into out
local T16 = ffi.new("int32_t[16]")
local function fdct(r, out)
    local t = T16
    for i = 0, 3 do
        local a, b, c, d = r[i * 4], r[i * 4 + 1], r[i * 4 + 2], r[i * 4 + 3]
        local s0, s1, d0, d1 = a + d, b + c, a - d, b - c
        t[i * 4], t[i * 4 + 1], t[i * 4 + 2], t[i * 4 + 3] = s0 + s1, 2 * d0 + d1, s0 - s1, d0 - 2 * d1
    end
    for j = 0, 3 do
        local a, b, c, d = t[j], t[4 + j], t[8 + j], t[12 + j]
        local s0, s1, d0, d1 = a + d, b + c, a - d, b - c
        out[j], out[4 + j], out[8 + j], out[12 + j] = s0 + s1, 2 * d0 + d1, s0 - s1, d0 - 2 * d1
    end
end

-- the decoder's inverse transform (8.5.12.2) of scaled coefficients d[0..15] into residuals r
local F16 = ffi.new("int32_t[16]")
local function idct(d, r)
    local f = F16
    for i = 0, 3 do
        local d0, d1, d2, d3 = d[i * 4], d[i * 4 + 1], d[i * 4 + 2], d[i * 4 + 3]
        local e0, e1, e2, e3 = d0 + d2, d0 - d2, arshift(d1, 1) - d3, d1 + arshift(d3, 1)
        f[i * 4], f[i * 4 + 1], f[i * 4 + 2], f[i * 4 + 3] = e0 + e3, e1 + e2, e1 - e2, e0 - e3
    end
    for j = 0, 3 do
        local f0, f1, f2, f3 = f[j], f[4 + j], f[8 + j], f[12 + j]
        local g0, g1, g2, g3 = f0 + f2, f0 - f2, arshift(f1, 1) - f3, f1 + arshift(f3, 1)
        r[j], r[4 + j], r[8 + j], r[12 + j] = arshift(g0 + g3 + 32, 6), arshift(g1 + g2 + 32, 6),
            arshift(g1 - g2 + 32, 6), arshift(g0 - g3 + 32, 6)
    end
end

local function quant(v, mf, qbits, f)
    if v >= 0 then return rshift(v * mf + f, qbits) end
    return -rshift(-v * mf + f, qbits)
end

-- scaling of a non-DC coefficient (8.5.12.1), qp < 24 here or not
local function scale_ac(c, k, qp)
    local ls = 16 * V[qp % 6 + 1][CLASS[k]]
    local q6 = math.floor(qp / 6)
    if qp >= 24 then return lshift(c * ls, q6 - 4) end
    return arshift(c * ls + lshift(1, 3 - q6), 4 - q6)
end

local function clip(v) if v < 0 then return 0 elseif v > 255 then return 255 end return v end

-- ==== one plane's macroblock part: prediction, residual, reconstruction ====

-- scratch of code_block: coefficients and AC levels per 4x4 block (luma 16 blocks, each chroma
-- plane 4), residuals
local function blocks(n, len) local t = {}; for b = 0, n - 1 do t[b] = ffi.new("int32_t[?]", len) end; return t end
local COEF_Y, COEF_C = blocks(16, 16), blocks(4, 16)
local AC_Y, AC_CB, AC_CR = blocks(16, 16), blocks(4, 16), blocks(4, 16)
local RES, D16, R16 = ffi.new("int32_t[16]"), ffi.new("int32_t[16]"), ffi.new("int32_t[16]")
local DCQ, WD, YD, DCS = ffi.new("int32_t[16]"), ffi.new("int32_t[16]"), ffi.new("int32_t[16]"), ffi.new("int32_t[16]")
-- the DC levels in scan order, [1..16] (luma) or [1..4] (each chroma plane)
local DCL_Y, DCL_CB, DCL_CR = ffi.new("int32_t[17]"), ffi.new("int32_t[17]"), ffi.new("int32_t[17]")

-- encode the residual of a (n x n, n = 16 or 8) block of plane P (stride S) at (x0, y0) against
-- prediction pred[0..n*n-1]; returns dc levels (4x4 or 2x2, scan order), the AC levels of each
-- 4x4 block (block raster order, 15 each, scan order 1..15), and reconstructs into R.
-- the 4x4 block (bx, by) of an n x n block at (x0, y0) of plane P (stride S) minus the prediction
-- pred[0..n*n-1], forward-transformed into out
local function fdct_block(P, S, x0, y0, pred, n, bx, by, out)
    local res = RES
    for y = 0, 3 do
        for x = 0, 3 do
            local px, py = bx * 4 + x, by * 4 + y
            res[y * 4 + x] = P[(y0 + py) * S + x0 + px] - pred[py * n + px]
        end
    end
    fdct(res, out)
end
-- levels[s - off] = the quantized coefficient c at scan position s, for s = first .. 16 (clamped
-- to CAVLC's +-2047); true when one is not zero
local function quant_scan(c, levels, first, off, mfrow, qbits, fq)
    local any = false
    for s = first, 16 do
        local k = ZIGZAG[s]
        local l = quant(c[k], mfrow[CLASS[k]], qbits, fq)
        if l > 2047 then l = 2047 elseif l < -2047 then l = -2047 end
        levels[s - off] = l
        if l ~= 0 then any = true end
    end
    return any
end
-- the decoder's side of block (bx, by): scaled coefficients d[0..15] inverse-transformed and
-- added to the prediction, clipped, into R
local function idct_add_block(R, S, x0, y0, pred, n, bx, by, d)
    local r = R16
    idct(d, r)
    for y = 0, 3 do
        for x = 0, 3 do
            local px, py = bx * 4 + x, by * 4 + y
            R[(y0 + py) * S + x0 + px] = clip(pred[py * n + px] + r[y * 4 + x])
        end
    end
end

local function code_block(P, R, S, x0, y0, n, pred, qp, ac, dcl)
    local nb = n / 4                         -- 4x4 blocks per side
    local q6, qbits = math.floor(qp / 6), 15 + math.floor(qp / 6)
    local fq = math.floor(lshift(1, qbits) / 3)
    local mfrow = MF[qp % 6 + 1]
    local coef = nb == 4 and COEF_Y or COEF_C     -- per block: 16 transform coefficients
    for by = 0, nb - 1 do
        for bx = 0, nb - 1 do fdct_block(P, S, x0, y0, pred, n, bx, by, coef[by * nb + bx]) end
    end
    -- DC: Hadamard of the blocks' DC terms, quantized (luma: 4x4, /2; chroma: 2x2)
    local dcq = DCQ
    local ndc = nb * nb
    local wd = WD
    for b = 0, ndc - 1 do wd[b] = coef[b][0] end
    local yd = YD
    if nb == 4 then
        local t = T16
        for i = 0, 3 do
            local a, b, c, d = wd[i * 4], wd[i * 4 + 1], wd[i * 4 + 2], wd[i * 4 + 3]
            t[i * 4], t[i * 4 + 1], t[i * 4 + 2], t[i * 4 + 3] = a + b + c + d, a + b - c - d, a - b - c + d, a - b + c - d
        end
        for j = 0, 3 do
            local a, b, c, d = t[j], t[4 + j], t[8 + j], t[12 + j]
            yd[j], yd[4 + j], yd[8 + j], yd[12 + j] = arshift(a + b + c + d, 1), arshift(a + b - c - d, 1),
                arshift(a - b - c + d, 1), arshift(a - b + c - d, 1)
        end
    else
        local a, b, c, d = wd[0], wd[1], wd[2], wd[3]
        yd[0], yd[1], yd[2], yd[3] = a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d
    end
    for k = 0, ndc - 1 do dcq[k] = quant(yd[k], mfrow[1], qbits + 1, 2 * fq) end
    -- the decoder's DC scaling (8.5.10 luma, 8.5.11.2 chroma 4:2:0)
    local dcs = DCS
    local ls0 = 16 * V[qp % 6 + 1][1]
    if nb == 4 then
        local t, f = T16, F16
        for i = 0, 3 do
            local a, b, c, d = dcq[i * 4], dcq[i * 4 + 1], dcq[i * 4 + 2], dcq[i * 4 + 3]
            t[i * 4], t[i * 4 + 1], t[i * 4 + 2], t[i * 4 + 3] = a + b + c + d, a + b - c - d, a - b - c + d, a - b + c - d
        end
        for j = 0, 3 do
            local a, b, c, d = t[j], t[4 + j], t[8 + j], t[12 + j]
            f[j], f[4 + j], f[8 + j], f[12 + j] = a + b + c + d, a + b - c - d, a - b - c + d, a - b + c - d
        end
        for k = 0, 15 do
            if qp >= 36 then dcs[k] = lshift(f[k] * ls0, q6 - 6)
            else dcs[k] = arshift(f[k] * ls0 + lshift(1, 5 - q6), 6 - q6) end
        end
    else
        local a, b, c, d = dcq[0], dcq[1], dcq[2], dcq[3]
        dcs[0], dcs[1] = arshift(lshift((a + b + c + d) * ls0, q6), 5), arshift(lshift((a - b + c - d) * ls0, q6), 5)
        dcs[2], dcs[3] = arshift(lshift((a + b - c - d) * ls0, q6), 5), arshift(lshift((a - b - c + d) * ls0, q6), 5)
    end
    -- AC levels, reconstruction
    local d = D16
    local any_ac = false
    for b = 0, ndc - 1 do
        if quant_scan(coef[b], ac[b], 2, 1, mfrow, qbits, fq) then any_ac = true end
    end
    for b = 0, ndc - 1 do
        d[0] = dcs[b]
        local levels = ac[b]
        for s = 2, 16 do
            local k = ZIGZAG[s]
            d[k] = scale_ac(levels[s - 1], k, qp)
        end
        idct_add_block(R, S, x0, y0, pred, n, b % nb, math.floor(b / nb), d)
    end
    -- the DC levels in scan order (luma: zig-zag of the 4x4 DC array; chroma: raster c00 c01 c10 c11)
    if nb == 4 then
        for s = 1, 16 do dcl[s] = dcq[ZIGZAG[s]] end
    else
        for s = 1, 4 do dcl[s] = dcq[s - 1] end
    end
    return dcl, ac, any_ac
end

-- Intra 16x16 luma predictions (8.3.3) from the reconstructed plane R: mode 0 vertical, 1
-- horizontal, 2 DC; nil when the mode's neighbours are missing.
local PRED = {[0] = ffi.new("int32_t[256]"), ffi.new("int32_t[256]"), ffi.new("int32_t[256]")}
local function luma_pred(R, S, x0, y0, mode, top, left)
    local p = PRED[mode]
    if mode == 0 then
        if not top then return nil end
        for y = 0, 15 do for x = 0, 15 do p[y * 16 + x] = R[(y0 - 1) * S + x0 + x] end end
    elseif mode == 1 then
        if not left then return nil end
        for y = 0, 15 do local v = R[(y0 + y) * S + x0 - 1]; for x = 0, 15 do p[y * 16 + x] = v end end
    else
        local v
        local st, sl = 0, 0
        if top then for x = 0, 15 do st = st + R[(y0 - 1) * S + x0 + x] end end
        if left then for y = 0, 15 do sl = sl + R[(y0 + y) * S + x0 - 1] end end
        if top and left then v = rshift(st + sl + 16, 5)
        elseif left then v = rshift(sl + 8, 4)
        elseif top then v = rshift(st + 8, 4)
        else v = 128 end
        for k = 0, 255 do p[k] = v end
    end
    return p
end

-- chroma DC prediction (8.3.4.1 - 8.3.4.3) of an 8x8 block, per 4x4 sub-block, into p
local CPRED_U, CPRED_V = ffi.new("int32_t[64]"), ffi.new("int32_t[64]")
local function chroma_pred(R, S, x0, y0, top, left, p)
    for cb = 0, 3 do
        local xo, yo = (cb % 2) * 4, math.floor(cb / 2) * 4
        local st, sl = 0, 0
        if top then for x = 0, 3 do st = st + R[(y0 - 1) * S + x0 + xo + x] end end
        if left then for y = 0, 3 do sl = sl + R[(y0 + yo + y) * S + x0 - 1] end end
        local v
        if (xo == 0 and yo == 0) or (xo > 0 and yo > 0) then
            if top and left then v = rshift(st + sl + 4, 3)
            elseif left then v = rshift(sl + 2, 2)
            elseif top then v = rshift(st + 2, 2)
            else v = 128 end
        elseif xo > 0 then   -- top right: the top row first
            if top then v = rshift(st + 2, 2) elseif left then v = rshift(sl + 2, 2) else v = 128 end
        else                 -- bottom left: the left column first
            if left then v = rshift(sl + 2, 2) elseif top then v = rshift(st + 2, 2) else v = 128 end
        end
        for y = 0, 3 do for x = 0, 3 do p[(yo + y) * 8 + xo + x] = v end end
    end
    return p
end

local function sad(P, S, x0, y0, p, n)
    local s = 0
    for y = 0, n - 1 do
        for x = 0, n - 1 do s = s + math.abs(P[(y0 + y) * S + x0 + x] - p[y * n + x]) end
    end
    return s
end

-- QPc for qPi = 30..51 (Table 8-15)
local QPC = {29, 30, 31, 32, 32, 33, 34, 34, 35, 35, 36, 36, 37, 37, 37, 38, 38, 38, 39, 39, 39, 39}

-- luma4x4BlkIdx -> block raster index (row * 4 + column) within the macroblock
local BLK_RASTER = {}
for blk = 0, 15 do
    local b8, b4 = math.floor(blk / 4), blk % 4
    local x = (b8 % 2) * 2 + (b4 % 2)
    local y = math.floor(b8 / 2) * 2 + math.floor(b4 / 2)
    BLK_RASTER[blk] = y * 4 + x
end

-- ==== inter prediction (P slices): one 16x16 partition per macroblock, whole-sample motion ====

-- coded_block_pattern -> codeNum of me(v) for inter macroblocks (Table 9-4, ChromaArrayType 1)
local INTER_CBP_CODE = {}
do
    local code_to_cbp = {0, 16, 1, 2, 4, 8, 32, 3, 5, 10, 12, 15, 47, 7, 11, 13, 14, 6, 9, 31, 35, 37, 42, 44, 33, 34,
                         36, 40, 39, 43, 45, 46, 17, 18, 20, 24, 19, 21, 26, 28, 23, 27, 29, 30, 22, 25, 38, 41}
    for code, cbp in ipairs(code_to_cbp) do INTER_CBP_CODE[cbp] = code - 1 end
end

-- the n x n block at (xs, ys) of plane F (w x h, stride w) into p, samples outside the picture
-- taken from its nearest edge (as the decoder clamps reference positions, 8.4.2.2)
local function mc_block(F, w, h, xs, ys, n, p)
    if xs >= 0 and ys >= 0 and xs + n <= w and ys + n <= h then
        for y = 0, n - 1 do
            local o, q = (ys + y) * w + xs, y * n
            for x = 0, n - 1 do p[q + x] = F[o + x] end
        end
    else
        for y = 0, n - 1 do
            local yy = ys + y
            if yy < 0 then yy = 0 elseif yy > h - 1 then yy = h - 1 end
            for x = 0, n - 1 do
                local xx = xs + x
                if xx < 0 then xx = 0 elseif xx > w - 1 then xx = w - 1 end
                p[y * n + x] = F[yy * w + xx]
            end
        end
    end
    return p
end

local NEIGHBOURS = {{1, 0}, {-1, 0}, {0, 1}, {0, -1}, {1, 1}, {1, -1}, {-1, 1}, {-1, -1}}
local SUB_STEPS = {2, 1}   -- the eight half, then the eight quarter samples around the best vector

-- The reference picture's luma at whole and half sample positions (8.4.2.2.1: G, b, h and j),
-- each a plane padded by PAD samples on every side with the values the decoder's clamping of
-- reference positions gives, so the search and motion compensation read any vector up to
-- PAD - 20 samples long without a branch (the search stays within 65).
local PAD = 96
local function tap6(a, b, c, d, e, f) return a - 5 * b + 20 * c + 20 * d - 5 * e + f end
local function ref_planes(F, w, h)
    local pw, ph = w + 2 * PAD, h + 2 * PAD
    local I, B = ffi.new("uint8_t[?]", pw * ph), ffi.new("uint8_t[?]", pw * ph)
    local V, J = ffi.new("uint8_t[?]", pw * ph), ffi.new("uint8_t[?]", pw * ph)
    local H1 = ffi.new("int32_t[?]", pw * ph)   -- h's unrounded sums, which j filters again
    for y = 0, ph - 1 do
        local sy = y - PAD
        if sy < 0 then sy = 0 elseif sy > h - 1 then sy = h - 1 end
        local row, o = sy * w, y * pw
        for x = 0, pw - 1 do
            local sx = x - PAD
            if sx < 0 then sx = 0 elseif sx > w - 1 then sx = w - 1 end
            I[o + x] = F[row + sx]
        end
    end
    for y = 2, ph - 4 do
        local o = y * pw
        for x = 0, pw - 1 do
            local k = o + x
            local s = tap6(I[k - 2 * pw], I[k - pw], I[k], I[k + pw], I[k + 2 * pw], I[k + 3 * pw])
            H1[k] = s
            V[k] = clip(arshift(s + 16, 5))
        end
    end
    for y = 0, ph - 1 do
        local o = y * pw
        for x = 2, pw - 4 do
            local k = o + x
            B[k] = clip(arshift(tap6(I[k - 2], I[k - 1], I[k], I[k + 1], I[k + 2], I[k + 3]) + 16, 5))
            if y >= 2 and y <= ph - 4 then
                J[k] = clip(arshift(tap6(H1[k - 2], H1[k - 1], H1[k], H1[k + 1], H1[k + 2], H1[k + 3]) + 512, 10))
            end
        end
    end
    return {[0] = I, B, V, J, pw = pw}
end

-- Where each quarter-sample position (x frac, y frac) of 8.4.2.2.1 comes from: one plane (G, b,
-- h, j) or the rounded mean of two ({plane, dx, dy} each: 0 = G, 1 = b, 2 = h, 3 = j), e.g.
-- a = (G + b + 1) >> 1, k = (j + m + 1) >> 1 with m the h of the next column.
local QPEL = {}
do
    local G, b, h, j = {0, 0, 0}, {1, 0, 0}, {2, 0, 0}, {3, 0, 0}
    local H, M, m, sh = {0, 1, 0}, {0, 0, 1}, {2, 1, 0}, {1, 0, 1}
    local t = {
        [0] = {{G}, {G, b}, {b}, {H, b}},           -- y frac 0: G a b c
        {{G, h}, {b, h}, {b, j}, {b, m}},           -- 1: d e f g
        {{h}, {h, j}, {j}, {j, m}},                 -- 2: h i j k
        {{M, h}, {h, sh}, {j, sh}, {m, sh}},        -- 3: n p q r
    }
    for fy = 0, 3 do for fx = 0, 3 do QPEL[fy * 4 + fx] = t[fy][fx + 1] end end
end
-- the plane(s) and index(es) of the prediction's top-left sample for the macroblock at (x0, y0)
-- and the motion vector (mvx, mvy) in quarter samples (the second plane nil: no mean)
local function plane_at(pl, x0, y0, mvx, mvy)
    local src = QPEL[band(mvy, 3) * 4 + band(mvx, 3)]
    local base = (y0 + arshift(mvy, 2) + PAD) * pl.pw + x0 + arshift(mvx, 2) + PAD
    local s1, s2 = src[1], src[2]
    local o1 = base + s1[3] * pl.pw + s1[2]
    if not s2 then return pl[s1[1]], o1 end
    return pl[s1[1]], o1, pl[s2[1]], base + s2[3] * pl.pw + s2[2]
end
-- the 16x16 luma prediction into p (8.4.2.2.1)
local function mc_luma(pl, x0, y0, mvx, mvy, p)
    local F, o, F2, o2 = plane_at(pl, x0, y0, mvx, mvy)
    local pw = pl.pw
    for y = 0, 15 do
        local q = o + y * pw
        if F2 then
            local q2 = o2 + y * pw
            for x = 0, 15 do p[y * 16 + x] = rshift(F[q + x] + F2[q2 + x] + 1, 1) end
        else
            for x = 0, 15 do p[y * 16 + x] = F[q + x] end
        end
    end
    return p
end
-- SAD of the 16x16 source block at (x0, y0) of P (stride S) against that prediction, stopping
-- once it passes limit
local function sad_luma(P, S, pl, x0, y0, mvx, mvy, limit)
    local F, o, F2, o2 = plane_at(pl, x0, y0, mvx, mvy)
    local pw = pl.pw
    local s = 0
    for y = 0, 15 do
        local a, q = (y0 + y) * S + x0, o + y * pw
        if F2 then
            local q2 = o2 + y * pw
            for x = 0, 15 do s = s + abs(P[a + x] - rshift(F[q + x] + F2[q2 + x] + 1, 1)) end
        else
            for x = 0, 15 do s = s + abs(P[a + x] - F[q + x]) end
        end
        if s >= limit then return s end
    end
    return s
end

local WIN = ffi.new("int32_t[9 * 9]")

-- the 8x8 chroma prediction of the macroblock whose chroma starts at (cx0, cy0) for the luma
-- motion vector (mvx, mvy) (eighth chroma samples, 8.4.2.2.2), into p
local function mc_chroma(F, w, h, cx0, cy0, mvx, mvy, p)
    local xi, yi = cx0 + arshift(mvx, 3), cy0 + arshift(mvy, 3)
    local fx, fy = band(mvx, 7), band(mvy, 7)
    if fx == 0 and fy == 0 then return mc_block(F, w, h, xi, yi, 8, p) end
    local W = mc_block(F, w, h, xi, yi, 9, WIN)   -- the 9 x 9 reference samples the means need
    local wa, wb, wc, wd = (8 - fx) * (8 - fy), fx * (8 - fy), (8 - fx) * fy, fx * fy
    for y = 0, 7 do
        for x = 0, 7 do
            local o = y * 9 + x
            p[y * 8 + x] = rshift(wa * W[o] + wb * W[o + 1] + wc * W[o + 9] + wd * W[o + 10] + 32, 6)
        end
    end
    return p
end

-- the number of bits of se(v)
local function se_bits(v)
    local x = (v > 0 and 2 * v - 1 or -2 * v) + 1
    local len = 0
    while rshift(x, len + 1) > 0 do len = len + 1 end
    return 2 * len + 1
end

-- the residual of a 16x16 luma block against pred with the 4x4 transform of every block (DC
-- included, inter macroblocks: 8.5.12): levels[b][1..16] in scan order per block raster index b,
-- the coded 8x8 quadrants as a bit mask (the luma part of coded_block_pattern); reconstructs R
local LEV = blocks(16, 17)
local function code_luma_inter(P, R, S, x0, y0, pred, qp, levels)
    local qbits = 15 + math.floor(qp / 6)
    local fq = math.floor(lshift(1, qbits) / 6)
    local mfrow = MF[qp % 6 + 1]
    local c, d = COEF_Y[0], D16
    local cbp = 0
    for b = 0, 15 do
        local bx, by = b % 4, math.floor(b / 4)
        fdct_block(P, S, x0, y0, pred, 16, bx, by, c)
        if quant_scan(c, levels[b], 1, 0, mfrow, qbits, fq) then
            cbp = bit.bor(cbp, lshift(1, math.floor(by / 2) * 2 + math.floor(bx / 2)))
        end
    end
    for b = 0, 15 do
        local bx, by = b % 4, math.floor(b / 4)
        local lv = levels[b]
        if band(cbp, lshift(1, math.floor(by / 2) * 2 + math.floor(bx / 2))) == 0 then
            for s = 1, 16 do lv[s] = 0 end   -- an uncoded quadrant has no residual at all
        end
        for s = 1, 16 do local k = ZIGZAG[s]; d[k] = scale_ac(lv[s], k, qp) end
        idct_add_block(R, S, x0, y0, pred, 16, bx, by, d)
    end
    return cbp
end

-- ==== the deblocking filter (8.7) ====

-- alpha' (Table 8-16, indexA 0..51), beta' (indexB) and tC0' (Table 8-17: [indexA][bS 1..3])
local ALPHA = {[0] = 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 5, 6, 7, 8, 9, 10, 12, 13, 15, 17, 20,
               22, 25, 28, 32, 36, 40, 45, 50, 56, 63, 71, 80, 90, 101, 113, 127, 144, 162, 182, 203, 226, 255, 255}
local BETA = {[0] = 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 6, 6, 7, 7, 8, 8,
              9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15, 16, 16, 17, 17, 18, 18}
local TC0 = {}
do
    local from17 = {{0, 0, 1}, {0, 0, 1}, {0, 0, 1}, {0, 0, 1}, {0, 1, 1}, {0, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1},
        {1, 1, 1}, {1, 1, 2}, {1, 1, 2}, {1, 1, 2}, {1, 1, 2}, {1, 2, 3}, {1, 2, 3}, {2, 2, 3}, {2, 2, 4}, {2, 3, 4},
        {2, 3, 4}, {3, 3, 5}, {3, 4, 6}, {3, 4, 6}, {4, 5, 7}, {4, 5, 8}, {4, 6, 9}, {5, 7, 10}, {6, 8, 11},
        {6, 8, 13}, {7, 10, 14}, {8, 11, 16}, {9, 12, 18}, {10, 13, 20}, {11, 15, 23}, {13, 17, 25}}
    for i = 0, 51 do TC0[i] = i < 17 and {0, 0, 0} or from17[i - 16] end
end

local function clip3(lo, hi, v) if v < lo then return lo elseif v > hi then return hi end return v end

-- filter the n lines (16 luma, 8 chroma) of one edge of plane P (8.7.2.3, 8.7.2.4): q0 of line i
-- at pos + i * ys, p0 at q0 - xs; bs[0..3] the boundary strengths of the four groups of n / 4
-- lines; alpha, beta and tc0 (the row of TC0) from the edge's QP
local function filter_edge(P, pos, xs, ys, n, bs, alpha, beta, tc0, luma)
    local per = n / 4
    for i = 0, n - 1 do
        local b = bs[math.floor(i / per)]
        if b > 0 then
            local q = pos + i * ys
            local p0, p1, q0, q1 = P[q - xs], P[q - 2 * xs], P[q], P[q + xs]
            if abs(p0 - q0) < alpha and abs(p1 - p0) < beta and abs(q1 - q0) < beta then
                if b < 4 then
                    local c0 = tc0[b]
                    local tc
                    local p2, q2, ap, aq
                    if luma then
                        p2, q2 = P[q - 3 * xs], P[q + 2 * xs]
                        ap, aq = abs(p2 - p0), abs(q2 - q0)
                        tc = c0 + (ap < beta and 1 or 0) + (aq < beta and 1 or 0)
                    else
                        tc = c0 + 1
                    end
                    local d = clip3(-tc, tc, arshift(lshift(q0 - p0, 2) + (p1 - q1) + 4, 3))
                    P[q - xs], P[q] = clip(p0 + d), clip(q0 - d)
                    if luma then
                        local m = rshift(p0 + q0 + 1, 1)
                        if ap < beta then P[q - 2 * xs] = p1 + clip3(-c0, c0, arshift(p2 + m - lshift(p1, 1), 1)) end
                        if aq < beta then P[q + xs] = q1 + clip3(-c0, c0, arshift(q2 + m - lshift(q1, 1), 1)) end
                    end
                elseif luma then
                    local p2, p3, q2, q3 = P[q - 3 * xs], P[q - 4 * xs], P[q + 2 * xs], P[q + 3 * xs]
                    local small = abs(p0 - q0) < rshift(alpha, 2) + 2
                    if abs(p2 - p0) < beta and small then
                        P[q - xs] = rshift(p2 + 2 * p1 + 2 * p0 + 2 * q0 + q1 + 4, 3)
                        P[q - 2 * xs] = rshift(p2 + p1 + p0 + q0 + 2, 2)
                        P[q - 3 * xs] = rshift(2 * p3 + 3 * p2 + p1 + p0 + q0 + 4, 3)
                    else
                        P[q - xs] = rshift(2 * p1 + p0 + q1 + 2, 2)
                    end
                    if abs(q2 - q0) < beta and small then
                        P[q] = rshift(p1 + 2 * p0 + 2 * q0 + 2 * q1 + q2 + 4, 3)
                        P[q + xs] = rshift(p0 + q0 + q1 + q2 + 2, 2)
                        P[q + 2 * xs] = rshift(2 * q3 + 3 * q2 + q1 + q0 + p0 + 4, 3)
                    else
                        P[q] = rshift(2 * q1 + q0 + p1 + 2, 2)
                    end
                else
                    P[q - xs], P[q] = rshift(2 * p1 + p0 + q1 + 2, 2), rshift(2 * q1 + q0 + p1 + 2, 2)
                end
            end
        end
    end
end

-- deblock(RY, RCb, RCr, mbw, mbh, qp, qpc, nzY, refi, mvx, mvy): the decoded picture's planes
-- filtered in place as a decoder does after decoding the slice (8.7; disable_deblocking_filter_idc
-- 0, both offsets 0, one QP): macroblocks in raster order, in each the vertical edges left to
-- right, then the horizontal edges top to bottom, luma and chroma alike. Boundary strengths
-- (8.7.2.1): 4 on a macroblock edge with an intra macroblock on either side, 3 inside one; else 2
-- where either 4x4 luma block has coefficients (nzY); else 1 on a macroblock edge between
-- different references or motion vectors 4 quarter samples or more apart; else 0. refi nil: an I
-- slice (every macroblock intra); refi[i] < 0: an intra macroblock of a P slice. Chroma edges
-- (at 0 and 4) take the strengths of the luma edges at 0 and 8.
local BS = {}
for e = 0, 3 do BS[e] = ffi.new("int32_t[4]") end
function M.deblock(RY, RCb, RCr, mbw, mbh, qp, qpc, nzY, refi, mvx, mvy)
    local SY, SC = mbw * 16, mbw * 8
    local ya, yb, yt = ALPHA[qp], BETA[qp], TC0[qp]
    local ca, cb, ct = ALPHA[qpc], BETA[qpc], TC0[qpc]
    if ya == 0 and ca == 0 then return end   -- alpha 0: no sample can change (qp < 16)
    local NZS = mbw * 4
    local function intra(i) return refi == nil or refi[i] < 0 end
    -- strengths of the edges e = first..3 (x or y = 4e) of macroblock (mx, my) in one direction into BS
    local function strengths(mx, my, vertical, first)
        local i = my * mbw + mx
        local iq = intra(i)
        for e = first, 3 do
            local pi = i
            if e == 0 then pi = vertical and i - 1 or i - mbw end
            local ip = intra(pi)
            for k = 0, 3 do
                local v
                if iq or ip then
                    v = e == 0 and 4 or 3
                else
                    local qbx, qby = vertical and (mx * 4 + e) or (mx * 4 + k), vertical and (my * 4 + k) or (my * 4 + e)
                    local pbx, pby = vertical and qbx - 1 or qbx, vertical and qby or qby - 1
                    if nzY[qby * NZS + qbx] > 0 or nzY[pby * NZS + pbx] > 0 then
                        v = 2
                    elseif e == 0 and (refi[pi] ~= refi[i] or abs(mvx[pi] - mvx[i]) >= 4 or abs(mvy[pi] - mvy[i]) >= 4) then
                        v = 1
                    else
                        v = 0
                    end
                end
                BS[e][k] = v
            end
        end
    end
    for my = 0, mbh - 1 do
        for mx = 0, mbw - 1 do
            local x0, y0, cx0, cy0 = mx * 16, my * 16, mx * 8, my * 8
            for dir = 1, 2 do   -- vertical edges (filtering across x), then horizontal ones
                local vertical = dir == 1
                local first = (vertical and mx or my) > 0 and 0 or 1   -- no edge on the picture's border
                strengths(mx, my, vertical, first)
                for e = first, 3 do
                    local pos = vertical and (y0 * SY + x0 + 4 * e) or ((y0 + 4 * e) * SY + x0)
                    filter_edge(RY, pos, vertical and 1 or SY, vertical and SY or 1, 16, BS[e], ya, yb, yt, true)
                end
                for e = first * 2, 2, 2 do   -- chroma edges 0 and 4: the luma edges 0 and 8
                    for _, C in ipairs { RCb, RCr } do
                        local pos = vertical and (cy0 * SC + cx0 + 2 * e) or ((cy0 + 2 * e) * SC + cx0)
                        filter_edge(C, pos, vertical and 1 or SC, vertical and SC or 1, 8, BS[e], ca, cb, ct, false)
                    end
                end
            end
        end
    end
end

-- ==== slices ====

local PRED_INTER, CPRED_IU, CPRED_IV = ffi.new("int32_t[256]"), ffi.new("int32_t[64]"), ffi.new("int32_t[64]")

-- slice_rbsp(Y, Cb, Cr, mbw, mbh, qp, header[, ref[, deblock]]) -> the slice's RBSP (header(w)
-- writes the slice header's fields first), not yet escaped, and the decoded picture's planes Y,
-- Cb, Cr (what a decoder reconstructs from it; with deblock, after the deblocking filter, which
-- the header must then turn on). Without ref: an I slice of Intra_16x16 macroblocks. With ref =
-- {Y, Cb, Cr} (the previous decoded picture): a P slice, each macroblock P_Skip, P_L0_16x16
-- (whole-sample motion in steps of 2, so the chroma's is whole too) or Intra_16x16, whichever the
-- encoder's estimate finds cheapest.
function M.slice_rbsp(Y, Cb, Cr, mbw, mbh, qp, header, ref, deblock)
    local w = writer()
    header(w)
    local SY, SC = mbw * 16, mbw * 8
    local HY, HC = mbh * 16, mbh * 8
    local qpc = qp < 30 and qp or QPC[qp - 29]   -- chroma_qp_index_offset 0
    local RY = ffi.new("uint8_t[?]", SY * mbh * 16)
    local RCb, RCr = ffi.new("uint8_t[?]", SC * mbh * 8), ffi.new("uint8_t[?]", SC * mbh * 8)
    -- total_coeff of each 4x4 block, for the coeff_token contexts: luma (4 mbw) x (4 mbh), chroma 2x2 per MB
    local nzY = ffi.new("uint8_t[?]", mbw * 4 * mbh * 4)
    local nzU, nzV = ffi.new("uint8_t[?]", mbw * 2 * mbh * 2), ffi.new("uint8_t[?]", mbw * 2 * mbh * 2)
    local function nc(nz, stride, bx, by)
        local left, top = bx > 0, by > 0
        local a = left and nz[by * stride + bx - 1] or 0
        local b = top and nz[(by - 1) * stride + bx] or 0
        if left and top then return rshift(a + b + 1, 1) end
        if left then return a end
        if top then return b end
        return 0
    end
    -- P slices: each macroblock's motion vector (quarter samples) and reference index (-1: intra)
    local mvx, mvy, refi
    if ref then
        mvx, mvy, refi = ffi.new("int32_t[?]", mbw * mbh), ffi.new("int32_t[?]", mbw * mbh), ffi.new("int8_t[?]", mbw * mbh)
    end
    local lambda = math.max(1, math.floor(2 ^ ((qp - 12) / 6) + 0.5))   -- SAD per bit of motion vector
    local planes = ref and ref_planes(ref.Y, SY, HY)
    -- the motion search's cost of vector (vx, vy) for the macroblock at (cx0, cy0) whose predicted
    -- vector is (cpx, cpy): SAD + lambda * bits of the mvd
    local cx0, cy0, cpx, cpy = 0, 0, 0, 0
    local function cost(vx, vy, limit)
        return sad_luma(Y, SY, planes, cx0, cy0, vx, vy, limit) + lambda * (se_bits(vx - cpx) + se_bits(vy - cpy))
    end
    local skip_run = 0

    -- the chroma of a macroblock against predictions cu / cv: levels, coded_block_pattern's chroma part
    local function code_chroma(mx, my, cu, cv)
        local cx0, cy0 = mx * 8, my * 8
        local udc, uac, u_any = code_block(Cb, RCb, SC, cx0, cy0, 8, cu, qpc, AC_CB, DCL_CB)
        local vdc, vac, v_any = code_block(Cr, RCr, SC, cx0, cy0, 8, cv, qpc, AC_CR, DCL_CR)
        local any_dc = false
        for s = 1, 4 do if udc[s] ~= 0 or vdc[s] ~= 0 then any_dc = true end end
        return udc, uac, vdc, vac, (u_any or v_any) and 2 or (any_dc and 1 or 0)
    end
    local function write_chroma(mx, my, udc, uac, vdc, vac, cbp_c)
        if cbp_c > 0 then
            residual_block(w, udc, 4, -1)
            residual_block(w, vdc, 4, -1)
        end
        for comp = 1, 2 do
            local nz, acs = comp == 1 and nzU or nzV, comp == 1 and uac or vac
            for b = 0, 3 do
                local bx, by = mx * 2 + b % 2, my * 2 + math.floor(b / 2)
                local t = 0
                if cbp_c == 2 then t = residual_block(w, acs[b], 15, nc(nz, mbw * 2, bx, by)) end
                nz[by * mbw * 2 + bx] = t
            end
        end
    end

    -- an Intra_16x16 macroblock (mb_type offset 0 in I slices, 5 in P slices)
    local function intra_mb(mx, my, best, mode, type_offset)
        local top, left = my > 0, mx > 0
        local x0, y0 = mx * 16, my * 16
        local dcl, ac, any_ac = code_block(Y, RY, SY, x0, y0, 16, best, qp, AC_Y, DCL_Y)
        local cx0, cy0 = mx * 8, my * 8
        local cu = chroma_pred(RCb, SC, cx0, cy0, top, left, CPRED_U)
        local cv = chroma_pred(RCr, SC, cx0, cy0, top, left, CPRED_V)
        local udc, uac, vdc, vac, cbp_c = code_chroma(mx, my, cu, cv)
        local cbp_l = any_ac and 15 or 0
        w.ue(type_offset + 1 + mode + 4 * cbp_c + (cbp_l == 15 and 12 or 0))   -- mb_type I_16x16_<mode>_<cbp>
        w.ue(0)                                                              -- intra_chroma_pred_mode: DC
        w.se(0)                                                              -- mb_qp_delta
        -- Intra16x16DCLevel: nC of block 0
        residual_block(w, dcl, 16, nc(nzY, mbw * 4, mx * 4, my * 4))
        for blk = 0, 15 do
            local rb = BLK_RASTER[blk]
            local bx, by = mx * 4 + rb % 4, my * 4 + math.floor(rb / 4)
            local t = 0
            if cbp_l == 15 then t = residual_block(w, ac[rb], 15, nc(nzY, mbw * 4, bx, by)) end
            nzY[by * mbw * 4 + bx] = t
        end
        write_chroma(mx, my, udc, uac, vdc, vac, cbp_c)
    end

    -- the predicted motion vector of a 16x16 partition (8.4.1.3) and P_Skip's vector (8.4.1.1)
    local function nb(x, y)   -- available, refIdx, mv of the macroblock at (x, y)
        if x < 0 or y < 0 or x >= mbw then return false, -1, 0, 0 end
        local i = y * mbw + x
        if refi[i] < 0 then return true, -1, 0, 0 end
        return true, refi[i], mvx[i], mvy[i]
    end
    local function mv_pred(mx, my)
        local aa, ra, ax, ay = nb(mx - 1, my)
        local ba, rb, bx, by = nb(mx, my - 1)
        local ca, rc, cx, cy = nb(mx + 1, my - 1)
        if not ca then ca, rc, cx, cy = nb(mx - 1, my - 1) end
        local px, py
        if not ba and not ca and aa then
            px, py = ax, ay
        else
            local n0 = (ra == 0 and 1 or 0) + (rb == 0 and 1 or 0) + (rc == 0 and 1 or 0)
            if n0 == 1 then
                if ra == 0 then px, py = ax, ay elseif rb == 0 then px, py = bx, by else px, py = cx, cy end
            else
                px = math.max(math.min(ax, bx), math.min(math.max(ax, bx), cx))
                py = math.max(math.min(ay, by), math.min(math.max(ay, by), cy))
            end
        end
        local sx, sy = px, py
        if not aa or not ba or (ra == 0 and ax == 0 and ay == 0) or (rb == 0 and bx == 0 and by == 0) then
            sx, sy = 0, 0
        end
        return px, py, sx, sy
    end

    -- the Cb and Cr predictions of macroblock (mx, my) for motion vector (vx, vy)
    local function inter_chroma(mx, my, vx, vy)
        return mc_chroma(ref.Cb, SC, HC, mx * 8, my * 8, vx, vy, CPRED_IU),
            mc_chroma(ref.Cr, SC, HC, mx * 8, my * 8, vx, vy, CPRED_IV)
    end
    -- the luma intra mode closest to the source: its prediction, mode and SAD
    local function intra_choice(x0, y0, top, left)
        local best, mode, bsad = nil, 2, math.huge
        for m = 0, 2 do
            local p = luma_pred(RY, SY, x0, y0, m, top, left)
            if p then
                local s = sad(Y, SY, x0, y0, p, 16)
                if s < bsad then best, mode, bsad = p, m, s end
            end
        end
        return best, mode, bsad
    end

    local LEVELS = LEV
    for my = 0, mbh - 1 do
        for mx = 0, mbw - 1 do
            local top, left = my > 0, mx > 0
            local x0, y0 = mx * 16, my * 16
            if not ref then
                local best, mode = intra_choice(x0, y0, top, left)
                intra_mb(mx, my, best, mode, 0)
            else
                local i = my * mbw + mx
                local px, py, sx, sy = mv_pred(mx, my)
                -- motion search: the skip vector, the prediction and zero, a small diamond of
                -- whole samples around the best, then the eight half samples around that; cost
                -- SAD + lambda * bits of mvd; vectors in quarter samples, always even
                cx0, cy0, cpx, cpy = x0, y0, px, py
                local bvx, bvy = sx, sy
                local bcost = cost(bvx, bvy, math.huge)
                local skip_cost = bcost
                -- a skip vector that already predicts within a quarter level a sample ends the search
                local searching = skip_cost >= 64 + lambda * (se_bits(sx - px) + se_bits(sy - py))
                for _, c in ipairs(searching and {{px, py}, {0, 0}} or {}) do
                    local cc = cost(c[1], c[2], bcost)
                    if cc < bcost then bvx, bvy, bcost = c[1], c[2], cc end
                end
                -- whole samples from the nearest whole-sample vector: diamonds of 2, then 1 samples
                local ivx, ivy = 4 * math.floor(bvx / 4 + 0.5), 4 * math.floor(bvy / 4 + 0.5)
                local icost = (ivx == bvx and ivy == bvy) and bcost or cost(ivx, ivy, math.huge)
                for _, step in ipairs(searching and {8, 4} or {}) do
                    for _ = 1, 8 do
                        local moved = false
                        for _, d in ipairs {{step, 0}, {-step, 0}, {0, step}, {0, -step}} do
                            local nx, ny = ivx + d[1], ivy + d[2]
                            if nx >= -256 and nx <= 256 and ny >= -256 and ny <= 256 then
                                local cc = cost(nx, ny, icost)
                                if cc < icost then ivx, ivy, icost, moved = nx, ny, cc, true end
                            end
                        end
                        if not moved then break end
                    end
                end
                if icost < bcost then bvx, bvy, bcost = ivx, ivy, icost end
                for _, st in ipairs(searching and SUB_STEPS or {}) do   -- half, then quarter samples
                    local hvx, hvy = bvx, bvy
                    for _, d in ipairs(NEIGHBOURS) do
                        local nx, ny = hvx + st * d[1], hvy + st * d[2]
                        local cc = cost(nx, ny, bcost)
                        if cc < bcost then bvx, bvy, bcost = nx, ny, cc end
                    end
                end
                -- P_Skip when the skip vector leaves no residual to code
                local skipped = false
                if skip_cost <= bcost + 2 * lambda then
                    local p = mc_luma(planes, x0, y0, sx, sy, PRED_INTER)
                    local cbp_l = 0
                    if skip_cost == lambda * (se_bits(sx - px) + se_bits(sy - py)) then   -- SAD 0: nothing to code
                        for y = 0, 15 do for x = 0, 15 do RY[(y0 + y) * SY + x0 + x] = p[y * 16 + x] end end
                    else
                        cbp_l = code_luma_inter(Y, RY, SY, x0, y0, p, qp, LEVELS)
                    end
                    if cbp_l == 0 then
                        local _, _, _, _, cbp_c = code_chroma(mx, my, inter_chroma(mx, my, sx, sy))
                        if cbp_c == 0 then
                            refi[i], mvx[i], mvy[i] = 0, sx, sy
                            for b = 0, 15 do nzY[(my * 4 + math.floor(b / 4)) * mbw * 4 + mx * 4 + b % 4] = 0 end
                            for b = 0, 3 do
                                local k = (my * 2 + math.floor(b / 2)) * mbw * 2 + mx * 2 + b % 2
                                nzU[k], nzV[k] = 0, 0
                            end
                            skip_run = skip_run + 1
                            skipped = true
                        end
                    end
                end
                local best, mode, bsad
                if not skipped then best, mode, bsad = intra_choice(x0, y0, top, left) end
                if not skipped and bsad + 4 * lambda * 8 < bcost then   -- intra: roughly a few bits of mb_type and mode
                    refi[i], mvx[i], mvy[i] = -1, 0, 0
                    w.ue(skip_run)
                    skip_run = 0
                    intra_mb(mx, my, best, mode, 5)
                elseif not skipped then   -- P_L0_16x16 at the searched vector
                    local vx, vy = bvx, bvy
                    refi[i], mvx[i], mvy[i] = 0, vx, vy
                    local p = mc_luma(planes, x0, y0, vx, vy, PRED_INTER)
                    local cbp_l = code_luma_inter(Y, RY, SY, x0, y0, p, qp, LEVELS)
                    local udc, uac, vdc, vac, cbp_c = code_chroma(mx, my, inter_chroma(mx, my, vx, vy))
                    w.ue(skip_run)
                    skip_run = 0
                    w.ue(0)                    -- mb_type P_L0_16x16 (ref_idx_l0 implied: one reference)
                    w.se(vx - px); w.se(vy - py)   -- mvd_l0
                    w.ue(INTER_CBP_CODE[cbp_l + 16 * cbp_c])
                    if cbp_l + cbp_c > 0 then w.se(0) end   -- mb_qp_delta
                    for blk = 0, 15 do
                        local rb = BLK_RASTER[blk]
                        local bx, by = mx * 4 + rb % 4, my * 4 + math.floor(rb / 4)
                        local t = 0
                        if band(cbp_l, lshift(1, math.floor(blk / 4))) ~= 0 then
                            t = residual_block(w, LEVELS[rb], 16, nc(nzY, mbw * 4, bx, by))
                        end
                        nzY[by * mbw * 4 + bx] = t
                    end
                    write_chroma(mx, my, udc, uac, vdc, vac, cbp_c)
                end
            end
        end
    end
    if skip_run > 0 then w.ue(skip_run) end
    w.trailing()
    if deblock then M.deblock(RY, RCb, RCr, mbw, mbh, qp, qpc, nzY, refi, mvx, mvy) end
    return w.string(), RY, RCb, RCr
end

return M
