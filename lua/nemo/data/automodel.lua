-- lua/nemo/data/automodel.lua: NeMo Automodel's preprocessed caches, converted into nemo-lua's
-- latent cache (docs/data.md), so that media encoded once with Automodel's
-- `python -m tools.diffusion.preprocessing_multiprocess` trains here without encoding again.
--
--   local am = require "nemo.data.automodel"
--   am.is_cache(dir)                        -- true when dir holds Automodel's metadata.json
--   am.convert{src = dir, out = dir2, model_type = nil, force = false, log = print} -> out, n
--
-- Automodel's layout (../shared/notes/automodel.md §3): metadata.json {model_type, shards: [names]},
-- metadata_shard_NNNN.json (a list of sample entries: cache_file, bucket_resolution, prompt, ...)
-- and one torch.save() file per sample (<W>x<H>/<md5>.pt or .meta) read by nemo.torchfile:
--   flux: latent [16, h, w], prompt_embeds [1, L, 4096], pooled_prompt_embeds [1, 768]
--   wan:  video_latents [1, 16, F, h, w], text_embeddings [1, 226, 4096]
-- Latents and embeddings keep their stored dtypes (fp16 / bf16). A sample's id is its file's stem
-- (Automodel's md5). cache_file paths are absolute on the machine that encoded them: one that does
-- not exist is looked up under the cache folder by its last two path components (<W>x<H>/<file>).
-- The output is written through CacheWriter: complete or not at all.
local json = require "nemo.json"
local fs = require "nemo.fs"
local data = require "nemo.data"

local M = {}

-- Automodel model_type -> nemo-lua model_type
M.MODEL_TYPES = {flux = "flux", wan = "wan", ["wan2.1"] = "wan", wan21 = "wan", wan22 = "wan", ["wan2.2"] = "wan"}

local function err(path, msg) error(string.format("automodel cache: %s: %s", path, msg), 0) end

function M.is_cache(dir)
    return type(dir) == "string" and fs.isfile(dir .. "/metadata.json") and not fs.isfile(dir .. "/index.json")
end

local function read_json(path)
    if not fs.isfile(path) then err(path, "missing") end
    local ok, v = pcall(json.read_file, path)
    if not ok then err(path, tostring(v)) end
    return v
end

-- The sample file of an entry: its cache_file, or the same last two components under dir.
local function locate(dir, entry, where)
    local p = entry.cache_file
    if type(p) ~= "string" or p == "" then err(where, "cache_file must be a path, got " .. tostring(p)) end
    if p:sub(1, 1) ~= "/" then p = dir .. "/" .. p end
    if fs.isfile(p) then return p end
    local tail = entry.cache_file:match("([^/]+/[^/]+)$")
    if tail and fs.isfile(dir .. "/" .. tail) then return dir .. "/" .. tail end
    err(where, string.format("cache_file '%s' does not exist, nor %s/%s", entry.cache_file, dir, tostring(tail)))
end

local function squeeze0(t, name, file, want_ndim)
    if t == nil or type(t) ~= "table" or not t._c then err(file, "'" .. name .. "' is missing or not a tensor") end
    if t.ndim == want_ndim + 1 and t.shape[1] == 1 then t = t:squeeze(0) end
    if t.ndim ~= want_ndim then
        err(file, string.format("'%s' has shape [%s], expected %d dims (optionally with a leading 1)", name,
            table.concat(t.shape, ", "), want_ndim))
    end
    return t
end

-- One Automodel sample dict -> CacheWriter:add's table.
local function sample_of(d, model_type, file, entry)
    if type(d) ~= "table" or d._c then err(file, "expected a dict of tensors and metadata") end
    local caption = d.prompt
    if type(caption) ~= "string" then caption = type(entry.prompt) == "string" and entry.prompt or "" end
    if model_type == "flux" then
        return {latents = squeeze0(d.latent, "latent", file, 3),
                text_embeddings = squeeze0(d.prompt_embeds, "prompt_embeds", file, 2),
                pooled = d.pooled_prompt_embeds and squeeze0(d.pooled_prompt_embeds, "pooled_prompt_embeds", file, 1),
                caption = caption}
    end
    return {latents = squeeze0(d.video_latents, "video_latents", file, 4),
            text_embeddings = squeeze0(d.text_embeddings, "text_embeddings", file, 2), caption = caption}
end

-- convert{src=, out=, model_type = (from metadata.json), force = false, shard_size = 256, log = nil}
-- -> out, number of samples. Errors name the file and what is wrong; nothing is left at out then.
function M.convert(opts)
    local torchfile = require "nemo.torchfile"
    local src, out = opts.src, opts.out
    if type(src) ~= "string" or type(out) ~= "string" then error("convert: src and out must be folder paths", 2) end
    src = src:gsub("/+$", "")
    if not fs.isdir(src) then err(src, "is not a folder") end
    local meta_path = src .. "/metadata.json"
    local meta = read_json(meta_path)
    if type(meta) ~= "table" or type(meta.shards) ~= "table" then
        err(meta_path, "expected an object with a 'shards' list (Automodel's preprocessing metadata)")
    end
    local am_type = opts.model_type or meta.model_type
    local model_type = M.MODEL_TYPES[am_type]
    if not model_type then
        err(meta_path, string.format("model_type '%s' is not one nemo-lua trains (flux, wan, wan2.1, wan22)",
            tostring(am_type)))
    end
    local writer = data.CacheWriter(out, {model_type = model_type, force = opts.force, shard_size = opts.shard_size})
    local ok, res = pcall(function()
        local n, seen = 0, {}
        for si, shard in ipairs(meta.shards) do
            if type(shard) ~= "string" or shard:find("/", 1, true) then
                err(meta_path, string.format("shards[%d] must be a file name in the cache folder", si))
            end
            local spath = src .. "/" .. shard
            local entries = read_json(spath)
            if type(entries) ~= "table" then err(spath, "expected a list of sample entries") end
            for ei, entry in ipairs(entries) do
                local where = string.format("%s[%d]", spath, ei)
                if type(entry) ~= "table" then err(where, "expected an object") end
                local file = locate(src, entry, where)
                local id = file:match("([^/]+)$"):gsub("%.[^.]*$", ""):gsub("%.", "_")
                if seen[id] then err(where, string.format("sample id '%s' (from %s) appears twice", id, file)) end
                seen[id] = true
                local okl, d = pcall(torchfile.load, file)
                if not okl then err(file, tostring(d)) end
                local s = sample_of(d, model_type, file, entry)
                s.id = id
                local oka, e = pcall(writer.add, writer, s)
                if not oka then err(file, tostring(e)) end
                n = n + 1
                if opts.log and n % 1000 == 0 then opts.log(string.format("converted %d samples", n)) end
            end
        end
        if n == 0 then err(src, "the cache lists no samples") end
        return n
    end)
    if not ok then writer:abort(); error(res, 0) end
    writer:finish({source = {format = "nemo_automodel", path = src, model_type = am_type,
                             processor = meta.processor, model_name = meta.model_name}})
    return out, res
end

return M
