-- lua/nemo/nn/layers.lua: the leaf layers: Linear, LayerNorm, RMSNorm, GroupNorm, Conv2d,
-- Conv3d, Embedding, Dropout and the activations (GELU, SiLU, ReLU, Tanh, Sigmoid, Identity).
--
-- Parameters have PyTorch's shapes and names (Linear.weight is (out, in); Conv2d.weight is
-- (out, in / groups, kh, kw)) and PyTorch's default initialisation (reset_parameters):
-- kaiming_uniform_(a = sqrt(5)) weights and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) biases for
-- Linear and Conv, N(0, 1) for Embedding, ones/zeros for the norms; random draws come from
-- opts.generator or nemo's default generator. Every constructor takes {dtype=, device=}.
-- forward checks the input's shape against the layer and names both in the error; the
-- computation itself is one F call (F.linear, F.layer_norm, ...), looked up when forward runs.
local class = require "nemo.class"
local Tensor = require "nemo.tensor"
local F = require "nemo.functional"
local Module = require "nemo.nn.module"

local raise = Module._raise
local init = require "nemo.nn.init_fns"

local fmt, shape_str, is_tensor = Module._fmt, Tensor.shape_str, Tensor.is_tensor

-- ==== helpers ====

local function opts_of(opts) return type(opts) == "table" and opts or {} end

local function factory(opts) return {dtype = opts.dtype, device = opts.device} end

local function check_count(v, what, name, allow_zero)
    if type(v) ~= "number" or v % 1 ~= 0 or v < (allow_zero and 0 or 1) then
        raise(string.format("%s: %s must be a %s integer, got %s", what, name,
            allow_zero and "non-negative" or "positive", tostring(v)))
    end
    return v
end

-- The F function, or an error saying which op family has not landed.
local function op(name, layer)
    local f = F[name]
    if f == nil then
        raise(string.format("%s: F.%s is not available (its op family is not loaded; require \"nemo\")",
            layer, name))
    end
    return f
end

local function header(self) return Module._get_name(self) .. "(" .. self:extra_repr() .. ")" end

local function input_error(self, x, expected)
    raise(string.format("%s: expected input %s, got shape %s", header(self), expected, shape_str(x.shape)))
end

local function check_input(self, x)
    if not is_tensor(x) then
        raise(string.format("%s: expected a tensor input, got %s", header(self), type(x)))
    end
end

-- n-tuple from a number or a table of n numbers
local function ntuple(v, n, what, name)
    if type(v) == "number" then
        local t = {}
        for i = 1, n do t[i] = v end
        return t
    end
    if type(v) ~= "table" or #v ~= n then
        raise(string.format("%s: %s must be a number or a table of %d numbers, got %s", what, name, n,
            type(v) == "table" and shape_str(v) or tostring(v)))
    end
    local t = {}
    for i = 1, n do t[i] = v[i] end
    return t
end

local function all_equal(t, v)
    for i = 1, #t do if t[i] ~= v then return false end end
    return true
end

local function shape_of(s, what)
    if type(s) == "number" then s = {s} end
    if type(s) ~= "table" or #s == 0 then
        raise(string.format("%s: normalized_shape must be a positive integer or a table of them, got %s", what,
            tostring(s)))
    end
    local out = {}
    for i, v in ipairs(s) do out[i] = check_count(v, what, "normalized_shape[" .. i .. "]") end
    return out
end

