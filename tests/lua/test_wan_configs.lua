-- tests/lua/test_wan_configs.lua: WanTransformer3DModel against real diffusers output for
-- configurations other than wan_tiny (tests/golden/wan_configs, made by diffusers 0.40.0 with
-- tests/golden/wan_configs/make_golden.py; see its README.md):
--   wan_patch222            patch (2,2,2), 6 latent frames, non-square grid, head dim 16
--   wan_batch2              batch 2, a different timestep / latents / text per sample, 3 heads x 10
--   wan_no_cross_attn_norm  cross_attn_norm false (norm2 = Identity)
--   wan_out_ne_in           in_channels 3, out_channels 5
--   wan_ti2v_misc           per-token (B, L) timestep, batch 2, patch (2,1,2), out_channels null,
--                           qk_norm null, eps 1e-5
--   wan_i2v                 Wan 2.1 I2V: image_dim / added_kv_proj_dim (the image embedder, attn2's
--                           image K/V), 5 image tokens before 512 text tokens, batch 2
--   wan_flf2v               FLF2V: pos_embed_seq_len (two images' tokens per sample)
-- They run through tests/lua/golden_configs.lua (tolerances and checks there): output, loss, every
-- parameter gradient and the input gradients in float32 and float64, and the parameter count
-- against count_parameters(config) too.
package.path = "tests/lua/?.lua;" .. package.path
local wan = require "nemo.models.wan"
require("golden_configs").run{
    T = require "tap",
    model = wan.WanTransformer3DModel,
    folder = "wan_configs",
    cases = {   -- name, diffusers' output shape
        {"wan_patch222", "(1, 4, 6, 8, 12)"},
        {"wan_batch2", "(2, 4, 3, 6, 8)"},
        {"wan_no_cross_attn_norm", "(1, 4, 3, 8, 8)"},
        {"wan_out_ne_in", "(1, 5, 2, 6, 10)"},
        {"wan_ti2v_misc", "(2, 2, 4, 3, 4)"},
        {"wan_i2v", "(2, 4, 2, 4, 4)"},
        {"wan_flf2v", "(1, 4, 2, 4, 6)"},
    },
    diff_inputs = {"hidden_states", "encoder_hidden_states"},
    embedder_w1 = {["condition_embedder.time_embedder.linear_1.weight"] = true},
    w1_label = "time embedder",
    count = function(config) return (wan.count_parameters(config)) end,
}
