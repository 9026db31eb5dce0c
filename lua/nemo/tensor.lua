-- lua/nemo/tensor.lua: the Lua Tensor. A Tensor is a small table {_c = <nemo_tensor* cdata>}
-- plus autograd fields (requires_grad, grad, grad_fn). The cdata carries an ffi.gc finalizer
-- (one engine reference); t:free() gives it back at once.
--
-- Dimension arguments count from 0 as in PyTorch (negatives from the end); Lua tables that
-- describe tensors (t.shape, t:tolist()) are 1-based Lua arrays.
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local autograd = require "nemo.autograd"

local C = nffi.C
local own, check = nffi.own, nffi.check
local int64_array, double_array = nffi.int64_array, nffi.double_array

local Tensor = {}          -- the class: Tensor.methods holds the methods, Tensor.props the properties
local methods, props = {}, {}
Tensor.methods, Tensor.props = methods, props

local mt = {__name = "nemo.Tensor"}
Tensor.mt = mt

mt.__index = function(t, k)
    local m = methods[k]
    if m ~= nil then return m end
    local p = props[k]
    if p ~= nil then return p(t) end
    if type(k) == "table" or type(k) == "number" then return methods.__getitem(t, k) end
    return nil
end
mt.__newindex = function(t, k, v)
    if type(k) == "table" or type(k) == "number" then return methods.__setitem(t, k, v) end
    if props[k] ~= nil and not (k == "requires_grad" or k == "grad" or k == "grad_fn") then
        error("tensor: '" .. tostring(k) .. "' is read-only", 2)
    end
    if k == "requires_grad" and v then
        if C.nemo_dtype_is_float(t._c.dtype) == 0 then
            error("requires_grad: only floating point tensors can require gradients (dtype " .. t.dtype .. ")", 2)
        end
    end
    rawset(t, k, v)
end

local function wrap(p)
    return setmetatable({_c = own(p)}, mt)
end
Tensor.wrap = wrap
autograd._set_tensor_class(Tensor)

function Tensor.is_tensor(x) return type(x) == "table" and getmetatable(x) == mt end
local is_tensor = Tensor.is_tensor

-- ==== dtypes and devices ====

local dtype_ids = {}
for _, name in ipairs { "float32", "float64", "bfloat16", "float16", "int64", "int32", "bool" } do
    dtype_ids[name] = C.nemo_dtype_from_name(name)
end
Tensor.dtype_ids = dtype_ids
local dtype_names = {}
for name, id in pairs(dtype_ids) do dtype_names[id] = name end
Tensor.dtype_names = dtype_names

-- "float32", "torch.bfloat16", "bf16", "half" ... -> id; errors name the accepted values.
local function dtype_id(d, what)
    if d == nil then return nil end
    if type(d) == "number" then return d end
    local id = C.nemo_dtype_from_name(tostring(d))
    if id < 0 then
        error(string.format("%s: unknown dtype '%s' (expected float32, float64, bfloat16, float16, int64, int32 or bool)",
            what or "dtype", tostring(d)), 3)
    end
    return id
end
Tensor.dtype_id = dtype_id

-- "cpu", "cuda", "cuda:1" -> devtype, devindex.
local function parse_device(d, what)
    if d == nil then return nil end
    if type(d) ~= "string" then error((what or "device") .. ": expected a string like 'cpu' or 'cuda:0', got " .. type(d), 3) end
    if d == "cpu" or d == "cpu:0" then return 0, 0 end
    if d == "cuda" then
        local ok, cuda = pcall(require, "nemo.cuda")
        return 1, (ok and cuda._current_index) and cuda._current_index() or 0
    end
    local idx = d:match("^cuda:(%d+)$")
    if idx then return 1, tonumber(idx) end
    error(string.format("%s: unknown device '%s' (expected 'cpu', 'cuda' or 'cuda:N')", what or "device", d), 3)
end
Tensor.parse_device = parse_device

local function device_name(devtype, devindex)
    if devtype == 0 then return "cpu" end
    return "cuda:" .. devindex
end

local default_dtype = dtype_ids.float32

