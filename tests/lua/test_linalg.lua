-- tests/lua/test_linalg.lua: matmul / mm / bmm / mv / dot, linear and
-- scaled_dot_product_attention against plain-Lua references, float64 gradient checks, bf16
-- against f32, thread-count independence, no-copy views and error messages.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local gradcheck = require "gradcheck"
local F = nemo.F
local ffi = require "ffi"
local C = require("nemo.ffi").C

local function rnd(shape, seed, dtype)
    return nemo.randn(shape, {dtype = dtype or "float64", generator = nemo.Generator(seed)})
end
local function leaf(shape, seed) return rnd(shape, seed):requires_grad_() end
local function flat(t) return t:double():contiguous():reshape{-1}:tolist() end
local function sstr(s) return "(" .. table.concat(s, ",") .. ")" end
local function same_shape(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do if a[i] ~= b[i] then return false end end
    return true
end
local function prod(s, i, j)
    local p = 1
    for d = i or 1, j or #s do p = p * s[d] end
    return p
end

-- ==== references in plain Lua ====

-- torch.matmul semantics on the values of a and b (any float dtype); returns flat values and shape.
local function ref_matmul(a, b)
    local sa, sb = a.shape, b.shape
    local fa, fb = flat(a), flat(b)
    local va, vb = #sa == 1, #sb == 1
    if va then sa = {1, sa[1]} end
    if vb then sb = {sb[1], 1} end
    local n, k, m = sa[#sa - 1], sa[#sa], sb[#sb]
    local ba, bb = {}, {}
    for i = 1, #sa - 2 do ba[i] = sa[i] end
    for i = 1, #sb - 2 do bb[i] = sb[i] end
    local nb = math.max(#ba, #bb)
    local bs = {}
    for d = 1, nb do
        local x, y = ba[#ba - nb + d] or 1, bb[#bb - nb + d] or 1
        bs[d] = x == 1 and y or x
    end
    local function off(batch, idx, r, c, rows, cols)
        local o = 0
        for d = 1, #batch do
            local i = idx[nb - #batch + d]
            if batch[d] == 1 then i = 0 end
            o = o * batch[d] + i
        end
        return o * rows * cols + r * cols + c + 1
    end
    local out, idx = {}, {}
    for d = 1, nb do idx[d] = 0 end
    for _ = 1, prod(bs) do
        for i = 0, n - 1 do
            for j = 0, m - 1 do
                local s = 0
                for kk = 0, k - 1 do s = s + fa[off(ba, idx, i, kk, n, k)] * fb[off(bb, idx, kk, j, k, m)] end
                out[#out + 1] = s
            end
        end
        for d = nb, 1, -1 do
            idx[d] = idx[d] + 1
            if idx[d] < bs[d] then break end
            idx[d] = 0
        end
    end
    local shape = {}
    for d = 1, nb do shape[d] = bs[d] end
    if not va then shape[#shape + 1] = n end
    if not vb then shape[#shape + 1] = m end
    return out, shape
end

-- softmax(q k^T * scale + mask) v in plain Lua; opts: mask (bool or float tensor, broadcast),
-- is_causal, scale. Fully masked rows give zeros.
local function ref_sdpa(q, k, v, opts)
    opts = opts or {}
    local qs, ks, vs = q.shape, k.shape, v.shape
    local nd = #qs
    local Sq, D, Sk, Dv = qs[nd - 1], qs[nd], ks[nd - 1], vs[nd]
    local nbh = prod(qs, 1, nd - 2)
    local fq, fk, fv = flat(q), flat(k), flat(v)
    local fm, isbool
    if opts.mask then
        local full = {}
        for d = 1, nd - 1 do full[d] = qs[d] end
        full[nd] = Sk
        isbool = opts.mask.dtype == "bool"
        fm = flat(opts.mask:expand(full))
    end
    local scale = opts.scale or 1 / math.sqrt(D)
    local out = {}
    for bh = 0, nbh - 1 do
        for i = 0, Sq - 1 do
            local s, mx = {}, -math.huge
            for j = 0, Sk - 1 do
                local dot = 0
                for d = 0, D - 1 do dot = dot + fq[(bh * Sq + i) * D + d + 1] * fk[(bh * Sk + j) * D + d + 1] end
                local x = dot * scale
                if fm then
                    local mval = fm[(bh * Sq + i) * Sk + j + 1]
                    if isbool then if mval == 0 then x = -math.huge end else x = x + mval end
                end
                if opts.is_causal and j > i then x = -math.huge end
                s[j] = x
                if x > mx then mx = x end
            end
            local sum = 0
            for j = 0, Sk - 1 do
                s[j] = mx == -math.huge and 0 or math.exp(s[j] - mx)
                sum = sum + s[j]
            end
            for c = 0, Dv - 1 do
                local acc = 0
                if sum > 0 then
                    for j = 0, Sk - 1 do acc = acc + s[j] / sum * fv[(bh * Sk + j) * Dv + c + 1] end
                end
                out[#out + 1] = acc
            end
        end
    end
    return out
end

-- ==== matmul forward against the reference ====

local function check_matmul(name, a, b, rtol, fn)
    local y = (fn or nemo.matmul)(a, b)
    local ref, shape = ref_matmul(a, b)
    T.ok(same_shape(y.shape, shape), string.format("%s: shape %s == %s", name, sstr(y.shape), sstr(shape)))
    T.close(y, ref, rtol, 0, name)
end

local rank_cases = {
    {"1-D x 1-D", {5}, {5}},
    {"1-D x 2-D", {4}, {4, 6}},
    {"2-D x 1-D", {6, 4}, {4}},
    {"2-D x 2-D", {7, 5}, {5, 3}},
    {"1-D x 3-D", {4}, {3, 4, 5}},
    {"3-D x 1-D", {3, 5, 4}, {4}},
    {"2-D x 3-D broadcast", {7, 4}, {2, 4, 3}},
    {"batched broadcast (2,1,3,4) x (5,4,7)", {2, 1, 3, 4}, {5, 4, 7}},
    {"batched (3,2,4) x (2,1,4,5)", {3, 2, 4}, {2, 1, 4, 5}},
}
for i, c in ipairs(rank_cases) do
    check_matmul("matmul f64 " .. c[1] .. " vs naive (rtol 1e-12)", rnd(c[2], 10 + i), rnd(c[3], 30 + i), 1e-12)
    check_matmul("matmul f32 " .. c[1] .. " vs naive (rtol 1e-5)", rnd(c[2], 10 + i, "float32"),
        rnd(c[3], 30 + i, "float32"), 1e-5)
end

-- transposed, permuted, sliced (neither last stride 1) and expanded operands
check_matmul("matmul f32 transposed x transposed (rtol 1e-5)", rnd({5, 7}, 51, "float32"):t(),
    rnd({9, 5}, 52, "float32"):t(), 1e-5)
check_matmul("matmul f32 permuted batched heads (rtol 1e-5)", rnd({2, 6, 3, 5}, 53, "float32"):permute(0, 2, 1, 3),
    rnd({2, 3, 4, 5}, 54, "float32"):transpose(-1, -2), 1e-5)
check_matmul("matmul f64 strided slices, no unit stride (rtol 1e-12)", rnd({6, 14}, 55):slice(1, 0, 14, 2),
    rnd({7, 10}, 56):slice(1, 0, 10, 3), 1e-12)
check_matmul("matmul f64 expanded batch (rtol 1e-12)", rnd({1, 3, 4}, 57):expand(5, 3, 4), rnd({5, 4, 2}, 58), 1e-12)
check_matmul("matmul f64 1-D strided (rtol 1e-12)", rnd({4, 3}, 59):select(1, 1), rnd({3, 4, 2}, 60), 1e-12)
check_matmul("mm f64 (rtol 1e-12)", rnd({3, 4}, 61), rnd({4, 5}, 62), 1e-12, nemo.mm)
check_matmul("bmm f32 (rtol 1e-5)", rnd({3, 4, 5}, 63, "float32"), rnd({3, 5, 2}, 64, "float32"), 1e-5, nemo.bmm)
check_matmul("mv f64 (rtol 1e-12)", rnd({3, 4}, 65), rnd({4}, 66), 1e-12, nemo.mv)
check_matmul("dot f64 (rtol 1e-12)", rnd({7}, 67), rnd({7}, 68), 1e-12, nemo.dot)
check_matmul("method a:matmul(b) f64 (rtol 1e-12)", rnd({2, 3}, 69), rnd({3, 2}, 70), 1e-12,
    function(a, b) return a:matmul(b) end)
do
    local y = nemo.matmul(nemo.zeros(3, 0), nemo.zeros(0, 4))
    T.ok(same_shape(y.shape, {3, 4}) and nemo.abs(y):tolist()[3][4] == 0, "matmul (3,0) x (0,4) gives zeros (3,4)")
    local big = nemo.matmul(rnd({2, 3, 4, 5}, 71, "float32"), rnd({5, 6}, 72, "float32"))
    T.ok(same_shape(big.shape, {2, 3, 4, 6}) and big.dtype == "float32", "matmul (2,3,4,5) x (5,6) -> (2,3,4,6) float32")
end

-- ==== errors ====

T.raises(function() return nemo.matmul(nemo.ones(3, 4), nemo.ones(5, 6)) end, "matmul: shapes (3, 4) and (5, 6)",
    "matmul shape mismatch names op and both shapes")
T.raises(function() return nemo.matmul(nemo.ones(2, 3, 4), nemo.ones(3, 4, 5)) end, "matmul: batch dims of shapes (2, 3, 4) and (3, 4, 5)",
    "matmul batch mismatch names op and both shapes")
T.raises(function() return nemo.mm(nemo.ones(2, 3, 4), nemo.ones(4, 5)) end, "mm: expected a 2-D and a 2-D tensor, got shapes (2, 3, 4) and (4, 5)",
    "mm rejects 3-D input")
T.raises(function() return nemo.bmm(nemo.ones(2, 3, 4), nemo.ones(3, 4, 5)) end, "bmm: batch sizes differ: shapes (2, 3, 4) and (3, 4, 5)",
    "bmm does not broadcast")
T.raises(function() return nemo.matmul(nemo.arange(6):reshape{2, 3}, nemo.arange(6):reshape{3, 2}) end,
    "matmul: integer dtypes are not supported", "integer matmul is an error")
T.raises(function() return nemo.matmul(nemo.ones(2, 3), nemo.ones(3, 2, {dtype = "float64"})) end,
    "matmul: expected both operands to have the same dtype, got float32 and float64", "mixed dtypes are an error")
T.raises(function() return nemo.matmul(nemo.tensor(2.0), nemo.ones(3)) end, "at least 1 dimension", "0-dim matmul is an error")
T.raises(function() return F.linear(nemo.ones(2, 3), nemo.ones(4, 5)) end,
    "linear: input of shape (2, 3) and weight of shape (4, 5) do not match", "linear mismatch names op and both shapes")
T.raises(function() return F.linear(nemo.ones(2, 3), nemo.ones(4, 3), nemo.ones(5)) end,
    "linear: bias of shape (5,) does not match weight of shape (4, 3)", "linear bias mismatch")

-- ==== matmul gradients (float64 central differences) ====

gradcheck(T, "matmul 2-D x 2-D", function(a, b) return nemo.matmul(a, b) end, {leaf({7, 5}, 101), leaf({5, 3}, 102)})
gradcheck(T, "matmul 1-D x 1-D", function(a, b) return nemo.matmul(a, b) end, {leaf({7}, 103), leaf({7}, 104)})
gradcheck(T, "matmul 1-D x 3-D", function(a, b) return nemo.matmul(a, b) end, {leaf({4}, 105), leaf({2, 4, 3}, 106)})
gradcheck(T, "matmul 3-D x 1-D", function(a, b) return nemo.matmul(a, b) end, {leaf({2, 3, 4}, 107), leaf({4}, 108)})
gradcheck(T, "matmul broadcast (2,1,3,4) x (5,4,7)", function(a, b) return nemo.matmul(a, b) end,
    {leaf({2, 1, 3, 4}, 109), leaf({5, 4, 7}, 110)})
gradcheck(T, "matmul 3-D x 2-D (weight-like, summed over batch)", function(a, b) return nemo.matmul(a, b) end,
    {leaf({2, 7, 4}, 111), leaf({4, 5}, 112)})
gradcheck(T, "matmul transposed views inside fn", function(a, b) return nemo.matmul(a:transpose(-1, -2), b:t()) end,
    {leaf({2, 5, 3}, 113), leaf({4, 5}, 114)})
gradcheck(T, "bmm", function(a, b) return nemo.bmm(a, b) end, {leaf({3, 2, 4}, 115), leaf({3, 4, 5}, 116)})
do   -- only one side requires grad: the other is kept as a shape
    local a, b = leaf({3, 4}, 117), rnd({4, 2}, 118)
    gradcheck(T, "matmul, only a requires grad", function(x) return nemo.matmul(x, b) end, {a})
    local a2, b2 = rnd({3, 4}, 119), leaf({2, 4, 2}, 120)
    gradcheck(T, "matmul, only b requires grad", function(y) return nemo.matmul(a2, y) end, {b2})
end

-- ==== linear ====

do
    local x, w, b = rnd({2, 3, 5}, 130), rnd({4, 5}, 131), rnd({4}, 132)
    local y = F.linear(x, w, b)
    local ref = ref_matmul(x, w:t())
    local fb = flat(b)
    for i = 1, #ref do ref[i] = ref[i] + fb[(i - 1) % 4 + 1] end
    T.ok(same_shape(y.shape, {2, 3, 4}), "linear (2,3,5) x W(4,5) -> (2,3,4)")
    T.close(y, ref, 1e-12, 0, "linear f64 with bias vs naive (rtol 1e-12)")
    local yf = F.linear(x:float(), w:float())
    T.close(yf, ref_matmul(x, w:t()), 1e-5, 0, "linear f32 without bias vs naive (rtol 1e-5)")
    local y1 = F.linear(rnd({5}, 133), w, b)
    T.ok(same_shape(y1.shape, {4}), "linear of a 1-D input gives (4,)")
    local xt = rnd({5, 3, 2}, 134):permute(2, 1, 0)   -- (2,3,5) with no mergeable leading dims
    T.close(F.linear(xt, w, b), flat(F.linear(xt:contiguous(), w, b)), 1e-12, 0,
        "linear of a permuted input equals the contiguous result (rtol 1e-12)")
end
gradcheck(T, "linear 3-D with bias", function(x, w, b) return F.linear(x, w, b) end,
    {leaf({2, 3, 5}, 140), leaf({4, 5}, 141), leaf({4}, 142)})
gradcheck(T, "linear 2-D without bias", function(x, w) return F.linear(x, w) end, {leaf({7, 5}, 143), leaf({3, 5}, 144)})
gradcheck(T, "linear transposed weight view, permuted input", function(x, w, b)
    return F.linear(x:transpose(0, 1), w:t(), b) end, {leaf({3, 2, 5}, 145), leaf({5, 4}, 146), leaf({4}, 147)})
gradcheck(T, "linear 1-D input", function(x, w, b) return F.linear(x, w, b) end, {leaf({5}, 148), leaf({3, 5}, 149), leaf({3}, 150)})
do
    local w = rnd({3, 5}, 151)
    gradcheck(T, "linear frozen weight (x only)", function(x) return F.linear(x, w) end, {leaf({2, 4, 5}, 152)})
end

-- ==== scaled_dot_product_attention forward against the plain-Lua composition ====

local sdpa = F.scaled_dot_product_attention
local function check_sdpa(name, q, k, v, opts, rtol)
    local y = sdpa(q, k, v, opts)
    local ref = ref_sdpa(q, k, v, {mask = opts and opts.attn_mask, is_causal = opts and opts.is_causal,
        scale = opts and opts.scale})
    T.close(y, ref, rtol, 0, name)
    return y
end
local function qkv(B, H, Sq, Sk, D, Dv, seed, dtype)
    return rnd({B, H, Sq, D}, seed, dtype), rnd({B, H, Sk, D}, seed + 1, dtype), rnd({B, H, Sk, Dv or D}, seed + 2, dtype)
end

do
    local q, k, v = qkv(2, 3, 7, 9, 5, 5, 200, "float32")
    check_sdpa("sdpa f32 Sq=7 Sk=9 D=5 vs naive (rtol 1e-5)", q, k, v, nil, 1e-5)
    q, k, v = qkv(2, 3, 7, 9, 5, 4, 210, "float32")
    check_sdpa("sdpa f32 Dv=4 != D=5, scale=0.3 (rtol 1e-5)", q, k, v, {scale = 0.3}, 1e-5)
    q, k, v = qkv(1, 2, 7, 9, 5, 6, 220, "float32")
    check_sdpa("sdpa f32 causal Sq=7 < Sk=9 (rtol 1e-5)", q, k, v, {is_causal = true}, 1e-5)
    q, k, v = qkv(1, 2, 9, 7, 5, 6, 230, "float32")
    check_sdpa("sdpa f32 causal Sq=9 > Sk=7 (rtol 1e-5)", q, k, v, {is_causal = true}, 1e-5)
    q, k, v = qkv(2, 3, 7, 9, 5, 5, 240, "float32")
    local bm = rnd({7, 9}, 241):gt(-0.5)
    check_sdpa("sdpa f32 bool mask (7,9) broadcast (rtol 1e-5)", q, k, v, {attn_mask = bm}, 1e-5)
    local fm = rnd({1, 3, 7, 9}, 242, "float32")
    check_sdpa("sdpa f32 float mask (1,3,7,9) broadcast (rtol 1e-5)", q, k, v, {attn_mask = fm}, 1e-5)
    check_sdpa("sdpa f32 positional attn_mask (rtol 1e-5)", q, k, v, nil, 1e-5)
    local y = sdpa(q, k, v, fm)
    T.close(y, ref_sdpa(q, k, v, {mask = fm}), 1e-5, 0, "sdpa positional float mask vs naive (rtol 1e-5)")
    -- a row that attends to nothing gives zeros (PyTorch's math path would give NaN)
    local dead = nemo.ones(7, 9, {dtype = "bool"})
    dead[{2}] = false
    local yd = sdpa(q, k, v, {attn_mask = dead})
    T.close(yd, ref_sdpa(q, k, v, {mask = dead}), 1e-5, 0, "sdpa fully masked row gives zeros (rtol 1e-5)")
    -- 3-D inputs (no head dim) and 5-D inputs
    local q3, k3, v3 = rnd({4, 7, 5}, 250, "float32"), rnd({4, 9, 5}, 251, "float32"), rnd({4, 9, 3}, 252, "float32")
    check_sdpa("sdpa f32 3-D (N, S, D) (rtol 1e-5)", q3, k3, v3, nil, 1e-5)
    -- permuted heads (B, S, H, D) -> (B, H, S, D): read in place, output laid out like q
    local qb, kb, vb = rnd({2, 7, 3, 5}, 260, "float32"), rnd({2, 9, 3, 5}, 261, "float32"), rnd({2, 9, 3, 5}, 262, "float32")
    local qp, kp, vp = qb:transpose(1, 2), kb:transpose(1, 2), vb:transpose(1, 2)
    local yp = check_sdpa("sdpa f32 permuted (B,S,H,D) views (rtol 1e-5)", qp, kp, vp, nil, 1e-5)
    T.ok(yp:transpose(1, 2):is_contiguous(), "sdpa output of permuted q is laid out as (B, S, H, Dv)")
    T.ok(sdpa(q, k, v):is_contiguous(), "sdpa output of contiguous q is contiguous")
    local yf64 = sdpa(q:double(), k:double(), v:double(), {is_causal = true})
    T.close(yf64, ref_sdpa(q:double(), k:double(), v:double(), {is_causal = true}), 1e-12, 0,
        "sdpa f64 causal vs naive (rtol 1e-12)")
end

-- larger than one block of query rows (several blocks, causal limits per block)
do
    local q, k, v = qkv(1, 2, 300, 290, 8, 8, 270, "float32")
    check_sdpa("sdpa f32 Sq=300 Sk=290 causal, several row blocks (rtol 1e-5)", q, k, v, {is_causal = true}, 1e-5)
end

T.raises(function() return sdpa(nemo.ones(1, 2, 3, 4), nemo.ones(1, 2, 3, 5), nemo.ones(1, 2, 3, 4)) end,
    "scaled_dot_product_attention: query of shape (1, 2, 3, 4) and key of shape (1, 2, 3, 5)",
    "sdpa head dim mismatch names op and both shapes")
T.raises(function() return sdpa(nemo.ones(1, 2, 3, 4), nemo.ones(1, 2, 5, 4), nemo.ones(1, 2, 6, 4)) end,
    "key of shape (1, 2, 5, 4) and value of shape (1, 2, 6, 4)", "sdpa key/value length mismatch")
T.raises(function() return sdpa(nemo.ones(1, 2, 3, 4), nemo.ones(1, 3, 3, 4), nemo.ones(1, 3, 3, 4)) end,
    "differ in their leading", "sdpa batch/head mismatch")
T.raises(function() return sdpa(nemo.ones(2, 3, 4), nemo.ones(2, 5, 4), nemo.ones(2, 5, 4), {attn_mask = nemo.ones(4, 5)}) end,
    "attn_mask of shape (4, 5) cannot be broadcast to (2, 3, 5)", "sdpa mask shape mismatch")
T.raises(function() return sdpa(nemo.ones(2, 3, 4), nemo.ones(2, 5, 4), nemo.ones(2, 5, 4), {dropout_p = 0.1}) end,
    "dropout_p > 0 is not supported yet", "sdpa dropout_p > 0 is a clear error")
T.raises(function() return sdpa(nemo.ones(2, 3, 4), nemo.ones(2, 5, 4), nemo.ones(2, 5, 4),
    {is_causal = true, attn_mask = nemo.ones(3, 5, {dtype = "bool"})}) end,
    "attn_mask and is_causal cannot both be set", "sdpa mask with is_causal is an error")

-- ==== attention gradients (float64 central differences) ====

local function sdpa_grad(name, shapes, opts, seed)
    local q, k, v = leaf(shapes[1], seed), leaf(shapes[2], seed + 1), leaf(shapes[3], seed + 2)
    gradcheck(T, name, function(a, b, c) return sdpa(a, b, c, opts) end, {q, k, v})
end
sdpa_grad("sdpa Sq=7 Sk=9 D=5", {{2, 2, 7, 5}, {2, 2, 9, 5}, {2, 2, 9, 5}}, nil, 300)
sdpa_grad("sdpa Dv=3 != D=5, scale=0.7", {{1, 2, 7, 5}, {1, 2, 9, 5}, {1, 2, 9, 3}}, {scale = 0.7}, 310)
sdpa_grad("sdpa causal Sq=7 Sk=9", {{1, 2, 7, 5}, {1, 2, 9, 5}, {1, 2, 9, 4}}, {is_causal = true}, 320)
sdpa_grad("sdpa causal Sq=9 Sk=7", {{1, 2, 9, 5}, {1, 2, 7, 5}, {1, 2, 7, 4}}, {is_causal = true}, 330)
do
    local bm = rnd({7, 9}, 341):gt(-0.3)
    bm[{3}] = false    -- one row that attends to nothing: zero output, zero gradients
    sdpa_grad("sdpa bool mask with a dead row", {{1, 2, 7, 5}, {1, 2, 9, 5}, {1, 2, 9, 5}}, {attn_mask = bm}, 340)
    local fm = rnd({2, 1, 7, 9}, 351)
    sdpa_grad("sdpa float mask (2,1,7,9)", {{2, 2, 7, 5}, {2, 2, 9, 5}, {2, 2, 9, 5}}, {attn_mask = fm}, 350)
end
do   -- permuted (B, S, H, D) views inside fn
    local q, k, v = leaf({1, 7, 2, 5}, 360), leaf({1, 9, 2, 5}, 361), leaf({1, 9, 2, 5}, 362)
    gradcheck(T, "sdpa permuted (B,S,H,D) views", function(a, b, c)
        return sdpa(a:transpose(1, 2), b:transpose(1, 2), c:transpose(1, 2)):transpose(1, 2) end, {q, k, v})
end

-- several query blocks per head (and, with few heads, several groups of blocks whose dK / dV
-- partials are summed): gradients against autograd through matmul + softmax + matmul (f64)
do
    local function compose(q, k, v, causal)
        local Sq, Sk = q.shape[#q.shape - 1], k.shape[#k.shape - 1]
        local s = nemo.matmul(q, k:transpose(-1, -2)) * (1 / math.sqrt(q.shape[#q.shape]))
        if causal then
            local keep = nemo.arange(Sk):reshape{1, Sk}:le(nemo.arange(Sq):reshape{Sq, 1})
            s = F.where(keep, s, -math.huge)
        end
        return nemo.matmul(F.softmax(s, -1), v)
    end
    for _, c in ipairs { {{1, 1, 600, 8}, {1, 1, 520, 8}, {1, 1, 520, 6}, true},
                         {{1, 3, 300, 8}, {1, 3, 600, 8}, {1, 3, 600, 8}, true},
                         {{2, 1, 530, 4}, {2, 1, 70, 4}, {2, 1, 70, 5}, false} } do
        local function run(fn)
            local q, k, v = leaf(c[1], 700), leaf(c[2], 701), leaf(c[3], 702)
            local o = fn(q, k, v, c[4])
            o:backward(rnd(o.shape, 703))
            return {o:detach(), q.grad, k.grad, v.grad}
        end
        local got = run(function(q, k, v, causal) return sdpa(q, k, v, {is_causal = causal}) end)
        local ref = run(compose)
        local names = {"out", "dq", "dk", "dv"}
        for i = 1, 4 do
            T.close(got[i], ref[i], 1e-10, 0, string.format("sdpa %s%s q%s k%s: %s vs matmul+softmax autograd (f64, rtol 1e-10)",
                c[4] and "causal " or "", "several blocks", sstr(c[1]), sstr(c[2]), names[i]))
        end
    end
end

-- ==== kept probabilities (the CPU default) against the recomputing backward ====

do
    collectgarbage(); collectgarbage()
    T.is(F.attention_probs_kept(), 0, "no attention probabilities are held between tests")
    -- gradients of sum(o * g) under a budget; also the bytes held after the forward and after backward
    local function grads(budget, shapes, opts, dtype, seed)
        local prev = F.set_attention_probs_budget(budget)
        local q = rnd(shapes[1], seed, dtype):requires_grad_()
        local k = rnd(shapes[2], seed + 1, dtype):requires_grad_()
        local v = rnd(shapes[3], seed + 2, dtype):requires_grad_()
        local o = sdpa(q, k, v, opts)
        local kept = F.attention_probs_kept()
        o:backward(rnd(o.shape, seed + 3, dtype))
        local after = F.attention_probs_kept()
        F.set_attention_probs_budget(prev)
        return {o:detach(), q.grad, k.grad, v.grad}, kept, after
    end
    local dead = rnd({7, 9}, 801):gt(-0.3)
    dead[{3}] = false
    local cases = {
        {"plain", {{2, 2, 7, 5}, {2, 2, 9, 5}, {2, 2, 9, 4}}, nil},
        {"causal Sq > Sk", {{1, 2, 9, 5}, {1, 2, 7, 5}, {1, 2, 7, 5}}, {is_causal = true}},
        {"causal, several row blocks", {{1, 2, 300, 8}, {1, 2, 290, 8}, {1, 2, 290, 8}}, {is_causal = true}},
        {"bool mask with a dead row", {{1, 2, 7, 5}, {1, 2, 9, 5}, {1, 2, 9, 5}}, {attn_mask = dead}},
        {"float mask", {{2, 2, 7, 5}, {2, 2, 9, 5}, {2, 2, 9, 5}}, {attn_mask = rnd({2, 1, 7, 9}, 802)}},
    }
    local names = {"out", "dq", "dk", "dv"}
    for ci, c in ipairs(cases) do
        for _, dt in ipairs { "float64", "float32" } do
            local esz = dt == "float64" and 8 or 4
            local want = c[2][1][1] * c[2][1][2] * c[2][1][3] * c[2][2][3] * esz
            local g1, kept1, after1 = grads(2 ^ 30, c[2], c[3], dt, 810 + 10 * ci)
            local g0, kept0 = grads(0, c[2], c[3], dt, 810 + 10 * ci)
            T.is(kept1, want, string.format("sdpa %s %s: the forward keeps B*H*Sq*Sk probabilities (%d bytes)", dt, c[1], want))
            T.is(after1, 0, string.format("sdpa %s %s: the backward releases them", dt, c[1]))
            T.is(kept0, 0, string.format("sdpa %s %s: budget 0 keeps nothing", dt, c[1]))
            local rtol = dt == "float64" and 1e-12 or 2e-5
            for i = 1, 4 do
                T.close(g1[i], g0[i], rtol, rtol * 1e-2, string.format("sdpa %s %s: %s with kept P = recomputed P (rtol %g)",
                    dt, c[1], names[i], rtol))
            end
        end
    end
    -- the recomputing backward keeps its own float64 gradient checks
    local prev = F.set_attention_probs_budget(0)
    sdpa_grad("sdpa causal Sq=7 Sk=9, recomputed P", {{1, 2, 7, 5}, {1, 2, 9, 5}, {1, 2, 9, 4}}, {is_causal = true}, 830)
    sdpa_grad("sdpa bool mask with a dead row, recomputed P", {{1, 2, 7, 5}, {1, 2, 9, 5}, {1, 2, 9, 5}}, {attn_mask = dead}, 840)
    F.set_attention_probs_budget(prev)
    -- a call larger than what is left of the budget recomputes
    prev = F.set_attention_probs_budget(2 * 7 * 9 * 8 + 100)
    local q, k, v = leaf({2, 1, 7, 5}, 850), leaf({2, 1, 9, 5}, 851), leaf({2, 1, 9, 5}, 852)
    local o1 = sdpa(q, k, v)
    T.is(F.attention_probs_kept(), 2 * 7 * 9 * 8, "sdpa keeps P when it fits the budget")
    local o2 = sdpa(q, k, v)
    T.is(F.attention_probs_kept(), 2 * 7 * 9 * 8, "a second graph that does not fit what is left recomputes P")
    local g = rnd(o1.shape, 853)
    o2:backward(g)
    local g2 = {q.grad:clone(), k.grad:clone(), v.grad:clone()}
    q.grad, k.grad, v.grad = nil, nil, nil
    o1:backward(g)
    T.is(F.attention_probs_kept(), 0, "both backward passes leave nothing held")
    T.close(q.grad, g2[1], 1e-12, 0, "kept and recomputed P give the same dq (f64, rtol 1e-12)")
    T.close(v.grad, g2[3], 1e-12, 0, "kept and recomputed P give the same dv (f64, rtol 1e-12)")
    -- a graph dropped without a backward gives its budget back when it is collected
    o1 = sdpa(q, k, v)
    T.is(F.attention_probs_kept(), 2 * 7 * 9 * 8, "a new graph keeps P")
    o1 = nil
    collectgarbage(); collectgarbage()
    T.is(F.attention_probs_kept(), 0, "a graph dropped without backward releases its kept P when collected")
    nemo.no_grad(function() sdpa(q, k, v) end)
    T.is(F.attention_probs_kept(), 0, "a forward under no_grad keeps nothing")
    F.set_attention_probs_budget(prev)
    T.raises(function() F.set_attention_probs_budget(-1) end, "expected a number of bytes >= 0",
        "a negative budget is an error")
    T.raises(function() F.set_attention_probs_budget("1G") end, "expected a number of bytes >= 0",
        "a non-number budget is an error")
end

-- ==== bf16 / f16 against f32 on the same (rounded) values ====

do
    local function rounded(shape, seed, dt) return rnd(shape, seed, "float32"):to{dtype = dt} end
    for _, dt in ipairs { "bfloat16", "float16" } do
        local a, b = rounded({3, 7, 33}, 400, dt), rounded({33, 5}, 401, dt)
        local y = nemo.matmul(a, b)
        T.is(y.dtype, dt, "matmul " .. dt .. " result dtype")
        T.close(y, nemo.matmul(a:float(), b:float()), 1e-2, 0, "matmul " .. dt .. " vs f32 (rtol 1e-2)")
        local x, w, bias = rounded({2, 7, 33}, 402, dt), rounded({5, 33}, 403, dt), rounded({5}, 404, dt)
        T.close(F.linear(x, w, bias), F.linear(x:float(), w:float(), bias:float()), 1e-2, 0,
            "linear " .. dt .. " vs f32 (rtol 1e-2)")
        local q, k, v = rounded({1, 2, 7, 16}, 405, dt), rounded({1, 2, 9, 16}, 406, dt), rounded({1, 2, 9, 16}, 407, dt)
        local o = sdpa(q, k, v, {is_causal = true})
        T.is(o.dtype, dt, "sdpa " .. dt .. " result dtype")
        T.close(o, sdpa(q:float(), k:float(), v:float(), {is_causal = true}), 1e-2, 0, "sdpa " .. dt .. " vs f32 (rtol 1e-2)")
    end
    -- gradients in bf16 against f32
    local function grads(dt)
        local x = rounded({2, 7, 33}, 410, dt):requires_grad_()
        local w = rounded({5, 33}, 411, dt):requires_grad_()
        local q = rounded({1, 2, 7, 16}, 412, dt):requires_grad_()
        local k = rounded({1, 2, 9, 16}, 413, dt):requires_grad_()
        local v = rounded({1, 2, 9, 16}, 414, dt):requires_grad_()
        local y = F.linear(x, w)
        y:backward(nemo.ones_like(y))
        local o = sdpa(q, k, v)
        o:backward(rnd(o.shape, 415, "float32"):to{dtype = dt})
        return {x.grad, w.grad, q.grad, k.grad, v.grad}
    end
    local gb, gf = grads("bfloat16"), grads("float32")
    local names = {"linear dx", "linear dW", "sdpa dq", "sdpa dk", "sdpa dv"}
    for i = 1, #names do
        T.ok(gb[i].dtype == "bfloat16", names[i] .. " bf16 gradient dtype")
        T.close(gb[i], gf[i], 2e-2, 0, names[i] .. " bf16 vs f32 (rtol 2e-2)")
    end
end

-- ==== the fused low-precision attention path ("sdpa_flash_fwd" / "sdpa_flash_bwd") ====
-- bf16 / f16 q, k, v with head dim 64 or 128 and no mask go to the flash kernels when the
-- probabilities are not kept (budget 0 here; always on CUDA). The CPU twins widen, run the
-- float32 kernels and round once, as the general path does: the same bits as a call that an
-- all-true mask sends down the general path, and within bf16 rounding of float32.

do
    local prev = F.set_attention_probs_budget(0)
    local same = T.same_bits
    local function rounded(shape, seed, dt) return rnd(shape, seed, "float32"):to{dtype = dt} end
    local cases = {
        {"D 64", {1, 2, 37, 64}, {1, 2, 29, 64}, nil},
        {"D 128 causal", {2, 1, 33, 128}, {2, 1, 40, 128}, {is_causal = true}},
        {"D 64 (B, S, H, D) layout", {1, 9, 3, 64}, {1, 11, 3, 64}, nil, true},
    }
    for _, dt in ipairs { "bfloat16", "float16" } do
        for ci, c in ipairs(cases) do
            local name = "flash " .. dt .. " " .. c[1]
            local function leaf_of(shape, seed)
                local t = rounded(shape, seed, dt)
                if c[5] then t = t:transpose(1, 2) end   -- stored (B, S, H, D), seen as (B, H, S, D)
                return t:detach():requires_grad_()
            end
            local q, k, v = leaf_of(c[2], 960 + ci), leaf_of(c[3], 961 + ci), leaf_of(c[3], 962 + ci)
            T.ok(F.sdpa_uses_flash(q, k, v), name .. ": takes the flash path")
            local o = sdpa(q, k, v, c[4])
            local g = rounded(o.shape, 963 + ci, dt)
            o:backward(g)
            -- the general path: an all-true mask (not for causal, whose kernel skips key blocks)
            local o2, q2, k2, v2
            if not c[4] then
                q2, k2, v2 = q:detach():requires_grad_(), k:detach():requires_grad_(), v:detach():requires_grad_()
                o2 = sdpa(q2, k2, v2, {attn_mask = nemo.ones({o.shape[3], k.shape[3]}, {dtype = "bool"})})
                o2:backward(g)
            end
            local qf, kf, vf = q:float():detach():requires_grad_(), k:float():detach():requires_grad_(),
                v:float():detach():requires_grad_()
            local of = sdpa(qf, kf, vf, c[4])
            of:backward(g:float())
            T.is(o.dtype, dt, name .. ": result dtype")
            if o2 then
                T.ok(same(o, o2) and same(q.grad, q2.grad) and same(k.grad, k2.grad) and same(v.grad, v2.grad),
                    name .. ": output, dq, dk, dv = the general path's (bitwise)")
            end
            T.ok(same(o, of:to{dtype = dt}), name .. ": output = float32 path rounded once (bitwise)")
            for i, pair in ipairs { {q.grad, qf.grad}, {k.grad, kf.grad}, {v.grad, vf.grad} } do
                T.close(pair[1], pair[2], 2e-2, 0, name .. ": " .. ({"dq", "dk", "dv"})[i] .. " vs float32 (rtol 2e-2)")
            end
        end
    end
    -- what stays on the general path
    local q, k = rounded({1, 2, 5, 64}, 970, "bfloat16"), rounded({1, 2, 6, 64}, 971, "bfloat16")
    local m = nemo.ones({5, 6}, {dtype = "bool"})
    T.ok(not F.sdpa_uses_flash(q:float(), k:float(), k:float()), "flash path: not for float32")
    T.ok(not F.sdpa_uses_flash(q, k, k, {attn_mask = m}), "flash path: not with a mask")
    T.ok(not F.sdpa_uses_flash(q:narrow(3, 0, 32), k:narrow(3, 0, 32), k:narrow(3, 0, 32)),
        "flash path: not for head dim 32")
    T.ok(not F.sdpa_uses_flash(q, k, k:narrow(3, 0, 32)), "flash path: not when Dv differs from D")
    T.ok(not F.sdpa_uses_flash(q, k:narrow(2, 0, 0), k:narrow(2, 0, 0)), "flash path: not with no keys")
    T.ok(not F.sdpa_uses_flash(q, rounded({1, 2, 6, 32}, 972, "bfloat16"), k), "flash path: not for bad shapes")
    T.ok(F.flash_sdp_enabled() and F.sdpa_uses_flash(q, k, k), "flash path: on by default")
    T.is(F.enable_flash_sdp(false), true, "enable_flash_sdp(false) returns the previous setting")
    T.ok(not F.flash_sdp_enabled() and not F.sdpa_uses_flash(q, k, k), "flash path: off after enable_flash_sdp(false)")
    local o_general = sdpa(q, k, k)
    F.enable_flash_sdp(true)
    T.ok(T.same_bits(sdpa(q, k, k), o_general), "on the CPU both paths give the same bits")
    T.raises(function() F.enable_flash_sdp(1) end, "expected a boolean", "enable_flash_sdp(1) is an error")
    F.set_attention_probs_budget(prev)
end

-- ==== bf16 / f16 operands go to the products as they are ("gemm_lp": float32 sums of exact
-- products, one rounding). f16, and bf16 without AMX: the float32 product of the widened
-- operands, bit for bit. bf16 on AMX tiles (kernels/cpu/amx.c) sums in another fixed order:
-- within one bf16 rounding of it, and bitwise on small integers (every sum exact) ====

do
    local AMX = C.nemo_cpu_has_amx() ~= 0
    T.diag("bf16 products on " .. (AMX and "AMX tiles" or "widened float32 sgemm"))
    local function rounded(shape, seed, dt) return rnd(shape, seed, "float32"):to{dtype = dt} end
    local function ints(shape, seed, dt)
        return (rnd(shape, seed, "float32") * 3):clamp(-8, 8):to{dtype = "int32"}:to{dtype = dt}
    end
    local same = T.same_bits
    -- got vs the float32 result ref rounded to dt: bitwise where the path is sgemm's
    local function check(got, ref, dt, name)
        if dt == "float16" or not AMX then
            T.ok(same(got, ref:to{dtype = dt}), name .. ": same bits as float32, rounded once")
        else
            T.close(got:float(), ref, 8e-3, 0, name .. ": within one bf16 rounding of float32 (rtol 8e-3)")
        end
    end
    for _, dt in ipairs { "bfloat16", "float16" } do
        local a, b = rounded({3, 7, 33}, 900, dt), rounded({33, 5}, 901, dt)
        check(nemo.matmul(a, b), nemo.matmul(a:float(), b:float()), dt, "matmul " .. dt .. " (3,7,33) @ (33,5)")
        local a4, b3 = rounded({2, 3, 7, 33}, 902, dt), rounded({3, 33, 5}, 903, dt)
        check(nemo.matmul(a4, b3), nemo.matmul(a4:float(), b3:float()), dt,
            "matmul " .. dt .. " with a broadcast batch (2,3,7,33) @ (3,33,5)")
        local bt = rounded({5, 33}, 904, dt):t()
        T.close(nemo.matmul(a, bt):float(), nemo.matmul(a:float(), bt:float()), 8e-3, 0,
            "matmul " .. dt .. " with a transposed operand view vs float32 (rtol 8e-3: one rounding)")
        -- linear forward and backward (input, weight, bias gradients), upstream gradient in dt
        local x = rounded({2, 9, 33}, 905, dt):requires_grad_()
        local w = rounded({17, 33}, 906, dt):requires_grad_()
        local bias = rounded({17}, 907, dt):requires_grad_()
        local g = rounded({2, 9, 17}, 908, dt)
        local y = F.linear(x, w, bias)
        y:backward(g)
        local xf, wf, bf = x:detach():float():requires_grad_(), w:detach():float():requires_grad_(),
            bias:detach():float():requires_grad_()
        local yf = F.linear(xf, wf, bf)
        yf:backward(g:float())
        check(y, yf:detach(), dt, "linear " .. dt .. " forward with bias")
        check(x.grad, xf.grad, dt, "linear " .. dt .. " input gradient")
        check(w.grad, wf.grad, dt, "linear " .. dt .. " weight gradient")
        T.ok(same(bias.grad, bf.grad:to{dtype = dt}), "linear " .. dt .. " bias gradient: same bits (column sums)")
        -- the kernel that rounds its own result ("gemm_lp_out"): a strided bias view, an
        -- unaligned one, in_features 0 (the result is the bias), no rows
        local bias2 = rounded({34}, 912, dt):slice(0, 0, 34, 2)
        local wb = bias2:detach():float()
        check(F.linear(x, w, bias2), F.linear(x:detach():float(), w:detach():float(), wb), dt,
            "linear " .. dt .. " with a strided bias view")
        local bias3 = rounded({18}, 913, dt):slice(0, 1, 18)
        check(F.linear(x, w, bias3), F.linear(x:detach():float(), w:detach():float(), bias3:float()), dt,
            "linear " .. dt .. " with a bias view starting at an odd element")
        local x0, w0 = nemo.zeros({4, 0}, {dtype = dt}), nemo.zeros({17, 0}, {dtype = dt})
        T.ok(same(F.linear(x0, w0, bias:detach()), bias:detach():expand(4, 17):contiguous()),
            "linear " .. dt .. " with in_features 0: every row is the bias, bit for bit")
        T.ok(same(F.linear(x0, w0), nemo.zeros({4, 17}, {dtype = dt})), "linear " .. dt .. " with in_features 0, no bias: zeros")
        local e = F.linear(nemo.zeros({0, 33}, {dtype = dt}), w:detach(), bias:detach())
        T.is(table.concat(e:size(), ","), "0,17", "linear " .. dt .. " with no rows has shape (0, 17)")
        -- matmul backward with a gradient summed over a broadcast batch dim (beta = 1 accumulation)
        local p = rounded({4, 6, 8}, 909, dt):requires_grad_()
        local q = rounded({8, 3}, 910, dt):requires_grad_()
        local gm = rounded({4, 6, 3}, 911, dt)
        nemo.matmul(p, q):backward(gm)
        local pf, qf = p:detach():float():requires_grad_(), q:detach():float():requires_grad_()
        nemo.matmul(pf, qf):backward(gm:float())
        check(q.grad, qf.grad, dt, "matmul " .. dt .. " backward, weight summed over the batch")
        check(p.grad, pf.grad, dt, "matmul " .. dt .. " backward, input")
        -- small integers: every product and sum exact, so any order gives the same bits; shapes
        -- with partial tiles (16 x 16 / 32 x 32 blocks, k chunks of 32), transposed operands
        -- and batches (one per item side by side, and an accumulating one)
        local bad = {}
        for _, c in ipairs { {33, 65, 17}, {1, 64, 200}, {100, 3, 50}, {31, 33, 15}, {64, 32, 32}, {17, 1000, 47},
                             {256, 512, 96} } do
            for ta = 0, 1 do
                for tb = 0, 1 do
                    local ai = ta == 1 and ints({c[2], c[1]}, 920, dt):t() or ints({c[1], c[2]}, 920, dt)
                    local bi = tb == 1 and ints({c[3], c[2]}, 921, dt):t() or ints({c[2], c[3]}, 921, dt)
                    if not same(nemo.matmul(ai, bi), nemo.matmul(ai:float(), bi:float()):to{dtype = dt}) then
                        bad[#bad + 1] = string.format("(%d,%d,%d) ta %d tb %d", c[1], c[2], c[3], ta, tb)
                    end
                end
            end
        end
        T.ok(#bad == 0, "matmul " .. dt .. " of small integers equals the exact result bit for bit (7 shapes x 4 layouts)",
            table.concat(bad, "; "))
        local ab, bb = ints({5, 3, 40, 70}, 922, dt), ints({3, 70, 20}, 923, dt)
        T.ok(same(nemo.matmul(ab, bb), nemo.matmul(ab:float(), bb:float()):to{dtype = dt}),
            "bmm " .. dt .. " of small integers, (5,3,40,70) @ (3,70,20): exact")
        local pi = ints({6, 40, 70}, 924, dt):requires_grad_()
        local qi = ints({70, 20}, 925, dt):requires_grad_()
        nemo.matmul(pi, qi):backward(ints({6, 40, 20}, 926, dt))
        local pf2, qf2 = pi:detach():float():requires_grad_(), qi:detach():float():requires_grad_()
        nemo.matmul(pf2, qf2):backward(ints({6, 40, 20}, 926, dt):float())
        T.ok(same(qi.grad, qf2.grad:to{dtype = dt}), "matmul " .. dt .. " of small integers, the weight gradient " ..
            "accumulated over a batch of 6: exact")
    end
end

-- ==== results do not depend on the thread count ====

do
    local nt = nemo.get_num_threads()
    local function run()
        local out = {}
        local a, b = rnd({6, 64, 48}, 500, "float32"), rnd({48, 80}, 501, "float32")
        out[#out + 1] = nemo.matmul(a, b)
        out[#out + 1] = nemo.bmm(rnd({40, 16, 12}, 502, "float32"), rnd({40, 12, 16}, 503, "float32"))
        out[#out + 1] = nemo.matmul(rnd({300, 200}, 512, "float32"), rnd({200, 256}, 513, "float32"))   -- tiles
        for _, shape in ipairs { {1, 1, 600, 32}, {2, 3, 70, 16} } do
            local q = rnd(shape, 504, "float32"):requires_grad_()
            local k = rnd(shape, 505, "float32"):requires_grad_()
            local v = rnd(shape, 506, "float32"):requires_grad_()
            local o = sdpa(q, k, v, {is_causal = true})
            o:backward(rnd(o.shape, 507, "float32"))
            for _, t in ipairs { o:detach(), q.grad, k.grad, v.grad } do out[#out + 1] = t end
        end
        local x = rnd({4, 50, 40}, 508, "float32"):requires_grad_()
        local w = rnd({30, 40}, 509, "float32"):requires_grad_()
        local bias = rnd({30}, 510, "float32"):requires_grad_()
        local y = F.linear(x, w, bias)
        y:backward(rnd(y.shape, 511, "float32"))
        for _, t in ipairs { y:detach(), x.grad, w.grad, bias.grad } do out[#out + 1] = t end
        return out
    end
    nemo.set_num_threads(1)
    local r1 = run()
    nemo.set_num_threads(math.max(2, nt))
    local r2 = run()
    nemo.set_num_threads(nt)
    local worst = 0
    for i = 1, #r1 do
        local d = nemo.abs(r1[i]:double() - r2[i]:double()):reshape{-1}:tolist()
        for _, x in ipairs(d) do if x > worst then worst = x end end
    end
    T.ok(worst == 0, string.format("matmul, bmm, linear and sdpa fwd+bwd bitwise equal on 1 and %d threads (max diff %g)",
        math.max(2, nt), worst))
end

-- ==== views are not copied ====

do
    local function peak_of(fn)
        collectgarbage(); collectgarbage()
        local before = nemo.memory_stats().current
        nemo.reset_peak_memory_stats()
        local r = fn()
        return nemo.memory_stats().peak - before, r
    end
    local A, B = rnd({512, 256}, 600, "float32"), rnd({384, 512}, 601, "float32")
    local out_bytes = 256 * 384 * 4
    local peak = peak_of(function() return nemo.matmul(A:t(), B:t()) end)
    T.ok(peak <= out_bytes + 4096, string.format("matmul of transposed views allocates only the output: %d <= %d bytes",
        peak, out_bytes + 4096))
    local X, W = rnd({4, 64, 256}, 602, "float32"), rnd({256, 384}, 603, "float32")
    peak = peak_of(function() return F.linear(X, W:t()) end)
    out_bytes = 4 * 64 * 384 * 4
    T.ok(peak <= out_bytes * 1.13 + 4096, string.format(
        "linear of a 3-D input and a transposed weight view allocates only the output: %d <= %d bytes",
        peak, math.floor(out_bytes * 1.13 + 4096)))
    local qb = rnd({1, 512, 4, 64}, 604, "float32")
    local kb, vb = rnd({1, 512, 4, 64}, 605, "float32"), rnd({1, 512, 4, 64}, 606, "float32")
    local scratch = (256 * 512 + 256) * 4 * math.max(1, nemo.get_num_threads())   -- a 256-row block per thread
    out_bytes = 512 * 4 * 64 * 4 + 4 * 512 * 4
    peak = peak_of(function() return sdpa(qb:transpose(1, 2), kb:transpose(1, 2), vb:transpose(1, 2)) end)
    local limit = math.floor((out_bytes + scratch) * 1.15 + 65536)
    T.ok(peak <= limit, string.format(
        "sdpa of permuted (B,S,H,D) views copies no input: %d <= %d bytes (output + lse + scratch)", peak, limit))
end

T.done()
