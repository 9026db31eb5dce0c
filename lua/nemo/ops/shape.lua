-- lua/nemo/ops/shape.lua: views and their gradients: view/reshape, permute/transpose,
-- unsqueeze/squeeze, expand, flatten/unflatten, narrow/select/slicing, chunk/split/unbind,
-- and cat/stack (copies into views of one output).
--
-- Views share storage with their input; nothing is copied except by reshape of a
-- non-contiguous tensor, contiguous() and cat/stack. Indices and dims are 0-based, negatives
-- count from the end (PyTorch). Slices t[{...}] take per dim a number (select), a table
-- {start, stop[, step]} (half-open, nil or missing ends mean the edge), ":" (everything) or
-- "..." (as many ":" as needed).
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local F = require "nemo.functional"

local C = nffi.C
local wrap, is_tensor, int64s, normdim = Tensor.wrap, Tensor.is_tensor, Tensor.int64s, Tensor.normdim
local methods = Tensor.methods
local node_of = autograd.node
local shape_str = Tensor.shape_str

local function view_of(t, shape, stride, offset)
    local c = t._c
    return wrap(C.nemo_tensor_view(c, #shape, int64s(shape), int64s(stride), offset or c.offset))
end
F._view_of = view_of

local function numel_of(shape)
    local n = 1
    for i = 1, #shape do n = n * shape[i] end
    return n
end

-- shape arguments of view/reshape/expand: varargs or one table
local function dims_args(what, ...)
    local first = ...
    local s = {}
    if type(first) == "table" and not is_tensor(first) then
        for i, v in ipairs(first) do s[i] = v end
    else
        for i = 1, select("#", ...) do s[i] = select(i, ...) end
    end
    for i, v in ipairs(s) do
        if type(v) ~= "number" or v % 1 ~= 0 then
            error(string.format("%s: size %d must be an integer, got %s", what, i, tostring(v)), 3)
        end
    end
    return s
end

-- Resolve one -1 in a target shape against numel.
local function infer_shape(what, t, s)
    local n, known, neg = t:numel(), 1, nil
    for i, v in ipairs(s) do
        if v == -1 then
            if neg then error(what .. ": only one dimension can be -1", 3) end
            neg = i
        elseif v < 0 then error(string.format("%s: invalid size %d", what, v), 3)
        else known = known * v end
    end
    local out = {}
    for i, v in ipairs(s) do out[i] = v end
    if neg then
        if known == 0 or n % known ~= 0 then
            error(string.format("%s: shape %s is invalid for input of size %d", what, shape_str(s), n), 3)
        end
        out[neg] = n / known
    elseif known ~= n then
        error(string.format("%s: shape %s is invalid for input of size %d", what, shape_str(s), n), 3)
    end
    return out
end

-- Strides for viewing t as `shape` without a copy, or nil (PyTorch's computeStride).
local function view_strides(t, shape)
    local c = t._c
    local oldn = c.ndim
    local newst = {}
    if #shape == 0 then return newst end
    if numel_of(shape) == 0 or oldn == 0 then
        local st = 1
        for i = #shape, 1, -1 do newst[i] = st; st = st * math.max(shape[i], 1) end
        return newst
    end
    local view_d = #shape
    local chunk_base = tonumber(c.stride[oldn - 1])
    local tensor_numel, view_numel = 1, 1
    for d = oldn - 1, 0, -1 do
        tensor_numel = tensor_numel * tonumber(c.shape[d])
        if d == 0 or (tonumber(c.shape[d - 1]) ~= 1 and tonumber(c.stride[d - 1]) ~= tensor_numel * chunk_base) then
            while view_d >= 1 and (view_numel < tensor_numel or shape[view_d] == 1) do
                newst[view_d] = view_numel * chunk_base
                view_numel = view_numel * shape[view_d]
                view_d = view_d - 1
            end
            if view_numel ~= tensor_numel then return nil end
            if d > 0 then
                chunk_base = tonumber(c.stride[d - 1])
                tensor_numel, view_numel = 1, 1
            end
        end
    end
    if view_d ~= 0 then return nil end
    return newst
end

local function reshape_bw(node, g) return g:reshape(node.in_shape) end

local function do_view(t, shape, what, allow_copy)
    local st = view_strides(t, shape)
    local out
    if st then
        out = view_of(t, shape, st)
    elseif allow_copy then
        local ct = wrap(C.nemo_contiguous(t._c))
        local s2 = {}
        local acc = 1
        for i = #shape, 1, -1 do s2[i] = acc; acc = acc * math.max(shape[i], 1) end
        out = view_of(ct, shape, s2)
        ct:free()   -- the view holds the copy; the handle would keep it until the collector runs
    else
        error(string.format("%s: view size %s is not compatible with the input's size %s and stride %s " ..
            "(at least one dimension spans two contiguous subspaces); use reshape", what,
            shape_str(shape), shape_str(t.shape), shape_str(t:stride())), 3)
    end
    local node = node_of(what, reshape_bw, out, t)
    if node then node.in_shape = t.shape end
    return out
end

function methods.view(t, ...)
    if type(...) == "string" then error("view: viewing as another dtype is not supported", 2) end
    return do_view(t, infer_shape("view", t, dims_args("view", ...)), "view", false)
end
function methods.reshape(t, ...) return do_view(t, infer_shape("reshape", t, dims_args("reshape", ...)), "reshape", true) end
function methods.view_as(t, o) return t:view(o.shape) end
function methods.reshape_as(t, o) return t:reshape(o.shape) end
function F.reshape(t, ...) return t:reshape(...) end

function methods.flatten(t, start_dim, end_dim)
    local n = t._c.ndim
    if n == 0 then return t:reshape{1} end
    start_dim = normdim(start_dim or 0, n, "flatten")
    end_dim = normdim(end_dim or -1, n, "flatten")
    if start_dim > end_dim then error("flatten: start_dim cannot come after end_dim", 2) end
    local s, shape = {}, t.shape
    for i = 1, start_dim do s[#s + 1] = shape[i] end
    local m = 1
    for i = start_dim + 1, end_dim + 1 do m = m * shape[i] end
    s[#s + 1] = m
    for i = end_dim + 2, n do s[#s + 1] = shape[i] end
    return t:reshape(s)
end
F.flatten = methods.flatten

function methods.unflatten(t, dim, sizes)
    dim = normdim(dim, t._c.ndim, "unflatten")
    local shape, s = t.shape, {}
    for i = 1, dim do s[#s + 1] = shape[i] end
    local prod, neg = 1, nil
    for _, v in ipairs(sizes) do
        if v == -1 then neg = #s + 1 end
        s[#s + 1] = v
        if v ~= -1 then prod = prod * v end
    end
    if neg then s[neg] = shape[dim + 1] / prod end
    for i = dim + 2, #shape do s[#s + 1] = shape[i] end
    return t:view(s)
end
F.unflatten = methods.unflatten

-- ==== permute / transpose ====

local function permute_bw(node, g) return g:permute(node.inv) end

function methods.permute(t, ...)
    local dims = dims_args("permute", ...)
    local c = t._c
    local n = c.ndim
    if #dims ~= n then
        error(string.format("permute: number of dims %d does not match the tensor's %d dimensions", #dims, n), 2)
    end
    local shape, stride, seen, inv = {}, {}, {}, {}
    for i, d in ipairs(dims) do
        d = normdim(d, n, "permute")
        if seen[d] then error("permute: dimension " .. d .. " repeats", 2) end
        seen[d] = true
        shape[i] = tonumber(c.shape[d])
        stride[i] = tonumber(c.stride[d])
        inv[d + 1] = i - 1
    end
    local out = view_of(t, shape, stride)
    local node = node_of("permute", permute_bw, out, t)
    if node then node.inv = inv end
    return out
end
F.permute = methods.permute

function methods.transpose(t, d0, d1)
    local n = t._c.ndim
    if n == 0 then return t end
    d0, d1 = normdim(d0, n, "transpose"), normdim(d1, n, "transpose")
    local dims = {}
    for i = 1, n do dims[i] = i - 1 end
    dims[d0 + 1], dims[d1 + 1] = d1, d0
    return t:permute(dims)
end
F.transpose = methods.transpose
methods.swapaxes = methods.transpose
function methods.t(t)
    if t._c.ndim > 2 then error("t: expects a tensor with <= 2 dimensions, got " .. t._c.ndim, 2) end
    if t._c.ndim < 2 then return t end
    return t:transpose(0, 1)
end
function methods.movedim(t, src, dst)
    local n = t._c.ndim
    src, dst = normdim(src, n, "movedim"), normdim(dst, n, "movedim")
    local order = {}
    for i = 0, n - 1 do if i ~= src then order[#order + 1] = i end end
    table.insert(order, dst + 1, src)
    return t:permute(order)
end

-- ==== unsqueeze / squeeze / expand ====

function methods.unsqueeze(t, dim)
    local n = t._c.ndim
    dim = normdim(dim, n + 1, "unsqueeze")
    local s = t.shape
    table.insert(s, dim + 1, 1)
    return do_view(t, s, "unsqueeze", false)
end
F.unsqueeze = methods.unsqueeze

function methods.squeeze(t, dim)
    local shape, s = t.shape, {}
    if dim == nil then
        for _, v in ipairs(shape) do if v ~= 1 then s[#s + 1] = v end end
    else
        local dims = type(dim) == "table" and dim or {dim}
        local drop = {}
        for _, d in ipairs(dims) do drop[normdim(d, #shape, "squeeze") + 1] = true end
        for i, v in ipairs(shape) do if not (drop[i] and v == 1) then s[#s + 1] = v end end
    end
    if #s == #shape then return t end
    return do_view(t, s, "squeeze", false)
end
F.squeeze = methods.squeeze

local function expand_bw(node, g) return F._sum_to(g, node.in_shape) end

function methods.expand(t, ...)
    local sizes = dims_args("expand", ...)
    local c = t._c
    local n = c.ndim
    if #sizes < n then
        error(string.format("expand: the number of sizes (%d) must be at least the tensor's dimensions (%d)", #sizes, n), 2)
    end
    local shape, stride = {}, {}
    local lead = #sizes - n
    for i = 1, #sizes do
        local want = sizes[i]
        if i <= lead then
            if want < 0 then error("expand: -1 is not allowed in a new leading dimension", 2) end
            shape[i], stride[i] = want, 0
        else
            local have, st = tonumber(c.shape[i - lead - 1]), tonumber(c.stride[i - lead - 1])
            if want == -1 or want == have then shape[i], stride[i] = have, st
            elseif have == 1 then shape[i], stride[i] = want, 0
            else
                error(string.format("expand: the expanded size %d must match the existing size %d at dimension %d " ..
                    "(tensor shape %s)", want, have, i - 1, shape_str(t.shape)), 2)
            end
        end
    end
    local out = view_of(t, shape, stride)
    local node = node_of("expand", expand_bw, out, t)
    if node then node.in_shape = t.shape end
    return out
end
function methods.expand_as(t, o) return t:expand(o.shape) end
F.broadcast_to = methods.expand

-- ==== narrow / select / slicing ====

-- Gradient of a sub-view: g inside the same sub-view of the input's shape, zero elsewhere, as a
-- partial gradient (autograd.partial): the sub-views of one input (split, chunk, unbind, the
-- parts of a checkpoint buffer) are written into one tensor, with no zero fill when they tile it.
local function subview_bw(node, g)
    return autograd.partial(node.in_shape, node.apply, node, g)
end

local function slice_apply(t, spec)
    local c = t._c
    local d = spec.dim
    local shape, stride = t.shape, t:stride()
    local off = tonumber(c.offset) + spec.start * stride[d + 1]
    shape[d + 1] = spec.len
    stride[d + 1] = stride[d + 1] * spec.step
    return view_of(t, shape, stride, off)
end
local function select_apply(t, spec)
    local c = t._c
    local d = spec.dim
    local shape, stride = t.shape, t:stride()
    local off = tonumber(c.offset) + spec.index * stride[d + 1]
    table.remove(shape, d + 1)
    table.remove(stride, d + 1)
    return view_of(t, shape, stride, off)
end

local function record_subview(name, t, out, apply, fields)
    local node = node_of(name, subview_bw, out, t)
    if node then
        node.in_shape = t.shape
        node.apply = apply
        for k, v in pairs(fields) do node[k] = v end
    end
    return out
end

-- slice(dim, start, stop, step): half-open, clamped like Python slicing; step > 0.
function methods.slice(t, dim, start, stop, step)
    local n = t._c.ndim
    dim = normdim(dim, n, "slice")
    local size = tonumber(t._c.shape[dim])
    step = step or 1
    if step <= 0 or step % 1 ~= 0 then error("slice: step must be a positive integer, got " .. tostring(step), 2) end
    start = start or 0
    stop = stop or size
    if start < 0 then start = start + size end
    if stop < 0 then stop = stop + size end
    start = math.max(0, math.min(start, size))
    stop = math.max(start, math.min(stop, size))
    local len = math.floor((stop - start + step - 1) / step)
    local spec = {dim = dim, start = start, len = len, step = step}
    return record_subview("slice", t, slice_apply(t, spec), slice_apply, spec)
end

function methods.narrow(t, dim, start, length)
    local n = t._c.ndim
    dim = normdim(dim, n, "narrow")
    local size = tonumber(t._c.shape[dim])
    if is_tensor(start) then start = start:item() end
    if start < 0 then start = start + size end
    if start < 0 or length < 0 or start + length > size then
        error(string.format("narrow: start (%d) + length (%d) exceeds dimension %d of size %d",
            start, length, dim, size), 2)
    end
    local spec = {dim = dim, start = start, len = length, step = 1}
    return record_subview("narrow", t, slice_apply(t, spec), slice_apply, spec)
end
F.narrow = methods.narrow

function methods.select(t, dim, index)
    local n = t._c.ndim
    if n == 0 then error("select: cannot select from a 0-dim tensor", 2) end
    dim = normdim(dim, n, "select")
    local size = tonumber(t._c.shape[dim])
    if index < -size or index >= size or index % 1 ~= 0 then
        error(string.format("select: index %s out of range for dimension %d of size %d", tostring(index), dim, size), 2)
    end
    if index < 0 then index = index + size end
    local spec = {dim = dim, index = index}
    return record_subview("select", t, select_apply(t, spec), select_apply, spec)
end
F.select = methods.select

function methods.chunk(t, chunks, dim)
    dim = normdim(dim or 0, t._c.ndim, "chunk")
    local size = tonumber(t._c.shape[dim])
    if chunks < 1 then error("chunk: chunks must be at least 1, got " .. tostring(chunks), 2) end
    local each = math.ceil(size / chunks)
    local out = {}
    local start = 0
    while start < size or (#out == 0) do
        local len = math.min(each, size - start)
        out[#out + 1] = t:narrow(dim, start, len)
        start = start + each
        if each == 0 then break end
    end
    return out
end
F.chunk = methods.chunk

-- split(split_size_or_sections, dim): a number gives equal pieces (the last may be smaller),
-- a table gives the sizes, which must add up to the dimension.
function methods.split(t, sizes, dim)
    dim = normdim(dim or 0, t._c.ndim, "split")
    local size = tonumber(t._c.shape[dim])
    local out, start = {}, 0
    if type(sizes) == "number" then
        if sizes <= 0 then error("split: split_size must be positive, got " .. sizes, 2) end
        while start < size do
            local len = math.min(sizes, size - start)
            out[#out + 1] = t:narrow(dim, start, len)
            start = start + len
        end
        if size == 0 then out[1] = t end
    else
        local total = 0
        for _, v in ipairs(sizes) do total = total + v end
        if total ~= size then
            error(string.format("split: sizes add up to %d but dimension %d has size %d", total, dim, size), 2)
        end
        for _, len in ipairs(sizes) do
            out[#out + 1] = t:narrow(dim, start, len)
            start = start + len
        end
    end
    return out
end
F.split = methods.split

function methods.unbind(t, dim)
    dim = normdim(dim or 0, t._c.ndim, "unbind")
    local out = {}
    for i = 0, tonumber(t._c.shape[dim]) - 1 do out[i + 1] = t:select(dim, i) end
    return out
end
F.unbind = methods.unbind

-- t[{...}]: see the file header.
function methods.__getitem(t, key)
    if type(key) == "number" then return t:select(0, key) end
    local n = t._c.ndim
    local count = 0
    for _, k in ipairs(key) do if k ~= "..." and k ~= "none" then count = count + 1 end end
    if count > n then
        error(string.format("index: too many indices (%d) for a tensor of %d dimensions", count, n), 3)
    end
    local out, dim = t, 0
    for _, k in ipairs(key) do
        if k == "..." then
            dim = dim + (n - count)
        elseif k == ":" then
            dim = dim + 1
        elseif k == "none" then
            out = out:unsqueeze(dim)
            dim = dim + 1
            n = n + 1
        elseif type(k) == "number" then
            out = out:select(dim, k)
            n = n - 1
        elseif type(k) == "table" then
            out = out:slice(dim, k[1], k[2], k[3])
            dim = dim + 1
        else
            error("index: expected a number, {start, stop, step}, ':' , '...' or 'none', got " .. tostring(k), 3)
        end
        if dim > n then error(string.format("index: too many indices for a tensor of %d dimensions", t._c.ndim), 3) end
    end
    return out
end
-- t[{...}] = v: copy (or fill) into the sub-view; no autograd.
function methods.__setitem(t, key, v)
    local view = autograd.no_grad(methods.__getitem, t, key)
    Tensor.check_inplace(t, "index assignment")
    if is_tensor(v) then view:copy_(v) else nffi.check(C.nemo_fill_(view._c, v)) end
end

-- ==== cat / stack ====

local function cat_bw(node, g)
    local outs = {}
    local start = 0
    for i, len in ipairs(node.lens) do
        if node.need[i] then outs[i] = F._cast(g:narrow(node.dim, start, len), node.dtypes[i]) end
        start = start + len
    end
    return unpack(outs, 1, #node.lens)
end

function F.cat(tensors, dim)
    if type(tensors) ~= "table" or #tensors == 0 then error("cat: expected a non-empty list of tensors", 2) end
    dim = dim or 0
    local first
    for _, x in ipairs(tensors) do
        if not is_tensor(x) then error("cat: every element must be a tensor", 2) end
        -- legacy: 1-D empty tensors are skipped, as in torch
        if not (x._c.ndim == 1 and x._c.shape[0] == 0) then first = first or x end
    end
    if not first then return tensors[1]:clone() end
    local n = first._c.ndim
    if n == 0 then error("cat: zero-dimensional tensors cannot be concatenated", 2) end
    dim = normdim(dim, n, "cat")
    local shape = first.shape
    local total = 0
    local dtype = first._c.dtype
    local lens, dtypes = {}, {}
    for i, x in ipairs(tensors) do
        local skip = x._c.ndim == 1 and x._c.shape[0] == 0
        local xs = x.shape
        if not skip then
            if #xs ~= n then
                error(string.format("cat: tensor %d has %d dimensions, expected %d", i - 1, #xs, n), 2)
            end
            for d = 1, n do
                if d ~= dim + 1 and xs[d] ~= shape[d] then
                    error(string.format("cat: sizes of tensors must match except in dimension %d: tensor %d has " ..
                        "shape %s, tensor 0 has %s", dim, i - 1, shape_str(xs), shape_str(shape)), 2)
                end
            end
            if x.device ~= first.device then error("cat: tensors are on different devices", 2) end
            dtype = Tensor.promote(dtype, x._c.dtype)
        end
        lens[i] = skip and 0 or xs[dim + 1]
        dtypes[i] = x.dtype
        total = total + lens[i]
    end
    shape[dim + 1] = total
    local out = Tensor.empty(shape, {dtype = Tensor.dtype_names[dtype], device = first.device})
    local start = 0
    for i, x in ipairs(tensors) do
        if lens[i] > 0 then
            local v = autograd.no_grad(methods.narrow, out, dim, start, lens[i])
            nffi.check(C.nemo_copy_(v._c, x._c))
            v:free()   -- the view's handle would keep out's memory alive until the collector runs
            start = start + lens[i]
        end
    end
    local node = node_of("cat", cat_bw, out, unpack(tensors))
    if node then node.lens, node.dim, node.dtypes = lens, dim, dtypes end
    return out
end
F.concat, F.concatenate = F.cat, F.cat

function F.stack(tensors, dim)
    if type(tensors) ~= "table" or #tensors == 0 then error("stack: expected a non-empty list of tensors", 2) end
    local n = tensors[1]._c.ndim
    dim = normdim(dim or 0, n + 1, "stack")
    local shape = tensors[1].shape
    local parts = {}
    for i, x in ipairs(tensors) do
        local xs = x.shape
        if #xs ~= #shape then error(string.format("stack: tensor %d has shape %s, tensor 0 has %s", i - 1, shape_str(xs), shape_str(shape)), 2) end
        for d = 1, #xs do
            if xs[d] ~= shape[d] then
                error(string.format("stack: expects each tensor to be equal size, but got %s at entry 0 and %s at entry %d",
                    shape_str(shape), shape_str(xs), i - 1), 2)
            end
        end
        parts[i] = x:unsqueeze(dim)
    end
    local out = F.cat(parts, dim)
    -- the unsqueezed views are dead (cat's node keeps their grad_fn, never the handles)
    for i = 1, #parts do parts[i]:free() end
    return out
end

return F