-- PyTorch type promotion of two dtype ids (bool < integers < floating; bf16 with f16 -> f32).
local rank = {[dtype_ids.bool] = 0, [dtype_ids.int32] = 1, [dtype_ids.int64] = 2}
function Tensor.promote(a, b)
    if a == b then return a end
    local fa, fb = rank[a] == nil, rank[b] == nil
    if fa and fb then
        if a == dtype_ids.float64 or b == dtype_ids.float64 then return dtype_ids.float64 end
        return dtype_ids.float32
    end
    if fa then return a end
    if fb then return b end
    return rank[a] > rank[b] and a or b
end
function Tensor.set_default_dtype(d) default_dtype = dtype_id(d, "set_default_dtype") end
function Tensor.get_default_dtype() return dtype_names[default_dtype] end

-- ==== properties ====

props.shape = function(t)
    local c = t._c
    local s = {}
    for i = 0, c.ndim - 1 do s[i + 1] = tonumber(c.shape[i]) end
    return s
end
props.dtype = function(t) return dtype_names[t._c.dtype] end
props.device = function(t) local c = t._c; return device_name(c.devtype, c.devindex) end
props.ndim = function(t) return t._c.ndim end
props.is_leaf = function(t) return rawget(t, "grad_fn") == nil end
props.is_cuda = function(t) return t._c.devtype == 1 end
props.requires_grad = function() return false end
props.grad = function() return nil end
props.grad_fn = function() return nil end
props.T = function(t) return t:permute(t:_reverse_dims()) end
props.data = function(t) return t:detach() end

-- Normalise a 0-based (possibly negative) dim against ndim.
local function normdim(d, ndim, what)
    if type(d) ~= "number" or d % 1 ~= 0 then
        error(string.format("%s: dimension must be an integer, got %s", what or "dim", tostring(d)), 3)
    end
    local n = ndim == 0 and 1 or ndim
    if d < -n or d >= n then
        error(string.format("%s: dimension %d out of range (expected to be in range of [%d, %d])",
            what or "dim", d, -n, n - 1), 3)
    end
    if d < 0 then d = d + n end
    return d
end
Tensor.normdim = normdim

-- shape from varargs: f(2, 3), f({2, 3}) or f{2, 3}; returns shape table and the trailing
-- options table if any (a table with non-integer keys).
local function shape_args(...)
    local n = select("#", ...)
    local last = n > 0 and select(n, ...) or nil
    local opts
    if type(last) == "table" and not is_tensor(last) and (next(last) == nil or last[1] == nil) and n >= 1 then
        local first = select(1, ...)
        if not (n == 1 and type(first) == "table" and next(first) == nil) then
            opts = last
            n = n - 1
        end
    end
    local first = n > 0 and select(1, ...) or nil
    local shape
    if type(first) == "table" then
        shape = {}
        for i, v in ipairs(first) do shape[i] = v end
    else
        shape = {}
        for i = 1, n do shape[i] = select(i, ...) end
    end
    for i, v in ipairs(shape) do
        if type(v) ~= "number" or v % 1 ~= 0 or v < 0 then
            error(string.format("shape: size %d must be a non-negative integer, got %s", i, tostring(v)), 3)
        end
    end
    return shape, opts or {}
end
Tensor.shape_args = shape_args

local function int64s(tbl, n)
    n = n or #tbl
    local a = int64_array(n > 0 and n or 1)
    for i = 1, n do a[i - 1] = tbl[i] end
    return a
end
Tensor.int64s = int64s

-- ==== constructors ====

