-- lua/nemo/data.lua: the cached-latent training data (the format is documented in docs/data.md):
--   Dataset(path, {model_type=})      opens and validates a cache folder (index.json + shards)
--   BucketSampler(ds, opts)           single-resolution batches, deterministic per (seed, epoch),
--                                     data-parallel slices of one global batch sequence, resumable
--   collate(samples, opts)            -> {image_latents | video_latents, text_embeddings,
--                                         pooled_prompt_embeds, data_type, ids, captions, bucket}
--   DataLoader(ds, opts)              sampler + collate as an iterator (for batch in dl:iter() do)
--   MockDataLoader(opts)              random batches of a given shape (benchmarks, smoke tests)
--   CacheWriter(out, opts)            writes a cache atomically (temporary folder, then rename)
--
-- The non-obvious rule: the sampler first forms GLOBAL batches of batch_size * dp_size samples
-- (one bucket each) in an order that depends only on (seed, epoch), and rank r takes the r-th
-- slice of each. So N ranks see exactly the samples one process with an N times larger batch
-- sees, and a resumed run may even change dp_size as long as the global batch stays the same.
-- Sample indices are 1-based (Lua); tensors loaded from shards are zero-copy views of the
-- memory-mapped files until collate copies them.
require "nemo"
local class = require "nemo.class"
local Tensor = require "nemo.tensor"
local F = require "nemo.functional"
local json = require "nemo.json"
local fs = require "nemo.fs"
local st = require "nemo.safetensors"

local shape_str = Tensor.shape_str

local M = {}

M.FORMAT = "nemo-lua.latent_cache"
M.VERSION = 1
M.DATA_TYPE_OF_MODEL = {flux = "image", wan = "video"}
local LATENT_DTYPES = {float16 = true, bfloat16 = true, float32 = true}
local ST_DTYPE_NAMES = {F16 = "float16", BF16 = "bfloat16", F32 = "float32", F64 = "float64"}

