package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local gradcheck = require "gradcheck"

local function rnd(shape, seed, lo)
    local g = nemo.Generator(seed)
    local x = nemo.randn(shape, {dtype = "float64", generator = g})
    if lo then x = (x:abs() + lo) end
    return x:contiguous():requires_grad_()
end

-- forward values against Lua math on odd shapes
local x = nemo.tensor({{-1.5, 0.25, 2}, {3, -0.5, 0.75}}, {dtype = "float64"})
local function check_unary(name, fn, ref)
    local y = fn(x):tolist()
    local xs = x:tolist()
    local maxd = 0
    for i = 1, 2 do for j = 1, 3 do
        local d = math.abs(y[i][j] - ref(xs[i][j]))
        if d > maxd then maxd = d end
    end end
    T.ok(maxd <= 1e-12, string.format("%s forward f64 vs Lua math: max_abs %.2e <= 1e-12", name, maxd))
end
check_unary("exp", nemo.exp, math.exp)
check_unary("abs", nemo.abs, math.abs)
check_unary("sin", nemo.sin, math.sin)
check_unary("cos", nemo.cos, math.cos)
check_unary("tanh", nemo.tanh, function(v) return (math.exp(2 * v) - 1) / (math.exp(2 * v) + 1) end)
check_unary("sigmoid", nemo.sigmoid, function(v) return 1 / (1 + math.exp(-v)) end)
check_unary("silu", nemo.silu, function(v) return v / (1 + math.exp(-v)) end)
check_unary("relu", nemo.relu, function(v) return v > 0 and v or 0 end)
check_unary("gelu tanh", function(t) return nemo.gelu(t, {approximate = "tanh"}) end,
    function(v) return 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ^ 3))) end)
check_unary("clamp", function(t) return nemo.clamp(t, -1, 1) end, function(v) return math.max(-1, math.min(1, v)) end)
check_unary("neg", function(t) return -t end, function(v) return -v end)
check_unary("x*2+1", function(t) return t * 2 + 1 end, function(v) return v * 2 + 1 end)
check_unary("1-x", function(t) return 1 - t end, function(v) return 1 - v end)
check_unary("2/x", function(t) return 2 / t end, function(v) return 2 / v end)
check_unary("x^3", function(t) return t ^ 3 end, function(v) return v ^ 3 end)

-- broadcasting
local a = nemo.ones(2, 1, 3)
local b = nemo.arange(4, {dtype = "float32"}):reshape{4, 1}
local c = a + b
T.is(table.concat(c.shape, ","), "2,4,3", "broadcast (2,1,3)+(4,1) -> (2,4,3)")
T.is(c:tolist()[2][4][3], 4, "broadcast values")
T.raises(function() return nemo.ones(2, 3) + nemo.ones(4) end, "cannot be broadcast", "bad broadcast is an error")

-- dtype rules
T.is((nemo.ones(2, {dtype = "bfloat16"}) * 0.5).dtype, "bfloat16", "bf16 * number stays bf16")
T.is((nemo.ones(2, {dtype = "bfloat16"}) * nemo.ones(2)).dtype, "float32", "bf16 * f32 tensor -> f32")
T.is((nemo.ones(2, {dtype = "bfloat16"}) * nemo.tensor(2.0)).dtype, "bfloat16", "bf16 * f32 0-dim -> bf16")
T.is((nemo.arange(3) + 1).dtype, "int64", "int64 + integer stays int64")
T.is((nemo.arange(3) * 0.5).dtype, "float32", "int64 * 0.5 -> float32")
T.is((nemo.arange(3) / 2).dtype, "float32", "int / int -> float32 (true division)")
T.is(nemo.arange(3):gt(1).dtype, "bool", "comparison gives bool")
T.is(nemo.arange(3):gt(1):tolist()[3], true, "comparison values")
local h = nemo.tensor({1.0, 2.0, 3.0}, {dtype = "float16"})
T.close((h * h):float(), {1, 4, 9}, 0, 0, "float16 mul exact on small ints")
local bf = nemo.tensor({1.00390625}, {dtype = "bfloat16"})
T.is(bf:item(), 1.0, "bf16 rounds 1+2^-8 to nearest even (1.0)")

-- gradients against finite differences (odd shapes, broadcasting, non-contiguous)
for _, name in ipairs { "exp", "sin", "cos", "tanh", "sigmoid", "silu", "abs", "neg" } do
    gradcheck(T, name, function(t) return nemo[name](t:transpose(0, 1)) end, {rnd({7, 3}, 1)})
