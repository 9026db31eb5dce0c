-- lua/nemo/data/synthetic.lua: a synthetic latent cache that a model can learn, in the format
-- of docs/data.md (tools/make_synthetic_cache.lua is its command line).
--
--   require("nemo.data.synthetic").make{out = "/tmp/cache", samples = 64, model = "flux",
--       resolutions = "16x16,16x24", seed = 0}
--
-- Each caption is "a <color> <shape> <place>": three concepts out of 8 x 6 x 6. Every concept
-- has a fixed random embedding e [D]; a caption's text_embeddings [L, D] are its three concept
-- embeddings followed by zero rows (as UMT5/T5 caches zero-pad), pooled = a fixed random
-- projection of their mean. Every concept also has a fixed pattern per channel (a random
-- offset plus a random cosine of at most one cycle over the latent grid, so it exists at every
-- resolution), and latents = (sum of the three patterns) / sqrt(3) + noise * N(0, 1): a
-- deterministic function of the caption embedding plus small noise, with about unit variance
-- like a scaled VAE latent.
-- Everything comes from one nemo.Generator(seed) in a fixed order, so (options) -> bytes.
require "nemo"
local Tensor = require "nemo.tensor"
local data = require "nemo.data"

local M = {}

M.COLORS = {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}
M.SHAPES = {"circle", "square", "triangle", "star", "ring", "cross"}
M.PLACES = {"on grass", "at night", "in snow", "on sand", "under water", "in fog"}

