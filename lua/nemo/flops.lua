-- lua/nemo/flops.lua: the floating-point operations of the products a function runs, counted as
-- it runs (the recipe's tflops metric; MFU's "model FLOPs"):
--
--   local flops = require "nemo.flops"
--   local n, loss = flops.count(function() return fm:step(model, batch) end)
--
-- Counted, as the F calls happen (every model layer looks F up when it runs):
--   F.linear                        2 x rows x in_features x out_features
--   F.scaled_dot_product_attention  4 x B x heads x Sq x Sk x head_dim (QK^T and PV)
--   F.conv1d / conv2d / conv3d      2 x output elements x C_in / groups x kernel volume
-- Not counted: norms, activations, softmax, elementwise ops (small beside the products, and left
-- out of model FLOPs by convention). A model split over ranks (tp, cp) counts this rank's share.
-- Counts do not nest.
local F = require "nemo.functional"

local M = {}

local function prod(t, a, b)
    local p = 1
    for i = a, b do p = p * t[i] end
    return p
end

-- count(fn, ...) -> flops, fn's results
function M.count(fn, ...)
    if M._counting then error("flops.count: counts do not nest", 2) end
    local n = 0
    local saved = {linear = F.linear, sdpa = F.scaled_dot_product_attention, conv1d = F.conv1d, conv2d = F.conv2d,
                   conv3d = F.conv3d}
    F.linear = function(x, w, b)
        local s = x.shape
        n = n + 2 * prod(s, 1, #s - 1) * w.shape[2] * w.shape[1]
        return saved.linear(x, w, b)
    end
    F.scaled_dot_product_attention = function(q, k, v, ...)
        local qs, ks = q.shape, k.shape
        n = n + 4 * prod(qs, 1, #qs - 1) * ks[#ks - 1] * qs[#qs]
        return saved.sdpa(q, k, v, ...)
    end
    for _, name in ipairs { "conv1d", "conv2d", "conv3d" } do
        local orig = saved[name]
        F[name] = function(x, w, ...)
            local y = orig(x, w, ...)
            local ws = w.shape
            n = n + 2 * y:numel() * prod(ws, 2, #ws)   -- w: [out, in / groups, k...]
            return y
        end
    end
    M._counting = true
    local res = {pcall(fn, ...)}
    M._counting = nil
    F.linear, F.scaled_dot_product_attention = saved.linear, saved.sdpa
    F.conv1d, F.conv2d, F.conv3d = saved.conv1d, saved.conv2d, saved.conv3d
    if not res[1] then error(res[2], 0) end
    return n, unpack(res, 2, table.maxn(res))
end

return M
