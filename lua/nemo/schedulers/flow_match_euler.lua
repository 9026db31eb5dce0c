-- lua/nemo/schedulers/flow_match_euler.lua: diffusers' FlowMatchEulerDiscreteScheduler (0.40),
-- the sampler of FLUX.1, SD3 and Wan's flow-matching pipelines, plus FluxPipeline's
-- calculate_shift / retrieve_timesteps and its default sigmas.
--
--   local FM = require "nemo.schedulers.flow_match_euler"
--   local sched = FM.FlowMatchEulerDiscreteScheduler.from_pretrained("FLUX.1-dev/scheduler")
--   local mu = FM.calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)    -- or sched:calculate_shift(n)
--   sched:set_timesteps(28, {sigmas = FM.flux_sigmas(28), mu = mu})         -- as FluxPipeline does
--   for i = 1, sched.num_inference_steps do
--       local t = sched.timesteps[i - 1]                                     -- a 0-dim float32 tensor
--       latents = sched:step(model(latents, t / 1000), t, latents)          -- -> prev_sample
--   end
--   local x_t = sched:scale_noise(x0, timesteps, noise)                      -- the forward process
--
-- sched.timesteps ([N], float32) and sched.sigmas ([N+1], float32, the last one 0, or 1 with
-- invert_sigmas) are the values diffusers computes, bit for bit. The rule for that (golden
-- finding 4): diffusers computes the default schedule in float64 numpy (linspace of the init
-- sigma_max..sigma_min times num_train_timesteps, then the shift) and rounds to float32 once at
-- the end; explicit `sigmas` (FluxPipeline's) or `timesteps` are cast to float32 first and then
-- numpy keeps every later operation in float32 (NumPy 2 rules: a Python float next to a float32
-- array is a float32). Here each value is a Lua double and `f32()` rounds after every operation
-- of the float32 path, which is exact: a double holds a float32 +, -, *, / exactly before the
-- one rounding. `timesteps = sigmas * num_train_timesteps` is float32 (torch), as is the
-- shift of the 1000 training sigmas in __init__ (which set_timesteps then shifts again: golden
-- finding 3; diffusers does, so this does).
--
-- step() is Euler: prev = sample + (sigma_next - sigma) * model_output, the sample upcast to
-- float32, the sigma difference a float32 0-dim value, the product in model_output's dtype (torch
-- promotion), the result cast back to model_output's dtype. The step index follows diffusers:
-- taken from the first step()'s timestep (its second match when the schedule repeats it, so
-- image-to-image does not skip a sigma) unless set_begin_index() was called, then one per step.
-- A timestep that is not in the schedule is an error here (diffusers raises an IndexError).
--
-- Not implemented (a clear error): use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas,
-- step()'s per_token_timesteps. stochastic_sampling is implemented: its noise is opts.noise
-- (pass torch's draw to reproduce diffusers) or a draw from nemo's generator (not torch's).
local json = require "nemo.json"
local class = require "nemo.class"
local common = require "nemo.schedulers.common"

local M = {}
M.DIFFUSERS_VERSION = "0.40.0.dev0"   -- written into a saved scheduler_config.json
M.CONFIG_NAME = "scheduler_config.json"
local NAME = "FlowMatchEulerDiscreteScheduler"

local function tensor_lib() return require "nemo.tensor" end
local function nemo_lib() return require "nemo" end

-- ==== float32 rounding, lists of numbers ====

-- f32(x): the float32 nearest to x; f64: the identity; linspace: numpy's, in float64 (common.lua)
local f32, f64, linspace = common.f32, common.f64, common.linspace
M._f32 = f32
M._linspace = linspace
-- number_list(v, "set_timesteps: what", true): a Lua list of numbers from a list or a 1-D
-- tensor of numbers (nil stays nil)
local number_list = common.number_list

-- ==== FluxPipeline's helpers ====

-- calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5,
-- max_shift=1.15): mu, the linear interpolation FluxPipeline feeds to set_timesteps (Python
-- float arithmetic in the same order, so the same double).
function M.calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    base_seq_len = base_seq_len == nil and 256 or base_seq_len
    max_seq_len = max_seq_len == nil and 4096 or max_seq_len
    base_shift = base_shift == nil and 0.5 or base_shift
    max_shift = max_shift == nil and 1.15 or max_shift
    for name, v in pairs {image_seq_len = image_seq_len, base_seq_len = base_seq_len, max_seq_len = max_seq_len,
                          base_shift = base_shift, max_shift = max_shift} do
        if type(v) ~= "number" or v ~= v then
            error(string.format("calculate_shift: %s must be a number, got %s", name, tostring(v)), 2)
        end
    end
    if max_seq_len == base_seq_len then
        error(string.format("calculate_shift: max_seq_len and base_seq_len are both %s (the slope divides by their difference)",
            tostring(max_seq_len)), 2)
    end
    local m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    local b = base_shift - m * base_seq_len
    return image_seq_len * m + b
end

-- flux_sigmas(n): np.linspace(1.0, 1/n, n), the sigmas FluxPipeline passes (float64 values).
function M.flux_sigmas(n)
    if type(n) ~= "number" or n < 1 or n % 1 ~= 0 then
        error("flux_sigmas: n must be a positive integer, got " .. tostring(n), 2)
    end
    return linspace(1.0, 1 / n, n)
end

-- ==== config ====

-- diffusers' __init__ arguments and defaults, in its order
M.CONFIG_KEYS = {"num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
    "base_image_seq_len", "max_image_seq_len", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "time_shift_type", "stochastic_sampling"}
M.DEFAULTS = {num_train_timesteps = 1000, shift = 1.0, use_dynamic_shifting = false, base_shift = 0.5,
    max_shift = 1.15, base_image_seq_len = 256, max_image_seq_len = 4096, invert_sigmas = false,
    shift_terminal = nil, use_karras_sigmas = false, use_exponential_sigmas = false, use_beta_sigmas = false,
    time_shift_type = "exponential", stochastic_sampling = false}
-- kind of each key (common.WANT names them); "number?" may be null / absent
local KIND = {num_train_timesteps = "count", shift = "number", use_dynamic_shifting = "boolean",
    base_shift = "number?", max_shift = "number?", base_image_seq_len = "number", max_image_seq_len = "number",
    invert_sigmas = "boolean", shift_terminal = "number?", use_karras_sigmas = "boolean",
    use_exponential_sigmas = "boolean", use_beta_sigmas = "boolean", time_shift_type = "string",
    stochastic_sampling = "boolean"}
local UNSUPPORTED = {use_karras_sigmas = "Karras", use_exponential_sigmas = "exponential", use_beta_sigmas = "beta"}

-- check_config(tbl, {unknown = "error"|"warn"}) -> a full config table (defaults filled in).
-- Keys starting with "_" (_class_name, _diffusers_version) are metadata and skipped; other
-- unknown keys are an error (from_config) or a warning (from_pretrained: diffusers ignores them).
-- common.check_keys checks each value's kind; the checks between values are here.
local function check_config(tbl, opts, level)
    level = (level or 1) + 1
    local cfg = common.check_keys(NAME, M, KIND, tbl, opts, level + 1)
    if not (cfg.shift > 0 and cfg.shift < math.huge) then
        error(string.format("FlowMatchEulerDiscreteScheduler: config 'shift' must be a positive number, got %s",
            tostring(cfg.shift)), level)
    end
    if cfg.time_shift_type ~= "exponential" and cfg.time_shift_type ~= "linear" then
        error(string.format("FlowMatchEulerDiscreteScheduler: config 'time_shift_type' must either be 'exponential' " ..
            "or 'linear', got '%s'", tostring(cfg.time_shift_type)), level)
    end
    if cfg.shift_terminal ~= nil and not (cfg.shift_terminal >= 0 and cfg.shift_terminal < 1) then
        error(string.format("FlowMatchEulerDiscreteScheduler: config 'shift_terminal' must be in [0, 1) or null, got %s",
            tostring(cfg.shift_terminal)), level)
    end
    for _, k in ipairs {"base_image_seq_len", "max_image_seq_len"} do
        if not (cfg[k] > 0) then
            error(string.format("FlowMatchEulerDiscreteScheduler: config '%s' must be positive, got %s", k,
                tostring(cfg[k])), level)
        end
    end
    for _, k in ipairs {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"} do
        if cfg[k] then
            error(string.format("FlowMatchEulerDiscreteScheduler: config '%s' = true (%s sigmas) is not supported " ..
                "yet in nemo-lua; use the default sigmas", k, UNSUPPORTED[k]), level)
        end
    end
    return cfg
end
M.check_config = check_config

-- ==== the scheduler ====

local Scheduler = class("nemo.schedulers.FlowMatchEulerDiscreteScheduler")
M.FlowMatchEulerDiscreteScheduler = Scheduler
Scheduler.order = 1
Scheduler.config_name = M.CONFIG_NAME

local function set_schedule(self, ts, sig, device)
    local Tensor = tensor_lib()
    self._ts, self._sig = ts, sig
    self.timesteps = Tensor.tensor(ts, {dtype = "float32", device = device})
    self.sigmas = Tensor.tensor(sig, {dtype = "float32", device = device})
end

-- FlowMatchEulerDiscreteScheduler(cfg[, opts]): cfg holds diffusers' keys (missing ones take the
-- defaults); an unknown key or a bad value is an error naming it. Builds the 1000 training
-- timesteps and sigmas as diffusers' __init__ does (shifted unless use_dynamic_shifting).
function Scheduler:__init(cfg, opts)
    cfg = check_config(cfg, opts, 3)
    self.config = cfg
    self._shift = cfg.shift
    self._step_index, self._begin_index = nil, nil
    self.num_inference_steps = nil
    local T = cfg.num_train_timesteps
    local Tf = f32(T)
    local sh, shm1 = f32(cfg.shift), f32(cfg.shift - 1)
    local ts, sig = {}, {}
    for i = 1, T do
        local t = T + 1 - i                     -- linspace(1, T, T, float32)[::-1]: exact integers
        local s = f32(f32(t) / Tf)
        if not cfg.use_dynamic_shifting then
            s = f32(f32(sh * s) / f32(1 + f32(shm1 * s)))
        end
        sig[i] = s
        ts[i] = f32(s * Tf)
    end
    set_schedule(self, ts, sig)
    self.sigma_min = sig[T]
    self.sigma_max = sig[1]
end

-- from_config(tbl): a scheduler from a config table (diffusers' keys; "_"-keys skipped).
function Scheduler.from_config(tbl, more)
    if rawequal(tbl, Scheduler) then tbl = more end   -- Scheduler:from_config(...)
    return Scheduler(tbl)
end

-- from_pretrained(path[, {subfolder=, revision=}]): path is a scheduler_config.json file, a
-- folder holding one, a pipeline folder (its scheduler/ subfolder), or an "org/name" id in the
-- Hugging Face cache; unknown keys are skipped with a warning (common.from_pretrained).
Scheduler.from_pretrained = common.from_pretrained(Scheduler, NAME, M)

-- save_config(folder) / save_pretrained(folder): folder/scheduler_config.json as diffusers
-- writes it (sorted keys, _class_name, _diffusers_version, shift_terminal null when unset).
Scheduler.save_pretrained = common.save_pretrained(NAME, M)
Scheduler.save_config = Scheduler.save_pretrained

function Scheduler:__tostring()
    local c = self.config
    local s = string.format("FlowMatchEulerDiscreteScheduler(num_train_timesteps=%d, shift=%s", c.num_train_timesteps,
        tostring(self._shift))
    if c.use_dynamic_shifting then
        s = s .. string.format(", dynamic (%s) base_shift=%s max_shift=%s seq %s..%s", c.time_shift_type,
            tostring(c.base_shift), tostring(c.max_shift), tostring(c.base_image_seq_len), tostring(c.max_image_seq_len))
    end
    if c.shift_terminal then s = s .. ", shift_terminal=" .. tostring(c.shift_terminal) end
    if c.invert_sigmas then s = s .. ", invert_sigmas" end
    if c.stochastic_sampling then s = s .. ", stochastic" end
    if self.num_inference_steps then s = s .. string.format(", %d steps", self.num_inference_steps) end
    return s .. ")"
end

function Scheduler:__len() return self.config.num_train_timesteps end

-- the shift (set_shift changes it, as diffusers' set_shift; the config keeps the original)
function Scheduler:shift() return self._shift end
function Scheduler:set_shift(shift)
    if type(shift) ~= "number" or not (shift > 0 and shift < math.huge) then
        error("set_shift: expected a positive number, got " .. tostring(shift), 2)
    end
    self._shift = shift
end
-- step_index() / begin_index() / set_begin_index([i]): as diffusers (common.lua)
Scheduler.step_index = common.step_index
Scheduler.begin_index = common.begin_index
Scheduler.set_begin_index = common.set_begin_index

-- mu for an image of image_seq_len tokens from this scheduler's config (FluxPipeline passes
-- base_image_seq_len, max_image_seq_len, base_shift, max_shift from it)
function Scheduler:calculate_shift(image_seq_len)
    local c = self.config
    if c.base_shift == nil or c.max_shift == nil then
        error("calculate_shift: this scheduler's config has no base_shift / max_shift", 2)
    end
    return M.calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
end

-- time_shift(mu, sigma, t, R): the exponential or linear resolution-dependent shift of one value;
-- R is the rounding of the precision the schedule is computed in (f32 or f64)
function Scheduler:_time_shift(mu, sigma, t, R)
    local x = R(R(1 / t) - 1)
    if sigma ~= 1 then x = R(x ^ sigma) end
    if self.config.time_shift_type == "exponential" then
        local e = R(math.exp(mu))
        return R(e / R(e + x))
    else
        local m = R(mu)
        return R(m / R(m + x))
    end
end

-- time_shift(mu, sigma, t): diffusers' method on a number, a list or a tensor (float64 math)
function Scheduler:time_shift(mu, sigma, t)
    if type(t) == "number" then return self:_time_shift(mu, sigma, t, f64) end
    local l = number_list(t, "set_timesteps: t", true)
    local out = {}
    for i, v in ipairs(l) do out[i] = self:_time_shift(mu, sigma, v, f64) end
    return out
end

-- set_timesteps(num_inference_steps[, {sigmas=, mu=, timesteps=, device=}]): as diffusers.
-- sigmas / timesteps: Lua lists or tensors of N values (explicit timesteps are ignored when
-- sigmas are given too, as in diffusers); mu is required with use_dynamic_shifting.
function Scheduler:set_timesteps(num_inference_steps, opts)
    if type(num_inference_steps) == "table" and opts == nil and not tensor_lib().is_tensor(num_inference_steps) then
        opts, num_inference_steps = num_inference_steps, nil      -- set_timesteps{sigmas = ...}
    end
    opts = opts or {}
    if type(opts) ~= "table" then error("set_timesteps: opts must be a table", 2) end
    for k in pairs(opts) do
        if k ~= "sigmas" and k ~= "mu" and k ~= "timesteps" and k ~= "device" then
            error("set_timesteps: unknown option '" .. tostring(k) .. "' (known: sigmas, mu, timesteps, device)", 2)
        end
    end
    local cfg = self.config
    local sigmas_in = number_list(opts.sigmas, "set_timesteps: sigmas", true)
    local ts_in = number_list(opts.timesteps, "set_timesteps: timesteps", true)
    local mu = opts.mu
    if mu == json.null then mu = nil end
    if mu ~= nil and (type(mu) ~= "number" or mu ~= mu) then
        error("set_timesteps: mu must be a number, got " .. tostring(mu), 2)
    end
    if cfg.use_dynamic_shifting and mu == nil then
        error("set_timesteps: `mu` must be passed when `use_dynamic_shifting` is set to be `True` " ..
            "(FluxPipeline: mu = calculate_shift(image_seq_len, ...))", 2)
    end
    if sigmas_in and ts_in and #sigmas_in ~= #ts_in then
        error(string.format("set_timesteps: `sigmas` (%d) and `timesteps` (%d) should have the same length",
            #sigmas_in, #ts_in), 2)
    end
    local n = num_inference_steps
    if n ~= nil then
        if type(n) ~= "number" or n < 1 or n % 1 ~= 0 then
            error("set_timesteps: num_inference_steps must be a positive integer, got " .. tostring(n), 2)
        end
        if (sigmas_in and #sigmas_in ~= n) or (ts_in and #ts_in ~= n) then
            error(string.format("set_timesteps: `sigmas` and `timesteps` should have the same length as " ..
                "num_inference_steps (%d), if `num_inference_steps` is provided", n), 2)
        end
    else
        if not sigmas_in and not ts_in then
            error("set_timesteps: pass num_inference_steps, sigmas or timesteps", 2)
        end
        n = sigmas_in and #sigmas_in or #ts_in
    end
    if n < 1 then error("set_timesteps: the schedule must have at least one step", 2) end
    self.num_inference_steps = n

    -- 1. the unshifted sigmas, float64 (default) or float32 (explicit values)
    local T = cfg.num_train_timesteps
    local s, R = {}, nil
    if sigmas_in == nil then
        if ts_in then
            R = f32
            for i = 1, n do s[i] = f32(f32(ts_in[i]) / f32(T)) end
        else
            R = f64
            local t = linspace(self.sigma_max * T, self.sigma_min * T, n)
            for i = 1, n do s[i] = t[i] / T end
        end
    else
        R = f32
        for i = 1, n do s[i] = f32(sigmas_in[i]) end
    end
    -- 2. the shift: dynamic (resolution dependent) or static
    if cfg.use_dynamic_shifting then
        for i = 1, n do s[i] = self:_time_shift(mu, 1.0, s[i], R) end
    else
        local sh = self._shift
        if R == f32 then
            local a, b = f32(sh), f32(sh - 1)
            for i = 1, n do s[i] = f32(f32(a * s[i]) / f32(1 + f32(b * s[i]))) end
        else
            for i = 1, n do s[i] = sh * s[i] / (1 + (sh - 1) * s[i]) end
        end
    end
    -- 3. stretch so the schedule ends at shift_terminal (`if self.config.shift_terminal:`)
    local st = cfg.shift_terminal
    if st and st ~= 0 then
        local omz = {}
        for i = 1, n do omz[i] = R(1 - s[i]) end
        local scale = R(omz[n] / R(1 - st))
        for i = 1, n do s[i] = R(1 - R(omz[i] / scale)) end
    end
    -- 5. float32 tensors; timesteps = sigmas * T in float32; 6. the terminal sigma
    local Tf = f32(T)
    local sig, ts = {}, {}
    for i = 1, n do sig[i] = f32(s[i]) end
    if cfg.invert_sigmas then
        for i = 1, n do sig[i] = f32(1 - sig[i]) end
    end
    for i = 1, n do ts[i] = f32(sig[i] * Tf) end
    sig[n + 1] = cfg.invert_sigmas and 1 or 0
    set_schedule(self, ts, sig, opts.device)
    self._step_index, self._begin_index = nil, nil
    return self
end

-- index_for_timestep(t[, schedule]): the 0-based index of t (compared as float32, as torch's
-- `schedule_timesteps == timestep` does) in the schedule: its second match when there are
-- several. A timestep that is not in the schedule is an error. Integer tensors are refused as
-- diffusers refuses them (an index from enumerate(), not a timestep).
Scheduler.index_for_timestep = common.index_for_timestep(NAME, {round = f32, refuse_int = true,
    schedule = "set_timesteps: schedule_timesteps", numeric_only = true})
Scheduler._init_step_index = common._init_step_index

local STEP_OPTS = {generator = true, noise = true, s_churn = true, s_tmin = true, s_tmax = true, s_noise = true,
                   per_token_timesteps = true}

-- step(model_output, timestep, sample[, {noise=, generator=}]) -> prev_sample. timestep: one
-- of scheduler.timesteps (a number or a 0-dim tensor). s_churn / s_tmin / s_tmax / s_noise are
-- accepted and unused, as in diffusers. noise / generator: stochastic_sampling only.
function Scheduler:step(model_output, timestep, sample, opts)
    local Tensor = tensor_lib()
    opts = opts or {}
    if type(opts) ~= "table" then error("step: opts must be a table", 2) end
    for k in pairs(opts) do
        if not STEP_OPTS[k] then error("step: unknown option '" .. tostring(k) .. "'", 2) end
    end
    if opts.per_token_timesteps ~= nil then
        error("step: per_token_timesteps is not supported yet in nemo-lua", 2)
    end
    if not Tensor.is_tensor(model_output) or not Tensor.is_tensor(sample) then
        error("step: model_output and sample must be tensors", 2)
    end
    local ok, t = pcall(common.timestep_number, timestep, "step", true)
    if not ok then error(t, 2) end
    if self._step_index == nil then
        local iok, err = pcall(self._init_step_index, self, t)
        if not iok then error("step: " .. tostring(err), 2) end
    end
    local i = self._step_index
    local sig = self._sig
    if i + 2 > #sig then
        error(string.format("step: step index %d is past the end of the schedule (%d sigmas); call set_timesteps " ..
            "before sampling again", i, #sig), 2)
    end
    if sample.dtype ~= "float32" then sample = sample:to{dtype = "float32"} end   -- upcast
    local sigma, sigma_next = sig[i + 1], sig[i + 2]
    local prev
    if self.config.stochastic_sampling then
        local x0 = sample - sigma * model_output
        local noise = opts.noise
        if noise == nil then
            noise = Tensor.randn(sample.shape, {dtype = sample.dtype, device = sample.device, generator = opts.generator})
        elseif not Tensor.is_tensor(noise) then
            error("step: noise must be a tensor", 2)
        end
        prev = f32(1 - sigma_next) * x0 + sigma_next * noise
    else
        local dt = f32(sigma_next - sigma)
        prev = sample + dt * model_output
    end
    self._step_index = i + 1
    if prev.dtype ~= model_output.dtype then prev = prev:to{dtype = model_output.dtype} end
    return prev
end

-- scale_noise(sample, timestep, noise) -> sigma * noise + (1 - sigma) * sample, the forward
-- process, sigma = sigmas[index of timestep] in sample's dtype. timestep: a number, a list or a
-- 1-D tensor of schedule timesteps (one per sample, or one for all). With set_begin_index() the
-- begin (or current step) index is used instead, as diffusers does for img2img / inpainting.
function Scheduler:scale_noise(sample, timestep, noise)
    local Tensor = tensor_lib()
    if not Tensor.is_tensor(sample) then error("scale_noise: sample must be a tensor", 2) end
    if not Tensor.is_tensor(noise) then error("scale_noise: noise must be a tensor (diffusers needs it too)", 2) end
    local tvals
    if type(timestep) == "number" then tvals = {timestep}
    elseif Tensor.is_tensor(timestep) then
        if not timestep:is_floating_point() then
            error("scale_noise: timesteps must be float values of scheduler.timesteps, got a " .. timestep.dtype ..
                " tensor", 2)
        end
        tvals = timestep:detach():to{device = "cpu"}:double():contiguous():reshape{-1}:tolist()
    elseif type(timestep) == "table" then tvals = number_list(timestep, "set_timesteps: timestep", true)
    else error("scale_noise: timestep must be a number, a list or a tensor, got " .. type(timestep), 2) end
    local idx = common.schedule_indices(self, tvals, "scale_noise")
    local vals = {}
    for k, j in ipairs(idx) do vals[k] = self._sig[j + 1] end
    local shape = {#vals}
    for _ = 2, sample:dim() do shape[#shape + 1] = 1 end
    local sigma = Tensor.tensor(vals, {dtype = "float32"}):to{dtype = sample.dtype, device = sample.device}:reshape(shape)
    return sigma * noise + (1.0 - sigma) * sample
end

-- ==== FluxPipeline's retrieve_timesteps ====

-- retrieve_timesteps(scheduler, num_inference_steps[, {sigmas=, timesteps=, mu=, device=}])
-- -> scheduler.timesteps, num_inference_steps, as diffusers' helper: with explicit sigmas or
-- timesteps, num_inference_steps is not passed on and becomes their length.
function M.retrieve_timesteps(scheduler, num_inference_steps, opts)
    opts = opts or {}
    if opts.sigmas ~= nil and opts.timesteps ~= nil then
        error("retrieve_timesteps: only one of `timesteps` or `sigmas` can be passed", 2)
    end
    local so = {mu = opts.mu, device = opts.device, sigmas = opts.sigmas, timesteps = opts.timesteps}
    local ok, err
    if opts.sigmas ~= nil or opts.timesteps ~= nil then
        ok, err = pcall(scheduler.set_timesteps, scheduler, nil, so)
    else
        ok, err = pcall(scheduler.set_timesteps, scheduler, num_inference_steps, so)
    end
    if not ok then error(err, 0) end
    return scheduler.timesteps, scheduler.timesteps:numel()
end

return M
