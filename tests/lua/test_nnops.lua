-- tests/lua/test_nnops.lua: layer_norm, rms_norm, group_norm: forward against naive Lua loops,
-- gradients against float64 central differences, non-contiguous inputs, no-affine variants,
-- bf16 against f32, thread-count independence and the error messages.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local gradcheck = require "gradcheck"
local F = nemo.nn.functional

local FLT_EPS, DBL_EPS = 2 ^ -23, 2 ^ -52

local function rnd(shape, seed, dtype, scale, shift)
    local x = nemo.randn(shape, {dtype = "float64", generator = nemo.Generator(seed)})
    if scale then x = x * scale end
    if shift then x = x + shift end
    return x:to{dtype = dtype or "float64"}:contiguous()
end
local function leaf(shape, seed, scale, shift) return rnd(shape, seed, "float64", scale, shift):requires_grad_() end

-- flat Lua array of a tensor's values (row-major)
local function flat(t) return t:double():contiguous():reshape{-1}:tolist() end
local function numel(shape) local n = 1; for _, v in ipairs(shape) do n = n * v end; return n end

-- ==== naive references ====

-- rows of n: layer_norm (center) or rms_norm, affine optional
local function ref_rows(x, n, w, b, eps, center)
    local xv = flat(x)
    local wv, bv = w and flat(w), b and flat(b)
    local out = {}
    for r = 0, #xv / n - 1 do
        local mu = 0
        if center then
            for i = 1, n do mu = mu + xv[r * n + i] end
            mu = mu / n
        end
        local var = 0
        for i = 1, n do local d = xv[r * n + i] - mu; var = var + d * d end
        var = var / n
        local rs = 1 / math.sqrt(var + eps)
        for i = 1, n do
            local v = (xv[r * n + i] - mu) * rs
            if wv then v = v * wv[i] end
            if bv then v = v + bv[i] end
            out[r * n + i] = v
        end
    end
    return out
end

local function ref_group(x, G, w, b, eps)
    local s = x.shape
    local N, Cc = s[1], s[2]
    local HW = numel(s) / (N * Cc)
    local D = Cc / G
    local xv = flat(x)
    local wv, bv = w and flat(w), b and flat(b)
    local out = {}
    for n = 0, N - 1 do
        for g = 0, G - 1 do
            local base, len = (n * Cc + g * D) * HW, D * HW
            local mu, var = 0, 0
            for i = 1, len do mu = mu + xv[base + i] end
            mu = mu / len
            for i = 1, len do local d = xv[base + i] - mu; var = var + d * d end
            local rs = 1 / math.sqrt(var / len + eps)
            for i = 1, len do
                local c = g * D + math.floor((i - 1) / HW) + 1
                local v = (xv[base + i] - mu) * rs
                if wv then v = v * wv[c] end
                if bv then v = v + bv[c] end
                out[base + i] = v
            end
        end
    end
    return out
end

-- ==== forward against the references ====

