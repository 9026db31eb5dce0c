-- lua/nemo/parallel/tensor.lua: tensor parallelism (Megatron-style column- and row-parallel
-- Linear layers, what torch's ColwiseParallel / RowwiseParallel do and Automodel's fsdp.tp_size
-- turns on). The T ranks of a tp group each hold 1/T of a layer's weight and compute 1/T of its
-- product; activations outside the sharded layers stay whole (replicated) on every rank.
--
--   local tp = require "nemo.parallel.tensor"
--   tp.colwise(ffn_in, group)                     -- weight rows (out_features) split: output sharded
--   tp.rowwise(ffn_out, group)                    -- weight columns (in_features) split: input sharded,
--                                                 -- partial products summed over the group
--   tp.colwise(lin, group, {gather_output = true})     -- output gathered whole (all-gather)
--   tp.rowwise(lin, group, {input_is_parallel = false}) -- a whole input: each rank takes its slice
--
-- A column-parallel layer followed by a row-parallel one (an MLP: in -> act -> out) costs one
-- all-reduce forward (the row layer's sum) and one backward (the column layer's input gradient).
-- rms_norm(norm, group) splits an RMSNorm over features that column-parallel layers split (one
-- all-reduce of each token's sum of squares); sum_grads(m, group) marks replicated parameters
-- applied to the rank's part only (per-head norms on the rank's heads).
-- The sharded parameters are new tensors holding this rank's slice, registered under the same
-- names; each carries `_tp = {dim, rank, size, shape, segments}` (the split dim, 0 or 1, the whole
-- parameter's shape, and the parts of a concatenated input split separately), which the FSDP2
-- manager reads for gradient norms, full state dicts and checkpoints (saved in whole-parameter
-- coordinates, so they load on any tp / dp layout).
--
-- Non-obvious rules:
-- - Every parameter outside the sharded layers is replicated, and so is its gradient: the
--   inputs and output gradients of the replicated part are the same on every rank of the group
--   (the all-reduces give every rank the same sum), so no gradient reduction over tp is needed,
--   except for sum_grads' parameters, whose gradients copy_to aliases sum in the backward.
-- - The row-parallel bias is whole on every rank and added once, after the sum. The partial
--   products are summed in their own dtype (bfloat16 under mixed precision, as Megatron does):
--   half the bytes of a float32 sum, one more rounding than the unsplit product.
-- - The collectives run in the order the graph runs, the same on every rank of the group.
-- - Sharding is a one-way change of the model: the whole weights are gone from this rank.
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local F = require "nemo.functional"
local dist = require "nemo.dist"
local class = require "nemo.class"

local M = {}

local free = Tensor.free_all

local function alias(t)
    local nffi = require "nemo.ffi"
    return Tensor.wrap(nffi.C.nemo_tensor_alias(t._c))
end

-- ==== the differentiable collectives (over the last dim where they split) ====

-- copy_to(x, group): x unchanged; backward: the gradient summed over the group (the input of a
-- column-parallel layer, whose rank-local products each give part of the input's gradient)
local function sum_bw(node, g)   -- the gradient summed over node.group (a new tensor)
    local s = g:contiguous()
    local out = rawequal(s, g) and s:clone() or s
    dist.all_reduce(out, {group = node.group})
    return out
end
function M.copy_to(x, group)
    if not (autograd.is_grad_enabled() and x.requires_grad) then return x end
    local a = alias(x)
    local node = autograd.node("tp_copy", sum_bw, a, x)
    node.group = group
    return a
end

-- reduce_from(y, group): y summed over the group, in place (y must be a fresh contiguous result,
-- e.g. a product); the backward is the identity, so no node is needed
function M.reduce_from(y, group)
    autograd.no_grad(dist.all_reduce, y, {group = group})
    return y
end

-- all_reduce(x, group) -> the sum of every rank's x (a new tensor); backward: the same sum of
-- the gradients (every rank's x reaches every rank's result)
function M.all_reduce(x, group)
    local out = autograd.no_grad(function()
        local c = x:contiguous()
        return rawequal(c, x) and c:clone() or c
    end)
    autograd.no_grad(dist.all_reduce, out, {group = group})
    local node = autograd.node("tp_all_reduce", sum_bw, out, x)
    if node then node.group = group end
    return out
end

-- gather(x, group) -> every rank's x concatenated along the last dim; backward: this rank's slice
function M.gather(x, group)
    return require("nemo.parallel.context").gather(x, #x.shape - 1, group)
end

-- scatter(x, group) -> this rank's slice of the last dim of a whole x; backward: the slices'
-- gradients gathered (every rank's part of the whole gradient)
local function scatter_bw(node, g)
    return autograd.no_grad(M.gather, g, node.group)
end
function M.scatter(x, group)
    local T, t = group:size(), group:rank()
    local n = x.shape[#x.shape]
    local v = x:narrow(#x.shape - 1, t * n / T, n / T)
    local out = autograd.no_grad(function() return v:contiguous() end)
    if rawequal(out, v) then out = autograd.no_grad(function() return v:clone() end) end
    free(v)
    local node = autograd.node("tp_scatter", scatter_bw, out, x)
    if node then node.group = group end
    return out
end

-- ==== sharding a Linear ====

local function check_group(group, what)
    if not (type(group) == "table" and getmetatable(group) == dist.Group) then
        error(string.format("%s: expected a nemo.dist group (e.g. mesh:get_group('tp')), got %s", what, type(group)), 3)
    end
end

local function check_linear(m, what)
    local nn = require "nemo.nn"
    if not class.isinstance(m, nn.Linear) then
        local cls = getmetatable(m)
        local name = cls and cls.__name or type(m)
        error(string.format("%s: expected an nn.Linear, got %s%s", what, tostring(name),
            tostring(name):find("LoRA") and " (a LoRA adapter's layer cannot be split: the models' plans leave such " ..
            "layers whole, see tensor.splittable)" or ""), 3)
    end
    if rawget(m, "_tp") then error(what .. ": the layer is tensor-parallel already", 3) end
end

-- this rank's slice of parameter `name` of m along dim, registered in its place. segments: the
-- dim's sizes of consecutive parts split separately (a layer whose input is a concatenation, as
-- FLUX's single-block proj_out on cat(attention, mlp)); the slice is the rank's piece of each.
local function shard_param(m, name, dim, group, what, segments)
    local p = m[name]
    if p == nil then return end
    local T, t = group:size(), group:rank()
    local n = p.shape[dim + 1]
    segments = segments or {n}
    local total = 0
    for _, sz in ipairs(segments) do
        if sz % T ~= 0 then
            error(string.format("%s: %s has %d %s, which the tp group of %d ranks cannot split evenly (tp_size must " ..
                "divide it)", what, name, sz, dim == 0 and "rows (out_features)" or "columns (in_features)", T), 3)
        end
        total = total + sz
    end
    if total ~= n then
        error(string.format("%s: %s: the segments add up to %d, the dim has %d", what, name, total, n), 3)
    end
    local shape = {}
    for i, sz in ipairs(p.shape) do shape[i] = sz end
    local piece = autograd.no_grad(function()
        local parts, off = {}, 0
        for i, sz in ipairs(segments) do
            parts[i] = p:narrow(dim, off + t * sz / T, sz / T)
            off = off + sz
        end
        local c = #parts == 1 and parts[1]:clone() or F.cat(parts, dim)
        free(unpack(parts))
        return c
    end)
    local nn = require "nemo.nn"
    local np = nn.Parameter(piece, rawget(p, "requires_grad") == true)
    rawset(np, "_tp", {dim = dim, rank = t, size = T, shape = shape, segments = #segments > 1 and segments or nil})
    m:register_parameter(name, np)
    free(p, piece)
end

-- colwise(linear, group, {gather_output = false}): shard the output features. The input is
-- whole; the output is this rank's features, or every rank's with gather_output.
function M.colwise(m, group, opts)
    local what = "tensor parallel colwise"
    check_group(group, what)
    check_linear(m, what)
    if group:size() == 1 then return m end
    local gather = opts and opts.gather_output
    shard_param(m, "weight", 0, group, what)
    shard_param(m, "bias", 0, group, what)
    rawset(m, "_tp", {style = "colwise", group = group, gather_output = gather == true})
    rawset(m, "forward", function(self, x)
        local s = x.shape
        if #s == 0 or s[#s] ~= self.in_features then
            error(string.format("tensor-parallel Linear: expected input (..., %d), got %s", self.in_features,
                Tensor.shape_str(s)), 2)
        end
        local xi = M.copy_to(x, group)
        local y = F.linear(xi, self.weight, self.bias)
        if not rawequal(xi, x) then free(xi) end
        if gather then
            local full = M.gather(y, group)
            free(y)
            return full
        end
        return y
    end)
    return m
end

-- rowwise(linear, group, {input_is_parallel = true, segments = nil}): shard the input features.
-- The input is this rank's features (or whole, with input_is_parallel = false: each rank takes
-- its slice); the output is whole: the rank products summed over the group, plus the bias.
-- segments = {n1, n2, ...}: the input is a concatenation of parts of these sizes, each split over
-- the ranks, and this rank's input is its piece of each, concatenated in the same order.
function M.rowwise(m, group, opts)
    local what = "tensor parallel rowwise"
    check_group(group, what)
    check_linear(m, what)
    if group:size() == 1 then return m end
    local parallel_in = not (opts and opts.input_is_parallel == false)
    if opts and opts.segments and not parallel_in then
        error(what .. ": segments need input_is_parallel (each rank's input is its piece of every segment)", 2)
    end
    shard_param(m, "weight", 1, group, what, opts and opts.segments)
    rawset(m, "_tp", {style = "rowwise", group = group, input_is_parallel = parallel_in})
    local T = group:size()
    rawset(m, "forward", function(self, x)
        local s = x.shape
        local want = parallel_in and self.in_features / T or self.in_features
        if #s == 0 or s[#s] ~= want then
            error(string.format("tensor-parallel Linear: expected input (..., %d), got %s", want,
                Tensor.shape_str(s)), 2)
        end
        local xi = parallel_in and x or M.scatter(x, group)
        local y = F.linear(xi, self.weight)
        if not rawequal(xi, x) then free(xi) end
        M.reduce_from(y, group)
        if self.bias == nil then return y end
        local out = y + self.bias
        free(y)
        return out
    end)
    return m
end

-- the machine epsilon torch's rms_norm takes when eps is None
local EPS = {float64 = 2.220446049250313e-16, float32 = 1.1920928955078125e-07, bfloat16 = 0.0078125,
             float16 = 0.0009765625}

-- rms_norm(norm, group): an nn.RMSNorm over features that are split over the group (the output
-- of column-parallel layers; Wan's q / k norms span every head): its weight is sliced as those
-- features are, and each token's mean square is the sum of the ranks' sums of squares (one
-- all-reduce of a value per token), so every rank normalizes its features as the whole norm
-- would. Computed in float32 for bfloat16 / float16 inputs.
function M.rms_norm(m, group)
    local what = "tensor parallel rms_norm"
    check_group(group, what)
    local nn = require "nemo.nn"
    if not class.isinstance(m, nn.RMSNorm) or #m.normalized_shape ~= 1 then
        error(what .. ": expected an nn.RMSNorm over one dim", 2)
    end
    if rawget(m, "_tp") then error(what .. ": the layer is tensor-parallel already", 2) end
    if group:size() == 1 then return m end
    local N = m.normalized_shape[1]
    if N % group:size() ~= 0 then
        error(string.format("%s: %d features, which the tp group of %d ranks cannot split evenly", what, N,
            group:size()), 2)
    end
    shard_param(m, "weight", 0, group, what)
    rawset(m, "_tp", {style = "rms_norm", group = group})
    rawset(m, "forward", function(self, x)
        if x.shape[#x.shape] ~= N / group:size() then
            error(string.format("tensor-parallel RMSNorm: expected input (..., %d), got %s", N / group:size(),
                Tensor.shape_str(x.shape)), 2)
        end
        local lowp = x.dtype == "bfloat16" or x.dtype == "float16"
        local xf = lowp and x:to{dtype = "float32"} or x
        local sq = xf * xf
        local ss = F.sum(sq, -1, true)
        free(sq)
        local tot = M.all_reduce(ss, group)
        free(ss)
        local ms = tot / N
        free(tot)
        local den = ms + (self.eps or EPS[x.dtype] or EPS.float32)
        free(ms)
        local r = F.rsqrt(den)
        free(den)
        local y = xf * r
        free(r)
        if lowp then
            local c = y:to{dtype = x.dtype}
            free(y, xf)
            y = c
        end
        if self.weight == nil then return y end
        local out = y * self.weight
        free(y)
        return out
    end)
    return m
end

-- sum_grads(m, group): m's own parameters are replicated but each rank applies them to its part
-- of a split (FLUX's per-head RMSNorm weights on the rank's heads), so each rank's gradient is a
-- part: while m runs with grad on, they read as copy_to aliases, whose backward sums the
-- gradient over the group (every rank then holds the whole gradient).
function M.sum_grads(m, group)
    check_group(group, "tensor parallel sum_grads")
    if group:size() == 1 then return m end
    if rawget(m, "_tp") then error("tensor parallel sum_grads: the module is tensor-parallel already", 2) end
    local fwd = m.forward
    rawset(m, "_tp", {style = "sum_grads", group = group})
    rawset(m, "forward", function(self, ...)
        if not autograd.is_grad_enabled() then return fwd(self, ...) end
        local subs, any = {}, false
        for name, p in self:named_parameters{recurse = false} do
            if p.requires_grad then subs[name] = M.copy_to(p, group); any = true end
        end
        if not any then return fwd(self, ...) end
        return self:_substitute_params(subs, fwd, self, ...)
    end)
    return m
end

-- The tp facts of a parameter ({dim, rank, size, shape}) or nil for a replicated one.
function M.info(p) return rawget(p, "_tp") end

-- full(t, info, group) -> the whole parameter from every rank's slice t (collective over the tp
-- group; a new tensor).
function M.full(t, info, group)
    local T = info.size
    local c = t:contiguous()
    local shape = {T}
    for i, n in ipairs(c.shape) do shape[i + 1] = n end
    local st = Tensor.empty(shape, {dtype = c.dtype, device = c.device})
    autograd.no_grad(dist.all_gather_into_tensor, st, c, {group = group})
    if not rawequal(c, t) then free(c) end
    local parts, views = {}, {}
    local segs = info.segments or {info.shape[info.dim + 1]}
    local loff = 0
    for _, sz in ipairs(segs) do
        for r = 0, T - 1 do
            local v = st:select(0, r)
            parts[#parts + 1] = v:narrow(info.dim, loff, sz / T)
            views[#views + 1] = v
        end
        loff = loff + sz / T
    end
    local out = autograd.no_grad(F.cat, parts, info.dim)
    free(st)
    free(unpack(parts))
    free(unpack(views))
    return out
end

-- pieces(info, r0, n) -> {{row0, rows, col0, cols, lcol0}...}: where local rows [r0, r0 + n) of a
-- parameter with tp facts `info` (nil: a replicated one) lie in the whole parameter: rows, the
-- columns [col0, col0 + cols) (nil: all of them) and where those columns start in the local
-- tensor (lcol0). One piece, or one per segment of a segmented row-parallel weight.
function M.pieces(info, r0, n)
    if not info then return {{r0, n}} end
    local T = info.size
    if info.dim == 0 then return {{info.rank * info.shape[1] / T + r0, n}} end
    local out, off, loff = {}, 0, 0
    for _, sz in ipairs(info.segments or {info.shape[2]}) do
        out[#out + 1] = {r0, n, off + info.rank * sz / T, sz / T, loff}
        off, loff = off + sz, loff + sz / T
    end
    return out
end

-- splittable(...) -> true when every module given is a plain nn.Linear or nn.RMSNorm (nil ones
-- skipped): a plan leaves a unit of layers that are split together (an attention, an MLP) whole
-- when one of them carries a LoRA adapter, so LoRA runs alongside tensor parallelism.
function M.splittable(...)
    local nn = require "nemo.nn"
    for i = 1, select("#", ...) do
        local m = select(i, ...)
        if m ~= nil then
            local cls = getmetatable(m)
            if cls ~= nn.Linear and cls ~= nn.RMSNorm then return false end
        end
    end
    return true
end

-- apply(plan, group): shard each {module, "colwise" | "rowwise" | "rms_norm" | "sum_grads", opts} of the plan;
-- a group of one rank leaves the model as it is.
function M.apply(plan, group)
    if group:size() == 1 then return end
    for _, e in ipairs(plan) do
        if e[2] == "colwise" then M.colwise(e[1], group, e[3])
        elseif e[2] == "rowwise" then M.rowwise(e[1], group, e[3])
        elseif e[2] == "rms_norm" then M.rms_norm(e[1], group)
        else M.sum_grads(e[1], group) end
    end
end

-- apply_model(model, plan, attns, group): a model's enable_tensor_parallel after it made its plan:
-- applies it (an error says "enable_tensor_parallel: ..."), gives each split attention of attns
-- its share of the heads, and marks the model (_tp_group, _tp_attention).
function M.apply_model(model, plan, attns, group)
    local ok, err = pcall(M.apply, plan, group)
    if not ok then error("enable_tensor_parallel: " .. tostring(err):gsub("^[^:]*:%d+: ", ""), 3) end
    local T = group:size()
    if T == 1 then return model end
    for _, a in ipairs(attns) do a.heads = a.heads / T end
    rawset(model, "_tp_group", group)
    rawset(model, "_tp_attention", #attns > 0)
    return model
end

return M
