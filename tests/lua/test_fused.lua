-- tests/lua/test_fused.lua: the fused DiT ops (F.rope, F.modulate, F.gated_add): bit-for-bit
-- equality with the unfused op sequences diffusers writes (float32 forward and every gradient,
-- including (1, D) vectors shared by the batch and non-contiguous inputs), float64 gradients
-- against central differences, bf16 within bf16 tolerance of float32, results independent of the
-- thread count, and errors that name the op and the shapes.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local gradcheck = require "gradcheck"
local F = nemo.F

local function rnd(shape, seed, dtype)
    return nemo.randn(shape, {dtype = dtype or "float32", generator = nemo.Generator(seed)})
end

local bitwise = T.same_values

-- run fn on fresh leaves made from inputs (requires_grad on all), backward with g; returns the
-- output and the gradients
local function run(fn, inputs, g)
    local leaves = {}
    for i, x in ipairs(inputs) do leaves[i] = x:detach():clone():requires_grad_() end
    local y = fn(unpack(leaves))
    y:backward(g)
    local grads = {}
    for i, l in ipairs(leaves) do grads[i] = l.grad end
    return y, grads
end

local function same_as_unfused(name, fused, unfused, inputs, gshape)
    local g = rnd(gshape, 99)
    local y1, g1 = run(fused, inputs, g)
    local y2, g2 = run(unfused, inputs, g)
    local ok = bitwise(y1, y2)
    for i = 1, #inputs do ok = ok and bitwise(g1[i], g2[i]) end
    T.ok(ok, name .. ": float32 output and every gradient bitwise equal to the unfused ops")
end

-- ==== rope ====

-- diffusers' apply_rotary_emb with use_real, interleaved pairs, written out
local function rope_ref(x, cos, sin, seq_dim)
    local shape = x.shape
    local nd = #shape
    local pairs = x:unflatten(-1, {-1, 2})
    local xr, xi = pairs:select(-1, 0), pairs:select(-1, 1)
    local rot = F.stack({-xi, xr}, -1):flatten(-2)
    local c, s = cos, sin
    for _ = seq_dim + 1, nd - 2 do c, s = c:unsqueeze(1), s:unsqueeze(1) end
    return x * c + rot * s
end

do
    local S, Dh = 7, 6
    local cos, sin = rnd({S, Dh}, 1), rnd({S, Dh}, 2)   -- any tables: the op reads every column
    same_as_unfused("rope (B, S, H, Dh), seq dim 1", function(x) return F.rope(x, cos, sin, 1) end,
        function(x) return rope_ref(x, cos, sin, 1) end, {rnd({2, S, 3, Dh}, 3)}, {2, S, 3, Dh})
    same_as_unfused("rope (B, H, S, Dh), seq dim 2", function(x) return F.rope(x, cos, sin, 2) end,
        function(x) return rope_ref(x, cos, sin, 2) end, {rnd({2, 3, S, Dh}, 4)}, {2, 3, S, Dh})
    same_as_unfused("rope on a transposed (non-contiguous) input",
        function(x) return F.rope(x:transpose(1, 2), cos, sin, 1) end,
        function(x) return rope_ref(x:transpose(1, 2), cos, sin, 1) end, {rnd({2, 3, S, Dh}, 5)}, {2, S, 3, Dh})
    local common = require "nemo.models.common"
    local c2, s2 = common.get_1d_rotary_pos_embed(Dh, rnd({S}, 6, "float64"))
    local x = rnd({2, S, 3, Dh}, 7)
    T.ok(bitwise(F.rope(x, c2, s2, 1), rope_ref(x, c2, s2, 1)),
        "rope with get_1d_rotary_pos_embed tables: apply_rotary_emb's bits")
    gradcheck(T, "rope float64 (B, S, H, Dh)", function(t) return F.rope(t:transpose(1, 2), cos:double(), sin:double(), 1) end,
        {rnd({2, 3, S, Dh}, 8, "float64"):requires_grad_()})
    local xb = x:bfloat16()
    local yb = F.rope(xb, cos, sin, 1)
    T.is(yb.dtype, "bfloat16", "rope keeps a bf16 input's dtype (tables float32)")
    T.close(yb, F.rope(xb:float(), cos, sin, 1), 1e-2, 1e-2, "rope bf16 vs float32 of the same input (bf16 tolerance)")
    T.raises(function() return F.rope(rnd({2, S, 3, 5}, 9), rnd({S, 5}, 1), rnd({S, 5}, 2), 1) end, "must be even",
        "rope: odd head dim is an error")
    T.raises(function() return F.rope(x, rnd({S + 1, Dh}, 1), rnd({S + 1, Dh}, 2), 1) end, "rope: cos",
        "rope: tables of the wrong length are an error naming the shapes")
    local ct = cos:clone():requires_grad_()
    T.raises(function() return F.rope(x, ct, sin, 1) end, "cannot require grad", "rope: tables that require grad are refused")