for _, dt in ipairs { {"float64", 1e-12}, {"float32", 1e-5} } do
    local dtype, tol = dt[1], dt[2]
    -- layer_norm (5, 33) with affine, shifted input (mean far from 0)
    local x = rnd({5, 33}, 1, dtype, 2, 3)
    local w, b = rnd({33}, 2, dtype), rnd({33}, 3, dtype)
    T.close(F.layer_norm(x, {33}, w, b), ref_rows(x, 33, w, b, 1e-5, true), 0, tol,
        "layer_norm fwd " .. dtype .. " (5,33) affine vs ref")
    -- small variance: eps = 1e-5 matters
    local xs = rnd({7, 33}, 4, dtype, 1e-3)
    T.close(F.layer_norm(xs, 33), ref_rows(xs, 33, nil, nil, 1e-5, true), 0, tol,
        "layer_norm fwd " .. dtype .. " (7,33) no affine, var ~ eps, default eps 1e-5")
    T.close(F.layer_norm(xs, {33}, {eps = 1e-3}), ref_rows(xs, 33, nil, nil, 1e-3, true), 0, tol,
        "layer_norm fwd " .. dtype .. " eps from options table")
    -- (3,5,7) over the last dim and the last two dims
    local x3 = rnd({3, 5, 7}, 5, dtype)
    local w2, b2 = rnd({5, 7}, 6, dtype), rnd({5, 7}, 7, dtype)
    T.close(F.layer_norm(x3, {7}, rnd({7}, 8, dtype), nil), ref_rows(x3, 7, rnd({7}, 8, dtype), nil, 1e-5, true),
        0, tol, "layer_norm fwd " .. dtype .. " (3,5,7) over {7}, weight only")
    T.close(F.layer_norm(x3, {5, 7}, w2, b2), ref_rows(x3, 35, w2, b2, 1e-5, true), 0, tol,
        "layer_norm fwd " .. dtype .. " (3,5,7) over {5,7}")
    T.close(F.layer_norm(x3, {5, 7}, nil, b2, 1e-6), ref_rows(x3, 35, nil, b2, 1e-6, true), 0, tol,
        "layer_norm fwd " .. dtype .. " bias only, eps 1e-6")
    -- non-contiguous input
    local xt = rnd({33, 7}, 9, dtype):transpose(0, 1)
    T.close(F.layer_norm(xt, {33}, w, b), ref_rows(xt, 33, w, b, 1e-5, true), 0, tol,
        "layer_norm fwd " .. dtype .. " transposed input")

    -- rms_norm
    T.close(F.rms_norm(x, {33}, w, 1e-6), ref_rows(x, 33, w, nil, 1e-6, false), 0, tol,
        "rms_norm fwd " .. dtype .. " (5,33) weight, eps 1e-6")
    T.close(F.rms_norm(x3, {5, 7}), ref_rows(x3, 35, nil, nil, dtype == "float64" and DBL_EPS or FLT_EPS, false),
        0, tol, "rms_norm fwd " .. dtype .. " (3,5,7) over {5,7}, no weight")
    local xtiny = rnd({7, 33}, 10, dtype, 1e-4)
    local deps = dtype == "float64" and DBL_EPS or FLT_EPS
    T.close(F.rms_norm(xtiny, 33, nil, nil), ref_rows(xtiny, 33, nil, nil, deps, false), 0, tol,
        "rms_norm fwd " .. dtype .. " eps=nil is the machine eps of the compute dtype (mean(x^2) ~ 1e-8)")
    T.close(F.rms_norm(xt, {33}, w, 1e-6), ref_rows(xt, 33, w, nil, 1e-6, false), 0, tol,
        "rms_norm fwd " .. dtype .. " transposed input")

    -- group_norm
    local xg = rnd({2, 6, 5, 3}, 11, dtype, 1.5, 0.5)
    local wg, bg = rnd({6}, 12, dtype), rnd({6}, 13, dtype)
    T.close(F.group_norm(xg, 3, wg, bg), ref_group(xg, 3, wg, bg, 1e-5), 0, tol,
        "group_norm fwd " .. dtype .. " N=2 C=6 G=3 5x3 affine")
    T.close(F.group_norm(xg, 2, nil, nil, 1e-3), ref_group(xg, 2, nil, nil, 1e-3), 0, tol,
        "group_norm fwd " .. dtype .. " G=2 no affine eps 1e-3")
    local xgt = rnd({2, 5, 6}, 14, dtype):transpose(1, 2)
    T.close(F.group_norm(xgt, 3, wg, bg), ref_group(xgt, 3, wg, bg, 1e-5), 0, tol,
        "group_norm fwd " .. dtype .. " (2,6,5) transposed input")
end

-- long rows (sums run in blocks of 4096) and a long group segment
do
    local x = rnd({3, 4133}, 15, "float32", 1, 2)
    T.close(F.layer_norm(x, {4133}), ref_rows(x, 4133, nil, nil, 1e-5, true), 0, 1e-5,
        "layer_norm fwd float32 (3,4133): rows longer than one sum block")
    T.close(F.rms_norm(x, {4133}), ref_rows(x, 4133, nil, nil, FLT_EPS, false), 0, 1e-5,
        "rms_norm fwd float32 (3,4133)")
    local xg = rnd({1, 4, 50, 50}, 16, "float32")
    T.close(F.group_norm(xg, 2), ref_group(xg, 2, nil, nil, 1e-5), 0, 1e-5,
        "group_norm fwd float32 (1,4,50,50) G=2: segments of 5000")
end

-- ==== gradients against central differences (float64) ====

