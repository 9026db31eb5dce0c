-- lua/nemo/models/wan_vae.lua: AutoencoderKLWan, the Wan 2.1 and Wan 2.2 video VAEs (3D causal convolutions),
-- as diffusers 0.40 defines and computes it (models/autoencoders/autoencoder_kl_wan.py): the
-- same module tree and parameter names, registered in the same order (so state_dict order and a
-- diffusers `vae/` folder's keys match), the same chunked encode / decode with the same feature
-- caches, the same op order.
--
--   local wv = require("nemo.models.wan_vae")
--   local vae = wv.AutoencoderKLWan.from_pretrained("Wan2.1-T2V-1.3B-Diffusers/vae")
--   local post = vae:encode(video).latent_dist     -- video (B, 3, 1 + 4k, H, W) in [-1, 1], H, W % 8 == 0
--   local z = post:mode()                          -- (B, 16, 1 + k, H/8, W/8); or post:sample(generator)
--   local rec = vae:decode(z).sample               -- (B, 3, 1 + 4k, H, W), clamped to [-1, 1]
--   vae:save_pretrained("out/vae")
-- (pipelines normalise z with config.latents_mean / latents_std themselves; the model does not.)
--
-- The non-obvious rules (each one changes the numbers):
-- - WanCausalConv3d pads time on the LEFT only, by 2 * padding_t (zeros), and H, W by padding on
--   both sides. Called with a cache (the last frames of the previous chunk's input), it puts the
--   cache in front of x and pads only 2 * padding_t - cache frames with zeros.
-- - encode runs the encoder on frame 0 alone, then on frames 1-4, 5-8, ... (so F must be
--   1 + 4k; diffusers silently drops other trailing frames, here it is an error), cats the
--   chunks in time and applies quant_conv. decode applies post_quant_conv to all of z, then runs
--   the decoder one latent frame at a time, cats and clamps to [-1, 1].
-- - The feature cache (diffusers' feat_cache, CACHE_T = 2) lives for one encode / decode call.
--   Every cached causal conv (conv_in, each resnet's conv1 / conv2, conv_out) stores the last
--   2 frames of its input (after norm + SiLU); when the chunk has 1 frame, the last frame of the
--   previous cache is put in front (none on the first chunk, so the second chunk sees 1 zero
--   frame + 1 cached frame). The 1x1x1 convs (conv_shortcut, quant convs) use no cache.
-- - downsample3d (encoder): per-frame zero pad (right 1, bottom 1) + stride-2 3x3 Conv2d; then,
--   on the first chunk, no time conv at all (the output is cached); later chunks run time_conv
--   (kernel 3, stride 2 in time, no padding) on [last cached frame, x] and cache x's last frame.
-- - upsample3d (decoder): on the first frame no time conv (the cache becomes "Rep"); later frames
--   run time_conv (kernel 3 in time, dim -> 2 dim): after "Rep" with 2 zero frames in front (the
--   cache becomes [zeros, x]), else with the cached [previous, x] frames in front; the two
--   channel halves become two frames, interleaved (frame t -> 2t, 2t + 1). Then the per-frame
--   nearest x2 upsample (nearest-exact = nearest for x2) and a 3x3 Conv2d to dim / 2.
-- - WanRMS_norm: F.normalize over channels (dim 1, eps 1e-12) * dim^0.5 * gamma (+ bias when it
--   has one); bf16 / f16 inputs are normalised in float32 and cast back first.
-- - WanAttentionBlock (mid blocks): per frame over H*W, one head of C channels: RMS norm
--   (gamma (C, 1, 1)), to_qkv 1x1 Conv2d, SDPA (scale 1/sqrt(C)), proj 1x1 Conv2d, + x.
-- - The decoder's up block i > 0 takes dims[i] / 2 channels (the previous resample halves them).
-- - WanUpsample's `.float()` round trip is skipped (nearest is a copy: no difference for
--   f32 / bf16 / f16; a float64 model stays float64 throughout).
-- - DiagonalGaussianDistribution is nemo.models.vae's (mean, logvar clamped to [-30, 20], std).
-- - Tiling (enable_tiling) is diffusers' spatial tiling: each tile runs all its frames through
--   its own causal caches; tiles blend unclamped, the decoded whole is clamped once.
-- - Wan 2.2's VAE (TI2V-5B: is_residual = true, patch_size = 2): the video is patchified (2 x 2
--   pixels -> 12 channels, width offset before height) before the encoder and unpatchified after
--   the decoder; each encoder level is a WanResidualDownBlock (resnets, downsample, + AvgDown3D of
--   the block's input: zero frames in front to a multiple of factor_t, blocks of positions to
--   channels, group means), each decoder level a WanResidualUpBlock (resnets, upsample to out_dim,
--   + DupUp3D of its input: repeat_interleave over channels spread to positions, the first
--   factor_t - 1 frames dropped on the first chunk), with no channel halving between levels.
--   spatial_compression_ratio is 2^(#dim_mult - 1) x patch_size (16).
-- Not supported: encode with attn_scales non-empty (diffusers' own encoder raises a TypeError there; the model builds
-- and decodes); gradient checkpointing.
local class = require "nemo.class"
local nn = require "nemo.nn"
local Tensor = require "nemo.tensor"
local F = require "nemo.functional"
local json = require "nemo.json"
local common = require "nemo.models.common"
local mio = require "nemo.models.io"
local vae = require "nemo.models.vae"
require "nemo"

local free, factory = common.free, common.factory
local is_tensor, shape_str = Tensor.is_tensor, Tensor.shape_str
local null = json.null

local M = {}

M.DIFFUSERS_VERSION = "0.40.0"   -- written into saved config.json, as diffusers does
M.CACHE_T = 2
M.DiagonalGaussianDistribution = vae.DiagonalGaussianDistribution

local function triple(v)
    if type(v) == "number" then return {v, v, v} end
    return {v[1], v[2], v[3]}
end

-- ==== WanCausalConv3d ====

-- WanCausalConv3d(in, out, kernel, {stride=1, padding=0, dtype=, device=}): an nn.Conv3d
-- (weight, bias) whose padding (t, h, w) becomes causal: time 2t zeros on the left, none on the
-- right; h and w on both sides. forward(x, cache=nil) -> conv of [cache, x] with 2t - cache
-- frames of zeros in front (the cache only counts when 2t > 0).
local WanCausalConv3d = class("nemo.models.wan_vae.WanCausalConv3d", nn.Conv3d)
M.WanCausalConv3d = WanCausalConv3d
function WanCausalConv3d:__init(in_channels, out_channels, kernel_size, opts)
    opts = opts or {}
    local p = triple(opts.padding or 0)
    nn.Conv3d.__init(self, in_channels, out_channels, kernel_size, {stride = opts.stride or 1, padding = 0,
        dtype = opts.dtype, device = opts.device})
    self.causal_padding = {2 * p[1], p[2], p[3]}   -- time (left only), height, width
end
function WanCausalConv3d:forward(x, cache)
    local cp = self.causal_padding
    local tpad, inp = cp[1], x
    if cache ~= nil and tpad > 0 then
        inp = F.cat({cache, x}, 2)
        tpad = tpad - cache.shape[3]
    end
    local y = F.conv3d(inp, self.weight, self.bias, {stride = self.stride,
        padding = {{tpad, 0}, {cp[2], cp[2]}, {cp[3], cp[3]}}})
    if not rawequal(inp, x) then free(inp) end
    return y
end
function WanCausalConv3d:extra_repr()
    local cp = self.causal_padding
    return nn.Conv3d.extra_repr(self) .. string.format(", causal_padding=(t %d left, h %d, w %d)", cp[1], cp[2], cp[3])
end

-- The last `n` frames of x (fewer when x has fewer), as a new tensor.
local function last_frames(x, n)
    local t = x.shape[3]
    local k = math.min(t, n)
    return x:narrow(2, t - k, k):clone()
end

-- A causal conv with diffusers' feature cache (see the header): ctx maps the conv to the cached
-- frames of its input; ctx nil: no cache (zero padding).
local function cached_conv(conv, x, ctx)
    if ctx == nil then return conv(x) end
    local old = ctx[conv]
    local cache_x = last_frames(x, M.CACHE_T)
    if cache_x.shape[3] < 2 and old ~= nil then
        local prev = old:narrow(2, old.shape[3] - 1, 1)
        local c2 = F.cat({prev, cache_x}, 2)
        free(cache_x)
        cache_x = c2
    end
    local y = conv(x, old)
    ctx[conv] = cache_x
    if old ~= nil then free(old) end
    return y
end
M.cached_conv = cached_conv

-- ==== WanRMS_norm ====

-- WanRMS_norm(dim, {images=true, bias=false, dtype=, device=}): gamma (dim, 1, 1) for images
-- (4-D inputs), (dim, 1, 1, 1) otherwise; bias of the same shape when asked (never in the Wan
-- VAE). forward(x) = normalize(x, dim 1) * dim^0.5 * gamma (+ bias).
local WanRMS_norm = class("nemo.models.wan_vae.WanRMS_norm", nn.Module)
M.WanRMS_norm = WanRMS_norm
function WanRMS_norm:__init(dim, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    local shape = opts.images == false and {dim, 1, 1, 1} or {dim, 1, 1}
    self.dim = dim
    self.scale = dim ^ 0.5                          -- Python's dim**0.5 (the same libm pow)
    self.gamma = nn.Parameter(Tensor.ones(shape, fo))
    if opts.bias then self.bias = nn.Parameter(Tensor.zeros(shape, fo)) end
end
function WanRMS_norm:forward(x)
    local low = x.dtype == "bfloat16" or x.dtype == "float16"
    local xin = low and x:to{dtype = "float32"} or x
    local n = F.normalize(xin, 2, 1)
    if low then
        free(xin)
        local c = n:to{dtype = x.dtype}
        free(n)
        n = c
    end
    local s = n * self.scale
    free(n)
    local y = s * self.gamma
    free(s)
    if self.bias ~= nil then
        local b = y + self.bias
        free(y)
        y = b
    end
    return y
end
function WanRMS_norm:extra_repr() return string.format("dim=%d", self.dim) end

-- ==== per-frame 2-D ops on (B, C, T, H, W) ====

-- (B, C, T, H, W) -> (B*T, C, H, W) (a copy)
local function frames_to_batch(x)
    local s = x.shape
    local p = x:permute(0, 2, 1, 3, 4)
    return p:reshape(s[1] * s[3], s[2], s[4], s[5])
end
-- (B*T, C, H, W) -> (B, C, T, H, W) (a view)
local function batch_to_frames(y, B, T)
    local s = y.shape
    return y:view(B, T, s[2], s[3], s[4]):permute(0, 2, 1, 3, 4)
end

-- ==== WanResample ====

-- WanResample(dim, mode, {upsample_out_dim=dim/2, dtype=, device=}); mode "upsample2d",
-- "upsample3d", "downsample2d", "downsample3d" or "none". Children as diffusers':
-- resample = Sequential(Upsample | ZeroPad2d, Conv2d) (so resample.1.weight), time_conv (3d
-- modes). forward(x (B, C, T, H, W), ctx) with the feature cache rules of the header.
local ResampleOp = class("nemo.models.wan_vae.ResampleOp", nn.Module)   -- resample.0: no parameters
function ResampleOp:__init(kind)
    nn.Module.__init(self)
    self.kind = kind
end
function ResampleOp:forward(x)
    if self.kind == "upsample" then return F.interpolate(x, {scale_factor = {2.0, 2.0}, mode = "nearest-exact"}) end
    return F.pad(x, {0, 1, 0, 1})
end
function ResampleOp:extra_repr()
    return self.kind == "upsample" and "scale_factor=(2.0, 2.0), mode='nearest-exact'" or "ZeroPad2d((0, 1, 0, 1))"
end

local WanResample = class("nemo.models.wan_vae.WanResample", nn.Module)
M.WanResample = WanResample
function WanResample:__init(dim, mode, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    self.dim = dim
    self.mode = mode
    local up_out = opts.upsample_out_dim or math.floor(dim / 2)
    local function conv2d(cin, cout, o)
        return nn.Conv2d(cin, cout, 3, {stride = o.stride or 1, padding = o.padding or 0, dtype = fo.dtype,
            device = fo.device})
    end
    if mode == "upsample2d" or mode == "upsample3d" then
        self.resample = nn.Sequential(ResampleOp("upsample"), conv2d(dim, up_out, {padding = 1}))
        if mode == "upsample3d" then
            self.time_conv = WanCausalConv3d(dim, dim * 2, {3, 1, 1}, {padding = {1, 0, 0}, dtype = fo.dtype,
                device = fo.device})
        end
    elseif mode == "downsample2d" or mode == "downsample3d" then
        self.resample = nn.Sequential(ResampleOp("pad"), conv2d(dim, dim, {stride = 2}))
        if mode == "downsample3d" then
            self.time_conv = WanCausalConv3d(dim, dim, {3, 1, 1}, {stride = {2, 1, 1}, padding = 0, dtype = fo.dtype,
                device = fo.device})
        end
    elseif mode == "none" then
        self.resample = nn.Identity()
    else
        error(string.format("WanResample: unknown mode '%s' (upsample2d, upsample3d, downsample2d, downsample3d, none)",
            tostring(mode)), 2)
    end
end

-- the per-frame spatial part: resample.1 (Conv2d) after resample.0 (upsample or zero pad)
function WanResample:spatial(x)
    if self.mode == "none" then return x end
    local B, T = x.shape[1], x.shape[3]
    local xb = frames_to_batch(x)
    local conv = self.resample:get(2)
    local y
    if self.mode == "downsample2d" or self.mode == "downsample3d" then
        -- ZeroPad2d((0, 1, 0, 1)) inside the conv: the same sums
        y = F.conv2d(xb, conv.weight, conv.bias, {stride = 2, padding = {{0, 1}, {0, 1}}})
    else
        local u = self.resample:get(1)(xb)
        y = conv(u)
        free(u)
    end
    free(xb)
    return batch_to_frames(y, B, T)
end

function WanResample:forward(x, ctx)
    local h = x
    if self.mode == "upsample3d" and ctx ~= nil then
        local tc = self.time_conv
        local old = ctx[tc]
        if old == nil then
            ctx[tc] = "Rep"
        else
            local b, c, t, hh, ww = x.shape[1], x.shape[2], x.shape[3], x.shape[4], x.shape[5]
            local cache_x = last_frames(x, M.CACHE_T)
            if cache_x.shape[3] < 2 then
                local front = old ~= "Rep" and old:narrow(2, old.shape[3] - 1, 1) or Tensor.zeros_like(cache_x)
                local c2 = F.cat({front, cache_x}, 2)
                free(cache_x)
                if old == "Rep" then free(front) end
                cache_x = c2
            end
            local y
            if old == "Rep" then y = tc(x) else y = tc(x, old) end
            ctx[tc] = cache_x
            if old ~= "Rep" then free(old) end
            -- (b, 2c, t) -> (b, 2, c, t) -> stack((y[:, 0], y[:, 1]), 3) -> (b, c, 2t)
            local v = y:view(b, 2, c, t, hh, ww):permute(0, 2, 3, 1, 4, 5)
            h = v:reshape(b, c, 2 * t, hh, ww)
            free(y)
        end
    end
    local s = self:spatial(h)
    if not rawequal(h, x) then free(h) end
    h = s
    if self.mode == "downsample3d" and ctx ~= nil then
        local tc = self.time_conv
        local old = ctx[tc]
        if old == nil then
            ctx[tc] = h:clone()
        else
            local cache_x = last_frames(h, 1)
            local inp = F.cat({old:narrow(2, old.shape[3] - 1, 1), h}, 2)
            local y = tc(inp)
            free(inp, h, old)
            ctx[tc] = cache_x
            h = y
        end
    end
    return h
end
function WanResample:extra_repr() return string.format("dim=%d, mode=%s", self.dim, self.mode) end

-- ==== WanResidualBlock ====

-- h + s with s released, and h too unless it is x (the block input the caller still owns)
local function add_shortcut(h, s, x)
    local out = h + s
    free(s)
    if not rawequal(h, x) then free(h) end
    return out
end

-- WanResidualBlock(in_dim, out_dim, {dropout=0, non_linearity="silu", dtype=, device=}): norm1,
-- conv1, norm2, dropout, conv2, conv_shortcut (1x1x1, when in_dim ~= out_dim).
-- forward(x, ctx) = conv2(drop(act(norm2(conv1(act(norm1(x))))))) + shortcut(x), conv1 and
-- conv2 cached.
local WanResidualBlock = class("nemo.models.wan_vae.WanResidualBlock", nn.Module)
M.WanResidualBlock = WanResidualBlock
function WanResidualBlock:__init(in_dim, out_dim, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    self.in_dim, self.out_dim = in_dim, out_dim
    self.nonlinearity = common.get_activation(opts.non_linearity or "silu")
    self.norm1 = WanRMS_norm(in_dim, {images = false, dtype = fo.dtype, device = fo.device})
    self.conv1 = WanCausalConv3d(in_dim, out_dim, 3, {padding = 1, dtype = fo.dtype, device = fo.device})
    self.norm2 = WanRMS_norm(out_dim, {images = false, dtype = fo.dtype, device = fo.device})
    self.dropout = nn.Dropout(opts.dropout or 0.0)
    self.conv2 = WanCausalConv3d(out_dim, out_dim, 3, {padding = 1, dtype = fo.dtype, device = fo.device})
    if in_dim ~= out_dim then
        self.conv_shortcut = WanCausalConv3d(in_dim, out_dim, 1, {dtype = fo.dtype, device = fo.device})
    end
end
function WanResidualBlock:forward(x, ctx)
    local h = self.conv_shortcut ~= nil and self.conv_shortcut(x) or x
    local n = self.norm1(x)
    local a = self.nonlinearity(n)
    free(n)
    local y = cached_conv(self.conv1, a, ctx)
    free(a)
    n = self.norm2(y)
    free(y)
    a = self.nonlinearity(n)
    free(n)
    local d = self.dropout(a)
    if not rawequal(d, a) then free(a) end
    y = cached_conv(self.conv2, d, ctx)
    free(d)
    return add_shortcut(h, y, x)
end

-- ==== WanAttentionBlock ====

-- WanAttentionBlock(dim, {dtype=, device=}): norm (RMS, gamma (dim, 1, 1)), to_qkv (1x1 Conv2d,
-- dim -> 3 dim), proj (1x1 Conv2d). forward(x (B, C, T, H, W)) -> same shape: single-head
-- attention over the H*W positions of each frame, + x.
local WanAttentionBlock = class("nemo.models.wan_vae.WanAttentionBlock", nn.Module)
M.WanAttentionBlock = WanAttentionBlock
function WanAttentionBlock:__init(dim, opts)
    local fo = factory(opts)
    nn.Module.__init(self)
    self.dim = dim
    self.norm = WanRMS_norm(dim, {images = true, dtype = fo.dtype, device = fo.device})
    self.to_qkv = nn.Conv2d(dim, dim * 3, 1, {dtype = fo.dtype, device = fo.device})
    self.proj = nn.Conv2d(dim, dim, 1, {dtype = fo.dtype, device = fo.device})
end
function WanAttentionBlock:forward(x)
    if not is_tensor(x) or x:dim() ~= 5 or x.shape[2] ~= self.dim then
        error(string.format("WanAttentionBlock: expected (B, %d, T, H, W), got %s", self.dim,
            is_tensor(x) and shape_str(x.shape) or type(x)), 2)
    end
    local B, C, T, H, W = x.shape[1], x.shape[2], x.shape[3], x.shape[4], x.shape[5]
    local BT, HW = B * T, H * W
    local xb = frames_to_batch(x)
    local n = self.norm(xb)
    free(xb)
    local qkv = self.to_qkv(n)                                  -- (BT, 3C, H, W)
    free(n)
    local r = qkv:reshape(BT, 1, 3 * C, HW):permute(0, 1, 3, 2):contiguous()   -- (BT, 1, HW, 3C)
    free(qkv)
    local q, k, v = unpack(r:chunk(3, -1))
    local o = F.scaled_dot_product_attention(q, k, v)           -- (BT, 1, HW, C)
    free(r)
    local ob = o:squeeze(1):permute(0, 2, 1):reshape(BT, C, H, W)
    free(o)
    local p = self.proj(ob)
    free(ob)
    local y = batch_to_frames(p, B, T)
    local out = y + x
    free(p)
    return out
end
function WanAttentionBlock:extra_repr() return string.format("dim=%d", self.dim) end

-- ==== WanMidBlock ====

-- WanMidBlock(dim, {dropout=0, non_linearity="silu", num_layers=1, dtype=, device=}): attentions,
-- resnets (registered in that order); resnets[1], then (attention, resnet) num_layers times.
local WanMidBlock = class("nemo.models.wan_vae.WanMidBlock", nn.Module)
M.WanMidBlock = WanMidBlock
function WanMidBlock:__init(dim, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    self.dim = dim
    local function resnet()
        return WanResidualBlock(dim, dim, {dropout = opts.dropout, non_linearity = opts.non_linearity,
            dtype = fo.dtype, device = fo.device})
    end
    local resnets, attentions = {resnet()}, {}
    for i = 1, opts.num_layers or 1 do
        attentions[i] = WanAttentionBlock(dim, fo)
        resnets[#resnets + 1] = resnet()
    end
    self.attentions = nn.ModuleList(attentions)
    self.resnets = nn.ModuleList(resnets)
end
function WanMidBlock:forward(x, ctx)
    local h = self.resnets:get(1)(x, ctx)
    for i = 2, self.resnets:len() do
        local a = self.attentions:get(i - 1)(h)
        free(h)
        h = self.resnets:get(i)(a, ctx)
        free(a)
    end
    return h
end

-- ==== the shared body of the up / down blocks ====

-- resnets(x) in order, then resample (a WanResample or nil); x itself is never freed
local function resnets_then(x, ctx, resnets, resample)
    local h = x
    for _, r in resnets:iter() do
        local y = r(h, ctx)
        if not rawequal(h, x) then free(h) end
        h = y
    end
    if resample ~= nil then
        local y = resample(h, ctx)
        if not rawequal(h, x) and not rawequal(y, h) then free(h) end
        h = y
    end
    return h
end

-- ==== Wan 2.2's residual down / up blocks ====

-- AvgDown3D(in_channels, out_channels, factor_t, factor_s): no parameters. forward(x (B, C, T, H,
-- W)): zero frames in FRONT up to a multiple of factor_t, then each factor_t x factor_s x
-- factor_s block of positions becomes channels (c, t, h, w order), and groups of in * factor /
-- out of those channels are averaged: (B, out, T / ft, H / fs, W / fs).
local AvgDown3D = class("nemo.models.wan_vae.AvgDown3D", nn.Module)
M.AvgDown3D = AvgDown3D
-- the fields AvgDown3D and DupUp3D share: channels, factors, and many * factor / few, the channels
-- grouped (AvgDown3D: in -> out) or repeated (DupUp3D: out from in), which must divide
local function shuffle_init(self, cls, in_channels, out_channels, factor_t, factor_s, many, few)
    nn.Module.__init(self)
    self.in_channels, self.out_channels = in_channels, out_channels
    self.factor_t, self.factor_s = factor_t, factor_s or 1
    self.factor = self.factor_t * self.factor_s * self.factor_s
    local nm, fw = many == "in" and in_channels or out_channels, few == "in" and in_channels or out_channels
    if (nm * self.factor) % fw ~= 0 then
        error(string.format("%s: %s_channels * factor (%d * %d) is not a multiple of %s_channels %d", cls, many, nm,
            self.factor, few, fw), 3)
    end
    return nm * self.factor / fw
end
local function shuffle_repr(self)
    return string.format("in=%d, out=%d, factor_t=%d, factor_s=%d", self.in_channels, self.out_channels,
        self.factor_t, self.factor_s)
end

function AvgDown3D:__init(in_channels, out_channels, factor_t, factor_s)
    self.group_size = shuffle_init(self, "AvgDown3D", in_channels, out_channels, factor_t, factor_s, "in", "out")
end
function AvgDown3D:forward(x)
    local ft, fs = self.factor_t, self.factor_s
    local pad_t = (ft - x.shape[3] % ft) % ft
    local xp = pad_t > 0 and F.pad(x, {0, 0, 0, 0, pad_t, 0}) or x
    local B, C, T, H, W = xp.shape[1], xp.shape[2], xp.shape[3], xp.shape[4], xp.shape[5]
    local p = xp:view(B, C, T / ft, ft, H / fs, fs, W / fs, fs):permute(0, 1, 3, 5, 7, 2, 4, 6):contiguous()
    if not rawequal(xp, x) then free(xp) end
    local g = p:view(B, self.out_channels, self.group_size, T / ft, H / fs, W / fs)
    local y = g:mean(2)
    free(p)
    return y
end
AvgDown3D.extra_repr = shuffle_repr

-- DupUp3D(in_channels, out_channels, factor_t, factor_s): no parameters. forward(x, first_chunk):
-- each channel repeated out * factor / in times (repeat_interleave), the repeats spread over
-- factor_t x factor_s x factor_s positions: (B, out, T ft, H fs, W fs); on the first chunk the
-- first factor_t - 1 frames are dropped (matching upsample3d's single first frame).
local DupUp3D = class("nemo.models.wan_vae.DupUp3D", nn.Module)
M.DupUp3D = DupUp3D
function DupUp3D:__init(in_channels, out_channels, factor_t, factor_s)
    self.repeats = shuffle_init(self, "DupUp3D", in_channels, out_channels, factor_t, factor_s, "out", "in")
end
function DupUp3D:forward(x, first_chunk)
    local ft, fs = self.factor_t, self.factor_s
    local B, C, T, H, W = x.shape[1], x.shape[2], x.shape[3], x.shape[4], x.shape[5]
    -- repeat_interleave(repeats, dim 1): channel c -> c * repeats .. c * repeats + repeats - 1
    local r = x:unsqueeze(2):expand(B, C, self.repeats, T, H, W):reshape(B, C * self.repeats, T, H, W)
    local v = r:view(B, self.out_channels, ft, fs, fs, T, H, W):permute(0, 1, 5, 2, 6, 3, 7, 4)
        :reshape(B, self.out_channels, T * ft, H * fs, W * fs)
    free(r)
    if first_chunk and ft > 1 then
        local c = v:narrow(2, ft - 1, T * ft - (ft - 1)):contiguous()
        free(v)
        v = c
    end
    return v
end
DupUp3D.extra_repr = shuffle_repr

-- WanResidualDownBlock(in_dim, out_dim, dropout, num_res_blocks, temperal_downsample, down_flag,
-- {dtype=, device=}): avg_shortcut (AvgDown3D: factor_t 2 when temperal_downsample, factor_s 2
-- when down_flag), resnets, downsampler (WanResample downsample3d / downsample2d when
-- down_flag). forward(x, ctx) = downsampler(resnets(x)) + avg_shortcut(x).
local WanResidualDownBlock = class("nemo.models.wan_vae.WanResidualDownBlock", nn.Module)
M.WanResidualDownBlock = WanResidualDownBlock
function WanResidualDownBlock:__init(in_dim, out_dim, dropout, num_res_blocks, temperal_downsample, down_flag, fo)
    nn.Module.__init(self)
    self.avg_shortcut = AvgDown3D(in_dim, out_dim, temperal_downsample and 2 or 1, down_flag and 2 or 1)
    local resnets = {}
    for i = 1, num_res_blocks do
        resnets[i] = WanResidualBlock(in_dim, out_dim, {dropout = dropout, dtype = fo.dtype, device = fo.device})
        in_dim = out_dim
    end
    self.resnets = nn.ModuleList(resnets)
    if down_flag then
        self.downsampler = WanResample(out_dim, temperal_downsample and "downsample3d" or "downsample2d", fo)
    end
end
function WanResidualDownBlock:forward(x, ctx)
    return add_shortcut(resnets_then(x, ctx, self.resnets, self.downsampler), self.avg_shortcut(x), x)
end

-- WanResidualUpBlock(in_dim, out_dim, num_res_blocks, {dropout=, temperal_upsample=false,
-- up_flag=false, non_linearity=, dtype=, device=}): avg_shortcut (DupUp3D, factor_t 2 when
-- temperal_upsample, factor_s 2; only when up_flag), resnets (num_res_blocks + 1), upsampler
-- (WanResample upsample3d / upsample2d to out_dim channels, when up_flag).
-- forward(x, ctx, first_chunk) = upsampler(resnets(x)) + avg_shortcut(x, first_chunk).
local WanResidualUpBlock = class("nemo.models.wan_vae.WanResidualUpBlock", nn.Module)
M.WanResidualUpBlock = WanResidualUpBlock
function WanResidualUpBlock:__init(in_dim, out_dim, num_res_blocks, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.in_dim, self.out_dim = in_dim, out_dim
    if opts.up_flag then
        self.avg_shortcut = DupUp3D(in_dim, out_dim, opts.temperal_upsample and 2 or 1, 2)
    end
    local resnets, cur = {}, in_dim
    for i = 1, num_res_blocks + 1 do
        resnets[i] = WanResidualBlock(cur, out_dim, {dropout = opts.dropout, non_linearity = opts.non_linearity,
            dtype = fo.dtype, device = fo.device})
        cur = out_dim
    end
    self.resnets = nn.ModuleList(resnets)
    if opts.up_flag then
        self.upsampler = WanResample(out_dim, opts.temperal_upsample and "upsample3d" or "upsample2d",
            {upsample_out_dim = out_dim, dtype = fo.dtype, device = fo.device})
    end
end
function WanResidualUpBlock:forward(x, ctx, first_chunk)
    local h = resnets_then(x, ctx, self.resnets, self.upsampler)
    if self.avg_shortcut == nil then return h end
    return add_shortcut(h, self.avg_shortcut(x, first_chunk), x)
end

-- ==== encoder / decoder ====

-- WanEncoder3d{in_channels=3, dim=, z_dim= (its output channels: 2 * the VAE's z_dim),
-- dim_mult=, num_res_blocks=, attn_scales=, temperal_downsample=, dropout=, non_linearity=,
-- is_residual=false (Wan 2.2: one WanResidualDownBlock per level instead of the flat list),
-- dtype=, device=}: conv_in, down_blocks (a flat list: resnets, attention blocks at the
-- attn_scales, resamples), mid_block, norm_out, conv_out. forward(x chunk, ctx).
local WanEncoder3d = class("nemo.models.wan_vae.WanEncoder3d", nn.Module)
M.WanEncoder3d = WanEncoder3d
function WanEncoder3d:__init(o)
    nn.Module.__init(self)
    local fo = factory(o)
    local dim, dim_mult = o.dim, o.dim_mult
    self.dim, self.z_dim = dim, o.z_dim
    self.nonlinearity = common.get_activation(o.non_linearity or "silu")
    local dims = {dim}
    for i, u in ipairs(dim_mult) do dims[i + 1] = dim * u end
    local scale = 1.0
    self.has_down_attention = false
    self.conv_in = WanCausalConv3d(o.in_channels or 3, dims[1], 3, {padding = 1, dtype = fo.dtype, device = fo.device})
    local blocks = {}
    local out_dim
    for i = 1, #dim_mult do
        local in_dim
        in_dim, out_dim = dims[i], dims[i + 1]
        if o.is_residual then   -- Wan 2.2: one residual down block per level
            local last = i == #dim_mult
            blocks[#blocks + 1] = WanResidualDownBlock(in_dim, out_dim, o.dropout, o.num_res_blocks,
                not last and o.temperal_downsample[i] or false, not last, fo)
            goto continue
        end
        for _ = 1, o.num_res_blocks do
            blocks[#blocks + 1] = WanResidualBlock(in_dim, out_dim, {dropout = o.dropout, dtype = fo.dtype,
                device = fo.device})
            for _, s in ipairs(o.attn_scales) do
                if s == scale then
                    blocks[#blocks + 1] = WanAttentionBlock(out_dim, fo)
                    self.has_down_attention = true
                    break
                end
            end
            in_dim = out_dim
        end
        if i ~= #dim_mult then
            local mode = o.temperal_downsample[i] and "downsample3d" or "downsample2d"
            blocks[#blocks + 1] = WanResample(out_dim, mode, fo)
            scale = scale / 2.0
        end
        ::continue::
    end
    self.down_blocks = nn.ModuleList(blocks)
    self.mid_block = WanMidBlock(out_dim, {dropout = o.dropout, non_linearity = o.non_linearity, num_layers = 1,
        dtype = fo.dtype, device = fo.device})
    self.norm_out = WanRMS_norm(out_dim, {images = false, dtype = fo.dtype, device = fo.device})
    self.conv_out = WanCausalConv3d(out_dim, o.z_dim, 3, {padding = 1, dtype = fo.dtype, device = fo.device})
end
function WanEncoder3d:forward(x, ctx)
    local h = cached_conv(self.conv_in, x, ctx)
    for _, layer in self.down_blocks:iter() do
        local y
        if class.isinstance(layer, WanAttentionBlock) then
            if ctx ~= nil then
                error("AutoencoderKLWan: attention blocks inside the encoder's down_blocks (attn_scales non-empty) " ..
                    "are not supported: diffusers' encoder passes them feat_cache and fails with a TypeError", 0)
            end
            y = layer(h)
        else
            y = layer(h, ctx)
        end
        free(h)
        h = y
    end
    local y = self.mid_block(h, ctx)
    free(h)
    local n = self.norm_out(y)
    free(y)
    local a = self.nonlinearity(n)
    free(n)
    local out = cached_conv(self.conv_out, a, ctx)
    free(a)
    return out
end

-- WanUpBlock(in_dim, out_dim, num_res_blocks, {dropout=, upsample_mode=nil, non_linearity=,
-- dtype=, device=}): resnets (num_res_blocks + 1), upsamplers = {WanResample} when upsampling.
local WanUpBlock = class("nemo.models.wan_vae.WanUpBlock", nn.Module)
M.WanUpBlock = WanUpBlock
function WanUpBlock:__init(in_dim, out_dim, num_res_blocks, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    self.in_dim, self.out_dim = in_dim, out_dim
    local resnets, cur = {}, in_dim
    for i = 1, num_res_blocks + 1 do
        resnets[i] = WanResidualBlock(cur, out_dim, {dropout = opts.dropout, non_linearity = opts.non_linearity,
            dtype = fo.dtype, device = fo.device})
        cur = out_dim
    end
    self.resnets = nn.ModuleList(resnets)
    if opts.upsample_mode ~= nil then
        self.upsamplers = nn.ModuleList{WanResample(out_dim, opts.upsample_mode, fo)}
    end
end
function WanUpBlock:forward(x, ctx)
    return resnets_then(x, ctx, self.resnets, self.upsamplers and self.upsamplers:get(1))
end

-- WanDecoder3d{dim=, z_dim=, dim_mult=, num_res_blocks=, temperal_upsample=, dropout=,
-- non_linearity=, out_channels=3, is_residual=false (Wan 2.2: WanResidualUpBlocks, no channel
-- halving between levels), dtype=, device=}: conv_in, mid_block, up_blocks, norm_out,
-- conv_out. forward(z frame, ctx, first_chunk).
local WanDecoder3d = class("nemo.models.wan_vae.WanDecoder3d", nn.Module)
M.WanDecoder3d = WanDecoder3d
function WanDecoder3d:__init(o)
    nn.Module.__init(self)
    local fo = factory(o)
    local dim, dim_mult = o.dim, o.dim_mult
    self.dim, self.z_dim = dim, o.z_dim
    self.nonlinearity = common.get_activation(o.non_linearity or "silu")
    local dims = {dim * dim_mult[#dim_mult]}
    for i = #dim_mult, 1, -1 do dims[#dims + 1] = dim * dim_mult[i] end
    self.conv_in = WanCausalConv3d(o.z_dim, dims[1], 3, {padding = 1, dtype = fo.dtype, device = fo.device})
    self.mid_block = WanMidBlock(dims[1], {dropout = o.dropout, non_linearity = o.non_linearity, num_layers = 1,
        dtype = fo.dtype, device = fo.device})
    local blocks = {}
    local out_dim
    for i = 1, #dim_mult do
        local in_dim = dims[i]
        out_dim = dims[i + 1]
        if i > 1 and not o.is_residual then in_dim = math.floor(in_dim / 2) end   -- wan 2.1: the resample halved it
        local up_flag = i ~= #dim_mult
        if o.is_residual then
            blocks[i] = WanResidualUpBlock(in_dim, out_dim, o.num_res_blocks, {dropout = o.dropout,
                temperal_upsample = up_flag and o.temperal_upsample[i] or false, up_flag = up_flag,
                non_linearity = o.non_linearity, dtype = fo.dtype, device = fo.device})
        else
            local mode
            if up_flag then mode = o.temperal_upsample[i] and "upsample3d" or "upsample2d" end
            blocks[i] = WanUpBlock(in_dim, out_dim, o.num_res_blocks, {dropout = o.dropout, upsample_mode = mode,
                non_linearity = o.non_linearity, dtype = fo.dtype, device = fo.device})
        end
    end
    self.up_blocks = nn.ModuleList(blocks)
    self.norm_out = WanRMS_norm(out_dim, {images = false, dtype = fo.dtype, device = fo.device})
    self.conv_out = WanCausalConv3d(out_dim, o.out_channels or 3, 3, {padding = 1, dtype = fo.dtype,
        device = fo.device})
end
function WanDecoder3d:forward(x, ctx, first_chunk)
    local h = cached_conv(self.conv_in, x, ctx)
    local y = self.mid_block(h, ctx)
    free(h)
    h = y
    for _, b in self.up_blocks:iter() do
        y = b(h, ctx, first_chunk)
        free(h)
        h = y
    end
    local n = self.norm_out(h)
    free(h)
    local a = self.nonlinearity(n)
    free(n)
    local out = cached_conv(self.conv_out, a, ctx)
    free(a)
    return out
end

-- ==== config ====

local WAN21_MEAN = {-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921}
local WAN21_STD = {2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                   1.6382, 1.1253, 2.8251, 1.9160}

-- diffusers' register_to_config fields of AutoencoderKLWan, in signature order.
local CONFIG = {
    {"base_dim", "int", 96},
    {"decoder_base_dim", "int?", null},
    {"z_dim", "int", 16},
    {"dim_mult", "ints", {1, 2, 4, 4}},
    {"num_res_blocks", "int", 2},
    {"attn_scales", "numbers", {}},
    {"temperal_downsample", "bools", {false, true, true}},
    {"dropout", "number", 0.0},
    {"latents_mean", "numbers", WAN21_MEAN},
    {"latents_std", "numbers", WAN21_STD},
    {"is_residual", "bool", false},
    {"in_channels", "int", 3},
    {"out_channels", "int", 3},
    {"patch_size", "int?", null},
    {"scale_factor_temporal", "int?", 4},
    {"scale_factor_spatial", "int?", 8},
}
M.CONFIG_FIELDS = CONFIG

-- The full config: defaults for absent keys, "_"-keys dropped, unknown keys warned about on
-- stderr, wrong types or values an error naming the key (common.check_config; lists may be
-- empty); the Wan 2.2 settings an error.
local function resolve_config(cfg, who)
    local out = common.check_config(CONFIG, cfg, {who = who, class = "AutoencoderKLWan", level = 3})
    -- values
    for _, key in ipairs {"base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"} do
        if out[key] < 1 then error(string.format("%s: config key '%s' must be at least 1, got %d", who, key, out[key]), 3) end
    end
    if out.decoder_base_dim ~= null and out.decoder_base_dim < 1 then
        error(string.format("%s: config key 'decoder_base_dim' must be at least 1 or null, got %d", who,
            out.decoder_base_dim), 3)
    end
    if #out.dim_mult < 1 then error(who .. ": config key 'dim_mult' must have at least one entry", 3) end
    for i, u in ipairs(out.dim_mult) do
        if u < 1 then error(string.format("%s: config key 'dim_mult' entry %d must be at least 1, got %d", who, i, u), 3) end
    end
    if #out.temperal_downsample ~= #out.dim_mult - 1 then
        error(string.format("%s: config key 'temperal_downsample' must have one entry per downsample, #dim_mult - 1 " ..
            "= %d, got %d", who, #out.dim_mult - 1, #out.temperal_downsample), 3)
    end
    if out.dropout < 0 or out.dropout >= 1 then
        error(string.format("%s: config key 'dropout' must be in [0, 1), got %s", who, tostring(out.dropout)), 3)
    end
    local p = out.patch_size ~= null and out.patch_size or 1
    if p < 1 then error(string.format("%s: config key 'patch_size' must be at least 1 or null, got %d", who, p), 3) end
    for _, key in ipairs {"in_channels", "out_channels"} do
        if out[key] % (p * p) ~= 0 then
            error(string.format("%s: config key '%s' (%d) must be a multiple of patch_size^2 = %d (patchify makes " ..
                "channels of p x p pixels)", who, key, out[key], p * p), 3)
        end
    end
    local ratio = 2 ^ (#out.dim_mult - 1) * p
    if out.scale_factor_spatial ~= null and out.scale_factor_spatial ~= ratio then
        error(string.format("%s: config key 'scale_factor_spatial' is %d but the model downsamples by %d " ..
            "(2^(#dim_mult - 1) x patch_size)", who, out.scale_factor_spatial, ratio), 3)
    end
    return out
end
M.resolve_config = resolve_config

-- ==== the model ====

local AutoencoderKLWan = class("nemo.models.AutoencoderKLWan", nn.Module)
M.AutoencoderKLWan = AutoencoderKLWan
AutoencoderKLWan._no_split_modules = {"WanResidualBlock"}

-- AutoencoderKLWan(config, {dtype=, device=}): config holds diffusers' config fields (absent
-- ones take diffusers' defaults: the Wan 2.1 VAE). Children: encoder, quant_conv,
-- post_quant_conv, decoder (diffusers' order).
function AutoencoderKLWan:__init(config, opts)
    nn.Module.__init(self)
    local cfg = resolve_config(config, "AutoencoderKLWan")
    local fo = factory(opts)
    self.config = cfg
    self.z_dim = cfg.z_dim
    self.temperal_downsample = cfg.temperal_downsample
    local up = {}
    for i = #cfg.temperal_downsample, 1, -1 do up[#up + 1] = cfg.temperal_downsample[i] end
    self.temperal_upsample = up
    local decoder_base_dim = cfg.decoder_base_dim ~= null and cfg.decoder_base_dim or cfg.base_dim
    self.encoder = WanEncoder3d{in_channels = cfg.in_channels, dim = cfg.base_dim, z_dim = 2 * cfg.z_dim,
        dim_mult = cfg.dim_mult, num_res_blocks = cfg.num_res_blocks, attn_scales = cfg.attn_scales,
        temperal_downsample = cfg.temperal_downsample, dropout = cfg.dropout, is_residual = cfg.is_residual,
        dtype = fo.dtype, device = fo.device}
    self.quant_conv = WanCausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, fo)
    self.post_quant_conv = WanCausalConv3d(cfg.z_dim, cfg.z_dim, 1, fo)
    self.decoder = WanDecoder3d{dim = decoder_base_dim, z_dim = cfg.z_dim, dim_mult = cfg.dim_mult,
        num_res_blocks = cfg.num_res_blocks, temperal_upsample = up, dropout = cfg.dropout,
        out_channels = cfg.out_channels, is_residual = cfg.is_residual, dtype = fo.dtype, device = fo.device}
    -- Wan 2.2's patchify: p x p pixels become channels around the encoder and decoder
    self.patch_size = cfg.patch_size ~= null and cfg.patch_size or 1
    -- video pixels per latent pixel (2^(number of downsamples) x patch); frames per latent frame after the first
    self.spatial_compression_ratio = 2 ^ (#cfg.dim_mult - 1) * self.patch_size
    local tf = 1
    for _, t in ipairs(cfg.temperal_downsample) do if t then tf = tf * 2 end end
    self.temporal_compression_ratio = tf
    self.use_slicing = false
    self.use_tiling = false
    -- tiling's sizes (diffusers' defaults): 256 x 256-pixel tiles every 192 pixels
    self.tile_sample_min_height, self.tile_sample_min_width = 256, 256
    self.tile_sample_stride_height, self.tile_sample_stride_width = 192, 192
end

-- The dtype of the parameters (that of encoder.conv_in.weight).
function AutoencoderKLWan:dtype() return self.encoder.conv_in.weight.dtype end

-- slicing: encode / decode a batch one video at a time (less memory, the same values)
function AutoencoderKLWan:enable_slicing() self.use_slicing = true; return self end
function AutoencoderKLWan:disable_slicing() self.use_slicing = false; return self end
-- tiling: encode videos wider or taller than a tile, and decode latents wider or taller than a
-- tile / 8, in overlapping spatial tiles blended together (diffusers' tiled_encode /
-- tiled_decode; every frame of a tile goes through the causal caches of that tile): the memory
-- of one tile whatever the frame size; the result differs slightly from a whole pass.
-- enable_tiling(tile_sample_min_height, tile_sample_min_width, tile_sample_stride_height,
-- tile_sample_stride_width) as diffusers (nil keeps the current value: 256, 256, 192, 192), or
-- the same as one table. Sizes and strides are pixels, multiples of spatial_compression_ratio,
-- each stride at most its tile.
local TILE_KEYS = {"tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
                   "tile_sample_stride_width"}
function AutoencoderKLWan:enable_tiling(...)
    local args = {...}
    if type(args[1]) == "table" then
        for k in pairs(args[1]) do
            local known = false
            for _, key in ipairs(TILE_KEYS) do known = known or k == key end
            if not known then
                error(string.format("AutoencoderKLWan:enable_tiling: unknown option '%s' (%s)", tostring(k),
                    table.concat(TILE_KEYS, ", ")), 2)
            end
        end
        local t = args[1]
        args = {}
        for i, key in ipairs(TILE_KEYS) do args[i] = t[key] end
    end
    local v, r = {}, self.spatial_compression_ratio
    for i, key in ipairs(TILE_KEYS) do
        v[i] = args[i] == nil and self[key] or args[i]
        if type(v[i]) ~= "number" or v[i] < r or v[i] % r ~= 0 then
            error(string.format("AutoencoderKLWan:enable_tiling: %s must be a positive multiple of %d (the " ..
                "spatial compression), got %s", key, r, tostring(v[i])), 2)
        end
    end
    for i = 3, 4 do
        if v[i] > v[i - 2] then
            error(string.format("AutoencoderKLWan:enable_tiling: %s (%d) is larger than %s (%d): tiles would leave " ..
                "gaps", TILE_KEYS[i], v[i], TILE_KEYS[i - 2], v[i - 2]), 2)
        end
    end
    for i, key in ipairs(TILE_KEYS) do self[key] = v[i] end
    self.use_tiling = true
    return self
end
function AutoencoderKLWan:disable_tiling() self.use_tiling = false; return self end

-- release every tensor of a feature cache
local function clear_cache(ctx)
    for k, v in pairs(ctx) do
        if is_tensor(v) then free(v) end
        ctx[k] = nil
    end
end

-- a contiguous copy of video x's (.., i:i+h, j:j+w) tile (smaller at the edges)
local function tile_hw(x, i, j, h, w)
    local v = x:narrow(3, i, math.min(h, x.shape[4] - i)):narrow(4, j, math.min(w, x.shape[5] - j))
    return v:contiguous()
end

-- diffusers' patchify / unpatchify (Wan 2.2, patch_size p > 1): (B, C, F, H, W) <-> (B, C p p, F,
-- H / p, W / p), the channel index c * p * p + pw * p + ph (width's offset before height's).
local function patchify(x, p)
    local B, C, T, H, W = x.shape[1], x.shape[2], x.shape[3], x.shape[4], x.shape[5]
    return x:view(B, C, T, H / p, p, W / p, p):permute(0, 1, 6, 4, 2, 3, 5):reshape(B, C * p * p, T, H / p, W / p)
end
local function unpatchify(x, p)
    local B, CP, T, H, W = x.shape[1], x.shape[2], x.shape[3], x.shape[4], x.shape[5]
    local C = CP / (p * p)
    return x:view(B, C, p, p, T, H, W):permute(0, 1, 4, 5, 3, 6, 2):reshape(B, C, T, H * p, W * p)
end
M.patchify, M.unpatchify = patchify, unpatchify

-- diffusers' tiled_encode of a (patchified) video: tiles of tile_sample_min_* every
-- tile_sample_stride_* (patchified pixels, as diffusers counts them), each encoded alone with its
-- own caches; latent tiles blended over (tile - stride) / r' rows and columns, each keeping
-- stride / r', the whole cropped to H / r' x W / r' (r' = spatial_compression_ratio / patch_size).
function AutoencoderKLWan:_tiled_encode(x)
    local r = self.spatial_compression_ratio / self.patch_size
    local th, tw = self.tile_sample_min_height, self.tile_sample_min_width
    local sh, sw = self.tile_sample_stride_height, self.tile_sample_stride_width
    local lsh, lsw = math.floor(sh / r), math.floor(sw / r)
    return common.tiled({rows = common.origins(x.shape[4], sh), cols = common.origins(x.shape[5], sw),
        run = function(i, j)
            local t = tile_hw(x, i, j, th, tw)
            local enc = self:_encode_whole(t)
            free(t)
            return enc
        end}, {hdim = 3, wdim = 4, blend_h = math.floor(th / r) - lsh, blend_w = math.floor(tw / r) - lsw,
        keep_h = lsh, keep_w = lsw, out_h = math.floor(x.shape[4] / r), out_w = math.floor(x.shape[5] / r)})
end

-- _encode(x (1 or B videos)) -> the moments (B, 2 z_dim, 1 + k, H/r, W/r): patchified first
-- (Wan 2.2), tiled when tiling is on and a frame is larger than a tile.
function AutoencoderKLWan:_encode(x)
    local tiled = self.use_tiling and (x.shape[5] > self.tile_sample_min_width or x.shape[4] > self.tile_sample_min_height)
    local xp = self.patch_size > 1 and patchify(x, self.patch_size) or x
    local enc = tiled and self:_tiled_encode(xp) or self:_encode_whole(xp)
    if not rawequal(xp, x) then free(xp) end
    return enc
end

-- frame 0, then chunks of 4 frames through the encoder with one feature cache, cat in time,
-- quant_conv.
function AutoencoderKLWan:_encode_whole(x)
    local nf = x.shape[3]
    local ctx, outs = {}, {}
    local ok, err = pcall(function()
        for i = 0, (nf - 1) / 4 do
            local chunk = i == 0 and x:narrow(2, 0, 1) or x:narrow(2, 1 + 4 * (i - 1), 4)
            outs[#outs + 1] = self.encoder(chunk, ctx)
        end
    end)
    clear_cache(ctx)
    if not ok then
        free(unpack(outs))
        error(err, 0)
    end
    local out = #outs == 1 and outs[1] or F.cat(outs, 2)
    if #outs > 1 then free(unpack(outs)) end
    local enc = self.quant_conv(out)
    free(out)
    return enc
end

local function check_video(self, x, who)
    if not is_tensor(x) then error(string.format("AutoencoderKLWan:%s: expected a tensor, got %s", who, type(x)), 3) end
    local c = self.config.in_channels / (self.patch_size * self.patch_size)
    if x:dim() ~= 5 or x.shape[2] ~= c then
        error(string.format("AutoencoderKLWan:%s: expected a video (B, %d, F, H, W), got shape %s", who, c,
            shape_str(x.shape)), 3)
    end
    local nf = x.shape[3]
    if nf < 1 or (nf - 1) % 4 ~= 0 then
        error(string.format("AutoencoderKLWan:%s: expected F = 1 + 4k frames (1, 5, 9, ...: frame 0 alone, then " ..
            "chunks of 4), got F = %d in shape %s", who, nf, shape_str(x.shape)), 3)
    end
    local r = self.spatial_compression_ratio
    if x.shape[4] % r ~= 0 or x.shape[5] % r ~= 0 or x.shape[4] == 0 or x.shape[5] == 0 then
        error(string.format("AutoencoderKLWan:%s: expected H and W to be positive multiples of %d, got %dx%d (shape %s)",
            who, r, x.shape[4], x.shape[5], shape_str(x.shape)), 3)
    end
    if self.encoder.has_down_attention then
        local sc = {}
        for i, v in ipairs(self.config.attn_scales) do sc[i] = tostring(v) end
        error(string.format("AutoencoderKLWan:%s: attn_scales = {%s} puts attention blocks in the encoder's " ..
            "down_blocks, which diffusers' encoder cannot run (it passes them feat_cache: a TypeError); not " ..
            "supported (expected attn_scales = {}, as in every Wan 2.1 checkpoint)", who, table.concat(sc, ", ")), 3)
    end
end

-- encode(x (B, in_channels, 1 + 4k, H, W), {return_dict=true}) -> {latent_dist =
-- DiagonalGaussianDistribution} (its mean and logvar (B, z_dim, 1 + k, H/8, W/8));
-- return_dict=false: {posterior}, diffusers' tuple.
function AutoencoderKLWan:encode(x, opts)
    check_video(self, x, "encode")
    local h = common.sliced(self, x, function(p) return self:_encode(p) end)
    local posterior = M.DiagonalGaussianDistribution(h)
    if type(opts) == "table" and opts.return_dict == false then return {posterior} end
    return {latent_dist = posterior}
end

-- diffusers' tiled_decode: latent tiles of tile_sample_min_* / r every tile_sample_stride_* / r,
-- each decoded alone with its own caches (not clamped); decoded tiles (patchified: strides and
-- tiles / patch_size) blended over tile - stride rows and columns, each keeping stride, the whole
-- cropped to h r x w r (/ patch_size), unpatchified, then clamped.
function AutoencoderKLWan:_tiled_decode(z)
    local r, p = self.spatial_compression_ratio, self.patch_size
    local th, tw = self.tile_sample_min_height, self.tile_sample_min_width
    local sh, sw = self.tile_sample_stride_height, self.tile_sample_stride_width
    local psh, psw = math.floor(sh / p), math.floor(sw / p)
    local out = common.tiled({rows = common.origins(z.shape[4], math.floor(sh / r)),
        cols = common.origins(z.shape[5], math.floor(sw / r)),
        run = function(i, j)
            local t = tile_hw(z, i, j, math.floor(th / r), math.floor(tw / r))
            local dec = self:_decode_frames(t)
            free(t)
            return dec
        end}, {hdim = 3, wdim = 4, blend_h = math.floor(th / p) - psh, blend_w = math.floor(tw / p) - psw,
        keep_h = psh, keep_w = psw, out_h = math.floor(z.shape[4] * r / p), out_w = math.floor(z.shape[5] * r / p)})
    return self:_finish_decode(out)
end

-- the decoder's output -> the video: unpatchified (Wan 2.2), clamped to [-1, 1]
function AutoencoderKLWan:_finish_decode(out)
    if self.patch_size > 1 then
        local u = unpatchify(out, self.patch_size)
        free(out)
        out = u
    end
    local c = out:clamp(-1.0, 1.0)
    free(out)
    return c
end

-- _decode(z) -> the video, clamped to [-1, 1]; tiled when tiling is on and z is larger than a
-- tile / r.
function AutoencoderKLWan:_decode(z)
    local r = self.spatial_compression_ratio
    if self.use_tiling and (z.shape[5] > math.floor(self.tile_sample_min_width / r) or
                            z.shape[4] > math.floor(self.tile_sample_min_height / r)) then
        return self:_tiled_decode(z)
    end
    return self:_finish_decode(self:_decode_frames(z))
end

-- the video, not clamped: post_quant_conv on all of z, then the decoder one latent frame at a
-- time with one feature cache, cat in time.
function AutoencoderKLWan:_decode_frames(z)
    local x = self.post_quant_conv(z)
    local ctx, outs = {}, {}
    local ok, err = pcall(function()
        for i = 0, z.shape[3] - 1 do
            outs[#outs + 1] = self.decoder(x:narrow(2, i, 1), ctx, i == 0)
        end
    end)
    clear_cache(ctx)
    free(x)
    if not ok then
        free(unpack(outs))
        error(err, 0)
    end
    local out = #outs == 1 and outs[1] or F.cat(outs, 2)
    if #outs > 1 then free(unpack(outs)) end
    return out
end

-- decode(z (B, z_dim, T, h, w), {return_dict=true}) -> {sample = (B, out_channels, 1 + 4 (T - 1),
-- 8h, 8w)} in [-1, 1]; return_dict=false: {sample}. z is the raw latent (undo the pipeline's
-- latents_mean / latents_std normalisation first).
function AutoencoderKLWan:decode(z, opts)
    if not is_tensor(z) then error("AutoencoderKLWan:decode: expected a tensor, got " .. type(z), 2) end
    if z:dim() ~= 5 or z.shape[2] ~= self.config.z_dim or z.shape[3] < 1 then
        error(string.format("AutoencoderKLWan:decode: expected latents (B, %d, T, h, w) with T >= 1, got shape %s",
            self.config.z_dim, shape_str(z.shape)), 2)
    end
    local dec = common.sliced(self, z, function(p) return self:_decode(p) end)
    if type(opts) == "table" and opts.return_dict == false then return {dec} end
    return {sample = dec}
end

-- vae(sample, {sample_posterior=false, generator=, return_dict=true}) -> {sample = decoded}:
-- encode, take the posterior's mode (or a sample), decode.
function AutoencoderKLWan:forward(sample, opts)
    local out = common.autoencoder_forward(self, sample, opts, "AutoencoderKLWan")   -- no tail call: error levels
    return out
end

-- ==== files ====

-- AutoencoderKLWan.from_pretrained(folder, {torch_dtype="float32", device="cpu", subfolder=}):
-- folder/config.json and diffusion_pytorch_model.safetensors (or the sharded index), loaded
-- strictly, cast to torch_dtype (nemo.models.io.load_folder).
function AutoencoderKLWan.from_pretrained(folder, opts, more)
    if rawequal(folder, AutoencoderKLWan) then folder, opts = opts, more end   -- AutoencoderKLWan:from_pretrained(...)
    return mio.load_folder(folder, opts, {class_name = "AutoencoderKLWan",
        build = function(cfg, dtype)
            return common.without_init(function() return AutoencoderKLWan(cfg, {dtype = dtype}) end)
        end})
end

-- model:save_pretrained(folder, {max_shard_size="10GB"}): config.json (every field, with
-- _class_name and _diffusers_version, lists as JSON arrays, absent values null) and the weights.
function AutoencoderKLWan:save_pretrained(folder, opts)
    local cfg = common.config_json(self.config, "AutoencoderKLWan", M.DIFFUSERS_VERSION)
    return mio.write_folder(self, folder, cfg, opts, "AutoencoderKLWan:save_pretrained")
end

return M
