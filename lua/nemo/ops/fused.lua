-- lua/nemo/ops/fused.lua: fused elementwise ops of the diffusion-transformer blocks, each one
-- pass over memory with one fused backward (engine/include/nemo_fused.h):
--   F.rope(x, cos, sin, seq_dim)     diffusers' apply_rotary_emb (interleaved pairs): x*cos +
--                                    rot(x)*sin; x (..., S, ..., Dh) with S at seq_dim (0-based),
--                                    cos / sin (S, Dh); the tables get no gradient
--   F.modulate(x, scale, shift)      x * (1 + scale[:, None]) + shift[:, None]; x (B, S, D),
--                                    scale / shift (B, D) or (1, D); shift may be nil
--   F.gated_add(x, gate, a)          x + gate[:, None] * a; x, a (B, S, D), gate (B, D) or (1, D)
--   F._fastmath(name, x)             the vectorised float32 exp / tanh / sigmoid / erf of the CPU
--                                    kernels on a contiguous float32 CPU tensor (tests, benches)
-- In float32 and float64 each op gives exactly the bits of the unfused op sequence (see the
-- header); bf16 / f16 are computed in float32 and rounded once.
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local F = require "nemo.functional"

local C = nffi.C
local check = nffi.check
local wrap, is_tensor = Tensor.wrap, Tensor.is_tensor
local node_of, save = autograd.node, autograd.save
local dtype_ids = Tensor.dtype_ids

-- out-parameters, reused by every call (each result is wrapped before the next call)
local out_t = ffi.typeof("nemo_tensor*[1]")
local o1, o2, o3 = out_t(), out_t(), out_t()

local function want_tensor(op, what, v)
    if not is_tensor(v) then error(string.format("%s: expected a tensor for %s, got %s", op, what, type(v)), 3) end
    return v
end

-- ==== rope ====

local function rope_bw(node, g)
    return wrap(C.nemo_rope_backward(g._c, node.cos._c, node.sin._c, node.seq_dim, node.x_dtype))
end

function F.rope(x, cos, sin, seq_dim)
    want_tensor("rope", "input", x)
    want_tensor("rope", "cos", cos)
    want_tensor("rope", "sin", sin)
    local n = x._c.ndim
    seq_dim = Tensor.normdim(seq_dim or n - 2, n, "rope")
    if autograd.is_grad_enabled() and (cos.requires_grad or sin.requires_grad) then
        error("rope: the rope tables (cos, sin) cannot require grad (detach them)", 2)
    end
    local y = wrap(C.nemo_rope(x._c, cos._c, sin._c, seq_dim))
    local node = node_of("rope", rope_bw, y, x)
    if node then
        node.cos, node.sin = save(node, cos), save(node, sin)
        node.seq_dim, node.x_dtype = seq_dim, x._c.dtype
    end
    return y
end

-- ==== modulate ====

local function modulate_bw(node, g)
    local need = node.need
    check(C.nemo_modulate_backward(g._c, node.x._c, node.scale._c, node.shift_dtype, need[1] and o1 or nil,
        need[2] and o2 or nil, need[3] and o3 or nil))
    local dx = need[1] and wrap(o1[0]) or nil
    local ds = need[2] and wrap(o2[0]) or nil
    local dh = need[3] and wrap(o3[0]) or nil
    return dx, ds, dh
end

function F.modulate(x, scale, shift)
    want_tensor("modulate", "input", x)
    want_tensor("modulate", "scale", scale)
    if shift ~= nil then want_tensor("modulate", "shift", shift) end
    local y = wrap(C.nemo_modulate(x._c, scale._c, shift and shift._c or nil))
    local node = node_of("modulate", modulate_bw, y, x, scale, shift)
    if node then
        -- dx reads scale; dscale reads x
        node.scale = save(node, scale)
        node.x = save(node, x)
        node.shift_dtype = shift and shift._c.dtype or -1
    end
    return y
end

-- ==== gated_add ====

local function gated_add_bw(node, g)
    local need = node.need
    local dx
    if need[1] then
        dx = g
        if g._c.dtype ~= node.x_dtype then dx = g:to{dtype = Tensor.dtype_names[node.x_dtype]} end
    end
    local da, dg
    if need[2] or need[3] then
        check(C.nemo_gated_add_backward(g._c, node.gate._c, node.a._c, need[3] and o1 or nil, need[2] and o2 or nil))
        da = need[3] and wrap(o1[0]) or nil
        dg = need[2] and wrap(o2[0]) or nil
    end
    return dx, dg, da
end

function F.gated_add(x, gate, a)
    want_tensor("gated_add", "input", x)
    want_tensor("gated_add", "gate", gate)
    want_tensor("gated_add", "addend", a)
    local y = wrap(C.nemo_gated_add(x._c, gate._c, a._c))
    local node = node_of("gated_add", gated_add_bw, y, x, gate, a)
    if node then
        node.gate = save(node, gate)
        node.a = save(node, a)
        node.x_dtype = x._c.dtype
    end
    return y
end

-- ==== vectorised float32 math ====

local FM = {exp = C.NEMO_FM_EXP, tanh = C.NEMO_FM_TANH, sigmoid = C.NEMO_FM_SIGMOID, erf = C.NEMO_FM_ERF}

-- F._fastmath(name, x): a new float32 tensor with the function applied elementwise.
function F._fastmath(name, x)
    local fn = FM[name]
    if fn == nil then error("fastmath: unknown function '" .. tostring(name) .. "' (exp, tanh, sigmoid, erf)", 2) end
    want_tensor("fastmath", "input", x)
    if x._c.dtype ~= dtype_ids.float32 or x._c.devtype ~= 0 then
        error("fastmath: expected a float32 CPU tensor, got " .. x.dtype .. " on " .. x.device, 2)
    end
    local xc = x:contiguous()
    local y = Tensor.empty(xc.shape, {dtype = "float32"})
    check(C.nemo_fastmath_f32(fn, ffi.cast("float *", C.nemo_tensor_data(y._c)),
        ffi.cast("const float *", C.nemo_tensor_data(xc._c)), xc:numel()))
    return y
end

return F