-- x's trailing dims must equal shape
local function check_trailing(self, x, shape)
    local xs = x.shape
    local ok = #xs >= #shape
    if ok then
        for i = 1, #shape do
            if xs[#xs - #shape + i] ~= shape[i] then ok = false; break end
        end
    end
    if not ok then input_error(self, x, "(..., " .. table.concat(shape, ", ") .. ")") end
end

-- Linear/Conv bias bound: 1/sqrt(fan_in) of the weight (0 when fan_in is 0)
local function reset_weight_bias(w, b, generator)
    init.kaiming_uniform_(w, {a = math.sqrt(5), generator = generator})
    if b ~= nil then
        local fan_in = init.calculate_fan_in_and_fan_out(w)
        local bound = fan_in > 0 and 1 / math.sqrt(fan_in) or 0
        init.uniform_(b, -bound, bound, {generator = generator})
    end
end

-- ==== Linear ====

-- Linear(in_features, out_features, {bias=true, dtype=, device=, generator=}): y = x W^T + b
local Linear = class("nemo.nn.Linear", Module)
function Linear:__init(in_features, out_features, opts)
    Module.__init(self)
    opts = opts_of(opts)
    self.in_features = check_count(in_features, "Linear", "in_features", true)
    self.out_features = check_count(out_features, "Linear", "out_features", true)
    self:register_parameter("weight", Tensor.empty({out_features, in_features}, factory(opts)))
    self:register_parameter("bias", opts.bias ~= false and Tensor.empty({out_features}, factory(opts)) or nil)
    self.generator = opts.generator
    self:reset_parameters()
end
function Linear:reset_parameters()
    reset_weight_bias(self.weight, self.bias, self.generator)
end
function Linear:forward(x)
    check_input(self, x)
    local s = x.shape
    if #s == 0 or s[#s] ~= self.in_features then input_error(self, x, "(..., " .. self.in_features .. ")") end
    return op("linear", "Linear")(x, self.weight, self.bias)
end
function Linear:extra_repr()
    return string.format("in_features=%d, out_features=%d, bias=%s", self.in_features, self.out_features,
        tostring(self.bias ~= nil))
end

-- ==== norms ====

-- LayerNorm(normalized_shape, {eps=1e-5, elementwise_affine=true, bias=true, dtype=, device=})
-- No parameters at all when elementwise_affine=false; no bias when bias=false.
local LayerNorm = class("nemo.nn.LayerNorm", Module)
function LayerNorm:__init(normalized_shape, opts)
    Module.__init(self)
    opts = opts_of(opts)
    self.normalized_shape = shape_of(normalized_shape, "LayerNorm")
    self.eps = opts.eps or 1e-5
    self.elementwise_affine = opts.elementwise_affine ~= false
    if self.elementwise_affine then
        self:register_parameter("weight", Tensor.ones(self.normalized_shape, factory(opts)))
        self:register_parameter("bias", opts.bias ~= false and Tensor.zeros(self.normalized_shape, factory(opts)) or nil)
    else
        self:register_parameter("weight", nil)
        self:register_parameter("bias", nil)
    end
end
function LayerNorm:reset_parameters()
    if self.weight then init.ones_(self.weight) end
    if self.bias then init.zeros_(self.bias) end
end
function LayerNorm:forward(x)
    check_input(self, x)
    check_trailing(self, x, self.normalized_shape)
    return op("layer_norm", "LayerNorm")(x, self.normalized_shape, self.weight, self.bias, self.eps)
end
function LayerNorm:extra_repr()
    return string.format("%s, eps=%s, elementwise_affine=%s", shape_str(self.normalized_shape), fmt(self.eps),
        tostring(self.elementwise_affine))
end

-- RMSNorm(normalized_shape, {eps=nil, elementwise_affine=true, dtype=, device=}); eps=nil lets
-- F.rms_norm use the input dtype's epsilon, as torch does.
local RMSNorm = class("nemo.nn.RMSNorm", Module)
function RMSNorm:__init(normalized_shape, opts)
    Module.__init(self)
    opts = opts_of(opts)
    self.normalized_shape = shape_of(normalized_shape, "RMSNorm")
    self.eps = opts.eps
    self.elementwise_affine = opts.elementwise_affine ~= false
    self:register_parameter("weight",
        self.elementwise_affine and Tensor.ones(self.normalized_shape, factory(opts)) or nil)
end
function RMSNorm:reset_parameters()
    if self.weight then init.ones_(self.weight) end
end
function RMSNorm:forward(x)
    check_input(self, x)
    check_trailing(self, x, self.normalized_shape)
    return op("rms_norm", "RMSNorm")(x, self.normalized_shape, self.weight, self.eps)
end
function RMSNorm:extra_repr()
    return string.format("%s, eps=%s, elementwise_affine=%s", shape_str(self.normalized_shape), fmt(self.eps),
        tostring(self.elementwise_affine))
end

-- GroupNorm(num_groups, num_channels, {eps=1e-5, affine=true, dtype=, device=}); input (N, C, *)
local GroupNorm = class("nemo.nn.GroupNorm", Module)
function GroupNorm:__init(num_groups, num_channels, opts)
    Module.__init(self)
    opts = opts_of(opts)
    check_count(num_groups, "GroupNorm", "num_groups")
    check_count(num_channels, "GroupNorm", "num_channels")
    if num_channels % num_groups ~= 0 then
        raise(string.format("GroupNorm: num_channels (%d) must be divisible by num_groups (%d)", num_channels,
            num_groups))
    end
    self.num_groups, self.num_channels = num_groups, num_channels
    self.eps = opts.eps or 1e-5
    self.affine = opts.affine ~= false
    self:register_parameter("weight", self.affine and Tensor.ones({num_channels}, factory(opts)) or nil)
    self:register_parameter("bias", self.affine and Tensor.zeros({num_channels}, factory(opts)) or nil)
end
function GroupNorm:reset_parameters()
    if self.weight then init.ones_(self.weight) end
    if self.bias then init.zeros_(self.bias) end
end
function GroupNorm:forward(x)
    check_input(self, x)
    local s = x.shape
    if #s < 2 or s[2] ~= self.num_channels then input_error(self, x, "(N, " .. self.num_channels .. ", *)") end
    return op("group_norm", "GroupNorm")(x, self.num_groups, self.weight, self.bias, self.eps)
end
function GroupNorm:extra_repr()
    return string.format("%d, %d, eps=%s, affine=%s", self.num_groups, self.num_channels, fmt(self.eps),
        tostring(self.affine))
end

-- ==== convolutions ====

-- ConvNd(in_channels, out_channels, kernel_size, {stride=1, padding=0, dilation=1, groups=1,
-- bias=true, dtype=, device=, generator=}); padding may also be "same" or "valid".
local function make_conv(n)
    local name = "Conv" .. n .. "d"
    local Conv = class("nemo.nn." .. name, Module)
    local fname = "conv" .. n .. "d"
    function Conv:__init(in_channels, out_channels, kernel_size, opts)
        Module.__init(self)
        opts = opts_of(opts)
        self.in_channels = check_count(in_channels, name, "in_channels")
        self.out_channels = check_count(out_channels, name, "out_channels")
        self.kernel_size = ntuple(kernel_size, n, name, "kernel_size")
        self.stride = ntuple(opts.stride or 1, n, name, "stride")
        local padding = opts.padding or 0
        if type(padding) == "string" then
            if padding ~= "same" and padding ~= "valid" then
                raise(string.format("%s: padding must be a number, a table, 'same' or 'valid', got '%s'", name,
                    padding))
            end
            if padding == "same" and not all_equal(self.stride, 1) then
                raise(name .. ": padding='same' is not supported for strided convolutions")
            end
            self.padding = padding
        else
            self.padding = ntuple(padding, n, name, "padding")
        end
        self.dilation = ntuple(opts.dilation or 1, n, name, "dilation")
        self.groups = check_count(opts.groups or 1, name, "groups")
        if opts.padding_mode ~= nil and opts.padding_mode ~= "zeros" then
            raise(string.format("%s: padding_mode '%s' is not supported (only 'zeros')", name,
                tostring(opts.padding_mode)))
        end
        if in_channels % self.groups ~= 0 or out_channels % self.groups ~= 0 then
            raise(string.format("%s: in_channels (%d) and out_channels (%d) must be divisible by groups (%d)",
                name, in_channels, out_channels, self.groups))
        end
        local wshape = {out_channels, in_channels / self.groups}
        for i = 1, n do wshape[#wshape + 1] = self.kernel_size[i] end
        self:register_parameter("weight", Tensor.empty(wshape, factory(opts)))
        self:register_parameter("bias", opts.bias ~= false and Tensor.empty({out_channels}, factory(opts)) or nil)
        self.generator = opts.generator
        self:reset_parameters()
    end
    function Conv:reset_parameters()
        reset_weight_bias(self.weight, self.bias, self.generator)
    end
    function Conv:forward(x)
        check_input(self, x)
        local s = x.shape
        local batched = #s == n + 2
        if not (batched or #s == n + 1) or s[batched and 2 or 1] ~= self.in_channels then
            input_error(self, x, string.format("(N, %d, %s) or (%d, %s)", self.in_channels,
                n == 2 and "H, W" or "D, H, W", self.in_channels, n == 2 and "H, W" or "D, H, W"))
        end
        if not batched then x = x:unsqueeze(0) end
        local y = op(fname, name)(x, self.weight, self.bias,
            {stride = self.stride, padding = self.padding, dilation = self.dilation, groups = self.groups})
        if not batched then y = y:squeeze(0) end
        return y
    end
    function Conv:extra_repr()
        local s = string.format("%d, %d, kernel_size=%s, stride=%s", self.in_channels, self.out_channels,
            shape_str(self.kernel_size), shape_str(self.stride))
        if type(self.padding) == "string" then s = s .. ", padding=" .. self.padding
        elseif not all_equal(self.padding, 0) then s = s .. ", padding=" .. shape_str(self.padding) end
        if not all_equal(self.dilation, 1) then s = s .. ", dilation=" .. shape_str(self.dilation) end
        if self.groups ~= 1 then s = s .. ", groups=" .. self.groups end
        if self.bias == nil then s = s .. ", bias=false" end
        return s
    end
    return Conv
end
local Conv2d = make_conv(2)
local Conv3d = make_conv(3)

-- ==== Embedding ====

-- Embedding(num_embeddings, embedding_dim, {padding_idx=, dtype=, device=, generator=}):
-- weight (num, dim) ~ N(0, 1), the padding_idx row zero. padding_idx counts from 0 as in torch.
local Embedding = class("nemo.nn.Embedding", Module)
function Embedding:__init(num_embeddings, embedding_dim, opts)
    Module.__init(self)
    opts = opts_of(opts)
    self.num_embeddings = check_count(num_embeddings, "Embedding", "num_embeddings", true)
    self.embedding_dim = check_count(embedding_dim, "Embedding", "embedding_dim", true)
    local pi = opts.padding_idx
    if pi ~= nil then
        if type(pi) ~= "number" or pi % 1 ~= 0 or pi >= num_embeddings or pi < -num_embeddings then
            raise(string.format("Embedding: padding_idx must be within num_embeddings (%d), got %s", num_embeddings,
                tostring(pi)))
        end
        if pi < 0 then pi = pi + num_embeddings end
    end
    self.padding_idx = pi
    self.generator = opts.generator
    self:register_parameter("weight", Tensor.empty({num_embeddings, embedding_dim}, factory(opts)))
    self:reset_parameters()
end
function Embedding:reset_parameters()
    init.normal_(self.weight, 0, 1, {generator = self.generator})
    if self.padding_idx ~= nil then init.zeros_(self.weight:select(0, self.padding_idx)) end
end
function Embedding:forward(idx)
    check_input(self, idx)
    if idx:is_floating_point() or idx.dtype == "bool" then
        raise(string.format("%s: expected integer indices (int64 or int32), got dtype %s", header(self), idx.dtype))
    end
    local f = op("embedding", "Embedding")
    if self.padding_idx ~= nil then return f(idx, self.weight, {padding_idx = self.padding_idx}) end
    return f(idx, self.weight)
end
function Embedding:extra_repr()
    local s = string.format("%d, %d", self.num_embeddings, self.embedding_dim)
    if self.padding_idx ~= nil then s = s .. ", padding_idx=" .. self.padding_idx end
    return s
end

-- ==== Dropout ====

-- Dropout(p=0.5, {generator=}): in training, zeroes each element with probability p and scales
-- the rest by 1/(1-p) (mask drawn with nemo.rand in float32); identity in eval or when p = 0.
local Dropout = class("nemo.nn.Dropout", Module)
function Dropout:__init(p, opts)
    Module.__init(self)
    if p == nil then p = 0.5 end
    if type(p) ~= "number" or p < 0 or p > 1 then
        raise("Dropout: probability has to be between 0 and 1, but got " .. tostring(p))
    end
    self.p = p
    self.generator = opts_of(opts).generator
end
function Dropout:forward(x)
    check_input(self, x)
    local p = self.p
    if p == 0 or not self.training then return x end
    if p == 1 then return x * 0 end
    local r = Tensor.rand(x.shape, {dtype = "float32", device = x.device, generator = self.generator})
    local mask = op("ge", "Dropout")(r, p):to{dtype = x.dtype}
    mask:mul_(1 / (1 - p))
    return x * mask
end
function Dropout:extra_repr() return "p=" .. fmt(self.p) end

-- ==== activations ====

-- GELU({approximate="none"|"tanh"}) (also GELU("tanh"))
local GELU = class("nemo.nn.GELU", Module)
function GELU:__init(opts)
    Module.__init(self)
    local a = type(opts) == "string" and opts or opts_of(opts).approximate or "none"
    if a ~= "none" and a ~= "tanh" then raise("GELU: approximate must be 'none' or 'tanh', got '" .. tostring(a) .. "'") end
    self.approximate = a
end
function GELU:forward(x)
    check_input(self, x)
    return op("gelu", "GELU")(x, {approximate = self.approximate})
end
function GELU:extra_repr() return "approximate=" .. fmt(self.approximate) end

local function simple(name, fname)
    local cls = class("nemo.nn." .. name, Module)
    function cls:__init() Module.__init(self) end
    function cls:forward(x)
        check_input(self, x)
        return op(fname, name)(x)
    end
    return cls
end
local SiLU = simple("SiLU", "silu")
local ReLU = simple("ReLU", "relu")
local Tanh = simple("Tanh", "tanh")
local Sigmoid = simple("Sigmoid", "sigmoid")

-- Identity(...): returns its input; constructor arguments are ignored (as torch).
local Identity = class("nemo.nn.Identity", Module)
function Identity:__init() Module.__init(self) end
function Identity:forward(x) return x end

return {
    Linear = Linear, LayerNorm = LayerNorm, RMSNorm = RMSNorm, GroupNorm = GroupNorm,
    Conv2d = Conv2d, Conv3d = Conv3d, Embedding = Embedding, Dropout = Dropout,
    GELU = GELU, SiLU = SiLU, ReLU = ReLU, Tanh = Tanh, Sigmoid = Sigmoid, Identity = Identity,
}