-- Defaults per model: small enough for the tiny test transformers (flow_flux_tiny: joint 32,
-- pooled 32; diffusers' Wan test config: text_dim 16), 16 latent channels as FLUX.1 and Wan 2.1.
M.DEFAULTS = {
    flux = {channels = 16, text_len = 8, text_dim = 32, pooled_dim = 32, resolutions = "16x16"},
    wan = {channels = 16, frames = 3, text_len = 12, text_dim = 16, pooled_dim = 0, resolutions = "16x16"},
}

local KNOWN = {out = true, samples = true, model = true, resolutions = true, seed = true, force = true,
               channels = true, frames = true, text_len = true, text_dim = true, pooled_dim = true,
               noise = true, shard_size = true, latent_dtype = true, text_dtype = true}

local function is_posint(v) return type(v) == "number" and v >= 1 and v % 1 == 0 end

-- "16x16,16x24" (or a list of {H, W}) -> {{16, 16}, {16, 24}}; sizes must be even (2x2 patches).
function M.parse_resolutions(r)
    if type(r) == "table" then return r end
    local out = {}
    for item in tostring(r):gmatch("[^,%s]+") do
        local h, w = item:match("^(%d+)x(%d+)$")
        if not h then error("make_synthetic_cache: resolution '" .. item .. "' is not HxW (latent sizes, e.g. 16x24)", 3) end
        out[#out + 1] = {tonumber(h), tonumber(w)}
    end
    if #out == 0 then error("make_synthetic_cache: no resolutions given", 3) end
    return out
end

-- draw n numbers (normal or uniform) from g as a Lua array
local function draws(g, n, kind)
    local t = Tensor.empty({n}, {dtype = "float64"})
    if kind == "uniform" then t:uniform_(0, 1, {generator = g}) else t:normal_(0, 1, {generator = g}) end
    return t:tolist()
end

-- Pattern parameters of one concept: per channel an offset ~ N(0, 1/2), an amplitude ~ N(0, 1),
-- integer frequencies (y, x, and f for video) of 0 or 1 cycle and a phase. The offset (what a
-- channel's mean does with the caption) is easy to learn; the smooth wave needs positions.
local function concept_pattern_params(g, channels)
    local amp = draws(g, 2 * channels, "normal")
    local u = draws(g, channels * 4, "uniform")
    local p = {}
    for c = 1, channels do
        p[c] = {o = amp[2 * c - 1] * math.sqrt(0.5), a = amp[2 * c], fy = math.floor(u[4 * c - 3] * 2),
                fx = math.floor(u[4 * c - 2] * 2), ff = math.floor(u[4 * c - 1] * 2), phase = 2 * math.pi * u[4 * c]}
    end
    return p
end

-- The pattern of one concept on a latent grid, a flat Lua array in [C, (F,) H, W] order.
local function render(params, frames, h, w)
    local out = {}
    local n = 0
    for _, p in ipairs(params) do
        for f = 0, (frames or 1) - 1 do
            local tf = frames and p.ff * f / frames or 0
            for y = 0, h - 1 do
                for x = 0, w - 1 do
                    n = n + 1
                    out[n] = p.o + p.a * math.cos(2 * math.pi * (p.fy * y / h + p.fx * x / w + tf) + p.phase)
                end
            end
        end
    end
    return out
end

-- make(opts) -> the cache path. opts: out, samples, model ("flux" | "wan"), resolutions
-- ("HxW,..." latent sizes), seed (0), force (false), channels, frames (wan), text_len,
-- text_dim, pooled_dim, noise (0.05), shard_size (256), latent_dtype ("float16"),
-- text_dtype ("bfloat16").
function M.make(opts)
    opts = opts or {}
    for k in pairs(opts) do
        if not KNOWN[k] then
            local names = {}
            for n in pairs(KNOWN) do names[#names + 1] = n end
            table.sort(names)
            error(string.format("make_synthetic_cache: unknown option '%s' (options: %s)", tostring(k), table.concat(names, ", ")), 2)
        end
    end
    local model = opts.model
    local d = M.DEFAULTS[model]
    if not d then error("make_synthetic_cache: model must be 'flux' or 'wan', got " .. tostring(model), 2) end
    if type(opts.out) ~= "string" or opts.out == "" then error("make_synthetic_cache: out (a folder) is required", 2) end
    local n = opts.samples
    if not is_posint(n) then error("make_synthetic_cache: samples must be a positive integer, got " .. tostring(n), 2) end
    local C = opts.channels or d.channels
    local frames = model == "wan" and (opts.frames or d.frames) or nil
    local L, D = opts.text_len or d.text_len, opts.text_dim or d.text_dim
    local P = opts.pooled_dim or d.pooled_dim
    local noise = opts.noise or 0.05
    local seed = opts.seed or 0
    for name, v in pairs {channels = C, text_len = L, text_dim = D} do
        if not is_posint(v) then error("make_synthetic_cache: " .. name .. " must be a positive integer", 2) end
    end
    if frames and not is_posint(frames) then error("make_synthetic_cache: frames must be a positive integer", 2) end
    if type(P) ~= "number" or P < 0 or P % 1 ~= 0 then error("make_synthetic_cache: pooled_dim must be >= 0", 2) end
    if L < 3 then error("make_synthetic_cache: text_len must be at least 3 (a caption is three concepts)", 2) end
    if type(noise) ~= "number" or noise < 0 then error("make_synthetic_cache: noise must be >= 0", 2) end
    if type(seed) ~= "number" or seed % 1 ~= 0 then error("make_synthetic_cache: seed must be an integer", 2) end
    local res = M.parse_resolutions(opts.resolutions or d.resolutions)
    for _, r in ipairs(res) do
        if not (is_posint(r[1]) and is_posint(r[2])) or r[1] % 2 ~= 0 or r[2] % 2 ~= 0 then
            error(string.format("make_synthetic_cache: latent sizes must be even positive integers (2x2 patches), got %sx%s",
                tostring(r[1]), tostring(r[2])), 2)
        end
    end
    local ldt, tdt = opts.latent_dtype or "float16", opts.text_dtype or "bfloat16"

    local writer = data.CacheWriter(opts.out, {model_type = model, shard_size = opts.shard_size, force = opts.force})
    local ok, err = pcall(function()
        local g = Tensor.Generator(seed)
        -- the fixed parts, in order: concept embeddings, pooled projection, concept patterns
        local lists = {M.COLORS, M.SHAPES, M.PLACES}
        local emb, pat = {}, {}
        for li, list in ipairs(lists) do
            emb[li], pat[li] = {}, {}
            for ci = 1, #list do emb[li][ci] = draws(g, D, "normal") end
        end
        local proj = P > 0 and draws(g, P * D, "normal") or nil
        for li, list in ipairs(lists) do
            for ci = 1, #list do pat[li][ci] = concept_pattern_params(g, C) end
        end
        local rendered = {}          -- [res][list][concept] -> flat pattern
        local scale = math.sqrt(1 / 3)
        for i = 0, n - 1 do
            local r = res[i % #res + 1]
            local pick = draws(g, 3, "uniform")
            local ci, words = {}, {}
            for li, list in ipairs(lists) do
                ci[li] = math.min(#list, math.floor(pick[li] * #list) + 1)
                words[li] = list[ci[li]]
            end
            local caption = string.format("%s %s %s %s", words[1]:match("^[aeiou]") and "an" or "a", words[1],
                words[2], words[3])
            -- text [L, D]: three concept rows, then zeros
            local rows = {}
            for j = 1, L do
                if j <= 3 then rows[j] = emb[j][ci[j]]
                else
                    local z = {}
                    for k = 1, D do z[k] = 0 end
                    rows[j] = z
                end
            end
            local text = Tensor.tensor(rows, {dtype = tdt})
            local pooled
            if proj then
                local pv = {}
                for p = 1, P do
                    local acc = 0
                    for k = 1, D do acc = acc + proj[(p - 1) * D + k] * (rows[1][k] + rows[2][k] + rows[3][k]) / 3 end
                    pv[p] = acc / math.sqrt(D)
                end
                pooled = Tensor.tensor(pv, {dtype = tdt})
            end
            -- latents = (sum of the three concept patterns) / sqrt(3) + noise
            local key = r[1] .. "x" .. r[2]
            rendered[key] = rendered[key] or {{}, {}, {}}
            local parts = {}
            for li = 1, 3 do
                local cache = rendered[key][li]
                cache[ci[li]] = cache[ci[li]] or render(pat[li][ci[li]], frames, r[1], r[2])
                parts[li] = cache[ci[li]]
            end
            local total = #parts[1]
            local eps = noise > 0 and draws(g, total, "normal") or nil
            local vals = {}
            for k = 1, total do
                vals[k] = scale * (parts[1][k] + parts[2][k] + parts[3][k]) + (eps and noise * eps[k] or 0)
            end
            local shape = frames and {C, frames, r[1], r[2]} or {C, r[1], r[2]}
            local lat = Tensor.tensor(vals, {dtype = "float64"}):reshape(shape):to{dtype = ldt}
            writer:add{id = string.format("%08d", i), caption = caption, latents = lat, text_embeddings = text,
                       pooled = pooled}
        end
        return writer:finish{synthetic = {seed = seed, noise = noise, generator = "nemo.data.synthetic"}}
    end)
    if not ok then
        writer:abort()
        error(err, 2)
    end
    return err
end

return M
