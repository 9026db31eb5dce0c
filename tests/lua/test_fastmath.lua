-- tests/lua/test_fastmath.lua: the vectorised float32 exp / tanh / sigmoid / erf of the CPU
-- kernels (kernels/cpu/pointwise.c) against double-precision libm, in ulps of the float32
-- result, over a dense sweep of all floats: every 997th bit pattern of each sign (about 4.3
-- million inputs, every binade from the subnormals up), plus every 13th float of [0.5, 4.5)
-- where the branches of tanh and erf meet. Stated bounds: exp <= 1 ulp, tanh <= 1 ulp,
-- erf <= 2 ulp, sigmoid <= 3 ulp (its formula 1 / (1 + exp(-x)), PyTorch's, adds up to 1.5 ulp
-- to exp's). A sweep of every 7th float in C found exp 0.973, tanh 0.988, erf 1.534 and sigmoid
-- 2.481 ulp at worst. Then special values, and the ops that use them (exp, tanh, sigmoid, silu,
-- gelu, gelu tanh and their backward) in float32 against the same op in float64.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local ffi = require "ffi"
local nemo = require "nemo"
local F = nemo.F

ffi.cdef [[ double erf(double); ]]
local erf = ffi.C.erf
local exp, tanh, frexp, abs = math.exp, math.tanh, math.frexp, math.abs

local function sigmoid64(x) return 1 / (1 + exp(-x)) end

-- ulp of the float32 nearest to r (2^-149 in the subnormal range)
local function ulp_of(r)
    local a = abs(r)
    if a < 2 ^ -126 then return 2 ^ -149 end
    local _, e = frexp(a)
    return 2 ^ (e - 24)
end

local u32 = ffi.typeof("uint32_t[?]")

-- inputs: floats with bit patterns lo, lo + step, ... < hi, for both signs
local function sweep(lo, hi, step, signs)
    local n = 0
    for _ = lo, hi - 1, step do n = n + 1 end
    local bits = u32(n * #signs)
    local k = 0
    for _, s in ipairs(signs) do
        for u = lo, hi - 1, step do bits[k] = u + s; k = k + 1 end
    end
    local x = nemo.empty({k}, {dtype = "float32"})
    ffi.copy(x:data_ptr(), bits, 4 * k)
    return x, k
end

local POS, NEG = 0, 0x80000000
local INF_BITS = 0x7f800000
local X_all, n_all = sweep(0, INF_BITS, 997, {POS, NEG})
local f_half, f_45 = 0x3f000000, 0x40900000            -- 0.5 and 4.5
local X_mid, n_mid = sweep(f_half, f_45, 13, {POS, NEG})

-- max ulp error of F._fastmath(name) over x against ref (doubles), restricted to keep(x)
local function max_ulp(name, x, n, ref, keep)
    local y = F._fastmath(name, x)
    local px = ffi.cast("const float *", x:data_ptr())
    local py = ffi.cast("const float *", y:data_ptr())
    local worst, at, checked = 0, 0, 0
    for i = 0, n - 1 do
        local xv = px[i]
        if keep == nil or keep(xv) then
            local r = ref(xv)
            local yv = py[i]
            local rf = tonumber(ffi.new("float", r))
            local e
            if yv == rf then e = 0
            elseif rf == math.huge or rf == -math.huge then e = math.huge
            else e = abs(yv - r) / ulp_of(r) end
            if e ~= e then e = math.huge end
            if e > worst then worst, at = e, xv end
            checked = checked + 1
        end
    end
    return worst, at, checked
end

local function check_ulp(name, ref, bound, keep, why)
    local w1, a1, c1 = max_ulp(name, X_all, n_all, ref, keep)
    local w2, a2, c2 = max_ulp(name, X_mid, n_mid, ref, keep)
    local w, at = w1, a1
    if w2 > w then w, at = w2, a2 end
    T.ok(w <= bound, string.format("fastmath %s vs double libm%s: max %.3f ulp <= %.1f ulp over %d + %d floats " ..
        "(worst at %.9g)", name, why or "", w, bound, c1, c2, at))
end

check_ulp("exp", exp, 1.0)
check_ulp("tanh", tanh, 1.0)
check_ulp("erf", erf, 2.0)
check_ulp("sigmoid", sigmoid64, 3.0, function(x) return x >= -87 end, " (x >= -87)")

-- below -87, exp(-x) nears the float range: sigmoid is tiny and may flush to 0 there, as
-- 1 / (1 + expf(-x)) does in PyTorch
do
    local w1 = 0
    local y = F._fastmath("sigmoid", X_all)
    local px, py = ffi.cast("const float *", X_all:data_ptr()), ffi.cast("const float *", y:data_ptr())
    for i = 0, n_all - 1 do
        if px[i] < -87 then
            local d = abs(py[i] - sigmoid64(px[i]))
            if d > w1 then w1 = d end
        end
    end
    T.ok(w1 <= 2 ^ -125, string.format("fastmath sigmoid below -87: max abs error %.3g <= 2^-125", w1))
end

-- ==== special values ====
do
    local inf, nan = math.huge, 0 / 0
    local x = nemo.tensor({inf, -inf, nan, 0, -0.0, 89, -104, 88.72, -87.4, 1e-30, -1e-30}, {dtype = "float32"})
    local function vals(name) return F._fastmath(name, x):tolist() end
    local e, t, s, r = vals("exp"), vals("tanh"), vals("sigmoid"), vals("erf")
    local function isnan(v) return v ~= v end
    local function negzero(v) return v == 0 and 1 / v < 0 end
    T.ok(e[1] == inf and e[2] == 0 and isnan(e[3]) and e[4] == 1 and e[5] == 1 and e[6] == inf and e[7] == 0,
        "fastmath exp: exp(inf) = inf, exp(-inf) = 0, NaN stays NaN, exp(+-0) = 1, overflow to inf, underflow to 0")
    T.ok(e[8] < inf and e[8] > 3.3e38, "fastmath exp(88.72) is the largest finite range, not inf")
    T.ok(e[9] > 0 and e[9] < 2 ^ -126, "fastmath exp(-87.4) is subnormal and nonzero")
    local tiny = x:tolist()[10]
    T.ok(t[1] == 1 and t[2] == -1 and isnan(t[3]) and t[4] == 0 and negzero(t[5]) and t[10] == tiny and
        t[11] == -tiny, "fastmath tanh: +-inf -> +-1, NaN, signed zeros kept, tiny x -> x")
    T.ok(s[1] == 1 and s[2] == 0 and isnan(s[3]) and s[4] == 0.5, "fastmath sigmoid: +-inf -> 1 / 0, NaN, 0 -> 0.5")
    T.ok(r[1] == 1 and r[2] == -1 and isnan(r[3]) and r[4] == 0 and negzero(r[5]) and r[6] == 1 and r[7] == -1,
        "fastmath erf: +-inf -> +-1, NaN, signed zeros kept, large |x| -> +-1")
end

-- ==== the ops that use them: float32 against the same op in float64 ====

-- inputs covering the useful range densely, plus a few far out
local xs = {}
for i = 0, 4000 do xs[#xs + 1] = -10 + 20 * i / 4000 end
for _, v in ipairs {-60, -30, 30, 60} do xs[#xs + 1] = v end
local x64 = nemo.tensor(xs, {dtype = "float64"})
local x32 = x64:float()
local x32d = x32:double()           -- the float32 inputs, exactly, in float64

-- max over elements of |y32 - y64| / (ulp(y64) + abs_slack * |x|); abs_slack covers formulas
-- that cancel (1 + tanh(u) for u << 0), where float32 itself cannot do better
local function op_err(f32, f64, abs_slack)
    local a, r, xv = f32:double():tolist(), f64:tolist(), x32d:tolist()
    local worst, at = 0, 0
    for i = 1, #r do
        local e = abs(a[i] - r[i]) / (ulp_of(r[i]) + (abs_slack or 0) * abs(xv[i]))
        if e ~= e then e = math.huge end
        if e > worst then worst, at = e, xv[i] end
    end
    return worst, at
end

local function check_op(name, fn, bound, abs_slack)
    local w, at = op_err(fn(x32), fn(x32d), abs_slack)
    T.ok(w <= bound, string.format("%s float32 vs float64 on [-10, 10]: max %.2f ulp%s <= %.1f (worst at %.6g)", name,
        w, abs_slack and string.format(" (+ %.0e |x|)", abs_slack) or "", bound, at))
end

check_op("exp", F.exp, 1.5)
check_op("tanh", F.tanh, 1.5)
check_op("sigmoid", F.sigmoid, 3)
check_op("silu", F.silu, 4)
check_op("gelu", F.gelu, 4, 2 ^ -24)
check_op("gelu tanh", function(t) return F.gelu(t, {approximate = "tanh"}) end, 4, 2 ^ -24)

-- backward: dx for g = 1, float32 vs float64. PyTorch's derivative formulas subtract from 1
-- (1 - s for silu, 1 - t^2 for gelu tanh), which costs float32 about |x| ulps of 1 where s or t
-- is near 1, so the error is measured against max(1, |ref|) * (1 + |x|).
local function grad_of(fn, x)
    local t = x:detach():requires_grad_()
    fn(t):sum():backward()
    return t.grad
end
for _, case in ipairs {
    {"exp", F.exp}, {"tanh", F.tanh}, {"sigmoid", F.sigmoid}, {"silu", F.silu}, {"gelu", F.gelu},
    {"gelu tanh", function(t) return F.gelu(t, {approximate = "tanh"}) end},
} do
    local name, fn = case[1], case[2]
    local g32, g64 = grad_of(fn, x32), grad_of(fn, x32d)
    local a, r, xv = g32:double():tolist(), g64:tolist(), x32d:tolist()
    local worst, at = 0, 0
    for i = 1, #r do
        local e = abs(a[i] - r[i]) / (math.max(1, abs(r[i])) * (1 + abs(xv[i])))
        if e > worst then worst, at = e, xv[i] end
    end
    T.ok(worst <= 2e-7, string.format("%s backward float32 vs float64: max |d| / (max(1, |ref|) (1 + |x|)) " ..
        "%.3g <= 2e-7 (at %.4g)", name, worst, at))
end

T.done()
