-- tests/golden/h264/inputs.lua: the RGB clips of the h264 golden case, from integers only (the
-- same bytes on every machine): {name, width, height, qp, frames = {H*W*3 strings}, keyint, deblock}.
--   noise: pseudo-random bytes (large levels: CAVLC's escapes, every coeff_token table)
--   mix:   gradients and flat areas with noisy macroblocks, cropped (88 x 40: 6 x 3 macroblocks)
--   coarse: the same kind of picture at qp 40 (the chroma QP table, the luma DC scaling above 36)
--   motion: P pictures (keyint 4: IDR, 3 P, IDR, 2 P) of a texture moving by 2, then odd steps
--           (whole, half and quarter-sample vectors: the 6-tap filter, its means, the chroma's
--           eighths), with a
--           still band (P_Skip runs, one at the end of a slice), a noise block that appears
--           (intra macroblocks in P slices) and motion past the picture's edges, cropped
--           (72 x 40: 5 x 3 macroblocks), qp 24
--   motion_nodb: the motion clip with the deblocking filter off (deblock = false); motion34 and
--           motion51: at qp 34 and 51 (stronger filtering, the tables' last rows)
--   still: 20 frames of one 16 x 16 picture (frame_num wraps at 16; P slices of one skip)
-- Every clip but motion_nodb is coded with the deblocking filter (nemo.mp4's default).
local M = {}

local function lcg(seed)
    return function() seed = (seed * 1103515245 + 12345) % 2147483648; return math.floor(seed / 65536) % 256 end
end

local function clip(name, W, H, qp, n, px)
    local frames = {}
    for f = 1, n do
        local t = {}
        for y = 0, H - 1 do for x = 0, W - 1 do t[#t + 1] = string.char(px(f, x, y)) end end
        frames[f] = table.concat(t)
    end
    return {name = name, width = W, height = H, qp = qp, frames = frames}
end

function M.clips()
    local r = lcg(7)
    local noise = clip("noise", 32, 32, 0, 1, function() return r(), r(), r() end)
    local r2 = lcg(11)
    local mix = clip("mix", 88, 40, 20, 2, function(f, x, y)
        if (math.floor(x / 16) + math.floor(y / 16) + f) % 4 == 0 then return r2(), r2(), r2() end
        if math.floor(x / 16) % 2 == 0 then return (x * 3 + f * 17) % 256, (y * 5) % 256, 200 end
        return 90, (x + y * 2) % 256, (255 - x * 2) % 256
    end)
    local r3 = lcg(13)
    local coarse = clip("coarse", 48, 32, 40, 1, function(f, x, y)
        if (math.floor(x / 16) + math.floor(y / 16)) % 3 == 0 then return r3(), r3(), r3() end
        return (x * 5) % 256, (y * 7 + 30) % 256, (x + y) % 256
    end)
    local r4 = lcg(17)
    local tex = {}
    for i = 0, 4095 do tex[i] = r4() end
    local shift = {{0, 0}, {2, -2}, {4, -4}, {5, -3}, {6, -2}, {9, 1}, {12, 4}}
    local motion = clip("motion", 72, 40, 24, 7, function(f, x, y)
        if y >= 32 then return 60, 120 + (x % 4), 180 end                       -- still band
        if f >= 3 and x >= 48 and x < 64 and y < 16 then return r4(), r4(), r4() end   -- noise appears
        local xx, yy = x + shift[f][1], y + shift[f][2]
        local v = (tex[(xx % 64) + 64 * (yy % 64)] + tex[((xx + 1) % 64) + 64 * ((yy + 1) % 64)]) / 2
        return math.floor(v), (xx * 4 + yy) % 256, math.floor(255 - v / 2)
    end)
    motion.keyint = 4
    -- the same motion without the deblocking filter, and at qp 34 (stronger filtering)
    local nodb, q34, q51 = {deblock = false}, {}, {}
    for k, v in pairs(motion) do nodb[k] = v; q34[k] = v; q51[k] = v end
    nodb.name, q34.name, q34.qp, q51.name, q51.qp = "motion_nodb", "motion34", 34, "motion51", 51
    local still = clip("still", 16, 16, 20, 20, function(_, x, y) return x * 15, y * 15, 128 end)
    return {noise, mix, coarse, motion, nodb, q34, q51, still}
end

return M