end

-- ==== modulate ====

local function modulate_ref(x, scale, shift)
    local y = x * (1 + scale:unsqueeze(1))
    if shift then y = y + shift:unsqueeze(1) end
    return y
end

do
    local B, S, D = 3, 7, 33
    same_as_unfused("modulate (B, S, D) with (B, D) scale and shift", F.modulate, modulate_ref,
        {rnd({B, S, D}, 10), rnd({B, D}, 11), rnd({B, D}, 12)}, {B, S, D})
    same_as_unfused("modulate with (1, D) scale and shift shared by the batch", F.modulate, modulate_ref,
        {rnd({B, S, D}, 13), rnd({1, D}, 14), rnd({1, D}, 15)}, {B, S, D})
    same_as_unfused("modulate without shift", function(x, s) return F.modulate(x, s) end,
        function(x, s) return modulate_ref(x, s) end, {rnd({B, S, D}, 16), rnd({B, D}, 17)}, {B, S, D})
    -- chunks of one (B, 6D) projection, as AdaLayerNormZero hands them (strided views)
    local m = rnd({B, 6 * D}, 18)
    same_as_unfused("modulate with strided chunk views and a transposed input",
        function(x, mm) local c = mm:chunk(6, 1); return F.modulate(x:transpose(0, 1), c[2], c[1]) end,
        function(x, mm) local c = mm:chunk(6, 1); return modulate_ref(x:transpose(0, 1), c[2], c[1]) end,
        {rnd({S, B, D}, 19), m}, {B, S, D})
    gradcheck(T, "modulate float64", function(x, s, h) return F.modulate(x, s, h) end,
        {rnd({2, 5, 7}, 20, "float64"):requires_grad_(), rnd({2, 7}, 21, "float64"):requires_grad_(),
         rnd({2, 7}, 22, "float64"):requires_grad_()})
    gradcheck(T, "modulate float64, shared (1, D) scale", function(x, s, h) return F.modulate(x, s, h) end,
        {rnd({2, 5, 7}, 23, "float64"):requires_grad_(), rnd({1, 7}, 24, "float64"):requires_grad_(),
         rnd({1, 7}, 25, "float64"):requires_grad_()})
    local x, s, h = rnd({B, S, D}, 26), rnd({B, D}, 27), rnd({B, D}, 28)
    local yb = F.modulate(x:bfloat16(), s:bfloat16(), h:bfloat16())
    T.is(yb.dtype, "bfloat16", "modulate of bf16 tensors is bf16")
    T.close(yb, F.modulate(x:bfloat16():float(), s:bfloat16():float(), h:bfloat16():float()), 1e-2, 1e-2,
        "modulate bf16 vs float32 of the same values (bf16 tolerance)")
    T.raises(function() return F.modulate(x, rnd({B, D + 1}, 1), h) end, "modulate: scale must be",
        "modulate: a scale of the wrong width is an error naming the shapes")
    T.raises(function() return F.modulate(x:reshape{-1}, s, h) end, "must be (B, S, D)",
        "modulate: a 1-D input is an error")
end

-- ==== gated_add ====

local function gated_ref(x, gate, a) return x + gate:unsqueeze(1) * a end

do
    local B, S, D = 2, 9, 33
    same_as_unfused("gated_add (B, S, D) with a (B, D) gate", F.gated_add, gated_ref,
        {rnd({B, S, D}, 30), rnd({B, D}, 31), rnd({B, S, D}, 32)}, {B, S, D})
    same_as_unfused("gated_add with a (1, D) gate", F.gated_add, gated_ref,
        {rnd({B, S, D}, 33), rnd({1, D}, 34), rnd({B, S, D}, 35)}, {B, S, D})
    same_as_unfused("gated_add on narrowed (non-contiguous) views",
        function(x, gt, a) return F.gated_add(x:narrow(1, 2, 5), gt, a:narrow(1, 0, 5)) end,
        function(x, gt, a) return gated_ref(x:narrow(1, 2, 5), gt, a:narrow(1, 0, 5)) end,
        {rnd({B, S, D}, 36), rnd({B, D}, 37), rnd({B, S, D}, 38)}, {B, 5, D})
    gradcheck(T, "gated_add float64", function(x, gt, a) return F.gated_add(x, gt, a) end,
        {rnd({2, 5, 7}, 39, "float64"):requires_grad_(), rnd({2, 7}, 40, "float64"):requires_grad_(),
         rnd({2, 5, 7}, 41, "float64"):requires_grad_()})
    local x, gt, a = rnd({B, S, D}, 42), rnd({B, D}, 43), rnd({B, S, D}, 44)
    T.close(F.gated_add(x:bfloat16(), gt:bfloat16(), a:bfloat16()),
        F.gated_add(x:bfloat16():float(), gt:bfloat16():float(), a:bfloat16():float()), 1e-2, 1e-2,
        "gated_add bf16 vs float32 of the same values (bf16 tolerance)")
    T.raises(function() return F.gated_add(x, gt, rnd({B, S + 1, D}, 1)) end, "must have one shape",
        "gated_add: input and addend of different shapes are an error")
