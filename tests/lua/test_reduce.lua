-- tests/lua/test_reduce.lua: reductions, max/min/argmax, softmax, cumsum and mse_loss: values
-- against Lua loops (float64), float32 against float64, bfloat16 against float32, accuracy of
-- long float32 sums, thread-count independence, gradients against finite differences, errors.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local gradcheck = require "gradcheck"
local F = nemo.nn.functional

local INF = math.huge

local function rnd(shape, seed, lo)
    local g = nemo.Generator(seed)
    local x = nemo.randn(shape, {dtype = "float64", generator = g})
    if lo then x = (x:abs() + lo) end
    return x:contiguous():requires_grad_()
end
local function plain(shape, seed) return rnd(shape, seed):detach() end
local function shape_s(t) return table.concat(t.shape, ",") end

-- ==== Lua reference: fold every output's elements with fn(list) ====

local function ref_reduce(x, dims, keepdim, fn)
    local shape = x.shape
    local nd = #shape
    local vals = x:double():contiguous():reshape{-1}:tolist()
    if nd == 0 then return {fn(vals)}, {} end
    local red = {}
    if dims == nil then for d = 0, nd - 1 do red[d] = true end
    else for _, d in ipairs(dims) do red[d < 0 and d + nd or d] = true end end
    local oshape, kept = {}, {}
    for d = 0, nd - 1 do
        if not red[d] then oshape[#oshape + 1] = shape[d + 1]; kept[#kept + 1] = d
        elseif keepdim then oshape[#oshape + 1] = 1 end
    end
    local groups, nout = {}, 1
    for _, d in ipairs(kept) do nout = nout * shape[d + 1] end
    for o = 1, nout do groups[o] = {} end
    local idx = {}
    for d = 1, nd do idx[d] = 0 end
    for i = 1, #vals do
        local o = 0
        for _, d in ipairs(kept) do o = o * shape[d + 1] + idx[d + 1] end
        local gr = groups[o + 1]
        gr[#gr + 1] = vals[i]
        for d = nd, 1, -1 do
            idx[d] = idx[d] + 1
            if idx[d] < shape[d] then break end
            idx[d] = 0
        end
    end
    local out = {}
    for o = 1, nout do out[o] = fn(groups[o]) end
    return out, oshape
end

local function lsum(l) local s = 0; for _, v in ipairs(l) do s = s + v end; return s end
local function lmean(l) return lsum(l) / #l end
local function lprod(l) local s = 1; for _, v in ipairs(l) do s = s * v end; return s end
local function lmax(l) local m = -INF; for _, v in ipairs(l) do if v > m then m = v end end; return m end
local function lmin(l) local m = INF; for _, v in ipairs(l) do if v < m then m = v end end; return m end
local function lvar(c) return function(l)
    local m = lmean(l); local s = 0
    for _, v in ipairs(l) do s = s + (v - m) ^ 2 end
    return s / (#l - c)
end end
local function lnorm(p) return function(l)
    if p == INF then local m = 0; for _, v in ipairs(l) do m = math.max(m, math.abs(v)) end; return m end
    if p == -INF then local m = INF; for _, v in ipairs(l) do m = math.min(m, math.abs(v)) end; return m end
    if p == 0 then local n = 0; for _, v in ipairs(l) do if v ~= 0 then n = n + 1 end end; return n end
    local s = 0
    for _, v in ipairs(l) do s = s + math.abs(v) ^ p end
    return s ^ (1 / p)
end end
local function llse(l) local m = lmax(l); local s = 0; for _, v in ipairs(l) do s = s + math.exp(v - m) end; return m + math.log(s) end

-- ==== forward values against the reference (float64, odd shapes, every dim layout) ====

local x3 = plain({3, 7, 5}, 1)
local xt = x3:transpose(0, 2)                    -- (5, 7, 3), non-contiguous
local dimsets = {
    {nil, "all"}, {{0}, "0"}, {{-1}, "-1"}, {{1}, "1 (middle)"}, {{1, 2}, "{1,2} (inner)"},
    {{0, 1}, "{0,1} (outer)"}, {{2, 0}, "{2,0} (permuted)"},
}
local ops = {
    {"sum", function(t, d, k) return t:sum(d, k) end, lsum},
    {"mean", function(t, d, k) return t:mean(d, {keepdim = k}) end, lmean},
    {"prod", function(t, d, k) return t:prod(d, k) end, lprod},
    {"amax", function(t, d, k) return t:amax(d, k) end, lmax},
    {"amin", function(t, d, k) return t:amin(d, k) end, lmin},
    {"var", function(t, d, k) return t:var(d, {keepdim = k}) end, lvar(1)},
    {"var correction=0", function(t, d, k) return t:var(d, {correction = 0, keepdim = k}) end, lvar(0)},
    {"std unbiased=false", function(t, d, k) return t:std(d, false, k) end,
        function(l) return math.sqrt(lvar(0)(l)) end},
    {"norm fro", function(t, d, k) return t:norm("fro", d, k) end, lnorm(2)},
    {"norm 1", function(t, d, k) return t:norm(1, d, k) end, lnorm(1)},
    {"norm inf", function(t, d, k) return t:norm(INF, d, k) end, lnorm(INF)},
    {"norm -inf", function(t, d, k) return t:norm(-INF, d, k) end, lnorm(-INF)},
    {"norm 0", function(t, d, k) return t:norm(0, d, k) end, lnorm(0)},
    {"norm 3", function(t, d, k) return t:norm(3, d, k) end, lnorm(3)},
    {"logsumexp", function(t, d, k) return t:logsumexp(d, k) end, llse},
}
for _, op in ipairs(ops) do
    local name, fn, ref = op[1], op[2], op[3]
    local bad = {}
    local maxd = 0
    for _, ds in ipairs(dimsets) do
        for _, k in ipairs {false, true} do
            for _, src in ipairs {x3, xt} do
                local y = fn(src, ds[1], k)
                local r, rshape = ref_reduce(src, ds[1], k, ref)
                if table.concat(y.shape, ",") ~= table.concat(rshape, ",") then
                    bad[#bad + 1] = string.format("dims %s keepdim %s: shape %s, expected %s", ds[2], tostring(k),
                        shape_s(y), table.concat(rshape, ","))
                else
                    local yl = y:reshape{-1}:tolist()
                    for i = 1, #r do
                        local d = math.abs(yl[i] - r[i]) / math.max(1, math.abs(r[i]))
                        if d ~= d then d = INF end
                        if d > maxd then maxd = d end
                    end
                end
            end
        end
    end
    T.ok(#bad == 0 and maxd <= 1e-12, string.format("%s f64 vs Lua loops, 7 dim sets x keepdim x (contiguous, transposed): " ..
        "max rel %.2e <= 1e-12", name, maxd), table.concat(bad, "\n"))
end

-- ==== dtypes and shapes ====

T.is(nemo.arange(5):sum().dtype, "int64", "sum of int64 is int64")
T.is(nemo.arange(5):sum():item(), 10, "sum of arange(5) = 10")
T.is(nemo.tensor({true, false, true}):sum():item(), 2, "sum of bool counts the trues")
T.is(nemo.arange(5):amax().dtype, "int64", "amax keeps an integer dtype")
T.is(x3:float():sum(1, {dtype = "float64"}).dtype, "float64", "sum dtype= float64")
T.is(x3:bfloat16():sum().dtype, "bfloat16", "sum of bf16 stays bf16")
T.is(nemo.arange(6):float():logsumexp(0).dtype, "float32", "logsumexp keeps float32")
T.is(nemo.arange(6):logsumexp(0).dtype, "float32", "logsumexp of int64 gives float32")
T.raises(function() return nemo.arange(5):mean() end, "mean: expected a floating point input, got int64",
    "mean of int64 is an error naming the dtype")
T.is(nemo.arange(5):mean({dtype = "float64"}):item(), 2, "mean of int64 with dtype=float64")
local s0 = nemo.tensor(3.5, {dtype = "float64"})
T.is(s0:sum(0):item() + s0:sum(-1, true):item() + s0:amax():item(), 10.5, "0-dim tensor: sum(0), sum(-1, keepdim), amax")
T.is(s0:sum(0).ndim, 0, "0-dim sum stays 0-dim")
T.is(shape_s(x3:sum({0, 2}, true)), "1,7,1", "keepdim keeps size-1 dims in place")
T.is(shape_s(x3:sum({}, true)), "1,1,1", "an empty dim table reduces every dim")
T.is(shape_s(x3:argmax(nil, true)), "1,1,1", "argmax(nil, keepdim) gives all-ones dims")
local e = nemo.zeros(0, 3)
T.is(e:sum():item(), 0, "sum of an empty tensor is 0")
T.is(shape_s(e:sum(0)), "3", "sum over an empty dim keeps the others")
T.ok(e:mean():item() ~= e:mean():item(), "mean of an empty tensor is nan")
T.is(e:prod():item(), 1, "prod of an empty tensor is 1")
T.is(shape_s(e:amax(1)), "0", "amax over a non-empty dim of an empty tensor is empty")
T.is(nemo.tensor({0, 0.5, -2}):any():item(), true, "any")
T.is(nemo.tensor({0, 0.5, -2}):all():item(), false, "all")
T.is(e:all():item(), true, "all of empty is true")
T.is(nemo.tensor({{0, 1}, {2, 3}}):count_nonzero(0):tolist()[1], 1, "count_nonzero along dim 0")

-- ==== max / min with a dim, argmax / argmin ====

local tm = nemo.tensor({{1, 5, 5, 2}, {7, 7, 0, -1}, {-3, -3, -3, -3}}, {dtype = "float64"})
local v, i = tm:max(1)
T.is(table.concat(v:tolist(), ","), "5,7,-3", "max(dim) values")
T.is(table.concat(i:tolist(), ","), "1,0,0", "max(dim) indices: the first of tied maxima")
T.is(i.dtype, "int64", "max(dim) indices are int64")
v, i = tm:min(-1, true)
T.is(shape_s(v) .. " " .. shape_s(i), "3,1 3,1", "min(dim, keepdim) shapes")
T.is(table.concat(i:reshape{-1}:tolist(), ","), "0,3,0", "min(dim) indices")
v, i = tm:max(0)
T.is(table.concat(i:tolist(), ","), "1,1,0,0", "max over dim 0 (column mode) indices")
T.is(table.concat(tm:argmax(0):tolist(), ","), "1,1,0,0", "argmax(0)")
T.is(tm:argmax():item(), 4, "argmax of the flattened tensor: first 7 at flat index 4")
T.is(tm:argmin():item(), 8, "argmin of the flattened tensor: first -3 at flat index 8")
T.is(tm:max():item(), 7, "max() of everything")
local withnan = nemo.tensor({1, 0 / 0, 3, 0 / 0})
v, i = withnan:max(0)
T.ok(v:item() ~= v:item() and i:item() == 1, "max(dim) with NaN: NaN at its first index")
T.ok(withnan:amax():item() ~= withnan:amax():item(), "amax propagates NaN")
T.ok(withnan:sum():item() ~= withnan:sum():item(), "sum propagates NaN")
local vv, mm = nemo.var_mean(x3, 1, {correction = 0})
T.close(vv, x3:var(1, false), 0, 0, "var_mean: the variance (correction=0)")
T.close(mm, x3:mean(1), 0, 0, "var_mean: the mean")
T.close(F.vector_norm(x3, 3, {0, 2}, true), x3:norm(3, {0, 2}, true), 0, 0, "vector_norm is norm")
local nz = F.normalize(nemo.tensor({{3, 4}, {0, 0}}, {dtype = "float64"}))
T.close(nz, {{0.6, 0.8}, {0, 0}}, 1e-15, 0, "normalize rows; a zero row stays zero (eps)")
T.close(nemo.maximum(tm, 2), tm:max(nemo.full({}, 2.0, {dtype = "float64"})), 0, 0, "max(x, tensor) is maximum")

-- ==== softmax, log_softmax, cumsum ====

local function check_softmax(src, dim, name)
    local sm, lsm = src:softmax(dim), src:log_softmax(dim)
    local shape = src.shape
    local nd = #shape
    local d = dim < 0 and dim + nd or dim
    local r = ref_reduce(src, {d}, true, llse)
    -- broadcast the reference logsumexp back over dim
    local lse = nemo.tensor(r, {dtype = "float64"})
    local ks = {}
    for j = 1, nd do ks[j] = (j - 1 == d) and 1 or shape[j] end
    lse = lse:reshape(ks)
    T.close(lsm, src - lse, 1e-12, 1e-12, name .. " log_softmax f64 vs x - logsumexp")
    T.close(sm, (src - lse):exp(), 1e-12, 1e-14, name .. " softmax f64 vs exp(x - logsumexp)")
end
check_softmax(x3, -1, "dim -1 (rows)")
check_softmax(x3, 0, "dim 0 (columns)")
check_softmax(xt, 1, "dim 1 of a transposed input")
local big = nemo.tensor({{1000, 1001, 1002}, {-1000, -1001, -INF}})
local sb = big:softmax(1):tolist()
T.ok(math.abs(sb[1][3] - 0.6652409557748219) < 1e-6 and sb[2][3] == 0,
    "softmax is stable for |x| = 1000 and gives exactly 0 for -inf")
T.ok(math.abs(big:logsumexp(1):tolist()[1] - 1002.4076059644) < 1e-3, "logsumexp is stable for large values")
T.is(nemo.full({2}, -INF):logsumexp(0):item(), -INF, "logsumexp of all -inf is -inf")
T.close(nemo.tensor({{1, 2, 3}, {4, 5, 6}}):cumsum(1), {{1, 3, 6}, {4, 9, 15}}, 0, 0, "cumsum along dim 1")
T.close(nemo.tensor({{1, 2, 3}, {4, 5, 6}}):cumsum(0), {{1, 2, 3}, {5, 7, 9}}, 0, 0, "cumsum along dim 0")
T.is(nemo.arange(4):cumsum(0).dtype, "int64", "cumsum of int64 is int64")
T.is(x3:float():softmax(-1, {dtype = "float64"}).dtype, "float64", "softmax dtype= casts first")

-- ==== float32 against float64, bfloat16 against float32 ====

local xw = plain({4, 33, 9}, 2)
local cmp_ops = {
    {"sum(1)", function(t) return t:sum(1) end, 1e-6},
    {"sum({0,1}) outer", function(t) return t:sum({0, 1}) end, 1e-6},
    {"mean(-1)", function(t) return t:mean(-1) end, 1e-6},
    {"var(1)", function(t) return t:var(1) end, 1e-6},
    {"std({0,2})", function(t) return t:std({0, 2}) end, 1e-6},
    {"norm()", function(t) return t:norm() end, 1e-6},
    {"norm(3, -1)", function(t) return t:norm(3, -1) end, 1e-6},
    {"amax(1)", function(t) return t:amax(1) end, 1e-7},
    {"logsumexp(1)", function(t) return t:logsumexp(1) end, 1e-6},
    {"softmax(-1)", function(t) return t:softmax(-1) end, 1e-6},
    {"softmax(1)", function(t) return t:softmax(1) end, 1e-6},
    {"log_softmax(-1)", function(t) return t:log_softmax(-1) end, 1e-6},
    {"cumsum(1)", function(t) return t:cumsum(1) end, 1e-6},
    {"prod(-1)", function(t) return t:prod(-1) end, 1e-5},
}
local x32 = xw:float()
for _, op in ipairs(cmp_ops) do
    local name, fn, tol = op[1], op[2], op[3]
    T.close(fn(x32), fn(x32:double()), tol, tol, string.format("%s f32 vs f64 (rtol %g)", name, tol))
end
local xb = xw:bfloat16()
for _, op in ipairs(cmp_ops) do
    local name, fn = op[1], op[2]
    if name ~= "prod(-1)" and name ~= "cumsum(1)" then
        T.close(fn(xb):float(), fn(xb:float()), 1e-2, 1e-2, name .. " bf16 vs f32 on the same values (rtol 1e-2)")
    end
end
T.close(xw:half():sum(1):float(), xw:half():float():sum(1), 1e-3, 1e-3, "sum(1) f16 vs f32 (rtol 1e-3)")

-- the kernel's other layouts: long rows split in blocks, many rows into few outputs (bias
-- gradients), wide column blocks
local layouts = {
    {"long rows (3, 40000) dim -1", {3, 40000}, -1},
    {"few outputs (3000, 50) dim 0", {3000, 50}, 0},
    {"wide columns (40, 40000) dim 0", {40, 40000}, 0},
}
for li, l in ipairs(layouts) do
    local xl = nemo.randn(l[2], {generator = nemo.Generator(100 + li)})
    local xd = xl:double()
    local d = l[3]
    local maxrel = 0
    for _, fn in ipairs {
        function(t) return t:sum(d) end, function(t) return t:var(d) end, function(t) return t:norm(3, d) end,
        function(t) return t:amax(d) end, function(t) return t:logsumexp(d) end, "prod",
    } do
        local a, b
        if fn == "prod" then   -- of values near 1, made in float32 first
            local xp = xl * 1e-3 + 1
            a, b = xp:prod(d):double():reshape{-1}:tolist(), xp:double():prod(d):reshape{-1}:tolist()
        else
            a, b = fn(xl):double():reshape{-1}:tolist(), fn(xd):reshape{-1}:tolist()
        end
        for i = 1, #b do
            local r = math.abs(a[i] - b[i]) / math.max(math.abs(b[i]), 1)
            if r ~= r then r = INF end
            if r > maxrel then maxrel = r end
        end
    end
    T.ok(maxrel <= 1e-6, string.format("%s: sum/var/norm3/amax/logsumexp/prod f32 vs f64 max rel %.2e <= 1e-6", l[1], maxrel))
end

-- ==== long float32 sums ====

local n = 1000000
local tenth = nemo.full({n}, 0.1)
local ref = n * nemo.tensor(0.1):item()     -- 1e6 times float32(0.1), summed exactly
T.near(tenth:sum():item() / ref, 1, 1e-6, "sum of 1e6 float32 0.1 is accurate to 1e-6 relative")
T.near(tenth:mean():item() / (ref / n), 1, 1e-6, "mean of 1e6 float32 0.1 is accurate to 1e-6 relative")
T.near(tenth:reshape{1000, 1000}:sum(0):sum():item() / ref, 1, 1e-6, "column sums then sum: 1e-6 relative")
T.near(tenth:norm():item() / math.sqrt(n * nemo.tensor(0.1):item() ^ 2), 1, 1e-6, "norm of 1e6 float32: 1e-6 relative")
local ramp = nemo.arange(n, {dtype = "float32"})
T.near(ramp:sum():item(), n * (n - 1) / 2, n * (n - 1) / 2 * 6e-8, "sum of arange(1e6) float32 exact to the output rounding")

-- ==== results do not depend on the thread count ====

local nthr = nemo.get_num_threads()
local xr = nemo.randn({3, 200000}, {generator = nemo.Generator(7)})
local xc = nemo.randn({60000, 7}, {generator = nemo.Generator(8)})
local function snapshot()
    return {xr:sum(-1):tolist(), {xr:sum():item()}, xc:sum(0):tolist(), xr:var(1):tolist(),
            xr:softmax(-1):sum(-1):tolist(), {xr:reshape{-1}:logsumexp(0):item()}}
end
nemo.set_num_threads(1)
local one = snapshot()
nemo.set_num_threads(math.max(2, nthr))
local many = snapshot()
nemo.set_num_threads(nthr)
local same = true
for k = 1, #one do for j = 1, #one[k] do if one[k][j] ~= many[k][j] then same = false end end end
T.ok(same, string.format("sum/var/softmax/logsumexp bitwise equal with 1 and %d threads", math.max(2, nthr)))

-- ==== gradients (float64 central differences) ====

local function tr(t) return t:transpose(0, 1) end
gradcheck(T, "sum all", function(t) return tr(t):sum() end, {rnd({7, 33}, 10)})
gradcheck(T, "sum dim -1 keepdim", function(t) return tr(t):sum(-1, true) end, {rnd({7, 33}, 11)})
gradcheck(T, "sum dims {0,2} (permuted)", function(t) return t:sum({0, 2}) end, {rnd({3, 7, 5}, 12)})
gradcheck(T, "sum dims {0,1} outer, dtype=float64", function(t) return t:sum({0, 1}, {dtype = "float64"}) end, {rnd({3, 7, 5}, 13)})
gradcheck(T, "mean dim 1", function(t) return tr(t):mean(1) end, {rnd({7, 33}, 14)})
gradcheck(T, "mean dims {-1,0} keepdim", function(t) return t:mean({-1, 0}, true) end, {rnd({3, 7, 5}, 15)})
gradcheck(T, "prod dim 1", function(t) return t:prod(1) end, {rnd({7, 5}, 16)})
gradcheck(T, "amax dim 0", function(t) return tr(t):amax(0) end, {rnd({7, 33}, 17)})
gradcheck(T, "amin dims {0,2}", function(t) return t:amin({0, 2}, true) end, {rnd({3, 7, 5}, 18)})
gradcheck(T, "var dim -1", function(t) return tr(t):var(-1) end, {rnd({7, 33}, 19)})
gradcheck(T, "var correction=0 dims {0,2}", function(t) return t:var({0, 2}, {correction = 0}) end, {rnd({3, 7, 5}, 20)})
gradcheck(T, "std all", function(t) return tr(t):std() end, {rnd({7, 33}, 21)})
gradcheck(T, "std dim 0 keepdim", function(t) return t:std(0, true, true) end, {rnd({7, 33}, 22)})
gradcheck(T, "norm fro", function(t) return tr(t):norm() end, {rnd({7, 33}, 23)})
gradcheck(T, "norm 2 dim 1", function(t) return tr(t):norm(2, 1) end, {rnd({7, 33}, 24)})
gradcheck(T, "norm 1 dim 0", function(t) return t:norm(1, 0) end, {rnd({7, 33}, 25)})
gradcheck(T, "norm inf dim -1", function(t) return t:norm(INF, -1) end, {rnd({7, 33}, 26)})
gradcheck(T, "norm 3 dims {0,2}", function(t) return t:norm(3, {0, 2}) end, {rnd({3, 7, 5}, 27)})
gradcheck(T, "norm 0.5 dim 1", function(t) return t:norm(0.5, 1) end, {rnd({7, 5}, 28, 0.5)})
gradcheck(T, "logsumexp dim 1", function(t) return tr(t):logsumexp(1) end, {rnd({7, 33}, 29)})
gradcheck(T, "logsumexp dims {0,2} keepdim", function(t) return t:logsumexp({0, 2}, true) end, {rnd({3, 7, 5}, 30)})
gradcheck(T, "max dim 1 (values)", function(t) return (tr(t):max(1)) end, {rnd({7, 33}, 31)})
gradcheck(T, "min dim 0 keepdim (values)", function(t) return (t:min(0, true)) end, {rnd({7, 33}, 32)})
gradcheck(T, "max all", function(t) return tr(t):max() end, {rnd({7, 33}, 33)})
gradcheck(T, "softmax dim -1", function(t) return tr(t):softmax(-1) end, {rnd({7, 33}, 34)})
gradcheck(T, "softmax dim 0", function(t) return t:softmax(0) end, {rnd({7, 33}, 35)})
gradcheck(T, "log_softmax dim 1", function(t) return tr(t):log_softmax(1) end, {rnd({7, 33}, 36)})
gradcheck(T, "log_softmax dim 1 of 3-d", function(t) return t:log_softmax(1) end, {rnd({3, 7, 5}, 37)})
gradcheck(T, "cumsum dim 0", function(t) return tr(t):cumsum(0) end, {rnd({7, 33}, 38)})
gradcheck(T, "mse_loss mean", function(a, b) return F.mse_loss(tr(a), b) end, {rnd({7, 33}, 39), rnd({33, 7}, 40)})
gradcheck(T, "mse_loss sum broadcast", function(a, b) return F.mse_loss(a, b, {reduction = "sum"}) end,
    {rnd({7, 33}, 41), rnd({33}, 42)})
gradcheck(T, "mse_loss none", function(a, b) return F.mse_loss(a, b, "none") end, {rnd({7, 5}, 43), rnd({7, 5}, 44)})
gradcheck(T, "normalize dim 1", function(t) return F.normalize(tr(t)) end, {rnd({7, 33}, 46)})
gradcheck(T, "normalize p=1 dim 0", function(t) return F.normalize(t, {p = 1, dim = 0}) end, {rnd({7, 5}, 47)})
gradcheck(T, "float32 mean through a cast", function(t) return t:float():mean(1):double() end, {rnd({7, 33}, 45)},
    {eps = 1e-3, rtol = 1e-3, atol = 1e-5})

-- ties and zeros
local function grad_of(fn, vals)
    local t = nemo.tensor(vals, {dtype = "float64", requires_grad = true})
    fn(t):backward()
    return t.grad:tolist()
end
T.is(table.concat(grad_of(function(t) return t:amax() end, {1, 3, 3, 2}), ","), "0,0.5,0.5,0", "amax gradient split evenly between ties")
T.is(table.concat(grad_of(function(t) return t:max() end, {3, 3, 3, 2}), ","),
    string.format("%s,%s,%s,0", 1 / 3, 1 / 3, 1 / 3), "max() gradient split evenly between ties")
T.is(table.concat(grad_of(function(t) return (t:max(0)) end, {1, 3, 3, 2}), ","), "0,1,0,0", "max(dim) gradient goes to the index")
T.is(table.concat(grad_of(function(t) return t:norm(INF) end, {-3, 3, 1}), ","), "-0.5,0.5,0", "norm inf gradient: sign, split between ties")
T.is(table.concat(grad_of(function(t) return t:prod() end, {2, 0, 3}), ","), "0,6,0", "prod gradient with one zero")
T.is(table.concat(grad_of(function(t) return t:prod() end, {2, 0, 0}), ","), "0,0,0", "prod gradient with two zeros")
T.is(table.concat(grad_of(function(t) return t:norm() end, {0, 0}), ","), "0,0", "norm gradient at zero is 0")
local gb = nemo.randn({4, 6}, {dtype = "bfloat16", requires_grad = true})
gb:sum(1, {dtype = "float32"}):sum():backward()
T.ok(gb.grad.dtype == "bfloat16" and gb.grad:float():sum():item() == 24, "sum(dtype=f32) of bf16: gradient in bf16")

-- ==== errors ====

T.raises(function() return x3:sum(3) end, "sum: dimension 3 out of range (expected to be in range of [-3, 2])",
    "sum with a bad dim names the op and the valid range")
T.raises(function() return x3:mean({0, -3}) end, "mean: dim 0 appears multiple times", "repeated dims are an error")
T.raises(function() return x3:softmax(-4) end, "softmax: dimension -4 out of range", "softmax bad dim")
T.raises(function() return x3:max(5) end, "max: dimension 5 out of range", "max bad dim")
T.raises(function() return x3:norm("nuc") end, "norm: unsupported p='nuc'", "norm with an unsupported p is a clear error")
T.raises(function() return nemo.zeros(0):argmax() end, "argmax: cannot reduce an empty tensor", "argmax of empty is an error")
T.raises(function() return nemo.zeros(3, 0):max(1) end, "max: expected reduction dim 1 to have non-zero size", "max over an empty dim")
T.raises(function() return nemo.zeros(0):amax() end, "amax: expected a non-empty reduction", "amax of empty is an error")
T.raises(function() return x3:softmax() end, "softmax: dim must be given", "softmax needs a dim")
T.raises(function() return x3:sum(0, "yes") end, "keepdim must be a boolean", "keepdim must be a boolean")
T.raises(function() return x3:max({0, 1}) end, "use amax for several dims", "max with several dims points to amax")
T.raises(function() return F.mse_loss(x3, x3, "avg") end, "reduction must be 'mean', 'sum' or 'none'", "mse_loss bad reduction")
T.raises(function() return x3:sum(nil, {dtype = "float128"}) end, "unknown dtype 'float128'", "sum with an unknown dtype")

T.done()