local GC = {rtol = 1e-6, atol = 1e-8}
gradcheck(T, "layer_norm (7,33) x,w,b", function(x, w, b) return F.layer_norm(x, {33}, w, b) end,
    {leaf({7, 33}, 21, 2, 1), leaf({33}, 22), leaf({33}, 23)}, GC)
gradcheck(T, "layer_norm (3,5,7) over {7}", function(x, w, b) return F.layer_norm(x, {7}, w, b) end,
    {leaf({3, 5, 7}, 24), leaf({7}, 25), leaf({7}, 26)}, GC)
gradcheck(T, "layer_norm (3,5,7) over {5,7}", function(x, w, b) return F.layer_norm(x, {5, 7}, w, b, 1e-3) end,
    {leaf({3, 5, 7}, 27), leaf({5, 7}, 28), leaf({5, 7}, 29)}, GC)
gradcheck(T, "layer_norm no affine (7,33)", function(x) return F.layer_norm(x, 33) end, {leaf({7, 33}, 30)}, GC)
gradcheck(T, "layer_norm weight only", function(x, w) return F.layer_norm(x, {7}, w) end,
    {leaf({5, 7}, 31), leaf({7}, 32)}, GC)
gradcheck(T, "layer_norm bias only", function(x, b) return F.layer_norm(x, {7}, nil, b) end,
    {leaf({5, 7}, 33), leaf({7}, 34)}, GC)
gradcheck(T, "layer_norm transposed input", function(x, w, b) return F.layer_norm(x:transpose(0, 1), {7}, w, b) end,
    {leaf({7, 5}, 35), leaf({7}, 36), leaf({7}, 37)}, GC)
gradcheck(T, "layer_norm params only (x constant)", function(w, b) return F.layer_norm(rnd({5, 7}, 38), {7}, w, b) end,
    {leaf({7}, 39), leaf({7}, 40)}, GC)

gradcheck(T, "rms_norm (7,33) x,w", function(x, w) return F.rms_norm(x, {33}, w, 1e-6) end,
    {leaf({7, 33}, 41, 1, 0.5), leaf({33}, 42)}, GC)
gradcheck(T, "rms_norm (3,5,7) over {5,7}", function(x, w) return F.rms_norm(x, {5, 7}, w) end,
    {leaf({3, 5, 7}, 43), leaf({5, 7}, 44)}, GC)
gradcheck(T, "rms_norm no weight", function(x) return F.rms_norm(x, {7}, nil, 1e-3) end, {leaf({3, 5, 7}, 45)}, GC)
gradcheck(T, "rms_norm transposed input", function(x, w) return F.rms_norm(x:transpose(0, 1), {7}, w) end,
    {leaf({7, 5}, 46), leaf({7}, 47)}, GC)

gradcheck(T, "group_norm N=2 C=6 G=3 5x3", function(x, w, b) return F.group_norm(x, 3, w, b) end,
    {leaf({2, 6, 5, 3}, 51, 1.5, 0.5), leaf({6}, 52), leaf({6}, 53)}, GC)
gradcheck(T, "group_norm no affine (2,6,5)", function(x) return F.group_norm(x, 2, nil, nil, 1e-3) end,
    {leaf({2, 6, 5}, 54)}, GC)
gradcheck(T, "group_norm G=6 (instance-like), permuted input", function(x, w, b)
    return F.group_norm(x:permute(0, 3, 1, 2), 6, w, b) end,
    {leaf({2, 5, 3, 6}, 55), leaf({6}, 56), leaf({6}, 57)}, GC)
gradcheck(T, "group_norm (2,6) no spatial, G=1", function(x, w, b) return F.group_norm(x, 1, w, b) end,
    {leaf({2, 6}, 58), leaf({6}, 59), leaf({6}, 60)}, GC)

-- ==== bf16 against f32 (~1e-2 relative) ====

local function run(fn, dtype, xs, ws)
    local x = xs:to{dtype = dtype}:detach():requires_grad_()
    local params = {}
    for i, p in ipairs(ws) do params[i] = p:to{dtype = dtype}:detach():requires_grad_() end
    local y = fn(x, unpack(params))
    local g = rnd(y.shape, 99, dtype)
    y:backward(g)
    local grads = {}
    for i, p in ipairs(params) do grads[i] = p.grad end
    return y, x.grad, grads
