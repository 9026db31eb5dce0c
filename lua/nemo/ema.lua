-- lua/nemo/ema.lua: an exponential moving average of parameters (diffusers' EMAModel, what its
-- training scripts' --use_ema keeps): after each optimizer step every shadow tensor moves towards
-- its parameter, s <- s - (1 - d) (s - p), with d from diffusers' schedule.
--
--   local ema = require("nemo.ema").EMAModel(params, {decay = 0.9999})
--   ... opt:step(); ema:step(params)
--   ema:swap(params, fn)             -- fn runs with the averages in the parameters (export, sampling)
--
-- The decay of optimizer step n (diffusers' get_decay): k = n - update_after_step - 1; 0 when
-- k <= 0 (the first step copies the parameters); else (1 + k) / (10 + k), or with use_ema_warmup
-- 1 - (1 + k / inv_gamma)^-power; then clamped to [min_decay, decay].
--
-- Non-obvious rules:
-- - The shadows are the parameters' own dtype, device and shape: under FSDP2 they shadow this
--   rank's shards (mgr:parameters()), so they are sharded, offloaded and tensor-parallel with them
--   and the checkpoints save them as they save the shards.
-- - Parameters that do not require grad are copied, not averaged (as diffusers does).
local autograd = require "nemo.autograd"

local M = {}

M.DEFAULTS = {decay = 0.9999, min_decay = 0.0, update_after_step = 0, use_ema_warmup = false, inv_gamma = 1.0,
              power = 2 / 3}
local TYPES = {decay = "number", min_decay = "number", update_after_step = "number", use_ema_warmup = "boolean",
               inv_gamma = "number", power = "number"}

local EMA = {}
EMA.__index = EMA
M.EMAModelClass = EMA

-- check(opts, what) -> the options with defaults, or an error naming the key
function M.check(opts, what)
    what = what or "EMAModel"
    local o = {}
    for k, v in pairs(opts or {}) do
        if TYPES[k] == nil then
            local known = {}
            for n in pairs(TYPES) do known[#known + 1] = n end
            table.sort(known)
            error(string.format("%s: unknown option '%s' (known: %s)", what, tostring(k), table.concat(known, ", ")), 3)
        end
        if type(v) ~= TYPES[k] then
            error(string.format("%s: %s must be a %s, got %s", what, k, TYPES[k], tostring(v)), 3)
        end
        o[k] = v
    end
    for k, v in pairs(M.DEFAULTS) do if o[k] == nil then o[k] = v end end
    if not (o.decay >= 0 and o.decay <= 1) then error(what .. ": decay must be in [0, 1], got " .. o.decay, 3) end
    if not (o.min_decay >= 0 and o.min_decay <= o.decay) then
        error(string.format("%s: min_decay must be in [0, decay = %g], got %g", what, o.decay, o.min_decay), 3)
    end
    if o.update_after_step < 0 or o.update_after_step % 1 ~= 0 then
        error(what .. ": update_after_step must be an integer >= 0, got " .. o.update_after_step, 3)
    end
    if not (o.inv_gamma > 0) or not (o.power > 0) then
        error(string.format("%s: inv_gamma and power must be > 0, got %g and %g", what, o.inv_gamma, o.power), 3)
    end
    return o
end

-- EMAModel(params, opts): shadows of params (a list of tensors), starting as copies.
function M.EMAModel(params, opts)
    local o = M.check(opts, "EMAModel")
    local self = setmetatable({opts = o, optimization_step = 0, cur_decay_value = nil, shadow = {}}, EMA)
    autograd.no_grad(function()
        for i, p in ipairs(params) do self.shadow[i] = p:detach():clone() end
    end)
    return self
end

-- The decay of optimizer step n (diffusers' EMAModel.get_decay).
function EMA:get_decay(n)
    local o = self.opts
    local k = math.max(0, n - o.update_after_step - 1)
    if k <= 0 then return 0.0 end
    local d
    if o.use_ema_warmup then d = 1 - (1 + k / o.inv_gamma) ^ -o.power else d = (1 + k) / (10 + k) end
    return math.max(math.min(d, o.decay), o.min_decay)
end

local function check_params(self, params, what)
    if #params ~= #self.shadow then
        error(string.format("EMAModel:%s: %d parameters, the average has %d", what, #params, #self.shadow), 3)
    end
end

-- step(params): one optimizer step's update, s <- s - (1 - d) (s - p) (s <- p where p needs no grad).
function EMA:step(params)
    check_params(self, params, "step")
    self.optimization_step = self.optimization_step + 1
    local d = self:get_decay(self.optimization_step)
    self.cur_decay_value = d
    local omd = 1 - d
    autograd.no_grad(function()
        for i, p in ipairs(params) do
            local s = self.shadow[i]
            if rawget(p, "requires_grad") then
                local t = s - p
                t:mul_(omd)
                s:sub_(t)
                t:free()
            else
                s:copy_(p)
            end
        end
    end)
end

-- swap(params, fn, ...): fn(...) runs with the averages in the parameters (their values swapped,
-- in place), which are back after, also when fn raises. Returns fn's results.
function EMA:swap(params, fn, ...)
    check_params(self, params, "swap")
    local function exchange()
        autograd.no_grad(function()
            for i, p in ipairs(params) do
                local s = self.shadow[i]
                local t = p:detach():clone()
                p:detach():copy_(s)
                s:copy_(t)
                t:free()
            end
        end)
    end
    exchange()
    local res = {pcall(fn, ...)}
    exchange()
    if not res[1] then error(res[2], 0) end
    return unpack(res, 2, table.maxn(res))
end

-- reset(params): the shadows start again as copies of params, at step 0.
function EMA:reset(params)
    check_params(self, params, "reset")
    autograd.no_grad(function()
        for i, p in ipairs(params) do self.shadow[i]:copy_(p) end
    end)
    self.optimization_step, self.cur_decay_value = 0, nil
end

-- state() -> {optimization_step, cur_decay_value, opts}: what a checkpoint keeps besides the shadows.
function EMA:state()
    return {optimization_step = self.optimization_step, cur_decay_value = self.cur_decay_value, opts = self.opts}
end

-- load_state(st): restores state() (the shadows are loaded into self.shadow by the caller).
function EMA:load_state(st)
    if type(st) ~= "table" or type(st.optimization_step) ~= "number" then
        error("EMAModel:load_state: expected {optimization_step = n, ...}", 2)
    end
    self.optimization_step = st.optimization_step
    self.cur_decay_value = st.cur_decay_value
end

return M
