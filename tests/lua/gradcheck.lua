-- tests/lua/gradcheck.lua: compare autograd gradients with float64 central differences.
--
--   local gradcheck = require "gradcheck"
--   gradcheck(T, "name", fn, {x, w, ...}, {eps = 1e-6, rtol = 1e-6, atol = 1e-8})
--
-- inputs are contiguous float64 leaf tensors; those with requires_grad are checked. fn(inputs...)
-- returns a tensor (or a list of tensors); it may build non-contiguous views, broadcast, etc.
-- The scalar checked is L = sum_k <out_k, R_k> with fixed random R_k, so every output element
-- matters. One TAP line per checked input: max |analytic - numeric| <= atol + rtol*max|numeric|.
local ffi = require "ffi"
local nemo = require "nemo"

local function outputs(fn, inputs)
    local out = fn(unpack(inputs))
    if nemo.is_tensor(out) then return {out} end
    return out
end

local function dot_all(outs, Rs)
    local s = 0
    for k, o in ipairs(outs) do
        local a = o:detach():double():contiguous()
        local pa = ffi.cast("double*", a:data_ptr())
        local pr = Rs[k]
        for i = 0, a:numel() - 1 do s = s + pa[i] * pr[i + 1] end
    end
    return s
end

return function(T, name, fn, inputs, opts)
    opts = opts or {}
    local eps, rtol, atol = opts.eps or 1e-6, opts.rtol or 1e-6, opts.atol or 1e-8
    local gen = nemo.Generator(opts.seed or 1234)
    -- analytic
    for _, x in ipairs(inputs) do x.grad = nil end
    local outs = outputs(fn, inputs)
    local Rs, Rts = {}, {}
    for k, o in ipairs(outs) do
        local r = nemo.randn(o.shape, {dtype = "float64", generator = gen})
        Rts[k] = r
        Rs[k] = r:reshape{-1}:tolist()
    end
    -- L = sum_k <out_k, R_k>: backward each output with its R (gradients accumulate)
    local total = nil
    for k, o in ipairs(outs) do
        if o.requires_grad then
            local part = o * Rts[k]:to{dtype = o.dtype}
            total = total and (total + part:reshape{-1}) or part:reshape{-1}
        end
    end
    if total == nil then
        T.ok(false, name .. ": no output requires grad")
        return
    end
    total:backward(nemo.ones(total.shape, {dtype = total.dtype}))
    for idx, x in ipairs(inputs) do
        if x.requires_grad then
            local analytic = x.grad and x.grad:double():reshape{-1}:tolist() or {}
            local p = ffi.cast("double*", x:data_ptr())
            local maxd, maxn = 0, 0
            for i = 0, x:numel() - 1 do
                local orig = p[i]
                p[i] = orig + eps
                local fp = nemo.no_grad(function() return dot_all(outputs(fn, inputs), Rs) end)
                p[i] = orig - eps
                local fm = nemo.no_grad(function() return dot_all(outputs(fn, inputs), Rs) end)
                p[i] = orig
                local num = (fp - fm) / (2 * eps)
                local ana = analytic[i + 1] or 0
                local d = math.abs(num - ana)
                if d ~= d then d = math.huge end
                if d > maxd then maxd = d end
                if math.abs(num) > maxn then maxn = math.abs(num) end
            end
            local tol = atol + rtol * maxn
            T.ok(maxd <= tol, string.format("%s: d/d(input %d) max_abs %.2e <= %.2e (atol %.0e + rtol %.0e * %.2e)",
                name, idx, maxd, tol, atol, rtol, maxn))
        end
    end
end
