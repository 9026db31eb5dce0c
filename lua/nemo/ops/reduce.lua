-- lua/nemo/ops/reduce.lua: reductions and their gradients, as in PyTorch:
--   sum, mean, prod, amax, amin, max, min, argmax, argmin, var, std, var_mean, std_mean,
--   norm / vector_norm, logsumexp, any, all, count_nonzero (reductions); softmax,
--   log_softmax (fused, numerically stable); cumsum; F.mse_loss; F.normalize.
--
-- Arguments follow PyTorch's order. dim is a number, a table of numbers or nil (every dim);
-- dims are 0-based and negatives count from the end. keepdim comes positionally (a boolean)
-- or in a final options table: x:sum(1, true), x:sum({0, 2}, {keepdim = true, dtype = "float32"}),
-- x:sum({dtype = "float64"}). Exceptions kept from PyTorch: var/std take
-- (dim, unbiased, keepdim) positionally, or {correction =, unbiased =, keepdim =}; norm takes
-- (p, dim, keepdim). max/min with a dim return two tensors, values and int64 indices:
--   local v, i = x:max(1)
-- and with a tensor as second argument they are maximum/minimum.
--
-- Accumulation is in float64 whatever the dtype, in a fixed order (results do not depend on
-- the thread count). Gradients: sum/mean broadcast g back; amax/amin and max()/min() without
-- a dim share g evenly between tied elements; max/min with a dim send g to the index found.
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local F = require "nemo.functional"

local C = nffi.C
local check = nffi.check
local wrap, is_tensor, int64s = Tensor.wrap, Tensor.is_tensor, Tensor.int64s
local methods = Tensor.methods
local node_of, save = autograd.node, autograd.save
local dtype_id = Tensor.dtype_id
local INF = math.huge

local out_t = ffi.typeof("nemo_tensor*[1]")
local o1, o2 = out_t(), out_t()

local R = {
    sum = C.NEMO_RED_SUM, mean = C.NEMO_RED_MEAN, prod = C.NEMO_RED_PROD, amax = C.NEMO_RED_AMAX,
    amin = C.NEMO_RED_AMIN, var = C.NEMO_RED_VAR, std = C.NEMO_RED_STD, norm = C.NEMO_RED_NORM,
    logsumexp = C.NEMO_RED_LOGSUMEXP,
}
F._redop = R

-- ==== argument helpers ====

local function is_opts(v) return type(v) == "table" and not is_tensor(v) and v[1] == nil and next(v) ~= nil end

local function want_tensor(name, x)
    if not is_tensor(x) then error(string.format("%s: expected a tensor, got %s", name, type(x)), 3) end
end