local function sorted_keys(t)
    local out = {}
    for k in pairs(t) do out[#out + 1] = tostring(k) end
    table.sort(out)
    return out
end

local function check_opts(opts, known, what)
    opts = opts or {}
    if type(opts) ~= "table" then error(what .. ": options must be a table, got " .. type(opts), 3) end
    for k in pairs(opts) do
        if not known[k] then
            error(string.format("%s: unknown option '%s' (options: %s)", what, tostring(k),
                table.concat(sorted_keys(known), ", ")), 3)
        end
    end
    return opts
end

local function is_posint(v) return type(v) == "number" and v >= 1 and v % 1 == 0 end
local function is_nonneg_int(v) return type(v) == "number" and v >= 0 and v % 1 == 0 end

local function same_shape(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do if a[i] ~= b[i] then return false end end
    return true
end

-- "16x24" / "3x16x24" for a bucket (the latent's spatial dims without channels).
local function bucket_key(dims) return table.concat(dims, "x") end
M.bucket_key = bucket_key

-- ==== Dataset ====

local Dataset = class("nemo.data.Dataset")
M.Dataset = Dataset

local function derr(path, msg) error(string.format("data: %s: %s", path, msg), 0) end

-- The buckets of a sample list: {key, dims, indices (1-based, in list order), pixels}, smallest
-- first (pixels, then key).
local function group_buckets(samples)
    local groups, buckets = {}, {}
    for i, s in ipairs(samples) do
        local g = groups[s.bucket]
        if not g then
            g = {key = s.bucket, dims = s.dims, indices = {}}
            groups[s.bucket] = g
            local px = 1
            for _, v in ipairs(s.dims) do px = px * v end
            g.pixels = px
            buckets[#buckets + 1] = g
        end
        g.indices[#g.indices + 1] = i
    end
    table.sort(buckets, function(a, b) if a.pixels ~= b.pixels then return a.pixels < b.pixels end return a.key < b.key end)
    return buckets
end

-- Dataset(path[, {model_type = "flux"|"wan"|..., validate = true}])
-- Reads <path>/index.json, opens every shard and checks every sample's tensors against the
-- index (presence, shape, dtype, text width) so a broken cache fails here, naming the file and
-- the sample, before training starts. validate = false skips the per-tensor checks.
function Dataset:__init(path, opts)
    opts = check_opts(opts, {model_type = true, validate = true}, "Dataset")
    if type(path) ~= "string" then error("Dataset: path must be a string, got " .. type(path), 3) end
    local ok, err = pcall(self._open, self, path, opts)
    if not ok then error(err, 3) end
end

function Dataset:_open(path, opts)
    path = path:gsub("/+$", "")
    if path == "" then path = "/" end
    self.path = path
    if not fs.exists(path) then derr(path, "the cache folder does not exist") end
    if not fs.isdir(path) then derr(path, "is not a folder (a latent cache is a folder holding index.json and shards)") end
    local index_path = path .. "/index.json"
    if not fs.isfile(index_path) then
        if fs.isfile(path .. "/metadata.json") then
            derr(path, "this is a NeMo Automodel cache (metadata.json), not a nemo-lua one: convert it once with " ..
                "`nemo-lua tools/import_automodel_cache.lua --src " .. path .. " --out " .. path ..
                "-nemo` and train on the converted folder (docs/data.md)")
        end
        derr(path, "no index.json: this is not a nemo-lua latent cache (see docs/data.md; " ..
            "tools/make_synthetic_cache.lua writes one)")
    end
    local okj, idx = pcall(json.read_file, index_path)
    if not okj then derr(index_path, tostring(idx)) end
    if type(idx) ~= "table" then derr(index_path, "expected a JSON object") end
    if idx.format ~= M.FORMAT then
        derr(index_path, string.format("format is %s, expected \"%s\"", tostring(idx.format), M.FORMAT))
    end
    if idx.version ~= M.VERSION then
        derr(index_path, string.format("format version %s is not supported (this nemo-lua reads version %d)",
            tostring(idx.version), M.VERSION))
    end
    if type(idx.model_type) ~= "string" then derr(index_path, "model_type must be a string") end
    if opts.model_type ~= nil and opts.model_type ~= idx.model_type then
        derr(index_path, string.format("the cache holds %s data (model_type '%s'), the run trains model_type '%s'",
            tostring(idx.data_type), idx.model_type, tostring(opts.model_type)))
    end
    local data_type = idx.data_type or M.DATA_TYPE_OF_MODEL[idx.model_type]
    if data_type ~= "image" and data_type ~= "video" then
        derr(index_path, "data_type must be \"image\" or \"video\", got " .. tostring(idx.data_type))
    end
    local bucket_ndim = data_type == "image" and 2 or 3
    if type(idx.shards) ~= "table" then derr(index_path, "'shards' must be a list of file names") end
    if type(idx.samples) ~= "table" then derr(index_path, "'samples' must be a list") end
    if #idx.samples == 0 then derr(path, "the dataset is empty (index.json lists no samples)") end
    for _, k in ipairs { "latent_channels", "text_dim" } do
        if idx[k] ~= nil and not is_posint(idx[k]) then
            derr(index_path, string.format("%s must be a positive integer, got %s", k, tostring(idx[k])))
        end
    end
    if idx.pooled_dim ~= nil and not is_nonneg_int(idx.pooled_dim) then
        derr(index_path, "pooled_dim must be a non-negative integer, got " .. tostring(idx.pooled_dim))
    end

    -- shards: every listed file must exist; opened lazily below (memory-mapped)
    local shard_set, handles = {}, {}
    for i, name in ipairs(idx.shards) do
        if type(name) ~= "string" or name:find("/", 1, true) or name:find("..", 1, true) then
            derr(index_path, string.format("shards[%d] must be a file name inside the cache folder, got %s", i, tostring(name)))
        end
        local p = path .. "/" .. name
        if not fs.isfile(p) then derr(p, "shard listed in index.json is missing") end
        shard_set[name] = true
    end
    self._handles = handles
    local function handle(name)
        local h = handles[name]
        if not h then
            local okh, hh = pcall(st.safe_open, path .. "/" .. name)
            if not okh then derr(path .. "/" .. name, tostring(hh)) end
            h = hh
            handles[name] = h
        end
        return h
    end
    self._handle = handle

    self.model_type, self.data_type = idx.model_type, data_type
    self.latent_channels, self.text_dim, self.pooled_dim = idx.latent_channels, idx.text_dim, idx.pooled_dim
    self.index = idx
    local samples, ids, groups = {}, {}, {}
    for i, s in ipairs(idx.samples) do
        local where = string.format("samples[%d]", i)
        if type(s) ~= "table" then derr(index_path, where .. " must be an object") end
        if type(s.id) ~= "string" or s.id == "" or s.id:find(".", 1, true) then
            derr(index_path, where .. ": id must be a non-empty string without '.', got " .. tostring(s.id))
        end
        where = string.format("sample '%s'", s.id)
        if ids[s.id] then derr(index_path, where .. " is listed twice") end
        ids[s.id] = i
        if not shard_set[s.shard] then
            derr(index_path, string.format("%s: shard '%s' is not in the shards list", where, tostring(s.shard)))
        end
        if type(s.bucket) ~= "table" or #s.bucket ~= bucket_ndim then
            derr(index_path, string.format("%s: bucket must be %s of the latent (%s data), got %s", where,
                bucket_ndim == 2 and "[H, W]" or "[F, H, W]", data_type, type(s.bucket) == "table" and
                json.encode(s.bucket) or tostring(s.bucket)))
        end
        for _, v in ipairs(s.bucket) do
            if not is_posint(v) then derr(index_path, where .. ": bucket sizes must be positive integers") end
        end
        if not is_posint(s.text_len) then derr(index_path, where .. ": text_len must be a positive integer") end
        if s.caption ~= nil and type(s.caption) ~= "string" then derr(index_path, where .. ": caption must be a string") end
        samples[i] = {id = s.id, shard = s.shard, bucket = bucket_key(s.bucket), dims = s.bucket,
                      text_len = s.text_len, caption = s.caption or ""}
    end
    self.samples, self._ids = samples, ids
    self.buckets = group_buckets(samples)

    if opts.validate ~= false then self:_validate() end
end

-- Check each sample's tensors in its shard against the index.
function Dataset:_validate()
    local text_dim, pooled_dim, channels = self.text_dim, self.pooled_dim, self.latent_channels
    local first_text, first_pooled
    for _, s in ipairs(self.samples) do
        local file = self.path .. "/" .. s.shard
        local h = self._handle(s.shard)
        local where = string.format("sample '%s'", s.id)
        local lk, tk, pk = s.id .. ".latents", s.id .. ".text_embeddings", s.id .. ".pooled"
        if not h:has(lk) then derr(file, string.format("%s: tensor '%s' is missing", where, lk)) end
        if not h:has(tk) then derr(file, string.format("%s: tensor '%s' is missing", where, tk)) end
        local ldt = ST_DTYPE_NAMES[h:dtype_of(lk)]
        if not LATENT_DTYPES[ldt] then
            derr(file, string.format("%s: latents have dtype %s (expected F16, BF16 or F32)", where, h:dtype_of(lk)))
        end
        local lat = h:get_tensor(lk)
        local c = channels or lat.shape[1]
        channels = channels or c
        local want = {c}
        for _, v in ipairs(s.dims) do want[#want + 1] = v end
        if not same_shape(lat.shape, want) then
            derr(file, string.format("%s: latents have shape %s, the index says %s (%d channels, bucket %s)", where,
                shape_str(lat.shape), shape_str(want), c, s.bucket))
        end
        local tdt = ST_DTYPE_NAMES[h:dtype_of(tk)]
        if not LATENT_DTYPES[tdt] then
            derr(file, string.format("%s: text_embeddings have dtype %s (expected F16, BF16 or F32)", where, h:dtype_of(tk)))
        end
        local txt = h:get_tensor(tk)
        if txt.ndim ~= 2 then
            derr(file, string.format("%s: text_embeddings must be [L, D], got shape %s", where, shape_str(txt.shape)))
        end
        if txt.shape[1] ~= s.text_len then
            derr(file, string.format("%s: text_embeddings have %d tokens, the index says text_len %d", where,
                txt.shape[1], s.text_len))
        end
        if text_dim and txt.shape[2] ~= text_dim then
            derr(file, string.format("%s: text embedding width %d differs from the index's text_dim %d", where,
                txt.shape[2], text_dim))
        end
        if first_text and txt.shape[2] ~= first_text.d then
            derr(file, string.format("inconsistent text embedding widths: %s has D = %d, sample '%s' has D = %d",
                where, txt.shape[2], first_text.id, first_text.d))
        end
        first_text = first_text or {id = s.id, d = txt.shape[2]}
        if h:has(pk) then
            local p = h:get_tensor(pk)
            if p.ndim ~= 1 then
                derr(file, string.format("%s: pooled must be [P], got shape %s", where, shape_str(p.shape)))
            end
            if pooled_dim and p.shape[1] ~= pooled_dim then
                derr(file, string.format("%s: pooled width %d differs from the index's pooled_dim %d", where,
                    p.shape[1], pooled_dim))
            end
            if first_pooled and p.shape[1] ~= first_pooled.d then
                derr(file, string.format("inconsistent pooled embedding widths: %s has P = %d, sample '%s' has P = %d",
                    where, p.shape[1], first_pooled.id, first_pooled.d))
            end
            first_pooled = first_pooled or {id = s.id, d = p.shape[1]}
        end
    end
    self.latent_channels = channels
    self.text_dim = self.text_dim or first_text.d
    if self.pooled_dim == nil and first_pooled then self.pooled_dim = first_pooled.d end
end

function Dataset:len() return #self.samples end

-- get(i) -> {id, caption, bucket, latents [C,H,W] | [C,F,H,W], text_embeddings [L,D], pooled [P] | nil}
function Dataset:get(i)
    local s = self.samples[i]
    if not s then error(string.format("Dataset:get: index %s out of range [1, %d]", tostring(i), #self.samples), 2) end
    local h = self._handle(s.shard)
    local pk = s.id .. ".pooled"
    return {
        id = s.id, caption = s.caption, bucket = s.bucket,
        latents = h:get_tensor(s.id .. ".latents"),
        text_embeddings = h:get_tensor(s.id .. ".text_embeddings"),
        pooled = h:has(pk) and h:get_tensor(pk) or nil,
    }
end

-- subset(indices) -> a Dataset of these samples (1-based indices of this one, in this order),
-- sharing this one's open shards; its parent_indices are the indices given.
function Dataset:subset(indices)
    local sub = setmetatable({}, getmetatable(self))
    for k, v in pairs(self) do sub[k] = v end
    local samples, ids = {}, {}
    for j, i in ipairs(indices) do
        local s = self.samples[i]
        if not s then error(string.format("Dataset:subset: index %s out of range [1, %d]", tostring(i), #self.samples), 2) end
        samples[j] = s
        ids[s.id] = j
    end
    sub.samples, sub._ids, sub.buckets, sub.parent_indices = samples, ids, group_buckets(samples), indices
    return sub
end

-- holdout(n, seed) -> held, rest: n samples picked by a shuffle of Generator(seed) (a function of
-- the cache and the seed only) and the others, as two subsets in index order.
function Dataset:holdout(n, seed)
    local total = #self.samples
    if type(n) ~= "number" or n < 1 or n % 1 ~= 0 or n >= total then
        error(string.format("holdout must be an integer in [1, %d] (the cache %s holds %d samples and training " ..
            "needs some), got %s", total - 1, self.path, total, tostring(n)), 2)
    end
    local order = {}
    for i = 1, total do order[i] = i end
    M._shuffle(order, Tensor.Generator(seed))   -- (defined below)
    local held, is_held, rest = {}, {}, {}
    for i = 1, n do is_held[order[i]] = true end
    for i = 1, total do
        if is_held[i] then held[#held + 1] = i else rest[#rest + 1] = i end
    end
    return self:subset(held), self:subset(rest)
end

-- The 1-based index of a sample id, or nil.
function Dataset:index_of(id) return self._ids[id] end

-- Close the shard files now (tensors already taken stay valid).
function Dataset:close()
    for name, h in pairs(self._handles) do h:close(); self._handles[name] = nil end
end

function Dataset:__tostring()
    local parts = {}
    for i, b in ipairs(self.buckets) do parts[i] = string.format("%s: %d", b.key, #b.indices) end
    return string.format("Dataset('%s', %s, %d samples, buckets {%s})", self.path, self.model_type, #self.samples,
        table.concat(parts, ", "))
end

-- ==== shuffling ====

-- A generator for (seed, epoch): one Philox stream per seed, epochs 2^40 draws apart.
local function epoch_generator(seed, epoch)
    local g = Tensor.Generator(seed)
    g:set_state{seed = g:get_state().seed, offset = epoch * 2 ^ 40}
    return g
end
M._epoch_generator = epoch_generator

-- Fisher-Yates shuffle of the Lua array t in place, with n uniform draws from g.
local function shuffle_inplace(t, g)
    local n = #t
    if n < 2 then return t end
    local u = Tensor.empty({n}, {dtype = "float64"})
    u:uniform_(0, 1, {generator = g})
    local r = u:tolist()
    for i = n, 2, -1 do
        local j = math.floor(r[i] * i) + 1
        if j > i then j = i end
        t[i], t[j] = t[j], t[i]
    end
    return t
end
M._shuffle = shuffle_inplace

-- ==== BucketSampler ====

local BucketSampler = class("nemo.data.BucketSampler")
M.BucketSampler = BucketSampler

-- BucketSampler(dataset, {batch_size =, seed = 0, shuffle = true, drop_last = true,
--                         dp_rank = 0, dp_size = 1, dynamic_batch_size = false,
--                         base_resolution = {512, 512}})
-- dynamic_batch_size (Automodel's): a bucket's batch size is max(1, floor(batch_size /
-- (w h / (base_w base_h)))) for its pixel size w x h = the latent's x the VAE's factor (index.json's
-- vae_scale_factor, else 8), so small images come in larger batches.
-- Per epoch: each bucket's samples are shuffled (seed, epoch), cut into global batches of
-- batch_size * dp_size, and the global batches of all buckets are shuffled together. The last
-- partial global batch of a bucket is dropped (drop_last) or padded cyclically from that
-- bucket to a multiple of dp_size (every rank then gets the same, smaller, batch size).
function BucketSampler:__init(ds, opts)
    opts = check_opts(opts, {batch_size = true, seed = true, shuffle = true, drop_last = true, dp_rank = true,
                             dp_size = true, dynamic_batch_size = true, base_resolution = true}, "BucketSampler")
    if type(ds) ~= "table" or type(ds.buckets) ~= "table" then
        error("BucketSampler: expected a Dataset (with buckets), got " .. type(ds), 3)
    end
    local bs = opts.batch_size
    if not is_posint(bs) then error("BucketSampler: batch_size must be a positive integer, got " .. tostring(bs), 3) end
    local dp_size, dp_rank = opts.dp_size or 1, opts.dp_rank or 0
    if not is_posint(dp_size) then error("BucketSampler: dp_size must be a positive integer, got " .. tostring(dp_size), 3) end
    if not is_nonneg_int(dp_rank) or dp_rank >= dp_size then
        error(string.format("BucketSampler: dp_rank must be in [0, %d), got %s", dp_size, tostring(dp_rank)), 3)
    end
    local seed = opts.seed or 0
    if type(seed) ~= "number" or seed % 1 ~= 0 then error("BucketSampler: seed must be an integer, got " .. tostring(seed), 3) end
    self.dataset, self.batch_size, self.dp_size, self.dp_rank, self.seed = ds, bs, dp_size, dp_rank, seed
    self.global_batch_size = bs * dp_size
    self.shuffle = opts.shuffle ~= false
    self.drop_last = opts.drop_last ~= false
    self.epoch = 0
    self._pos, self._skip = 0, 0
    -- each bucket's batch size per rank (bs, or dynamic_batch_size's)
    self.dynamic_batch_size = opts.dynamic_batch_size == true
    local br = opts.base_resolution or {512, 512}
    if self.dynamic_batch_size and (type(br) ~= "table" or not is_posint(br[1]) or not is_posint(br[2])) then
        error("BucketSampler: base_resolution must be [width, height] in pixels, got " .. tostring(br), 3)
    end
    self.base_resolution = br
    local f = ds.index and ds.index.vae_scale_factor or 8
    self._bucket_bs = {}
    for _, b in ipairs(ds.buckets) do
        local d = b.dims
        local px = (d[#d - 1] * f) * (d[#d] * f)
        self._bucket_bs[b.key] = self.dynamic_batch_size and math.max(1, math.floor(bs / (px / (br[1] * br[2])))) or bs
    end
    local n = 0
    for _, b in ipairs(ds.buckets) do
        local k, G = #b.indices, self._bucket_bs[b.key] * dp_size
        n = n + (self.drop_last and math.floor(k / G) or math.ceil(k / G))
    end
    self._len = n
    if n == 0 then
        local sizes = {}
        for i, b in ipairs(ds.buckets) do sizes[i] = string.format("%s: %d", b.key, #b.indices) end
        error(string.format("BucketSampler: no batch can be formed: every bucket holds fewer samples than the global " ..
            "batch %d (= batch_size %d x dp_size %d) and drop_last is on (buckets: %s)", self.global_batch_size, bs,
            dp_size, table.concat(sizes, ", ")), 3)
    end
end

-- Batches per epoch (the same on every rank).
function BucketSampler:len() return self._len end

function BucketSampler:set_epoch(epoch)
    if not is_nonneg_int(epoch) then error("set_epoch: epoch must be a non-negative integer, got " .. tostring(epoch), 2) end
    self.epoch = epoch
end

-- The epoch's global batches: a list of {bucket = key, indices = {...}} (1-based sample indices).
function BucketSampler:global_batches(epoch)
    epoch = epoch or self.epoch
    if self._plan and self._plan_epoch == epoch then return self._plan end
    local g = epoch_generator(self.seed, epoch)
    local dp = self.dp_size
    local out = {}
    for _, b in ipairs(self.dataset.buckets) do
        local G = self._bucket_bs[b.key] * dp
        local idx = {}
        for i, v in ipairs(b.indices) do idx[i] = v end
        if self.shuffle then shuffle_inplace(idx, g) end
        for start = 1, #idx, G do
            local chunk = {}
            for i = start, math.min(start + G - 1, #idx) do chunk[#chunk + 1] = idx[i] end
            if #chunk == G or not self.drop_last then
                local want = math.ceil(#chunk / dp) * dp
                local k = 0
                while #chunk < want do k = k + 1; chunk[#chunk + 1] = idx[(k - 1) % #idx + 1] end
                out[#out + 1] = {bucket = b.key, indices = chunk}
            end
        end
    end
    if self.shuffle then shuffle_inplace(out, g) end
    self._plan, self._plan_epoch = out, epoch
    return out
end

-- This rank's slice of global batch gb.
function BucketSampler:local_slice(gb)
    local per = #gb.indices / self.dp_size
    local out = {}
    for i = 1, per do out[i] = gb.indices[self.dp_rank * per + i] end
    return out
end

-- iter() -> an iterator of (local indices, bucket key), starting where a loaded state left off.
function BucketSampler:iter()
    local plan = self:global_batches(self.epoch)
    local pos = self._skip
    self._skip = 0
    self._pos = pos
    return function()
        if pos >= #plan then return nil end
        pos = pos + 1
        self._pos = pos
        local gb = plan[pos]
        return self:local_slice(gb), gb.bucket
    end
end

-- {epoch, batch_index = batches already yielded in this epoch, seed, global_batch_size,
-- num_samples, shuffle, drop_last, dynamic_batch_size}: the last six must match on load (else the
-- sequence differs).
function BucketSampler:state_dict()
    return {epoch = self.epoch, batch_index = self._pos, seed = self.seed, global_batch_size = self.global_batch_size,
            num_samples = self.dataset:len(), shuffle = self.shuffle, drop_last = self.drop_last,
            dynamic_batch_size = self.dynamic_batch_size or nil}
end

function BucketSampler:load_state_dict(s)
    if type(s) ~= "table" then error("load_state_dict: expected a table, got " .. type(s), 2) end
    if (s.dynamic_batch_size == true) ~= self.dynamic_batch_size then
        error(string.format("load_state_dict: the sampler state was saved with dynamic_batch_size %s, this run " ..
            "has %s: the batch sequence would differ", tostring(s.dynamic_batch_size == true),
            tostring(self.dynamic_batch_size)), 2)
    end
    for _, k in ipairs { "seed", "global_batch_size", "num_samples", "shuffle", "drop_last" } do
        local mine = k == "num_samples" and self.dataset:len() or self[k]
        if s[k] ~= nil and s[k] ~= mine then
            error(string.format("load_state_dict: the sampler state was saved with %s = %s, this run has %s: " ..
                "the batch sequence would differ", k, tostring(s[k]), tostring(mine)), 2)
        end
    end
    if not is_nonneg_int(s.epoch) then error("load_state_dict: epoch must be a non-negative integer, got " .. tostring(s.epoch), 2) end
    local bi = s.batch_index or 0
    if not is_nonneg_int(bi) or bi > self._len then
        error(string.format("load_state_dict: batch_index must be in [0, %d], got %s", self._len, tostring(bi)), 2)
    end
    self.epoch, self._skip, self._pos = s.epoch, bi, bi
end

-- ==== collate ====

local function common_dtype(ts)
    local dt = ts[1].dtype
    for i = 2, #ts do if ts[i].dtype ~= dt then return "float32" end end
    return dt
end

-- collate(samples[, {data_type=, text_pad_multiple=, pooled_dim=}]) -> batch
--   samples: Dataset:get() results of ONE bucket. Latents are stacked (their dtype kept, float32
--   if they differ); text_embeddings [B, L, D] are zero-padded on L to the longest, rounded up
--   to a multiple of text_pad_multiple (8 for image data, Automodel's rule; 1 for video);
--   differing widths D are an error. pooled_prompt_embeds [B, P]: zeros for samples without
--   one; present when any sample has one or pooled_dim > 0.
function M.collate(samples, opts)
    opts = check_opts(opts, {data_type = true, text_pad_multiple = true, pooled_dim = true}, "collate")
    if type(samples) ~= "table" or #samples == 0 then error("collate: expected a non-empty list of samples", 2) end
    local first = samples[1]
    local data_type = opts.data_type or (first.latents.ndim == 3 and "image" or "video")
    local lats, texts = {}, {}
    for i, s in ipairs(samples) do
        if not same_shape(s.latents.shape, first.latents.shape) then
            error(string.format("collate: mixed resolutions in one batch: sample '%s' has latents %s, sample '%s' %s",
                tostring(first.id), shape_str(first.latents.shape), tostring(s.id), shape_str(s.latents.shape)), 2)
        end
        lats[i] = s.latents
        local t = s.text_embeddings
        if t.ndim ~= 2 then
            error(string.format("collate: text_embeddings of sample '%s' must be [L, D], got %s", tostring(s.id),
                shape_str(t.shape)), 2)
        end
        if t.shape[2] ~= first.text_embeddings.shape[2] then
            error(string.format("collate: text embeddings of different widths cannot be batched: sample '%s' is %s, " ..
                "sample '%s' is %s", tostring(first.id), shape_str(first.text_embeddings.shape), tostring(s.id),
                shape_str(t.shape)), 2)
        end
        texts[i] = t
    end
    local ldt = common_dtype(lats)
    for i, t in ipairs(lats) do lats[i] = t:to{dtype = ldt} end
    local batch = {data_type = data_type}
    batch[data_type == "image" and "image_latents" or "video_latents"] = F.stack(lats, 0)

    local mult = opts.text_pad_multiple or (data_type == "image" and 8 or 1)
    local lmax, same = 0, true
    for _, t in ipairs(texts) do
        if t.shape[1] > lmax then lmax = t.shape[1] end
        if t.shape[1] ~= texts[1].shape[1] then same = false end
    end
    local tdt = common_dtype(texts)
    if same and lmax % mult == 0 then
        for i, t in ipairs(texts) do texts[i] = t:to{dtype = tdt} end
        batch.text_embeddings = F.stack(texts, 0)
    else
        local L = math.ceil(lmax / mult) * mult
        local out = Tensor.zeros({#texts, L, texts[1].shape[2]}, {dtype = tdt})
        for i, t in ipairs(texts) do out:narrow(0, i - 1, 1):narrow(1, 0, t.shape[1]):copy_(t:unsqueeze(0)) end
        batch.text_embeddings = out
    end

    local P = opts.pooled_dim
    local pdt
    for _, s in ipairs(samples) do
        if s.pooled then
            if P and P > 0 and s.pooled.shape[1] ~= P then
                error(string.format("collate: pooled embedding of sample '%s' has width %d, expected %d", tostring(s.id),
                    s.pooled.shape[1], P), 2)
            end
            P = s.pooled.shape[1]
            pdt = pdt or s.pooled.dtype
        end
    end
    if P and P > 0 then
        local out = Tensor.zeros({#samples, P}, {dtype = pdt or tdt})
        for i, s in ipairs(samples) do
            if s.pooled then out:narrow(0, i - 1, 1):copy_(s.pooled:unsqueeze(0)) end
        end
        batch.pooled_prompt_embeds = out
    end
    local ids, captions = {}, {}
    for i, s in ipairs(samples) do ids[i], captions[i] = s.id, s.caption end
    batch.ids, batch.captions, batch.bucket = ids, captions, first.bucket
    return batch
end

-- ==== DataLoader ====

local DataLoader = class("nemo.data.DataLoader")
M.DataLoader = DataLoader

-- DataLoader(dataset, {batch_size=, seed=, shuffle=, drop_last=, dp_rank=, dp_size=, sampler=,
--                      device=, text_pad_multiple=, pin_memory=false})
-- for batch in dl:iter() do ... end yields collated batches (on `device` when given). pin_memory
-- with a CUDA device: each batch tensor is staged in page-locked memory and uploaded with a
-- non_blocking copy on the device's current stream, so the host goes on without waiting for the
-- device to finish the previous step's work.
function DataLoader:__init(ds, opts)
    opts = check_opts(opts, {batch_size = true, seed = true, shuffle = true, drop_last = true, dp_rank = true,
                             dp_size = true, sampler = true, device = true, text_pad_multiple = true,
                             pin_memory = true, dynamic_batch_size = true, base_resolution = true}, "DataLoader")
    self.dataset = ds
    self.sampler = opts.sampler or BucketSampler(ds, {batch_size = opts.batch_size, seed = opts.seed,
        shuffle = opts.shuffle, drop_last = opts.drop_last, dp_rank = opts.dp_rank, dp_size = opts.dp_size,
        dynamic_batch_size = opts.dynamic_batch_size, base_resolution = opts.base_resolution})
    self.device, self.text_pad_multiple = opts.device, opts.text_pad_multiple
    self.pin_memory = opts.pin_memory and self.device ~= nil and tostring(self.device):match("^cuda") ~= nil
end

-- t on device: through pinned memory and a non_blocking copy when pin is true.
local function upload(t, device, pin)
    if pin then return t:pin_memory():to{device = device, non_blocking = true} end
    return t:to{device = device}
end

function DataLoader:len() return self.sampler:len() end
function DataLoader:set_epoch(e) self.sampler:set_epoch(e) end
function DataLoader:state_dict() return self.sampler:state_dict() end
function DataLoader:load_state_dict(s) self.sampler:load_state_dict(s) end

local TENSOR_KEYS = {"image_latents", "video_latents", "text_embeddings", "pooled_prompt_embeds"}

-- load_batch(ds, indices, {device=, pin_memory=, text_pad_multiple=}) -> the collated batch of
-- ds's samples at these (1-based) indices, its tensors on device (through page-locked memory with
-- pin_memory). What DataLoader:iter yields; the validation loss reads its batches so too.
function M.load_batch(ds, idx, o)
    o = o or {}
    local samples = {}
    for i, k in ipairs(idx) do samples[i] = ds:get(k) end
    local batch = M.collate(samples, {data_type = ds.data_type, text_pad_multiple = o.text_pad_multiple,
                                      pooled_dim = ds.pooled_dim})
    if o.device and o.device ~= "cpu" then
        for _, k in ipairs(TENSOR_KEYS) do
            if batch[k] then batch[k] = upload(batch[k], o.device, o.pin_memory) end
        end
    end
    return batch
end

function DataLoader:iter()
    local it = self.sampler:iter()
    local o = {device = self.device, pin_memory = self.pin_memory, text_pad_multiple = self.text_pad_multiple}
    return function()
        local idx = it()
        if idx == nil then return nil end
        return M.load_batch(self.dataset, idx, o)
    end
end

-- build_dataloader{cache_dir=, model_type=, batch_size=, seed=, shuffle=, drop_last=, dp_rank=,
-- dp_size=, device=, text_pad_multiple=, pin_memory=} -> loader, dataset
function M.build_dataloader(cfg)
    cfg = check_opts(cfg, {cache_dir = true, model_type = true, batch_size = true, seed = true, shuffle = true,
                           drop_last = true, dp_rank = true, dp_size = true, device = true, text_pad_multiple = true,
                           pin_memory = true, dynamic_batch_size = true, base_resolution = true}, "build_dataloader")
    if type(cfg.cache_dir) ~= "string" then error("build_dataloader: cache_dir is required (a cache folder)", 2) end
    local ds = Dataset(cfg.cache_dir, {model_type = cfg.model_type})
    local loader = DataLoader(ds, {batch_size = cfg.batch_size, seed = cfg.seed, shuffle = cfg.shuffle,
        drop_last = cfg.drop_last, dp_rank = cfg.dp_rank, dp_size = cfg.dp_size, device = cfg.device,
        text_pad_multiple = cfg.text_pad_multiple, pin_memory = cfg.pin_memory,
        dynamic_batch_size = cfg.dynamic_batch_size, base_resolution = cfg.base_resolution})
    return loader, ds
end

-- ==== MockDataLoader ====

local MockDataLoader = class("nemo.data.MockDataLoader")
M.MockDataLoader = MockDataLoader

-- MockDataLoader{batch_size=, latent_shape = {C, H, W} | {C, F, H, W}, text_len=, text_dim=,
--                pooled_dim = 0, seed = 0, length = 1024 (samples per epoch), dtype = "float32",
--                device=, dp_rank = 0, dp_size = 1}
-- Random normal batches; batch k of epoch e is a function of (seed, e, k) only, so iteration is
-- resumable like the BucketSampler's. With dp_size > 1 each batch is the rank's slice of a global
-- batch of batch_size x dp_size samples, so N ranks see what one process with batch N x B sees.
function MockDataLoader:__init(opts)
    opts = check_opts(opts, {batch_size = true, latent_shape = true, text_len = true, text_dim = true, pooled_dim = true,
                             seed = true, length = true, dtype = true, device = true, dp_rank = true, dp_size = true},
                     "MockDataLoader")
    local dp_size, dp_rank = opts.dp_size or 1, opts.dp_rank or 0
    if not is_posint(dp_size) or not is_nonneg_int(dp_rank) or dp_rank >= dp_size then
        error(string.format("MockDataLoader: dp_rank must be in [0, dp_size), got %s of %s", tostring(dp_rank),
            tostring(dp_size)), 3)
    end
    self.dp_size, self.dp_rank = dp_size, dp_rank
    if not is_posint(opts.batch_size) then error("MockDataLoader: batch_size must be a positive integer", 3) end
    local ls = opts.latent_shape
    if type(ls) ~= "table" or (#ls ~= 3 and #ls ~= 4) then
        error("MockDataLoader: latent_shape must be {C, H, W} (image) or {C, F, H, W} (video)", 3)
    end
    for _, v in ipairs(ls) do if not is_posint(v) then error("MockDataLoader: latent_shape sizes must be positive integers", 3) end end
    if not is_posint(opts.text_len) or not is_posint(opts.text_dim) then
        error("MockDataLoader: text_len and text_dim must be positive integers", 3)
    end
    local pooled = opts.pooled_dim or 0
    if not is_nonneg_int(pooled) then error("MockDataLoader: pooled_dim must be a non-negative integer", 3) end
    local length = opts.length or 1024
    if not is_posint(length) then error("MockDataLoader: length must be a positive integer", 3) end
    self.batch_size, self.latent_shape, self.text_len, self.text_dim = opts.batch_size, ls, opts.text_len, opts.text_dim
    self.pooled_dim, self.seed, self.dtype, self.device = pooled, opts.seed or 0, opts.dtype or "float32", opts.device
    self.data_type = #ls == 3 and "image" or "video"
    local G = opts.batch_size * dp_size
    self._len = math.max(1, math.floor(length / G))
    local per = G * opts.text_len * opts.text_dim + G * pooled
    local n = G
    for _, v in ipairs(ls) do n = n * v end
    self._stride = per + n
    self.epoch, self._pos, self._skip = 0, 0, 0
end

function MockDataLoader:len() return self._len end
function MockDataLoader:set_epoch(e) self.epoch = e end
function MockDataLoader:state_dict() return {epoch = self.epoch, batch_index = self._pos} end
function MockDataLoader:load_state_dict(s) self.epoch, self._skip, self._pos = s.epoch, s.batch_index or 0, s.batch_index or 0 end

-- batch(k): the k-th batch (0-based) of the current epoch.
function MockDataLoader:batch(k)
    local g = Tensor.Generator(self.seed)
    g:set_state{seed = g:get_state().seed, offset = (self.epoch * self._len + k) * self._stride}
    local B, G = self.batch_size, self.batch_size * self.dp_size
    local o = {dtype = self.dtype, generator = g}
    local shape = {G}
    for _, v in ipairs(self.latent_shape) do shape[#shape + 1] = v end
    local batch = {data_type = self.data_type}
    local function mine(t)   -- this rank's rows of the global batch
        if self.dp_size == 1 then return t end
        return t:narrow(0, self.dp_rank * B, B):contiguous()
    end
    batch[self.data_type == "image" and "image_latents" or "video_latents"] = mine(Tensor.randn(shape, o))
    batch.text_embeddings = mine(Tensor.randn({G, self.text_len, self.text_dim}, o))
    if self.pooled_dim > 0 then batch.pooled_prompt_embeds = mine(Tensor.randn({G, self.pooled_dim}, o)) end
    if self.device and self.device ~= "cpu" then
        for _, key in ipairs(TENSOR_KEYS) do if batch[key] then batch[key] = batch[key]:to{device = self.device} end end
    end
    return batch
end

function MockDataLoader:iter()
    local pos = self._skip
    self._skip = 0
    self._pos = pos
    return function()
        if pos >= self._len then return nil end
        local b = self:batch(pos)
        pos = pos + 1
        self._pos = pos
        return b
    end
end

-- ==== CacheWriter ====

local CacheWriter = class("nemo.data.CacheWriter")
M.CacheWriter = CacheWriter

local function unique_suffix()
    return string.format("%x-%s", os.time(), (tostring({}):match("0x(%x+)") or tostring(math.random(1, 2 ^ 30))))
end

local function nonempty_dir(p) return fs.isdir(p) and #fs.list(p) > 0 end

-- CacheWriter(out, {model_type=, data_type=, shard_size = 256, force = false})
-- Samples go into <out>.tmp-<unique>/ as they come; finish() writes index.json and renames the
-- folder to out. An existing non-empty out is refused unless force (then replaced only once
-- the new cache is complete). abort() removes the temporary folder.
function CacheWriter:__init(out, opts)
    opts = check_opts(opts, {model_type = true, data_type = true, shard_size = true, force = true}, "CacheWriter")
    if type(out) ~= "string" or out == "" then error("CacheWriter: out must be a folder path", 3) end
    out = out:gsub("/+$", "")
    if type(opts.model_type) ~= "string" then error("CacheWriter: model_type is required (e.g. 'flux' or 'wan')", 3) end
    local data_type = opts.data_type or M.DATA_TYPE_OF_MODEL[opts.model_type]
    if data_type ~= "image" and data_type ~= "video" then
        error("CacheWriter: data_type must be 'image' or 'video' (model_type '" .. opts.model_type .. "' has no default)", 3)
    end
    if fs.exists(out) and not fs.isdir(out) then error("CacheWriter: '" .. out .. "' exists and is not a folder", 3) end
    if nonempty_dir(out) and not opts.force then
        error("CacheWriter: refusing to overwrite the non-empty folder '" .. out .. "' (use --force / force = true)", 3)
    end
    local shard_size = opts.shard_size or 256
    if not is_posint(shard_size) then error("CacheWriter: shard_size must be a positive integer", 3) end
    self.out, self.model_type, self.data_type, self.shard_size, self.force = out, opts.model_type, data_type,
        shard_size, opts.force
    self.tmp = out .. ".tmp-" .. unique_suffix()
    fs.mkdirs(self.tmp)
    self.shards, self.samples, self._cur, self._ncur, self._ids = {}, {}, {}, 0, {}
end

function CacheWriter:_flush()
    if self._ncur == 0 then return end
    local name = string.format("shard-%05d.safetensors", #self.shards)
    st.save_file(self._cur, self.tmp .. "/" .. name, {format = "pt"})
    self.shards[#self.shards + 1] = name
    self._cur, self._ncur = {}, 0
end

-- add{id=, caption=, latents = [C,H,W] | [C,F,H,W], text_embeddings = [L, D], pooled = [P] | nil}
function CacheWriter:add(s)
    if self.done then error("CacheWriter:add: the cache is already finished", 2) end
    local id = s.id or string.format("%08d", #self.samples)
    if type(id) ~= "string" or id == "" or id:find(".", 1, true) then error("CacheWriter:add: id must be a string without '.'", 2) end
    if self._ids[id] then error("CacheWriter:add: duplicate sample id '" .. id .. "'", 2) end
    local want = self.data_type == "image" and 3 or 4
    if not Tensor.is_tensor(s.latents) or s.latents.ndim ~= want then
        error(string.format("CacheWriter:add: sample '%s': latents must be a %d-D tensor for %s data", id, want,
            self.data_type), 2)
    end
    if not Tensor.is_tensor(s.text_embeddings) or s.text_embeddings.ndim ~= 2 then
        error(string.format("CacheWriter:add: sample '%s': text_embeddings must be a 2-D tensor [L, D]", id), 2)
    end
    if s.pooled ~= nil and (not Tensor.is_tensor(s.pooled) or s.pooled.ndim ~= 1) then
        error(string.format("CacheWriter:add: sample '%s': pooled must be a 1-D tensor [P]", id), 2)
    end
    local ls = s.latents.shape
    local c = ls[1]
    self.latent_channels = self.latent_channels or c
    self.text_dim = self.text_dim or s.text_embeddings.shape[2]
    if c ~= self.latent_channels or s.text_embeddings.shape[2] ~= self.text_dim then
        error(string.format("CacheWriter:add: sample '%s' has %d channels and text width %d, earlier samples %d and %d",
            id, c, s.text_embeddings.shape[2], self.latent_channels, self.text_dim), 2)
    end
    if s.pooled then
        self.pooled_dim = self.pooled_dim or s.pooled.shape[1]
        if s.pooled.shape[1] ~= self.pooled_dim then
            error(string.format("CacheWriter:add: sample '%s' has pooled width %d, earlier samples %d", id,
                s.pooled.shape[1], self.pooled_dim), 2)
        end
    end
    self._ids[id] = true
    self._cur[id .. ".latents"] = s.latents:contiguous()
    self._cur[id .. ".text_embeddings"] = s.text_embeddings:contiguous()
    if s.pooled then self._cur[id .. ".pooled"] = s.pooled:contiguous() end
    self._ncur = self._ncur + 1
    local bucket = {}
    for i = 2, #ls do bucket[#bucket + 1] = ls[i] end
    self.samples[#self.samples + 1] = {id = id, shard = string.format("shard-%05d.safetensors", #self.shards),
        bucket = bucket, text_len = s.text_embeddings.shape[1], caption = s.caption or ""}
    if self._ncur >= self.shard_size then self:_flush() end
end

-- index.json with sorted keys and one line per sample (readable, and small for big caches).
local function write_index(path, index)
    local parts = {"{\n"}
    local keys = sorted_keys(index)
    for i, k in ipairs(keys) do
        local v = index[k]
        local text
        if k == "samples" then
            local rows = {}
            for j, s in ipairs(v) do rows[j] = "  " .. json.encode(s) end
            text = "[\n" .. table.concat(rows, ",\n") .. "\n ]"
        else
            text = json.encode(v)
        end
        parts[#parts + 1] = string.format(" %s: %s%s\n", json.encode(k), text, i < #keys and "," or "")
    end
    parts[#parts + 1] = "}\n"
    local f, err = io.open(path, "wb")
    if not f then error("CacheWriter: cannot write '" .. path .. "': " .. tostring(err), 3) end
    f:write(table.concat(parts))
    f:close()
end

-- Write index.json and move the cache into place; returns the cache path.
function CacheWriter:finish(extra)
    if self.done then error("CacheWriter:finish: already finished", 2) end
    if #self.samples == 0 then error("CacheWriter:finish: no samples were added", 2) end
    self:_flush()
    local index = {
        format = M.FORMAT, version = M.VERSION, model_type = self.model_type, data_type = self.data_type,
        latent_channels = self.latent_channels, text_dim = self.text_dim, pooled_dim = self.pooled_dim or 0,
        num_samples = #self.samples, shards = self.shards, samples = self.samples,
    }
    for k, v in pairs(extra or {}) do if index[k] == nil then index[k] = v end end
    write_index(self.tmp .. "/index.json", index)
    local out, old = self.out, nil
    if fs.exists(out) then
        if nonempty_dir(out) then
            if not self.force then error("CacheWriter:finish: '" .. out .. "' became non-empty; not overwriting", 2) end
            old = out .. ".old-" .. unique_suffix()
            fs.rename(out, old)
        else
            fs.remove_tree(out)
        end
    end
    fs.rename(self.tmp, out)
    if old then fs.remove_tree(old) end
    pcall(fs.sync_dir, fs.dirname(out))
    self.done = true
    return out
end

function CacheWriter:abort()
    if not self.done and fs.exists(self.tmp) then fs.remove_tree(self.tmp) end
    self.done = true
end

return M
