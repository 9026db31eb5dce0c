-- lua/nemo/optim.lua: optimizers and gradient clipping.
--   local opt = nemo.optim.AdamW(model:parameters(), {lr = 1e-4, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 0.01})
--   loss:backward(); nemo.optim.clip_grad_norm_(model:parameters(), 1.0); opt:step(); opt:zero_grad()
-- The update is fused in C (engine/optim.c) and equals torch.optim.AdamW's. param groups are
-- supported: AdamW({{params = a, lr = 1e-4}, {params = b, weight_decay = 0}}, defaults).
-- State (step, exp_avg, exp_avg_sq) is kept per parameter in its compute dtype (float32 for
-- float32/bf16/f16 parameters).
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"

local C = nffi.C
local check = nffi.check
local M = {}

local function param_list(params, what)
    if params == nil then error(what .. ": no parameters given", 3) end
    if type(params) == "table" and params.parameters and type(params.parameters) == "function" then
        params = params:parameters()
    end
    if type(params) == "function" then   -- an iterator like named_parameters()
        local out = {}
        for a, b in params do out[#out + 1] = Tensor.is_tensor(b) and b or a end
        params = out
    end
    if type(params) ~= "table" then error(what .. ": params must be a list of tensors or of param groups", 3) end
    return params
end

local AdamW = {}
AdamW.__index = AdamW
M.AdamW_class = AdamW

local ADAMW_DEFAULTS = {lr = 1e-3, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 1e-2, amsgrad = false,
                        maximize = false, foreach = nil, capturable = false, differentiable = false, fused = nil}

local function check_group(g, what)
    if type(g.lr) ~= "number" or g.lr < 0 then error(what .. ": invalid learning rate " .. tostring(g.lr), 4) end
    if type(g.eps) ~= "number" or g.eps < 0 then error(what .. ": invalid epsilon value " .. tostring(g.eps), 4) end
    if type(g.betas) ~= "table" or type(g.betas[1]) ~= "number" or type(g.betas[2]) ~= "number" or
       g.betas[1] < 0 or g.betas[1] >= 1 or g.betas[2] < 0 or g.betas[2] >= 1 then
        error(what .. ": invalid betas (expected two numbers in [0, 1))", 4)
    end
    if type(g.weight_decay) ~= "number" or g.weight_decay < 0 then
        error(what .. ": invalid weight_decay value " .. tostring(g.weight_decay), 4)
    end
    if g.amsgrad then error(what .. ": amsgrad is not supported yet", 4) end
    if g.maximize then error(what .. ": maximize is not supported yet", 4) end
end

function M.AdamW(params, opts)
    opts = opts or {}
    for k in pairs(opts) do
        if ADAMW_DEFAULTS[k] == nil and k ~= "foreach" and k ~= "fused" then
            error("AdamW: unknown option '" .. tostring(k) .. "'", 2)
        end
    end
    local defaults = {}
    for k, v in pairs(ADAMW_DEFAULTS) do defaults[k] = v end
    for k, v in pairs(opts) do defaults[k] = v end
    params = param_list(params, "AdamW")
    local groups = {}
    if Tensor.is_tensor(params[1]) or #params == 0 then
        groups[1] = {params = params}
    else
        for i, g in ipairs(params) do
            if type(g) ~= "table" or g.params == nil then error("AdamW: param group " .. i .. " has no params", 2) end
            groups[i] = g
        end
    end
    local seen = {}
    for gi, g in ipairs(groups) do
        g.params = param_list(g.params, "AdamW")
        for k, v in pairs(defaults) do if g[k] == nil then g[k] = v end end
        check_group(g, "AdamW")
        for _, p in ipairs(g.params) do
            if not Tensor.is_tensor(p) then error("AdamW: param group " .. gi .. " holds a non-tensor", 2) end
            if seen[p] then error("AdamW: a parameter appears in more than one group", 2) end
            seen[p] = true
        end
    end
    if next(seen) == nil then error("AdamW: optimizer got an empty parameter list", 2) end
    return setmetatable({param_groups = groups, defaults = defaults, state = {}}, AdamW)
end

-- One call per parameter group (nemo_adamw_step_many): one parallel region on the CPU, one
-- kernel launch on a device with the multi-tensor kernel; the update of each parameter is
-- nemo_adamw_step's, bit for bit.
local tensor_array = ffi.typeof("nemo_tensor *[?]")
local const_tensor_array = ffi.typeof("const nemo_tensor *[?]")
local step_array = ffi.typeof("int64_t[?]")
function AdamW:step()
    autograd.no_grad(function()
        for _, g in ipairs(self.param_groups) do
            local lr, b1, b2, eps, wd = g.lr, g.betas[1], g.betas[2], g.eps, g.weight_decay
            local list = {}
            for _, p in ipairs(g.params) do
                local grad = rawget(p, "grad")
                if grad ~= nil then
                    local st = self.state[p]
                    if not st then
                        local cdt = p.dtype == "float64" and "float64" or "float32"
                        st = {step = 0, exp_avg = Tensor.zeros(p.shape, {dtype = cdt, device = p.device}),
                              exp_avg_sq = Tensor.zeros(p.shape, {dtype = cdt, device = p.device})}
                        self.state[p] = st
                    end
                    st.step = st.step + 1
                    list[#list + 1] = {p, grad, st}
                end
            end
            local n = #list
            if n > 0 then
                local ps, gs, ms, vs, steps = tensor_array(n), const_tensor_array(n), tensor_array(n), tensor_array(n),
                    step_array(n)
                for i, e in ipairs(list) do
                    ps[i - 1], gs[i - 1] = e[1]._c, e[2]._c
                    ms[i - 1], vs[i - 1] = e[3].exp_avg._c, e[3].exp_avg_sq._c
                    steps[i - 1] = e[3].step
                end
                check(C.nemo_adamw_step_many(n, ps, gs, ms, vs, lr, b1, b2, eps, wd, steps))
            end
        end
    end)
end

function AdamW:zero_grad(opts)
    local set_to_none = not (opts and opts.set_to_none == false)
    for _, g in ipairs(self.param_groups) do
        for _, p in ipairs(g.params) do
            local grad = rawget(p, "grad")
            if grad ~= nil then
                if set_to_none then p.grad = nil; rawset(p, "_grad_owned", nil)
                else check(C.nemo_fill_(grad._c, 0)) end
            end
        end
    end
end

-- state_dict(): {state = {[i] = {step=, exp_avg=, exp_avg_sq=}}, param_groups = {{lr=, betas=, eps=,
-- weight_decay=, params = {i...}}}}, parameters numbered from 1 across groups in order (torch's layout).
function AdamW:state_dict()
    local state, groups, idx = {}, {}, 0
    for gi, g in ipairs(self.param_groups) do
        local ids = {}
        for _, p in ipairs(g.params) do
            idx = idx + 1
            ids[#ids + 1] = idx
            local st = self.state[p]
            if st then state[idx] = {step = st.step, exp_avg = st.exp_avg, exp_avg_sq = st.exp_avg_sq} end
        end
        local copy = {}
        for k, v in pairs(g) do if k ~= "params" then copy[k] = v end end
        copy.params = ids
        groups[gi] = copy
    end
    return {state = state, param_groups = groups}
end

function AdamW:load_state_dict(sd)
    if type(sd) ~= "table" or type(sd.param_groups) ~= "table" then
        error("AdamW.load_state_dict: expected {state=, param_groups=}", 2)
    end
    if #sd.param_groups ~= #self.param_groups then
        error(string.format("AdamW.load_state_dict: the state has %d param groups, the optimizer %d",
            #sd.param_groups, #self.param_groups), 2)
    end
    local idx = 0
    for gi, g in ipairs(self.param_groups) do
        local sg = sd.param_groups[gi]
        if #sg.params ~= #g.params then
            error(string.format("AdamW.load_state_dict: param group %d has %d parameters in the state, %d here",
                gi, #sg.params, #g.params), 2)
        end
        for k, v in pairs(sg) do if k ~= "params" then g[k] = v end end
        for _, p in ipairs(g.params) do
            idx = idx + 1
            local st = sd.state and sd.state[idx]
            if st then
                for _, k in ipairs { "exp_avg", "exp_avg_sq" } do
                    local t = st[k]
                    if not Tensor.is_tensor(t) or table.concat(t.shape, ",") ~= table.concat(p.shape, ",") then
                        error(string.format("AdamW.load_state_dict: %s of parameter %d has shape %s, the parameter %s",
                            k, idx, Tensor.is_tensor(t) and Tensor.shape_str(t.shape) or "none", Tensor.shape_str(p.shape)), 2)
                    end
                end
                local cdt = p.dtype == "float64" and "float64" or "float32"
                self.state[p] = {step = st.step,
                                 exp_avg = st.exp_avg:to{dtype = cdt, device = p.device}:contiguous():clone(),
                                 exp_avg_sq = st.exp_avg_sq:to{dtype = cdt, device = p.device}:contiguous():clone()}
            else
                self.state[p] = nil
            end
        end
    end
end

-- clip_grad_norm_(params, max_norm[, {norm_type=2}]) -> total norm (a number). Gradients are
-- scaled in place by min(1, max_norm / (total + 1e-6)), as torch does. The norm is accumulated
-- in float64 and does not depend on the thread count.
-- The per-tensor sums come from one nemo_sum_squares_many call (one wait on a device) and are
-- added in parameter order.
function M.grad_norm(params)
    params = param_list(params, "grad_norm")
    local gs = {}
    for _, p in ipairs(params) do
        local g = rawget(p, "grad")
        if g ~= nil then gs[#gs + 1] = g end
    end
    local total = 0
    for _, v in ipairs(M.sum_squares(gs)) do total = total + v end
    return math.sqrt(total)
end

-- sum_squares({t1, t2, ...}) -> {s1, s2, ...}: each tensor's sum of squares (float64), from one
-- nemo_sum_squares_many call: one wait per device instead of one per tensor, which on a GPU is
-- a synchronization per parameter.
function M.sum_squares(ts)
    local n = #ts
    if n == 0 then return {} end
    local arr, out = const_tensor_array(n), ffi.new("double[?]", n)
    for i, t in ipairs(ts) do arr[i - 1] = t._c end
    check(C.nemo_sum_squares_many(n, arr, out))
    local r = {}
    for i = 0, n - 1 do r[i + 1] = out[i] end
    return r
end

function M.clip_grad_norm_(params, max_norm, opts)
    params = param_list(params, "clip_grad_norm_")
    local norm_type = opts and opts.norm_type or 2
    if norm_type ~= 2 then error("clip_grad_norm_: only norm_type 2 is supported, got " .. tostring(norm_type), 2) end
    if type(max_norm) ~= "number" or max_norm <= 0 then
        error("clip_grad_norm_: max_norm must be a positive number, got " .. tostring(max_norm), 2)
    end
    local total = M.grad_norm(params)
    if opts and opts.error_if_nonfinite and total ~= total then
        error("clip_grad_norm_: the total norm of the gradients is non-finite", 2)
    end
    M.scale_grads_(params, max_norm / (total + 1e-6))
    return total
end

-- scale_grads_(params, coef): each gradient multiplied by coef in place when coef < 1 (the
-- clipping step of clip_grad_norm_, for callers that compute the norm themselves).
function M.scale_grads_(params, coef)
    if coef >= 1 then return end
    for _, p in ipairs(params) do
        local g = rawget(p, "grad")
        if g ~= nil then
            local s = Tensor.full({}, coef, {dtype = g.dtype == "float64" and "float64" or "float32", device = g.device})
            check(C.nemo_binary_(g._c, s._c, C.NEMO_BOP_MUL, 1))
        end
    end
end

return M
