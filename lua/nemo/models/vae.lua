-- lua/nemo/models/vae.lua: AutoencoderKL (the FLUX.1 / SD / SDXL / SD3 image VAE) as diffusers
-- 0.40 defines and computes it (autoencoders/autoencoder_kl.py, autoencoders/vae.py,
-- resnet.py, downsampling.py, upsampling.py, unets/unet_2d_blocks.py, attention_processor.py):
-- the same module tree and parameter names, registered in the same order (so state_dict order
-- and a diffusers `vae/` folder's keys match), the same eps values and the same op order.
--
--   local vae = require("nemo.models.vae").AutoencoderKL.from_pretrained("FLUX.1-dev/vae")
--   local posterior = vae:encode(x).latent_dist           -- x (B, 3, H, W) in [-1, 1]
--   local z = posterior:sample(generator)                 -- or posterior:mode(), or sample{noise = n}
--   local latents = (z - vae.config.shift_factor) * vae.config.scaling_factor   -- what FLUX trains on
--   local image = vae:decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
--   local rec = vae(x, {sample_posterior = true, generator = g}).sample
--   vae:save_pretrained("out/vae")
--
-- The non-obvious rules:
-- - The Decoder registers up_blocks BEFORE mid_block (diffusers assigns the empty ModuleList
--   first), so the decoder's state_dict lists up_blocks.* then mid_block.*; it runs mid_block
--   first. In both mid blocks `attentions` is registered before `resnets`.
-- - Every GroupNorm of the VAE has eps 1e-6 (resnets, the mid-block attention, conv_norm_out).
-- - Downsample2D (padding 0) pads (left 0, right 1, top 0, bottom 1) before its stride-2 3x3
--   conv; the pad is done inside the conv (asymmetric zero padding, the same sums).
-- - Upsample2D is nearest x2 then a 3x3 conv. The encoder's final activation is always SiLU
--   (act_fn only chooses the resnets' nonlinearity).
-- - The mid-block attention is diffusers' Attention(_from_deprecated_attn_block) with
--   AttnProcessor2_0: GroupNorm over (B, C, H*W), then to_q/to_k/to_v Linear over channels on
--   (B, H*W, C), heads = C / attention_head_dim (= 1 in the VAE: attention_head_dim is C), SDPA
--   with scale 1/sqrt(head_dim), to_out.0, back to (B, C, H, W), + residual, / rescale_output_factor.
--   Old checkpoints naming these query/key/value/proj_attn load (renamed as diffusers does).
-- - No dtype upcasts: a bf16 VAE computes in bf16 (force_upcast is config only, for pipelines).
-- - DiagonalGaussianDistribution: mean, logvar = chunk(moments, 2, dim=1); logvar clamped to
--   [-30, 20]; std = exp(0.5 * logvar); var = exp(logvar).
-- - Tiling (enable_tiling) follows diffusers' _tiled_encode / tiled_decode: tile (i, j) blends
--   from the tile above and then the one to its left, each already blended (common.tiled).
-- Not implemented: the spatial-norm decoder
-- (MoVQ), block types other than DownEncoderBlock2D / UpDecoderBlock2D.
local class = require "nemo.class"
local nn = require "nemo.nn"
local Tensor = require "nemo.tensor"
local F = require "nemo.functional"
local autograd = require "nemo.autograd"
local json = require "nemo.json"
local common = require "nemo.models.common"
local mio = require "nemo.models.io"

local free, factory = common.free, common.factory
local is_tensor, shape_str = Tensor.is_tensor, Tensor.shape_str
local null = json.null

local M = {}

M.DIFFUSERS_VERSION = "0.40.0.dev0"   -- written into saved config.json, as diffusers does

local function conv2d(cin, cout, k, opts, fo)
    return nn.Conv2d(cin, cout, k, {stride = opts.stride or 1, padding = opts.padding or 0, dtype = fo.dtype,
        device = fo.device})
end

local function group_norm(groups, channels, eps, fo)
    return nn.GroupNorm(groups, channels, {eps = eps, affine = true, dtype = fo.dtype, device = fo.device})
end

-- diffusers' get_activation (activations.py): swish/silu, gelu, relu
local function activation(name)
    if name == "silu" or name == "swish" then return nn.SiLU() end
    if name == "gelu" then return nn.GELU() end
    if name == "relu" then return nn.ReLU() end
    error(string.format("unsupported activation function '%s' (supported: silu, swish, gelu, relu)", tostring(name)), 3)
end

-- ==== ResnetBlock2D (resnet.py), without time embedding (temb_channels None) ====

-- ResnetBlock2D(in_channels, out_channels, {groups=32, eps=1e-6, non_linearity="swish",
-- output_scale_factor=1, dropout=0, dtype=, device=}): norm1, conv1, norm2, dropout, conv2,
-- nonlinearity, conv_shortcut (1x1, when in_channels ~= out_channels).
-- forward(x (B, Cin, H, W)) -> (x' + conv2(drop(act(norm2(conv1(act(norm1(x))))))) / output_scale_factor
local ResnetBlock2D = class("nemo.models.vae.ResnetBlock2D", nn.Module)
M.ResnetBlock2D = ResnetBlock2D
function ResnetBlock2D:__init(in_channels, out_channels, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    out_channels = out_channels or in_channels
    local groups = opts.groups or 32
    local eps = opts.eps or 1e-6
    self.in_channels, self.out_channels = in_channels, out_channels
    self.output_scale_factor = opts.output_scale_factor or 1.0
    self.norm1 = group_norm(groups, in_channels, eps, fo)
    self.conv1 = conv2d(in_channels, out_channels, 3, {padding = 1}, fo)
    self.norm2 = group_norm(groups, out_channels, eps, fo)
    self.dropout = nn.Dropout(opts.dropout or 0.0)
    self.conv2 = conv2d(out_channels, out_channels, 3, {padding = 1}, fo)
    self.nonlinearity = activation(opts.non_linearity or "swish")
    if in_channels ~= out_channels then
        self.conv_shortcut = conv2d(in_channels, out_channels, 1, {}, fo)
    end
end

function ResnetBlock2D:forward(x)
    local h = self.norm1(x)
    local a = self.nonlinearity(h)
    free(h)
    h = self.conv1(a)
    free(a)
    local n = self.norm2(h)
    free(h)
    a = self.nonlinearity(n)
    free(n)
    local d = self.dropout(a)
    if not rawequal(d, a) then free(a) end
    h = self.conv2(d)
    free(d)
    local sc = x
    if self.conv_shortcut ~= nil then sc = self.conv_shortcut(x) end
    local out = sc + h
    free(h)
    if not rawequal(sc, x) then free(sc) end
    if self.output_scale_factor ~= 1 then   -- x / 1.0 is x: skipped, bitwise the same
        local o2 = out / self.output_scale_factor
        free(out)
        out = o2
    end
    return out
end

-- ==== Downsample2D / Upsample2D ====

-- Downsample2D(channels, {out_channels=, padding=1, dtype=, device=}) with use_conv: conv
-- (3x3, stride 2, padding). padding 0 (the VAE's) means diffusers' F.pad(x, (0, 1, 0, 1)) first.
local Downsample2D = class("nemo.models.vae.Downsample2D", nn.Module)
M.Downsample2D = Downsample2D
function Downsample2D:__init(channels, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    self.channels = channels
    self.out_channels = opts.out_channels or channels
    self.padding = opts.padding == nil and 1 or opts.padding
    self.conv = conv2d(channels, self.out_channels, 3, {stride = 2, padding = self.padding}, fo)
end
function Downsample2D:forward(x)
    if self.padding == 0 then
        -- (0, 1, 0, 1): nothing before and one zero row/column after, in H and in W
        return F.conv2d(x, self.conv.weight, self.conv.bias, {stride = 2, padding = {{0, 1}, {0, 1}}})
    end
    return self.conv(x)
end

-- Upsample2D(channels, {out_channels=, dtype=, device=}) with use_conv: nearest x2, then conv
-- (3x3, padding 1).
local Upsample2D = class("nemo.models.vae.Upsample2D", nn.Module)
M.Upsample2D = Upsample2D
function Upsample2D:__init(channels, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    self.channels = channels
    self.out_channels = opts.out_channels or channels
    self.conv = conv2d(channels, self.out_channels, 3, {padding = 1}, fo)
end
function Upsample2D:forward(x)
    local u = F.interpolate(x, {scale_factor = 2, mode = "nearest"})
    local y = self.conv(u)
    free(u)
    return y
end

-- ==== the mid-block attention (attention_processor.py: Attention + AttnProcessor2_0) ====

-- Attention(query_dim, {heads=1, dim_head=query_dim, norm_num_groups=, eps=1e-5,
-- rescale_output_factor=1, residual_connection=true, bias=true, dtype=, device=}): group_norm,
-- to_q, to_k, to_v, to_out = [Linear, Dropout]. forward(x (B, C, H, W)) -> (B, C, H, W).
local Attention = class("nemo.models.vae.Attention", nn.Module)
M.Attention = Attention
function Attention:__init(query_dim, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    local heads = opts.heads or 1
    local dim_head = opts.dim_head or math.floor(query_dim / heads)
    self.query_dim = query_dim
    self.heads = heads
    self.head_dim = dim_head
    self.inner_dim = heads * dim_head
    self.rescale_output_factor = opts.rescale_output_factor or 1.0
    self.residual_connection = opts.residual_connection ~= false
    local bias = opts.bias ~= false
    if opts.norm_num_groups ~= nil then
        self.group_norm = group_norm(opts.norm_num_groups, query_dim, opts.eps or 1e-5, fo)
    end
    local function lin(i, o) return nn.Linear(i, o, {bias = bias, dtype = fo.dtype, device = fo.device}) end
    self.to_q = lin(query_dim, self.inner_dim)
    self.to_k = lin(query_dim, self.inner_dim)
    self.to_v = lin(query_dim, self.inner_dim)
    self.to_out = nn.ModuleList{nn.Linear(self.inner_dim, query_dim, {bias = true, dtype = fo.dtype,
        device = fo.device}), nn.Dropout(0.0)}
end

local function split_heads(self, y, B)
    local y4 = y:view(B, -1, self.heads, self.head_dim)
    local t = y4:transpose(1, 2)                    -- (B, heads, S, head_dim)
    free(y4)
    return t
end

function Attention:forward(x)
    local B, C, H, W = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    if x:dim() ~= 4 or C ~= self.query_dim then
        error(string.format("Attention: expected input (B, %d, H, W), got %s", self.query_dim, shape_str(x.shape)), 2)
    end
    local flat = x:reshape(B, C, H * W)             -- view(B, C, HW)
    local hs                                        -- (B, HW, C)
    if self.group_norm ~= nil then
        -- group_norm(hs.transpose(1, 2)).transpose(1, 2), hs being flat.transpose(1, 2)
        local n = self.group_norm(flat)
        hs = n:transpose(1, 2)
        free(n)
    else
        hs = flat:transpose(1, 2)
    end
    free(flat)
    local q, k, v = self.to_q(hs), self.to_k(hs), self.to_v(hs)
    free(hs)
    local qh, kh, vh = split_heads(self, q, B), split_heads(self, k, B), split_heads(self, v, B)
    free(q, k, v)
    local o = F.scaled_dot_product_attention(qh, kh, vh)
    free(qh, kh, vh)
    local ot = o:transpose(1, 2)
    local of = ot:reshape(B, -1, self.heads * self.head_dim)
    free(o, ot)
    local p = self.to_out:get(1)(of)
    free(of)
    local pd = self.to_out:get(2)(p)
    if not rawequal(pd, p) then free(p) end
    local pt = pd:transpose(-1, -2)
    local y = pt:reshape(B, C, H, W)
    free(pt, pd)
    if self.residual_connection then
        local r = y + x
        free(y)
        y = r
    end
    if self.rescale_output_factor ~= 1 then
        local r = y / self.rescale_output_factor
        free(y)
        y = r
    end
    return y
end
function Attention:extra_repr()
    return string.format("query_dim=%d, heads=%d, head_dim=%d", self.query_dim, self.heads, self.head_dim)
end

-- ==== blocks (unet_2d_blocks.py) ====

-- UNetMidBlock2D(in_channels, {resnet_eps=1e-6, resnet_act_fn="swish", resnet_groups=32,
-- add_attention=true, attention_head_dim=in_channels, output_scale_factor=1, num_layers=1,
-- dtype=, device=}): attentions, resnets (registered in that order); resnets[1], then
-- (attention, resnet) num_layers times.
local UNetMidBlock2D = class("nemo.models.vae.UNetMidBlock2D", nn.Module)
M.UNetMidBlock2D = UNetMidBlock2D
function UNetMidBlock2D:__init(in_channels, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    local eps = opts.resnet_eps or 1e-6
    local groups = opts.resnet_groups or 32
    local osf = opts.output_scale_factor or 1.0
    local head_dim = opts.attention_head_dim or in_channels
    self.add_attention = opts.add_attention ~= false
    local function resnet()
        return ResnetBlock2D(in_channels, in_channels, {groups = groups, eps = eps, dropout = opts.dropout or 0.0,
            non_linearity = opts.resnet_act_fn or "swish", output_scale_factor = osf, dtype = fo.dtype,
            device = fo.device})
    end
    local resnets, attentions = {resnet()}, {}
    for _ = 1, opts.num_layers or 1 do
        if self.add_attention then
            attentions[#attentions + 1] = Attention(in_channels, {heads = math.floor(in_channels / head_dim),
                dim_head = head_dim, rescale_output_factor = osf, eps = eps, norm_num_groups = groups,
                residual_connection = true, bias = true, dtype = fo.dtype, device = fo.device})
        end
        resnets[#resnets + 1] = resnet()
    end
    -- diffusers keeps None entries when add_attention is false; an empty list holds the same
    -- (no) parameters
    self.attentions = nn.ModuleList(attentions)
    self.resnets = nn.ModuleList(resnets)
end
function UNetMidBlock2D:forward(x)
    local h = self.resnets:get(1)(x)
    for i = 2, self.resnets:len() do
        if self.add_attention then
            local a = self.attentions:get(i - 1)(h)
            free(h)
            h = a
        end
        local r = self.resnets:get(i)(h)
        free(h)
        h = r
    end
    return h
end

-- run a list of layers on x, releasing the intermediates (never x itself)
local function chain(x, list)
    local h = x
    for _, m in list:iter() do
        local y = m(h)
        if not rawequal(h, x) then free(h) end
        h = y
    end
    return h
end

-- The resnets of an encoder / decoder block: opts.num_layers ResnetBlock2D, in -> out then out -> out.
local function resnet_list(in_channels, out_channels, opts, fo)
    local resnets = {}
    for i = 1, opts.num_layers or 1 do
        resnets[i] = ResnetBlock2D(i == 1 and in_channels or out_channels, out_channels, {groups = opts.resnet_groups,
            eps = opts.resnet_eps, dropout = opts.dropout, non_linearity = opts.resnet_act_fn or "swish",
            output_scale_factor = opts.output_scale_factor, dtype = fo.dtype, device = fo.device})
    end
    return nn.ModuleList(resnets)
end

-- DownEncoderBlock2D(in_channels, out_channels, {num_layers=1, resnet_eps=1e-6,
-- resnet_act_fn="swish", resnet_groups=32, add_downsample=true, downsample_padding=1,
-- output_scale_factor=1, dtype=, device=}): resnets, downsamplers (absent without add_downsample).
local DownEncoderBlock2D = class("nemo.models.vae.DownEncoderBlock2D", nn.Module)
M.DownEncoderBlock2D = DownEncoderBlock2D
function DownEncoderBlock2D:__init(in_channels, out_channels, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    self.resnets = resnet_list(in_channels, out_channels, opts, fo)
    if opts.add_downsample ~= false then
        self.downsamplers = nn.ModuleList{Downsample2D(out_channels, {out_channels = out_channels,
            padding = opts.downsample_padding == nil and 1 or opts.downsample_padding, dtype = fo.dtype,
            device = fo.device})}
    end
end
function DownEncoderBlock2D:forward(x)
    local h = chain(x, self.resnets)
    if self.downsamplers ~= nil then
        local y = chain(h, self.downsamplers)
        if not rawequal(h, x) then free(h) end
        h = y
    end
    return h
end

-- UpDecoderBlock2D(in_channels, out_channels, {num_layers=1, resnet_eps=1e-6,
-- resnet_act_fn="swish", resnet_groups=32, add_upsample=true, output_scale_factor=1, dtype=,
-- device=}): resnets, upsamplers (absent without add_upsample).
local UpDecoderBlock2D = class("nemo.models.vae.UpDecoderBlock2D", nn.Module)
M.UpDecoderBlock2D = UpDecoderBlock2D
function UpDecoderBlock2D:__init(in_channels, out_channels, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    self.resnets = resnet_list(in_channels, out_channels, opts, fo)
    if opts.add_upsample ~= false then
        self.upsamplers = nn.ModuleList{Upsample2D(out_channels, {out_channels = out_channels, dtype = fo.dtype,
            device = fo.device})}
    end
end
function UpDecoderBlock2D:forward(x)
    local h = chain(x, self.resnets)
    if self.upsamplers ~= nil then
        local y = chain(h, self.upsamplers)
        if not rawequal(h, x) then free(h) end
        h = y
    end
    return h
end

-- ==== Encoder / Decoder (autoencoders/vae.py) ====

-- run one block, through a checkpoint when the owner checkpoints and grad mode is on
local function run_block(owner, block, h)
    if owner.gradient_checkpointing and autograd.is_grad_enabled() then
        return autograd.checkpoint_owned(function(x) return block(x) end, h)
    end
    return block(h)
end

-- The mid block both ends of the VAE share (one attention head over all channels).
local function vae_mid_block(boc, groups, act, opts, fo)
    return UNetMidBlock2D(boc[#boc], {resnet_eps = 1e-6, resnet_act_fn = act, output_scale_factor = 1,
        attention_head_dim = boc[#boc], resnet_groups = groups, add_attention = opts.mid_block_add_attention ~= false,
        dtype = fo.dtype, device = fo.device})
end
-- conv_norm_out -> conv_act -> conv_out on h (released), as both ends finish.
local function vae_head(self, h)
    local n = self.conv_norm_out(h)
    free(h)
    local a = self.conv_act(n)
    free(n)
    local out = self.conv_out(a)
    free(a)
    return out
end

-- Encoder{in_channels=3, out_channels=3, down_block_types=, block_out_channels=, layers_per_block=2,
-- norm_num_groups=32, act_fn="silu", double_z=true, mid_block_add_attention=true, dtype=, device=}:
-- conv_in, down_blocks, mid_block, conv_norm_out, conv_act, conv_out.
-- forward(x (B, in, H, W)) -> (B, 2*out (double_z) or out, H/2^(n-1), W/2^(n-1)).
local Encoder = class("nemo.models.vae.Encoder", nn.Module)
M.Encoder = Encoder
function Encoder:__init(opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local boc = opts.block_out_channels
    local groups = opts.norm_num_groups or 32
    local act = opts.act_fn or "silu"
    self.layers_per_block = opts.layers_per_block or 2
    self.gradient_checkpointing = false
    self.conv_in = conv2d(opts.in_channels or 3, boc[1], 3, {padding = 1}, fo)
    local blocks = {}
    local output_channel = boc[1]
    for i = 1, #opts.down_block_types do
        local input_channel = output_channel
        output_channel = boc[i]
        blocks[i] = DownEncoderBlock2D(input_channel, output_channel, {num_layers = self.layers_per_block,
            add_downsample = i ~= #boc, resnet_eps = 1e-6, downsample_padding = 0, resnet_act_fn = act,
            resnet_groups = groups, dtype = fo.dtype, device = fo.device})
    end
    self.down_blocks = nn.ModuleList(blocks)
    self.mid_block = vae_mid_block(boc, groups, act, opts, fo)
    self.conv_norm_out = group_norm(groups, boc[#boc], 1e-6, fo)
    self.conv_act = nn.SiLU()
    local out_ch = opts.out_channels or 3
    self.conv_out = conv2d(boc[#boc], opts.double_z == false and out_ch or 2 * out_ch, 3, {padding = 1}, fo)
end
function Encoder:forward(x)
    local h = self.conv_in(x)
    for _, block in self.down_blocks:iter() do
        local y = run_block(self, block, h)
        free(h)
        h = y
    end
    local y = run_block(self, self.mid_block, h)
    free(h)
    return vae_head(self, y)
end

-- Decoder{in_channels=3, out_channels=3, up_block_types=, block_out_channels=, layers_per_block=2,
-- norm_num_groups=32, act_fn="silu", mid_block_add_attention=true, dtype=, device=}: conv_in,
-- up_blocks, mid_block (registered in this order, as diffusers does), conv_norm_out, conv_act,
-- conv_out. forward(z (B, in, h, w)) -> (B, out, h*2^(n-1), w*2^(n-1)); runs mid_block first.
local Decoder = class("nemo.models.vae.Decoder", nn.Module)
M.Decoder = Decoder
function Decoder:__init(opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local boc = opts.block_out_channels
    local groups = opts.norm_num_groups or 32
    local act = opts.act_fn or "silu"
    self.layers_per_block = opts.layers_per_block or 2
    self.gradient_checkpointing = false
    self.conv_in = conv2d(opts.in_channels or 3, boc[#boc], 3, {padding = 1}, fo)
    self.up_blocks = nn.ModuleList{}
    self.mid_block = vae_mid_block(boc, groups, act, opts, fo)
    local rev = {}
    for i = #boc, 1, -1 do rev[#rev + 1] = boc[i] end
    local output_channel = rev[1]
    for i = 1, #opts.up_block_types do
        local prev_output_channel = output_channel
        output_channel = rev[i]
        self.up_blocks:append(UpDecoderBlock2D(prev_output_channel, output_channel, {
            num_layers = self.layers_per_block + 1, add_upsample = i ~= #boc, resnet_eps = 1e-6, resnet_act_fn = act,
            resnet_groups = groups, dtype = fo.dtype, device = fo.device}))
    end
    self.conv_norm_out = group_norm(groups, boc[1], 1e-6, fo)
    self.conv_act = nn.SiLU()
    self.conv_out = conv2d(boc[1], opts.out_channels or 3, 3, {padding = 1}, fo)
end
function Decoder:forward(z)
    local h = self.conv_in(z)
    local y = run_block(self, self.mid_block, h)
    free(h)
    h = y
    for _, block in self.up_blocks:iter() do
        y = run_block(self, block, h)
        free(h)
        h = y
    end
    return vae_head(self, h)
end

-- ==== DiagonalGaussianDistribution (autoencoders/vae.py) ====

-- DiagonalGaussianDistribution(moments (B, 2C, ...), deterministic=false): fields parameters,
-- mean, logvar (clamped to [-30, 20]), std, var, deterministic (std = var = 0).
local DiagonalGaussianDistribution = class("nemo.models.vae.DiagonalGaussianDistribution")
M.DiagonalGaussianDistribution = DiagonalGaussianDistribution
function DiagonalGaussianDistribution:__init(parameters, deterministic)
    if not is_tensor(parameters) or parameters:dim() < 2 or parameters.shape[2] % 2 ~= 0 then
        error(string.format("DiagonalGaussianDistribution: expected moments (B, 2C, ...) with an even channel count, " ..
            "got %s", is_tensor(parameters) and shape_str(parameters.shape) or type(parameters)), 3)
    end
    self.parameters = parameters
    local parts = parameters:chunk(2, 1)
    self.mean = parts[1]
    local lv = parts[2]
    self.logvar = lv:clamp(-30.0, 20.0)
    free(lv)
    self.deterministic = deterministic == true
    if self.deterministic then
        self.std = Tensor.zeros_like(self.mean)
        self.var = self.std
    else
        local half = 0.5 * self.logvar
        self.std = half:exp()
        free(half)
        self.var = self.logvar:exp()
    end
end

-- sample(generator) / sample{generator=, noise=}: mean + std * noise, noise ~ N(0, 1) of mean's
-- shape in the moments' dtype and device (from the generator, else nemo's default one), or the
-- noise given (diffusers draws it with randn_tensor; nemo's generator is not torch's, so pass
-- noise= to reproduce a torch draw).
function DiagonalGaussianDistribution:sample(arg)
    local generator, noise
    if type(arg) == "table" and getmetatable(arg) == nil and not is_tensor(arg) then
        generator, noise = arg.generator, arg.noise
    elseif is_tensor(arg) then
        noise = arg
    else
        generator = arg
    end
    local mine = false
    if noise == nil then
        noise = Tensor.randn(self.mean.shape, {generator = generator, dtype = self.parameters.dtype,
            device = self.parameters.device})
        mine = true
    elseif shape_str(noise.shape) ~= shape_str(self.mean.shape) then
        error(string.format("DiagonalGaussianDistribution:sample: noise must have the mean's shape %s, got %s",
            shape_str(self.mean.shape), shape_str(noise.shape)), 2)
    end
    local sn = self.std * noise
    if mine then free(noise) end
    local x = self.mean + sn
    free(sn)
    return x
end

function DiagonalGaussianDistribution:mode() return self.mean end

-- kl(other=nil) -> (B): 0.5 * sum(mean^2 + var - 1 - logvar) over dims 1, 2, 3 (against N(0, 1)),
-- or the KL to another diagonal Gaussian.
function DiagonalGaussianDistribution:kl(other)
    if self.deterministic then
        return Tensor.tensor({0.0}, {dtype = self.parameters.dtype, device = self.parameters.device})
    end
    local s
    if other == nil then
        s = self.mean:pow(2) + self.var - 1.0 - self.logvar
    else
        local d = self.mean - other.mean
        s = d:pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
    end
    local r = s:sum({1, 2, 3})
    free(s)
    local out = 0.5 * r
    free(r)
    return out
end

-- nll(sample, dims={1, 2, 3}) -> 0.5 * sum(log(2 pi) + logvar + (sample - mean)^2 / var)
function DiagonalGaussianDistribution:nll(sample, dims)
    if self.deterministic then
        return Tensor.tensor({0.0}, {dtype = self.parameters.dtype, device = self.parameters.device})
    end
    local logtwopi = math.log(2.0 * math.pi)
    local s = (self.logvar + logtwopi) + (sample - self.mean):pow(2) / self.var
    local r = s:sum(dims or {1, 2, 3})
    return 0.5 * r
end

-- ==== config ====

local describe = mio.describe

local DOWN_TYPES = {DownEncoderBlock2D = true}
local UP_TYPES = {UpDecoderBlock2D = true}

-- diffusers' register_to_config fields of AutoencoderKL, in signature order.
local CONFIG = {
    {"in_channels", "int", 3},
    {"out_channels", "int", 3},
    {"down_block_types", "strs", {"DownEncoderBlock2D"}},
    {"up_block_types", "strs", {"UpDecoderBlock2D"}},
    {"block_out_channels", "ints", {64}},
    {"layers_per_block", "int", 1},
    {"act_fn", "str", "silu"},
    {"latent_channels", "int", 4},
    {"norm_num_groups", "int", 32},
    {"sample_size", "size", 32},
    {"scaling_factor", "number", 0.18215},
    {"shift_factor", "number?", null},
    {"latents_mean", "numbers?", null},
    {"latents_std", "numbers?", null},
    {"force_upcast", "bool", true},
    {"use_quant_conv", "bool", true},
    {"use_post_quant_conv", "bool", true},
    {"mid_block_add_attention", "bool", true},
}
M.CONFIG_FIELDS = CONFIG

-- The full config: defaults for absent keys, "_"-keys dropped, unknown keys warned about on
-- stderr, wrong types or values an error naming the key (common.check_config; every list must
-- be non-empty).
local function resolve_config(cfg, who)
    local out = common.check_config(CONFIG, cfg, {who = who, class = "AutoencoderKL", nonempty = true, level = 3})
    -- values
    for _, key in ipairs {"in_channels", "out_channels", "latent_channels", "norm_num_groups", "layers_per_block"} do
        if out[key] < 1 then error(string.format("%s: config key '%s' must be at least 1, got %d", who, key, out[key]), 3) end
    end
    local boc = out.block_out_channels
    for i, c in ipairs(boc) do
        if c < 1 then
            error(string.format("%s: config key 'block_out_channels' entry %d must be at least 1, got %d", who, i, c), 3)
        end
        if c % out.norm_num_groups ~= 0 then
            error(string.format("%s: config key 'norm_num_groups' (%d) must divide every block_out_channels entry; " ..
                "block_out_channels[%d] = %d", who, out.norm_num_groups, i, c), 3)
        end
    end
    for _, spec in ipairs {{"down_block_types", DOWN_TYPES, "DownEncoderBlock2D"},
                           {"up_block_types", UP_TYPES, "UpDecoderBlock2D"}} do
        local key, ok, name = spec[1], spec[2], spec[3]
        local list = out[key]
        if #list ~= #boc then
            error(string.format("%s: config key '%s' has %d entries but block_out_channels has %d (one block per " ..
                "entry)", who, key, #list, #boc), 3)
        end
        for i, t in ipairs(list) do
            local base = t:match("^UNetRes(.+)$") or t   -- diffusers strips this prefix
            if not ok[base] then
                error(string.format("%s: config key '%s' entry %d: block type '%s' is not supported (supported: %s)",
                    who, key, i, t, name), 3)
            end
        end
    end
    if not (out.act_fn == "silu" or out.act_fn == "swish" or out.act_fn == "gelu" or out.act_fn == "relu") then
        error(string.format("%s: config key 'act_fn' must be one of silu, swish, gelu, relu, got %s", who,
            describe(out.act_fn)), 3)
    end
    for _, key in ipairs {"latents_mean", "latents_std"} do
        local v = out[key]
        if v ~= null and #v ~= out.latent_channels then
            error(string.format("%s: config key '%s' has %d entries but latent_channels is %d", who, key, #v,
                out.latent_channels), 3)
        end
    end
    return out
end
M.resolve_config = resolve_config

-- ==== the model ====

local AutoencoderKL = class("nemo.models.AutoencoderKL", nn.Module)
M.AutoencoderKL = AutoencoderKL
AutoencoderKL._no_split_modules = {"BasicTransformerBlock", "ResnetBlock2D"}

-- AutoencoderKL(config, {dtype=, device=}): config holds diffusers' config fields.
-- Children: encoder, decoder, quant_conv (use_quant_conv), post_quant_conv (use_post_quant_conv).
function AutoencoderKL:__init(config, opts)
    nn.Module.__init(self)
    local cfg = resolve_config(config, "AutoencoderKL")
    local fo = factory(opts)
    self.config = cfg
    self.encoder = Encoder{in_channels = cfg.in_channels, out_channels = cfg.latent_channels,
        down_block_types = cfg.down_block_types, block_out_channels = cfg.block_out_channels,
        layers_per_block = cfg.layers_per_block, act_fn = cfg.act_fn, norm_num_groups = cfg.norm_num_groups,
        double_z = true, mid_block_add_attention = cfg.mid_block_add_attention, dtype = fo.dtype, device = fo.device}
    self.decoder = Decoder{in_channels = cfg.latent_channels, out_channels = cfg.out_channels,
        up_block_types = cfg.up_block_types, block_out_channels = cfg.block_out_channels,
        layers_per_block = cfg.layers_per_block, norm_num_groups = cfg.norm_num_groups, act_fn = cfg.act_fn,
        mid_block_add_attention = cfg.mid_block_add_attention, dtype = fo.dtype, device = fo.device}
    if cfg.use_quant_conv then
        self.quant_conv = conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, {}, fo)
    end
    if cfg.use_post_quant_conv then
        self.post_quant_conv = conv2d(cfg.latent_channels, cfg.latent_channels, 1, {}, fo)
    end
    self.use_slicing = false
    self.use_tiling = false
    -- 2^(number of blocks - 1): image pixels per latent pixel (pipelines' vae_scale_factor)
    self.vae_scale_factor = 2 ^ (#cfg.block_out_channels - 1)
    -- tiling's sizes, as diffusers sets them: image tiles of config.sample_size pixels (its first
    -- entry when a list), latent tiles of that / vae_scale_factor, a quarter of each overlapping
    local ss = type(cfg.sample_size) == "table" and cfg.sample_size[1] or cfg.sample_size
    self.tile_sample_min_size = ss
    self.tile_latent_min_size = math.floor(ss / self.vae_scale_factor)
    self.tile_overlap_factor = 0.25
end

-- The dtype of the parameters (that of encoder.conv_in.weight).
function AutoencoderKL:dtype() return self.encoder.conv_in.weight.dtype end

-- gradient checkpointing: each encoder down block and mid block, each decoder mid and up block
-- is recomputed in backward (nemo.autograd.checkpoint); the gradients are the same.
function AutoencoderKL:enable_gradient_checkpointing()
    self.encoder.gradient_checkpointing = true
    self.decoder.gradient_checkpointing = true
    return self
end
function AutoencoderKL:disable_gradient_checkpointing()
    self.encoder.gradient_checkpointing = false
    self.decoder.gradient_checkpointing = false
    return self
end
-- slicing: encode / decode a batch one sample at a time (less memory, the same values)
function AutoencoderKL:enable_slicing() self.use_slicing = true; return self end
function AutoencoderKL:disable_slicing() self.use_slicing = false; return self end
-- tiling: encode images wider or taller than tile_sample_min_size, and decode latents wider or
-- taller than tile_latent_min_size, in overlapping tiles blended together (diffusers'
-- _tiled_encode / tiled_decode): the memory of one tile whatever the image size; the result
-- differs slightly from a whole pass (each tile sees only itself). opts (optional):
-- {tile_sample_min_size = pixels (a multiple of vae_scale_factor), tile_overlap_factor = 0.25};
-- the latent tile follows the image tile.
function AutoencoderKL:enable_tiling(opts)
    if opts ~= nil then
        if type(opts) ~= "table" then error("AutoencoderKL:enable_tiling: options must be a table", 2) end
        for k in pairs(opts) do
            if k ~= "tile_sample_min_size" and k ~= "tile_overlap_factor" then
                error(string.format("AutoencoderKL:enable_tiling: unknown option '%s' (tile_sample_min_size, " ..
                    "tile_overlap_factor)", tostring(k)), 2)
            end
        end
        local ts, f = opts.tile_sample_min_size or self.tile_sample_min_size, opts.tile_overlap_factor or self.tile_overlap_factor
        local r = self.vae_scale_factor
        if type(ts) ~= "number" or ts % r ~= 0 or ts < r then
            error(string.format("AutoencoderKL:enable_tiling: tile_sample_min_size must be a positive multiple of %d " ..
                "(the VAE's scale factor), got %s", r, tostring(ts)), 2)
        end
        if type(f) ~= "number" or not (f >= 0 and f < 1) then
            error("AutoencoderKL:enable_tiling: tile_overlap_factor must be a number in [0, 1), got " .. tostring(f), 2)
        end
        self.tile_sample_min_size, self.tile_overlap_factor = ts, f
        self.tile_latent_min_size = math.floor(ts / r)
    end
    self.use_tiling = true
    return self
end
function AutoencoderKL:disable_tiling() self.use_tiling = false; return self end

local function check_image(self, x, who, channels, what)
    if not is_tensor(x) then error(string.format("AutoencoderKL:%s: expected a tensor, got %s", who, type(x)), 3) end
    if x:dim() ~= 4 or x.shape[2] ~= channels then
        error(string.format("AutoencoderKL:%s: expected %s (B, %d, H, W), got shape %s", who, what, channels,
            shape_str(x.shape)), 3)
    end
end

-- tile(x, i, j, size) -> a contiguous copy of x's size x size tile at (i, j) (smaller at the edges)
local function tile2d(x, i, j, size)
    local v = x:narrow(2, i, math.min(size, x.shape[3] - i)):narrow(3, j, math.min(size, x.shape[4] - j))
    return v:contiguous()
end

-- diffusers' _tiled_encode / tiled_decode: input tiles of tin every (1 - overlap) of it, each run
-- alone; output tiles (tout) blended over tout * overlap rows and columns, each keeping tout minus that.
local function tiled_2d(x, tin, tout, overlap, run)
    local step, be = math.floor(tin * (1 - overlap)), math.floor(tout * overlap)
    return common.tiled({rows = common.origins(x.shape[3], step), cols = common.origins(x.shape[4], step),
        run = function(i, j)
            local t = tile2d(x, i, j, tin)
            local out = run(t)
            free(t)
            return out
        end}, {hdim = 2, wdim = 3, blend_h = be, blend_w = be, keep_h = tout - be, keep_w = tout - be})
end

-- image tiles of tile_sample_min_size, encoded (and quant_conv'd), blended as latent tiles
function AutoencoderKL:_tiled_encode(x)
    return tiled_2d(x, self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor,
        function(t) return self:_encode_whole(t) end)
end

-- _encode(x) -> the moments (B, 2*latent_channels, h, w) (quant_conv applied when present);
-- tiled when tiling is on and x is larger than a tile.
function AutoencoderKL:_encode(x)
    if self.use_tiling and (x.shape[4] > self.tile_sample_min_size or x.shape[3] > self.tile_sample_min_size) then
        return self:_tiled_encode(x)
    end
    return self:_encode_whole(x)
end
function AutoencoderKL:_encode_whole(x)
    local enc = self.encoder(x)
    if self.quant_conv ~= nil then
        local q = self.quant_conv(enc)
        free(enc)
        enc = q
    end
    return enc
end

-- encode(x (B, in_channels, H, W), {return_dict=true}) -> {latent_dist = DiagonalGaussianDistribution}
-- (return_dict=false: {posterior}, diffusers' tuple)
function AutoencoderKL:encode(x, opts)
    check_image(self, x, "encode", self.config.in_channels, "an image batch")
    local h = common.sliced(self, x, function(p) return self:_encode(p) end)
    local posterior = DiagonalGaussianDistribution(h)
    if type(opts) == "table" and opts.return_dict == false then return {posterior} end
    return {latent_dist = posterior}
end

-- latent tiles of tile_latent_min_size, decoded (post_quant_conv first when present), blended as image tiles
function AutoencoderKL:_tiled_decode(z)
    return tiled_2d(z, self.tile_latent_min_size, self.tile_sample_min_size, self.tile_overlap_factor,
        function(t) return self:_decode_whole(t) end)
end

-- _decode(z) -> the image (post_quant_conv applied when present); tiled when tiling is on and z
-- is larger than a latent tile.
function AutoencoderKL:_decode(z)
    if self.use_tiling and (z.shape[4] > self.tile_latent_min_size or z.shape[3] > self.tile_latent_min_size) then
        return self:_tiled_decode(z)
    end
    return self:_decode_whole(z)
end
function AutoencoderKL:_decode_whole(z)
    local zz = z
    if self.post_quant_conv ~= nil then zz = self.post_quant_conv(z) end
    local dec = self.decoder(zz)
    if not rawequal(zz, z) then free(zz) end
    return dec
end

-- decode(z (B, latent_channels, h, w), {return_dict=true}) -> {sample = (B, out_channels, H, W)}
-- (return_dict=false: {sample}). z is the raw latent: undo scaling_factor / shift_factor first.
function AutoencoderKL:decode(z, opts)
    check_image(self, z, "decode", self.config.latent_channels, "latents")
    local dec = common.sliced(self, z, function(p) return self:_decode(p) end)
    if type(opts) == "table" and opts.return_dict == false then return {dec} end
    return {sample = dec}
end

-- vae(sample, {sample_posterior=false, generator=, return_dict=true}) -> {sample = decoded}:
-- encode, take the posterior's mode (or a sample), decode.
function AutoencoderKL:forward(sample, opts)
    local out = common.autoencoder_forward(self, sample, opts, "AutoencoderKL")   -- no tail call: error levels
    return out
end

-- diffusers' _fix_state_dict_keys_on_load: the mid-block attentions of old checkpoints name
-- their projections query/key/value/proj_attn; they load as to_q/to_k/to_v/to_out.0.
local DEPRECATED = {query = "to_q", key = "to_k", value = "to_v", proj_attn = "to_out.0"}
function AutoencoderKL:load_state_dict(sd, opts)
    if type(sd) == "table" then
        local renamed
        for k in pairs(sd) do
            local path, old, leaf = tostring(k):match("^(.-mid_block%.attentions%.%d+)%.([%a_]+)%.(%a+)$")
            if path and DEPRECATED[old] and (leaf == "weight" or leaf == "bias") then
                renamed = renamed or {}
                renamed[k] = path .. "." .. DEPRECATED[old] .. "." .. leaf
            end
        end
        if renamed then
            local c = {}
            for k, v in pairs(sd) do c[k] = v end
            for old, new in pairs(renamed) do
                if c[new] == nil then c[new] = c[old] end
                c[old] = nil
            end
            sd = c
        end
    end
    return nn.Module.load_state_dict(self, sd, opts)
end

-- ==== files ====

local without_init = common.without_init

-- AutoencoderKL.from_pretrained(folder, {torch_dtype="float32", device="cpu", subfolder=})
-- Reads folder/config.json and diffusion_pytorch_model.safetensors (or the sharded index) and
-- loads the weights strictly, cast to torch_dtype (nemo.models.io.load_folder).
function AutoencoderKL.from_pretrained(folder, opts, more)
    if rawequal(folder, AutoencoderKL) then folder, opts = opts, more end   -- AutoencoderKL:from_pretrained(...)
    return mio.load_folder(folder, opts, {class_name = "AutoencoderKL",
        build = function(cfg, dtype) return without_init(function() return AutoencoderKL(cfg, {dtype = dtype}) end) end})
end

-- model:save_pretrained(folder, {max_shard_size="10GB"}): config.json (with _class_name and
-- _diffusers_version, lists as JSON arrays, absent values null) and the weights (one file, or
-- shards plus the index beyond max_shard_size).
function AutoencoderKL:save_pretrained(folder, opts)
    local cfg = common.config_json(self.config, "AutoencoderKL", M.DIFFUSERS_VERSION)
    return mio.write_folder(self, folder, cfg, opts, "AutoencoderKL:save_pretrained")
end

return M
