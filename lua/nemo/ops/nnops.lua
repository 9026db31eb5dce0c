-- lua/nemo/ops/nnops.lua: normalisation ops with fused backward kernels, as in
-- torch.nn.functional:
--   F.layer_norm(x, normalized_shape, weight, bias, eps)   eps defaults to 1e-5
--   F.rms_norm(x, normalized_shape, weight, eps)           eps nil: machine eps of the compute
--                                                          dtype (PyTorch's eps=None)
--   F.group_norm(x, num_groups, weight, bias, eps)         x (N, C, *), eps defaults to 1e-5
-- normalized_shape is a number or a table of the trailing dims ({C} or {H, W}); weight and bias
-- are optional (nil) and independent. Keyword arguments may come as a final options table:
-- F.layer_norm(x, {C}, {weight = w, eps = 1e-6}) or F.layer_norm(x, {C}, w, b, {eps = 1e-6}).
--
-- The forward returns the per-row statistics (mean, rstd) from C; the node saves them with x
-- and weight, and backward hands them back to one fused kernel that returns dx, dweight and
-- dbias together (only those the inputs need).
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local F = require "nemo.functional"

local C = nffi.C
local check = nffi.check
local wrap, is_tensor, int64s = Tensor.wrap, Tensor.is_tensor, Tensor.int64s
local node_of, save = autograd.node, autograd.save

-- out-parameters, reused by every call (each result is wrapped before the next call)
local out_t = ffi.typeof("nemo_tensor*[1]")
local o1, o2, o3 = out_t(), out_t(), out_t()

-- ==== argument helpers ====

local function is_opts(v) return type(v) == "table" and not is_tensor(v) end

-- Positional arguments named `names`; the first plain (non-tensor) table among them is an
-- options table that supplies the remaining names.
local function kwargs(names, ...)
    local res = {}
    for i = 1, #names do
        local v = select(i, ...)
        if is_opts(v) then
            for j = i, #names do res[names[j]] = v[names[j]] end
            break
        end
        res[names[i]] = v
    end
    return res
end

local function want_tensor(op, what, v, optional)
    if v == nil and optional then return nil end
    if not is_tensor(v) then
        error(string.format("%s: expected a tensor for %s, got %s", op, what, type(v)), 3)
    end
    return v
end

local function want_eps(op, eps, default)
    if eps == nil then return default end
    if type(eps) ~= "number" then error(op .. ": eps must be a number, got " .. type(eps), 3) end
    return eps
end

-- normalized_shape: a number or a table of positive integers (a torch.Size-like table).
local function shape_arg(op, s)
    if type(s) == "number" then s = {s} end
    if type(s) ~= "table" or is_tensor(s) or #s == 0 then
        error(string.format("%s: normalized_shape must be a number or a non-empty table of sizes, got %s", op,
            type(s) == "table" and (is_tensor(s) and "a tensor" or "an empty table") or type(s)), 3)
    end
    local out = {}
    for i, v in ipairs(s) do
        if type(v) ~= "number" or v % 1 ~= 0 or v < 0 then
            error(string.format("%s: normalized_shape size %d must be a non-negative integer, got %s", op, i,
                tostring(v)), 3)
        end
        out[i] = v
    end
    return out
end

local function any_requires_grad(a, b, c)
    return autograd.is_grad_enabled() and ((a and a.requires_grad) or (b and b.requires_grad)
        or (c and c.requires_grad)) or false
end

local function cdata(t) return t and t._c or nil end

-- Keep a statistic for backward (a saved handle) and drop the forward's own handle at once.
local function keep(node, t)
    local h = save(node, t)
    t:free()
    return h
end

-- ==== layer_norm ====

local function layer_norm_bw(node, g)
    local need = node.need
    check(C.nemo_layer_norm_backward(g._c, node.x._c, node.nnorm, node.mean._c, node.rstd._c, cdata(node.w),
        node.bias_dtype, need[1] and o1 or nil, need[2] and o2 or nil, need[3] and o3 or nil))
    local dx = need[1] and wrap(o1[0]) or nil
    local dw = need[2] and wrap(o2[0]) or nil
    local db = need[3] and wrap(o3[0]) or nil
    return dx, dw, db
end

function F.layer_norm(x, normalized_shape, ...)
    local a = kwargs({"weight", "bias", "eps"}, ...)
    want_tensor("layer_norm", "input", x)
    local w = want_tensor("layer_norm", "weight", a.weight, true)
    local b = want_tensor("layer_norm", "bias", a.bias, true)
    local ns = shape_arg("layer_norm", normalized_shape)
    local eps = want_eps("layer_norm", a.eps, 1e-5)
    local grad = any_requires_grad(x, w, b)
    check(C.nemo_layer_norm(x._c, #ns, int64s(ns), cdata(w), cdata(b), eps, o1, grad and o2 or nil,
        grad and o3 or nil))
    local y = wrap(o1[0])
    if not grad then return y end
    local mean, rstd = wrap(o2[0]), wrap(o3[0])
    local node = node_of("layer_norm", layer_norm_bw, y, x, w, b)
    if node then
        node.x = save(node, x)
        node.w = save(node, w)
        node.mean, node.rstd = keep(node, mean), keep(node, rstd)
        node.nnorm = #ns
        node.bias_dtype = b and b._c.dtype or -1
    end
    return y
end

-- ==== rms_norm ====

local function rms_norm_bw(node, g)
    local need = node.need
    check(C.nemo_rms_norm_backward(g._c, node.x._c, node.nnorm, node.rstd._c, cdata(node.w),
        need[1] and o1 or nil, need[2] and o2 or nil))
    local dx = need[1] and wrap(o1[0]) or nil
    local dw = need[2] and wrap(o2[0]) or nil
    return dx, dw
end

function F.rms_norm(x, normalized_shape, ...)
    local a = kwargs({"weight", "eps"}, ...)
    want_tensor("rms_norm", "input", x)
    local w = want_tensor("rms_norm", "weight", a.weight, true)
    local ns = shape_arg("rms_norm", normalized_shape)
    local eps = want_eps("rms_norm", a.eps, -1)   -- < 0: the engine picks the machine epsilon
    local grad = any_requires_grad(x, w)
    check(C.nemo_rms_norm(x._c, #ns, int64s(ns), cdata(w), eps, o1, grad and o2 or nil))
    local y = wrap(o1[0])
    if not grad then return y end
    local rstd = wrap(o2[0])
    local node = node_of("rms_norm", rms_norm_bw, y, x, w)
    if node then
        node.x = save(node, x)
        node.w = save(node, w)
        node.rstd = keep(node, rstd)
        node.nnorm = #ns
    end
    return y
end

-- ==== group_norm ====

local function group_norm_bw(node, g)
    local need = node.need
    check(C.nemo_group_norm_backward(g._c, node.x._c, node.groups, node.mean._c, node.rstd._c, cdata(node.w),
        node.bias_dtype, need[1] and o1 or nil, need[2] and o2 or nil, need[3] and o3 or nil))
    local dx = need[1] and wrap(o1[0]) or nil
    local dw = need[2] and wrap(o2[0]) or nil
    local db = need[3] and wrap(o3[0]) or nil
    return dx, dw, db
end

function F.group_norm(x, num_groups, ...)
    local a = kwargs({"weight", "bias", "eps"}, ...)
    want_tensor("group_norm", "input", x)
    local w = want_tensor("group_norm", "weight", a.weight, true)
    local b = want_tensor("group_norm", "bias", a.bias, true)
    if type(num_groups) ~= "number" or num_groups % 1 ~= 0 then
        error("group_norm: num_groups must be an integer, got " .. tostring(num_groups), 2)
    end
    local eps = want_eps("group_norm", a.eps, 1e-5)
    check(C.nemo_group_norm(x._c, num_groups, cdata(w), cdata(b), eps, o1, o2, o3))
    local y, mean, rstd = wrap(o1[0]), wrap(o2[0]), wrap(o3[0])
    local node = node_of("group_norm", group_norm_bw, y, x, w, b)
    if node then
        node.x = save(node, x)
        node.w = save(node, w)
        node.mean, node.rstd = keep(node, mean), keep(node, rstd)
        node.groups = num_groups
        node.bias_dtype = b and b._c.dtype or -1
    else
        mean:free()
        rstd:free()
    end
    return y
end

return F
