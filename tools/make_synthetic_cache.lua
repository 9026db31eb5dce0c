-- tools/make_synthetic_cache.lua: write a synthetic latent cache (docs/data.md) that a model can
-- learn: latents are a fixed function of the caption embedding plus small noise (see
-- lua/nemo/data/synthetic.lua for the construction).
--
--   nemo-lua tools/make_synthetic_cache.lua --out DIR --samples N --model flux|wan
--            [--resolutions 16x16,16x24] [--seed S] [--force] [--channels C] [--frames F]
--            [--text-len L] [--text-dim D] [--pooled-dim P] [--noise X] [--shard-size N]
--            [--latent-dtype float16] [--text-dtype bfloat16]
--
-- Run as a script it parses the command line; loaded with dofile() it returns the module, so a
-- recipe can call dofile("tools/make_synthetic_cache.lua").make{out = ..., samples = ..., model = ...}
-- (the same as require("nemo.data.synthetic").make).
local synthetic = require "nemo.data.synthetic"

local M = {make = synthetic.make, parse_resolutions = synthetic.parse_resolutions}

local USAGE = [==[
usage: nemo-lua tools/make_synthetic_cache.lua --out DIR --samples N --model flux|wan
         [--resolutions HxW[,HxW...]] [--seed S] [--force] [--channels C] [--frames F]
         [--text-len L] [--text-dim D] [--pooled-dim P] [--noise X] [--shard-size N]
         [--latent-dtype float16|bfloat16|float32] [--text-dtype float16|bfloat16|float32]
Resolutions are latent sizes (pixels / 8), even numbers. Refuses a non-empty --out unless --force.]==]

local NUMERIC = {samples = true, seed = true, channels = true, frames = true, text_len = true, text_dim = true,
                 pooled_dim = true, noise = true, shard_size = true}
local STRING = {out = true, model = true, resolutions = true, latent_dtype = true, text_dtype = true}

-- parse_args({"--out", "x", ...}) -> options table for make(); errors say what is wrong.
function M.parse_args(args)
    local opts = {}
    local i = 1
    while i <= #args do
        local a = args[i]
        if a == "-h" or a == "--help" then return nil end
        local name, inline = a:match("^%-%-([%w%-]+)=(.*)$")
        if not name then name = a:match("^%-%-([%w%-]+)$") end
        if not name then error("unexpected argument '" .. a .. "'\n" .. USAGE, 0) end
        local key = name:gsub("%-", "_")
        if key == "force" then
            opts.force = true
        elseif NUMERIC[key] or STRING[key] then
            local v = inline
            if v == nil then
                i = i + 1
                v = args[i]
                if v == nil then error("--" .. name .. " needs a value\n" .. USAGE, 0) end
            end
            if NUMERIC[key] then
                local num = tonumber(v)
                if not num then error("--" .. name .. " must be a number, got '" .. v .. "'", 0) end
                v = num
            end
            opts[key] = v
        else
            error("unknown option --" .. name .. "\n" .. USAGE, 0)
        end
        i = i + 1
    end
    for _, k in ipairs { "out", "samples", "model" } do
        if opts[k] == nil then error("--" .. k .. " is required\n" .. USAGE, 0) end
    end
    return opts
end

-- run as the main script (arg[0] is this file); a dofile() from a recipe has the recipe in arg[0]
if arg and type(arg[0]) == "string" and arg[0]:match("make_synthetic_cache%.lua$") then
    local ok, opts = pcall(M.parse_args, arg)
    if not ok then io.stderr:write("make_synthetic_cache: ", opts, "\n"); os.exit(2) end
    if opts == nil then print(USAGE); os.exit(0) end
    local okm, res = pcall(M.make, opts)
    if not okm then io.stderr:write(tostring(res), "\n"); os.exit(1) end
    print(string.format("make_synthetic_cache: wrote %d %s samples to %s", opts.samples, opts.model, res))
    return M
end

return M
