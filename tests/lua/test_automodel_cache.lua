-- tests/lua/test_automodel_cache.lua: NeMo Automodel preprocessed caches convert into nemo-lua
-- latent caches (lua/nemo/data/automodel.lua, tools/import_automodel_cache.lua). The sample files
-- are real torch.save() output (tests/golden/torch_save, written by torch 2.15); the cache
-- around them (metadata.json, metadata_shard_0000.json, <W>x<H>/<md5>.pt) is laid out here as
-- Automodel's preprocessing lays it out (../shared/notes/automodel.md §3).
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local fs = require "nemo.fs"
local json = require "nemo.json"
local data = require "nemo.data"
local am = require "nemo.data.automodel"
local tf = require "nemo.torchfile"

local FIX = "tests/golden/torch_save"
local tmp = os.tmpname()
os.remove(tmp)
fs.mkdirs(tmp)

local function copy(src, dst)
    fs.mkdirs(fs.dirname(dst))
    fs.copy_file(src, dst)
end
local function write_json(path, v) T.write_bytes(path, json.encode(v)) end
local same = T.same_bits

-- An Automodel cache at dir with the given sample files (name -> fixture), model_type mt.
-- cache_file of the first sample points at another machine's path (re-rooted on conversion).
local function make_cache(dir, mt, files)
    local entries = {}
    for i, f in ipairs(files) do
        local rel = "96x64/" .. f.md5 .. f.ext
        copy(FIX .. "/" .. f.fixture, dir .. "/" .. rel)
        entries[i] = {cache_file = (i == 1 and "/encoder-host/cache/" or dir .. "/") .. rel,
                      bucket_resolution = {96, 64}, prompt = "entry prompt " .. i, model_type = mt}
    end
    write_json(dir .. "/metadata_shard_0000.json", entries)
    write_json(dir .. "/metadata.json", {processor = mt, model_type = mt, model_name = "test",
                                         shards = {"metadata_shard_0000.json"}, total_items = #files})
end

-- ==== FLUX ====
do
    local src, out = tmp .. "/am_flux", tmp .. "/nemo_flux"
    make_cache(src, "flux", {{md5 = "0123456789abcdef", ext = ".pt", fixture = "flux_sample.pt"},
                             {md5 = "fedcba9876543210", ext = ".pt", fixture = "flux_sample_p4.pt"}})
    T.ok(am.is_cache(src) and not am.is_cache(out), "is_cache: metadata.json marks an Automodel cache")
    local okd, derr = pcall(data.Dataset, src)
    T.ok(not okd and tostring(derr):find("NeMo Automodel cache", 1, true) and
         tostring(derr):find("tools/import_automodel_cache.lua --src", 1, true),
         "opening an Automodel cache as a dataset says how to convert it", tostring(derr))
    local okc, res, n = pcall(am.convert, {src = src, out = out})
    T.ok(okc and n == 2, "convert: 2 FLUX samples", not okc and tostring(res) or nil)
    local ds = data.Dataset(out, {model_type = "flux"})
    T.is(ds:len(), 2, "the converted cache opens as a flux dataset with 2 samples")
    local ref = tf.load(FIX .. "/flux_sample.pt")
    local s = ds:get(ds:index_of("0123456789abcdef"))
    T.ok(s ~= nil and s.latents.dtype == "float16" and table.concat(s.latents.shape, "x") == "16x8x12",
         "latents keep Automodel's float16 [16, h, w]")
    T.ok(same(s.latents, ref.latent), "latents: the same bits as the .pt file's latent")
    T.ok(s.text_embeddings.dtype == "bfloat16" and same(s.text_embeddings, ref.prompt_embeds:squeeze(0)),
         "text_embeddings = prompt_embeds[0], bfloat16, the same bits")
    T.ok(s.pooled ~= nil and same(s.pooled, ref.pooled_prompt_embeds:squeeze(0)),
         "pooled = pooled_prompt_embeds[0], the same bits")
    T.is(s.caption, ref.prompt, "caption = the sample's prompt (non-ASCII kept)")
    T.is(s.bucket, "8x12", "bucket = the latent's [h, w]")
    local idx = json.read_file(out .. "/index.json")
    T.ok(idx.source and idx.source.format == "nemo_automodel" and idx.source.model_type == "flux",
         "index.json records the Automodel source")
    -- the converted cache trains: one collated batch of both samples
    local dl = data.DataLoader(ds, {batch_size = 2, seed = 0, shuffle = false, drop_last = true})
    local b = dl:iter()()
    T.ok(b and b.image_latents and table.concat(b.image_latents.shape, "x") == "2x16x8x12" and
         table.concat(b.text_embeddings.shape, "x") == "2x24x32",
         "a batch of the converted cache collates (20 text tokens padded to 24, Automodel's multiple of 8)")
    -- refusing to overwrite, then force
    local okr, rerr = pcall(am.convert, {src = src, out = out})
    T.ok(not okr and tostring(rerr):find("refusing to overwrite", 1, true), "a non-empty --out is refused",
         tostring(rerr))
    T.ok(pcall(am.convert, {src = src, out = out, force = true}), "force = true replaces it")
end

-- ==== Wan ====
do
    local src, out = tmp .. "/am_wan", tmp .. "/nemo_wan"
    make_cache(src, "wan2.1", {{md5 = "aaaabbbbccccdddd", ext = ".meta", fixture = "wan_sample.pt"}})
    local okc, res, n = pcall(am.convert, {src = src, out = out})
    T.ok(okc and n == 1, "convert: a Wan sample (.meta, model_type wan2.1)", not okc and tostring(res) or nil)
    local ds = data.Dataset(out, {model_type = "wan"})
    local ref = tf.load(FIX .. "/wan_sample.pt")
    local s = ds:get(1)
    T.ok(same(s.latents, ref.video_latents:squeeze(0)) and table.concat(s.latents.shape, "x") == "16x3x6x8",
         "video latents [16, F, h, w] = video_latents[0], the same bits")
    T.ok(same(s.text_embeddings, ref.text_embeddings:squeeze(0)) and s.pooled == nil,
         "text_embeddings = text_embeddings[0] [226, D]; no pooled")
end

-- ==== errors: nothing is left at out ====
do
    local src = tmp .. "/am_bad"
    make_cache(src, "hunyuan", {{md5 = "1111", ext = ".pt", fixture = "flux_sample.pt"}})
    local ok, e = pcall(am.convert, {src = src, out = tmp .. "/o1"})
    T.ok(not ok and tostring(e):find("model_type 'hunyuan' is not one nemo-lua trains", 1, true),
         "an unsupported model_type is an error naming it", tostring(e))
    T.ok(not fs.exists(tmp .. "/o1"), "and nothing is written")

    src = tmp .. "/am_missing"
    make_cache(src, "flux", {{md5 = "2222", ext = ".pt", fixture = "flux_sample.pt"},
                             {md5 = "3333", ext = ".pt", fixture = "flux_sample.pt"}})
    os.remove(src .. "/96x64/3333.pt")
    ok, e = pcall(am.convert, {src = src, out = tmp .. "/o2"})
    T.ok(not ok and tostring(e):find("3333.pt' does not exist", 1, true), "a missing sample file is named", tostring(e))
    local leftovers = 0
    for _, name in ipairs(fs.list(tmp)) do if name:find("^o2") then leftovers = leftovers + 1 end end
    T.is(leftovers, 0, "a failed conversion leaves neither the output nor its temporary folder")

    src = tmp .. "/am_corrupt"
    make_cache(src, "flux", {{md5 = "4444", ext = ".pt", fixture = "flux_sample.pt"}})
    local f = assert(io.open(src .. "/96x64/4444.pt", "r+b"))
    f:write(string.rep("\0", 64))
    f:close()
    ok, e = pcall(am.convert, {src = src, out = tmp .. "/o3"})
    T.ok(not ok and tostring(e):find("4444.pt", 1, true), "a corrupt sample file is an error naming it", tostring(e))

    src = tmp .. "/am_wrongtype"
    make_cache(src, "flux", {{md5 = "5555", ext = ".pt", fixture = "wan_sample.pt"}})
    ok, e = pcall(am.convert, {src = src, out = tmp .. "/o4"})
    T.ok(not ok and tostring(e):find("'latent' is missing", 1, true),
         "a Wan sample in a flux cache: an error naming the missing 'latent'", tostring(e))
end

-- ==== the command line ====
do
    local src = tmp .. "/am_flux"
    local cmd = string.format("./nemo-lua tools/import_automodel_cache.lua --src %s --out %s/cli_out", src, tmp)
    local sh = T.sh   -- stdout and stderr, exit status
    local text, rc = sh(cmd)
    T.ok(rc == 0 and text:find("converted 2 samples", 1, true) and fs.isfile(tmp .. "/cli_out/index.json"),
         "tools/import_automodel_cache.lua converts from the command line", text)
    text, rc = sh("./nemo-lua tools/import_automodel_cache.lua --src " .. src)
    T.ok(rc == 2 and text:find("--src and --out are required", 1, true) and not text:find("traceback", 1, true),
         "a missing --out is a usage error (exit 2, no traceback)", text)
    text, rc = sh(cmd)
    T.ok(rc == 1 and text:find("refusing to overwrite", 1, true) and not text:find("traceback", 1, true),
         "a conversion error exits 1 with the message only", text)
end

fs.remove_tree(tmp)
T.done()
