-- tests/lua/test_lowp.lua: a sweep of every op of the Lua API (README, "The Lua API in brief")
-- in bfloat16 and float16 on the CPU against the float32 op on the same values.
--
-- Every input is a float32 random tensor rounded to the low dtype, so the low-precision run and
-- the float32 reference see exactly the same numbers; the only differences left are the
-- engine's own (accumulation order, the one rounding of each result). For each op and dtype:
--   * the result has the low dtype (or PyTorch's: argmax/indices int64, comparisons bool);
--   * forward: max|y - ref| <= rtol * max|ref| (normwise), rtol 1e-2 (bf16) / 2e-3 (f16);
--   * backward, for differentiable ops: the gradient of sum(y * g), g a fixed rounded random
--     tensor, w.r.t. each low-precision input has the low dtype and is normwise close to the
--     float32 gradient, rtol 2e-2 (bf16) / 5e-3 (f16);
--   * a few ops get non-contiguous inputs (a transposed, permuted or sliced view of the leaf).
-- An op that errors in low precision is reported as a failed check and the sweep goes on.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local F = nemo.nn.functional

local is_tensor = nemo.is_tensor or function(x) return type(x) == "table" and rawget(x, "_c") ~= nil end

local DTYPES = {
    {dt = "bfloat16", fwd = 1e-2, bwd = 2e-2},
    {dt = "float16", fwd = 2e-3, bwd = 5e-3},
}

-- float32 values from randn, shaped by kind, rounded to dt (returned as float32: every value is
-- exactly representable in dt).
local function rounded(shape, seed, dt, kind)
    local x = nemo.randn(shape, {generator = nemo.Generator(seed)})
    if kind == "pos" then x = x:abs() + 0.5 end         -- log / sqrt / rsqrt / pow base / divisors
    return x:to{dtype = dt}:float()
end

-- input specs
local function N(...) return {shape = {...}} end                       -- randn, requires grad
local function P(...) return {shape = {...}, kind = "pos"} end        -- positive, requires grad
local function C(...) return {shape = {...}, nograd = true} end        -- randn, low dtype, no grad
local function K(t) return {const = t} end                             -- passed as is (ints, bool)

local function shape_str(s) return "(" .. table.concat(s, ",") .. ")" end
local function as_list(out)
    if is_tensor(out) then return {out} end
    return out
end
local function is_float(t) return t.dtype == "float32" or t.dtype == "float64" or t.dtype == "bfloat16"
    or t.dtype == "float16" end

local case_no = 0

-- case(name, fn, specs, opts)
--   fn(inputs...) -> a tensor or a table of tensors
--   opts.out = expected dtype of each output (a string for all, or a table per output; default:
--              the low dtype); opts.no_grad: run the forward under nemo.no_grad, no backward.
local function case(name, fn, specs, opts)
    opts = opts or {}
    case_no = case_no + 1
    local seed = 1000 * case_no
    for _, D in ipairs(DTYPES) do
        local dt = D.dt
        local tag = name .. " " .. dt
        local ref_in, low_in = {}, {}
        for i, s in ipairs(specs) do
            if s.const ~= nil then
                ref_in[i], low_in[i] = s.const, s.const
            else
                local v = rounded(s.shape, seed + i, dt, s.kind)
                if s.nograd then
                    ref_in[i], low_in[i] = v, v:to{dtype = dt}
                else
                    ref_in[i] = v:clone():requires_grad_()
                    low_in[i] = v:to{dtype = dt}:requires_grad_()
                end
            end
        end
        local function call(inputs)
            if opts.no_grad then return pcall(nemo.no_grad, fn, unpack(inputs, 1, #specs)) end
            return pcall(fn, unpack(inputs, 1, #specs))
        end
        local okr, ref = call(ref_in)
        local okl, out = call(low_in)
        if not okr then
            T.ok(false, tag .. ": float32 reference runs", tostring(ref))
        elseif not okl then
            T.ok(false, tag .. ": forward runs in " .. dt, tostring(out))
        else
            ref, out = as_list(ref), as_list(out)
            local floats = {}
            for j = 1, #ref do
                local want = dt
                if type(opts.out) == "table" then want = opts.out[j] or dt elseif opts.out then want = opts.out end
                local o, r = out[j], ref[j]
                local sfx = #ref > 1 and ("[" .. j .. "]") or ""
                T.is(o.dtype, want, string.format("%s%s forward dtype %s", tag, sfx, want))
                T.close(o, r, D.fwd, 0, string.format("%s%s forward %s vs float32 (normwise rtol %g)",
                    tag, sfx, shape_str(o.shape), D.fwd))
                if is_float(o) and o.requires_grad then floats[#floats + 1] = j end
            end
            if not opts.no_grad and #floats > 0 then
                -- loss = sum_j sum(y_j * g_j), the same rounded g_j for both runs
                local lr, ll
                for k, j in ipairs(floats) do
                    local g = rounded(ref[j].shape, seed + 100 + k, dt)
                    local tr, tl = (ref[j] * g):sum(), (out[j] * g:to{dtype = dt}):sum()
                    lr = lr and lr + tr or tr
                    ll = ll and ll + tl or tl
                end
                lr:backward()
                local okb, err = pcall(function() ll:backward() end)
                if not okb then
                    T.ok(false, tag .. ": backward runs in " .. dt, tostring(err))
                else
                    for i, s in ipairs(specs) do
                        if s.const == nil and not s.nograd and ref_in[i].grad ~= nil then
                            local gl, gr = low_in[i].grad, ref_in[i].grad
                            local what = string.format("%s d/dinput%d", tag, i)
                            if gl == nil then
                                T.ok(false, what .. " exists", "no gradient reached the low-precision input")
                            else
                                T.is(gl.dtype, dt, string.format("%s dtype %s", what, dt))
                                T.close(gl, gr, D.bwd, 0, string.format("%s %s vs float32 (normwise rtol %g)",
                                    what, shape_str(gl.shape), D.bwd))
                            end
                        end
                    end
                end
            end
        end
    end
end

local t0 = os.clock()

-- ==== pointwise: unary ====

case("neg", function(x) return F.neg(x) end, {N(7, 33)})
case("unary minus", function(x) return -x end, {N(7, 33)})
case("abs", function(x) return nemo.abs(x) end, {N(7, 33)})
case("exp", function(x) return nemo.exp(x) end, {N(7, 33)})
case("log (x >= 0.5)", function(x) return nemo.log(x) end, {P(7, 33)})
case("sqrt (x >= 0.5)", function(x) return nemo.sqrt(x) end, {P(7, 33)})
case("rsqrt (x >= 0.5)", function(x) return nemo.rsqrt(x) end, {P(7, 33)})
case("sin", function(x) return nemo.sin(x) end, {N(7, 33)})
case("cos", function(x) return nemo.cos(x) end, {N(7, 33)})
case("tanh", function(x) return nemo.tanh(x) end, {N(7, 33)})
case("sigmoid", function(x) return nemo.sigmoid(x) end, {N(7, 33)})
case("silu", function(x) return F.silu(x) end, {N(7, 33)})
case("gelu exact", function(x) return F.gelu(x) end, {N(7, 33)})
case("gelu tanh", function(x) return F.gelu(x, {approximate = "tanh"}) end, {N(7, 33)})
case("relu", function(x) return F.relu(x) end, {N(7, 33)})
case("clamp(-0.5, 0.5)", function(x) return nemo.clamp(x, -0.5, 0.5) end, {N(7, 33)})
case("clamp min only", function(x) return x:clamp(-0.25) end, {N(7, 33)})
case("clamp max only {max=}", function(x) return nemo.clamp(x, {max = 0.75}) end, {N(7, 33)})
case("clamp tensor bounds", function(x, lo, hi) return nemo.clamp(x, lo, hi) end, {N(7, 33), N(33), N(7, 1)})
case("pow x^3", function(x) return x ^ 3 end, {N(7, 33)})
case("pow x^2.5 (x >= 0.5)", function(x) return nemo.pow(x, 2.5) end, {P(7, 33)})
case("pow 2^x", function(x) return 2 ^ x end, {N(7, 33)})
case("pow tensor^tensor (base >= 0.5)", function(a, b) return nemo.pow(a, b) end, {P(7, 33), N(33)})
case("exp noncontig (transposed)", function(x) return nemo.exp(x:t()) end, {N(33, 7)})
case("gelu noncontig (step slice)", function(x) return F.gelu(x[{":", {0, nil, 2}}]) end, {N(7, 33)})
case("sigmoid noncontig (permuted)", function(x) return nemo.sigmoid(x:permute(2, 0, 1)) end, {N(2, 3, 9)})

-- ==== pointwise: binary, scalars, where, comparisons ====

case("add broadcast (7,33)+(33)", function(a, b) return a + b end, {N(7, 33), N(33)})
case("add alpha", function(a, b) return nemo.add(a, b, {alpha = 2.5}) end, {N(2, 3, 9), N(3, 1)})
case("sub broadcast (2,3,9)-(3,1)", function(a, b) return a - b end, {N(2, 3, 9), N(3, 1)})
case("mul broadcast (7,1)*(7,33)", function(a, b) return a * b end, {N(7, 1), N(7, 33)})
case("div (divisor >= 0.5)", function(a, b) return a / b end, {N(7, 33), P(7, 33)})
case("div broadcast (divisor >= 0.5)", function(a, b) return nemo.div(a, b) end, {N(2, 3, 9), P(9)})
case("x + 1.5", function(x) return x + 1.5 end, {N(7, 33)})
case("0.3 * x", function(x) return 0.3 * x end, {N(7, 33)})
case("2 - x", function(x) return 2 - x end, {N(7, 33)})
case("x / 3", function(x) return x / 3 end, {N(7, 33)})
case("1 / x (x >= 0.5)", function(x) return 1 / x end, {P(7, 33)})
case("maximum broadcast", function(a, b) return nemo.maximum(a, b) end, {N(7, 33), N(33)})
case("minimum broadcast", function(a, b) return nemo.minimum(a, b) end, {N(7, 1), N(7, 33)})
case("maximum with ties (x vs a detached copy)", function(a) return nemo.maximum(a, a:detach() * 1) end, {N(7, 33)})
do
    local cond = nemo.randn({7, 33}, {generator = nemo.Generator(77)}):gt(0)
    case("where", function(c, a, b) return nemo.where(c, a, b) end, {K(cond), N(7, 33), N(7, 33)})
    case("where broadcast", function(c, a, b) return nemo.where(c, a, b) end, {K(cond), N(33), N(7, 1)})
    case("where(cond, x, 0)", function(c, a) return nemo.where(c, a, 0) end, {K(cond), N(7, 33)})
end
case("add noncontig (transposed + contiguous)", function(a, b) return a:t() + b end, {N(33, 7), N(7, 33)})
case("mul noncontig (sliced * sliced)", function(a, b) return a:narrow(1, 3, 20) * b[{{1, 8}}] end,
    {N(7, 33), N(9, 20)})
case("gt", function(a, b) return a:gt(b) end, {N(7, 33), N(7, 33)}, {out = "bool"})
case("lt scalar", function(a) return a:lt(0.25) end, {N(7, 33)}, {out = "bool"})
case("ge broadcast", function(a, b) return nemo.ge(a, b) end, {N(7, 33), N(33)}, {out = "bool"})
case("le", function(a, b) return a:le(b) end, {N(7, 33), N(7, 33)}, {out = "bool"})
case("eq (x == x)", function(a) return a:eq(a:detach()) end, {N(7, 33)}, {out = "bool"})
case("ne", function(a, b) return a:ne(b) end, {N(7, 33), N(7, 33)}, {out = "bool"})

-- ==== reductions ====

case("sum all", function(x) return x:sum() end, {N(7, 33)})
case("sum dim 1", function(x) return x:sum(1) end, {N(2, 3, 9)})
case("sum dims {0,2} keepdim", function(x) return x:sum({0, 2}, true) end, {N(2, 3, 9)})
case("sum dim -1 keepdim", function(x) return nemo.sum(x, -1, true) end, {N(7, 33)})
case("sum noncontig (transposed) dim 0", function(x) return x:t():sum(0) end, {N(33, 7)})
case("mean all", function(x) return x:mean() end, {N(7, 33)})
case("mean dim 1 keepdim", function(x) return x:mean(1, true) end, {N(2, 3, 9)})
case("mean dims {0,2}", function(x) return x:mean({0, 2}) end, {N(2, 3, 9)})
case("max all", function(x) return x:max() end, {N(7, 33)})
case("max dim 1 (values, indices)", function(x) local v, i = x:max(1); return {v, i} end, {N(7, 33)},
    {out = {false, "int64"}})
case("max dim 2 keepdim", function(x) local v, i = x:max(2, true); return {v, i} end, {N(2, 3, 9)},
    {out = {false, "int64"}})
case("min all", function(x) return x:min() end, {N(7, 33)})
case("min dim 0 (values, indices)", function(x) local v, i = x:min(0); return {v, i} end, {N(7, 33)},
    {out = {false, "int64"}})
case("amax dims {0,2}", function(x) return nemo.amax(x, {0, 2}) end, {N(2, 3, 9)})
case("var all", function(x) return x:var() end, {N(7, 33)})
case("var dim 1", function(x) return x:var(1) end, {N(7, 33)})
case("var dim 1 biased keepdim", function(x) return x:var(1, false, true) end, {N(2, 3, 9)})
case("var dims {0,2} {correction=0}", function(x) return nemo.var(x, {0, 2}, {correction = 0}) end, {N(2, 3, 9)})
case("std all", function(x) return x:std() end, {N(7, 33)})
case("std dim 2 keepdim", function(x) return x:std(2, true, true) end, {N(2, 3, 9)})
case("std noncontig (transposed) dim 1", function(x) return x:t():std(1) end, {N(33, 7)})
case("norm all (fro)", function(x) return x:norm() end, {N(7, 33)})
case("norm p=2 dim 1 keepdim", function(x) return x:norm(2, 1, true) end, {N(7, 33)})
case("norm p=1 dims {0,2}", function(x) return nemo.norm(x, 1, {0, 2}) end, {N(2, 3, 9)})
case("norm p=3 dim -1", function(x) return x:norm(3, -1) end, {N(2, 3, 9)})
case("argmax all", function(x) return x:argmax() end, {N(7, 33)}, {out = "int64"})
case("argmax dim 1", function(x) return x:argmax(1) end, {N(7, 33)}, {out = "int64"})
case("argmax dim 2 keepdim", function(x) return nemo.argmax(x, 2, true) end, {N(2, 3, 9)}, {out = "int64"})
case("argmax noncontig (transposed) dim 0", function(x) return x:t():argmax(0) end, {N(33, 7)}, {out = "int64"})

-- ==== softmax / log_softmax ====

case("softmax dim -1", function(x) return F.softmax(x, -1) end, {N(7, 33)})
case("softmax dim 1 of 3-D", function(x) return F.softmax(x, 1) end, {N(2, 3, 9)})
case("log_softmax dim -1", function(x) return F.log_softmax(x, -1) end, {N(7, 33)})
case("log_softmax dim 0", function(x) return x:log_softmax(0) end, {N(2, 3, 9)})
case("softmax noncontig (transposed) dim -1", function(x) return F.softmax(x:t(), -1) end, {N(33, 7)})

-- ==== matmul / linear ====

case("matmul 2-D (7,33)@(33,5)", function(a, b) return a:matmul(b) end, {N(7, 33), N(33, 5)})
case("matmul batched (2,3,7,9)@(2,3,9,5)", function(a, b) return nemo.matmul(a, b) end, {N(2, 3, 7, 9), N(2, 3, 9, 5)})
case("matmul broadcast (2,1,7,9)@(3,9,5)", function(a, b) return nemo.matmul(a, b) end, {N(2, 1, 7, 9), N(3, 9, 5)})
case("matmul broadcast (2,3,7,9)@(9,5)", function(a, b) return a:matmul(b) end, {N(2, 3, 7, 9), N(9, 5)})
case("matmul 1-D @ batched (9)@(2,9,5)", function(a, b) return nemo.matmul(a, b) end, {N(9), N(2, 9, 5)})
case("matmul (7,9)@1-D (9)", function(a, b) return nemo.matmul(a, b) end, {N(7, 9), N(9)})
case("matmul noncontig (a^T @ b^T)", function(a, b) return a:t():matmul(b:t()) end, {N(33, 7), N(5, 33)})
case("matmul noncontig (sliced k)", function(a, b) return a[{":", {0, 20}}]:matmul(b) end, {N(7, 33), N(20, 5)})
case("linear with bias (2,3,9)x(5,9)", function(x, w, b) return F.linear(x, w, b) end, {N(2, 3, 9), N(5, 9), N(5)})
case("linear without bias (7,33)x(6,33)", function(x, w) return F.linear(x, w) end, {N(7, 33), N(6, 33)})
case("linear noncontig (permuted x)", function(x, w, b) return F.linear(x:permute(1, 0, 2), w, b) end,
    {N(3, 2, 9), N(5, 9), N(5)})

-- ==== layer_norm / rms_norm / group_norm ====

case("layer_norm affine (2,3,33)", function(x, w, b) return F.layer_norm(x, {33}, w, b, 1e-5) end,
    {N(2, 3, 33), N(33), N(33)})
case("layer_norm no affine", function(x) return F.layer_norm(x, {33}) end, {N(2, 3, 33)})
case("layer_norm weight only {weight=}", function(x, w) return F.layer_norm(x, {33}, {weight = w}) end,
    {N(7, 33), N(33)})
case("layer_norm over (3,33)", function(x, w, b) return F.layer_norm(x, {3, 33}, w, b) end,
    {N(2, 3, 33), N(3, 33), N(3, 33)})
case("layer_norm noncontig (transposed)", function(x, w, b) return F.layer_norm(x:transpose(1, 2), {33}, w, b) end,
    {N(2, 33, 3), N(33), N(33)})
case("rms_norm weight eps 1e-6", function(x, w) return F.rms_norm(x, {33}, w, 1e-6) end, {N(2, 3, 33), N(33)})
case("rms_norm no weight eps 1e-6", function(x) return F.rms_norm(x, {33}, nil, 1e-6) end, {N(7, 33)})
case("rms_norm over (3,9)", function(x, w) return F.rms_norm(x, {3, 9}, w, 1e-6) end, {N(2, 3, 9), N(3, 9)})
case("rms_norm noncontig (sliced)", function(x, w) return F.rms_norm(x[{":", {0, nil, 2}}], 17, w, 1e-6) end,
    {N(7, 33), N(17)})
case("group_norm affine (2,6,5,3) 3 groups", function(x, w, b) return F.group_norm(x, 3, w, b, 1e-5) end,
    {N(2, 6, 5, 3), N(6), N(6)})
case("group_norm no affine (2,6,7) 2 groups", function(x) return F.group_norm(x, 2) end, {N(2, 6, 7)})
case("group_norm noncontig (permuted NHWC)", function(x, w, b) return F.group_norm(x:permute(0, 3, 1, 2), 2, w, b) end,
    {N(2, 5, 3, 4), N(4), N(4)})

-- ==== scaled_dot_product_attention ====

local sdpa = F.scaled_dot_product_attention
case("sdpa D=16 (2,3,9,16) Sk=11", function(q, k, v) return sdpa(q, k, v) end,
    {N(2, 3, 9, 16), N(2, 3, 11, 16), N(2, 3, 11, 16)})
case("sdpa D=64 (1,2,9,64) Sk=13", function(q, k, v) return sdpa(q, k, v) end,
    {N(1, 2, 9, 64), N(1, 2, 13, 64), N(1, 2, 13, 64)})
case("sdpa D=16 causal Sq=Sk=9", function(q, k, v) return sdpa(q, k, v, {is_causal = true}) end,
    {N(2, 3, 9, 16), N(2, 3, 9, 16), N(2, 3, 9, 16)})
case("sdpa D=64 causal Sq=7 Sk=11", function(q, k, v) return sdpa(q, k, v, nil, 0, true) end,
    {N(1, 2, 7, 64), N(1, 2, 11, 64), N(1, 2, 11, 64)})
do
    local bm = nemo.randn({9, 11}, {generator = nemo.Generator(91)}):gt(-0.5)
    case("sdpa D=16 bool mask (9,11)", function(q, k, v, m) return sdpa(q, k, v, {attn_mask = m}) end,
        {N(2, 3, 9, 16), N(2, 3, 11, 16), N(2, 3, 11, 16), K(bm)})
    case("sdpa D=64 bool mask (9,11)", function(q, k, v, m) return sdpa(q, k, v, m) end,
        {N(1, 2, 9, 64), N(1, 2, 11, 64), N(1, 2, 11, 64), K(bm)})
end
case("sdpa D=16 float mask (1,3,9,11) in the low dtype", function(q, k, v, m) return sdpa(q, k, v, {attn_mask = m}) end,
    {N(2, 3, 9, 16), N(2, 3, 11, 16), N(2, 3, 11, 16), C(1, 3, 9, 11)})
case("sdpa D=64 scale=0.2", function(q, k, v) return sdpa(q, k, v, {scale = 0.2}) end,
    {N(1, 2, 9, 64), N(1, 2, 13, 64), N(1, 2, 13, 64)})
case("sdpa D=64 no probs kept (recomputing backward)", function(q, k, v)
    local prev = F.set_attention_probs_budget(0)
    local ok, y = pcall(sdpa, q, k, v, {is_causal = true})
    F.set_attention_probs_budget(prev)
    if not ok then error(y, 0) end
    return y
end, {N(1, 2, 13, 64), N(1, 2, 13, 64), N(1, 2, 13, 64)})
case("sdpa D=64 forward under no_grad (fused low-precision path)", function(q, k, v) return sdpa(q, k, v) end,
    {N(1, 2, 9, 64), N(1, 2, 13, 64), N(1, 2, 13, 64)}, {no_grad = true})
case("sdpa D=16 noncontig (B,S,H,D) views", function(q, k, v)
    return sdpa(q:transpose(1, 2), k:transpose(1, 2), v:transpose(1, 2))
end, {N(2, 9, 3, 16), N(2, 11, 3, 16), N(2, 11, 3, 16)})
do
    local q = nemo.zeros({1, 2, 9, 64}, {dtype = "bfloat16"})
    local k = nemo.zeros({1, 2, 13, 64}, {dtype = "bfloat16"})
    T.diag("sdpa_uses_flash(bf16 D=64, no mask) = " .. tostring(F.sdpa_uses_flash(q, k, k)))
end

-- ==== convolutions ====

case("conv1d (2,3,17) k3 stride 2 pad 1 bias", function(x, w, b) return F.conv1d(x, w, b, {stride = 2, padding = 1}) end,
    {N(2, 3, 17), N(4, 3, 3), N(4)})
case("conv2d (2,3,9,7) k3 pad 1 bias", function(x, w, b) return F.conv2d(x, w, b, {padding = 1}) end,
    {N(2, 3, 9, 7), N(5, 3, 3, 3), N(5)})
case("conv2d (2,3,9,7) k3 stride 2 no bias", function(x, w) return F.conv2d(x, w, nil, {stride = 2}) end,
    {N(2, 3, 9, 7), N(5, 3, 3, 3)})
case("conv2d stride {2,1} pad {0,2} positional", function(x, w, b) return F.conv2d(x, w, b, {2, 1}, {0, 2}) end,
    {N(1, 4, 8, 6), N(3, 4, 2, 3), N(3)})
case("conv2d 1x1", function(x, w, b) return F.conv2d(x, w, b) end, {N(2, 6, 5, 3), N(4, 6, 1, 1), N(4)})
case("conv3d (1,2,5,6,7) k3 stride {1,2,2} pad 1", function(x, w, b)
    return F.conv3d(x, w, b, {stride = {1, 2, 2}, padding = 1})
end, {N(1, 2, 5, 6, 7), N(3, 2, 3, 3, 3), N(3)})
case("conv2d noncontig (permuted NHWC input)", function(x, w, b)
    return F.conv2d(x:permute(0, 3, 1, 2), w, b, {padding = 1})
end, {N(2, 9, 7, 3), N(5, 3, 3, 3), N(5)})

-- ==== embedding / interpolate ====

do
    local idx = nemo.tensor({{0, 3, 9, 3, 1, 7, 3}, {2, 2, 5, 8, 0, 3, 6}, {9, 9, 1, 4, 4, 3, 0}})
    case("embedding (3,7) indices, (10,16) weight, repeats", function(i, w) return F.embedding(i, w) end,
        {K(idx), N(10, 16)})
    case("embedding padding_idx=3", function(i, w) return F.embedding(i, w, {padding_idx = 3}) end,
        {K(idx), N(10, 16)})
    case("embedding int32 indices", function(i, w) return F.embedding(i, w) end, {K(idx:int()), N(10, 5)})
end
case("interpolate nearest 1-D size 11", function(x) return F.interpolate(x, {size = 11}) end, {N(2, 3, 5)})
case("interpolate nearest 2-D scale 2", function(x) return F.interpolate(x, {scale_factor = 2, mode = "nearest"}) end,
    {N(2, 3, 5, 4)})
case("interpolate nearest 2-D size (7,9)", function(x) return F.interpolate(x, {size = {7, 9}}) end, {N(2, 3, 5, 4)})
case("interpolate nearest 3-D scale 2", function(x) return F.interpolate(x, {scale_factor = 2}) end, {N(1, 2, 3, 4, 5)})
case("interpolate nearest-exact 2-D size (3,7)", function(x)
    return F.interpolate(x, {size = {3, 7}, mode = "nearest-exact"})
end, {N(2, 3, 5, 4)})
case("interpolate noncontig (permuted)", function(x) return F.interpolate(x:permute(0, 3, 1, 2), {scale_factor = 2}) end,
    {N(2, 5, 4, 3)})

-- ==== shape ops ====

case("reshape (7,33)->(33,7)", function(x) return x:reshape{33, 7} end, {N(7, 33)})
case("reshape of a transpose (copy)", function(x) return x:t():reshape(-1) end, {N(7, 33)})
case("view (2,3,9)->(6,9)", function(x) return x:view(6, 9) end, {N(2, 3, 9)})
case("permute (2,0,1)", function(x) return x:permute(2, 0, 1) end, {N(2, 3, 9)})
case("transpose(0,1) contiguous", function(x) return x:transpose(0, 1):contiguous() end, {N(7, 33)})
case("unsqueeze/squeeze", function(x) return x:unsqueeze(1):squeeze(1):unsqueeze(-1) end, {N(7, 33)})
case("expand (7,1)->(3,7,33)", function(x) return x:expand(3, 7, 33) end, {N(7, 1)})
case("narrow(2, 2, 5)", function(x) return x:narrow(2, 2, 5) end, {N(2, 3, 9)})
case("select(1, 2)", function(x) return x:select(1, 2) end, {N(2, 3, 9)})
case("select(0, -1)", function(x) return x:select(0, -1) end, {N(7, 33)})
case("slice x[{':', {1, 30, 3}}]", function(x) return x[{":", {1, 30, 3}}] end, {N(7, 33)})
case("slice x[{'...', {2, 7}}] and x[1]", function(x) return {x[{"...", {2, 7}}], x[1]} end, {N(2, 3, 9)})
case("cat dim 1 (7,33)+(7,5)", function(a, b) return F.cat({a, b}, 1) end, {N(7, 33), N(7, 5)})
case("cat dim 0 three parts", function(a, b, c) return F.cat({a, b, c}, 0) end, {N(2, 3, 9), N(1, 3, 9), N(3, 3, 9)})
case("cat noncontig parts", function(a, b) return F.cat({a:t(), b[{{0, nil, 2}}]}, 0) end, {N(33, 7), N(9, 33)})
case("stack dim 1", function(a, b) return F.stack({a, b}, 1) end, {N(7, 33), N(7, 33)})
case("stack dim 0", function(a, b, c) return F.stack({a, b, c}) end, {N(2, 3, 9), N(2, 3, 9), N(2, 3, 9)})
case("chunk(3, 1)", function(x) return x:chunk(3, 1) end, {N(7, 33)})
case("chunk(4, -1) uneven", function(x) return F.chunk(x, 4, -1) end, {N(2, 3, 9)})
case("split(4, 1)", function(x) return x:split(4, 1) end, {N(2, 3, 9)})
case("split({2, 5}, 0)", function(x) return x:split({2, 5}, 0) end, {N(7, 33)})
case("unbind(1)", function(x) return x:unbind(1) end, {N(2, 3, 9)})
case("flatten(1)", function(x) return x:flatten(1) end, {N(2, 3, 9)})

-- ==== losses ====

case("mse_loss mean", function(a, b) return F.mse_loss(a, b) end, {N(7, 33), N(7, 33)})
case("mse_loss sum", function(a, b) return F.mse_loss(a, b, {reduction = "sum"}) end, {N(2, 3, 9), N(2, 3, 9)})
case("mse_loss none", function(a, b) return F.mse_loss(a, b, "none") end, {N(7, 33), N(7, 33)})
case("mse_loss noncontig (transposed input)", function(a, b) return F.mse_loss(a:t(), b) end, {N(33, 7), N(7, 33)})

-- ==== a small chain (several ops in one graph) ====

case("chain: linear -> layer_norm -> gelu -> softmax", function(x, w, b, lw, lb)
    local h = F.linear(x, w, b)
    h = F.layer_norm(h, {12}, lw, lb)
    return F.softmax(F.gelu(h, {approximate = "tanh"}), -1)
end, {N(2, 5, 9), N(12, 9), N(12), N(12), N(12)})

T.diag(string.format("cpu time %.2f s", os.clock() - t0))
T.done()
