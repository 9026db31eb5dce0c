-- lua/nemo/validation.lua: the validation loss of a training run (the recipe's `validation:`
-- block; Automodel has none). The flow-matching loss of a held-out latent cache at fixed sigmas
-- with fixed noise, so that two evaluations differ only by the weights:
--
--   local V = require "nemo.validation"
--   local v = V.Validator{dataset = ds, fm = fm, sigmas = {0.1, 0.3, 0.5, 0.7, 0.9}, seed = 0,
--                         batch_size = 2, dp_rank = r, dp_size = n, device = "cpu", compute_dtype = "float32"}
--   local res = v:run(model)     -- {loss =, by_sigma = {...}, samples =, seconds =}
--
-- What is fixed: each sample's noise comes from nemo.Generator(seed * 1000003 + its index), so it
-- does not depend on the batch size, the number of ranks or the step; every sample is evaluated at
-- every sigma (no shift, no clamp: the sigma is the one given), with its text (no cfg dropout),
-- under no_grad. loss = the mean over sigmas of the mean over samples of what the training loss
-- computes for that sample (its loss weighting included); by_sigma[k] the mean at sigmas[k].
--
-- With data parallelism the samples are split as training batches are: global batches of
-- batch_size x dp_size samples of one bucket, rank r taking the r-th slice. The last batch of a
-- bucket is padded to a multiple of dp_size with repeats that count for nothing, so every rank
-- runs the same number of forward passes (FSDP2, cp and tp need all of them) and each sample
-- counts once. The sums are all-reduced over the world: the ranks of a cp / tp group compute the
-- same values, and they cancel in the ratio.
require "nemo"
local class = require "nemo.class"
local Tensor = require "nemo.tensor"
local F = require "nemo.functional"
local autograd = require "nemo.autograd"
local data = require "nemo.data"

local M = {}

-- the `validation:` block's keys and their types (the recipe checks them; docs/training.md)
M.KEYS = {enabled = "boolean", cache_dir = "string", every_steps = "number", sigmas = "table",
          num_sigmas = "number", max_samples = "number", batch_size = "number", seed = "number",
          at_start = "boolean", ema = "boolean", holdout = "number"}   -- and sampling = M.SAMPLING_KEYS (below)

local function is_posint(v) return type(v) == "number" and v >= 1 and v % 1 == 0 end

-- sigmas(vcfg, fm) -> the list of sigmas: vcfg.sigmas as given (each within the objective's
-- [sigma_min, sigma_max]), else the midpoints of num_sigmas [5] equal parts of that range.
function M.sigmas(vcfg, fm)
    local lo, hi = fm.sigma_min, fm.sigma_max
    if vcfg.sigmas ~= nil then
        local s = vcfg.sigmas
        if type(s) ~= "table" or #s == 0 then
            error("validation.sigmas must be a non-empty list of numbers in (0, 1], got " .. tostring(s), 0)
        end
        if vcfg.num_sigmas ~= nil then error("validation: give sigmas or num_sigmas, not both", 0) end
        local out = {}
        for i, v in ipairs(s) do
            if type(v) ~= "number" or not (v > 0 and v <= 1) then
                error(string.format("validation.sigmas[%d] must be a number in (0, 1], got %s", i, tostring(v)), 0)
            end
            if v < lo or v > hi then
                error(string.format("validation.sigmas[%d] = %g is outside the sigmas this run trains, [%g, %g] " ..
                    "(flow_matching.sigma_min / sigma_max, or the Wan 2.2 stage's window)", i, v, lo, hi), 0)
            end
            out[i] = v
        end
        return out
    end
    local k = vcfg.num_sigmas or 5
    if not is_posint(k) then error("validation.num_sigmas must be a positive integer, got " .. tostring(k), 0) end
    local out = {}
    for i = 1, k do out[i] = lo + (i - 0.5) / k * (hi - lo) end
    return out
end

local Validator = class("nemo.validation.Validator")
M.Validator = Validator