-- A dim normalised against ndim (a 0-dim tensor takes 0 or -1); errors point at the caller's
-- caller (level 4 from here: the user's line).
local function normdim(d, ndim, name)
    if type(d) ~= "number" or d % 1 ~= 0 then
        error(string.format("%s: dim must be an integer, got %s", name, tostring(d)), 4)
    end
    local n = ndim == 0 and 1 or ndim
    if d < -n or d >= n then
        error(string.format("%s: dimension %d out of range (expected to be in range of [%d, %d])", name, d, -n, n - 1), 4)
    end
    return d < 0 and d + n or d
end

local function dtype_opt(name, opts)
    local d = opts and opts.dtype
    if d == nil then return -1 end
    local ok, id = pcall(dtype_id, d, name)
    if not ok then error(id, 4) end
    return id
end

-- (dim, keepdim, opts) -> dims (a table of normalised dims, or nil for all), keepdim, opts
local function red_args(name, x, dim, keepdim, opts)
    if is_opts(dim) then opts, dim, keepdim = dim, dim.dim, nil end
    if type(keepdim) == "table" then opts, keepdim = keepdim, nil end
    opts = opts or {}
    if keepdim == nil then keepdim = opts.keepdim end
    if dim == nil then dim = opts.dim end
    if keepdim ~= nil and type(keepdim) ~= "boolean" then
        error(string.format("%s: keepdim must be a boolean, got %s", name, type(keepdim)), 3)
    end
    local nd = x._c.ndim
    local dims
    if type(dim) == "number" then
        dims = {normdim(dim, nd, name)}
    elseif type(dim) == "table" and not is_tensor(dim) then
        dims = {}
        local seen = {}
        for i, d in ipairs(dim) do
            local n = normdim(d, nd, name)
            if seen[n] then error(string.format("%s: dim %d appears multiple times in the list of dims", name, n), 3) end
            seen[n] = true
            dims[i] = n
        end
        if #dims == 0 then dims = nil end
    elseif dim ~= nil then
        error(string.format("%s: dim must be an integer, a table of integers or nil, got %s", name,
            is_tensor(dim) and "a tensor" or type(dim)), 3)
    end
    return dims, keepdim or false, opts
end

-- ==== generic reductions ====

local function reduce_bw(node, g)
    local x = node.x
    return wrap(C.nemo_reduce_backward(g._c, x and x._c or nil, node.nd, node.shape, node.xdt, node.op,
        node.ndims, node.cdims, node.keepdim, node.param))
end

-- y = op(x) over dims (nil: all) with the autograd node; param is correction or p.
local function reduce(name, op, x, dims, keepdim, odt, param)
    local nd = dims and #dims or 0
    local cdims = int64s(dims or {}, nd)
    local y = wrap(C.nemo_reduce(x._c, op, nd, cdims, keepdim and 1 or 0, odt or -1, param or 0))
    local node = node_of(name, reduce_bw, y, x)
    if node then
        node.op, node.ndims, node.cdims, node.keepdim, node.param = op, nd, cdims, keepdim and 1 or 0, param or 0
        node.nd, node.shape, node.xdt = x._c.ndim, int64s(x.shape, x._c.ndim), x._c.dtype
        if op ~= R.sum and op ~= R.mean then node.x = save(node, x) end
    end
    return y
end
F._reduce = reduce

-- sum / mean / prod / amax / amin / logsumexp(x, dim, keepdim, {dtype=})
for _, name in ipairs { "sum", "mean", "prod", "amax", "amin", "logsumexp" } do
    local op = R[name]
    local with_dtype = name == "sum" or name == "mean" or name == "prod"
    F[name] = function(x, dim, keepdim, opts)
        want_tensor(name, x)
        local dims, kd, o = red_args(name, x, dim, keepdim, opts)
        local odt = with_dtype and dtype_opt(name, o) or -1
        return reduce(name, op, x, dims, kd, odt, 0)
    end
    methods[name] = F[name]
end

-- max / min: (x) all elements; (x, dim[, keepdim]) values and indices; (x, tensor) elementwise
local function max_dim_bw(node, g)
    return wrap(C.nemo_max_dim_backward(g._c, node.idx._c, node.nd, node.shape, node.xdt, node.dim, node.keepdim))
end

local function max_min(name, is_min, x, dim, keepdim, opts)
    want_tensor(name, x)
    if is_tensor(dim) then return (is_min == 1 and F.minimum or F.maximum)(x, dim) end
    if is_opts(dim) then opts, dim = dim, dim.dim end
    if type(keepdim) == "table" then opts, keepdim = keepdim, nil end
    if keepdim == nil and opts then keepdim = opts.keepdim end
    if dim == nil then
        if keepdim then error(name .. ": keepdim needs a dim", 3) end
        return reduce(name, is_min == 1 and R.amin or R.amax, x, nil, false, -1, 0)
    end
    if type(dim) ~= "number" then
        error(string.format("%s: dim must be an integer (use %s for several dims), got %s", name,
            is_min == 1 and "amin" or "amax", type(dim)), 3)
    end
    if keepdim ~= nil and type(keepdim) ~= "boolean" then
        error(string.format("%s: keepdim must be a boolean, got %s", name, type(keepdim)), 3)
    end
    local d = normdim(dim, x._c.ndim, name)
    check(C.nemo_max_dim(x._c, d, keepdim and 1 or 0, is_min, o1, o2))
    local values, indices = wrap(o1[0]), wrap(o2[0])
    local node = node_of(name, max_dim_bw, values, x)
    if node then
        node.idx = save(node, indices)
        node.nd, node.shape, node.xdt = x._c.ndim, int64s(x.shape, x._c.ndim), x._c.dtype
        node.dim, node.keepdim = d, keepdim and 1 or 0
    end
    return values, indices
end
function F.max(x, dim, keepdim, opts) return max_min("max", 0, x, dim, keepdim, opts) end
function F.min(x, dim, keepdim, opts) return max_min("min", 1, x, dim, keepdim, opts) end
methods.max, methods.min = F.max, F.min

local function argmax(name, is_min, x, dim, keepdim, opts)
    want_tensor(name, x)
    if is_opts(dim) then opts, dim = dim, dim.dim end
    if type(keepdim) == "table" then opts, keepdim = keepdim, nil end
    if keepdim == nil and opts then keepdim = opts.keepdim end
    if dim ~= nil and type(dim) ~= "number" then
        error(string.format("%s: dim must be an integer or nil, got %s", name, type(dim)), 3)
    end
    local d = dim ~= nil and normdim(dim, x._c.ndim, name) or 0
    return wrap(C.nemo_argmax(x._c, dim ~= nil and 1 or 0, d, keepdim and 1 or 0, is_min))
end
function F.argmax(x, dim, keepdim, opts) return argmax("argmax", 0, x, dim, keepdim, opts) end
function F.argmin(x, dim, keepdim, opts) return argmax("argmin", 1, x, dim, keepdim, opts) end
methods.argmax, methods.argmin = F.argmax, F.argmin

-- ==== var / std ====

-- var(x, dim, unbiased, keepdim) / var(x, dim, {correction=, unbiased=, keepdim=}) / var(x, unbiased)
local function var_args(name, x, dim, a, b)
    local correction, keepdim, opts = 1, false, nil
    if type(dim) == "boolean" then
        correction = dim and 1 or 0
        dim = nil
        if type(a) == "table" then opts = a end
    elseif is_opts(dim) then
        opts, dim = dim, dim.dim
    else
        if type(a) == "boolean" then
            correction = a and 1 or 0
            if type(b) == "boolean" then keepdim = b elseif type(b) == "table" then opts = b end
        elseif type(a) == "table" then
            opts = a
        elseif a ~= nil then
            error(string.format("%s: expected (dim, unbiased, keepdim) or (dim, {correction=, keepdim=}), got %s as the third argument",
                name, type(a)), 3)
        end
    end
    if opts then
        if opts.correction ~= nil then
            if type(opts.correction) ~= "number" then
                error(string.format("%s: correction must be a number, got %s", name, type(opts.correction)), 3)
            end
            correction = opts.correction
        end
        if opts.unbiased ~= nil then correction = opts.unbiased and 1 or 0 end
        if opts.keepdim ~= nil then keepdim = opts.keepdim end
    end
    local dims = red_args(name, x, dim, keepdim)
    return dims, keepdim, correction
end

function F.var(x, dim, a, b)
    want_tensor("var", x)
    local dims, keepdim, corr = var_args("var", x, dim, a, b)
    return reduce("var", R.var, x, dims, keepdim, -1, corr)
end
function F.std(x, dim, a, b)
    want_tensor("std", x)
    local dims, keepdim, corr = var_args("std", x, dim, a, b)
    return reduce("std", R.std, x, dims, keepdim, -1, corr)
end
methods.var, methods.std = F.var, F.std
function F.var_mean(x, dim, a, b)
    want_tensor("var_mean", x)
    local dims, keepdim, corr = var_args("var_mean", x, dim, a, b)
    return reduce("var", R.var, x, dims, keepdim, -1, corr), reduce("mean", R.mean, x, dims, keepdim, -1, 0)
end
function F.std_mean(x, dim, a, b)
    want_tensor("std_mean", x)
    local dims, keepdim, corr = var_args("std_mean", x, dim, a, b)
    return reduce("std", R.std, x, dims, keepdim, -1, corr), reduce("mean", R.mean, x, dims, keepdim, -1, 0)
end

-- ==== norm ====

local function norm_p(name, p)
    if p == nil or p == "fro" then return 2 end
    if p == "inf" then return INF end
    if p == "-inf" then return -INF end
    if type(p) == "number" and p == p then return p end
    error(string.format("%s: unsupported p=%s (expected 'fro', a number, inf or -inf)", name,
        type(p) == "string" and ("'" .. p .. "'") or tostring(p)), 4)
end

-- norm(x, p='fro', dim=nil, keepdim=false, {dtype=}): the vector p-norm over dims ('fro' is 2).
function F.norm(x, p, dim, keepdim, opts)
    want_tensor("norm", x)
    if is_opts(p) then opts, p, dim, keepdim = p, p.p, p.dim, p.keepdim end
    local pv = norm_p("norm", p)
    local dims, kd, o = red_args("norm", x, dim, keepdim, opts)
    return reduce("norm", R.norm, x, dims, kd, dtype_opt("norm", o), pv)
end
methods.norm = F.norm
-- vector_norm(x, ord=2, dim=nil, keepdim=false, {dtype=}) (torch.linalg.vector_norm)
function F.vector_norm(x, ord, dim, keepdim, opts)
    want_tensor("vector_norm", x)
    if is_opts(ord) then opts, ord, dim, keepdim = ord, ord.ord, ord.dim, ord.keepdim end
    local pv = norm_p("vector_norm", ord)
    local dims, kd, o = red_args("vector_norm", x, dim, keepdim, opts)
    return reduce("norm", R.norm, x, dims, kd, dtype_opt("vector_norm", o), pv)
end

-- normalize(x, p=2, dim=1, eps=1e-12) (or {p=, dim=, eps=}): x / max(norm_p(x, dim), eps)
function F.normalize(x, p, dim, eps)
    want_tensor("normalize", x)
    if is_opts(p) then p, dim, eps = p.p, p.dim, p.eps end
    local pv = norm_p("normalize", p)
    if dim == nil then dim = 1 end
    local d = normdim(dim, x._c.ndim, "normalize")
    local n = reduce("norm", R.norm, x, {d}, true, -1, pv)
    return F.div(x, F.clamp_min(n, eps or 1e-12))
end

-- ==== logical reductions (no gradient) ====

function F.any(x, dim, keepdim, opts)
    want_tensor("any", x)
    local dims, kd = red_args("any", x, dim, keepdim, opts)
    return reduce("any", R.sum, x:ne(0), dims, kd, -1, 0):gt(0)
end
function F.all(x, dim, keepdim, opts)
    want_tensor("all", x)
    local dims, kd = red_args("all", x, dim, keepdim, opts)
    return reduce("all", R.sum, x:eq(0), dims, kd, -1, 0):eq(0)
end
function F.count_nonzero(x, dim)
    want_tensor("count_nonzero", x)
    local dims = red_args("count_nonzero", x, dim)
    return reduce("count_nonzero", R.sum, x:ne(0), dims, false, -1, 0)
end
methods.any, methods.all, methods.count_nonzero = F.any, F.all, F.count_nonzero

-- ==== softmax / log_softmax ====

local function softmax_bw(node, g)
    local dx = wrap(C.nemo_softmax_backward(g._c, node.y._c, node.dim, node.log))
    return F._cast(dx, node.xdtype)
end

local function softmax(name, lg, x, dim, opts)
    want_tensor(name, x)
    if is_opts(dim) then opts, dim = dim, dim.dim end
    if type(opts) == "string" then opts = {dtype = opts} end
    if dim == nil then error(name .. ": dim must be given (softmax over which dimension?)", 3) end
    local d = normdim(dim, x._c.ndim, name)
    local y = wrap(C.nemo_softmax(x._c, d, lg, dtype_opt(name, opts)))
    local node = node_of(name, softmax_bw, y, x)
    if node then
        node.y = save(node, y)
        node.dim, node.log, node.xdtype = d, lg, x.dtype
    end
    return y
end
function F.softmax(x, dim, opts) return softmax("softmax", 0, x, dim, opts) end
function F.log_softmax(x, dim, opts) return softmax("log_softmax", 1, x, dim, opts) end
methods.softmax, methods.log_softmax = F.softmax, F.log_softmax

-- ==== cumsum ====

local function cumsum_bw(node, g)
    return F._cast(wrap(C.nemo_cumsum(g._c, node.dim, 1, -1)), node.xdtype)
end

-- cumsum(x, dim, {dtype=})
function F.cumsum(x, dim, opts)
    want_tensor("cumsum", x)
    if is_opts(dim) then opts, dim = dim, dim.dim end
    if type(opts) == "string" then opts = {dtype = opts} end
    if dim == nil then error("cumsum: dim must be given", 2) end
    local d = normdim(dim, x._c.ndim, "cumsum")
    local y = wrap(C.nemo_cumsum(x._c, d, 0, dtype_opt("cumsum", opts)))
    local node = node_of("cumsum", cumsum_bw, y, x)
    if node then node.dim, node.xdtype = d, x.dtype end
    return y
end
methods.cumsum = F.cumsum

-- ==== losses ====

-- mse_loss(input, target, {reduction = "mean" | "sum" | "none"}) (or the reduction string)
function F.mse_loss(input, target, opts)
    want_tensor("mse_loss", input)
    local reduction = type(opts) == "string" and opts or (type(opts) == "table" and opts.reduction) or "mean"
    if reduction ~= "mean" and reduction ~= "sum" and reduction ~= "none" then
        error(string.format("mse_loss: reduction must be 'mean', 'sum' or 'none', got '%s'", tostring(reduction)), 2)
    end
    local d = F.sub(input, target)
    local sq = F.square(d)
    if reduction == "none" then return sq end
    return reduce(reduction, R[reduction], sq, nil, false, -1, 0)
end

return F