end
local function half_vs_f32(name, fn, xs, ws, hdt)
    local y32, dx32, dp32 = run(fn, "float32", xs, ws)
    local yh, dxh, dph = run(fn, hdt, xs, ws)
    T.is(yh.dtype, hdt, name .. " " .. hdt .. ": output dtype")
    T.close(yh, y32, 1e-2, 1e-2, name .. " " .. hdt .. " fwd vs f32")
    T.close(dxh, dx32, 2e-2, 1e-2, name .. " " .. hdt .. " dx vs f32")
    for i = 1, #dp32 do
        T.close(dph[i], dp32[i], 2e-2, 1e-2, name .. " " .. hdt .. " dparam " .. i .. " vs f32")
    end
end
local xb = rnd({9, 130}, 61, "float32", 1, 0.5)
half_vs_f32("layer_norm", function(x, w, b) return F.layer_norm(x, {130}, w, b) end, xb,
    {rnd({130}, 62, "float32"), rnd({130}, 63, "float32")}, "bfloat16")
half_vs_f32("layer_norm", function(x, w, b) return F.layer_norm(x, {130}, w, b) end, xb,
    {rnd({130}, 62, "float32"), rnd({130}, 63, "float32")}, "float16")
half_vs_f32("rms_norm", function(x, w) return F.rms_norm(x, {130}, w, 1e-6) end, xb, {rnd({130}, 64, "float32")},
    "bfloat16")
half_vs_f32("group_norm", function(x, w, b) return F.group_norm(x, 3, w, b) end, rnd({2, 6, 5, 3}, 65, "float32"),
    {rnd({6}, 66, "float32"), rnd({6}, 67, "float32")}, "bfloat16")

-- mixed precision: bf16 activations with f32 parameters -> bf16 output, f32 parameter grads
do
    local x = xb:bfloat16():requires_grad_()
    local w = rnd({130}, 62, "float32"):requires_grad_()
    local b = rnd({130}, 63, "float32"):requires_grad_()
    local y = F.layer_norm(x, {130}, w, b)
    y:backward(nemo.ones(y.shape, {dtype = "bfloat16"}))
    T.ok(y.dtype == "bfloat16" and x.grad.dtype == "bfloat16" and w.grad.dtype == "float32"
        and b.grad.dtype == "float32", "layer_norm bf16 x with f32 w,b: y/dx bf16, dw/db f32 (got " ..
        y.dtype .. ", " .. x.grad.dtype .. ", " .. w.grad.dtype .. ", " .. b.grad.dtype .. ")")
    T.close(y, ref_rows(xb:bfloat16(), 130, w, b, 1e-5, true), 1e-2, 1e-2, "layer_norm bf16/f32 mixed fwd vs ref")
end

-- ==== results do not depend on the thread count ====

do
    local x0 = rnd({300, 200}, 71, "float32")     -- 60000 elements: parallel path, 5 chunks of rows
    local w0, b0 = rnd({200}, 72, "float32"), rnd({200}, 73, "float32")
    local g0 = rnd({300, 200}, 74, "float32")
    local function grads(nt)
        nemo.set_num_threads(nt)
        local x, w, b = x0:detach():requires_grad_(), w0:detach():requires_grad_(), b0:detach():requires_grad_()
        local y = F.layer_norm(x, {200}, w, b)
        y:backward(g0)
        return {flat(y), flat(x.grad), flat(w.grad), flat(b.grad)}
    end
    local nt0 = nemo.get_num_threads()
    local r1, r2 = grads(1), grads(2)
    nemo.set_num_threads(nt0)
    local same = true
    for k = 1, 4 do for i = 1, #r1[k] do if r1[k][i] ~= r2[k][i] then same = false end end end
    T.ok(same, "layer_norm (300,200) y, dx, dw, db bitwise equal with 1 and 2 threads")
    -- the chunked parameter sums agree with a double-precision reference
    local gv = flat(g0)
    local y = F.layer_norm(x0:double(), {200})
    local xh = flat(y)
    local dw, db = {}, {}
    for i = 1, 200 do dw[i], db[i] = 0, 0 end
    for r = 0, 299 do
        for i = 1, 200 do dw[i] = dw[i] + gv[r * 200 + i] * xh[r * 200 + i]; db[i] = db[i] + gv[r * 200 + i] end
    end
    T.close(r1[3], dw, 1e-5, 1e-5, "layer_norm (300,200) f32 dw vs f64 sum over rows")
    T.close(r1[4], db, 1e-5, 1e-5, "layer_norm (300,200) f32 db vs f64 sum over rows")