-- Validator{dataset (nemo.data.Dataset), fm (FlowMatching), sigmas, seed [0], batch_size [1],
--           max_samples [all], dp_rank [0], dp_size [1], device ["cpu"], compute_dtype
--           ["float32"]}
function Validator:__init(o)
    local ds = o.dataset
    if not ds or type(ds.len) ~= "function" then error("Validator: dataset must be a nemo.data.Dataset", 2) end
    self.ds, self.fm, self.sigmas = ds, o.fm, o.sigmas
    self.seed = o.seed or 0
    self.batch_size = o.batch_size or 1
    self.dp_rank, self.dp_size = o.dp_rank or 0, o.dp_size or 1
    self.device, self.compute_dtype = o.device or "cpu", o.compute_dtype or "float32"
    if not is_posint(self.batch_size) then error("validation.batch_size must be a positive integer, got " ..
        tostring(self.batch_size), 0) end
    if type(self.seed) ~= "number" or self.seed % 1 ~= 0 or self.seed < 0 then
        error("validation.seed must be a non-negative integer, got " .. tostring(self.seed), 0)
    end
    local n = ds:len()
    if o.max_samples ~= nil then
        if not is_posint(o.max_samples) then
            error("validation.max_samples must be a positive integer, got " .. tostring(o.max_samples), 0)
        end
        n = math.min(n, o.max_samples)
    end
    if n < 1 then error("validation: the cache " .. tostring(ds.path) .. " holds no sample", 0) end
    self.samples = n
    self.batches = self:_plan(n)
end

