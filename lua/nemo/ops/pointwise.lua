-- lua/nemo/ops/pointwise.lua: elementwise ops with broadcasting and their gradients:
-- + - * / ^ and unary minus (metamethods), add/sub/mul/div/pow/neg, abs, exp, log, sqrt, rsqrt,
-- sin, cos, tanh, sigmoid, silu, gelu (exact and tanh), relu, clamp, where, maximum/minimum,
-- comparisons and logical ops (no gradient), in-place add_/sub_/mul_/div_/clamp_.
--
-- A number operand never promotes a float tensor (bf16 * 0.5 stays bf16, computed in f32).
-- Gradients of broadcast inputs are summed back to the input's shape (sum_to), and every
-- gradient is cast back to its input's dtype.
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local F = require "nemo.functional"

local C = nffi.C
local check = nffi.check
local wrap, is_tensor, int64s = Tensor.wrap, Tensor.is_tensor, Tensor.int64s
local methods, mt = Tensor.methods, Tensor.mt
local node_of, save = autograd.node, autograd.save
local NAN = 0 / 0

local U = {
    neg = C.NEMO_UOP_NEG, abs = C.NEMO_UOP_ABS, exp = C.NEMO_UOP_EXP, log = C.NEMO_UOP_LOG,
    sqrt = C.NEMO_UOP_SQRT, rsqrt = C.NEMO_UOP_RSQRT, sin = C.NEMO_UOP_SIN, cos = C.NEMO_UOP_COS,
    tanh = C.NEMO_UOP_TANH, sigmoid = C.NEMO_UOP_SIGMOID, silu = C.NEMO_UOP_SILU,
    gelu = C.NEMO_UOP_GELU, gelu_tanh = C.NEMO_UOP_GELU_TANH, relu = C.NEMO_UOP_RELU,
    sign = C.NEMO_UOP_SIGN, reciprocal = C.NEMO_UOP_RECIPROCAL, square = C.NEMO_UOP_SQUARE,
    pow = C.NEMO_UOP_POW_SCALAR, clamp = C.NEMO_UOP_CLAMP, affine = C.NEMO_UOP_AFFINE,
    rpow = C.NEMO_UOP_RPOW_SCALAR, logical_not = C.NEMO_UOP_LOGICAL_NOT,
}
local B = {
    add = C.NEMO_BOP_ADD, sub = C.NEMO_BOP_SUB, mul = C.NEMO_BOP_MUL, div = C.NEMO_BOP_DIV,
    pow = C.NEMO_BOP_POW, maximum = C.NEMO_BOP_MAX, minimum = C.NEMO_BOP_MIN,
    eq = C.NEMO_BOP_EQ, ne = C.NEMO_BOP_NE, lt = C.NEMO_BOP_LT, le = C.NEMO_BOP_LE,
    gt = C.NEMO_BOP_GT, ge = C.NEMO_BOP_GE, logical_and = C.NEMO_BOP_AND, logical_or = C.NEMO_BOP_OR,
}
F._uop, F._bop = U, B

local F64 = Tensor.dtype_ids.float64

-- ==== helpers shared by the op families ====

-- Sum a gradient down to `shape` (the shape of a broadcast input).
local function same_shape(t, shape)
    local c = t._c
    if c.ndim ~= #shape then return false end
    for i = 1, #shape do if c.shape[i - 1] ~= shape[i] then return false end end
    return true