local function make(shape, opts, what)
    local dt = dtype_id(opts.dtype, what) or default_dtype
    local devtype, devindex = 0, 0
    if opts.device then devtype, devindex = parse_device(opts.device, what) end
    if #shape > 8 then error(what .. ": at most 8 dimensions, got " .. #shape, 3) end
    return wrap(C.nemo_empty(#shape, int64s(shape), dt, devtype, devindex))
end

local function finish_new(t, opts)
    if opts.requires_grad then t:requires_grad_(true) end
    return t
end

function Tensor.empty(...)
    local shape, opts = shape_args(...)
    return finish_new(make(shape, opts, "empty"), opts)
end
function Tensor.zeros(...)
    local shape, opts = shape_args(...)
    local t = make(shape, opts, "zeros")
    check(C.nemo_fill_(t._c, 0))
    return finish_new(t, opts)
end
function Tensor.ones(...)
    local shape, opts = shape_args(...)
    local t = make(shape, opts, "ones")
    check(C.nemo_fill_(t._c, 1))
    return finish_new(t, opts)
end
function Tensor.full(shape, value, opts)
    opts = opts or {}
    if type(value) ~= "number" and type(value) ~= "boolean" then
        error("full: fill value must be a number or boolean, got " .. type(value), 2)
    end
    if opts.dtype == nil and type(value) == "boolean" then opts = setmetatable({dtype = "bool"}, {__index = opts}) end
    local t = make(shape_args(shape), opts, "full")
    check(C.nemo_fill_(t._c, value == true and 1 or value == false and 0 or value))
    return finish_new(t, opts)
end

local function like_opts(t, opts)
    opts = opts or {}
    return {dtype = opts.dtype or t.dtype, device = opts.device or t.device, requires_grad = opts.requires_grad}
end
function Tensor.zeros_like(t, opts) return Tensor.zeros(t.shape, like_opts(t, opts)) end
function Tensor.ones_like(t, opts) return Tensor.ones(t.shape, like_opts(t, opts)) end
function Tensor.empty_like(t, opts) return Tensor.empty(t.shape, like_opts(t, opts)) end
function Tensor.full_like(t, v, opts) return Tensor.full(t.shape, v, like_opts(t, opts)) end

local function is_integral(x) return type(x) == "number" and x % 1 == 0 and x > -2^53 and x < 2^53 end

-- nemo.tensor(value, {dtype=, device=, requires_grad=}): value is a number, a boolean, a
-- (nested) Lua array of them, or a tensor (copied). Integers give int64, booleans bool, other
-- numbers the default dtype (float32), as torch.tensor does.
function Tensor.tensor(value, opts)
    opts = opts or {}
    if is_tensor(value) then
        local t = value:detach():to{dtype = opts.dtype or value.dtype, device = opts.device or value.device}
        if rawequal(t._c, value._c) or t._c.storage == value._c.storage then t = t:clone() end
        return finish_new(t, opts)
    end
    local shape, flat = {}, {}
    local all_int, all_bool = true, true
    local function walk(v, depth)
        if type(v) == "table" then
            if is_tensor(v) then error("tensor: nested tensors are not accepted; use nemo.stack", 4) end
            local n = #v
            if shape[depth] == nil then shape[depth] = n
            elseif shape[depth] ~= n then
                error(string.format("tensor: ragged nested table: dimension %d has lengths %d and %d",
                    depth - 1, shape[depth], n), 4)
            end
            for i = 1, n do walk(v[i], depth + 1) end
        elseif type(v) == "number" then
            if shape[depth] ~= nil and depth <= #shape then
                error("tensor: ragged nested table: a number where a table was expected", 4)
            end
            all_bool = false
            if not is_integral(v) then all_int = false end
            flat[#flat + 1] = v
        elseif type(v) == "boolean" then
            all_int = false
            flat[#flat + 1] = v and 1 or 0
        else
            error("tensor: expected numbers, booleans or nested tables of them, got " .. type(v), 4)
        end
    end
    walk(value, 1)
    local n = #flat
    local dt = opts.dtype
    if dt == nil then
        if n > 0 and all_bool then dt = "bool"
        elseif n > 0 and all_int then dt = "int64"
        else dt = dtype_names[default_dtype] end
    end
    local t = make(shape, {dtype = dt}, "tensor")
    if n > 0 then
        local buf = double_array(n)
        for i = 1, n do buf[i - 1] = flat[i] end
        check(C.nemo_write_f64(t._c, buf))
    end
    if opts.device and opts.device ~= "cpu" then t = t:to{device = opts.device} end
    return finish_new(t, opts)
end

-- arange(end) / arange(start, end[, step]) [, opts]: integers give int64 as in torch.
function Tensor.arange(a, b, c, opts)
    if type(b) == "table" then opts, b = b, nil end
    if type(c) == "table" then opts, c = c, nil end
    opts = opts or {}
    local start, stop, step
    if b == nil then start, stop, step = 0, a, 1 else start, stop, step = a, b, c or 1 end
    if type(start) ~= "number" or type(stop) ~= "number" or type(step) ~= "number" then
        error("arange: start, end and step must be numbers", 2)
    end
    if step == 0 then error("arange: step must be nonzero", 2) end
    local n = math.ceil((stop - start) / step)
    if n < 0 then n = 0 end
    local dt = dtype_id(opts.dtype, "arange") or
        ((is_integral(start) and is_integral(stop) and is_integral(step)) and dtype_ids.int64 or default_dtype)
    local devtype, devindex = parse_device(opts.device or "cpu", "arange")
    return finish_new(wrap(C.nemo_arange(start, step, n, dt, devtype, devindex)), opts)
end

function Tensor.linspace(a, b, steps, opts)
    opts = opts or {}
    if type(steps) ~= "number" or steps < 0 or steps % 1 ~= 0 then
        error("linspace: steps must be a non-negative integer, got " .. tostring(steps), 2)
    end
    local dt = dtype_id(opts.dtype, "linspace") or default_dtype
    local devtype, devindex = parse_device(opts.device or "cpu", "linspace")
    return finish_new(wrap(C.nemo_linspace(a, b, steps, dt, devtype, devindex)), opts)
end

-- ==== random numbers ====

local Generator = {}
Generator.__index = Generator
Tensor.GeneratorClass = Generator

-- nemo.Generator(seed): a counter-based generator; state is {seed, offset}.
function Tensor.Generator(seed)
    local g = setmetatable({_g = ffi.new("nemo_generator")}, Generator)
    g:manual_seed(seed or 0)
    return g
end
function Generator:manual_seed(seed)
    if type(seed) ~= "number" or seed % 1 ~= 0 then error("manual_seed: seed must be an integer, got " .. tostring(seed), 2) end
    self._g.seed = seed < 0 and (2^64 + seed) or seed
    self._g.offset = 0
    return self
end
function Generator:initial_seed() return tonumber(self._g.seed) end
function Generator:get_state() return {seed = tonumber(self._g.seed), offset = tonumber(self._g.offset)} end
function Generator:set_state(s)
    self._g.seed = s.seed; self._g.offset = s.offset
    return self
end
Generator.__tostring = function(g) return string.format("nemo.Generator(seed=%d, offset=%d)", tonumber(g._g.seed), tonumber(g._g.offset)) end

local default_generator = Tensor.Generator(0)
Tensor.default_generator = default_generator
function Tensor.manual_seed(seed) default_generator:manual_seed(seed); return default_generator end

local function gen_of(opts)
    local g = opts.generator or default_generator
    if getmetatable(g) ~= Generator then error("random: generator must be a nemo.Generator", 3) end
    return g._g
end

function Tensor.rand(...)
    local shape, opts = shape_args(...)
    local t = make(shape, opts, "rand")
    check(C.nemo_rand_(t._c, gen_of(opts), 0, 1))
    return finish_new(t, opts)
end
function Tensor.randn(...)
    local shape, opts = shape_args(...)
    local t = make(shape, opts, "randn")
    check(C.nemo_randn_(t._c, gen_of(opts), 0, 1))
    return finish_new(t, opts)
end
function Tensor.rand_like(t, opts) opts = opts or {}; local o = like_opts(t, opts); o.generator = opts.generator; return Tensor.rand(t.shape, o) end
function Tensor.randn_like(t, opts) opts = opts or {}; local o = like_opts(t, opts); o.generator = opts.generator; return Tensor.randn(t.shape, o) end
function methods.uniform_(t, a, b, opts)
    check(C.nemo_rand_(t._c, gen_of(opts or {}), a or 0, b or 1)); return t
end
function methods.normal_(t, mean, std, opts)
    check(C.nemo_randn_(t._c, gen_of(opts or {}), mean or 0, std or 1)); return t
end

-- ==== basic methods ====

function methods.size(t, d)
    if d == nil then return t.shape end
    local c = t._c
    return tonumber(c.shape[normdim(d, c.ndim, "size")])
end
function methods.stride(t, d)
    local c = t._c
    if d == nil then
        local s = {}
        for i = 0, c.ndim - 1 do s[i + 1] = tonumber(c.stride[i]) end
        return s
    end
    return tonumber(c.stride[normdim(d, c.ndim, "stride")])
end
function methods.dim(t) return t._c.ndim end
function methods.numel(t) return tonumber(C.nemo_tensor_numel(t._c)) end
function methods.nelement(t) return tonumber(C.nemo_tensor_numel(t._c)) end
function methods.element_size(t) return C.nemo_dtype_size(t._c.dtype) end
function methods.storage_offset(t) return tonumber(t._c.offset) end
function methods.is_contiguous(t) return C.nemo_tensor_is_contiguous(t._c) ~= 0 end
function methods.is_floating_point(t) return C.nemo_dtype_is_float(t._c.dtype) ~= 0 end
function methods.data_ptr(t) return C.nemo_tensor_data(t._c) end
function methods._reverse_dims(t)
    local d = {}
    for i = 1, t._c.ndim do d[i] = t._c.ndim - i end
    return d
end

local outbuf = double_array(1)
function methods.item(t)
    local n = t:numel()
    if n ~= 1 then error(string.format("item: a tensor with %d elements cannot be converted to a number", n), 2) end
    check(C.nemo_get_flat(t._c, 0, outbuf))
    local v = outbuf[0]
    if t._c.dtype == dtype_ids.bool then return v ~= 0 end
    return v
end

function methods.tolist(t)
    local n = t:numel()
    local buf = double_array(n > 0 and n or 1)
    if n > 0 then check(C.nemo_read_f64(t._c, buf)) end
    local isbool = t._c.dtype == dtype_ids.bool
    local shape = t.shape
    if #shape == 0 then
        local v = buf[0]
        if isbool then return v ~= 0 end
        return v
    end
    local pos = 0
    local function build(d)
        local out = {}
        if d == #shape then
            for i = 1, shape[d] do
                local v = buf[pos]; pos = pos + 1
                if isbool then v = v ~= 0 end
                out[i] = v
            end
        else
            for i = 1, shape[d] do out[i] = build(d + 1) end
        end
        return out
    end
    return build(1)
end

-- Release the engine reference now (GPU memory cannot wait for the garbage collector).
-- The tensor is unusable afterwards.
function methods.free(t)
    local c = rawget(t, "_c")
    if c ~= nil then
        ffi.gc(c, nil)
        C.nemo_tensor_release(c)
        rawset(t, "_c", nil)
    end
end

-- Tensor.free_all(...): free each tensor given (nil and already freed ones are skipped): the
-- dead intermediates of a function, released as soon as they are dead.
function Tensor.free_all(...)
    for i = 1, select("#", ...) do
        local t = select(i, ...)
        if t ~= nil and rawget(t, "_c") ~= nil then methods.free(t) end
    end
end

-- ==== conversion ====

local function to_bw(node, g)
    return g:to{dtype = node.src_dtype, device = node.src_device}
end

-- t:to{dtype=, device=, copy=, non_blocking=} (also t:to("bfloat16"), t:to("cuda:0")).
-- non_blocking = true: a copy between a pinned CPU tensor (t:pin_memory()) and a CUDA device,
-- same dtype, is queued on the device's current stream and returns at once (reading a pinned
-- result on the host needs a synchronize or an event first); other copies are synchronous.
function methods.to(t, opts, copy)
    if type(opts) == "string" then
        if C.nemo_dtype_from_name(opts) >= 0 then opts = {dtype = opts} else opts = {device = opts} end
    elseif is_tensor(opts) then
        opts = {dtype = opts.dtype, device = opts.device}
    end
    opts = opts or {}
    local c = t._c
    local dt = dtype_id(opts.dtype, "to") or c.dtype
    local devtype, devindex = c.devtype, c.devindex
    if opts.device then devtype, devindex = parse_device(opts.device, "to") end
    if dt == c.dtype and devtype == c.devtype and devindex == c.devindex and not (opts.copy or copy) then
        return t
    end
    local o
    if opts.non_blocking and devtype == 0 and c.devtype ~= 0 and dt == c.dtype then   -- into pinned host memory
        o = wrap(C.nemo_empty_pinned(c.ndim, c.shape, dt))
    else
        o = wrap(C.nemo_empty(c.ndim, c.shape, dt, devtype, devindex))
    end
    check((opts.non_blocking and C.nemo_copy_async_ or C.nemo_copy_)(o._c, c))
    local node = autograd.node("to", to_bw, o, t)
    if node then
        node.src_dtype = dtype_names[c.dtype]
        node.src_device = device_name(c.devtype, c.devindex)
        if C.nemo_dtype_is_float(dt) == 0 then
            error("to: cannot convert a tensor that requires grad to the non-float dtype " .. dtype_names[dt], 2)
        end
    end
    return o
end
function methods.float(t) return t:to{dtype = "float32"} end
function methods.double(t) return t:to{dtype = "float64"} end
function methods.bfloat16(t) return t:to{dtype = "bfloat16"} end
function methods.half(t) return t:to{dtype = "float16"} end
function methods.long(t) return t:to{dtype = "int64"} end
function methods.int(t) return t:to{dtype = "int32"} end
function methods.bool(t) return t:to{dtype = "bool"} end
function methods.cpu(t) return t:to{device = "cpu"} end
function methods.cuda(t, idx) return t:to{device = "cuda:" .. (idx or 0)} end
function methods.type_as(t, other) return t:to{dtype = other.dtype} end

local function clone_bw(_, g) return g end
function methods.clone(t)
    local o = wrap(C.nemo_clone(t._c))
    autograd.node("clone", clone_bw, o, t)
    return o
end
function methods.contiguous(t)
    if C.nemo_tensor_is_contiguous(t._c) ~= 0 then return t end
    return t:clone()
end

-- t:pin_memory(): a contiguous copy of a CPU tensor in page-locked memory (copies to a CUDA
-- device from it are DMA transfers), or t when it already is one; an error without a CUDA
-- device, as in torch. t:is_pinned(). The copy is a new leaf (no gradient flows through it).
function methods.pin_memory(t)
    if C.nemo_is_pinned(t._c) ~= 0 and C.nemo_tensor_is_contiguous(t._c) ~= 0 then return t end
    return wrap(C.nemo_pin_memory(t._c))
end
function methods.is_pinned(t) return C.nemo_is_pinned(t._c) ~= 0 end

-- t:record_stream(s): t's memory is also used by work queued on cuda.Stream s (of t's device);
-- when t is freed, its block is reused only once that work has finished (torch's record_stream).
function methods.record_stream(t, s)
    local cuda = require "nemo.cuda"
    if not cuda.is_stream(s) then error("record_stream: expected a cuda.Stream, got " .. type(s), 2) end
    if t._c.devtype ~= 1 or t._c.devindex ~= s.device then
        error(string.format("record_stream: the tensor is on %s, the stream on cuda:%d", t.device, s.device), 2)
    end
    check(C.nemo_record_stream(t._c, s.id))
end

-- In-place ops on tensors that autograd tracks are refused, as in torch, for leaves that
-- require grad while grad mode is on.
local function check_inplace(t, what)
    if autograd.is_grad_enabled() and rawget(t, "requires_grad") and rawget(t, "grad_fn") == nil then
        error(what .. ": a leaf tensor that requires grad cannot be modified in place (use nemo.no_grad)", 3)
    end
end
Tensor.check_inplace = check_inplace

-- t:copy_(src, non_blocking): non_blocking as in t:to (pinned CPU <-> CUDA, same dtype and shape).
function methods.copy_(t, src, non_blocking)
    if not is_tensor(src) then error("copy_: expected a tensor, got " .. type(src), 2) end
    check_inplace(t, "copy_")
    check((non_blocking and C.nemo_copy_async_ or C.nemo_copy_)(t._c, src._c))
    return t
end
function methods.fill_(t, v)
    check_inplace(t, "fill_")
    if type(v) == "boolean" then v = v and 1 or 0 end
    if is_tensor(v) then v = v:item() end
    check(C.nemo_fill_(t._c, v))
    return t
end
function methods.zero_(t) return t:fill_(0) end

-- ==== autograd ====

function methods.detach(t)
    return wrap(C.nemo_tensor_alias(t._c))
end
function methods.detach_(t)
    rawset(t, "grad_fn", nil)
    rawset(t, "requires_grad", nil)
    return t
end
function methods.requires_grad_(t, on)
    if on == nil then on = true end
    if on and C.nemo_dtype_is_float(t._c.dtype) == 0 then
        error("requires_grad_: only floating point tensors can require gradients (dtype " .. t.dtype .. ")", 2)
    end
    if not on and rawget(t, "grad_fn") ~= nil then
        error("requires_grad_: cannot turn off requires_grad on a non-leaf tensor; use detach()", 2)
    end
    rawset(t, "requires_grad", on or nil)
    return t
end
function methods.retain_grad(t)
    local fn = rawget(t, "grad_fn")
    if fn then fn.retain = t end
    return t
end
function methods.backward(t, grad)
    if not rawget(t, "requires_grad") then
        error("backward: element 0 of tensors does not require grad and does not have a grad_fn", 2)
    end
    if grad == nil then
        if t:numel() ~= 1 then
            error(string.format("backward: grad can be implicitly created only for scalar outputs (shape %s)",
                Tensor.shape_str(t.shape)), 2)
        end
        grad = Tensor.ones_like(t)
    elseif not is_tensor(grad) then
        grad = Tensor.full(t.shape, grad, {dtype = t.dtype, device = t.device})
    end
    autograd.backward(t, grad)
end
function methods.register_post_accumulate_grad_hook(t, fn)
    local hooks = rawget(t, "_post_accumulate_hooks")
    if not hooks then hooks = {}; rawset(t, "_post_accumulate_hooks", hooks) end
    hooks[#hooks + 1] = fn
end

-- ==== printing ====

function Tensor.shape_str(shape)
    local parts = {}
    for i, v in ipairs(shape) do parts[i] = tostring(v) end
    return "(" .. table.concat(parts, ", ") .. (#shape == 1 and ",)" or ")")
end

local function fmt_number(v, isfloat, isbool)
    if isbool then return v ~= 0 and "true" or "false" end
    if not isfloat then return string.format("%d", v) end
    if v ~= v then return "nan" end
    if v == math.huge then return "inf" end
    if v == -math.huge then return "-inf" end
    local a = math.abs(v)
    if a ~= 0 and (a >= 1e5 or a < 1e-4) then return string.format("%.4e", v) end
    return string.format("%.4f", v)
end

mt.__tostring = function(t)
    if rawget(t, "_c") == nil then return "tensor(<freed>)" end
    local shape = t.shape
    local n = t:numel()
    local isfloat = t:is_floating_point()
    local isbool = t._c.dtype == dtype_ids.bool
    local body
    local ok = true
    if n == 0 then
        body = "[]"
    else
        local vals = double_array(n)
        ok = C.nemo_read_f64(t._c, vals) >= 0
        if not ok then
            body = "<" .. ffi.string(C.nemo_last_error()) .. ">"
        else
            local summarize = n > 1000
            local edge = 3
            local strs, width = {}, 0
            -- format once to find the common width
            local function idx_of(coords)
                local k = 0
                for i = 1, #shape do k = k * shape[i] + coords[i] end
                return k
            end
            local function rec(d, coords, indent)
                if d > #shape then
                    local s = fmt_number(vals[idx_of(coords)], isfloat, isbool)
                    if #s > width then width = #s end
                    strs[#strs + 1] = s
                    return {leaf = #strs}
                end
                local items = {}
                local len = shape[d]
                local i = 0
                while i < len do
                    if summarize and len > 2 * edge and i == edge then
                        items[#items + 1] = {ellipsis = true}
                        i = len - edge
                    end
                    coords[d] = i
                    items[#items + 1] = rec(d + 1, coords, indent .. " ")
                    i = i + 1
                end
                coords[d] = nil
                return {items = items, indent = indent}
            end
            local tree = rec(1, {}, "        ")
            local function render(node, d)
                if node.leaf then return string.rep(" ", width - #strs[node.leaf]) .. strs[node.leaf] end
                if node.ellipsis then return "..." end
                local parts = {}
                for i, it in ipairs(node.items) do parts[i] = render(it, d + 1) end
                if d == #shape then return "[" .. table.concat(parts, ", ") .. "]" end
                local sep = "," .. string.rep("\n", #shape - d) .. node.indent
                return "[" .. table.concat(parts, sep) .. "]"
            end
            body = #shape == 0 and render(tree, 1) or render(tree, 1)
        end
    end
    local extra = {}
    extra[#extra + 1] = "shape=" .. Tensor.shape_str(shape)
    extra[#extra + 1] = "dtype=" .. t.dtype
    extra[#extra + 1] = "device=" .. t.device
    local fn = rawget(t, "grad_fn")
    if fn then extra[#extra + 1] = "grad_fn=" .. fn.name
    elseif rawget(t, "requires_grad") then extra[#extra + 1] = "requires_grad=true" end
    return "tensor(" .. body .. ", " .. table.concat(extra, ", ") .. ")"
end

return Tensor