end
gradcheck(T, "gelu exact", function(t) return nemo.gelu(t) end, {rnd({33}, 2)})
gradcheck(T, "gelu tanh", function(t) return nemo.gelu(t, {approximate = "tanh"}) end, {rnd({33}, 3)})
gradcheck(T, "relu", function(t) return nemo.relu(t) end, {rnd({33}, 4)})
gradcheck(T, "log", function(t) return nemo.log(t) end, {rnd({7}, 5, 0.5)})
gradcheck(T, "sqrt", function(t) return nemo.sqrt(t) end, {rnd({7}, 6, 0.5)})
gradcheck(T, "rsqrt", function(t) return nemo.rsqrt(t) end, {rnd({7}, 7, 0.5)})
gradcheck(T, "pow scalar", function(t) return t ^ 3 end, {rnd({7}, 8)})
gradcheck(T, "pow tensor", function(p, q) return nemo.pow(p, q) end, {rnd({3, 7}, 9, 0.5), rnd({7}, 10)})
gradcheck(T, "clamp", function(t) return nemo.clamp(t, -0.5, 0.5) end, {rnd({33}, 11)})
gradcheck(T, "add broadcast", function(p, q) return p + q end, {rnd({7, 1, 3}, 12), rnd({5, 1}, 13)})
gradcheck(T, "sub alpha", function(p, q) return nemo.sub(p, q, {alpha = 2.5}) end, {rnd({7, 3}, 14), rnd({3}, 15)})
gradcheck(T, "mul broadcast noncontig", function(p, q) return p:transpose(0, 1) * q end, {rnd({3, 7}, 16), rnd({7, 1}, 17)})
gradcheck(T, "div", function(p, q) return p / q end, {rnd({7, 3}, 18), rnd({3}, 19, 0.5)})
gradcheck(T, "maximum", function(p, q) return nemo.maximum(p, q) end, {rnd({7, 3}, 20), rnd({3}, 21)})
gradcheck(T, "minimum", function(p, q) return nemo.minimum(p, q) end, {rnd({7, 3}, 22), rnd({7, 3}, 23)})
gradcheck(T, "where", function(p, q) return nemo.where(p:gt(0), p, q) end, {rnd({7, 3}, 24), rnd({3}, 25)})
gradcheck(T, "scalar arithmetic", function(p) return (2 - p) * 3 / 4 + 1 end, {rnd({7}, 26)})
gradcheck(T, "reciprocal and 1/x", function(p) return 1 / p + p:reciprocal() end, {rnd({7}, 27, 0.5)})

-- autograd mechanics
local w = nemo.randn({3}, {requires_grad = true})
local y = w * w
y:backward(nemo.ones(3))
T.close(w.grad, (w:detach() * 2), 1e-6, 0, "d(w*w)/dw = 2w")
y = w * 3
y:backward(nemo.ones(3))
T.close(w.grad, (w:detach() * 2 + 3), 1e-6, 0, ".grad accumulates across backward calls")
T.raises(function() y:backward(nemo.ones(3)) end, "second time", "backward twice through a freed graph is an error")
T.raises(function() nemo.ones(3):backward() end, "does not require grad", "backward on a constant is an error")
T.raises(function() (w * 2):backward() end, "scalar outputs", "implicit grad needs a scalar")
local ng = nemo.no_grad(function() return w * 2 end)
T.ok(not ng.requires_grad, "no_grad: result does not require grad")
T.ok(nemo.is_grad_enabled(), "grad mode restored after no_grad")
pcall(nemo.no_grad, function() error("boom") end)
T.ok(nemo.is_grad_enabled(), "grad mode restored after an error inside no_grad")
T.ok(not w:detach().requires_grad, "detach gives a tensor without grad")
T.raises(function() w:add_(1) end, "leaf tensor that requires grad", "in-place on a leaf that requires grad is refused")

-- saved tensors are released by backward, not by the garbage collector
collectgarbage(); collectgarbage()
local function build()
    local p = nemo.randn({256, 256}, {requires_grad = true})
    local q = (p * 2):sin():exp()
    return p, q
end
local p, q = build()
collectgarbage(); collectgarbage()
local before = nemo.memory_stats().current
q:backward(nemo.ones(256, 256))
collectgarbage(); collectgarbage()
local after = nemo.memory_stats().current
-- q still holds its graph: had backward kept the saved inputs of sin and exp, they would
-- still be alive here (5 x 256 KiB); released, only p, q and p.grad remain.
T.ok(after <= 3 * 262144 + 4096, string.format("saved tensors released by backward: %d bytes live before, %d after (<= %d)",
    before, after, 3 * 262144 + 4096))
T.ok(q.grad_fn.saved == nil, "the node's saved list is gone after backward")

T.done()