end
local function sum_to(g, shape)
    if same_shape(g, shape) then return g end
    return wrap(C.nemo_sum_to(g._c, #shape, int64s(shape)))
end
F._sum_to = sum_to
F._same_shape = same_shape

local function cast(g, dtype)
    if g == nil or g.dtype == dtype then return g end
    return g:to{dtype = dtype}
end
F._cast = cast

-- A number as a 0-dim tensor fit to combine with tensor t (float tensors: float32 or float64
-- so the scalar is not rounded to a half type; integer tensors: int64 for integers).
local function scalar_for(v, t)
    if type(v) == "boolean" then v = v and 1 or 0 end
    if type(v) ~= "number" then
        error("expected a tensor or a number, got " .. type(v), 4)
    end
    local dt
    if t:is_floating_point() then dt = (t._c.dtype == F64) and "float64" or "float32"
    elseif v % 1 == 0 then dt = "int64"
    else dt = Tensor.get_default_dtype() end
    return Tensor.full({}, v, {dtype = dt, device = t.device})
end
F._scalar_for = scalar_for

-- ==== unary ops ====

local function unary_bw(node, g)
    local x = node.x
    return wrap(C.nemo_unary_backward(g._c, x._c, nil, node.op, node.a, node.b))
end

-- a*x + b: the gradient a*g does not read x, so the node keeps no tensor. Adding -0 leaves
-- every product as it is (+0 would turn -0 into +0), so these are the bits of unary_backward.
local NEG_ZERO = -1 / math.huge
local function affine_bw(node, g)
    local d = wrap(C.nemo_unary(g._c, U.affine, node.a, NEG_ZERO))
    if d._c.dtype ~= node.x_dtype then
        local c = d:to{dtype = Tensor.dtype_names[node.x_dtype]}
        d:free()
        d = c
    end
    return d
end

local function unary(x, op, a, b, name)
    if not is_tensor(x) then error(name .. ": expected a tensor, got " .. type(x), 3) end
    local y = wrap(C.nemo_unary(x._c, op, a or 0, b or 0))
    local node = node_of(name, op == U.affine and affine_bw or unary_bw, y, x)
    if node then
        node.op, node.a, node.b = op, a or 0, b or 0
        if op == U.affine then node.x_dtype = x._c.dtype else node.x = save(node, x) end
    end
    return y
end
F._unary = unary

for _, name in ipairs { "abs", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid",
                        "silu", "relu", "sign", "reciprocal", "square" } do
    local op = U[name]
    F[name] = function(x) return unary(x, op, 0, 0, name) end
    methods[name] = F[name]
end

local function neg_bw(_, g) return wrap(C.nemo_unary(g._c, U.neg, 0, 0)) end
function F.neg(x)
    if not is_tensor(x) then error("neg: expected a tensor, got " .. type(x), 2) end
    local y = wrap(C.nemo_unary(x._c, U.neg, 0, 0))
    node_of("neg", neg_bw, y, x)
    return y
end
methods.neg = F.neg
F.negative = F.neg

function F.logical_not(x)
    return wrap(C.nemo_unary(x._c, U.logical_not, 0, 0))
end
methods.logical_not = F.logical_not

-- F.gelu(x, {approximate="tanh"|"none"})
function F.gelu(x, opts)
    local approx = type(opts) == "table" and opts.approximate or (type(opts) == "string" and opts) or "none"
    if approx == "tanh" then return unary(x, U.gelu_tanh, 0, 0, "gelu") end
    if approx ~= "none" then error("gelu: approximate must be 'none' or 'tanh', got '" .. tostring(approx) .. "'", 2) end
    return unary(x, U.gelu, 0, 0, "gelu")
end
methods.gelu = F.gelu

-- clamp(x, min, max): numbers or nil; tensor bounds go through maximum/minimum.
function F.clamp(x, lo, hi)
    if type(lo) == "table" and not is_tensor(lo) then lo, hi = lo.min, lo.max end
    if is_tensor(lo) or is_tensor(hi) then
        local y = x
        if lo ~= nil then y = F.maximum(y, lo) end
        if hi ~= nil then y = F.minimum(y, hi) end
        return y
    end
    if lo == nil and hi == nil then error("clamp: at least one of min and max must be given", 2) end
    return unary(x, U.clamp, lo or NAN, hi or NAN, "clamp")
end
methods.clamp = F.clamp
F.clip = F.clamp
function F.clamp_min(x, v) return F.clamp(x, v, nil) end
function F.clamp_max(x, v) return F.clamp(x, nil, v) end
methods.clamp_min, methods.clamp_max = F.clamp_min, F.clamp_max

-- y = a*x + b in one kernel (used for tensor-number arithmetic on float tensors)
local function affine(x, a, b) return unary(x, U.affine, a, b, "affine") end
F._affine = affine

-- ==== binary ops ====

local function binary_bw(node, g)
    local op, ash, bsh, adt, bdt = node.op, node.ashape, node.bshape, node.adtype, node.bdtype
    local need = node.need
    local ga, gb
    if op == B.add or op == B.sub then
        if need[1] then ga = cast(sum_to(g, ash), adt) end
        if need[2] then
            local s = op == B.add and node.alpha or -node.alpha
            gb = s == 1 and g or affine(g, s, 0)
            gb = cast(sum_to(gb, bsh), bdt)
        end
    elseif op == B.mul then
        if need[1] then ga = cast(sum_to(F.mul(g, node.b), ash), adt) end
        if need[2] then gb = cast(sum_to(F.mul(g, node.a), bsh), bdt) end
    elseif op == B.div then
        local b = node.b
        if need[1] then ga = cast(sum_to(F.div(g, b), ash), adt) end
        if need[2] then gb = cast(sum_to(F.neg(F.div(F.mul(g, node.a), F.mul(b, b))), bsh), bdt) end
    elseif op == B.pow then
        local a, b = node.a, node.b
        if need[1] then
            -- b * a^(b-1), zero where b == 0 (so 0^0 has gradient 0, as torch)
            local d = F.mul(b, F.pow(a, F.sub(b, 1)))
            d = F.where(F.eq(b, 0), 0, d)
            ga = cast(sum_to(F.mul(g, d), ash), adt)
        end
        if need[2] then
            -- a^b * log(a), zero where a == 0 and b >= 0
            local d = F.mul(F.pow(a, b), F.log(a))
            d = F.where(F.logical_and(F.eq(a, 0), F.ge(b, 0)), 0, d)
            gb = cast(sum_to(F.mul(g, d), bsh), bdt)
        end
    elseif op == B.maximum or op == B.minimum then
        local a, b = node.a, node.b
        local wina = op == B.maximum and F.gt(a, b) or F.lt(a, b)
        local tie = F.eq(a, b)
        local half = affine(g, 0.5, 0)
        if need[1] then ga = cast(sum_to(F.where(wina, g, F.where(tie, half, 0)), ash), adt) end
        if need[2] then
            local winb = op == B.maximum and F.lt(a, b) or F.gt(a, b)
            gb = cast(sum_to(F.where(winb, g, F.where(tie, half, 0)), bsh), bdt)
        end
    end
    return ga, gb
end

local names = {}
for k, v in pairs(B) do names[tonumber(v)] = k end

local function binary(a, b, op, alpha)
    local name = names[tonumber(op)]
    if not is_tensor(a) then
        if not is_tensor(b) then error(name .. ": expected at least one tensor, got " .. type(a) .. " and " .. type(b), 3) end
        a = scalar_for(a, b)
    elseif not is_tensor(b) then
        b = scalar_for(b, a)
    end
    local y = wrap(C.nemo_binary(a._c, b._c, op, alpha or 1, -1))
    if op >= B.eq then return y end
    local node = node_of(name, binary_bw, y, a, b)
    if node then
        node.op, node.alpha = op, alpha or 1
        node.ashape, node.bshape = a.shape, b.shape
        node.adtype, node.bdtype = a.dtype, b.dtype
        if op == B.mul then
            if node.need[1] then node.b = save(node, b) end
            if node.need[2] then node.a = save(node, a) end
        elseif op ~= B.add and op ~= B.sub then
            node.a = save(node, a)
            node.b = save(node, b)
        end
    end
    return y
end
F._binary = binary

-- add(a, b, {alpha=}) = a + alpha*b
function F.add(a, b, opts)
    local alpha = type(opts) == "table" and opts.alpha or (type(opts) == "number" and opts) or 1
    if is_tensor(a) and type(b) == "number" and a:is_floating_point() then return affine(a, 1, alpha * b) end
    return binary(a, b, B.add, alpha)
end
function F.sub(a, b, opts)
    local alpha = type(opts) == "table" and opts.alpha or (type(opts) == "number" and opts) or 1
    if is_tensor(a) and type(b) == "number" and a:is_floating_point() then return affine(a, 1, -alpha * b) end
    if type(a) == "number" and is_tensor(b) and b:is_floating_point() then return affine(b, -alpha, a) end
    return binary(a, b, B.sub, alpha)
end
function F.mul(a, b)
    if is_tensor(a) and type(b) == "number" and a:is_floating_point() then return affine(a, b, 0) end
    if type(a) == "number" and is_tensor(b) and b:is_floating_point() then return affine(b, a, 0) end
    return binary(a, b, B.mul)
end
function F.div(a, b, opts)
    local mode = type(opts) == "table" and opts.rounding_mode or nil
    if mode ~= nil then error("div: rounding_mode is not supported yet (got '" .. tostring(mode) .. "')", 2) end
    return binary(a, b, B.div)
end
function F.pow(a, b)
    if is_tensor(a) and type(b) == "number" then return unary(a, U.pow, b, 0, "pow") end
    if type(a) == "number" and is_tensor(b) then
        if a <= 0 then return binary(a, b, B.pow) end
        return unary(b, U.rpow, a, 0, "pow")
    end
    return binary(a, b, B.pow)
end
F.multiply, F.subtract, F.divide, F.true_divide = F.mul, F.sub, F.div, F.div
function F.maximum(a, b) return binary(a, b, B.maximum) end
function F.minimum(a, b) return binary(a, b, B.minimum) end

for _, name in ipairs { "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or" } do
    local op = B[name]
    F[name] = function(a, b) return binary(a, b, op) end
    methods[name] = F[name]
end
F.greater, F.less, F.greater_equal, F.less_equal, F.not_equal = F.gt, F.lt, F.ge, F.le, F.ne

for _, name in ipairs { "add", "sub", "mul", "div", "pow", "maximum", "minimum", "multiply",
                        "subtract", "divide", "true_divide" } do
    methods[name] = F[name]
end

-- where(cond, a, b): a and b may be numbers.
local function where_bw(node, g)
    local cond = node.cond
    local ga, gb
    if node.need[2] then ga = cast(sum_to(F.where(cond, g, 0), node.ashape), node.adtype) end
    if node.need[3] then gb = cast(sum_to(F.where(cond, 0, g), node.bshape), node.bdtype) end
    return nil, ga, gb
end
function F.where(cond, a, b)
    if not is_tensor(cond) then error("where: condition must be a tensor, got " .. type(cond), 2) end
    if not is_tensor(a) and not is_tensor(b) then
        a = Tensor.full({}, a, {device = cond.device})
        b = Tensor.full({}, b, {device = cond.device})
    elseif not is_tensor(a) then a = scalar_for(a, b)
    elseif not is_tensor(b) then b = scalar_for(b, a) end
    local y = wrap(C.nemo_where(cond._c, a._c, b._c))
    local node = node_of("where", where_bw, y, cond, a, b)
    if node then
        node.cond = save(node, cond)
        node.ashape, node.bshape, node.adtype, node.bdtype = a.shape, b.shape, a.dtype, b.dtype
    end
    return y
end
methods.where = function(self, cond, other) return F.where(cond, self, other) end

-- ==== metamethods ====

mt.__add = function(a, b) return F.add(a, b) end
mt.__sub = function(a, b) return F.sub(a, b) end
mt.__mul = function(a, b) return F.mul(a, b) end
mt.__div = function(a, b) return F.div(a, b) end
mt.__pow = function(a, b) return F.pow(a, b) end
mt.__unm = function(a) return F.neg(a) end
mt.__mod = function() error("%: remainder is not supported on tensors yet", 2) end

-- ==== in place (no autograd: refused on tensors that are part of a graph) ====

local check_inplace = Tensor.check_inplace
local function inplace(t, v, op, alpha, name)
    check_inplace(t, name)
    if rawget(t, "grad_fn") ~= nil and autograd.is_grad_enabled() then
        error(name .. ": in-place ops on tensors that are part of a graph are not supported", 3)
    end
    if not is_tensor(v) then v = scalar_for(v, t) end
    check(C.nemo_binary_(t._c, v._c, op, alpha or 1))
    return t
end
function methods.add_(t, v, opts)
    local alpha = type(opts) == "table" and opts.alpha or (type(opts) == "number" and opts) or 1
    return inplace(t, v, B.add, alpha, "add_")
end
function methods.sub_(t, v, opts)
    local alpha = type(opts) == "table" and opts.alpha or (type(opts) == "number" and opts) or 1
    return inplace(t, v, B.sub, alpha, "sub_")
end
function methods.mul_(t, v) return inplace(t, v, B.mul, 1, "mul_") end
function methods.div_(t, v) return inplace(t, v, B.div, 1, "div_") end
function methods.clamp_(t, lo, hi)
    check_inplace(t, "clamp_")
    local y = wrap(C.nemo_unary(t._c, U.clamp, lo or NAN, hi or NAN))
    check(C.nemo_copy_(t._c, y._c))
    return t
end

return F
