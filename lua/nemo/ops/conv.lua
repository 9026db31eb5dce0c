-- lua/nemo/ops/conv.lua: convolutions, embedding lookup and nearest interpolation, as in
-- torch.nn.functional (argument order and defaults of PyTorch, keyword arguments in a final
-- options table):
--   F.conv1d / F.conv2d / F.conv3d(x, w, b, {stride=1, padding=0, dilation=1, groups=1})
--       also positional: F.conv2d(x, w, b, stride, padding, dilation, groups). stride, padding
--       and dilation are a number or a table of one number per spatial dim; padding may also be
--       "same" or "valid", or (nemo extension) a table of {before, after} pairs, one per dim,
--       for asymmetric zero padding. {algo = "im2col"} forces the general kernel path (tests).
--   F.embedding(indices, weight, {padding_idx=})    indices int64/int32 of any shape
--   F.interpolate(x, {size=, scale_factor=, mode="nearest"|"nearest-exact",
--                     recompute_scale_factor=})    x 3-D, 4-D or 5-D (N, C, spatial...)
--   F.pad(x, pad, {mode="constant", value=0})      pad = {last_before, last_after, ...} as in
--                                                  PyTorch; negative values crop
--   F.avg_pool2d(x, kernel_size, {stride=kernel_size, padding=0, count_include_pad=true,
--                divisor_override=})               a depthwise conv with weight 1/k
--
-- Values (stride >= 1, channel counts, kernel vs padded input...) are checked by the engine,
-- whose messages name the op and the shapes; this file checks the Lua types. Each backward is
-- one engine call returning only the gradients the inputs need, cast to the inputs' dtypes.
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local F = require "nemo.functional"

local C = nffi.C
local check = nffi.check
local wrap, is_tensor, int64s = Tensor.wrap, Tensor.is_tensor, Tensor.int64s
local node_of, save = autograd.node, autograd.save
local shape_str = Tensor.shape_str

-- out-parameters, reused by every call (each result is wrapped before the next call)
local out_t = ffi.typeof("nemo_tensor*[1]")
local o1, o2, o3 = out_t(), out_t(), out_t()
local double_arr = ffi.typeof("double[?]")

-- ==== argument helpers ====

-- An options table: a plain table that is not a tensor and not a tuple like {2, 2}.
local function is_opts(v) return type(v) == "table" and not is_tensor(v) and v[1] == nil end

-- Positional arguments named `names`; the first options table among them supplies the rest.
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
        error(string.format("%s: expected a tensor for %s, got %s", op, what, type(v)), 4)
    end
    return v
end

local function is_int(v) return type(v) == "number" and v % 1 == 0 end

