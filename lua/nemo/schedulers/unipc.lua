-- lua/nemo/schedulers/unipc.lua: diffusers' UniPCMultistepScheduler (0.40), the sampler of
-- WanPipeline (Wan 2.1's config: flow_prediction, use_flow_sigmas, flow_shift 3.0 for 480p and
-- 5.0 for 720p, solver_order 2, bh2), with the rest of the class: the VP noise schedules (betas
-- "linear", "scaled_linear", "squaredcos_cap_v2", trained_betas, rescale_betas_zero_snr), every
-- timestep_spacing, Karras / exponential / flow sigmas, dynamic shifting and shift_terminal,
-- epsilon / sample / v_prediction / flow_prediction with predict_x0 true or false, bh1 / bh2 of
-- any solver_order, lower_order_final, disable_corrector, dynamic thresholding, add_noise.
--
--   local UniPC = require("nemo.schedulers.unipc").UniPCMultistepScheduler
--   local sched = UniPC.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")        -- its scheduler/ folder
--   sched = UniPC.from_config(sched.config, {flow_shift = 5.0})              -- 720p, as the model card
--   sched:set_timesteps(50)
--   for i = 0, sched.num_inference_steps - 1 do
--       local t = sched.timesteps[i]                                         -- a 0-dim int64 tensor
--       latents = sched:step(transformer(latents, t), t, latents)           -- -> prev_sample
--   end
--
-- The rules that are not obvious (each one checked against diffusers by tests/lua/test_unipc.lua
-- and the golden case tests/golden/sched_unipc):
-- * timesteps are int64 (the flow path truncates sigma * num_train_timesteps toward zero, the
--   others round half to even) and sigmas float32 with the final sigma appended (0, or with
--   final_sigmas_type "sigma_min" the last sigma / the first training sigma); the flow path moves
--   a first sigma of 1 to 1 - 1e-6. The schedule is computed as diffusers does it: numpy float64
--   (linspace, shifts, Karras ramp, np.interp at integer timesteps, arange) rounded to float32
--   once; the training tables in torch float32 (torch.linspace as its CPU kernel computes it, a
--   fused start + step * i from each end; cumprod accumulated in float64; every op rounded).
-- * step() does its coefficient math on float32 scalars, as diffusers does on 0-dim float32
--   tensors taken from self.sigmas: every +, -, *, / rounded to float32 here (f32()), log, expm1
--   and sqrt correctly rounded. torch's CPU float32 sqrt / log / expm1 (MKL's vector math on
--   x86) are not: about 0.5% / 0.03% / 0.1% of arguments come out one ulp away, so a few
--   training sigmas and, rarely, a coefficient differ by an ulp from diffusers' (on a GPU
--   diffusers does this math with CUDA's functions instead). The rhos of orders >= 2 are solved
--   in float32 by LU with partial pivoting as MKL factors (bitwise), then triangular solves:
--   bitwise for 2 x 2 (orders 2 and 3), about an ulp off from 3 x 3 on (order >= 3 correctors);
--   they are cast to the sample's dtype. einsum's sum over k is fused in float32, as torch's.
-- * Tensors are combined in torch's order and dtypes, with no upcast: float64 samples with
--   float64 model outputs run in float64 (float32 coefficients, as diffusers), bfloat16 in
--   bfloat16. A coefficient written first (sigma_t * model_output) is cast to the tensor's dtype
--   when that is a half type (so WanPipeline's bfloat16 noise prediction is multiplied by a
--   bfloat16 sigma: bfloat16 product), a coefficient written second (D / rk) stays float32; a
--   float32 sample minus a bfloat16 product is float32; the result is cast to the sample's dtype.
-- * step's state follows diffusers: model_outputs (the converted outputs, [solver_order] the
--   newest) and timestep_list keep solver_order entries; the corrector runs from the second step
--   on unless step_index - 1 is in disable_corrector; this_order = min(solver_order, N -
--   step_index with lower_order_final, lower_order_nums + 1). set_timesteps() resets
--   model_outputs, lower_order_nums, last_sample, step_index and begin_index (not timestep_list /
--   this_order, which the next step overwrites before use).
-- * Dynamic thresholding takes torch.quantile's value: the rank q * (n - 1) in float64 from q in
--   the sample's dtype, its fraction rounded to that dtype, a fused lerp.
-- * diffusers' own quirks are kept: with final_sigmas_type "zero" the last step of bh1 (B(h) =
--   -inf times a zero residual) and of predict_x0 = false (0 * inf) is NaN, a last step of
--   order >= 2 (lower_order_final = false) divides by rk = 0 (infinite values); "trailing" spacing gives N + 1 timesteps for
--   some N (61 of 1000: numpy arange's length); before set_timesteps add_noise indexes the
--   training sigmas (ascending) with a timestep's position in 999..0 (descending); explicit
--   sigmas are shifted by flow_shift like the default ones.
-- * Deviations: a timestep that is not in the schedule is an error (diffusers silently takes the
--   last index); use_beta_sigmas (scipy's beta ppf) is not implemented (an error); config values
--   are checked at construction (diffusers checks some only when set_timesteps / step use them);
--   solver_p may be a Lua scheduler object (its step(model_output, t, sample) returns the sample)
--   but is not written by save_pretrained; step() returns prev_sample itself, not a table.
local json = require "nemo.json"
local class = require "nemo.class"
local common = require "nemo.schedulers.common"
local ffi = require "ffi"

local M = {}
M.DIFFUSERS_VERSION = "0.40.0.dev0"   -- written into a saved scheduler_config.json
M.CONFIG_NAME = "scheduler_config.json"
local NAME = "UniPCMultistepScheduler"

local function tensor_lib() return require "nemo.tensor" end

-- ==== float helpers ====

for _, decl in ipairs { "double expm1(double);", "double log(double);", "double exp(double);",
                        "double cos(double);", "double pow(double, double);", "double rint(double);",
                        "float fmaf(float, float, float);", "double fma(double, double, double);" } do
    pcall(ffi.cdef, decl)
end
local C = ffi.C

-- f32(x): the float32 nearest to x; f64: the identity (common.lua)
local f32, f64 = common.f32, common.f64
M._f32 = f32
local function flog(x) return f32(C.log(x)) end        -- float32 log of a float32 value
local function fexpm1(x) return f32(C.expm1(x)) end    -- float32 expm1
local function fmaf(a, b, c) return C.fmaf(a, b, c) end -- float32 a*b + c, one rounding
local function rint(x) return C.rint(x) end            -- numpy round(): half to even
local function trunc(x) if x >= 0 then return math.floor(x) end return math.ceil(x) end

-- numpy.linspace(start, stop, num) in float64, operation for operation (common.lua)
local linspace = common.linspace
M._linspace = linspace

-- torch.linspace(start, end, steps, dtype=float32) as its CPU kernel computes it: start and end
-- rounded to float32, step = (end - start) / (steps - 1) in float32, the first half
-- start + step * i and the second end - step * (steps - 1 - i), each one fused multiply-add.
local function torch_linspace_f32(start, stop, steps)
    local a, b = f32(start), f32(stop)
    if steps == 1 then return {a} end
    local step = f32(f32(b - a) / f32(steps - 1))
    local half = math.floor(steps / 2)
    local out = {}
    for i = 0, steps - 1 do
        if i < half then out[i + 1] = fmaf(step, i, a)
        else out[i + 1] = fmaf(-step, steps - 1 - i, b) end
    end
    return out
end
M._torch_linspace_f32 = torch_linspace_f32

-- a value rounded to a tensor dtype (float32 / float64 here; the half types through a tensor)
local function rounder(dtype)
    if dtype == "float64" then return f64 end
    if dtype == "float32" then return f32 end
    return function(v)
        return tensor_lib().tensor({f32(v)}, {dtype = dtype}):item()
    end
end

-- c * t for a float32 coefficient c (a 0-dim float32 tensor in diffusers) written first: torch
-- casts it to t's dtype when that is a half type (bfloat16 / float16), so the product is of two
-- bfloat16 values; t * c and t / c keep c in float32 (its reduced-float scalar path), which
-- nemo's tensor-number ops always do.
local function smul(c, t)
    local dt = t.dtype
    if dt == "bfloat16" or dt == "float16" then c = rounder(dt)(c) end
    return c * t
end

-- ==== the training noise schedule ====

-- betas_for_alpha_bar(T, max_beta=0.999, "cosine") in Python float math, then float32
local function betas_for_alpha_bar(T, max_beta)
    max_beta = max_beta or 0.999
    local function abar(t) return C.pow(C.cos((t + 0.008) / 1.008 * math.pi / 2), 2) end
    local out = {}
    for i = 0, T - 1 do
        local t1, t2 = i / T, (i + 1) / T
        out[i + 1] = f32(math.min(1 - abar(t2) / abar(t1), max_beta))
    end
    return out
end
M._betas_for_alpha_bar = betas_for_alpha_bar

-- cumprod of float32 values as torch's CPU kernel: accumulated in float64, stored as float32
local function cumprod_f32(a)
    local out, acc = {}, 1.0
    for i = 1, #a do acc = acc * a[i]; out[i] = f32(acc) end
    return out
end

-- rescale_zero_terminal_snr(betas) in float32 (diffusers' Algorithm 1 of 2305.08891)
local function rescale_zero_terminal_snr(betas)
    local n = #betas
    local al = {}
    for i = 1, n do al[i] = f32(1 - betas[i]) end
    local ac = cumprod_f32(al)
    local s = {}
    for i = 1, n do s[i] = f32(math.sqrt(ac[i])) end
    local s0, sT = s[1], s[n]
    local scale = f32(s0 / f32(s0 - sT))
    local bar = {}
    for i = 1, n do
        local v = f32(f32(s[i] - sT) * scale)
        bar[i] = f32(v * v)
    end
    local out = {}
    out[1] = f32(1 - bar[1])
    for i = 2, n do out[i] = f32(1 - f32(bar[i] / bar[i - 1])) end
    return out
end
M._rescale_zero_terminal_snr = rescale_zero_terminal_snr

-- ==== config ====

-- diffusers' __init__ arguments and defaults, in its order
M.CONFIG_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "solver_order",
    "prediction_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "predict_x0", "solver_type",
    "lower_order_final", "disable_corrector", "solver_p", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "use_flow_sigmas", "flow_shift", "timestep_spacing", "steps_offset", "final_sigmas_type",
    "rescale_betas_zero_snr", "use_dynamic_shifting", "time_shift_type", "sigma_min", "sigma_max", "shift_terminal"}
M.DEFAULTS = {num_train_timesteps = 1000, beta_start = 0.0001, beta_end = 0.02, beta_schedule = "linear",
    trained_betas = nil, solver_order = 2, prediction_type = "epsilon", thresholding = false,
    dynamic_thresholding_ratio = 0.995, sample_max_value = 1.0, predict_x0 = true, solver_type = "bh2",
    lower_order_final = true, disable_corrector = {}, solver_p = nil, use_karras_sigmas = false,
    use_exponential_sigmas = false, use_beta_sigmas = false, use_flow_sigmas = false, flow_shift = 1.0,
    timestep_spacing = "linspace", steps_offset = 0, final_sigmas_type = "zero", rescale_betas_zero_snr = false,
    use_dynamic_shifting = false, time_shift_type = "exponential", sigma_min = nil, sigma_max = nil,
    shift_terminal = nil}
-- kind of each key (common.WANT names them); a "?" kind may be null / absent
local KIND = {num_train_timesteps = "count", beta_start = "number", beta_end = "number", beta_schedule = "string",
    trained_betas = "numbers?", solver_order = "count", prediction_type = "string", thresholding = "boolean",
    dynamic_thresholding_ratio = "number", sample_max_value = "number", predict_x0 = "boolean",
    solver_type = "string", lower_order_final = "boolean", disable_corrector = "integers", solver_p = "scheduler?",
    use_karras_sigmas = "boolean", use_exponential_sigmas = "boolean", use_beta_sigmas = "boolean",
    use_flow_sigmas = "boolean", flow_shift = "number", timestep_spacing = "string", steps_offset = "integer",
    final_sigmas_type = "string", rescale_betas_zero_snr = "boolean", use_dynamic_shifting = "boolean",
    time_shift_type = "string", sigma_min = "number?", sigma_max = "number?", shift_terminal = "number?"}
local ENUMS = {
    beta_schedule = {"linear", "scaled_linear", "squaredcos_cap_v2"},
    prediction_type = {"epsilon", "sample", "v_prediction", "flow_prediction"},
    timestep_spacing = {"linspace", "leading", "trailing"},
    final_sigmas_type = {"zero", "sigma_min"},
}
-- solver types diffusers maps to bh2 (registered into the config as "bh2")
local BH2_ALIASES = {midpoint = true, heun = true, logrho = true}

-- in_list(v, list): v is one of list; quoted(list): 'a', 'b' for a message (common.lua)
local in_list, quoted = common.in_list, common.quoted

-- check_config(tbl, {unknown = "error"|"warn"}) -> a full config table (defaults filled in).
-- Keys starting with "_" (_class_name, _diffusers_version, _use_default_values) are metadata and
-- skipped; other unknown keys are an error (the constructor, from_config) or a warning
-- (from_pretrained: diffusers ignores them). Values are checked here, at construction, also
-- those diffusers only checks when it uses them (set_timesteps, step): each one's kind by
-- common.check_keys, the rest here.
local function check_config(tbl, opts, level)
    level = (level or 1) + 1
    local cfg = common.check_keys(NAME, M, KIND, tbl, opts, level + 1)
    for k, list in pairs(ENUMS) do
        if not in_list(cfg[k], list) and not (k == "beta_schedule" and cfg.trained_betas) then
            error(string.format("%s: config '%s' must be one of %s, got '%s'", NAME, k, quoted(list), cfg[k]), level)
        end
    end
    if cfg.solver_type ~= "bh1" and cfg.solver_type ~= "bh2" then
        if BH2_ALIASES[cfg.solver_type] then
            cfg.solver_type = "bh2"     -- diffusers: register_to_config(solver_type="bh2")
        else
            error(string.format("%s: solver_type '%s' is not implemented (expected 'bh1' or 'bh2'; 'midpoint', " ..
                "'heun' and 'logrho' mean 'bh2')", NAME, cfg.solver_type), level)
        end
    end
    if not cfg.predict_x0 and cfg.prediction_type == "flow_prediction" then
        error(NAME .. ": prediction_type 'flow_prediction' needs predict_x0 = true (with predict_x0 = false it must " ..
            "be one of 'epsilon', 'sample' or 'v_prediction')", level)
    end
    local n = (cfg.use_karras_sigmas and 1 or 0) + (cfg.use_exponential_sigmas and 1 or 0) + (cfg.use_beta_sigmas and 1 or 0)
    if n > 1 then
        error(NAME .. ": only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used", level)
    end
    if cfg.use_beta_sigmas then
        error(NAME .. ": use_beta_sigmas = true (beta sigmas, scipy's beta ppf) is not supported yet in nemo-lua; " ..
            "use the default, Karras or exponential sigmas", level)
    end
    if cfg.shift_terminal ~= nil and not cfg.use_flow_sigmas then
        error(NAME .. ": shift_terminal is only supported when use_flow_sigmas = true", level)
    end
    if cfg.use_dynamic_shifting and cfg.time_shift_type ~= "exponential" and cfg.time_shift_type ~= "linear" then
        error(string.format("%s: config 'time_shift_type' must be 'exponential' or 'linear', got '%s'", NAME,
            cfg.time_shift_type), level)
    end
    if cfg.num_train_timesteps < 2 or (cfg.trained_betas and #cfg.trained_betas < 2) then
        error(NAME .. ": the schedules need at least 2 training timesteps (num_train_timesteps, trained_betas)", level)
    end
    return cfg
end
M.check_config = check_config

-- ==== the scheduler ====

local Scheduler = class("nemo.schedulers.UniPCMultistepScheduler")
M.UniPCMultistepScheduler = Scheduler
Scheduler.order = 1
Scheduler.config_name = M.CONFIG_NAME

local function f32_tensor(list, device)
    return tensor_lib().tensor(list, {dtype = "float32", device = device})
end

-- (alpha_t, sigma_t) of a sigma, every operation rounded by R: flow sigmas alpha = 1 - sigma;
-- VP sigmas alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha (diffusers'
-- _sigma_to_alpha_sigma_t on a tensor of the rounding's dtype)
function Scheduler:_sigma_to_alpha_sigma_t(sigma, R)
    R = R or f32
    if self.config.use_flow_sigmas then return R(1 - sigma), sigma end
    local a = R(sigma * sigma)
    a = R(a + 1)
    a = R(math.sqrt(a))
    a = R(1 / a)
    return a, R(sigma * a)
end

-- UniPCMultistepScheduler(cfg[, opts]): cfg holds diffusers' keys (missing ones take the
-- defaults); an unknown key or a bad value is an error naming it. Builds the training tables as
-- diffusers' __init__ does.
function Scheduler:__init(cfg, opts)
    cfg = check_config(cfg, opts, 3)
    self.config = cfg
    local T = cfg.num_train_timesteps
    local betas
    if cfg.trained_betas then
        betas = {}
        for i, v in ipairs(cfg.trained_betas) do betas[i] = f32(v) end
    elseif cfg.beta_schedule == "linear" then
        betas = torch_linspace_f32(cfg.beta_start, cfg.beta_end, T)
    elseif cfg.beta_schedule == "scaled_linear" then
        betas = torch_linspace_f32(C.pow(cfg.beta_start, 0.5), C.pow(cfg.beta_end, 0.5), T)
        for i = 1, #betas do betas[i] = f32(betas[i] * betas[i]) end
    else
        betas = betas_for_alpha_bar(T)
    end
    if cfg.rescale_betas_zero_snr then betas = rescale_zero_terminal_snr(betas) end
    local n = #betas
    local alphas = {}
    for i = 1, n do alphas[i] = f32(1 - betas[i]) end
    local ac = cumprod_f32(alphas)
    if cfg.rescale_betas_zero_snr then ac[n] = 2 ^ -24 end
    local at, st, lt, sig = {}, {}, {}, {}
    for i = 1, n do
        at[i] = f32(math.sqrt(ac[i]))
        st[i] = f32(math.sqrt(f32(1 - ac[i])))
        lt[i] = f32(flog(at[i]) - flog(st[i]))
        sig[i] = f32(math.sqrt(f32(f32(1 - ac[i]) / ac[i])))
    end
    self._betas, self._alphas_cumprod, self._train_sigmas = betas, ac, sig
    self.betas, self.alphas, self.alphas_cumprod = f32_tensor(betas), f32_tensor(alphas), f32_tensor(ac)
    self.alpha_t, self.sigma_t, self.lambda_t = f32_tensor(at), f32_tensor(st), f32_tensor(lt)
    self.init_noise_sigma = 1.0
    self.predict_x0 = cfg.predict_x0
    self.disable_corrector = cfg.disable_corrector
    self.solver_p = cfg.solver_p
    self.num_inference_steps = nil
    -- np.linspace(0, T-1, T, dtype=float32)[::-1]: the integers T-1 .. 0, float32
    local ts = {}
    for i = 1, T do ts[i] = T - i end
    self._ts, self._sig = ts, sig
    self.timesteps = f32_tensor(ts)
    self.sigmas = f32_tensor(sig)
    self.model_outputs, self.timestep_list = {}, {}
    self.lower_order_nums = 0
    self.last_sample = nil
    self.this_order = nil
    self._step_index, self._begin_index = nil, nil
end

-- from_config(tbl[, overrides]): a scheduler from a config table (diffusers' keys; "_"-keys
-- skipped), overrides replacing keys of it (diffusers' from_config(config, flow_shift=5.0)).
function Scheduler.from_config(tbl, more, more2)
    if rawequal(tbl, Scheduler) then tbl, more = more, more2 end   -- Scheduler:from_config(...)
    if tbl ~= nil and type(tbl) ~= "table" then
        error(NAME .. ".from_config: expected a config table, got " .. type(tbl), 2)
    end
    if more ~= nil then
        if type(more) ~= "table" then error(NAME .. ".from_config: overrides must be a table, got " .. type(more), 2) end
        local merged = {}
        for k, v in pairs(tbl or {}) do merged[k] = v end
        for k, v in pairs(more) do merged[k] = v end
        tbl = merged
    end
    local ok, s = pcall(Scheduler, tbl)
    if not ok then error(s, 2) end
    return s
end

-- from_pretrained(path[, {subfolder=, revision=}]): path is a scheduler_config.json file, a
-- folder holding one, a pipeline folder (its scheduler/ subfolder), or an "org/name" id in the
-- Hugging Face cache; unknown keys are skipped with a warning (common.from_pretrained).
Scheduler.from_pretrained = common.from_pretrained(Scheduler, NAME, M)

-- save_config(folder) / save_pretrained(folder): folder/scheduler_config.json as diffusers
-- writes it (every key, sorted, _class_name, _diffusers_version, null for unset values); a
-- solver_p object cannot be written.
Scheduler.save_pretrained = common.save_pretrained(NAME, M, function(self)
    if self.config.solver_p ~= nil then
        error(NAME .. ":save_pretrained: solver_p (a scheduler object) cannot be written to a JSON config", 3)
    end
end)
Scheduler.save_config = Scheduler.save_pretrained

function Scheduler:__tostring()
    local c = self.config
    local s = string.format("%s(%s, order %d %s, %s", NAME, c.use_flow_sigmas and
        string.format("flow sigmas, flow_shift=%s", tostring(c.flow_shift)) or
        string.format("%s betas", c.trained_betas and "trained" or c.beta_schedule), c.solver_order, c.solver_type,
        c.prediction_type)
    if not c.predict_x0 then s = s .. ", predict_x0=false" end
    if c.use_karras_sigmas then s = s .. ", Karras" end
    if c.use_exponential_sigmas then s = s .. ", exponential" end
    if c.use_dynamic_shifting then s = s .. ", dynamic " .. c.time_shift_type end
    if c.shift_terminal then s = s .. ", shift_terminal=" .. tostring(c.shift_terminal) end
    if self.num_inference_steps then s = s .. string.format(", %d steps", self.num_inference_steps) end
    return s .. ")"
end

function Scheduler:__len() return self.config.num_train_timesteps end

-- step_index() / begin_index() / set_begin_index([i]): as diffusers (common.lua)
Scheduler.step_index = common.step_index
Scheduler.begin_index = common.begin_index
Scheduler.set_begin_index = common.set_begin_index

-- number_list(v, "who: what"): a Lua list of numbers from a list or a 1-D tensor (nil stays nil)
local number_list = common.number_list

-- time_shift(mu, sigma, t): the exponential or linear shift of a number or a list (float64)
function Scheduler:time_shift(mu, sigma, t)
    local function one(x)
        local y = 1 / x - 1
        if sigma ~= 1 then y = C.pow(y, sigma) end
        if self.config.time_shift_type == "exponential" then
            local e = C.exp(mu)
            return e / (e + y)
        elseif self.config.time_shift_type == "linear" then
            return mu / (mu + y)
        end
        error("time_shift: time_shift_type must be 'exponential' or 'linear', got '" ..
            tostring(self.config.time_shift_type) .. "'", 3)
    end
    if type(t) == "number" then return one(t) end
    local out = {}
    for i, v in ipairs(number_list(t, "time_shift: t")) do out[i] = one(v) end
    return out
end

-- stretch_shift_to_terminal(list): the schedule stretched so that it ends at shift_terminal
function Scheduler:stretch_shift_to_terminal(t)
    local omz = {}
    for i = 1, #t do omz[i] = 1 - t[i] end
    local scale = omz[#t] / (1 - self.config.shift_terminal)
    local out = {}
    for i = 1, #t do out[i] = 1 - omz[i] / scale end
    return out
end

-- _sigma_to_t(sigma, log_sigmas, log_f32): the fractional training timestep of a sigma
-- (interpolation in log sigma between the two training sigmas around it), as numpy computes it;
-- log_f32: the log sigmas are float32 (their differences rounded to float32)
local function sigma_to_t(sigma, log_sigmas, log_f32)
    local ls = C.log(math.max(sigma, 1e-10))
    local n = #log_sigmas
    local low = 0      -- 0-based: the last index with log_sigmas <= ls (0 when none)
    for j = 1, n do if ls - log_sigmas[j] >= 0 then low = j - 1 end end
    if low > n - 2 then low = n - 2 end
    local lo, hi = log_sigmas[low + 1], log_sigmas[low + 2]
    local den = lo - hi
    if log_f32 then den = f32(den) end
    local w = (lo - ls) / den
    if w < 0 then w = 0 elseif w > 1 then w = 1 end   -- np.clip (NaN stays NaN)
    return (1 - w) * low + w * (low + 1)
end

-- numpy.interp(x, arange(n), fp) for one x
local function interp(x, fp)
    local n = #fp
    if x ~= x then return x end
    if x <= 0 then return fp[1] end
    if x >= n - 1 then return fp[n] end
    local j = math.floor(x)
    if x == j then return fp[j + 1] end
    return (fp[j + 2] - fp[j + 1]) * (x - j) + fp[j + 1]   -- the slope over a spacing of 1
end

local SET_OPTS = {device = true, sigmas = true, mu = true}

-- set_timesteps(num_inference_steps[, {device=, sigmas=, mu=}]): the inference schedule, as
-- diffusers. sigmas (use_flow_sigmas only): N sigmas (a Lua list or a tensor, taken as float64
-- values like a numpy array), shifted like the default ones; mu: required with
-- use_dynamic_shifting. Resets the multistep state.
function Scheduler:set_timesteps(num_inference_steps, opts)
    local Tensor = tensor_lib()
    if type(num_inference_steps) == "table" and opts == nil and not Tensor.is_tensor(num_inference_steps) then
        opts, num_inference_steps = num_inference_steps, nil      -- set_timesteps{sigmas = ...}
    end
    opts = opts or {}
    if type(opts) ~= "table" then error("set_timesteps: opts must be a table", 2) end
    for k in pairs(opts) do
        if not SET_OPTS[k] then
            error("set_timesteps: unknown option '" .. tostring(k) .. "' (known: device, sigmas, mu)", 2)
        end
    end
    local cfg = self.config
    local mu = opts.mu
    if mu == json.null then mu = nil end
    if mu ~= nil and (type(mu) ~= "number" or mu ~= mu) then
        error("set_timesteps: mu must be a number, got " .. tostring(mu), 2)
    end
    if cfg.use_dynamic_shifting and mu == nil then
        error("set_timesteps: `mu` must be passed when `use_dynamic_shifting` is set to be `True`", 2)
    end
    local sig_in = number_list(opts.sigmas, "set_timesteps: sigmas")
    local N = num_inference_steps
    if sig_in then
        if not cfg.use_flow_sigmas then
            error("set_timesteps: passing `sigmas` is only supported when `use_flow_sigmas=True`", 2)
        end
        N = #sig_in
    end
    if type(N) ~= "number" or N < 1 or N % 1 ~= 0 then
        error("set_timesteps: num_inference_steps must be a positive integer, got " .. tostring(N), 2)
    end
    local T = cfg.num_train_timesteps

    -- the timesteps of the spacing (numpy float64, rounded half to even, int64)
    local ts = {}
    if cfg.timestep_spacing == "linspace" then
        local l = linspace(0, T - 1, N + 1)
        for i = 1, N do ts[i] = rint(l[N + 2 - i]) end
    elseif cfg.timestep_spacing == "leading" then
        local ratio = math.floor(T / (N + 1))
        for i = 1, N do ts[i] = (N + 1 - i) * ratio + cfg.steps_offset end
    else   -- trailing: np.arange(T, 0, -T/N).round() - 1
        local step = -(T / N)
        local len = math.ceil((0 - T) / step)
        local v1 = T + step
        local delta = v1 - T
        for i = 0, len - 1 do
            local v = i == 0 and T or (i == 1 and v1 or T + i * delta)
            ts[i + 1] = rint(v) - 1
        end
    end

    -- the sigmas (float64 values; float32 at the end) and, for some paths, new timesteps
    local final = cfg.final_sigmas_type
    local sig
    local train_sig = self._train_sigmas
    if cfg.use_karras_sigmas or cfg.use_exponential_sigmas then
        local src, src_f32 = sig_in, false
        if src == nil then src, src_f32 = train_sig, true end
        local log_sigmas = {}
        for i = 1, #src do log_sigmas[i] = src_f32 and flog(src[i]) or C.log(src[i]) end
        local smin = cfg.sigma_min ~= nil and cfg.sigma_min or src[1]      -- flipped: in_sigmas[-1]
        local smax = cfg.sigma_max ~= nil and cfg.sigma_max or src[#src]   -- flipped: in_sigmas[0]
        sig = {}
        if cfg.use_karras_sigmas then
            local rho = 7.0
            local ramp = linspace(0, 1, N)
            local min_inv, max_inv = C.pow(smin, 1 / rho), C.pow(smax, 1 / rho)
            for i = 1, N do sig[i] = C.pow(max_inv + ramp[i] * (min_inv - max_inv), rho) end
            ts = {}
            if cfg.use_flow_sigmas then
                for i = 1, N do sig[i] = sig[i] / (sig[i] + 1); ts[i] = trunc(sig[i] * T) end
            else
                for i = 1, N do ts[i] = rint(sigma_to_t(sig[i], log_sigmas, src_f32)) end
            end
        else
            local l = linspace(C.log(smax), C.log(smin), N)
            ts = {}
            for i = 1, N do
                sig[i] = C.exp(l[i])
                ts[i] = trunc(sigma_to_t(sig[i], log_sigmas, src_f32))
            end
        end
        sig[N + 1] = final == "sigma_min" and sig[N] or 0
    elseif cfg.use_flow_sigmas then
        if sig_in then sig = sig_in
        else
            local l = linspace(1, 1 / T, N + 1)
            sig = {}
            for i = 1, N do sig[i] = l[i] end
        end
        if cfg.use_dynamic_shifting then
            sig = self:time_shift(mu, 1.0, sig)
        else
            local s = cfg.flow_shift
            local out = {}
            for i = 1, N do out[i] = s * sig[i] / (1 + (s - 1) * sig[i]) end
            sig = out
        end
        if cfg.shift_terminal and cfg.shift_terminal ~= 0 then sig = self:stretch_shift_to_terminal(sig) end
        if math.abs(sig[1] - 1) < 1e-6 then sig[1] = sig[1] - 1e-6 end
        ts = {}
        for i = 1, N do ts[i] = trunc(sig[i] * T) end
        sig[N + 1] = final == "sigma_min" and sig[N] or 0
    else
        sig = {}
        for i = 1, #ts do sig[i] = interp(ts[i], train_sig) end
        if final == "sigma_min" then
            local a0 = self._alphas_cumprod[1]
            sig[#ts + 1] = f32(math.sqrt(f32(f32(1 - a0) / a0)))
        else
            sig[#ts + 1] = 0
        end
    end
    for i = 1, #ts do
        if ts[i] ~= ts[i] or math.abs(ts[i]) == math.huge then
            error(string.format("set_timesteps: the schedule of %d steps has a non-finite timestep (sigmas %s)", N,
                table.concat(sig, ", ")), 2)
        end
    end
    local sig32 = {}
    for i = 1, #sig do sig32[i] = f32(sig[i]) end
    self._ts, self._sig = ts, sig32
    self.sigmas = f32_tensor(sig32)
    self.timesteps = Tensor.tensor(ts, {dtype = "int64", device = opts.device})
    self.num_inference_steps = #ts
    self.model_outputs = {}
    self.lower_order_nums = 0
    self.last_sample = nil
    if self.solver_p then self.solver_p:set_timesteps(self.num_inference_steps, {device = opts.device}) end
    self._step_index, self._begin_index = nil, nil
    return self
end

-- index_for_timestep(t[, schedule]): the 0-based index of t (a number or a one-element tensor,
-- int64 as scheduler.timesteps, or a float) in the schedule (scheduler.timesteps unless given):
-- its second match when there are several. Not in the schedule: an error.
Scheduler.index_for_timestep = common.index_for_timestep(NAME, {round = f64, schedule = "index_for_timestep: schedule"})
Scheduler._init_step_index = common._init_step_index

-- _threshold_sample(x0): diffusers' dynamic thresholding: per sample, s = the
-- dynamic_thresholding_ratio quantile of |x0| (torch.quantile, linear), clamped to
-- [1, sample_max_value]; x0 clamped to [-s, s] and divided by s. The quantile is taken on the host.
function Scheduler:_threshold_sample(sample)
    local Tensor = tensor_lib()
    local dtype = sample.dtype
    local shape = sample.shape
    local B = shape[1]
    local x = sample
    if dtype ~= "float32" and dtype ~= "float64" then x = x:to{dtype = "float32"} end
    local R = dtype == "float64" and f64 or f32
    x = x:reshape{B, -1}
    local vals = x:abs():detach():to{device = "cpu"}:double():contiguous():tolist()
    local q = R(self.config.dynamic_thresholding_ratio)
    local smax = R(self.config.sample_max_value)
    local s = {}
    for b = 1, B do
        local row = vals[b]
        local n = #row
        local hasnan = false
        for i = 1, n do if row[i] ~= row[i] then hasnan = true end end
        local v
        if hasnan then v = 0 / 0
        else
            table.sort(row)
            -- the rank q * (n - 1) in float64 (q in the sample's dtype), its fraction rounded to
            -- the dtype, then torch's lerp: fma(w, c - a, a), or fma(w - 1, c - a, c) for |w| >= 0.5
            local rank = q * (n - 1)
            local lo, hi = math.floor(rank), math.ceil(rank)
            local w = R(rank - lo)
            local a, c = row[lo + 1], row[hi + 1]
            local d = R(c - a)
            local fma = R == f32 and fmaf or C.fma
            v = math.abs(w) < 0.5 and fma(w, d, a) or fma(R(w - 1), d, c)
        end
        if v == v then
            if v < 1 then v = 1 end
            if v > smax then v = smax end
        end
        s[b] = {v}
    end
    local st = Tensor.tensor(s, {dtype = x.dtype, device = x.device})
    local y = x:clamp(-st, st) / st
    y = y:reshape(shape)
    if y.dtype ~= dtype then y = y:to{dtype = dtype} end
    return y
end

local function need_step_index(self, who)
    if self._step_index == nil then
        error(who .. ": the step index is not set; call step() (or set_begin_index) after set_timesteps", 3)
    end
end

-- convert_model_output(model_output, sample): what the solver works on: the predicted x0
-- (predict_x0) or the predicted noise, at the current step's sigma.
function Scheduler:convert_model_output(model_output, sample)
    need_step_index(self, "convert_model_output")
    local cfg = self.config
    local sigma = self._sig[self._step_index + 1]
    local alpha_t, sigma_t = self:_sigma_to_alpha_sigma_t(sigma)
    local pt = cfg.prediction_type
    if self.predict_x0 then
        local x0
        if pt == "epsilon" then x0 = (sample - smul(sigma_t, model_output)) / alpha_t
        elseif pt == "sample" then x0 = model_output
        elseif pt == "v_prediction" then x0 = smul(alpha_t, sample) - smul(sigma_t, model_output)
        elseif pt == "flow_prediction" then x0 = sample - smul(sigma, model_output)
        else
            error(string.format("prediction_type given as %s must be one of `epsilon`, `sample`, `v_prediction`, " ..
                "or `flow_prediction` for the UniPCMultistepScheduler.", tostring(pt)), 2)
        end
        if cfg.thresholding then x0 = self:_threshold_sample(x0) end
        return x0
    end
    if pt == "epsilon" then return model_output
    elseif pt == "sample" then return (sample - smul(alpha_t, model_output)) / sigma_t
    elseif pt == "v_prediction" then return smul(alpha_t, model_output) + smul(sigma_t, sample) end
    error(string.format("prediction_type given as %s must be one of `epsilon`, `sample`, or `v_prediction` for " ..
        "the UniPCMultistepScheduler.", tostring(pt)), 2)
end

-- x^(e) of a float32 value as torch.pow(tensor, e): 0 -> 1, 1 -> x, 2 -> x*x, 3 -> x*x*x
local function powi(x, e)
    if e == 0 then return 1 end
    if e == 1 then return x end
    if e == 2 then return f32(x * x) end
    if e == 3 then return f32(f32(x * x) * x) end
    return f32(C.pow(x, e))
end

-- A x = b in float32: LU with partial pivoting and fused updates (the factors bitwise as torch's
-- CPU (MKL) LU, checked to 4 x 4), the unit lower solve by columns, the upper solve by rows
-- times the diagonal's reciprocal: bitwise as torch.linalg.solve for 2 x 2 (UniPC's orders 2
-- and 3 predictor, order 2 corrector); from 3 x 3 on MKL's triangular solves round differently
-- (about one ulp in the rhos).
local function solve_f32(A, b)
    local n = #b
    local a, y = {}, {}
    for i = 1, n do
        a[i] = {}
        for j = 1, n do a[i][j] = A[i][j] end
        y[i] = b[i]
    end
    for k = 1, n do
        local p, best = k, math.abs(a[k][k])
        for i = k + 1, n do
            if math.abs(a[i][k]) > best then p, best = i, math.abs(a[i][k]) end
        end
        a[k], a[p] = a[p], a[k]
        y[k], y[p] = y[p], y[k]
        if n - k >= 2 then      -- two or more rows below: times the reciprocal; one: divided
            local r = f32(1 / a[k][k])
            for i = k + 1, n do a[i][k] = f32(a[i][k] * r) end
        else
            for i = k + 1, n do a[i][k] = f32(a[i][k] / a[k][k]) end
        end
        for i = k + 1, n do
            for j = k + 1, n do a[i][j] = fmaf(-a[i][k], a[k][j], a[i][j]) end
        end
    end
    for j = 1, n do
        for i = j + 1, n do y[i] = fmaf(-a[i][j], y[j], y[i]) end
    end
    for i = n, 1, -1 do
        for j = i + 1, n do y[i] = fmaf(-a[i][j], y[j], y[i]) end
        y[i] = f32(y[i] * f32(1 / a[i][i]))
    end
    return y
end
M._solve_f32 = solve_f32

-- the coefficients shared by the predictor and the corrector: from sigma index it (target),
-- is0 (current) and the previous ones is0 - 1, ..., is0 - (order - 1) (0-based), with the model
-- outputs m0 (newest) and older ones: h, hh, h_phi_1, B_h, rks, D1s, R, b (float32 numbers)
function Scheduler:_bh_terms(it, is0, order, m0)
    local sig = self._sig
    local alpha_t, sigma_t = self:_sigma_to_alpha_sigma_t(sig[it + 1])
    local alpha_s0, sigma_s0 = self:_sigma_to_alpha_sigma_t(sig[is0 + 1])
    local lambda_t = f32(flog(alpha_t) - flog(sigma_t))
    local lambda_s0 = f32(flog(alpha_s0) - flog(sigma_s0))
    local h = f32(lambda_t - lambda_s0)
    local K = self.config.solver_order
    local rks, D1s = {}, {}
    for i = 1, order - 1 do
        local si = is0 - i
        if si < 0 then
            error(string.format("%s: order %d needs sigma index %d (the multistep history is shorter)", NAME, order, si), 3)
        end
        local mi = self.model_outputs[K - i]
        local alpha_si, sigma_si = self:_sigma_to_alpha_sigma_t(sig[si + 1])
        local lambda_si = f32(flog(alpha_si) - flog(sigma_si))
        local rk = f32(f32(lambda_si - lambda_s0) / h)
        rks[i] = rk
        D1s[i] = (mi - m0) / rk
    end
    rks[order] = 1
    local hh = self.predict_x0 and f32(-h) or h
    local h_phi_1 = fexpm1(hh)
    local h_phi_k = f32(f32(h_phi_1 / hh) - 1)
    local factorial = 1
    local B_h
    if self.config.solver_type == "bh1" then B_h = hh
    elseif self.config.solver_type == "bh2" then B_h = fexpm1(hh)
    else error(NAME .. ": solver_type must be 'bh1' or 'bh2', got '" .. tostring(self.config.solver_type) .. "'", 3) end
    local R, b = {}, {}
    for i = 1, order do
        R[i] = {}
        for k = 1, order do R[i][k] = powi(rks[k], i - 1) end
        b[i] = f32(f32(h_phi_k * factorial) / B_h)
        factorial = factorial * (i + 1)
        h_phi_k = f32(f32(h_phi_k / hh) - f32(1 / factorial))
    end
    return {alpha_t = alpha_t, sigma_t = sigma_t, alpha_s0 = alpha_s0, sigma_s0 = sigma_s0, h_phi_1 = h_phi_1,
            B_h = B_h, rks = rks, D1s = D1s, R = R, b = b}
end

-- sum_k rhos[k] * D1s[k] (einsum "k,bkc...->bc..."), as torch's CPU einsum computes it: float32
-- fused, acc = fma(rhos[k], D1s[k], acc) (through float64: the product is exact there, the
-- sum is rounded to float64 and then to float32, which agrees with one float32 rounding except
-- on exceedingly rare double-rounding ties); float64 multiply then add; half types in float32,
-- rounded at the end.
local function weighted_sum(rhos, D1s, n)
    local dt = D1s[1].dtype
    if n == 1 then return smul(rhos[1], D1s[1]) end
    local acc
    if dt == "float32" then
        acc = rhos[1] * D1s[1]
        for k = 2, n do acc = (rhos[k] * D1s[k]:double() + acc:double()):float() end
    elseif dt == "float64" then
        acc = rhos[1] * D1s[1]
        for k = 2, n do acc = acc + rhos[k] * D1s[k] end
    else
        acc = rhos[1] * D1s[1]:float()
        for k = 2, n do acc = acc + rhos[k] * D1s[k]:float() end
        acc = acc:to{dtype = dt}
    end
    return acc
end

-- x_t_ = (sigma_t / sigma_s0) x - alpha_t h_phi_1 m0 (predict_x0), or
-- (alpha_t / alpha_s0) x - sigma_t h_phi_1 m0; and the factor of the B(h) term
local function base_update(self, c, x, m0)
    if self.predict_x0 then
        return smul(f32(c.sigma_t / c.sigma_s0), x) - smul(f32(c.alpha_t * c.h_phi_1), m0), f32(c.alpha_t * c.B_h)
    end
    return smul(f32(c.alpha_t / c.alpha_s0), x) - smul(f32(c.sigma_t * c.h_phi_1), m0), f32(c.sigma_t * c.B_h)
end

-- multistep_uni_p_bh_update(model_output, sample, order): the UniP predictor from the current
-- step to the next (solver_p's step when one is set).
function Scheduler:multistep_uni_p_bh_update(model_output, sample, order)
    need_step_index(self, "multistep_uni_p_bh_update")
    local K = self.config.solver_order
    local m0 = self.model_outputs[K]
    if m0 == nil then error("multistep_uni_p_bh_update: no model output yet (call step)", 2) end
    local x = sample
    if self.solver_p then return self.solver_p:step(model_output, self.timestep_list[K], x) end
    local si = self._step_index
    local c = self:_bh_terms(si + 1, si, order, m0)
    local Rx = rounder(x.dtype)
    local x_t_, coef = base_update(self, c, x, m0)
    local x_t
    if order >= 2 then
        local rhos
        if order == 2 then rhos = {0.5}
        else
            local A, bb = {}, {}
            for i = 1, order - 1 do
                A[i] = {}
                for k = 1, order - 1 do A[i][k] = c.R[i][k] end
                bb[i] = c.b[i]
            end
            rhos = solve_f32(A, bb)
            for k = 1, #rhos do rhos[k] = Rx(rhos[k]) end
        end
        x_t = x_t_ - smul(coef, weighted_sum(rhos, c.D1s, order - 1))
    else
        -- pred_res = 0: x_t_ - coef * 0, which is x_t_ unless coef is infinite (then NaN)
        local z = coef * 0
        x_t = z == z and x_t_ or x_t_ - rounder(x_t_.dtype)(z)
    end
    if x_t.dtype ~= x.dtype then x_t = x_t:to{dtype = x.dtype} end
    return x_t
end

-- multistep_uni_c_bh_update(this_model_output, last_sample, this_sample, order): the UniC
-- corrector of the sample the last predictor made, with the model output at it.
function Scheduler:multistep_uni_c_bh_update(this_model_output, last_sample, this_sample, order)
    need_step_index(self, "multistep_uni_c_bh_update")
    local K = self.config.solver_order
    local m0 = self.model_outputs[K]
    if m0 == nil then error("multistep_uni_c_bh_update: no model output yet (call step)", 2) end
    local x = last_sample
    local si = self._step_index
    local c = self:_bh_terms(si, si - 1, order, m0)
    local Rx = rounder(x.dtype)
    local rhos
    if order == 1 then rhos = {0.5}
    else
        rhos = solve_f32(c.R, c.b)
        for k = 1, #rhos do rhos[k] = Rx(rhos[k]) end
    end
    local x_t_, coef = base_update(self, c, x, m0)
    local D1_t = this_model_output - m0
    local res = smul(rhos[order], D1_t)
    if order >= 2 then res = weighted_sum(rhos, c.D1s, order - 1) + res end
    local x_t = x_t_ - smul(coef, res)
    if x_t.dtype ~= x.dtype then x_t = x_t:to{dtype = x.dtype} end
    return x_t
end

local STEP_OPTS = {return_dict = true}

-- step(model_output, timestep, sample) -> prev_sample: one UniPC step (the corrector of the
-- previous step's prediction, then the predictor). timestep: one of scheduler.timesteps (a
-- number or a one-element tensor).
function Scheduler:step(model_output, timestep, sample, opts)
    local Tensor = tensor_lib()
    if opts ~= nil then
        if type(opts) ~= "table" then error("step: opts must be a table", 2) end
        for k in pairs(opts) do
            if not STEP_OPTS[k] then error("step: unknown option '" .. tostring(k) .. "'", 2) end
        end
    end
    if self.num_inference_steps == nil then
        error("step: number of inference steps is 'None', you need to run 'set_timesteps' after creating the " ..
            "scheduler", 2)
    end
    if not Tensor.is_tensor(model_output) or not Tensor.is_tensor(sample) then
        error("step: model_output and sample must be tensors", 2)
    end
    local ok, t = pcall(common.timestep_number, timestep, "step")
    if not ok then error(t, 2) end
    if self._step_index == nil then
        local iok, err = pcall(self._init_step_index, self, t)
        if not iok then error("step: " .. tostring(err), 2) end
    end
    local si = self._step_index
    if si >= #self._ts then
        error(string.format("step: step index %d is past the end of the schedule (%d timesteps); call " ..
            "set_timesteps before sampling again", si, #self._ts), 2)
    end
    local K = self.config.solver_order
    local disabled = false
    for _, d in ipairs(self.disable_corrector) do if d == si - 1 then disabled = true end end
    local use_corrector = si > 0 and not disabled and self.last_sample ~= nil
    local mc = self:convert_model_output(model_output, sample)
    if use_corrector then
        sample = self:multistep_uni_c_bh_update(mc, self.last_sample, sample, self.this_order)
    end
    for i = 1, K - 1 do
        self.model_outputs[i] = self.model_outputs[i + 1]
        self.timestep_list[i] = self.timestep_list[i + 1]
    end
    self.model_outputs[K] = mc
    self.timestep_list[K] = timestep
    local this_order = K
    if self.config.lower_order_final then this_order = math.min(K, #self._ts - si) end
    self.this_order = math.min(this_order, self.lower_order_nums + 1)
    self.last_sample = sample
    local prev = self:multistep_uni_p_bh_update(model_output, sample, self.this_order)
    if self.lower_order_nums < K then self.lower_order_nums = self.lower_order_nums + 1 end
    self._step_index = si + 1
    return prev
end

-- scale_model_input(sample): sample (UniPC does not scale the model input)
function Scheduler:scale_model_input(sample) return sample end

-- add_noise(original_samples, noise, timesteps) -> alpha_t * original + sigma_t * noise, at the
-- sigma of each timestep (a number, a list or a 1-D tensor: one per sample, or one for all), in
-- the samples' dtype (alpha_t and sigma_t computed in it). With set_begin_index() the begin (or
-- current step) index is used instead, as diffusers does for img2img / inpainting.
function Scheduler:add_noise(original, noise, timesteps)
    local Tensor = tensor_lib()
    if not Tensor.is_tensor(original) then error("add_noise: original_samples must be a tensor", 2) end
    if not Tensor.is_tensor(noise) then error("add_noise: noise must be a tensor", 2) end
    local tvals
    if type(timesteps) == "number" then tvals = {timesteps}
    elseif Tensor.is_tensor(timesteps) then
        tvals = timesteps:detach():to{device = "cpu"}:double():contiguous():reshape{-1}:tolist()
    elseif type(timesteps) == "table" then tvals = number_list(timesteps, "add_noise: timesteps")
    else error("add_noise: timesteps must be a number, a list or a tensor, got " .. type(timesteps), 2) end
    local idx = common.schedule_indices(self, tvals, "add_noise")
    local dtype = original.dtype
    local R = rounder(dtype)
    local av, sv = {}, {}
    for k, j in ipairs(idx) do
        local s = R(self._sig[j + 1])
        av[k], sv[k] = self:_sigma_to_alpha_sigma_t(s, R)
    end
    local shape = {#idx}
    for _ = 2, original:dim() do shape[#shape + 1] = 1 end
    local o = {dtype = dtype, device = original.device}
    local a = Tensor.tensor(av, o):reshape(shape)
    local s = Tensor.tensor(sv, o):reshape(shape)
    return a * original + s * noise
end

return M
