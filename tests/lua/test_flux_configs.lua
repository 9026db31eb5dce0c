-- tests/lua/test_flux_configs.lua: FluxTransformer2DModel against real diffusers output for
-- configurations other than flux_tiny / flux_tiny_guidance (tests/golden/flux_configs, made by
-- diffusers 0.40.0 with tests/golden/flux_configs/make_golden.py; see its README.md):
--   flux_blocks23_batch2     2 double + 3 single blocks, batch 2 with two timesteps, no guidance,
--                            non-square 3x5 grid, in_channels 8
--   flux_guidance_batch2     guidance_embeds, batch 2 with guidance 1.0 / 4.5 and two timesteps,
--                            1 head x 16, non-square 4x6 grid, fewer text than image tokens
--   flux_rope8_12_12         head dim 32 with axes_dims_rope (8,12,12), num_layers 0 (single blocks
--                            only), img ids (1,row,col), fractional / negative text ids
--   flux_patch2_out_ne_in    patch_size 2, in_channels 8, out_channels 3 (proj_out 12 wide), 80
--                            text tokens against 6 image tokens
--   flux_double_only_batch3  num_single_layers 0 (the last double block's text branch gets no
--                            gradient), batch 3, per-sample guidance, random ids
-- They run through tests/lua/golden_configs.lua (tolerances and checks there): output, loss, every
-- parameter gradient and the input gradients in float32 and float64. flux_double_only_batch3's
-- last double block's text branch must get no gradient, as in diffusers.
package.path = "tests/lua/?.lua;" .. package.path
require("golden_configs").run{
    T = require "tap",
    model = require("nemo.models.flux").FluxTransformer2DModel,
    folder = "flux_configs",
    cases = {   -- name, diffusers' output shape
        {"flux_blocks23_batch2", "(2, 15, 8)"},
        {"flux_guidance_batch2", "(2, 24, 4)"},
        {"flux_rope8_12_12", "(1, 12, 4)"},
        {"flux_patch2_out_ne_in", "(1, 6, 12)"},
        {"flux_double_only_batch3", "(3, 10, 4)"},
    },
    diff_inputs = {"hidden_states", "encoder_hidden_states", "pooled_projections"},
    -- the sinusoidal embedders' first layers, whose float32 gradients carry the phase error of
    -- the float32 frequencies (../golden/README.md)
    embedder_w1 = {["time_text_embed.timestep_embedder.linear_1.weight"] = true,
                   ["time_text_embed.guidance_embedder.linear_1.weight"] = true},
    w1_label = "time / guidance embedder",
}