-- A number or a table of n integers -> a Lua table of n integers.
local function tuple(op, what, v, n)
    if is_int(v) then
        local t = {}
        for i = 1, n do t[i] = v end
        return t
    end
    if type(v) ~= "table" or is_tensor(v) or #v ~= n then
        error(string.format("%s: %s must be an integer or a table of %d integers, got %s", op, what, n,
            type(v) == "table" and ("a table of " .. #v .. " values") or tostring(v)), 4)
    end
    local t = {}
    for i = 1, n do
        if not is_int(v[i]) then
            error(string.format("%s: %s[%d] must be an integer, got %s", op, what, i, tostring(v[i])), 4)
        end
        t[i] = v[i]
    end
    return t
end

-- padding -> before, after (tables of nsp integers)
local function padding_arg(op, p, nsp, w, stride, dil)
    local lo, hi = {}, {}
    if p == nil or p == "valid" then
        for d = 1, nsp do lo[d], hi[d] = 0, 0 end
    elseif p == "same" then
        for d = 1, nsp do
            if stride[d] ~= 1 then
                error(string.format("%s: padding='same' is not supported for strided convolutions (stride %s)", op,
                    shape_str(stride)), 3)
            end
        end
        if w._c.ndim ~= nsp + 2 then return nil end   -- the engine reports the weight's rank
        -- PyTorch: total = dilation * (k - 1), before = total // 2, the odd one goes after
        for d = 1, nsp do
            local total = dil[d] * (tonumber(w._c.shape[d + 1]) - 1)
            lo[d] = math.floor(total / 2)
            hi[d] = total - lo[d]
        end
    elseif type(p) == "string" then
        error(string.format("%s: padding must be 'same' or 'valid' when it is a string, got '%s'", op, p), 3)
    elseif type(p) == "table" and not is_tensor(p) and type(p[1]) == "table" then
        if #p ~= nsp then
            error(string.format("%s: padding pairs must be a table of %d {before, after} pairs, got %d", op, nsp, #p), 3)
        end
        for d = 1, nsp do
            local pair = p[d]
            if type(pair) ~= "table" or not is_int(pair[1]) or not is_int(pair[2]) then
                error(string.format("%s: padding[%d] must be an integer pair {before, after}", op, d), 3)
            end
            lo[d], hi[d] = pair[1], pair[2]
        end
    else
        lo = tuple(op, "padding", p, nsp)
        for d = 1, nsp do hi[d] = lo[d] end
    end
    return lo, hi
end

local ALGO = {auto = C.NEMO_CONV_AUTO, im2col = C.NEMO_CONV_IM2COL}

-- ==== convolution ====

local function conv_bw(node, g)
    local need = node.need
    check(C.nemo_conv_backward(g._c, node.x._c, node.w._c, node.nsp, node.st, node.pl, node.ph, node.dl,
        node.groups, node.algo, need[1] and o1 or nil, need[2] and o2 or nil, need[3] and o3 or nil))
    local dx = need[1] and wrap(o1[0]) or nil
    local dw = need[2] and wrap(o2[0]) or nil
    local db = need[3] and F._cast(wrap(o3[0]), node.bdtype) or nil
    return dx, dw, db
end

local conv_names = {"bias", "stride", "padding", "dilation", "groups", "algo"}

local function conv_nd(nsp, op, x, w, ...)
    want_tensor(op, "input", x)
    want_tensor(op, "weight", w)
    local a = kwargs(conv_names, ...)
    local b = want_tensor(op, "bias", a.bias, true)
    local stride = tuple(op, "stride", a.stride or 1, nsp)
    local dil = tuple(op, "dilation", a.dilation or 1, nsp)
    local lo, hi = padding_arg(op, a.padding, nsp, w, stride, dil)
    lo = lo or stride; hi = hi or stride   -- weight of the wrong rank: let the engine say so
    local groups = a.groups or 1
    if not is_int(groups) then error(string.format("%s: groups must be an integer, got %s", op, tostring(groups)), 3) end
    local algo = ALGO[a.algo or "auto"]
    if algo == nil then
        error(string.format("%s: algo must be 'auto' or 'im2col', got %s", op, tostring(a.algo)), 3)
    end
    local st, pl, ph, dl = int64s(stride), int64s(lo), int64s(hi), int64s(dil)
    local y = wrap(C.nemo_conv(x._c, w._c, b and b._c or nil, nsp, st, pl, ph, dl, groups, algo))
    local node = node_of(op, conv_bw, y, x, w, b)
    if node then
        node.x = save(node, x)
        node.w = save(node, w)
        node.nsp, node.st, node.pl, node.ph, node.dl = nsp, st, pl, ph, dl
        node.groups, node.algo = groups, algo
        node.bdtype = b and b.dtype
    end
    return y
end

function F.conv1d(x, w, ...) return conv_nd(1, "conv1d", x, w, ...) end
function F.conv2d(x, w, ...) return conv_nd(2, "conv2d", x, w, ...) end
function F.conv3d(x, w, ...) return conv_nd(3, "conv3d", x, w, ...) end

-- ==== embedding ====

local function embedding_bw(node, g)
    local dw = wrap(C.nemo_embedding_backward(g._c, node.idx._c, node.num_weights, node.padding_idx))
    return nil, F._cast(dw, node.wdtype)
end

local emb_names = {"padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"}

function F.embedding(input, weight, ...)
    want_tensor("embedding", "input", input)
    want_tensor("embedding", "weight", weight)
    local a = kwargs(emb_names, ...)
    if a.max_norm ~= nil then error("embedding: max_norm is not supported yet", 2) end
    if a.scale_grad_by_freq then error("embedding: scale_grad_by_freq is not supported yet", 2) end
    if a.sparse then error("embedding: sparse gradients are not supported", 2) end
    if weight._c.ndim ~= 2 then
        error(string.format("embedding: weight must be 2-D (num_embeddings, embedding_dim), got shape %s",
            shape_str(weight.shape)), 2)
    end
    local V = tonumber(weight._c.shape[0])
    local pad = a.padding_idx
    if pad ~= nil then
        if not is_int(pad) or pad < -V or pad >= V then
            error(string.format("embedding: padding_idx must be within [-%d, %d) (num_embeddings %d), got %s",
                V, V, V, tostring(pad)), 2)
        end
        if pad < 0 then pad = pad + V end
    end
    local y = wrap(C.nemo_embedding(input._c, weight._c))
    local node = node_of("embedding", embedding_bw, y, input, weight)
    if node then
        node.idx = save(node, input)
        node.num_weights = V
        node.padding_idx = pad or -1
        node.wdtype = weight.dtype
    end
    return y
end

-- ==== interpolate ====

local MODES = {nearest = C.NEMO_INTERP_NEAREST, ["nearest-exact"] = C.NEMO_INTERP_NEAREST_EXACT}
local LATER = {linear = true, bilinear = true, bicubic = true, trilinear = true, area = true}

local function interp_bw(node, g)
    local dx = wrap(C.nemo_interpolate_backward(g._c, node.nsp, node.in_shape, node.scales, node.mode))
    return F._cast(dx, node.xdtype)
end

local interp_names = {"size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"}

function F.interpolate(x, ...)
    local op = "interpolate"
    want_tensor(op, "input", x)
    local a = kwargs(interp_names, ...)
    local mode = a.mode or "nearest"
    local mode_id = MODES[mode]
    if mode_id == nil then
        if LATER[mode] then
            error(string.format("interpolate: mode '%s' is not supported yet (supported: 'nearest', 'nearest-exact')",
                tostring(mode)), 2)
        end
        error(string.format("interpolate: unknown mode '%s' (expected 'nearest', 'nearest-exact', 'linear', " ..
            "'bilinear', 'bicubic', 'trilinear' or 'area')", tostring(mode)), 2)
    end
    if a.align_corners ~= nil then
        error("interpolate: align_corners can only be set with the interpolating modes linear, bilinear, bicubic " ..
            "and trilinear (mode is '" .. mode .. "')", 2)
    end
    if a.antialias then error("interpolate: antialias is restricted to the bilinear and bicubic modes", 2) end
    local nd = x._c.ndim
    if nd < 3 or nd > 5 then
        error(string.format("interpolate: expected a 3-D, 4-D or 5-D input (N, C, spatial...), got shape %s",
            shape_str(x.shape)), 2)
    end
    local nsp = nd - 2
    local size, sf = a.size, a.scale_factor
    if (size == nil) == (sf == nil) then
        error("interpolate: exactly one of size or scale_factor must be given", 2)
    end
    local in_shape = x.shape
    local out, scales = {}, nil
    if size ~= nil then
        if type(size) == "table" and #size ~= nsp then
            error(string.format("interpolate: size must have %d values for an input of shape %s, got %d", nsp,
                shape_str(in_shape), #size), 2)
        end
        out = tuple(op, "size", size, nsp)
    else
        if type(sf) == "table" and #sf ~= nsp then
            error(string.format("interpolate: scale_factor must have %d values for an input of shape %s, got %d", nsp,
                shape_str(in_shape), #sf), 2)
        end
        local s = {}
        for d = 1, nsp do
            local v = type(sf) == "table" and sf[d] or sf
            if type(v) ~= "number" or not (v > 0) then
                error("interpolate: scale_factor must be a positive number or a table of them, got " .. tostring(v), 2)
            end
            s[d] = v
            out[d] = math.floor(in_shape[d + 2] * v)   -- Python: floor(float(size) * scale)
        end
        if not a.recompute_scale_factor then
            scales = double_arr(nsp)
            for d = 1, nsp do scales[d - 1] = s[d] end
        end
    end
    local y = wrap(C.nemo_interpolate(x._c, nsp, int64s(out), scales, mode_id))
    local node = node_of(op, interp_bw, y, x)
    if node then
        node.nsp, node.in_shape, node.scales, node.mode = nsp, int64s(in_shape), scales, mode_id
        node.xdtype = x.dtype
    end
    return y
end

-- ==== pad (constant) ====

-- One sub-view per padded dim: the part of the output that holds the (cropped) input.
local function pad_views(shape, pad)
    local spec = {}
    local nd = #shape
    for i = 1, #pad / 2 do
        local d = nd - i   -- 0-based; pairs start at the last dim
        local before, after = pad[2 * i - 1], pad[2 * i]
        local len = shape[d + 1] + math.min(before, 0) + math.min(after, 0)
        spec[#spec + 1] = {dim = d, src = math.max(-before, 0), dst = math.max(before, 0), len = len}
    end
    return spec
end

local function narrow_all(t, spec, which)
    for _, s in ipairs(spec) do t = t:narrow(s.dim, s[which], s.len) end
    return t
end

local function pad_bw(node, g)
    local gv = autograd.no_grad(narrow_all, g, node.spec, "dst")
    if not node.crops then return gv end
    local dx = Tensor.zeros(node.in_shape, {dtype = g.dtype, device = g.device})
    autograd.no_grad(narrow_all, dx, node.spec, "src"):copy_(gv)
    return dx
end

local pad_names = {"mode", "value"}

function F.pad(x, pad, ...)
    want_tensor("pad", "input", x)
    local a = kwargs(pad_names, ...)
    local mode, value = a.mode or "constant", a.value or 0
    if mode ~= "constant" then
        error(string.format("pad: mode '%s' is not supported yet (supported: 'constant')", tostring(mode)), 2)
    end
    if type(pad) ~= "table" or is_tensor(pad) or #pad % 2 ~= 0 or #pad / 2 > x._c.ndim then
        error(string.format("pad: pad must be a table of an even number of integers, at most 2 * ndim = %d, got %s",
            2 * x._c.ndim, type(pad) == "table" and (#pad .. " values") or tostring(pad)), 2)
    end
    for i = 1, #pad do
        if not is_int(pad[i]) then error(string.format("pad: pad[%d] must be an integer, got %s", i, tostring(pad[i])), 2) end
    end
    local shape = x.shape
    local out_shape = {}
    for i = 1, #shape do out_shape[i] = shape[i] end
    local crops = false
    for i = 1, #pad / 2 do
        local d = #shape - i + 1
        out_shape[d] = shape[d] + pad[2 * i - 1] + pad[2 * i]
        if pad[2 * i - 1] < 0 or pad[2 * i] < 0 then crops = true end
        if out_shape[d] < 0 or (shape[d] + math.min(pad[2 * i - 1], 0) + math.min(pad[2 * i], 0)) < 0 then
            error(string.format("pad: padding (%d, %d) of dimension %d (size %d) of input %s gives a negative size",
                pad[2 * i - 1], pad[2 * i], d - 1, shape[d], shape_str(shape)), 2)
        end
    end
    local spec = pad_views(shape, pad)
    local out = Tensor.full(out_shape, value, {dtype = x.dtype, device = x.device})
    autograd.no_grad(function()
        narrow_all(out, spec, "dst"):copy_(narrow_all(x, spec, "src"))
    end)
    local node = node_of("pad", pad_bw, out, x)
    if node then node.spec, node.crops, node.in_shape = spec, crops, shape end
    return out
end

-- ==== avg_pool2d ====

local pool_names = {"stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"}

function F.avg_pool2d(x, kernel_size, ...)
    local op = "avg_pool2d"
    want_tensor(op, "input", x)
    local a = kwargs(pool_names, ...)
    local nd = x._c.ndim
    if nd ~= 3 and nd ~= 4 then
        error(string.format("avg_pool2d: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape %s",
            shape_str(x.shape)), 2)
    end
    if a.ceil_mode then error("avg_pool2d: ceil_mode is not supported yet", 2) end
    local k = tuple(op, "kernel_size", kernel_size, 2)
    local stride = tuple(op, "stride", a.stride or k, 2)
    if type(a.stride) == "table" and #a.stride == 0 then stride = k end   -- PyTorch's stride=[]
    local pad = tuple(op, "padding", a.padding or 0, 2)
    for d = 1, 2 do
        if pad[d] < 0 or 2 * pad[d] > k[d] then
            error(string.format("avg_pool2d: padding should be at most half the kernel size, got padding %s for " ..
                "kernel %s", shape_str(pad), shape_str(k)), 2)
        end
    end
    local shape = x.shape
    local H, W = shape[nd - 1], shape[nd]
    local lead = nd == 4 and shape[1] * shape[2] or shape[1]
    local x1 = x:reshape{lead, 1, H, W}
    local wdt = x.dtype == "float64" and "float64" or "float32"
    local div = a.divisor_override or (k[1] * k[2])
    local w = Tensor.full({1, 1, k[1], k[2]}, 1 / div, {dtype = wdt, device = x.device})
    local y = F.conv2d(x1, w, nil, {stride = stride, padding = pad})
    if a.count_include_pad == false and a.divisor_override == nil and (pad[1] > 0 or pad[2] > 0) then
        -- divide by the number of input pixels under each window instead of k
        local ones = Tensor.ones({1, 1, H, W}, {dtype = wdt, device = x.device})
        local count = autograd.no_grad(F.conv2d, ones, Tensor.ones({1, 1, k[1], k[2]}, {dtype = wdt,
            device = x.device}), nil, {stride = stride, padding = pad})
        y = y * ((k[1] * k[2]) / count)
    end
    local ys = y.shape
    if nd == 4 then return F._cast(y:reshape{shape[1], shape[2], ys[3], ys[4]}, x.dtype) end
    return F._cast(y:reshape{shape[1], ys[3], ys[4]}, x.dtype)
end

return F