end

-- ==== thread count ====

do  -- sizes big enough for the threaded paths: every result bitwise equal on 1 and 2 threads
    local B, S, D = 2, 300, 256
    local x, s, h, a = rnd({B, S, D}, 50), rnd({B, D}, 51), rnd({B, D}, 52), rnd({B, S, D}, 53)
    local g = rnd({B, S, D}, 54)
    local cos, sin = rnd({S, 64}, 55), rnd({S, 64}, 56)
    local function all()
        local _, gm = run(F.modulate, {x, s, h}, g)
        local _, gg = run(F.gated_add, {x, s, a}, g)
        local _, gr = run(function(t) return F.rope(t:view(B, S, 4, 64), cos, sin, 1) end, {x}, g:view(B, S, 4, 64))
        local _, g1 = run(function(t) return F.modulate(t, s:narrow(0, 0, 1), h:narrow(0, 0, 1)) end, {x}, g)
        return {gm[1], gm[2], gm[3], gg[1], gg[2], gg[3], gr[1], g1[1]}
    end
    local n0 = nemo.get_num_threads()
    nemo.set_num_threads(1)
    local one = all()
    nemo.set_num_threads(2)
    local two = all()
    nemo.set_num_threads(n0)
    local ok = true
    for i = 1, #one do ok = ok and bitwise(one[i], two[i]) end
    T.ok(ok, string.format("fused ops: %d gradients bitwise equal on 1 and 2 threads (B %d, S %d, D %d)", #one, B, S, D))
end

-- ==== the engine paths the fused training step leans on ====

do  -- in-place add_ writes into the tensor itself: the same bits as a + b, broadcast, aliasing
    local a, b = rnd({7, 33}, 60), rnd({33}, 61)
    local ref = a + b
    local t = a:clone()
    t:add_(b)
    T.ok(bitwise(t, ref), "add_ in place with a broadcast operand: bitwise a + b")
    local t2 = a:clone()
    t2:add_(t2)
    T.ok(bitwise(t2, a + a), "add_ of a tensor to itself: bitwise a + a")
    local t3 = a:clone()
    t3:narrow(1, 1, 20):add_(t3:narrow(1, 0, 20))
    local r3 = a:clone()
    r3:narrow(1, 1, 20):copy_(a:narrow(1, 1, 20) + a:narrow(1, 0, 20))
    T.ok(bitwise(t3, r3), "add_ between overlapping views of one tensor reads the values from before the add")
end

do  -- one long contiguous row is still shared out over threads; results do not depend on them
    local a, b = rnd({262144}, 62), rnd({262144}, 63)
    local n0 = nemo.get_num_threads()
    nemo.set_num_threads(1)
    local s1, m1 = a + b, a * b
    nemo.set_num_threads(2)
    local s2, m2 = a + b, a * b
    nemo.set_num_threads(n0)
    T.ok(bitwise(s1, s2) and bitwise(m1, m2), "contiguous add / mul of 2^18 elements: bitwise equal on 1 and 2 threads")
end

do  -- sum_to (the gradient of a broadcast): per element in row order on any thread count
    local x, bias = rnd({300, 256}, 64), rnd({256}, 65)
    local g = rnd({300, 256}, 66)
    local function grad_bias()
        local b = bias:clone():requires_grad_()
        local y = x + b
        y:backward(g)
        return b.grad
    end
    local n0 = nemo.get_num_threads()
    nemo.set_num_threads(1)
    local g1 = grad_bias()
    nemo.set_num_threads(2)
    local g2 = grad_bias()
    nemo.set_num_threads(n0)
    -- reference: float64 sums over the rows in order, rounded once
    local gl, rl = g:double():tolist(), {}
    for j = 1, 256 do
        local s = 0
        for i = 1, 300 do s = s + gl[i][j] end
        rl[j] = s
    end
    local ref = nemo.tensor(rl, {dtype = "float64"}):float()
    T.ok(bitwise(g1, g2) and bitwise(g1, ref), "sum_to over 300 rows: bitwise equal on 1 and 2 threads and to " ..
        "float64 row-order sums rounded once")
end

do  -- sub-view gradients (partial pieces): tiling, overlapping and stepped views
    local x = rnd({4, 9}, 67, "float64")
    local function grad(fn)
        local t = x:clone():requires_grad_()
        local y = fn(t)
        y:backward(nemo.ones(y.shape, {dtype = "float64"}))
        return t.grad
    end
    local g = grad(function(t) local p = t:split({2, 3, 4}, 1); return F.cat({p[3] * 3, p[1] * 2, p[2]}, 1) end)
    local want = {}
    for j = 1, 9 do want[j] = j <= 2 and 2 or (j <= 5 and 1 or 3) end
    local row = g:tolist()[1]
    local ok = true
    for j = 1, 9 do ok = ok and row[j] == want[j] end
    T.ok(ok, "split pieces used in another order: each piece's gradient lands in its place")
    local go = grad(function(t) return t:narrow(1, 0, 6) + t:narrow(1, 3, 6) end):tolist()[2]
    local ok2 = true
    for j = 1, 9 do ok2 = ok2 and go[j] == ((j <= 3 or j >= 7) and 1 or 2) end
    T.ok(ok2, "overlapping narrows: gradients add where they overlap")
    local gs = grad(function(t) return t:slice(1, 1, nil, 3) * 5 end):tolist()[3]
    local ok3 = true
    for j = 1, 9 do ok3 = ok3 and gs[j] == ((j - 2) % 3 == 0 and 5 or 0) end
    T.ok(ok3, "a stepped slice: gradient at its elements, zero elsewhere")
    gradcheck(T, "chunk + unbind + select mix", function(t)
        local c = t:chunk(3, 1)
        local u = t:unbind(0)
        return c[1] * c[3] + u[2]:unsqueeze(0):narrow(1, 0, 3) * t:select(0, 3):narrow(0, 6, 3)
    end, {rnd({4, 9}, 68, "float64"):requires_grad_()})
end

do  -- checkpoint_owned: the gradients of plain autograd, and no memory left to the collector
    local ag = nemo.autograd
    local w = rnd({48, 48}, 70)
    local function block(h, wt)   -- frees its intermediates, as the model's blocks do
        local l = F.linear(h, wt)
        local a = F.gelu(l, {approximate = "tanh"})
        local s0, s1 = h:select(1, 0), h:select(1, 1)
        local b = F.modulate(a, s0, nil)
        local o1, o2 = F.gated_add(h, s1, b), a * 2
        for _, t in ipairs {l, a, s0, s1, b} do t:free() end
        return {o1, o2}
    end
    local function run_once(mode)
        local x = rnd({2, 40, 48}, 71):requires_grad_()
        local wt = w:clone():requires_grad_()
        collectgarbage(); collectgarbage()
        collectgarbage("stop")
        local base = nemo.memory_stats().current
        local outs
        if mode == "plain" then outs = block(x, wt)
        elseif mode == "owned" then outs = ag.checkpoint_owned(block, x, wt)
        else
            outs = {ag.checkpoint_owned(function(h, ww) local o = block(h, ww); o[2]:free(); return o[1] end, x, wt)}
        end
        local loss = outs[1]:sum()
        if outs[2] then loss = loss + outs[2]:sum() end
        loss:backward()
        for _, o in ipairs(outs) do o:free() end
        loss:free()
        local left = nemo.memory_stats().current - base
        collectgarbage("restart")
        return x.grad, wt.grad, left
    end
    local gx0, gw0 = run_once("plain")
    local gx1, gw1, left = run_once("owned")
    T.ok(bitwise(gx0, gx1) and bitwise(gw0, gw1), "checkpoint_owned with two outputs: gradients bitwise equal to " ..
        "plain autograd")
    local grads = (gx1:numel() + gw1:numel()) * 4
    T.ok(left <= grads + 4096, string.format("checkpoint_owned: after backward only the gradients remain without a " ..
        "collection (%d bytes held, gradients %d)", left, grads))
    local _, _, left1 = run_once("single")
    T.ok(left1 <= grads + 4096, string.format("checkpoint_owned with one output (no copy): after backward only the " ..
        "gradients remain (%d bytes held, gradients %d)", left1, grads))
end

T.done()
