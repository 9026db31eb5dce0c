-- lua/nemo/mp4.lua: MP4 video files that every player opens, without a codec library: H.264
-- in an ISO base media file.
--
--   local mp4 = require "nemo.mp4"
--   local bytes = mp4.encode(frames, width, height, channels, {fps = 16, qp = 20})   -- H*W*C strings
--   nemo.image.write_mp4("out.mp4", frames, width, height, channels, {fps = 16})
--
-- The stream: Constrained Baseline, 4:2:0, 8 bits, one slice per picture, an IDR picture every
-- `keyint` frames (default 250, x264's; 1: every frame intra) and P pictures between them
-- (nemo.h264_intra: each macroblock P_Skip, P_L0_16x16 with quarter-sample motion, or
-- Intra_16x16, whichever is cheapest; CAVLC at one qp, 0..51, default 20, luma PSNR around 50
-- dB on smooth frames; the in-loop deblocking filter unless {deblock = false}). {pcm = true}
-- stores I_PCM macroblocks in IDR pictures instead (the
-- samples as they are: 1.5 bytes per pixel per frame). The size is padded to whole macroblocks by
-- repeating the last column and row, and cropped back in the SPS; colours BT.709 limited range,
-- said so in the VUI. The sync sample table lists the IDR pictures; the moov box comes first, so
-- players can start before the end.
--
-- Non-obvious rules:
-- - The P pictures predict from the previous decoded (deblocked) picture only, without
--   partitions: on FFmpeg's test sources about 2x smaller than intra pictures and 1.03-1.50x the
--   size of x264's Baseline at the same qp 20-32 (bench/RESULTS.md). I_PCM pictures are never
--   filtered (their header turns the filter off).
-- - Width and height must be even (4:2:0 crops in steps of two).
-- - The level is the lowest whose frame size and bit rate (for Baseline, I_PCM's) hold the
--   stream, 6.2 when none does; decoders in software ignore it.
local ffi = require "ffi"
local bit = require "bit"

local M = {}

M.DEFAULT_QP, M.MAX_QP = 20, 51
M.DEFAULT_KEYINT = 250   -- frames from one IDR picture to the next, as x264's default

-- qp_problem(qp, name) -> nil when qp is a quantizer, else the message saying why not (for the
-- callers' own errors: mp4.encode, generate's output.video_qp, wan_sample's --qp)
function M.qp_problem(qp, name)
    if type(qp) == "number" and qp % 1 == 0 and qp >= 0 and qp <= M.MAX_QP then return nil end
    return string.format("%s must be an integer in 0..%d (the MP4's quantizer: lower is better and larger), got %s",
        name, M.MAX_QP, tostring(qp))
end

-- keyint_problem(k, name) -> nil when k is a keyint, else the message saying why not (mp4.encode,
-- generate's output.video_keyint)
function M.keyint_problem(k, name)
    if type(k) == "number" and k % 1 == 0 and k >= 1 then return nil end
    return string.format("%s must be an integer >= 1 (frames from one IDR picture to the next; 1: every frame " ..
        "intra), got %s", name, tostring(k))
end

local band, rshift = bit.band, bit.rshift

-- ==== bits ====

local intra = require "nemo.h264_intra"
local bitwriter = intra.writer

-- NAL unit payload with emulation prevention: 0x03 after two zero bytes before a byte <= 3
local function escape(rbsp)
    if not rbsp:find("\0\0", 1, true) then return rbsp end
    local out, zeros = {}, 0
    local start = 1
    for i = 1, #rbsp do
        local b = rbsp:byte(i)
        if zeros >= 2 and b <= 3 then
            out[#out + 1] = rbsp:sub(start, i - 1)
            out[#out + 1] = "\3"
            start = i
            zeros = 0
        end
        zeros = b == 0 and zeros + 1 or 0
    end
    out[#out + 1] = rbsp:sub(start)
    return table.concat(out)
end
M._escape = escape

-- ==== parameter sets ====

-- {level_idc, MaxFS (macroblocks), MaxBR (Baseline, kbit/s)}: Table A-1
local LEVELS = {
    {10, 99, 64}, {11, 396, 192}, {12, 396, 384}, {13, 396, 768}, {20, 396, 2000}, {21, 792, 4000},
    {22, 1620, 4000}, {30, 1620, 10000}, {31, 3600, 14000}, {32, 5120, 20000}, {40, 8192, 20000},
    {41, 8192, 50000}, {42, 8704, 50000}, {50, 22080, 135000}, {51, 36864, 240000}, {52, 36864, 240000},
    {60, 139264, 240000}, {61, 139264, 480000}, {62, 139264, 800000},
}

local function level_for(mbs, fps)
    local kbps = mbs * 384 * 8 * fps / 1000 * 1.02   -- PCM macroblocks plus headers
    for _, l in ipairs(LEVELS) do
        if mbs <= l[2] and kbps <= l[3] then return l[1] end
    end
    return 62
end

local function sps(mbw, mbh, crop_r, crop_b, level)
    local w = bitwriter()
    w.u(8, 66)                 -- profile_idc: Baseline
    w.u(8, 0xC0)               -- constraint_set0 and 1: Constrained Baseline
    w.u(8, level)
    w.ue(0)                    -- seq_parameter_set_id
    w.ue(0)                    -- log2_max_frame_num_minus4
    w.ue(2)                    -- pic_order_cnt_type 2: output order = decoding order
    w.ue(1)                    -- max_num_ref_frames
    w.u(1, 0)                  -- gaps_in_frame_num_value_allowed_flag
    w.ue(mbw - 1)              -- pic_width_in_mbs_minus1
    w.ue(mbh - 1)              -- pic_height_in_map_units_minus1
    w.u(1, 1)                  -- frame_mbs_only_flag
    w.u(1, 1)                  -- direct_8x8_inference_flag
    if crop_r > 0 or crop_b > 0 then
        w.u(1, 1)
        w.ue(0); w.ue(crop_r); w.ue(0); w.ue(crop_b)   -- left, right, top, bottom in 2-pixel units
    else
        w.u(1, 0)
    end
    w.u(1, 1)                  -- vui_parameters_present_flag
    w.u(1, 0)                  -- aspect_ratio_info_present_flag
    w.u(1, 0)                  -- overscan_info_present_flag
    w.u(1, 1)                  -- video_signal_type_present_flag
    w.u(3, 5)                  -- video_format: unspecified
    w.u(1, 0)                  -- video_full_range_flag: limited (16..235, 16..240)
    w.u(1, 1)                  -- colour_description_present_flag
    w.u(8, 1); w.u(8, 1); w.u(8, 1)   -- primaries, transfer, matrix: BT.709
    w.u(1, 0)                  -- chroma_loc_info_present_flag
    w.u(1, 0)                  -- timing_info_present_flag (the MP4 has the timing)
    w.u(1, 0); w.u(1, 0)       -- nal / vcl hrd_parameters_present_flag
    w.u(1, 0)                  -- pic_struct_present_flag
    w.u(1, 0)                  -- bitstream_restriction_flag
    w.trailing()
    return "\103" .. escape(w.string())   -- nal_ref_idc 3, nal_unit_type 7
end

local function pps()
    local w = bitwriter()
    w.ue(0); w.ue(0)           -- pic_parameter_set_id, seq_parameter_set_id
    w.u(1, 0)                  -- entropy_coding_mode_flag: CAVLC
    w.u(1, 0)                  -- bottom_field_pic_order_in_frame_present_flag
    w.ue(0)                    -- num_slice_groups_minus1
    w.ue(0); w.ue(0)           -- num_ref_idx_l0 / l1_default_active_minus1
    w.u(1, 0); w.u(2, 0)       -- weighted_pred_flag, weighted_bipred_idc
    w.se(0); w.se(0); w.se(0)  -- pic_init_qp_minus26, pic_init_qs_minus26, chroma_qp_index_offset
    w.u(1, 1)                  -- deblocking_filter_control_present_flag
    w.u(1, 0)                  -- constrained_intra_pred_flag
    w.u(1, 0)                  -- redundant_pic_cnt_present_flag
    w.trailing()
    return "\104" .. escape(w.string())   -- nal_ref_idc 3, nal_unit_type 8
end

-- ==== colour ====

-- BT.709, limited range, as fixed-point weights (x 2^16) of 8-bit R'G'B'
local KR, KB = 0.2126, 0.0722
local KG = 1 - KR - KB
local function fx(v) return math.floor(v * 65536 + 0.5) end
local YR, YG, YB = fx(219 / 255 * KR), fx(219 / 255 * KG), fx(219 / 255 * KB)
local UR, UG, UB = fx(-224 / 255 * KR / (2 * (1 - KB))), fx(-224 / 255 * KG / (2 * (1 - KB))), fx(224 / 255 / 2)
local VR, VG, VB = fx(224 / 255 / 2), fx(-224 / 255 * KG / (2 * (1 - KR))), fx(-224 / 255 * KB / (2 * (1 - KR)))
M.BT709 = {y = {YR, YG, YB}, cb = {UR, UG, UB}, cr = {VR, VG, VB}}

-- planes(frame, W, H, C, Wp, Hp) -> Y (Wp*Hp), Cb, Cr (Wp/2*Hp/2) as uint8 arrays, the frame
-- padded to Wp x Hp by repeating its last column and row; chroma from each 2x2 block's mean RGB
local function planes(frame, W, H, C, Wp, Hp)
    local src = ffi.cast("const uint8_t *", frame)
    local Y = ffi.new("uint8_t[?]", Wp * Hp)
    local Cw, Ch = Wp / 2, Hp / 2
    local Cb, Cr = ffi.new("uint8_t[?]", Cw * Ch), ffi.new("uint8_t[?]", Cw * Ch)
    local gray = C <= 2
    local function rgb(x, y)
        if x >= W then x = W - 1 end
        if y >= H then y = H - 1 end
        local o = (y * W + x) * C
        if gray then local g = src[o]; return g, g, g end
        return src[o], src[o + 1], src[o + 2]
    end
    for y = 0, Hp - 1 do
        for x = 0, Wp - 1 do
            local r, g, b = rgb(x, y)
            Y[y * Wp + x] = 16 + rshift(YR * r + YG * g + YB * b + 32768, 16)
        end
    end
    for y = 0, Ch - 1 do
        for x = 0, Cw - 1 do
            local r0, g0, b0 = rgb(2 * x, 2 * y)
            local r1, g1, b1 = rgb(2 * x + 1, 2 * y)
            local r2, g2, b2 = rgb(2 * x, 2 * y + 1)
            local r3, g3, b3 = rgb(2 * x + 1, 2 * y + 1)
            local r, g, b = r0 + r1 + r2 + r3, g0 + g1 + g2 + g3, b0 + b1 + b2 + b3   -- 4 x the mean
            -- 128 + weights . mean, rounded: the arithmetic shift keeps negative sums right
            Cb[y * Cw + x] = 128 + bit.arshift(UR * r + UG * g + UB * b + 131072, 18)
            Cr[y * Cw + x] = 128 + bit.arshift(VR * r + VG * g + VB * b + 131072, 18)
        end
    end
    return Y, Cb, Cr
end
M._planes = planes

-- the deblocking fields of a slice header: disable_deblocking_filter_idc 1 (off), or 0 (on) with
-- slice_alpha_c0_offset_div2 and slice_beta_offset_div2 0
local function deblocking_fields(w, on)
    if on then w.ue(0); w.se(0); w.se(0) else w.ue(1) end
end

-- the slice header of an IDR picture's one I slice (pic_init_qp 26)
local function slice_header(w, idr_id, qp, deblock)
    w.ue(0)                    -- first_mb_in_slice
    w.ue(7)                    -- slice_type: I (all slices of the picture)
    w.ue(0)                    -- pic_parameter_set_id
    w.u(4, 0)                  -- frame_num (log2_max_frame_num 4)
    w.ue(idr_id)               -- idr_pic_id: differs between consecutive IDR pictures
    w.u(1, 0); w.u(1, 0)       -- no_output_of_prior_pics_flag, long_term_reference_flag
    w.se(qp - 26)              -- slice_qp_delta
    deblocking_fields(w, deblock)
end

-- one IDR slice of Intra_16x16 macroblocks at qp (nemo.h264_intra); also the decoded planes
local function intra_slice(Y, Cb, Cr, mbw, mbh, idr_id, qp, deblock)
    local rbsp, RY, RCb, RCr = intra.slice_rbsp(Y, Cb, Cr, mbw, mbh, qp,
        function(w) slice_header(w, idr_id, qp, deblock) end, nil, deblock)
    return "\101" .. escape(rbsp), RY, RCb, RCr   -- nal_ref_idc 3, nal_unit_type 5 (IDR)
end

-- one P slice predicted from ref (the previous decoded picture: {Y, Cb, Cr}), frame_num n
local function p_slice(Y, Cb, Cr, mbw, mbh, n, qp, ref, deblock)
    local rbsp, RY, RCb, RCr = intra.slice_rbsp(Y, Cb, Cr, mbw, mbh, qp, function(w)
        w.ue(0)                -- first_mb_in_slice
        w.ue(5)                -- slice_type: P (all slices of the picture)
        w.ue(0)                -- pic_parameter_set_id
        w.u(4, n % 16)         -- frame_num
        w.u(1, 0)              -- num_ref_idx_active_override_flag: the PPS's one reference
        w.u(1, 0)              -- ref_pic_list_modification_flag_l0
        w.u(1, 0)              -- adaptive_ref_pic_marking_mode_flag: sliding window
        w.se(qp - 26)          -- slice_qp_delta
        deblocking_fields(w, deblock)
    end, ref, deblock)
    return "\65" .. escape(rbsp), RY, RCb, RCr   -- nal_ref_idc 2, nal_unit_type 1 (non-IDR)
end

-- one IDR slice of I_PCM macroblocks (the NAL unit, escaped, with its header byte)
local function slice(Y, Cb, Cr, mbw, mbh, idr_id)
    local w = bitwriter()
    slice_header(w, idr_id, 26)
    w.ue(25)                   -- the first macroblock's mb_type: I_PCM
    w.align_zero()             -- pcm_alignment_zero_bits
    local head = w.string()
    local Wp, Cw = mbw * 16, mbw * 8
    local mb = ffi.new("uint8_t[?]", 386)   -- [mb_type + alignment of the next MB (2 bytes)] + 384 samples
    local parts = {head}
    for my = 0, mbh - 1 do
        for mx = 0, mbw - 1 do
            local k = 0
            for y = 0, 15 do
                ffi.copy(mb + k, Y + (my * 16 + y) * Wp + mx * 16, 16)
                k = k + 16
            end
            for y = 0, 7 do ffi.copy(mb + k, Cb + (my * 8 + y) * Cw + mx * 8, 8); k = k + 8 end
            for y = 0, 7 do ffi.copy(mb + k, Cr + (my * 8 + y) * Cw + mx * 8, 8); k = k + 8 end
            parts[#parts + 1] = ffi.string(mb, 384)
            -- the next macroblock's mb_type I_PCM (ue 25 = 000011010) and its 7 alignment bits
            if not (my == mbh - 1 and mx == mbw - 1) then parts[#parts + 1] = "\13\0" end
        end
    end
    parts[#parts + 1] = "\128"   -- rbsp_slice_trailing_bits
    return "\101" .. escape(table.concat(parts))   -- nal_ref_idc 3, nal_unit_type 5 (IDR)
end

-- ==== the ISO base media file ====

local function u8(v) return string.char(v % 256) end
local function u16(v) return string.char(math.floor(v / 256) % 256, v % 256) end
local function u32(v)
    return string.char(math.floor(v / 16777216) % 256, math.floor(v / 65536) % 256, math.floor(v / 256) % 256, v % 256)
end
local function u64(v) return u32(math.floor(v / 4294967296)) .. u32(v % 4294967296) end
local function box(kind, ...) local body = table.concat({...}); return u32(8 + #body) .. kind .. body end
local function fullbox(kind, version, flags, ...) return box(kind, u8(version), u8(rshift(flags, 16)),
    u16(band(flags, 0xFFFF)), ...) end
local UNITY = u32(0x10000) .. u32(0) .. u32(0) .. u32(0) .. u32(0x10000) .. u32(0) .. u32(0) .. u32(0) .. u32(0x40000000)

local function moov(W, H, sizes, fps, sps_nal, pps_nal, chunk_offset, sync)
    local n = #sizes
    local ts = math.floor(fps * 1000 + 0.5)      -- media timescale: each frame lasts 1000 units
    local mdur = n * 1000
    local dur = math.floor(n * 1000 / fps + 0.5)  -- movie timescale 1000 (milliseconds)
    local mvhd = fullbox("mvhd", 0, 0, u32(0), u32(0), u32(1000), u32(dur), u32(0x10000), u16(0x100),
        string.rep("\0", 10), UNITY, string.rep("\0", 24), u32(2))
    local tkhd = fullbox("tkhd", 0, 3, u32(0), u32(0), u32(1), u32(0), u32(dur), string.rep("\0", 8), u16(0), u16(0),
        u16(0), u16(0), UNITY, u32(W * 65536), u32(H * 65536))
    local mdhd = fullbox("mdhd", 0, 0, u32(0), u32(0), u32(ts), u32(mdur), u16(0x55C4), u16(0))   -- 'und'
    local hdlr = fullbox("hdlr", 0, 0, u32(0), "vide", string.rep("\0", 12), "VideoHandler\0")
    local avcc = box("avcC", u8(1), sps_nal:sub(2, 4), u8(0xFF), u8(0xE1), u16(#sps_nal), sps_nal, u8(1),
        u16(#pps_nal), pps_nal)
    local name = "nemo-lua H.264"
    local avc1 = box("avc1", string.rep("\0", 6), u16(1), u16(0), u16(0), string.rep("\0", 12), u16(W), u16(H),
        u32(0x480000), u32(0x480000), u32(0), u16(1), u8(#name) .. name .. string.rep("\0", 31 - #name), u16(0x18),
        u16(0xFFFF), avcc)
    local stsd = fullbox("stsd", 0, 0, u32(1), avc1)
    local stts = fullbox("stts", 0, 0, u32(1), u32(n), u32(1000))
    local stsc = fullbox("stsc", 0, 0, u32(1), u32(1), u32(n), u32(1))
    local sz = {}
    for i, s in ipairs(sizes) do sz[i] = u32(s) end
    local stsz = fullbox("stsz", 0, 0, u32(0), u32(n), table.concat(sz))
    local stco = fullbox("stco", 0, 0, u32(1), u32(chunk_offset))   -- the moov comes first: a small offset
    local stbl
    if #sync == n then   -- every sample a sync sample: no stss
        stbl = box("stbl", stsd, stts, stsc, stsz, stco)
    else
        local ss = {}
        for i, s in ipairs(sync) do ss[i] = u32(s) end
        stbl = box("stbl", stsd, stts, stsc, stsz, fullbox("stss", 0, 0, u32(#sync), table.concat(ss)), stco)
    end
    local dinf = box("dinf", fullbox("dref", 0, 0, u32(1), fullbox("url ", 0, 1)))
    local minf = box("minf", fullbox("vmhd", 0, 1, u16(0), u16(0), u16(0), u16(0)), dinf, stbl)
    return box("moov", mvhd, box("trak", tkhd, box("mdia", mdhd, hdlr, minf)))
end

local function check(frames, W, H, C, o, who)
    if C ~= 1 and C ~= 2 and C ~= 3 and C ~= 4 then error(who .. ": channels must be 1, 2, 3 or 4, got " .. tostring(C), 3) end
    if type(W) ~= "number" or type(H) ~= "number" or W < 2 or H < 2 or W % 2 ~= 0 or H % 2 ~= 0 then
        error(string.format("%s: width and height must be even numbers >= 2 (H.264 4:2:0), got %s x %s; use an " ..
            "animated PNG (.png) for other sizes", who, tostring(W), tostring(H)), 3)
    end
    if type(frames) ~= "table" or #frames == 0 then error(who .. ": expected a non-empty list of frames", 3) end
    for i, f in ipairs(frames) do
        if type(f) ~= "string" or #f ~= W * H * C then
            error(string.format("%s: frame %d must be %d x %d x %d bytes", who, i, W, H, C), 3)
        end
    end
    local fps = (o and o.fps) or 16
    if type(fps) ~= "number" or fps <= 0 or fps > 1000 then error(who .. ": fps must be in (0, 1000], got " .. tostring(fps), 3) end
    return fps
end

-- encode(frames, width, height, channels, {fps = 16, qp = 20, keyint = 250, deblock = true,
-- pcm = false}) -> the MP4 file's bytes. frames: strings of H*W*C bytes (gray, gray + alpha, RGB
-- or RGBA; alpha is dropped).
function M.encode(frames, W, H, C, o)
    local fps = check(frames, W, H, C, o, "mp4.encode")
    local qp = o and o.qp
    if o and o.pcm then qp = nil
    elseif qp == nil then qp = M.DEFAULT_QP
    else
        local why = M.qp_problem(qp, "qp")
        if why then error("mp4.encode: " .. why, 2) end
    end
    local keyint = o and o.keyint or M.DEFAULT_KEYINT
    local kwhy = M.keyint_problem(keyint, "keyint")
    if kwhy then error("mp4.encode: " .. kwhy, 2) end
    local deblock = true
    if o and o.deblock ~= nil then
        if type(o.deblock) ~= "boolean" then
            error("mp4.encode: deblock must be true or false, got " .. tostring(o.deblock), 2)
        end
        deblock = o.deblock
    end
    local mbw, mbh = math.ceil(W / 16), math.ceil(H / 16)
    local Wp, Hp = mbw * 16, mbh * 16
    local sps_nal = sps(mbw, mbh, (Wp - W) / 2, (Hp - H) / 2, level_for(mbw * mbh, fps))
    local pps_nal = pps()
    local samples, sizes, sync = {}, {}, {}
    local ref, idr = nil, 0
    for i, f in ipairs(frames) do
        local Y, Cb, Cr = planes(f, W, H, C, Wp, Hp)
        local nal
        if not qp then
            nal = slice(Y, Cb, Cr, mbw, mbh, (i - 1) % 2)
        elseif (i - 1) % keyint == 0 then
            local RY, RCb, RCr
            nal, RY, RCb, RCr = intra_slice(Y, Cb, Cr, mbw, mbh, idr % 2, qp, deblock)
            ref, idr = {Y = RY, Cb = RCb, Cr = RCr}, idr + 1
        else
            local RY, RCb, RCr
            nal, RY, RCb, RCr = p_slice(Y, Cb, Cr, mbw, mbh, (i - 1) % keyint, qp, ref, deblock)
            ref = {Y = RY, Cb = RCb, Cr = RCr}
        end
        if not qp or (i - 1) % keyint == 0 then sync[#sync + 1] = i end
        if o and o._recon and ref then   -- tests: the decoded frame, cropped, as yuv420p bytes
            local t = {}
            for y = 0, H - 1 do t[#t + 1] = ffi.string(ref.Y + y * Wp, W) end
            for y = 0, H / 2 - 1 do t[#t + 1] = ffi.string(ref.Cb + y * Wp / 2, W / 2) end
            for y = 0, H / 2 - 1 do t[#t + 1] = ffi.string(ref.Cr + y * Wp / 2, W / 2) end
            o._recon[i] = table.concat(t)
        end
        samples[i] = u32(#nal) .. nal
        sizes[i] = #samples[i]
    end
    local total = 0
    for _, s in ipairs(sizes) do total = total + s end
    local ftyp = box("ftyp", "isom", u32(512), "isom", "iso2", "avc1", "mp41")
    local big = total + 16 >= 4294967296
    local mdat_head = big and (u32(1) .. "mdat" .. u64(total + 16)) or (u32(total + 8) .. "mdat")
    -- the moov's size does not depend on the offset's value, so measure it first
    local probe = moov(W, H, sizes, fps, sps_nal, pps_nal, 0, sync)
    local offset = #ftyp + #probe + #mdat_head
    local mv = moov(W, H, sizes, fps, sps_nal, pps_nal, offset, sync)
    return table.concat{ftyp, mv, mdat_head, table.concat(samples)}
end

return M
