-- lua/nemo/flow_matching.lua: the rectified-flow training objective as NeMo Automodel computes it
-- (FlowMatchingPipeline.step with the FluxAdapter or the SimpleAdapter used for Wan):
--   sigma ~ timestep_sampling, shifted and clamped;  t = sigma * T
--   x_t = (1 - sigma) x0 + sigma eps;  target = eps - x0;  L = mean(w(sigma) * (pred - target)^2)
--
--   local FM = require "nemo.flow_matching"
--   local fm = FM.FlowMatching(cfg.flow_matching)        -- Automodel's YAML keys and defaults
--   local loss, out = fm:step(model, batch, {generator = g, compute_dtype = "bfloat16"})
--   loss:backward()                                     -- out.sigma, out.x_t, out.pred, ...
--
-- The non-obvious rule: the ORDER of the random draws is Automodel's, so a replay of the same
-- numbers gives the same step. nemo.Generator is our own Philox stream and cannot reproduce
-- torch's numbers, so golden tests pass the stored draws in opts.draws instead; a draw given
-- there is used as is and does not advance the generator. The order within one step:
--   0. (Automodel draws Python random.random() for i2v on video data. Only its Hunyuan adapter
--      reads the result and the stream is separate from torch's: nemo-lua draws nothing.)
--   1. sigma (sample_sigmas):
--      use_sigma_noise = false:  uniform [B]                        -> draws.uniform
--      timestep_sampling "beta": Gamma draws (Marsaglia-Tsang) from the generator (our own
--                                algorithm: torch's Beta sampler cannot be replayed); the [B]
--                                Beta values                        -> draws.beta
--      otherwise:  a. uniform [1] for the mix decision, ONLY when mix_uniform_ratio > 0 and
--                     the mode is not "uniform"                     -> draws.mix_uniform
--                  b. u: uniform [B] (uniform mode, mix hit, "mode") -> draws.uniform
--                     or normal [B] (logit_normal: N(mean, std); lognorm / mix: N(0, 1))
--                                                                   -> draws.normal
--   2. noise: normal, the shape of the latents, float32              -> draws.noise
--   3. flux adapter, only when cfg_dropout_prob > 0: uniform [B]     -> draws.cfg_uniform
--
-- Dtypes as Automodel: the latents are cast to the compute dtype; sigma, noise, x_t's
-- arithmetic, the target and the loss are float32 ("the work dtype"; float64 when the compute
-- dtype is float64, so a float64 run is float64 throughout); x_t is cast to the compute dtype
-- before the model sees it. Timesteps go to the model in the compute dtype (Flux: /1000 after
-- that cast, so bf16 rounds them as Automodel does).
--
-- Where nemo-lua deliberately differs from Automodel:
--   - an unknown timestep_sampling (or any unknown key) is an error, not a silent uniform;
--   - the flux adapter passes `guidance` only to a model that has guidance embeddings
--     (Automodel always passes it, which crashes FLUX models without them; golden finding 1);
--   - `mode_scale` (1.29, hard-coded in Automodel) is a key.
-- Shapes: B batch, C latent channels, F frames, H W latent height and width, N = (H/2)(W/2)
-- Flux tokens, L text tokens, D text width.
require "nemo"
local class = require "nemo.class"
local Tensor = require "nemo.tensor"
local F = require "nemo.functional"
local autograd = require "nemo.autograd"
local nffi = require "nemo.ffi"

local C = nffi.C
local is_tensor, shape_str = Tensor.is_tensor, Tensor.shape_str

local M = {}

-- ==== configuration ====

-- Automodel's recipe defaults (recipes/diffusion/train.py reads flow_matching.* with these),
-- plus mode_scale and guidance_scale (a shortcut for adapter_kwargs.guidance_scale).
M.DEFAULTS = {
    adapter_type = "simple", timestep_sampling = "logit_normal", logit_mean = 0.0, logit_std = 1.0,
    mode_scale = 1.29, flow_shift = 3.0, mix_uniform_ratio = 0.1, beta_alpha = 2.5, beta_beta = 1.5,
    use_sigma_noise = true, sigma_min = 0.0, sigma_max = 1.0, num_train_timesteps = 1000,
    i2v_prob = 0.3, cfg_dropout_prob = 0.1, use_loss_weighting = true, loss_weighting_scheme = "linear",
    log_interval = 100, summary_log_interval = 10,
}
M.TIMESTEP_SAMPLING = {"uniform", "logit_normal", "lognorm", "mix", "mode", "beta"}
M.LOSS_WEIGHTING_SCHEMES = {"linear", "bsmntw"}
M.ADAPTERS = {"flux", "simple"}
-- adapters Automodel has and nemo-lua does not (yet): named in the error
local AUTOMODEL_ONLY = {flux2 = true, qwen_image = true, qwen_image_edit = true, hunyuan = true, ltx2 = true,
                        wan_animate2 = true}
-- adapter_kwargs each adapter takes, with defaults (FluxAdapter.__init__; SimpleAdapter takes none)
local ADAPTER_KWARGS = {
    flux = {guidance_scale = 3.5, use_guidance_embeds = true},
    simple = {},
}

local KIND = {
    adapter_type = "string", timestep_sampling = "string", loss_weighting_scheme = "string",
    logit_mean = "number", logit_std = "number", mode_scale = "number", flow_shift = "number",
    mix_uniform_ratio = "number", beta_alpha = "number", beta_beta = "number", sigma_min = "number",
    sigma_max = "number", i2v_prob = "number", cfg_dropout_prob = "number", guidance_scale = "number",
    num_train_timesteps = "integer", log_interval = "integer", summary_log_interval = "integer",
    use_sigma_noise = "boolean", use_loss_weighting = "boolean", adapter_kwargs = "table",
}

local function sorted_keys(t)
    local out = {}
    for k in pairs(t) do out[#out + 1] = tostring(k) end
    table.sort(out)
    return out
end

local function one_of(v, list)
    for _, x in ipairs(list) do if x == v then return true end end
    return false
end

local function cfg_error(msg) error("flow_matching: " .. msg, 4) end

local function check_kind(key, v)
    local kind = KIND[key]
    local ok
    if kind == "integer" then ok = type(v) == "number" and v % 1 == 0
    else ok = type(v) == kind end
    if not ok then
        cfg_error(string.format("%s must be a%s %s, got %s (%s)", key, kind == "integer" and "n" or "",
            kind, tostring(v), type(v)))
    end
end

local function check_range(key, v, lo, hi, open_lo)
    if v ~= v or (open_lo and v <= lo) or (not open_lo and v < lo) or (hi and v > hi) then
        cfg_error(string.format("%s must be in %s%g, %s], got %g", key, open_lo and "(" or "[", lo,
            hi and string.format("%g", hi) or "inf", v))
    end
end

local FlowMatching = class("nemo.FlowMatching")

-- FlowMatching(cfg): cfg is the `flow_matching` YAML block (nil = all defaults). Unknown keys,
-- wrong types and out-of-range values are errors naming the key.
function FlowMatching:__init(cfg)
    cfg = cfg or {}
    if type(cfg) ~= "table" then cfg_error("expected a table of settings, got " .. type(cfg)) end
    for k, v in pairs(cfg) do
        if KIND[k] == nil then
            error(string.format("flow_matching: unknown key '%s' (known keys: %s)", tostring(k),
                table.concat(sorted_keys(KIND), ", ")), 3)
        end
        check_kind(k, v)
    end
    for k, v in pairs(M.DEFAULTS) do self[k] = v end
    for k, v in pairs(cfg) do if k ~= "adapter_kwargs" and k ~= "guidance_scale" then self[k] = v end end

    if not one_of(self.adapter_type, M.ADAPTERS) then
        cfg_error(string.format("adapter_type '%s' is %s (available: %s)", self.adapter_type,
            AUTOMODEL_ONLY[self.adapter_type] and "an Automodel adapter that nemo-lua does not implement"
            or "unknown", table.concat(M.ADAPTERS, ", ")))
    end
    if not one_of(self.timestep_sampling, M.TIMESTEP_SAMPLING) then
        cfg_error(string.format("unknown timestep_sampling '%s' (valid: %s)", self.timestep_sampling,
            table.concat(M.TIMESTEP_SAMPLING, ", ")))
    end
    if not one_of(self.loss_weighting_scheme, M.LOSS_WEIGHTING_SCHEMES) then
        cfg_error(string.format("unknown loss_weighting_scheme '%s' (valid: %s)", self.loss_weighting_scheme,
            table.concat(M.LOSS_WEIGHTING_SCHEMES, ", ")))
    end
    check_range("logit_std", self.logit_std, 0)
    check_range("flow_shift", self.flow_shift, 0, nil, true)
    check_range("mix_uniform_ratio", self.mix_uniform_ratio, 0, 1)
    check_range("beta_alpha", self.beta_alpha, 0, nil, true)
    check_range("beta_beta", self.beta_beta, 0, nil, true)
    check_range("sigma_min", self.sigma_min, 0, 1)
    check_range("sigma_max", self.sigma_max, 0, 1)
    if self.sigma_min > self.sigma_max then
        cfg_error(string.format("sigma_min (%g) must not exceed sigma_max (%g)", self.sigma_min, self.sigma_max))
    end
    check_range("i2v_prob", self.i2v_prob, 0, 1)
    check_range("cfg_dropout_prob", self.cfg_dropout_prob, 0, 1)
    check_range("num_train_timesteps", self.num_train_timesteps, 1)
    check_range("log_interval", self.log_interval, 1)
    check_range("summary_log_interval", self.summary_log_interval, 1)

    -- adapter kwargs (YAML flow_matching.adapter_kwargs), checked against the adapter
    local allowed = ADAPTER_KWARGS[self.adapter_type]
    local akw = {}
    for k, v in pairs(allowed) do akw[k] = v end
    for k, v in pairs(cfg.adapter_kwargs or {}) do
        if allowed[k] == nil then
            local names = sorted_keys(allowed)
            cfg_error(string.format("adapter_kwargs.%s is not a setting of the %s adapter (%s)", tostring(k),
                self.adapter_type, #names > 0 and ("it takes: " .. table.concat(names, ", ")) or "it takes none"))
        end
        if type(v) ~= type(allowed[k]) then
            cfg_error(string.format("adapter_kwargs.%s must be a %s, got %s", k, type(allowed[k]), type(v)))
        end
        akw[k] = v
    end
    if cfg.guidance_scale ~= nil then
        if self.adapter_type ~= "flux" then
            cfg_error("guidance_scale is a setting of the flux adapter; adapter_type is '" .. self.adapter_type .. "'")
        end
        local given = cfg.adapter_kwargs and cfg.adapter_kwargs.guidance_scale
        if given ~= nil and given ~= cfg.guidance_scale then
            cfg_error(string.format("guidance_scale (%g) and adapter_kwargs.guidance_scale (%g) disagree",
                cfg.guidance_scale, given))
        end
        akw.guidance_scale = cfg.guidance_scale
    end
    self.adapter_kwargs = akw
    self.guidance_scale = akw.guidance_scale
    if self.use_loss_weighting and self.loss_weighting_scheme == "bsmntw" then
        self._bsmntw = M.bsmntw_table(self.num_train_timesteps)
    end
end

function FlowMatching:__tostring()
    local parts = {}
    for _, k in ipairs(sorted_keys(M.DEFAULTS)) do parts[#parts + 1] = k .. "=" .. tostring(self[k]) end
    return "FlowMatching(" .. table.concat(parts, ", ") .. ")"
end

-- The settings as a plain table (for logs and checkpoints).
function FlowMatching:config()
    local out = {}
    for k in pairs(M.DEFAULTS) do out[k] = self[k] end
    out.adapter_kwargs = {}
    for k, v in pairs(self.adapter_kwargs) do out.adapter_kwargs[k] = v end
    return out
end

-- ==== helpers ====

local function work_dtype(compute_dtype) return compute_dtype == "float64" and "float64" or "float32" end
M.work_dtype = work_dtype

-- A [B] tensor viewed as [B, 1, ..., 1] to broadcast over a tensor of `ndim` dims.
local function per_sample(v, ndim)
    local shape = {v.shape[1]}
    for i = 2, ndim do shape[i] = 1 end
    return v:reshape(shape)
end

-- mean over every element, a 0-dim tensor with autograd. Uses F.mean when the reduce family
-- is loaded; otherwise the engine's sum_to with a local backward (same numbers).
local function mean_fallback_bw(node, g)
    return F.div(F.broadcast_to(g, node.shape), node.n)
end
local function mean_all(x)
    if F.mean then return F.mean(x) end
    local n = x:numel()
    local y = autograd.no_grad(function()
        local s = Tensor.wrap(C.nemo_sum_to(x._c, 0, Tensor.int64s({})))
        return F.div(s, n)
    end)
    local node = autograd.node("mean", mean_fallback_bw, y, x)
    if node then node.shape, node.n = x.shape, n end
    return y
end
M._mean = mean_all

local function same_shape(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do if a[i] ~= b[i] then return false end end
    return true
end

-- One random draw of `shape`: the replayed tensor when given (checked, cast, never advancing
-- the generator), else fresh numbers from gen. kind "uniform" (U[0,1)) or "normal" (mean, std).
local function draw(kind, shape, dtype, device, gen, given, name, mean, std)
    if given ~= nil then
        if type(given) == "number" then given = Tensor.tensor({given}, {dtype = dtype}) end
        if not is_tensor(given) then
            error(string.format("draws.%s must be a tensor, got %s", name, type(given)), 4)
        end
        if not same_shape(given.shape, shape) then
            error(string.format("draws.%s has shape %s, the step needs %s", name, shape_str(given.shape),
                shape_str(shape)), 4)
        end
        return given:detach():to{dtype = dtype, device = device}
    end
    local t = Tensor.empty(shape, {dtype = dtype, device = device})
    if kind == "uniform" then t:uniform_(0, 1, {generator = gen}) else t:normal_(mean, std, {generator = gen}) end
    return t
end

local function generator_of(g, what)
    if g == nil then return Tensor.default_generator end
    if getmetatable(g) ~= Tensor.GeneratorClass then
        error(what .. ": generator must be a nemo.Generator, got " .. type(g), 3)
    end
    return g
end

-- ==== sigma sampling ====

-- Gamma(a, 1) by Marsaglia and Tsang (a < 1 through Gamma(a + 1) * U^(1/a)); scalar draws
-- from gen. Used by the "beta" mode only.
local function gamma_draw(a, gen)
    local one = Tensor.empty({1}, {dtype = "float64"})
    local function nrm() one:normal_(0, 1, {generator = gen}); return one:item() end
    local function uni() one:uniform_(0, 1, {generator = gen}); return one:item() end
    local boost = 1
    if a < 1 then boost = uni() ^ (1 / a); a = a + 1 end
    local d = a - 1 / 3
    local c = 1 / math.sqrt(9 * d)
    while true do
        local x = nrm()
        local v = 1 + c * x
        if v > 0 then
            v = v * v * v
            local uu = uni()
            if uu > 0 and math.log(uu) < 0.5 * x * x + d - d * v + d * math.log(v) then return d * v * boost end
        end
    end
end

-- sample_sigmas(B, generator | {generator=, draws=, dtype=, device=}) -> u, sigma, timesteps, info
--   u: [B] before the shift; sigma: [B] shifted and clamped; timesteps = sigma * T; all in dtype
--   (float32 default). info = {method = "logit_normal" | "uniform" | "uniform_no_shift" | ...,
--   mix_uniform = <number or nil>, uniform = <[B] or nil>, normal = <[B] or nil>, beta = <[B] or
--   nil>}: the raw draws.
function FlowMatching:sample_sigmas(B, opts)
    if type(B) ~= "number" or B < 1 or B % 1 ~= 0 then
        error("sample_sigmas: batch size must be a positive integer, got " .. tostring(B), 2)
    end
    if getmetatable(opts) == Tensor.GeneratorClass then opts = {generator = opts} end
    opts = opts or {}
    local gen = generator_of(opts.generator, "sample_sigmas")
    local draws = opts.draws or {}
    local dt = opts.dtype or "float32"
    local dev = opts.device or "cpu"
    local info = {}
    local u, sigma
    local s = self.flow_shift
    if not self.use_sigma_noise then
        u = draw("uniform", {B}, dt, dev, gen, draws.uniform, "uniform")
        info.uniform, info.method = u, "uniform_no_shift"
        sigma = u:clamp(self.sigma_min, self.sigma_max)
    elseif self.timestep_sampling == "beta" then
        if draws.beta ~= nil then   -- replayed (a data-parallel rank's slice of the global batch's)
            u = draw("beta", {B}, dt, dev, gen, draws.beta, "beta")
        else
            local vals = {}
            for i = 1, B do
                local x = gamma_draw(self.beta_alpha, gen)
                local y = gamma_draw(self.beta_beta, gen)
                vals[i] = x / (x + y)
            end
            u = Tensor.tensor(vals, {dtype = dt, device = dev})
        end
        info.beta, info.method = u, "beta"
        sigma = u:clamp(self.sigma_min, self.sigma_max)
    else
        local mode = self.timestep_sampling
        local use_uniform = mode == "uniform"
        if not use_uniform and self.mix_uniform_ratio > 0 then
            local r = draw("uniform", {1}, dt, dev, gen, draws.mix_uniform, "mix_uniform"):item()
            info.mix_uniform = r
            use_uniform = r < self.mix_uniform_ratio
        end
        if use_uniform then
            u = draw("uniform", {B}, dt, dev, gen, draws.uniform, "uniform")
            info.uniform, info.method = u, "uniform"
        elseif mode == "mode" then
            local r = draw("uniform", {B}, dt, dev, gen, draws.uniform, "uniform")
            info.uniform, info.method = r, "mode"
            -- u = 1 - r - scale * (cos(pi r / 2)^2 - 1 + r), in Automodel's op order
            local cs = F.cos(F.div(F.mul(r, math.pi), 2.0))
            local inner = F.add(F.sub(F.mul(cs, cs), 1.0), r)
            u = F.sub(F.sub(1.0, r), F.mul(inner, self.mode_scale)):clamp(0.0, 1.0)
        else
            local mean, std = 0.0, 1.0
            if mode == "logit_normal" then mean, std = self.logit_mean, self.logit_std end
            local z = draw("normal", {B}, dt, dev, gen, draws.normal, "normal", mean, std)
            info.normal, info.method = z, mode
            u = F.sigmoid(z)
        end
        -- sigma = s / (s + (1/max(u, 1e-5) - 1)) = s u / (1 + (s - 1) u), then the clamp
        local uc = u:clamp_min(1e-5)
        sigma = F.div(s, F.add(F.sub(F.div(1.0, uc), 1.0), s))
        sigma = sigma:clamp(self.sigma_min, self.sigma_max)
    end
    local timesteps = F.mul(sigma, self.num_train_timesteps)
    return u, sigma, timesteps, info
end

-- ==== loss weighting ====

-- Automodel's bell-shaped midpoint table: w[k] = exp(-2 ((k - T/2) / T)^2), minus its minimum,
-- scaled so that sum(w) = T; k = 0..T-1. A Lua array (computed in double precision).
function M.bsmntw_table(T)
    local w, lo = {}, math.huge
    for k = 0, T - 1 do
        local v = math.exp(-2.0 * ((k - T / 2) / T) ^ 2)
        w[k + 1] = v
        if v < lo then lo = v end
    end
    local sum = 0
    for k = 1, T do w[k] = w[k] - lo; sum = sum + w[k] end
    local scale = T / sum
    for k = 1, T do w[k] = w[k] * scale end
    return w
end

-- Per-sample loss weights [B] in sigma's dtype: linear 1 + s sigma; bsmntw table[floor(t)]
-- with t = sigma T (the `timesteps` tensor) clamped to [0, T-1]; ones without weighting.
function FlowMatching:loss_weights(sigma, timesteps)
    if not self.use_loss_weighting then return Tensor.ones_like(sigma) end
    if self.loss_weighting_scheme == "linear" then
        return F.add(F.mul(sigma, self.flow_shift), 1.0)
    end
    timesteps = timesteps or F.mul(sigma, self.num_train_timesteps)
    local tbl = self._bsmntw or M.bsmntw_table(self.num_train_timesteps)
    local T = self.num_train_timesteps
    local vals = {}
    for i, t in ipairs(timesteps:tolist()) do
        local k = t >= 0 and math.floor(t) or math.ceil(t)      -- .long() truncates
        if k < 0 then k = 0 elseif k > T - 1 then k = T - 1 end
        vals[i] = tbl[k + 1]
    end
    return Tensor.tensor(vals, {dtype = sigma.dtype, device = sigma.device})
end

-- compute_loss(pred, target, sigma[, timesteps]) -> loss (0-dim, with autograd),
--   {loss_unweighted = 0-dim (no grad), loss_weight = [B]}.
-- loss = mean((pred - target)^2 * w) in target's dtype (float32 or float64).
function FlowMatching:compute_loss(pred, target, sigma, timesteps)
    if not same_shape(pred.shape, target.shape) then
        error(string.format("compute_loss: prediction shape %s does not match the target's %s",
            shape_str(pred.shape), shape_str(target.shape)), 2)
    end
    local diff = F.sub(pred:to{dtype = target.dtype}, target)
    local sq = F.mul(diff, diff)
    local w = self:loss_weights(sigma, timesteps)
    local loss
    if self.use_loss_weighting then
        loss = mean_all(F.mul(sq, per_sample(w, sq.ndim)))
    else
        loss = mean_all(sq)          -- w = 1: x * 1 == x exactly, so skip the multiply
    end
    local unweighted = autograd.no_grad(mean_all, sq:detach())
    return loss, {loss_unweighted = unweighted, loss_weight = w}
end

-- sample_losses(pred, target, sigma[, timesteps]) -> [B] (no grad): each sample's share of
-- compute_loss's value, mean((pred_b - target_b)^2) * w_b; their mean is compute_loss's loss.
function FlowMatching:sample_losses(pred, target, sigma, timesteps)
    return autograd.no_grad(function()
        local b = target.shape[1]
        local diff = F.sub(pred:detach():to{dtype = target.dtype}, target)
        local per = F.mean(F.mul(diff, diff):reshape{b, -1}, 1)
        if self.use_loss_weighting then per = F.mul(per, self:loss_weights(sigma, timesteps)) end
        return per
    end)
end

-- ==== Flux packing ====

-- [B, C, H, W] -> [B, (H/2)(W/2), 4C]; channel index c*4 + dy*2 + dx (FluxAdapter._pack_latents).
function M.pack_latents(x)
    if x.ndim ~= 4 then
        error("pack_latents: expected 4-D latents [B, C, H, W], got shape " .. shape_str(x.shape), 2)
    end
    local b, c, h, w = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    if h % 2 ~= 0 or w % 2 ~= 0 then
        error(string.format("pack_latents: latent height and width must be even for 2x2 packing, got %dx%d", h, w), 2)
    end
    return x:reshape{b, c, h / 2, 2, w / 2, 2}:permute{0, 2, 4, 1, 3, 5}:reshape{b, (h / 2) * (w / 2), c * 4}
end

-- [B, (H/2)(W/2), 4C] -> [B, C, H, W], the exact inverse of pack_latents.
function M.unpack_latents(x, h, w)
    if x.ndim ~= 3 then
        error("unpack_latents: expected packed latents [B, N, 4C], got shape " .. shape_str(x.shape), 2)
    end
    local b, n, ch = x.shape[1], x.shape[2], x.shape[3]
    if h % 2 ~= 0 or w % 2 ~= 0 or n ~= (h / 2) * (w / 2) or ch % 4 ~= 0 then
        error(string.format("unpack_latents: shape %s cannot be unpacked to %dx%d latents (needs N = %d and 4C channels)",
            shape_str(x.shape), h, w, (h % 2 == 0 and w % 2 == 0) and (h / 2) * (w / 2) or -1), 2)
    end
    return x:reshape{b, h / 2, w / 2, ch / 4, 2, 2}:permute{0, 3, 1, 4, 2, 5}:reshape{b, ch / 4, h, w}
end

-- img_ids [(H/2)(W/2), 3], row-major: (0, row, col) of each 2x2 patch.
function M.latent_image_ids(h, w, opts)
    opts = opts or {}
    local rows = {}
    for i = 0, h / 2 - 1 do
        for j = 0, w / 2 - 1 do rows[#rows + 1] = {0, i, j} end
    end
    return Tensor.tensor(rows, {dtype = opts.dtype or "float32", device = opts.device})
end

-- ==== adapters ====

-- Does the model embed guidance? config.guidance_embeds when the model carries its config,
-- else whether it has time_text_embed.guidance_embedder; unknown models get guidance (Automodel).
local function model_has_guidance(model)
    if type(model) ~= "table" then return true end
    local cfg = rawget(model, "config")
    if type(cfg) == "table" and cfg.guidance_embeds ~= nil then return cfg.guidance_embeds == true end
    local tte = model.time_text_embed
    if type(tte) == "table" then return tte.guidance_embedder ~= nil end
    return true
end

local function first_output(out)
    if is_tensor(out) then return out end
    if type(out) == "table" then
        if is_tensor(out[1]) then return out[1] end
        if is_tensor(out.sample) then return out.sample end
    end
    error("step: the model returned a " .. type(out) .. ", expected a tensor (or a table holding one)", 3)
end

local function text_of(batch, key, cd, dev)
    local t = batch[key]
    if t == nil then
        error(string.format("step: the batch has no '%s' (keys: %s)", key, table.concat(sorted_keys(batch), ", ")), 4)
    end
    t = t:to{dtype = cd, device = dev}
    if t.ndim == 2 then t = t:unsqueeze(0) end
    return t
end

local adapters = {}

-- FluxAdapter: packed latents, ids, t/1000, guidance, per-sample CFG dropout of text + pooled.
adapters.flux = {}
function adapters.flux.prepare(fm, ctx)
    local x_t, cd, dev, batch = ctx.x_t, ctx.compute_dtype, ctx.device, ctx.batch
    if x_t.ndim ~= 4 then
        error("step: the flux adapter expects 4-D image latents [B, C, H, W], got shape " .. shape_str(x_t.shape), 3)
    end
    local b, h, w = x_t.shape[1], x_t.shape[3], x_t.shape[4]
    local text = text_of(batch, "text_embeddings", cd, dev)
    local pooled = batch.pooled_prompt_embeds or batch.clip_pooled
    if pooled ~= nil then pooled = pooled:to{dtype = cd, device = dev}
    else pooled = Tensor.zeros({b, 768}, {dtype = cd, device = dev}) end
    if pooled.ndim == 1 then pooled = pooled:unsqueeze(0) end
    local drop
    if fm.cfg_dropout_prob > 0 and ctx.cfg_dropout ~= false then
        local r = draw("uniform", {b}, ctx.work_dtype, dev, ctx.generator, ctx.draws.cfg_uniform, "cfg_uniform")
        ctx.drawn.cfg_uniform = r
        drop = F.lt(r, fm.cfg_dropout_prob)
        text = F.where(drop:reshape{b, 1, 1}, 0.0, text)
        pooled = F.where(drop:reshape{b, 1}, 0.0, pooled)
    end
    local inputs = {
        hidden_states = M.pack_latents(x_t),
        encoder_hidden_states = text,
        pooled_projections = pooled,
        timestep = F.div(ctx.timesteps:to{dtype = cd}, 1000.0),
        img_ids = M.latent_image_ids(h, w, {dtype = cd, device = dev}),
        txt_ids = Tensor.zeros({b, text.shape[2], 3}, {dtype = cd, device = dev}),
    }
    local use_guidance = ctx.guidance
    if use_guidance == nil then use_guidance = model_has_guidance(ctx.model) end
    if use_guidance then
        inputs.guidance = Tensor.full({b}, fm.guidance_scale, {dtype = ctx.work_dtype, device = dev})
    end
    return inputs, drop
end
function adapters.flux.forward(model, inputs, ctx)
    -- Automodel builds txt_ids [B,L,3] (recorded as such in model_input); diffusers takes
    -- txt_ids[0] of a 3-D tensor after a deprecation warning, so hand the model that 2-D view
    local call = inputs
    if inputs.txt_ids and inputs.txt_ids.ndim == 3 then
        call = {}
        for k, v in pairs(inputs) do call[k] = v end
        call.txt_ids = inputs.txt_ids:select(0, 0)
    end
    local out = first_output(model(call))
    ctx.model_output = out
    return M.unpack_latents(out, ctx.x_t.shape[3], ctx.x_t.shape[4])
end

-- SimpleAdapter (Wan): unpacked latents, raw 0..T timesteps in the compute dtype, no dropout.
adapters.simple = {}
function adapters.simple.prepare(_, ctx)
    return {
        hidden_states = ctx.x_t,
        timestep = ctx.timesteps:to{dtype = ctx.compute_dtype},
        encoder_hidden_states = text_of(ctx.batch, "text_embeddings", ctx.compute_dtype, ctx.device),
    }
end
function adapters.simple.forward(model, inputs, ctx)
    local out = first_output(model(inputs))
    ctx.model_output = out
    return out
end
M.adapters = adapters

-- ==== the training step ====

local STEP_OPTS = {generator = true, compute_dtype = true, draws = true, device = true, check_loss = true,
                   guidance = true, call = true, sigma = true, cfg_dropout = true}

-- the dtype of the model's first parameter (read each step: a model may be cast between steps)
local function default_compute_dtype(model)
    if type(model) == "table" and type(model.parameters) == "function" then
        local ok, params = pcall(model.parameters, model)
        if ok and type(params) == "table" and params[1] and params[1].dtype then return params[1].dtype end
    end
    return "float32"
end

-- step(model, batch, opts) -> loss, out
--   batch: {image_latents [B,C,H,W] | video_latents [B,C,F,H,W], text_embeddings [B,L,D],
--           pooled_prompt_embeds [B,P] (flux; zeros [B,768] when absent), ...}
--   opts: generator (nemo.Generator; default the global one), compute_dtype (default: the dtype
--     of the model's first parameter, else float32), draws ({normal=, uniform=, mix_uniform=,
--     beta=, noise=, cfg_uniform=}: replayed draws), device (default: the latents' device),
--     check_loss (error when the loss is NaN or > 100, as performance.check_loss),
--     guidance (true/false: override the guidance detection of the flux adapter),
--     call (function(model, inputs, adapter_type) -> output: replaces the model call),
--     sigma (a number or a [B] tensor: this sigma instead of a drawn one, used as is: no shift,
--     no clamp, nothing drawn for it; the validation loss), cfg_dropout (false: never drop the
--     text, nothing drawn for it).
--   The model is called as diffusers' forward with named arguments, model(inputs):
--     flux: {hidden_states [B,N,4C], encoder_hidden_states [B,L,D], pooled_projections [B,P],
--            timestep [B], img_ids [N,3], txt_ids [B,L,3], guidance [B] (only with guidance_embeds)}
--     simple: {hidden_states [B,C,F,H,W], timestep [B], encoder_hidden_states [B,L,D]}
--            (Automodel also passes attention_kwargs = {scale = 1}, its LoRA-scale hook: a no-op)
--   and returns the prediction (flux: packed [B,N,4C], unpacked here; simple: the latent shape).
--   loss: 0-dim, requires grad (when the model's parameters do).
--   out: {u, sigma, timesteps, method, noise, x_t, target, pred, model_output, model_input,
--         loss_weight, loss_unweighted, cfg_drop_mask, draws = {normal, uniform, mix_uniform,
--         noise, cfg_uniform}, data_type}.
function FlowMatching:step(model, batch, opts)
    opts = opts or {}
    for k in pairs(opts) do
        if not STEP_OPTS[k] then
            error(string.format("step: unknown option '%s' (options: %s)", tostring(k),
                table.concat(sorted_keys(STEP_OPTS), ", ")), 2)
        end
    end
    if type(batch) ~= "table" then error("step: batch must be a table, got " .. type(batch), 2) end
    local x0src = batch.video_latents or batch.image_latents
    if not is_tensor(x0src) then
        error("step: the batch must hold 'video_latents' or 'image_latents' (keys: " ..
            table.concat(sorted_keys(batch), ", ") .. ")", 2)
    end
    local cd = opts.compute_dtype or default_compute_dtype(model)
    Tensor.dtype_id(cd, "step compute_dtype")
    local wd = work_dtype(cd)
    local dev = opts.device or x0src.device
    local gen = generator_of(opts.generator, "step")
    local draws = opts.draws or {}
    for k in pairs(draws) do
        if not ({normal = 1, uniform = 1, mix_uniform = 1, noise = 1, cfg_uniform = 1, beta = 1})[k] then
            error("step: unknown draw '" .. tostring(k) .. "' (draws: normal, uniform, mix_uniform, beta, noise, " ..
                "cfg_uniform)", 2)
        end
    end

    local x0 = x0src:to{dtype = cd, device = dev}
    local b = x0.shape[1]
    local data_type = batch.data_type or "video"

    -- 1. sigma, 2. noise (see the draw order in the header)
    local u, sigma, timesteps, sinfo
    if opts.sigma ~= nil then
        sigma = opts.sigma
        if type(sigma) == "number" then sigma = Tensor.full({b}, sigma, {dtype = wd, device = dev})
        elseif not is_tensor(sigma) or sigma.ndim ~= 1 or sigma.shape[1] ~= b then
            error(string.format("step: opts.sigma must be a number or a [%d] tensor, got %s", b,
                is_tensor(sigma) and shape_str(sigma.shape) or type(sigma)), 2)
        else sigma = sigma:to{dtype = wd, device = dev} end
        u, timesteps, sinfo = sigma, F.mul(sigma, self.num_train_timesteps), {method = "given"}
    else
        u, sigma, timesteps, sinfo = self:sample_sigmas(b, {generator = gen, draws = draws, dtype = wd, device = dev})
    end
    local noise = draw("normal", x0.shape, wd, dev, gen, draws.noise, "noise", 0.0, 1.0)
    local x0w = x0:to{dtype = wd}
    local sv = per_sample(sigma, x0.ndim)
    local x_t = F.add(F.mul(F.sub(1.0, sv), x0w), F.mul(sv, noise)):to{dtype = cd}

    -- 3. the adapter
    local adapter = adapters[self.adapter_type]
    local ctx = {x_t = x_t, timesteps = timesteps, sigma = sigma, batch = batch, compute_dtype = cd,
                 work_dtype = wd, device = dev, generator = gen, draws = draws, drawn = {}, model = model,
                 guidance = opts.guidance, cfg_dropout = opts.cfg_dropout}
    local inputs, drop = adapter.prepare(self, ctx)
    local pred
    if opts.call then
        local out = first_output(opts.call(model, inputs, self.adapter_type))
        ctx.model_output = out
        pred = self.adapter_type == "flux" and M.unpack_latents(out, x_t.shape[3], x_t.shape[4]) or out
    else
        pred = adapter.forward(model, inputs, ctx)
    end
    if not same_shape(pred.shape, x0.shape) then
        error(string.format("step: the model's prediction has shape %s, the latents %s", shape_str(pred.shape),
            shape_str(x0.shape)), 2)
    end

    -- 4. target and loss
    local target = F.sub(noise, x0w)
    local loss, linfo = self:compute_loss(pred, target, sigma, timesteps)
    if opts.check_loss then
        local v = loss:item()
        if v ~= v or v > 100 then error(string.format("step: loss exploded: %g", v), 2) end
    end
    local drawn = {normal = sinfo.normal, uniform = sinfo.uniform, mix_uniform = sinfo.mix_uniform, beta = sinfo.beta,
                   noise = noise, cfg_uniform = ctx.drawn.cfg_uniform}
    return loss, {
        u = u, sigma = sigma, timesteps = timesteps, method = sinfo.method, noise = noise, x_t = x_t,
        target = target, pred = pred, model_output = ctx.model_output, model_input = inputs,
        loss_weight = linfo.loss_weight, loss_unweighted = linfo.loss_unweighted, cfg_drop_mask = drop,
        draws = drawn, data_type = data_type, compute_dtype = cd,
    }
end

-- ==== data parallelism: one global batch's draws, sliced per rank ====

-- global_draws(G, sample_shape, {generator=, compute_dtype=, device=}) -> draws: the random draws
-- step() would make for a batch of G samples of sample_shape (the latents' shape without the batch
-- dim), in step()'s order and dtypes, from the generator. Every data-parallel rank draws the whole
-- global batch from the same generator state and hands step() its slice (slice_draws), so N ranks
-- with local batch B consume the numbers one process with batch N x B would, and every rank's
-- generator stays in the same state.
function FlowMatching:global_draws(G, sample_shape, opts)
    opts = opts or {}
    local gen = generator_of(opts.generator, "global_draws")
    local wd = work_dtype(opts.compute_dtype or "float32")
    local dev = opts.device or "cpu"
    local _, _, _, info = self:sample_sigmas(G, {generator = gen, dtype = wd, device = dev})
    local shape = {G}
    for i, v in ipairs(sample_shape) do shape[i + 1] = v end
    local d = {normal = info.normal, uniform = info.uniform, mix_uniform = info.mix_uniform, beta = info.beta}
    d.noise = draw("normal", shape, wd, dev, gen, nil, "noise", 0.0, 1.0)
    if self.adapter_type == "flux" and self.cfg_dropout_prob > 0 then
        d.cfg_uniform = draw("uniform", {G}, wd, dev, gen, nil, "cfg_uniform")
    end
    return d
end

-- slice_draws(draws, lo, n): samples [lo, lo + n) (0-based) of a global batch's draws.
function M.slice_draws(d, lo, n)
    local out = {}
    for k, v in pairs(d) do
        if is_tensor(v) then out[k] = v:narrow(0, lo, n) else out[k] = v end
    end
    return out
end

-- M.FlowMatching(cfg) and M.new(cfg) both build one.
M.FlowMatching = FlowMatching
M.new = function(cfg) return FlowMatching(cfg) end

return M
