-- Optimizers: AdamW against torch's two golden steps, param groups, state round trip, errors;
-- gradient clipping by global norm.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local optim = require "nemo.optim"
local golden_cases = require "golden"

local golden, why = golden_cases.case("flux_tiny", "adamw.safetensors")
if golden then
    local start = nemo.load_file(golden .. "/diffusion_pytorch_model.safetensors")
    local case = nemo.load_file(golden .. "/case.safetensors")
    local ref = nemo.load_file(golden .. "/adamw.safetensors")
    local names = {}
    for k in pairs(start) do names[#names + 1] = k end
    table.sort(names)
    local params = {}
    for i, k in ipairs(names) do
        params[i] = start[k]:clone():requires_grad_()
        params[i].grad = case["grad." .. k]:clone()
    end
    local opt = optim.AdamW(params, {lr = 0.001, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 0.01})
    opt:step()
    local worst_p, worst_m, worst_v = 0, 0, 0
    local function maxdiff(a, b)
        local d = (a:double() - b:double()):abs():reshape(-1):tolist()
        local m = 0
        for _, x in ipairs(d) do if x > m then m = x end end
        return m
    end
    for i, k in ipairs(names) do
        local st = opt.state[params[i]]
        worst_p = math.max(worst_p, maxdiff(params[i]:detach(), ref["adamw." .. k]))
        worst_m = math.max(worst_m, maxdiff(st.exp_avg, ref["exp_avg." .. k]))
        worst_v = math.max(worst_v, maxdiff(st.exp_avg_sq, ref["exp_avg_sq." .. k]))
    end
    T.ok(worst_p == 0, string.format("AdamW step 1 parameters equal torch's bit for bit over %d tensors (max diff %.3g)", #names, worst_p))
    T.ok(worst_m == 0 and worst_v == 0, string.format("AdamW step 1 exp_avg / exp_avg_sq equal torch's (max diff %.3g / %.3g)", worst_m, worst_v))
    for i, k in ipairs(names) do params[i].grad = ref["grad2." .. k]:clone() end
    opt:step()
    local worst2 = 0
    for i, k in ipairs(names) do worst2 = math.max(worst2, maxdiff(params[i]:detach(), ref["adamw2." .. k])) end
    T.ok(worst2 == 0, string.format("AdamW step 2 equals torch's bit for bit (max diff %.3g)", worst2))
    T.is(opt.state[params[1]].step, 2, "step count kept per parameter")

    -- state_dict round trip: a fresh optimizer continues identically
    local sd = opt:state_dict()
    local copy = {}
    for i, p in ipairs(params) do copy[i] = p:detach():clone():requires_grad_(); copy[i].grad = p.grad end
    local opt2 = optim.AdamW(copy, {lr = 0.001, weight_decay = 0.01})
    opt2:load_state_dict(sd)
    opt:step(); opt2:step()
    local same = 0
    for i = 1, #params do same = math.max(same, maxdiff(params[i]:detach(), copy[i]:detach())) end
    T.ok(same == 0, "state_dict / load_state_dict continue bit for bit")
else
    T.ok(false, "AdamW golden steps: " .. why)
end

-- param groups and zero_grad
local a, b = nemo.ones({3}):requires_grad_(), nemo.ones({2}):requires_grad_()
local opt = optim.AdamW({{params = {a}, lr = 0.1}, {params = {b}, weight_decay = 0}}, {lr = 0.5, weight_decay = 0.1})
T.is(opt.param_groups[1].lr, 0.1, "group option overrides the default")
T.is(opt.param_groups[2].lr, 0.5, "default fills a group")
a.grad = nemo.ones(3); b.grad = nemo.ones(2)
opt:step()
-- first AdamW step moves each weight by about lr (sign of the gradient) after decay
T.near(a:detach():tolist()[1], 1 * (1 - 0.1 * 0.1) - 0.1, 1e-6, "group 1 step")
T.near(b:detach():tolist()[1], 1 - 0.5, 1e-6, "group 2 step without weight decay")
opt:zero_grad()
T.ok(a.grad == nil and b.grad == nil, "zero_grad sets gradients to nil")
T.raises(function() optim.AdamW({a}, {lr = -1}) end, "invalid learning rate", "negative lr")
T.raises(function() optim.AdamW({a}, {betas = {0.9, 1.0}}) end, "invalid betas", "beta2 = 1")
T.raises(function() optim.AdamW({a}, {amsgrad = true}) end, "amsgrad is not supported", "amsgrad refused")
T.raises(function() optim.AdamW({a}, {lrr = 1}) end, "unknown option 'lrr'", "unknown option")
T.raises(function() optim.AdamW({}) end, "empty parameter list", "no parameters")
T.raises(function() optim.AdamW({{params = {a}}, {params = {a}}}) end, "more than one group", "duplicate parameter")

-- gradient clipping
local p1, p2 = nemo.zeros({3}):requires_grad_(), nemo.zeros({4}):requires_grad_()
p1.grad = nemo.tensor({3, 0, 0}, {dtype = "float32"}); p2.grad = nemo.tensor({0, 4, 0, 0}, {dtype = "float32"})
local norm = optim.clip_grad_norm_({p1, p2}, 1.0)
T.near(norm, 5, 1e-12, "clip_grad_norm_ returns the total norm before clipping")
T.near(optim.grad_norm({p1, p2}), 1, 1e-5, "after clipping the norm is max_norm")
T.close(p1.grad, {3 / (5 + 1e-6), 0, 0}, 1e-6, 0, "gradients scaled by max_norm / (norm + 1e-6)")
p1.grad = nemo.tensor({0.1, 0, 0}, {dtype = "float32"})
p2.grad = nil
T.near(optim.clip_grad_norm_({p1, p2}, 1.0), 0.1, 1e-7, "small norm")
T.close(p1.grad, {0.1, 0, 0}, 0, 1e-8, "no clipping below max_norm")
T.raises(function() optim.clip_grad_norm_({p1}, 0) end, "max_norm must be a positive number", "bad max_norm")

-- ==== several parameters at once (nemo_adamw_step_many, nemo_sum_squares_many) ====
do
    local ffi = require "ffi"
    local nffi = require "nemo.ffi"
    local C = nffi.C
    local same = T.same_bits
    local function r(shape, seed, dt)
        return nemo.randn(shape, {generator = nemo.Generator(seed), dtype = dt or "float32"})
    end
    -- parameters of every kind the fused loop takes or leaves: large float32 (several chunks),
    -- float64, bf16 (updated in float32 and rounded), a transposed view, an empty one, steps 1..4
    local function make()
        local ps = {r({300, 200}, 1), r({7}, 2, "float64"), r({33, 5}, 3):to{dtype = "bfloat16"},
                    r({40, 30}, 4):t(), r({0}, 5), r({16385}, 6)}
        local gs = {r({300, 200}, 11), r({7}, 12, "float64"), r({33, 5}, 13):to{dtype = "bfloat16"},
                    r({30, 40}, 14), r({0}, 15), r({16385}, 16)}
        local ms, vs = {}, {}
        for i, p in ipairs(ps) do
            local cdt = p.dtype == "float64" and "float64" or "float32"
            ms[i] = r(p.shape, 20 + i, cdt) * 0.1
            vs[i] = (r(p.shape, 30 + i, cdt) * 0.01):abs()
        end
        return ps, gs, ms, vs
    end
    local steps = {1, 2, 3, 4, 1, 7}
    local p1, g1, m1, v1 = make()
    local p2, g2, m2, v2 = make()
    for i = 1, #p1 do
        nffi.check(C.nemo_adamw_step(p1[i]._c, g1[i]._c, m1[i]._c, v1[i]._c, 1e-3, 0.9, 0.999, 1e-8, 0.01, steps[i]))
    end
    local n = #p2
    local pa, ga = ffi.new("nemo_tensor *[?]", n), ffi.new("const nemo_tensor *[?]", n)
    local ma, va, sa = ffi.new("nemo_tensor *[?]", n), ffi.new("nemo_tensor *[?]", n), ffi.new("int64_t[?]", n)
    for i = 1, n do pa[i - 1], ga[i - 1], ma[i - 1], va[i - 1], sa[i - 1] = p2[i]._c, g2[i]._c, m2[i]._c, v2[i]._c, steps[i] end
    nffi.check(C.nemo_adamw_step_many(n, pa, ga, ma, va, 1e-3, 0.9, 0.999, 1e-8, 0.01, sa))
    local bad = {}
    for i = 1, n do
        if not (same(p1[i], p2[i]) and same(m1[i], m2[i]) and same(v1[i], v2[i])) then bad[#bad + 1] = i end
    end
    T.ok(#bad == 0, "adamw_step_many equals nemo_adamw_step per parameter bit for bit (f32 in several chunks, f64, " ..
        "bf16, a transposed view, an empty one, steps 1..7)", "differ: " .. table.concat(bad, ", "))
    sa[2] = 0
    T.raises(function() nffi.check(C.nemo_adamw_step_many(n, pa, ga, ma, va, 1e-3, 0.9, 0.999, 1e-8, 0.01, sa)) end,
        "parameter 2: step must be >= 1", "adamw_step_many: a step below 1 names the parameter")
    local ts = {r({300, 200}, 40), r({7}, 41, "float64"), r({33, 5}, 42):to{dtype = "bfloat16"}, r({40, 30}, 43):t()}
    local arr, out = ffi.new("const nemo_tensor *[?]", #ts), ffi.new("double[?]", #ts)
    for i, t in ipairs(ts) do arr[i - 1] = t._c end
    nffi.check(C.nemo_sum_squares_many(#ts, arr, out))
    local one = ffi.new("double[1]")
    local eq = true
    for i, t in ipairs(ts) do
        nffi.check(C.nemo_sum_squares(t._c, one))
        eq = eq and one[0] == out[i - 1]
    end
    T.ok(eq, "sum_squares_many equals nemo_sum_squares per tensor, bit for bit")
end
T.done()
