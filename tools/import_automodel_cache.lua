-- tools/import_automodel_cache.lua: convert a NeMo Automodel preprocessed cache (metadata.json,
-- metadata_shard_*.json and one torch.save() file per sample) into a nemo-lua latent cache
-- (docs/data.md). Nothing is encoded again; latents and text embeddings keep their dtypes.
--
--   nemo-lua tools/import_automodel_cache.lua --src AUTOMODEL_CACHE --out NEMO_CACHE
--            [--model-type flux|wan|wan2.1|wan22] [--shard-size N] [--force]
--
-- The output folder is written complete or not at all (lua/nemo/data/automodel.lua).
local am = require "nemo.data.automodel"

local USAGE = [==[
usage: nemo-lua tools/import_automodel_cache.lua --src AUTOMODEL_CACHE --out NEMO_CACHE
         [--model-type flux|wan|wan2.1|wan22] [--shard-size N] [--force]
Reads Automodel's metadata.json and the per-sample .pt / .meta files it lists; writes index.json and
safetensors shards to --out (refused when --out is a non-empty folder, unless --force).]==]

local function parse(args)
    local o, i = {}, 1
    while i <= #args do
        local a = args[i]
        if a == "-h" or a == "--help" then return nil end
        if a == "--force" then
            o.force = true
        elseif a == "--src" or a == "--out" or a == "--model-type" or a == "--shard-size" then
            local v = args[i + 1]
            if v == nil then error(a .. " needs a value\n" .. USAGE, 0) end
            if a == "--shard-size" then
                v = tonumber(v)
                if not v or v < 1 or v % 1 ~= 0 then error("--shard-size must be a positive integer", 0) end
            end
            o[(a:sub(3):gsub("%-", "_"))] = v
            i = i + 1
        else
            error("unexpected argument '" .. a .. "'\n" .. USAGE, 0)
        end
        i = i + 1
    end
    if not o.src or not o.out then error("--src and --out are required\n" .. USAGE, 0) end
    return o
end

-- errors are messages for the user: no traceback; exit 2 for usage, 1 for a failed conversion
local okp, o = pcall(parse, arg or {})
if not okp then io.stderr:write("import_automodel_cache: ", tostring(o), "\n"); os.exit(2) end
if not o then print(USAGE) return end
local t0 = os.clock()
local ok, out, n = pcall(am.convert, {src = o.src, out = o.out, model_type = o.model_type, force = o.force,
                                      shard_size = o.shard_size, log = print})
if not ok then io.stderr:write("import_automodel_cache: ", tostring(out), "\n"); os.exit(1) end
print(string.format("converted %d samples from %s into %s (%.1f s)", n, o.src, out, os.clock() - t0))