end

-- many rows: chunks grow past 64 rows (16500 rows -> 254 chunks of 65), odd last chunk
do
    local R = 16500
    local x = rnd({R, 3}, 75)
    local g = rnd({R, 3}, 76)
    local w = rnd({3}, 77):requires_grad_()
    local b = rnd({3}, 78):requires_grad_()
    local y = F.layer_norm(x, {3}, w, b)
    y:backward(g)
    local xh, gv = flat(F.layer_norm(x, {3})), flat(g)
    local dw, db = {0, 0, 0}, {0, 0, 0}
    for r = 0, R - 1 do
        for i = 1, 3 do dw[i] = dw[i] + gv[r * 3 + i] * xh[r * 3 + i]; db[i] = db[i] + gv[r * 3 + i] end
    end
    T.close(w.grad, dw, 1e-12, 1e-10, "layer_norm (16500,3) f64 dw vs Lua sum over rows")
    T.close(b.grad, db, 1e-12, 1e-10, "layer_norm (16500,3) f64 db vs Lua sum over rows")
end

-- ==== no grad mode records nothing ====
do
    local x = leaf({3, 7}, 80)
    local y = nemo.no_grad(function() return F.layer_norm(x, {7}) end)
    T.ok(not y.requires_grad and y.grad_fn == nil, "layer_norm under no_grad has no grad_fn")
end

-- ==== errors ====

local x = nemo.randn(2, 4)
T.raises(function() return F.layer_norm(x, {3}) end,
    "layer_norm: normalized_shape (3,) does not match the input of shape (2, 4) (expected an input of shape (*, 3))",
    "layer_norm: normalized_shape not matching the trailing dims")
T.raises(function() return F.layer_norm(x, {2, 4, 1}) end, "layer_norm: normalized_shape (2, 4, 1) does not match",
    "layer_norm: normalized_shape longer than the input")
T.raises(function() return F.layer_norm(x, {4}, nemo.ones(3)) end,
    "layer_norm: weight of shape (3,) does not match normalized_shape (4,)", "layer_norm: weight of the wrong shape")
T.raises(function() return F.layer_norm(x, {4}, nil, nemo.ones(1, 4)) end,
    "layer_norm: bias of shape (1, 4) does not match normalized_shape (4,)", "layer_norm: bias of the wrong shape")
T.raises(function() return F.layer_norm(x, {}) end, "layer_norm: normalized_shape must be",
    "layer_norm: empty normalized_shape")
T.raises(function() return F.layer_norm(nemo.arange(4), {4}) end, "layer_norm: expected a floating point input, got int64",
    "layer_norm: integer input")
T.raises(function() return F.layer_norm(nil, {4}) end, "layer_norm: expected a tensor for input, got nil",
    "layer_norm: missing input")
T.raises(function() return F.rms_norm(x, {5}) end,
    "rms_norm: normalized_shape (5,) does not match the input of shape (2, 4)", "rms_norm: normalized_shape mismatch")
T.raises(function() return F.rms_norm(x, {4}, nemo.ones(2, 2)) end,
    "rms_norm: weight of shape (2, 2) does not match normalized_shape (4,)", "rms_norm: weight of the wrong shape")
T.raises(function() return F.group_norm(nemo.randn(2, 6, 5), 4) end,
    "group_norm: the number of channels C = 6 of the input of shape (2, 6, 5) is not divisible by num_groups = 4",
    "group_norm: C not divisible by num_groups")
T.raises(function() return F.group_norm(nemo.randn(2, 6, 5), 3, nemo.ones(5)) end,
    "group_norm: weight of shape (5,) does not match the 6 channels of the input of shape (2, 6, 5)",
    "group_norm: weight of the wrong shape")
T.raises(function() return F.group_norm(nemo.randn(6), 3) end, "group_norm: expected an input of shape (N, C, *)",
    "group_norm: 1-d input")
T.raises(function() return F.group_norm(nemo.randn(2, 6), 0) end, "group_norm: num_groups must be positive, got 0",
    "group_norm: num_groups 0")

T.done()
