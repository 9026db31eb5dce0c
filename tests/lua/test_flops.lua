-- tests/lua/test_flops.lua: nemo.flops.count (the recipe's tflops metric): each counted op's
-- formula, the F table restored (also after an error), and the forward passes of tiny FLUX and
-- Wan transformers against their closed forms (every Linear, attention and the patch Conv3d).
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local F = nemo.F
local nn = nemo.nn
local flops = require "nemo.flops"

local g = nemo.Generator(5)
local function randn(shape) return nemo.randn(shape, {generator = g, dtype = "float64"}) end

-- ==== the counted ops ====
local lin = nn.Linear(6, 5):double()
local n = flops.count(function() return lin(randn({2, 3, 6})) end)
T.is(n, 2 * 6 * 6 * 5, "F.linear: 2 x rows (2 x 3) x in (6) x out (5)")
local q, k, v = randn({2, 3, 7, 4}), randn({2, 3, 9, 4}), randn({2, 3, 9, 4})
n = flops.count(function() return F.scaled_dot_product_attention(q, k, v) end)
T.is(n, 4 * 2 * 3 * 7 * 9 * 4, "sdpa: 4 x B x heads x Sq x Sk x head_dim")
local conv = nn.Conv3d(3, 8, {1, 2, 2}, {stride = {1, 2, 2}}):double()
local y
n, y = flops.count(function() return conv(randn({2, 3, 4, 6, 6})) end)
T.is(n, 2 * y:numel() * 3 * 1 * 2 * 2, "conv3d: 2 x output elements x C_in x kernel volume")
local f0 = F.linear
T.raises(function() flops.count(function() lin(randn({1, 6})); error("inside") end) end, "inside",
    "an error inside count goes on")
T.ok(F.linear == f0 and not flops._counting, "after an error the F table is restored")
T.raises(function() flops.count(function() flops.count(function() end) end) end, "do not nest",
    "nested counts are an error")
local r1, r2 = select(2, flops.count(function() return 1, 2 end))
T.ok(r1 == 1 and r2 == 2, "count returns fn's results after the count")

-- ==== tiny FLUX: the forward against its closed form ====
do
    local flux = require "nemo.models.flux"
    local cfg = {in_channels = 16, num_layers = 2, num_single_layers = 3, attention_head_dim = 8,
                 num_attention_heads = 4, joint_attention_dim = 24, pooled_projection_dim = 12,
                 guidance_embeds = true, axes_dims_rope = {2, 2, 4}}
    nemo.manual_seed(1)
    local m = flux.FluxTransformer2DModel(cfg):double()
    local B, N, L = 2, 16, 5
    local ids = nemo.zeros(N, 3)
    local count = flops.count(function() return m{hidden_states = randn({B, N, 16}), encoder_hidden_states =
        randn({B, L, 24}), pooled_projections = randn({B, 12}), timestep = nemo.rand({B}, {dtype = "float64"}),
        guidance = nemo.full({B}, 3.5, {dtype = "float64"}), img_ids = ids, txt_ids = nemo.zeros(L, 3)} end)
    local D, C, Dt, Dp, S = 32, 16, 24, 12, N + L
    local per = 2 * N * C * D + 2 * L * Dt * D                           -- x_embedder, context_embedder
        + 2 * (256 * D + D * D) * 2 + 2 * (Dp * D + D * D)                -- time, guidance, text (pooled) embedders
    per = per + cfg.num_layers * (2 * D * 6 * D * 2                     -- AdaLN-Zero (image, text)
        + 8 * N * D * D + 8 * L * D * D + 4 * S * S * D                  -- q k v out (both streams), attention
        + 16 * N * D * D + 16 * L * D * D)                               -- the two MLPs
    per = per + cfg.num_single_layers * (2 * D * 3 * D                   -- AdaLN-Zero single
        + 8 * S * D * D + 6 * S * D * D + 4 * S * S * D + 10 * S * D * D) -- proj_mlp, q k v, attention, proj_out
    per = per + 4 * D * D + 2 * N * D * C                                -- norm_out, proj_out
    T.is(count, B * per, "tiny FLUX forward: every Linear and the attention, as the closed form counts them")
end

-- ==== tiny Wan: the forward against its closed form ====
do
    local wan = require "nemo.models.wan"
    local cfg = {patch_size = {1, 2, 2}, num_attention_heads = 2, attention_head_dim = 8, in_channels = 4,
                 out_channels = 4, text_dim = 16, freq_dim = 32, ffn_dim = 40, num_layers = 2, rope_max_seq_len = 32}
    nemo.manual_seed(2)
    local m = wan.WanTransformer3DModel(cfg):double()
    local B, L = 2, 6
    local count = flops.count(function() return m{hidden_states = randn({B, 4, 2, 8, 8}), timestep =
        nemo.rand({B}, {dtype = "float64"}) * 1000, encoder_hidden_states = randn({B, L, 16})} end)
    local D, N, Fd, Dt = 16, 2 * 4 * 4, 40, 16
    local per = 2 * N * D * (4 * 1 * 2 * 2)                              -- the patch Conv3d
        + 2 * (32 * D + D * D) + 2 * D * 6 * D + 2 * L * (Dt * D + D * D) -- time embedder, time_proj, text embedder
    per = per + cfg.num_layers * (8 * N * D * D + 4 * N * N * D          -- self-attention
        + 4 * N * D * D + 4 * L * D * D + 4 * N * L * D                  -- cross-attention
        + 4 * N * D * Fd)                                                -- the FFN
    per = per + 2 * N * D * 4 * 1 * 2 * 2                                -- proj_out
    T.is(count, B * per, "tiny Wan forward: the patch Conv3d, every Linear and both attentions, as the closed form")
end

T.done()
