-- tests/lua/test_conv.lua: conv1d/2d/3d, embedding and nearest interpolation: forward against
-- naive Lua loops, the fast kernel paths (1x1 direct, patchify) against the im2col path,
-- gradients against float64 central differences, bf16/f16 against f32, thread-count
-- determinism and the error messages.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local gradcheck = require "gradcheck"
local F = nemo.F

local function rnd(shape, seed, dtype)
    return nemo.randn(shape, {dtype = dtype or "float64", generator = nemo.Generator(seed)})
end
local function leaf(shape, seed) return rnd(shape, seed):requires_grad_() end
local function flat(t) return t:double():contiguous():reshape{-1}:tolist() end
local function shape_of(t) return table.concat(t.shape, "x") end

-- ==== naive references (plain Lua loops over flat arrays) ====

-- conv over nsp spatial dims with padding before/after per dim; returns flat output and shape.
local function naive_conv(x, w, b, nsp, o)
    local xs, ws = x.shape, w.shape
    local N, Cin, O = xs[1], xs[2], ws[1]
    local G = o.groups or 1
    local Cg, Og = Cin / G, O / G
    -- normalise to 3 spatial dims
    local S, K, st, lo, hi, dl = {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, {0, 0, 0}, {1, 1, 1}
    for d = 1, nsp do
        local k = 3 - nsp + d
        S[k], K[k] = xs[2 + d], ws[2 + d]
        st[k], lo[k], hi[k], dl[k] = o.stride[d], o.lo[d], o.hi[d], o.dil[d]
    end
    local OS = {}
    for d = 1, 3 do OS[d] = math.floor((S[d] + lo[d] + hi[d] - dl[d] * (K[d] - 1) - 1) / st[d]) + 1 end
    local xf, wf, bf = flat(x), flat(w), b and flat(b)
    local out = {}
    for n = 0, N - 1 do
        for oc = 0, O - 1 do
            local g = math.floor(oc / Og)
            for od = 0, OS[1] - 1 do for oh = 0, OS[2] - 1 do for ow = 0, OS[3] - 1 do
                local s = bf and bf[oc + 1] or 0
                for c = 0, Cg - 1 do
                    local ci = g * Cg + c
                    for kd = 0, K[1] - 1 do
                        local id = od * st[1] - lo[1] + kd * dl[1]
                        if id >= 0 and id < S[1] then
                            for kh = 0, K[2] - 1 do
                                local ih = oh * st[2] - lo[2] + kh * dl[2]
                                if ih >= 0 and ih < S[2] then
                                    for kw = 0, K[3] - 1 do
                                        local iw = ow * st[3] - lo[3] + kw * dl[3]
                                        if iw >= 0 and iw < S[3] then
                                            local xv = xf[(((n * Cin + ci) * S[1] + id) * S[2] + ih) * S[3] + iw + 1]
                                            local wv = wf[(((oc * Cg + c) * K[1] + kd) * K[2] + kh) * K[3] + kw + 1]
                                            s = s + xv * wv
                                        end
                                    end
                                end
                            end
                        end
                    end
                end
                out[#out + 1] = s
            end end end
        end
    end
    local shape = {N, O}
    for d = 1, nsp do shape[2 + d] = OS[3 - nsp + d] end
    return out, shape
end

-- options as the reference wants them: tables per dim, padding before/after
local function ref_opts(nsp, stride, pad, dil, groups)
    local function tup(v) if type(v) == "table" then return v end; local t = {}; for d = 1, nsp do t[d] = v end; return t end
    local o = {stride = tup(stride or 1), dil = tup(dil or 1), groups = groups or 1, lo = {}, hi = {}}
    if type(pad) == "table" and type(pad[1]) == "table" then
        for d = 1, nsp do o.lo[d], o.hi[d] = pad[d][1], pad[d][2] end
    else
        local p = tup(type(pad) == "string" and 0 or pad or 0)
        for d = 1, nsp do o.lo[d], o.hi[d] = p[d], p[d] end
    end
    return o
end

local convs = {F.conv1d, F.conv2d, F.conv3d}

local function check_conv(name, nsp, xs, ws, opts, with_bias, dtype)
    dtype = dtype or "float64"
    local x, w = rnd(xs, 11, dtype), rnd(ws, 12, dtype)
    local b = with_bias and rnd({ws[1]}, 13, dtype) or nil
    local y = convs[nsp](x, w, b, opts)
    local ro = ref_opts(nsp, opts.stride, opts.padding, opts.dilation, opts.groups)
    if opts.padding == "same" then   -- PyTorch: total = d*(k-1), before = total // 2
        for d = 1, nsp do
            local total = ro.dil[d] * (ws[2 + d] - 1)
            ro.lo[d] = math.floor(total / 2); ro.hi[d] = total - ro.lo[d]
        end
    end
    local ref, rshape = naive_conv(x, w, b, nsp, ro)
    T.is(shape_of(y), table.concat(rshape, "x"), name .. ": output shape")
    local tol = dtype == "float64" and 1e-12 or 1e-5
    T.close(y, ref, tol, tol, name .. string.format(" vs naive loops (%s)", dtype))
    return y
end

-- ==== conv2d forward vs naive ====
check_conv("conv2d stride 2 pad 1 bias (2,4,7,5)", 2, {2, 4, 7, 5}, {6, 4, 3, 3}, {stride = 2, padding = 1}, true)
check_conv("conv2d stride 2 pad 1 bias f32", 2, {2, 4, 7, 5}, {6, 4, 3, 3}, {stride = 2, padding = 1}, true, "float32")
check_conv("conv2d dilation 2 pad 2 groups 2 no bias", 2, {2, 4, 7, 5}, {6, 2, 3, 3},
    {padding = 2, dilation = 2, groups = 2}, false)
check_conv("conv2d depthwise groups=C same", 2, {1, 4, 7, 5}, {8, 1, 3, 3}, {padding = "same", groups = 4}, true)
check_conv("conv2d mixed stride/pad/dilation per dim", 2, {2, 3, 7, 5}, {4, 3, 3, 2},
    {stride = {2, 1}, padding = {1, 0}, dilation = {1, 2}}, true)
check_conv("conv2d same with even kernel (asymmetric)", 2, {1, 3, 7, 5}, {2, 3, 4, 2}, {padding = "same"}, true)
check_conv("conv2d explicit asymmetric padding pairs", 2, {1, 3, 7, 5}, {2, 3, 3, 3},
    {padding = {{2, 0}, {0, 1}}, stride = 2}, true)
check_conv("conv2d 1x1 (direct path) groups 2", 2, {2, 4, 7, 5}, {6, 2, 1, 1}, {groups = 2}, true)
check_conv("conv2d patchify k=s=2 with remainder", 2, {2, 4, 7, 5}, {6, 4, 2, 2}, {stride = 2}, true)
check_conv("conv2d valid", 2, {1, 2, 7, 5}, {3, 2, 3, 3}, {padding = "valid"}, false)
check_conv("conv2d kernel = padded input", 2, {1, 2, 3, 2}, {3, 2, 5, 4}, {padding = 1}, true)
check_conv("conv1d stride 2 pad 1 dilation 2", 1, {2, 4, 9}, {6, 2, 3}, {stride = 2, padding = 1, dilation = 2, groups = 2}, true)

-- positional arguments as in PyTorch: conv2d(x, w, b, stride, padding, dilation, groups)
do
    local x, w, b = rnd({2, 4, 7, 5}, 1), rnd({6, 2, 3, 3}, 2), rnd({6}, 3)
    local a = F.conv2d(x, w, b, 2, 1, 1, 2)
    local k = F.conv2d(x, w, b, {stride = 2, padding = 1, groups = 2})
    T.close(a, k, 0, 0, "conv2d positional stride/padding/dilation/groups == options table")
    local u = F.conv2d(x[1], w, b, {stride = 2, padding = 1, groups = 2})
    T.is(shape_of(u), "6x4x3", "conv2d unbatched (C, H, W) input gives (O, H', W')")
    T.close(u, k[1], 1e-12, 1e-12, "conv2d unbatched == batched sample 1")
    local xt = rnd({2, 4, 5, 7}, 4):transpose(2, 3)
    T.close(F.conv2d(xt, w, b, {groups = 2, padding = 1}), F.conv2d(xt:contiguous(), w, b, {groups = 2, padding = 1}),
        0, 0, "conv2d non-contiguous input == contiguous copy")
end

-- ==== conv3d forward vs naive ====
check_conv("conv3d stride 2 pad 1 groups 2 bias (2,4,5,7,5)", 3, {2, 4, 5, 7, 5}, {6, 2, 3, 3, 3},
    {stride = 2, padding = 1, groups = 2}, true)
check_conv("conv3d dilation 2 pad 2 no bias", 3, {1, 3, 5, 7, 5}, {2, 3, 2, 3, 2}, {padding = 2, dilation = 2}, false)
check_conv("conv3d VAE 3x3x3 pad 1", 3, {1, 3, 3, 6, 5}, {4, 3, 3, 3, 3}, {padding = 1}, true)
check_conv("conv3d Wan patchify k=s=(1,2,2)", 3, {1, 4, 3, 6, 8}, {5, 4, 1, 2, 2}, {stride = {1, 2, 2}}, true)
check_conv("conv3d patchify with remainder f32", 3, {2, 3, 3, 7, 5}, {5, 3, 1, 2, 2}, {stride = {1, 2, 2}}, true, "float32")

-- ==== fast paths vs the im2col path, forward and backward ====
local function paths_agree(name, fn, xs, ws, opts)
    local x, w, b = leaf(xs, 21), leaf(ws, 22), leaf({ws[1]}, 23)
    local function run(algo)
        x.grad, w.grad, b.grad = nil, nil, nil
        local o = {}
        for k, v in pairs(opts) do o[k] = v end
        o.algo = algo
        local y = fn(x, w, b, o)
        local r = rnd(y.shape, 24)
        y:backward(r)
        return y:detach(), x.grad, w.grad, b.grad
    end
    local y1, dx1, dw1, db1 = run("auto")
    local y2, dx2, dw2, db2 = run("im2col")
    T.close(y1, y2, 1e-12, 1e-12, name .. ": forward fast path == im2col")
    T.close(dx1, dx2, 1e-12, 1e-12, name .. ": dx fast path == im2col")
    T.close(dw1, dw2, 1e-12, 1e-12, name .. ": dw fast path == im2col")
    T.close(db1, db2, 1e-12, 1e-12, name .. ": db fast path == im2col")
end
paths_agree("conv2d patchify k=s=2 (7x5)", F.conv2d, {2, 4, 7, 5}, {6, 4, 2, 2}, {stride = 2})
paths_agree("conv2d patchify k=s=(3,1) groups 2", F.conv2d, {2, 4, 7, 5}, {6, 2, 3, 1}, {stride = {3, 1}, groups = 2})
paths_agree("conv2d 1x1 direct groups 2", F.conv2d, {2, 4, 7, 5}, {6, 2, 1, 1}, {groups = 2})
paths_agree("conv3d Wan patchify (1,2,2)", F.conv3d, {2, 4, 3, 6, 7}, {5, 4, 1, 2, 2}, {stride = {1, 2, 2}})

-- im2col in several chunks of output rows (the column buffer holds 4M elements: 576 x 64 per row,
-- so 113 rows a chunk) == the same conv on two halves computed in one chunk each
do
    local x, w, b = leaf({1, 64, 130, 64}, 25), leaf({8, 64, 3, 3}, 26), leaf({8}, 27)
    local r = rnd({1, 8, 130, 64}, 28)
    local y = F.conv2d(x, w, b, {padding = 1})
    y:backward(r)
    local dx1, dw1, db1 = x.grad, w.grad, b.grad
    x.grad, w.grad, b.grad = nil, nil, nil
    local top = F.conv2d(x:narrow(2, 0, 66), w, b, {padding = {{1, 0}, {1, 1}}})
    local bot = F.conv2d(x:narrow(2, 64, 66), w, b, {padding = {{0, 1}, {1, 1}}})
    local y2 = nemo.cat({top, bot}, 2)
    y2:backward(r)
    T.close(y, y2, 1e-12, 1e-12, "conv2d im2col over 2 chunks == two halves in one chunk: forward")
    T.close(dx1, x.grad, 1e-12, 1e-12, "conv2d im2col over 2 chunks: dx")
    T.close(dw1, w.grad, 1e-12, 1e-12, "conv2d im2col over 2 chunks: dw")
    T.close(db1, b.grad, 1e-12, 1e-12, "conv2d im2col over 2 chunks: db")
end

-- ==== gradients vs float64 central differences ====
gradcheck(T, "conv2d stride 2 pad 1 dil 2 groups 2",
    function(x, w, b) return F.conv2d(x, w, b, {stride = 2, padding = 1, dilation = 2, groups = 2}) end,
    {leaf({2, 4, 7, 5}, 31), leaf({6, 2, 3, 3}, 32), leaf({6}, 33)})
gradcheck(T, "conv2d non-contiguous input, asymmetric same",
    function(x, w) return F.conv2d(x:transpose(2, 3), w, nil, {padding = "same"}) end,
    {leaf({1, 3, 5, 7}, 34), leaf({2, 3, 4, 3}, 35)})
gradcheck(T, "conv2d patchify k=s=2 remainder",
    function(x, w, b) return F.conv2d(x, w, b, {stride = 2}) end,
    {leaf({2, 3, 7, 5}, 36), leaf({4, 3, 2, 2}, 37), leaf({4}, 38)})
gradcheck(T, "conv2d 1x1 direct groups 2",
    function(x, w, b) return F.conv2d(x, w, b, {groups = 2}) end,
    {leaf({2, 4, 3, 5}, 39), leaf({6, 2, 1, 1}, 40), leaf({6}, 41)})
gradcheck(T, "conv1d stride 2 pad 1",
    function(x, w, b) return F.conv1d(x, w, b, {stride = 2, padding = 1}) end,
    {leaf({2, 3, 9}, 42), leaf({4, 3, 3}, 43), leaf({4}, 44)})
gradcheck(T, "conv3d stride (1,2,1) pad 1 groups 2",
    function(x, w, b) return F.conv3d(x, w, b, {stride = {1, 2, 1}, padding = 1, groups = 2}) end,
    {leaf({1, 4, 3, 5, 4}, 45), leaf({4, 2, 3, 2, 3}, 46), leaf({4}, 47)})
gradcheck(T, "conv3d Wan patchify (1,2,2)",
    function(x, w, b) return F.conv3d(x, w, b, {stride = {1, 2, 2}}) end,
    {leaf({1, 3, 2, 4, 5}, 48), leaf({4, 3, 1, 2, 2}, 49), leaf({4}, 50)})

-- only some inputs need grad: x frozen (Wan latents), or weight frozen
do
    local x, w = rnd({1, 3, 5, 5}, 51), leaf({2, 3, 3, 3}, 52)
    local y = F.conv2d(x, w, nil, {padding = 1})
    y:backward(nemo.ones_like(y))
    T.ok(w.grad ~= nil and x.grad == nil, "conv2d: only the weight that requires grad gets one")
    local x2, w2 = leaf({1, 3, 5, 5}, 53), rnd({2, 3, 3, 3}, 54)
    local y2 = F.conv2d(x2, w2, nil, {padding = 1})
    y2:backward(nemo.ones_like(y2))
    T.ok(x2.grad ~= nil and w2.grad == nil, "conv2d: only the input that requires grad gets one")
end

-- ==== bf16 / f16 vs f32 ====
local function lowp_vs_f32(name, fn, xs, ws, dtype)
    local x = rnd(xs, 61, "float32"):to(dtype)
    local w = (rnd(ws, 62, "float32") * 0.3):to(dtype)
    local b = rnd({ws[1]}, 63, "float32"):to(dtype)
    local y = fn(x, w, b)
    T.is(y.dtype, dtype, name .. ": output stays " .. dtype)
    local ref = fn(x:float(), w:float(), b:float())
    T.close(y:float(), ref, 1e-2, 1e-2, name .. " " .. dtype .. " vs f32 on the same values (rtol 1e-2)")
end
lowp_vs_f32("conv2d pad 1", function(x, w, b) return F.conv2d(x, w, b, {padding = 1}) end, {2, 4, 7, 5}, {6, 4, 3, 3}, "bfloat16")
lowp_vs_f32("conv2d pad 1", function(x, w, b) return F.conv2d(x, w, b, {padding = 1}) end, {2, 4, 7, 5}, {6, 4, 3, 3}, "float16")
lowp_vs_f32("conv3d patchify", function(x, w, b) return F.conv3d(x, w, b, {stride = {1, 2, 2}}) end,
    {1, 4, 3, 6, 8}, {5, 4, 1, 2, 2}, "bfloat16")
do
    local x = rnd({2, 4, 7, 5}, 64, "float32"):bfloat16():requires_grad_()
    local w = rnd({6, 4, 3, 3}, 65, "float32"):bfloat16():requires_grad_()
    local b = rnd({6}, 66, "float32"):requires_grad_()
    local y = F.conv2d(x, w, b, {padding = 1})
    T.is(y.dtype, "float32", "conv2d bf16 input + f32 bias promotes to float32")
    y:backward(nemo.ones_like(y))
    T.ok(x.grad.dtype == "bfloat16" and w.grad.dtype == "bfloat16" and b.grad.dtype == "float32",
        "conv2d gradients come back in each input's dtype")
    local x32, w32, b32 = x:detach():float():requires_grad_(), w:detach():float():requires_grad_(), b:detach():requires_grad_()
    local y32 = F.conv2d(x32, w32, b32, {padding = 1})
    y32:backward(nemo.ones_like(y32))
    T.close(w.grad:float(), w32.grad, 1e-2, 1e-2, "conv2d bf16 dw vs f32 (rtol 1e-2)")
    T.close(x.grad:float(), x32.grad, 1e-2, 1e-2, "conv2d bf16 dx vs f32 (rtol 1e-2)")
end

-- ==== determinism: 1 thread vs 2 threads, bit for bit ====
do
    local x = rnd({2, 16, 40, 48}, 71, "float32"):requires_grad_()
    local w = rnd({32, 16, 3, 3}, 72, "float32"):requires_grad_()
    local r = rnd({2, 32, 20, 24}, 73, "float32")
    local function run(nt)
        nemo.set_num_threads(nt)
        x.grad, w.grad = nil, nil
        local y = F.conv2d(x, w, nil, {stride = 2, padding = 1})
        y:backward(r)
        return flat(y), flat(x.grad), flat(w.grad)
    end
    local nt0 = nemo.get_num_threads()
    local y1, dx1, dw1 = run(1)
    local y2, dx2, dw2 = run(2)
    nemo.set_num_threads(nt0)
    local same = true
    for i = 1, #y1 do if y1[i] ~= y2[i] then same = false end end
    for i = 1, #dx1 do if dx1[i] ~= dx2[i] then same = false end end
    for i = 1, #dw1 do if dw1[i] ~= dw2[i] then same = false end end
    T.ok(same, "conv2d forward and backward are bitwise identical with 1 and 2 threads")
end

-- ==== embedding ====
do
    local W = rnd({5, 3}, 81)
    local idx = nemo.tensor({{1, 3, 1}, {4, 1, 0}})
    local e = F.embedding(idx, W)
    T.is(shape_of(e), "2x3x3", "embedding (2,3) indices, (5,3) weight -> (2,3,3)")
    local wl, el = W:tolist(), e:tolist()
    local ok = true
    for i = 1, 2 do for j = 1, 3 do
        local row = wl[idx:tolist()[i][j] + 1]
        for k = 1, 3 do if el[i][j][k] ~= row[k] then ok = false end end
    end end
    T.ok(ok, "embedding rows are exact copies of the weight rows")
    local e32 = F.embedding(idx:int(), W)
    T.close(e32, e, 0, 0, "embedding int32 indices == int64 indices")
    T.close(F.embedding(nemo.tensor(2), W), W[2], 0, 0, "embedding 0-dim index gives one row")
    local Wb = W:bfloat16()
    T.close(F.embedding(idx, Wb):float(), F.embedding(idx, Wb:float()), 0, 0, "embedding bf16 exact")

    gradcheck(T, "embedding weight grad, repeated indices", function(w) return F.embedding(idx, w) end, {leaf({5, 3}, 82)})
    gradcheck(T, "embedding non-contiguous weight", function(w) return F.embedding(idx, w:t()) end, {leaf({3, 5}, 83)})

    local Wl = leaf({5, 3}, 84)
    local y = F.embedding(idx, Wl)
    y:backward(nemo.ones_like(y))
    local g = Wl.grad:tolist()
    T.ok(g[2][1] == 3 and g[1][1] == 1 and g[3][1] == 0 and g[4][1] == 1 and g[5][1] == 1,
        "embedding backward counts: index 1 used 3 times, 2 never")
    local Wp = leaf({5, 3}, 85)
    local yp = F.embedding(idx, Wp, {padding_idx = 1})
    yp:backward(nemo.ones_like(yp))
    T.ok(Wp.grad:tolist()[2][1] == 0 and Wp.grad:tolist()[1][1] == 1, "embedding padding_idx row gets no gradient")
    local Wn = leaf({5, 3}, 86)
    local yn = F.embedding(idx, Wn, -4)
    yn:backward(nemo.ones_like(yn))
    T.ok(Wn.grad:tolist()[2][1] == 0, "embedding negative padding_idx counts from the end")

    -- deterministic with threads: many repeated indices, big enough to run in parallel
    local big = (nemo.rand({4000}, {generator = nemo.Generator(87)}) * 50):long()
    local Wd = rnd({50, 64}, 88, "float32"):requires_grad_()
    local gd = rnd({4000, 64}, 89, "float32")
    local function run(nt)
        nemo.set_num_threads(nt)
        Wd.grad = nil
        F.embedding(big, Wd):backward(gd)
        return flat(Wd.grad)
    end
    local nt0 = nemo.get_num_threads()
    local a, b = run(1), run(2)
    nemo.set_num_threads(nt0)
    local same = true
    for i = 1, #a do if a[i] ~= b[i] then same = false end end
    T.ok(same, "embedding backward bitwise identical with 1 and 2 threads (4000 indices into 50 rows)")
end

-- ==== interpolate ====
local function map_of(t) local l = flat(t); for i = 1, #l do l[i] = math.floor(l[i]) end; return table.concat(l, ",") end
do
    local function line(n) return nemo.arange(n, {dtype = "float32"}):reshape{1, 1, n} end
    T.is(map_of(F.interpolate(line(3), {scale_factor = 2})), "0,0,1,1,2,2", "nearest scale 2 (1-D)")
    T.is(map_of(F.interpolate(line(3), {size = 5})), "0,0,1,1,2", "nearest size 3 -> 5: floor(i * 3/5)")
    T.is(map_of(F.interpolate(line(3), {size = 5, mode = "nearest-exact"})), "0,0,1,2,2",
        "nearest-exact size 3 -> 5: floor((i + 0.5) * 3/5)")
    T.is(map_of(F.interpolate(line(4), {scale_factor = 1.5})), "0,0,1,2,2,3", "nearest scale 1.5: 4 -> 6")
    -- a given scale_factor is used as 1/s (float), not in/out: 5 -> 8 differs at i = 5
    T.is(map_of(F.interpolate(line(5), {scale_factor = 1.7})), "0,0,1,1,2,2,3,4", "nearest scale 1.7 uses 1/1.7")
    T.is(map_of(F.interpolate(line(5), {size = 8})), "0,0,1,1,2,3,3,4", "nearest size 8 uses 5/8")
    T.is(map_of(F.interpolate(line(5), {scale_factor = 1.7, recompute_scale_factor = true})), "0,0,1,1,2,3,3,4",
        "recompute_scale_factor uses in/out")
    -- PyTorch's CPU kernel halves the index whenever out == 2 * in, whatever the scale
    T.is(map_of(F.interpolate(line(3), {scale_factor = 2.1})), "0,0,1,1,2,2", "nearest out == 2*in shortcut (scale 2.1)")
    T.is(map_of(F.interpolate(line(6), {scale_factor = 0.5})), "0,2,4", "nearest downsample 0.5")

    local x = rnd({2, 3, 3, 4}, 91)
    local y = F.interpolate(x, {scale_factor = 2})
    T.is(shape_of(y), "2x3x6x8", "interpolate 4-D scale 2 shape")
    local xl, yl = x:tolist(), y:tolist()
    local ok = true
    for n = 1, 2 do for c = 1, 3 do for i = 1, 6 do for j = 1, 8 do
        if yl[n][c][i][j] ~= xl[n][c][math.floor((i - 1) / 2) + 1][math.floor((j - 1) / 2) + 1] then ok = false end
    end end end end
    T.ok(ok, "interpolate 4-D scale 2 values: y[i][j] = x[i//2][j//2]")
    local y5 = F.interpolate(rnd({1, 2, 2, 3, 2}, 92), {scale_factor = {1, 2, 2}})
    T.is(shape_of(y5), "1x2x2x6x4", "interpolate 5-D scale (1,2,2) shape")
    local xi = nemo.arange(12):reshape{1, 1, 3, 4}
    T.is(F.interpolate(xi, {scale_factor = 2}).dtype, "int64", "interpolate keeps integer dtype")
    local xb = rnd({1, 2, 3, 4}, 93, "float32"):bfloat16()
    T.close(F.interpolate(xb, {size = {5, 7}}):float(), F.interpolate(xb:float(), {size = {5, 7}}), 0, 0,
        "interpolate bf16 == f32 exactly (nearest copies)")
    T.close(F.interpolate(x:transpose(2, 3), {scale_factor = 2}), F.interpolate(x:transpose(2, 3):contiguous(),
        {scale_factor = 2}), 0, 0, "interpolate non-contiguous input")

    gradcheck(T, "interpolate scale 2 (4-D)", function(t) return F.interpolate(t, {scale_factor = 2}) end,
        {leaf({2, 3, 3, 4}, 94)})
    gradcheck(T, "interpolate size (5,7) from (3,4)", function(t) return F.interpolate(t, {size = {5, 7}}) end,
        {leaf({1, 2, 3, 4}, 95)})
    gradcheck(T, "interpolate downsample size (2,3) from (5,7)", function(t) return F.interpolate(t, {size = {2, 3}}) end,
        {leaf({1, 2, 5, 7}, 96)})
    gradcheck(T, "interpolate nearest-exact 3-D size 7", function(t)
        return F.interpolate(t, {size = 7, mode = "nearest-exact"}) end, {leaf({2, 2, 4}, 97)})
    gradcheck(T, "interpolate 5-D scale (1,2,2) non-contiguous", function(t)
        return F.interpolate(t:transpose(3, 4), {scale_factor = {1, 2, 2}}) end, {leaf({1, 2, 2, 2, 3}, 98)})
end

-- ==== pad (constant) and avg_pool2d ====
do
    local x = rnd({2, 3}, 101)
    local p = F.pad(x, {1, 2})
    T.is(shape_of(p), "2x6", "pad {1, 2} on (2, 3) pads the last dim")
    local pl, xl = p:tolist(), x:tolist()
    T.ok(pl[1][1] == 0 and pl[2][5] == 0 and pl[2][6] == 0 and pl[1][2] == xl[1][1] and pl[2][4] == xl[2][3],
        "pad places the input after `before` zeros")
    T.is(shape_of(F.pad(rnd({1, 2, 3, 4}, 102), {1, 0, 0, 1})), "1x2x4x5", "pad pairs run from the last dim backwards")
    T.is(F.pad(x, {1, 1}, {value = 7}):tolist()[1][1], 7, "pad value")
    local c = F.pad(x, {-1, 1})
    T.ok(shape_of(c) == "2x3" and c:tolist()[1][1] == xl[1][2] and c:tolist()[1][3] == 0, "pad negative crops")
    gradcheck(T, "pad {1, 2, 0, 1}", function(t) return F.pad(t, {1, 2, 0, 1}) end, {leaf({2, 3, 4}, 103)})
    gradcheck(T, "pad with crop {-1, 2}", function(t) return F.pad(t:transpose(0, 1), {-1, 2}) end, {leaf({3, 4}, 104)})
    -- FLUX VAE Downsample2D: pad (0, 1, 0, 1) then a stride-2 conv == conv with asymmetric padding
    local xi, w = rnd({1, 3, 7, 6}, 105), rnd({4, 3, 3, 3}, 106)
    T.close(F.conv2d(F.pad(xi, {0, 1, 0, 1}), w, nil, {stride = 2}),
        F.conv2d(xi, w, nil, {stride = 2, padding = {{0, 1}, {0, 1}}}), 1e-12, 1e-12,
        "pad + conv2d == conv2d with padding pairs")
    T.raises(function() return F.pad(x, {1, 1}, {mode = "reflect"}) end, "pad: mode 'reflect' is not supported yet",
        "pad reflect not supported yet")
    T.raises(function() return F.pad(x, {1}) end, "pad: pad must be a table of an even number", "pad odd length")
    T.raises(function() return F.pad(x, {-2, -2}) end, "gives a negative size", "pad cropping below zero")

    -- avg_pool2d against loops
    local function naive_pool(t, k, s, pd, include)
        local sh = t.shape
        local N, Cc, H, W = sh[1], sh[2], sh[3], sh[4]
        local OH, OW = math.floor((H + 2 * pd - k) / s) + 1, math.floor((W + 2 * pd - k) / s) + 1
        local f, out = flat(t), {}
        for n = 0, N - 1 do for c = 0, Cc - 1 do for oh = 0, OH - 1 do for ow = 0, OW - 1 do
            local sum, cnt = 0, 0
            for kh = 0, k - 1 do for kw = 0, k - 1 do
                local ih, iw = oh * s - pd + kh, ow * s - pd + kw
                if ih >= 0 and ih < H and iw >= 0 and iw < W then
                    sum = sum + f[((n * Cc + c) * H + ih) * W + iw + 1]; cnt = cnt + 1
                end
            end end
            out[#out + 1] = sum / (include and k * k or cnt)
        end end end end
        return out
    end
    local xp = rnd({2, 3, 7, 5}, 107)
    T.close(F.avg_pool2d(xp, 2), naive_pool(xp, 2, 2, 0, true), 1e-12, 1e-12, "avg_pool2d k=2 vs loops")
    T.close(F.avg_pool2d(xp, 3, {stride = 2, padding = 1}), naive_pool(xp, 3, 2, 1, true), 1e-12, 1e-12,
        "avg_pool2d k=3 s=2 p=1 count_include_pad vs loops")
    T.close(F.avg_pool2d(xp, 3, {stride = 2, padding = 1, count_include_pad = false}), naive_pool(xp, 3, 2, 1, false),
        1e-12, 1e-12, "avg_pool2d k=3 s=2 p=1 count_include_pad=false vs loops")
    T.is(F.avg_pool2d(xp:float():bfloat16(), 2).dtype, "bfloat16", "avg_pool2d keeps bf16")
    T.is(shape_of(F.avg_pool2d(xp[1], 2)), "3x3x2", "avg_pool2d unbatched (C, H, W)")
    gradcheck(T, "avg_pool2d k=3 s=2 p=1 count_include_pad=false", function(t)
        return F.avg_pool2d(t, 3, {stride = 2, padding = 1, count_include_pad = false}) end, {leaf({1, 2, 7, 5}, 108)})
    T.raises(function() return F.avg_pool2d(xp, 2, {padding = 2}) end, "padding should be at most half the kernel",
        "avg_pool2d padding larger than half the kernel")
end

-- ==== errors ====
do
    local x, w = rnd({2, 4, 7, 5}, 1), rnd({6, 4, 3, 3}, 2)
    T.raises(function() return F.conv2d(x, rnd({6, 3, 3, 3}, 3)) end,
        "conv2d: input of shape (2, 4, 7, 5) has 4 channels, but weight of shape (6, 3, 3, 3)",
        "conv2d channel mismatch names op and shapes")
    T.raises(function() return F.conv2d(x, w, nil, {stride = 0}) end, "conv2d: stride must be >= 1",
        "conv2d stride 0 is an error")
    T.raises(function() return F.conv2d(x, w, nil, {dilation = {1, 0}}) end, "conv2d: dilation must be >= 1",
        "conv2d dilation 0 is an error")
    T.raises(function() return F.conv2d(x, w, nil, {padding = -1}) end, "conv2d: padding must be >= 0",
        "conv2d negative padding is an error")
    T.raises(function() return F.conv2d(x, rnd({6, 4, 10, 3}, 4), nil, {padding = 1}) end,
        "kernel size can't be greater than the padded input size",
        "conv2d kernel larger than the padded input")
    T.raises(function() return F.conv2d(rnd({4, 7}, 5), w) end,
        "conv2d: expected a 3D (unbatched) or 4D (batched) input, got input of shape (4, 7)",
        "conv2d 2-D input is a rank error")
    T.raises(function() return F.conv2d(x, rnd({6, 4, 3}, 6)) end, "conv2d: expected a 4D weight",
        "conv2d 3-D weight is a rank error")
    T.raises(function() return F.conv3d(rnd({4, 7, 5}, 13), rnd({6, 4, 3, 3, 3}, 14)) end,
        "conv3d: expected a 4D (unbatched) or 5D (batched) input, got input of shape (4, 7, 5)",
        "conv3d 3-D input is a rank error")
    T.raises(function() return F.conv3d(x, w) end, "conv3d: expected a 5D weight", "conv3d 4-D weight is a rank error")
    T.raises(function() return F.conv2d(x, rnd({5, 2, 3, 3}, 7), nil, {groups = 2}) end,
        "not divisible by groups 2", "conv2d out_channels not divisible by groups")
    T.raises(function() return F.conv2d(x, w, rnd({5}, 8)) end, "conv2d: bias must have shape (6,)",
        "conv2d bias shape mismatch")
    T.raises(function() return F.conv2d(nemo.ones({1, 4, 7, 5}, {dtype = "int64"}), w) end,
        "conv2d: expected floating point tensors", "conv2d integer input is a dtype error")
    T.raises(function() return F.conv2d(x, w, nil, {stride = 2, padding = "same"}) end,
        "padding='same' is not supported for strided convolutions", "conv2d same + stride 2")
    T.raises(function() return F.conv2d(x, w, nil, {padding = "full"}) end, "padding must be 'same' or 'valid'",
        "conv2d unknown padding string")
    T.raises(function() return F.conv2d(x, w, nil, {stride = {1, 2, 3}}) end,
        "conv2d: stride must be an integer or a table of 2 integers", "conv2d stride with 3 values")
    T.raises(function() return F.conv2d(x, w, nil, {algo = "winograd"}) end, "algo must be 'auto' or 'im2col'",
        "conv2d unknown algo")
    T.raises(function() return F.conv2d(x, "w") end, "conv2d: expected a tensor for weight", "conv2d weight not a tensor")

    local W = rnd({5, 3}, 9)
    T.raises(function() return F.embedding(nemo.tensor({1, 7}), W) end,
        "embedding: index 7 (at flat position 1 of indices (2,)) is out of range for a weight with V = 5 rows",
        "embedding index out of range names the index and V")
    T.raises(function() return F.embedding(nemo.tensor({-1}), W) end, "index -1", "embedding negative index")
    T.raises(function() return F.embedding(nemo.tensor({1.5}), W) end, "embedding: indices must be int64 or int32",
        "embedding float indices")
    T.raises(function() return F.embedding(nemo.tensor({1}), rnd({5}, 10)) end, "embedding: weight must be 2-D",
        "embedding 1-D weight")
    T.raises(function() return F.embedding(nemo.tensor({1}), W, {padding_idx = 5}) end,
        "padding_idx must be within", "embedding padding_idx out of range")
    T.raises(function() return F.embedding(nemo.tensor({1}), W, {max_norm = 1}) end, "max_norm is not supported yet",
        "embedding max_norm not supported")

    local xi = rnd({1, 2, 3, 4}, 11)
    T.raises(function() return F.interpolate(xi, {scale_factor = 2, mode = "bilinear"}) end,
        "interpolate: mode 'bilinear' is not supported yet", "interpolate bilinear not supported yet")
    T.raises(function() return F.interpolate(xi, {scale_factor = 2, mode = "bicubic"}) end,
        "mode 'bicubic' is not supported yet", "interpolate bicubic not supported yet")
    T.raises(function() return F.interpolate(xi, {scale_factor = 2, mode = "cubic"}) end,
        "interpolate: unknown mode 'cubic'", "interpolate unknown mode")
    T.raises(function() return F.interpolate(xi, {scale_factor = 2, size = {6, 8}}) end,
        "exactly one of size or scale_factor", "interpolate size and scale_factor both given")
    T.raises(function() return F.interpolate(xi, {}) end, "exactly one of size or scale_factor",
        "interpolate neither size nor scale_factor")
    T.raises(function() return F.interpolate(rnd({3, 4}, 12), {scale_factor = 2}) end,
        "interpolate: expected a 3-D, 4-D or 5-D input", "interpolate 2-D input")
    T.raises(function() return F.interpolate(xi, {size = {6, 8, 2}}) end, "size must have 2 values",
        "interpolate size of the wrong length")
    T.raises(function() return F.interpolate(xi, {size = {0, 8}}) end, "sizes should be greater than 0",
        "interpolate size 0")
    T.raises(function() return F.interpolate(xi, {scale_factor = 2, align_corners = false}) end,
        "align_corners can only be set", "interpolate align_corners with nearest")
end

T.done()
