-- tests/lua/test_data.lua: the latent cache (nemo.data): synthetic cache -> Dataset -> batches,
-- single-resolution batches, determinism per seed, epoch reshuffles, data-parallel slicing,
-- resume, every bad-input error, collate's padding rules, the mock loader, and the
-- make_synthetic_cache tool (script and function).
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local data = require "nemo.data"
local synthetic = require "nemo.data.synthetic"
local fs = require "nemo.fs"
local json = require "nemo.json"

local shape_str = nemo.Tensor.shape_str

local base = os.tmpname()
os.remove(base)
fs.mkdirs(base)
local function dir(name) return base .. "/" .. name end

local function seq(sampler)
    local out = {}
    for idx, key in sampler:iter() do out[#out + 1] = {idx = idx, key = key} end
    return out
end
local function flat(batches)
    local out = {}
    for _, b in ipairs(batches) do for _, i in ipairs(b.idx) do out[#out + 1] = i end end
    return out
end
local function same_list(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do if a[i] ~= b[i] then return false end end
    return true
end
local function same_seq(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do if a[i].key ~= b[i].key or not same_list(a[i].idx, b[i].idx) then return false end end
    return true
end

-- ==== synthetic cache -> Dataset ====

local flux_dir = synthetic.make{out = dir("flux"), samples = 26, model = "flux", resolutions = "16x16,16x24", seed = 3}
T.is(flux_dir, dir("flux"), "make returns the cache path")
local ds = data.Dataset(flux_dir, {model_type = "flux"})
T.is(ds:len(), 26, "Dataset: 26 samples")
T.is(#ds.buckets .. ":" .. ds.buckets[1].key .. "=" .. #ds.buckets[1].indices .. "," .. ds.buckets[2].key .. "=" ..
    #ds.buckets[2].indices, "2:16x16=13,16x24=13", "Dataset: two buckets, smallest first")
local s1 = ds:get(2)
T.is(shape_str(s1.latents.shape) .. " " .. s1.latents.dtype, "(16, 16, 24) float16", "sample latents [C,H,W] float16")
T.is(shape_str(s1.text_embeddings.shape) .. " " .. s1.text_embeddings.dtype, "(8, 32) bfloat16", "sample text [L,D] bfloat16")
T.is(shape_str(s1.pooled.shape), "(32,)", "sample pooled [P]")
T.ok(type(s1.caption) == "string" and s1.caption:match("^an? %a+ %a+ "), "sample caption: " .. tostring(s1.caption))
T.is(ds.data_type .. "/" .. ds.text_dim .. "/" .. ds.pooled_dim .. "/" .. ds.latent_channels, "image/32/32/16",
    "Dataset: data_type, text_dim, pooled_dim, channels from the index")
T.ok(tostring(ds):match("16x16: 13"), "Dataset prints its buckets")

do -- the writer is deterministic per seed
    synthetic.make{out = dir("flux_again"), samples = 26, model = "flux", resolutions = "16x16,16x24", seed = 3}
    synthetic.make{out = dir("flux_seed4"), samples = 26, model = "flux", resolutions = "16x16,16x24", seed = 4}
    local a = fs.read(dir("flux") .. "/shard-00000.safetensors")
    T.ok(a == fs.read(dir("flux_again") .. "/shard-00000.safetensors") and
        fs.read(dir("flux") .. "/index.json") == fs.read(dir("flux_again") .. "/index.json"),
        "make_synthetic_cache: same seed, identical files")
    T.ok(a ~= fs.read(dir("flux_seed4") .. "/shard-00000.safetensors"), "make_synthetic_cache: another seed, other data")
end

do -- latents are a function of the caption plus small noise
    local p = synthetic.make{out = dir("learn"), samples = 400, model = "flux", resolutions = "4x4", seed = 1, shard_size = 100}
    local d = data.Dataset(p)
    T.is(#d.index.shards, 4, "shard_size 100: 400 samples in 4 shards")
    local by_caption, same_rms, diff_rms, sq, n = {}, {}, {}, 0, 0
    for i = 1, d:len() do
        local s = d:get(i)
        local v = s.latents:double():reshape{-1}:tolist()
        for _, x in ipairs(v) do sq = sq + x * x; n = n + 1 end
        local prev = by_caption[s.caption]
        local function rms(a, b) local acc = 0 for k = 1, #a do acc = acc + (a[k] - b[k]) ^ 2 end return math.sqrt(acc / #a) end
        if prev then same_rms[#same_rms + 1] = rms(prev, v) end
        if i > 1 and #diff_rms < 50 then
            local o = d:get(i - 1)
            if o.caption ~= s.caption then diff_rms[#diff_rms + 1] = rms(o.latents:double():reshape{-1}:tolist(), v) end
        end
        by_caption[s.caption] = by_caption[s.caption] or v
    end
    local function mean(t) local a = 0 for _, x in ipairs(t) do a = a + x end return a / #t end
    T.ok(#same_rms > 50, "400 samples over 288 captions repeat captions (" .. #same_rms .. " repeats)")
    T.near(mean(same_rms), 0.05 * math.sqrt(2), 0.02, "same caption: latents differ by the noise only (rms ~ 0.05 sqrt 2)")
    T.ok(mean(diff_rms) > 0.6, string.format("different captions: latents differ a lot (rms %.2f > 0.6)", mean(diff_rms)))
    T.near(math.sqrt(sq / n), 1, 0.25, "latents have about unit scale")
end

-- ==== the sampler ====

do
    local a = seq(data.BucketSampler(ds, {batch_size = 4, seed = 5}))
    local b = seq(data.BucketSampler(ds, {batch_size = 4, seed = 5}))
    local c = seq(data.BucketSampler(ds, {batch_size = 4, seed = 6}))
    T.ok(same_seq(a, b), "sampler: same seed, same batch sequence")
    T.ok(not same_seq(a, c), "sampler: other seed, other sequence")
    T.is(#a, 6, "drop_last: 13 per bucket -> 3 full batches of 4 each, 6 in all")
    local single = true
    for _, bt in ipairs(a) do
        if #bt.idx ~= 4 then single = false end
        for _, i in ipairs(bt.idx) do if ds.samples[i].bucket ~= bt.key then single = false end end
    end
    T.ok(single, "every batch holds 4 samples of ONE bucket")
    local keys = {}
    for i, bt in ipairs(a) do keys[i] = bt.key end
    T.ok(table.concat(keys, ","):find("16x24,16x16") or table.concat(keys, ","):find("16x16,16x24,16x16"),
        "batches of the two buckets are interleaved: " .. table.concat(keys, ","))

    local sp = data.BucketSampler(ds, {batch_size = 4, seed = 5, drop_last = false})
    local e0 = seq(sp)
    sp:set_epoch(1)
    local e1 = seq(sp)
    T.ok(not same_seq(e0, e1), "set_epoch(1) reshuffles")
    local f0, f1 = flat(e0), flat(e1)
    table.sort(f0); table.sort(f1)
    local all = {}
    for i = 1, 26 do all[i] = i end
    T.ok(same_list(f0, all) and same_list(f1, all), "drop_last=false, dp 1: each epoch covers every sample exactly once")
    T.is(#e0, sp:len(), "len() is the number of batches per epoch (" .. sp:len() .. ")")
    sp:set_epoch(0)
    T.ok(same_seq(seq(sp), e0), "epoch 0 again gives the epoch-0 sequence")

    -- data parallel: rank 0 ++ rank 1 (local 2) == dp 1 with batch 4
    for _, drop in ipairs {true, false} do
        for epoch = 0, 1 do
            local one = data.BucketSampler(ds, {batch_size = 4, seed = 9, drop_last = drop})
            local r0 = data.BucketSampler(ds, {batch_size = 2, seed = 9, dp_size = 2, dp_rank = 0, drop_last = drop})
            local r1 = data.BucketSampler(ds, {batch_size = 2, seed = 9, dp_size = 2, dp_rank = 1, drop_last = drop})
            for _, s in ipairs {one, r0, r1} do s:set_epoch(epoch) end
            local so, s0, s1b = seq(one), seq(r0), seq(r1)
            local ok = #so == #s0 and #so == #s1b and r0:len() == r1:len()
            for k = 1, math.min(#so, #s0, #s1b) do
                local cat = {}
                for _, i in ipairs(s0[k].idx) do cat[#cat + 1] = i end
                for _, i in ipairs(s1b[k].idx) do cat[#cat + 1] = i end
                if #s0[k].idx ~= #s1b[k].idx or s0[k].key ~= so[k].key then ok = false end
                if #so[k].idx % 2 == 0 and not same_list(cat, so[k].idx) then ok = false end
            end
            T.ok(ok, string.format("dp 2 x local 2 == dp 1 x 4, batch for batch (drop_last %s, epoch %d)", tostring(drop), epoch))
        end
    end
    -- an odd partial batch is padded so both ranks get the same size
    local p0 = seq(data.BucketSampler(ds, {batch_size = 2, seed = 9, dp_size = 2, dp_rank = 0, drop_last = false}))
    local p1 = seq(data.BucketSampler(ds, {batch_size = 2, seed = 9, dp_size = 2, dp_rank = 1, drop_last = false}))
    local sizes_ok = #p0 == #p1
    for k = 1, #p0 do if #p0[k].idx ~= #p1[k].idx or #p0[k].idx < 1 then sizes_ok = false end end
    T.ok(sizes_ok, "drop_last=false: the last odd global batch is padded, ranks get equal sizes")

    -- resume
    local full = seq(data.BucketSampler(ds, {batch_size = 2, seed = 4}))
    local sa = data.BucketSampler(ds, {batch_size = 2, seed = 4})
    sa:set_epoch(0)
    local it = sa:iter()
    for _ = 1, 3 do it() end
    local state = sa:state_dict()
    T.is(state.epoch .. "/" .. state.batch_index, "0/3", "state_dict: epoch 0, 3 batches yielded")
    local sb = data.BucketSampler(ds, {batch_size = 2, seed = 4})
    sb:load_state_dict(json.decode(json.encode(state)))
    local rest = seq(sb)
    local tail = {}
    for k = 4, #full do tail[#tail + 1] = full[k] end
    T.ok(same_seq(rest, tail), "resume from the state continues the same sequence (" .. #rest .. " batches)")
    T.ok(same_seq(seq(sb), full), "after the resumed epoch, iteration starts from the beginning again")
    -- resume with another dp layout but the same global batch
    local r = data.BucketSampler(ds, {batch_size = 1, seed = 4, dp_size = 2, dp_rank = 1})
    r:load_state_dict(state)
    local rr = seq(r)
    local okdp = #rr == #tail
    for k = 1, #rr do if rr[k].idx[1] ~= tail[k].idx[2] then okdp = false end end
    T.ok(okdp, "resume with dp_size 2 (same global batch): rank 1 continues with the second half of each batch")
    T.raises(function() data.BucketSampler(ds, {batch_size = 2, seed = 5}):load_state_dict(state) end,
        "seed = 4, this run has 5", "load_state_dict: another seed is an error")
    T.raises(function() data.BucketSampler(ds, {batch_size = 4, seed = 4}):load_state_dict(state) end,
        "global_batch_size = 2, this run has 4", "load_state_dict: another global batch is an error")
    T.raises(function() data.BucketSampler(ds, {batch_size = 20, seed = 4}) end, "no batch can be formed",
        "batch larger than every bucket with drop_last: an error")
    T.raises(function() data.BucketSampler(ds, {batch_size = 2, dp_size = 2, dp_rank = 2}) end, "dp_rank must be in",
        "dp_rank out of range")
    T.raises(function() data.BucketSampler(ds, {batchsize = 2}) end, "unknown option 'batchsize'", "unknown sampler option")
end

-- ==== DataLoader and collate ====

do
    local dl = data.DataLoader(ds, {batch_size = 3, seed = 2})
    local n, ok = 0, true
    for b in dl:iter() do
        n = n + 1
        local s = b.image_latents.shape
        if #s ~= 4 or s[1] ~= 3 or s[2] ~= 16 or s[3] ~= 16 or (s[4] ~= 16 and s[4] ~= 24) then ok = false end
        if shape_str(b.text_embeddings.shape) ~= "(3, 8, 32)" or shape_str(b.pooled_prompt_embeds.shape) ~= "(3, 32)" then ok = false end
        if b.data_type ~= "image" or #b.ids ~= 3 or b.bucket ~= s[3] .. "x" .. s[4] then ok = false end
        -- the batch holds exactly the samples' tensors
        local first = ds:get(ds:index_of(b.ids[1]))
        if (b.image_latents:narrow(0, 0, 1):reshape{-1}:double() - first.latents:reshape{-1}:double()):abs():tolist()[1] ~= 0 then
            ok = false
        end
    end
    T.ok(ok and n == dl:len(), "DataLoader: " .. n .. " batches {image_latents [3,16,16,W], text [3,8,32], pooled [3,32]}")

    -- collate rules
    local function sample(id, lshape, L, D, P)
        return {id = id, caption = id, bucket = "x", latents = nemo.randn(lshape), text_embeddings = nemo.ones(L, D),
                pooled = P and nemo.ones(P) or nil}
    end
    local b = data.collate({sample("a", {4, 2, 2}, 5, 6, 3), sample("b", {4, 2, 2}, 7, 6)})
    T.is(shape_str(b.text_embeddings.shape), "(2, 8, 6)", "collate image: text padded to the longest, rounded to 8")
    local te = b.text_embeddings:tolist()
    T.ok(te[1][5][1] == 1 and te[1][6][1] == 0 and te[2][7][6] == 1 and te[2][8][1] == 0, "collate: padding rows are zeros")
    local pp = b.pooled_prompt_embeds:tolist()
    T.ok(pp[1][1] == 1 and pp[2][1] == 0 and pp[2][3] == 0, "collate: pooled zeros for a sample without one")
    local v = data.collate({sample("a", {4, 1, 2, 2}, 5, 6), sample("b", {4, 1, 2, 2}, 7, 6)})
    T.is(shape_str(v.text_embeddings.shape) .. " " .. shape_str(v.video_latents.shape) .. " " .. v.data_type,
        "(2, 7, 6) (2, 4, 1, 2, 2) video", "collate video: video_latents, text padded to the longest")
    T.ok(v.pooled_prompt_embeds == nil, "collate: no pooled key when no sample has one")
    T.ok(data.collate({sample("a", {4, 2, 2}, 5, 6)}, {pooled_dim = 9}).pooled_prompt_embeds.shape[2] == 9,
        "collate: pooled zeros [B, pooled_dim] when the dataset declares one")
    T.raises(function() data.collate({sample("a", {4, 2, 2}, 5, 6), sample("b", {4, 2, 2}, 5, 7)}) end,
        "text embeddings of different widths cannot be batched", "collate: differing text widths are an error")
    T.raises(function() data.collate({sample("a", {4, 2, 2}, 5, 6), sample("b", {4, 2, 4}, 5, 6)}) end,
        "mixed resolutions in one batch", "collate: mixed resolutions are an error")
end

do -- a Wan (video) cache through the loader, and into a flow-matching step
    local p = synthetic.make{out = dir("wan"), samples = 6, model = "wan", seed = 2, frames = 2, resolutions = "8x8"}
    local d = data.Dataset(p, {model_type = "wan"})
    local dl = data.DataLoader(d, {batch_size = 2, seed = 0})
    local b = dl:iter()()
    T.is(shape_str(b.video_latents.shape) .. " " .. shape_str(b.text_embeddings.shape) .. " " .. b.data_type,
        "(2, 16, 2, 8, 8) (2, 12, 16) video", "wan cache: video_latents [B,C,F,H,W], text [B,12,16]")
    local FM = require "nemo.flow_matching"
    local fm = FM.FlowMatching{adapter_type = "simple", timestep_sampling = "uniform"}
    local w = nemo.tensor({0.5}, {requires_grad = true})
    local model = setmetatable({}, {__call = function(_, a) return nemo.F.mul(a.hidden_states, w) end})
    local loss = fm:step(model, b, {generator = nemo.Generator(0), compute_dtype = "float32"})
    loss:backward()
    T.ok(loss:item() > 0 and w.grad ~= nil, "a cache batch feeds FlowMatching:step and backward")
end

-- ==== bad inputs ====

local function copy_cache(src, name)
    local d = dir(name)
    fs.copy_tree(src, d)
    return d
end
local function edit_index(d, fn)
    local idx = json.read_file(d .. "/index.json")
    fn(idx)
    json.write_file(d .. "/index.json", idx)
end

T.raises(function() data.Dataset(dir("nope")) end, "the cache folder does not exist", "missing folder")
fs.mkdirs(dir("empty_dir"))
T.raises(function() data.Dataset(dir("empty_dir")) end, "no index.json", "folder without index.json")
do
    local d = copy_cache(flux_dir, "badjson")
    local f = io.open(d .. "/index.json", "wb"); f:write("{not json"); f:close()
    T.raises(function() data.Dataset(d) end, "invalid JSON", "index.json that is not JSON")
end
do
    local d = copy_cache(flux_dir, "empty")
    edit_index(d, function(idx) idx.samples = json.array{} end)
    T.raises(function() data.Dataset(d) end, "the dataset is empty", "empty dataset")
end
do
    local d = copy_cache(flux_dir, "noshard")
    os.remove(d .. "/shard-00000.safetensors")
    T.raises(function() data.Dataset(d) end, "noshard/shard-00000.safetensors: shard listed in index.json is missing",
        "a listed shard that is absent names the file")
end
do
    local d = copy_cache(flux_dir, "badshape")
    edit_index(d, function(idx) idx.samples[3].bucket = {16, 18} end)
    T.raises(function() data.Dataset(d) end, "sample '00000002': latents have shape (16, 16, 16), the index says (16, 16, 18)",
        "latent shape vs index mismatch names the sample")
end
do
    local d = copy_cache(flux_dir, "badlen")
    edit_index(d, function(idx) idx.samples[5].text_len = 9 end)
    T.raises(function() data.Dataset(d) end, "sample '00000004': text_embeddings have 8 tokens, the index says text_len 9",
        "text length vs index mismatch")
end
do
    local d = copy_cache(flux_dir, "badtd")
    edit_index(d, function(idx) idx.text_dim = 48 end)
    T.raises(function() data.Dataset(d) end, "text embedding width 32 differs from the index's text_dim 48",
        "text width vs index mismatch")
end
do -- widths that differ between samples (an index without text_dim)
    local d = dir("mixed_width")
    fs.mkdirs(d)
    nemo.save_file({["a.latents"] = nemo.zeros(4, 2, 2), ["a.text_embeddings"] = nemo.zeros(3, 8),
                    ["b.latents"] = nemo.zeros(4, 2, 2), ["b.text_embeddings"] = nemo.zeros(3, 6)}, d .. "/s.safetensors")
    json.write_file(d .. "/index.json", {format = data.FORMAT, version = 1, model_type = "flux", shards = {"s.safetensors"},
        samples = {{id = "a", shard = "s.safetensors", bucket = {2, 2}, text_len = 3},
                   {id = "b", shard = "s.safetensors", bucket = {2, 2}, text_len = 3}}})
    T.raises(function() data.Dataset(d) end, "inconsistent text embedding widths: sample 'b' has D = 6, sample 'a' has D = 8",
        "inconsistent text widths between samples")
    edit_index(d, function(idx) idx.samples[2].id = "c" end)
    T.raises(function() data.Dataset(d) end, "sample 'c': tensor 'c.latents' is missing", "a missing tensor names it")
    edit_index(d, function(idx) idx.samples[2].shard = "t.safetensors" end)
    T.raises(function() data.Dataset(d) end, "shard 't.safetensors' is not in the shards list", "unknown shard name")
    edit_index(d, function(idx) idx.version = 2 end)
    T.raises(function() data.Dataset(d) end, "format version 2 is not supported", "unknown format version")
end
T.raises(function() data.Dataset(flux_dir, {model_type = "wan"}) end, "the run trains model_type 'wan'",
    "model_type mismatch")
T.raises(function() data.Dataset(flux_dir, {modeltype = "flux"}) end, "unknown option 'modeltype'", "unknown Dataset option")

-- ==== MockDataLoader ====

do
    local m = data.MockDataLoader{batch_size = 2, latent_shape = {16, 8, 8}, text_len = 5, text_dim = 12, pooled_dim = 7,
                                  seed = 3, length = 8}
    local all = {}
    for b in m:iter() do all[#all + 1] = b end
    local b = all[1]
    T.is(#all .. " " .. shape_str(b.image_latents.shape) .. " " .. shape_str(b.text_embeddings.shape) .. " " ..
        shape_str(b.pooled_prompt_embeds.shape) .. " " .. b.data_type, "4 (2, 16, 8, 8) (2, 5, 12) (2, 7) image",
        "mock: 4 batches of image_latents [2,16,8,8], text [2,5,12], pooled [2,7]")
    local v = data.MockDataLoader{batch_size = 1, latent_shape = {16, 3, 4, 4}, text_len = 6, text_dim = 8}
    local vb = v:iter()()
    T.ok(vb.video_latents and shape_str(vb.video_latents.shape) == "(1, 16, 3, 4, 4)" and vb.pooled_prompt_embeds == nil
        and vb.data_type == "video", "mock: video_latents [1,16,3,4,4], no pooled by default")
    local m2 = data.MockDataLoader{batch_size = 2, latent_shape = {16, 8, 8}, text_len = 5, text_dim = 12, pooled_dim = 7,
                                   seed = 3, length = 8}
    m2:load_state_dict{epoch = 0, batch_index = 2}
    local third = m2:iter()()
    T.close(third.image_latents, all[3].image_latents, 0, 0, "mock: deterministic per seed and resumable")
    T.raises(function() data.MockDataLoader{batch_size = 2, latent_shape = {16, 8}, text_len = 5, text_dim = 12} end,
        "latent_shape must be", "mock: a bad latent_shape is an error")
end

-- ==== the tool ====

do
    local out = dir("cli")
    local cmd = "./nemo-lua tools/make_synthetic_cache.lua --out " .. out ..
        " --samples 5 --model wan --resolutions 8x8,8x12 --seed 7 --frames 1 >/dev/null 2>&1"
    local function run(c) local r = os.execute(c); return r == 0 or r == true end
    T.ok(run(cmd), "tool: writes a cache")
    local d = data.Dataset(out, {model_type = "wan"})
    T.is(d:len() .. " " .. #d.buckets, "5 2", "tool: the cache opens (5 samples, 2 buckets)")
    local before = fs.read(out .. "/index.json")
    T.ok(not run(cmd:gsub("--seed 7", "--seed 8")), "tool: refuses a non-empty --out without --force")
    T.ok(fs.read(out .. "/index.json") == before, "tool: the refused run left the folder untouched")
    T.ok(run(cmd:gsub("--seed 7", "--seed 8 --force")), "tool: --force replaces it")
    T.ok(fs.read(out .. "/index.json") ~= before, "tool: the replaced cache is the new one")
    local leftovers = 0
    for _, name in ipairs(fs.list(base)) do if name:match("%.tmp%-") or name:match("%.old%-") then leftovers = leftovers + 1 end end
    T.is(leftovers, 0, "tool: no temporary folders left behind")
    T.ok(not run("./nemo-lua tools/make_synthetic_cache.lua --out " .. dir("x") .. " --samples 2 --model sd3 >/dev/null 2>&1"),
        "tool: an unknown --model fails")
    T.ok(not fs.exists(dir("x")), "tool: a failed run leaves no folder")
    local tool = dofile("tools/make_synthetic_cache.lua")
    T.ok(type(tool.make) == "function" and tool.parse_args{"--out", "o", "--samples", "3", "--model", "flux"}.samples == 3,
        "tool: dofile() returns the module (make, parse_args)")
    T.raises(function() tool.parse_args{"--out", "o", "--model", "flux"} end, "--samples is required", "tool: --samples is required")
    T.raises(function() synthetic.make{out = dir("odd"), samples = 2, model = "flux", resolutions = "15x16"} end,
        "must be even", "synthetic: odd latent sizes are refused")
end

-- ==== the synthetic data is learnable ====

local golden_flux, golden_why = require("golden").case("flow_flux_tiny")
if not fs.isfile("lua/nemo/models/flux.lua") then
    T.skip("synthetic cache is learnable by a tiny FLUX", "lua/nemo/models/flux.lua is absent")
elseif not golden_flux then
    T.ok(false, "synthetic cache is learnable by a tiny FLUX: " .. golden_why)
else
    local ok, err = pcall(function()
        local flux = require "nemo.models.flux"
        local FM = require "nemo.flow_matching"
        local p = synthetic.make{out = dir("learnable"), samples = 64, model = "flux", resolutions = "8x8", seed = 0}
        local dl = data.DataLoader(data.Dataset(p), {batch_size = 8, seed = 0})
        local model = flux.FluxTransformer2DModel.from_pretrained(golden_flux, {torch_dtype = "float32"})
        local fm = FM.FlowMatching{adapter_type = "flux", guidance_scale = 1, flow_shift = 1.0, mix_uniform_ratio = 0,
                                   use_loss_weighting = false, cfg_dropout_prob = 0}
        local eval_batches = {}
        for b in dl:iter() do eval_batches[#eval_batches + 1] = b end
        local function eval_loss()
            return nemo.no_grad(function()
                local acc = 0
                for i, b in ipairs(eval_batches) do acc = acc + fm:step(model, b, {generator = nemo.Generator(100 + i)}):item() end
                return acc / #eval_batches
            end)
        end
        local before = eval_loss()
        local opt = nemo.optim.AdamW(model:parameters(), {lr = 1e-3, weight_decay = 0.01})
        local g = nemo.Generator(1)
        for epoch = 1, 6 do
            dl:set_epoch(epoch)
            for b in dl:iter() do
                local loss = fm:step(model, b, {generator = g})
                loss:backward()
                opt:step()
                opt:zero_grad()
            end
            collectgarbage()
        end
        local after = eval_loss()
        T.ok(after < 0.85 * before, string.format("synthetic cache: a tiny FLUX's loss falls clearly in 48 AdamW steps " ..
            "(%.3f -> %.3f, < 85%%)", before, after))
    end)
    if not ok then T.ok(false, "synthetic learnability run", err) end
end

-- ==== holdout: a validation split of one cache ====
do
    local ds = data.Dataset(flux_dir)
    local held, rest = ds:holdout(5, 11)
    local seen, ids_ok = {}, true
    for i = 1, held:len() do seen[held:get(i).id] = "held" end
    for i = 1, rest:len() do
        local id = rest:get(i).id
        if seen[id] then ids_ok = false end
        seen[id] = "rest"
    end
    local n = 0
    for _ in pairs(seen) do n = n + 1 end
    T.ok(held:len() == 5 and rest:len() == 21 and ids_ok and n == 26, "holdout(5): 5 held and 21 other samples, " ..
        "disjoint, together the whole cache")
    local h2 = ds:holdout(5, 11)
    local h3 = ds:holdout(5, 12)
    T.ok(table.concat(h2.parent_indices, ",") == table.concat(held.parent_indices, ",") and
         table.concat(h3.parent_indices, ",") ~= table.concat(held.parent_indices, ","),
        "holdout: the same seed picks the same samples; another seed others", table.concat(held.parent_indices, ","))
    local bn = 0
    for _, b in ipairs(rest.buckets) do bn = bn + #b.indices end
    T.ok(bn == 21 and #rest.buckets == 2 and rest:get(rest.buckets[2].indices[1]).latents.shape[3] == 24,
        "the rest's buckets index the rest (16x16 and 16x24)")
    local dl = data.DataLoader(rest, {batch_size = 2, seed = 0, drop_last = false})
    local got = 0
    for b in dl:iter() do
        for _, id in ipairs(b.ids) do
            if seen[id] ~= "rest" then got = math.huge end
            got = got + 1
        end
    end
    T.ok(got >= 21 and got < math.huge, "a DataLoader over the rest never yields a held-out sample", tostring(got))
    T.raises(function() ds:holdout(26, 0) end, "holdout must be an integer in %[1, 25%]", "holding out every sample " ..
        "is an error")
end

-- ==== dynamic_batch_size: a bucket's batch size scales with its pixel area ====
do
    local ds = data.Dataset(flux_dir)   -- 16x16 and 16x24 latents: 128x128 and 128x192 pixels
    local s1 = data.BucketSampler(ds, {batch_size = 4, dynamic_batch_size = true, base_resolution = {128, 128},
        drop_last = false, seed = 3})
    local sizes = {}
    for _, gb in ipairs(s1:global_batches(0)) do
        sizes[gb.bucket] = math.max(sizes[gb.bucket] or 0, #gb.indices)
    end
    T.ok(sizes["16x16"] == 4 and sizes["16x24"] == 2, "dynamic_batch_size: 4 at the base 128x128, floor(4 / 1.5) = 2 " ..
        "at 128x192", string.format("%s %s", tostring(sizes["16x16"]), tostring(sizes["16x24"])))
    -- 2 ranks: each takes half of every global batch, together one process's batches with a batch size x 2
    local one = data.BucketSampler(ds, {batch_size = 4, dynamic_batch_size = true, base_resolution = {128, 128}, seed = 3})
    local r0 = data.BucketSampler(ds, {batch_size = 2, dynamic_batch_size = true, base_resolution = {128, 128}, seed = 3,
        dp_rank = 0, dp_size = 2})
    local r1 = data.BucketSampler(ds, {batch_size = 2, dynamic_batch_size = true, base_resolution = {128, 128}, seed = 3,
        dp_rank = 1, dp_size = 2})
    local a, b, c = one:iter(), r0:iter(), r1:iter()
    local same, nb = one:len() == r0:len(), 0
    while true do
        local x, y, z = a(), b(), c()
        if not x then same = same and y == nil and z == nil; break end
        nb = nb + 1
        local joined = {}
        for _, v in ipairs(y) do joined[#joined + 1] = v end
        for _, v in ipairs(z) do joined[#joined + 1] = v end
        same = same and table.concat(joined, ",") == table.concat(x, ",")
    end
    T.ok(same and nb > 0, "dynamic_batch_size on 2 ranks (batch 2 each): the slices of one process's batches (batch 4)")
    local st = one:state_dict()
    local plain = data.BucketSampler(ds, {batch_size = 4, seed = 3})
    T.raises(function() plain:load_state_dict(st) end, "saved with dynamic_batch_size true, this run has false",
        "a sampler state of a dynamic_batch_size run does not load into a fixed one")
end

fs.remove_tree(base)
T.done()