-- The samples 1..n by bucket, in global batches of batch_size x dp_size; each rank's slice of
-- each: {indices = {...}, weights = {1 | 0, ...}} (a padding repeat weighs 0).
function Validator:_plan(n)
    local G, dp = self.batch_size * self.dp_size, self.dp_size
    local out = {}
    for _, b in ipairs(self.ds.buckets) do
        local idx = {}
        for _, v in ipairs(b.indices) do if v <= n then idx[#idx + 1] = v end end
        for start = 1, #idx, G do
            local chunk, w = {}, {}
            for i = start, math.min(start + G - 1, #idx) do chunk[#chunk + 1] = idx[i]; w[#w + 1] = 1 end
            local want = math.ceil(#chunk / dp) * dp
            local k = 0
            while #chunk < want do k = k + 1; chunk[#chunk + 1] = chunk[k]; w[#w + 1] = 0 end
            local per = #chunk / dp
            local mine = {indices = {}, weights = {}}
            for i = 1, per do
                mine.indices[i] = chunk[self.dp_rank * per + i]
                mine.weights[i] = w[self.dp_rank * per + i]
            end
            out[#out + 1] = mine
        end
    end
    return out
end

-- a sample's fixed noise (float32, or float64 for a float64 run), on the device
function Validator:_noise(i, shape)
    local wd = require("nemo.flow_matching").work_dtype(self.compute_dtype)
    local g = Tensor.Generator(self.seed * 1000003 + i)
    return Tensor.empty(shape, {dtype = wd}):normal_(0, 1, {generator = g}):to{device = self.device}
end

-- fn() with model in eval mode and without gradients; its mode is restored, also when fn raises
local function in_eval(model, fn)
    local was_training = model.training
    if model.eval then model:eval() end
    local res = {pcall(autograd.no_grad, fn)}
    if model.train then model:train(was_training ~= false) end
    if not res[1] then error(res[2], 0) end
    return unpack(res, 2, table.maxn(res))
end

-- run(model[, {all_reduce = function({numbers}) -> {sums}, clock = function() -> seconds}])
--   -> {loss, by_sigma, samples, seconds}.
-- Every rank must call it (collectives); the model is in eval mode meanwhile.
function Validator:run(model, opts)
    opts = opts or {}
    local clock = opts.clock or os.clock
    local t0 = clock()
    local K = #self.sigmas
    local sums = {}
    for k = 1, K + 1 do sums[k] = 0 end   -- K sums, then the count
    in_eval(model, function()
        for _, b in ipairs(self.batches) do
            local batch = data.load_batch(self.ds, b.indices, {device = self.device})
            local x0 = batch.image_latents or batch.video_latents
            local shape = {}
            for d = 2, #x0.shape do shape[d - 1] = x0.shape[d] end
            local noises = {}
            for i, idx in ipairs(b.indices) do noises[i] = self:_noise(idx, shape) end
            local noise = F.stack(noises, 0)
            for k, s in ipairs(self.sigmas) do
                local _, out = self.fm:step(model, batch, {sigma = s, cfg_dropout = false, draws = {noise = noise},
                    compute_dtype = self.compute_dtype, device = self.device})
                local per = self.fm:sample_losses(out.pred, out.target, out.sigma, out.timesteps):tolist()
                for i, w in ipairs(b.weights) do sums[k] = sums[k] + w * per[i] end
            end
            for _, w in ipairs(b.weights) do sums[K + 1] = sums[K + 1] + w end
        end
    end)
    if opts.all_reduce then sums = opts.all_reduce(sums) end
    local count = sums[K + 1]
    local by, total = {}, 0
    for k = 1, K do by[k] = sums[k] / count; total = total + by[k] end
    return {loss = total / K, by_sigma = by, samples = self.samples, seconds = clock() - t0}
end

-- ==== samples: images (FLUX) or videos (Wan) from the model being trained ====

M.SAMPLING_KEYS = {num_samples = "number", prompts = "table", negative_prompt = "string", num_inference_steps = "number",
                   guidance_scale = "number", height = "number", width = "number", num_frames = "number",
                   seed = "number", output_dir = "string", fps = "number"}
M.KEYS.sampling = M.SAMPLING_KEYS

local Sampler = class("nemo.validation.Sampler")
M.Sampler = Sampler

-- Sampler{kind = "image" | "video", prompts = {{name =, embeds = [L, D], pooled = [P] | nil,
--   negative = [L', D] | nil}, ...}, vae =, scheduler =, height =, width =, num_frames =,
--   num_inference_steps =, guidance_scale =, seed =, output_dir =, fps =, writer = (this rank
--   decodes and writes), device =, dtype = (the embeddings' dtype)}
-- run(model, tag) samples every prompt with Generator(seed + i - 1) through nemo.sampling (FluxPipeline
-- / WanPipeline's loops) and, on the writer, writes output_dir/<tag>/sample_NNN_<name>.png | .mp4;
-- returns the paths. Every rank of the model's process group must call it (the forward passes
-- are collective); the others only run the transformer.
function Sampler:__init(o)
    for k, v in pairs(o) do self[k] = v end
end

function Sampler:run(model, tag)
    local sampling = require "nemo.sampling"
    local fs = require "nemo.fs"
    local image = require "nemo.image"
    local dir = self.output_dir .. "/" .. tag
    if self.writer then fs.mkdirs(dir) end
    local files = {}
    in_eval(model, function()   -- (nemo.sampling runs under no_grad itself)
        for i, p in ipairs(self.prompts) do
            local gen = Tensor.Generator(self.seed + i - 1)
            local function dev(t) return t and t:to{dtype = self.dtype, device = self.device}:unsqueeze(0) or nil end
            local path = dir .. "/" .. require("nemo.generate").sample_name(i - 1, p.name,
                self.kind == "image" and "png" or "mp4")
            if self.kind == "image" then
                local r = sampling.flux{transformer = model, scheduler = self.scheduler, vae = self.vae,
                    prompt_embeds = dev(p.embeds), pooled_prompt_embeds = dev(p.pooled), height = self.height,
                    width = self.width, num_inference_steps = self.num_inference_steps,
                    guidance_scale = self.guidance_scale, generator = gen,
                    output_type = self.writer and "image" or "latent"}
                if self.writer then image.save(path, (sampling.to_uint8(r.image))) end
            else
                local r = sampling.wan{transformer = model, scheduler = self.scheduler, vae = self.vae,
                    prompt_embeds = dev(p.embeds), negative_prompt_embeds = dev(p.negative), height = self.height,
                    width = self.width, num_frames = self.num_frames, num_inference_steps = self.num_inference_steps,
                    guidance_scale = self.guidance_scale, generator = gen,
                    output_type = self.writer and "video" or "latent"}
                if self.writer then image.save_video(path, sampling.video_frames(r.video, 1), {fps = self.fps}) end
            end
            if self.writer then files[#files + 1] = path end
        end
    end)
    return files
end

return M
