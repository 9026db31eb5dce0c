-- lua/nemo/nn/init_fns.lua: nn.init, in-place tensor initialisers with torch.nn.init's formulas
-- (kaiming_uniform_, xavier_uniform_, normal_, ...). Each returns the tensor it filled.
--
-- They run under no_grad (filling a parameter is not part of any graph) and draw from nemo's
-- default generator unless opts.generator is given. Arguments follow torch's order; keyword
-- arguments come as a final options table: kaiming_uniform_(w, {a = math.sqrt(5)}) or
-- kaiming_uniform_(w, math.sqrt(5)).
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"

-- errors point at the caller's line outside the library (see nemo.nn.module)
local raise = require("nemo.nn.module")._raise

local init = {}

local function check_tensor(t, what)
    if not Tensor.is_tensor(t) then raise(what .. ": expected a tensor, got " .. type(t)) end
end

local function gen(opts) return {generator = type(opts) == "table" and opts.generator or nil} end

-- fan_in, fan_out of a weight: (out, in, *kernel) -> in * prod(kernel), out * prod(kernel).
function init.calculate_fan_in_and_fan_out(t)
    local s = t.shape
    if #s < 2 then
        raise(string.format("calculate_fan_in_and_fan_out: fan in and fan out can not be computed for a tensor " ..
            "with fewer than 2 dimensions (shape %s)", Tensor.shape_str(s)))
    end
    local receptive = 1
    for i = 3, #s do receptive = receptive * s[i] end
    return s[2] * receptive, s[1] * receptive
end

-- Recommended gain for a nonlinearity (torch.nn.init.calculate_gain).
function init.calculate_gain(nonlinearity, param)
    local linear = {linear = true, conv1d = true, conv2d = true, conv3d = true, conv_transpose1d = true,
                    conv_transpose2d = true, conv_transpose3d = true, sigmoid = true}
    if linear[nonlinearity] then return 1 end
    if nonlinearity == "tanh" then return 5 / 3 end
    if nonlinearity == "relu" then return math.sqrt(2) end
    if nonlinearity == "leaky_relu" then
        local slope = param
        if slope == nil then slope = 0.01 end
        if type(slope) ~= "number" then
            raise("calculate_gain: negative_slope " .. tostring(slope) .. " is not a valid number")
        end
        return math.sqrt(2 / (1 + slope * slope))
    end
    if nonlinearity == "selu" then return 3 / 4 end
    raise("calculate_gain: unsupported nonlinearity " .. tostring(nonlinearity))
end

local function fill_uniform(t, a, b, opts)
    autograd.no_grad(function() t:uniform_(a, b, gen(opts)) end)
    return t
end
local function fill_normal(t, mean, std, opts)
    autograd.no_grad(function() t:normal_(mean, std, gen(opts)) end)
    return t
end

-- uniform_(t, a=0, b=1, {generator=}): values in [a, b).
function init.uniform_(t, a, b, opts)
    check_tensor(t, "uniform_")
    if type(a) == "table" then opts, a, b = a, a.a, a.b end
    if type(b) == "table" then opts, b = b, b.b end
    return fill_uniform(t, a or 0, b or 1, opts)
end

-- normal_(t, mean=0, std=1, {generator=})
function init.normal_(t, mean, std, opts)
    check_tensor(t, "normal_")
    if type(mean) == "table" then opts, mean, std = mean, mean.mean, mean.std end
    if type(std) == "table" then opts, std = std, std.std end
    return fill_normal(t, mean or 0, std or 1, opts)
end

-- constant_(t, val), zeros_(t), ones_(t)
function init.constant_(t, val)
    check_tensor(t, "constant_")
    if type(val) ~= "number" then raise("constant_: value must be a number, got " .. type(val)) end
    autograd.no_grad(function() t:fill_(val) end)
    return t
end
function init.zeros_(t) check_tensor(t, "zeros_"); return init.constant_(t, 0) end
function init.ones_(t) check_tensor(t, "ones_"); return init.constant_(t, 1) end

local function kaiming_std(t, opts, what)
    local a = opts.a or 0
    local mode = opts.mode or "fan_in"
    local nonlin = opts.nonlinearity or "leaky_relu"
    if mode ~= "fan_in" and mode ~= "fan_out" then
        raise(what .. ": mode must be 'fan_in' or 'fan_out', got '" .. tostring(mode) .. "'")
    end
    for _, d in ipairs(t.shape) do
        if d == 0 then return nil end      -- torch warns and leaves an empty tensor alone
    end
    local fan_in, fan_out = init.calculate_fan_in_and_fan_out(t)
    local fan = mode == "fan_in" and fan_in or fan_out
    return init.calculate_gain(nonlin, a) / math.sqrt(fan)
end

local function kw(x, key)
    if type(x) == "table" then return x end
    if x == nil then return {} end
    return {[key] = x}
end

-- kaiming_uniform_(t, {a=0, mode="fan_in", nonlinearity="leaky_relu", generator=}):
-- U(-bound, bound) with bound = gain * sqrt(3 / fan). a = sqrt(5) gives torch's Linear/Conv
-- default, bound = 1/sqrt(fan_in).
function init.kaiming_uniform_(t, opts)
    check_tensor(t, "kaiming_uniform_")
    opts = kw(opts, "a")
    local std = kaiming_std(t, opts, "kaiming_uniform_")
    if std == nil then return t end
    local bound = math.sqrt(3) * std
    return fill_uniform(t, -bound, bound, opts)
end

-- kaiming_normal_(t, {a=0, mode="fan_in", nonlinearity="leaky_relu", generator=}): N(0, std^2)
function init.kaiming_normal_(t, opts)
    check_tensor(t, "kaiming_normal_")
    opts = kw(opts, "a")
    local std = kaiming_std(t, opts, "kaiming_normal_")
    if std == nil then return t end
    return fill_normal(t, 0, std, opts)
end

-- xavier_uniform_(t, {gain=1, generator=}): U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))
function init.xavier_uniform_(t, opts)
    check_tensor(t, "xavier_uniform_")
    opts = kw(opts, "gain")
    local fan_in, fan_out = init.calculate_fan_in_and_fan_out(t)
    local a = math.sqrt(3) * (opts.gain or 1) * math.sqrt(2 / (fan_in + fan_out))
    return fill_uniform(t, -a, a, opts)
end

-- xavier_normal_(t, {gain=1, generator=}): N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))
function init.xavier_normal_(t, opts)
    check_tensor(t, "xavier_normal_")
    opts = kw(opts, "gain")
    local fan_in, fan_out = init.calculate_fan_in_and_fan_out(t)
    return fill_normal(t, 0, (opts.gain or 1) * math.sqrt(2 / (fan_in + fan_out)), opts)
end

return init
